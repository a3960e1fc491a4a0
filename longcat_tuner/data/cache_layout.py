"""Where the VAE cache entries of a plan live, and what each one holds (torch-free: `check` uses it too).

  * clip: `<clip dataset cache_dir_vae>/<key>.safetensors`. A key (the clip's relative path without suffix)
    is unique within its dataset and has one bucket, and no two datasets share a cache_dir_vae (refused when
    multidatabackend.json is read), so a clip entry belongs to one clip.
  * start frame: `<start-frame dataset cache_dir_vae>/<variant>/<key>.safetensors`. A start frame is cropped
    into its clip's bucket, so one image gives a different entry for every size (and crop) a clip dataset
    asks of it. The variant folder names what the entry depends on besides the image: the bucket
    `<height>x<width>`, then `-stretch` for a clip dataset with `crop: false` and `-random-<clip dataset id>`
    for one with `crop_style: random` (its crop window is drawn per clip dataset). Clip datasets that share a
    start-frame dataset at the same size share its entries; other sizes coexist (`64x64/x.safetensors`,
    `64x128/x.safetensors`) and each is reused by the next run.

Before this layout a start frame's entry was `<start-frame dataset cache_dir_vae>/<key>.safetensors`
(`legacy_start_frame_path`), one per image whatever the size: the cache stage moves such an entry into its
variant folder when its fingerprint matches, and rebuilds otherwise.

What is left that naming cannot separate is a cache_dir_vae inside another's (`/cache/vae` and `/cache/vae/b`:
clip `b/x` of the first and clip `x` of the second are one file): `cache_entry_conflicts` names such entries,
`check` refuses them and the cache stage stops on them before an encoder is loaded.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from longcat_tuner.config.datasets import DatasetConfig, DatasetList
from longcat_tuner.data.backends import DataPlan, PlannedSample

ENTRY_SUFFIX = ".safetensors"
# A dataset id used as it is in a folder name; another id (a slash, spaces, a long name) goes by its hash.
_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def clip_entry_path(dataset: DatasetConfig, sample: PlannedSample) -> Path:
    """The clip (or image) entry of `sample`, in its dataset's cache_dir_vae."""
    return dataset.cache_dir_vae / f"{sample.source.key}{ENTRY_SUFFIX}"


def start_frame_variant(dataset: DatasetConfig, sample: PlannedSample) -> str:
    """The folder, within the start-frame dataset's cache, of the entry `sample` of clip dataset `dataset` needs."""
    name = f"{sample.bucket.height}x{sample.bucket.width}"
    if not dataset.crop:
        name += "-stretch"
    if sample.crop_style != "center":
        tag = dataset.id if _PLAIN_ID.fullmatch(dataset.id) else "+" + hashlib.sha256(dataset.id.encode("utf-8")).hexdigest()[:12]
        name += f"-random-{tag}"
    return name


def start_frame_entry_path(dataset: DatasetConfig, sample: PlannedSample, datasets: DatasetList) -> Optional[Path]:
    """The start-frame entry of `sample` (of clip dataset `dataset`), or None for a text-to-video sample."""
    source = sample.source
    if source.cond_dataset_id is None:
        return None
    folder = datasets.by_id(source.cond_dataset_id).cache_dir_vae / start_frame_variant(dataset, sample)
    return folder / f"{source.key}{ENTRY_SUFFIX}"


def legacy_start_frame_path(sample: PlannedSample, datasets: DatasetList) -> Optional[Path]:
    """Where caches written before the variant folders kept this start frame (one entry per image)."""
    source = sample.source
    if source.cond_dataset_id is None:
        return None
    return datasets.by_id(source.cond_dataset_id).cache_dir_vae / f"{source.key}{ENTRY_SUFFIX}"


def _crop(sample: PlannedSample, plan) -> str:
    return (f"{sample.crop_style}:{sample.crop_fraction[0]:.6f},{sample.crop_fraction[1]:.6f}:"
            f"{plan.scaled_height}x{plan.scaled_width}+{plan.top}+{plan.left}")


def clip_settings(sample: PlannedSample) -> dict[str, str]:
    """What a clip entry's content depends on besides the source file, the encoder and the dtype (part of its
    fingerprint, `data.cache.clip_fingerprint`)."""
    return {
        "kind": "clip" if sample.source.media_type == "video" else "image",
        "height": str(sample.bucket.height),
        "width": str(sample.bucket.width),
        "frames": str(sample.bucket.frames),
        "fps": f"{sample.fps:g}",
        "frame_indices": hashlib.sha256(",".join(map(str, sample.frame_indices)).encode()).hexdigest()[:16],
        "crop": _crop(sample, sample.plan),
    }


def start_frame_settings(sample: PlannedSample) -> dict[str, str]:
    """What a start-frame entry's content depends on besides the image, the encoder and the dtype (part of its
    fingerprint, `data.cache.cond_fingerprint`)."""
    assert sample.cond_plan is not None
    return {
        "kind": "start_frame",
        "height": str(sample.bucket.height),
        "width": str(sample.bucket.width),
        "frames": "1",
        "crop": _crop(sample, sample.cond_plan),
    }


@dataclass(frozen=True)
class PlannedEntry:
    """One VAE cache entry a plan writes: where, what it holds, whose folder it is in, which clip dataset uses it."""

    path: Path
    kind: str  # "clip" or "start frame"
    owner: DatasetConfig  # the dataset whose cache_dir_vae holds it
    user: str  # the clip dataset whose sample needs it
    source: Path
    settings: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        settings = dict(self.settings)
        if self.kind == "clip":
            shape = f"{settings['frames']}x{settings['height']}x{settings['width']}"
            return f"the {settings['kind']} {self.source} of dataset '{self.user}' ({shape})"
        return (f"the start frame {self.source} of dataset '{self.owner.id}' for dataset '{self.user}' "
                f"({settings['height']}x{settings['width']})")


def planned_entries(plan: DataPlan, datasets: DatasetList) -> Iterator[PlannedEntry]:
    """Every clip and start-frame entry of `plan`, with its path made absolute through the cache folder's links."""
    roots: dict[str, Path] = {}

    def resolved(owner: DatasetConfig, path: Path) -> Path:
        if owner.id not in roots:
            roots[owner.id] = Path(owner.cache_dir_vae).expanduser().resolve()
        return roots[owner.id] / path.relative_to(owner.cache_dir_vae)

    for dataset_plan in plan.all_plans:
        dataset = dataset_plan.dataset
        for sample in dataset_plan.samples:
            source = sample.source
            yield PlannedEntry(resolved(dataset, clip_entry_path(dataset, sample)), "clip", dataset, dataset.id,
                               source.media_path, tuple(clip_settings(sample).items()))
            cond_path = start_frame_entry_path(dataset, sample, datasets)
            if cond_path is not None and source.cond_path is not None:
                owner = datasets.by_id(source.cond_dataset_id)
                yield PlannedEntry(resolved(owner, cond_path), "start frame", owner, dataset.id, source.cond_path,
                                   tuple(start_frame_settings(sample).items()))


def _inside(inner: Path, outer: Path) -> bool:
    return inner != outer and outer in inner.parents


def cache_entry_conflicts(plan: DataPlan, datasets: DatasetList) -> list[str]:
    """Cache entries of `plan` that two different items would write (one message per pair of cache folders,
    naming both datasets and the fix); empty when every entry has one content. Entries that hold the same
    thing (two clip datasets using one start frame at one size) are shared, not conflicts."""
    first: dict[Path, PlannedEntry] = {}
    clashes: dict[tuple[str, str], list[tuple[PlannedEntry, PlannedEntry]]] = {}
    for entry in planned_entries(plan, datasets):
        earlier = first.setdefault(entry.path, entry)
        if earlier is entry or (earlier.source.resolve(), earlier.settings) == (entry.source.resolve(), entry.settings):
            continue
        clashes.setdefault((earlier.owner.id, entry.owner.id), []).append((earlier, entry))
    problems = []
    for pairs in clashes.values():
        earlier, entry = pairs[0]
        more = f" (and {len(pairs) - 1} more entries)" if len(pairs) > 1 else ""
        a, b = earlier.owner, entry.owner
        root_a, root_b = (Path(d.cache_dir_vae).expanduser().resolve() for d in (a, b))
        if _inside(root_b, root_a) or _inside(root_a, root_b):
            inner, outer = (b, a) if _inside(root_b, root_a) else (a, b)
            fix = (f"cache_dir_vae of dataset '{inner.id}' ({inner.cache_dir_vae}) lies inside that of dataset "
                   f"'{outer.id}' ({outer.cache_dir_vae}); give each dataset a cache_dir_vae of its own, not inside "
                   f"another's, in {datasets.source}")
        else:
            fix = f"give dataset '{b.id}' a cache_dir_vae of its own in {datasets.source}"
        problems.append(f"cache entry {entry.path} would hold both {earlier.describe()} and {entry.describe()}, so "
                        f"each run would overwrite the other{more}: {fix}")
    return problems
