"""Local dataset backend: scan folders, read captions, pair clips with start frames, plan every sample.

A plan says, for each usable item, which source frames become which bucket, without decoding more than
one frame per clip (`probe_video`). Problems are collected, not raised: a missing start frame, an orphan
start frame, a missing or empty caption, an unreadable or too-short clip each become a `Problem` that
names the file and the fix; only settings that make the whole run impossible raise.

Pairing rule (SPEC 4): a clip and its start frame share the relative path and file stem,
`clips/a/b.mp4` <-> `start-frames/a/b.png`.
"""
from __future__ import annotations

import glob
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from longcat_tuner.config.datasets import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    DatasetConfig,
    DatasetList,
    parse_dataset_resolution,
)
from longcat_tuner.data.buckets import Bucket, bucket_size
from longcat_tuner.data.images import probe_image
from longcat_tuner.data.video import ResizePlan, VideoInfo, available_frames, clip_frame_count, plan_resize, probe_video, select_frame_indices
from longcat_tuner.errors import DataError, LongcatError

MediaType = Literal["video", "image"]


@dataclass(frozen=True)
class Problem:
    """Something wrong with one file. `skipped`: the item is left out; otherwise a warning."""

    dataset_id: str
    path: str
    reason: str
    skipped: bool = True

    def __str__(self) -> str:
        return f"[{self.dataset_id}] {self.path}: {self.reason}"


@dataclass(frozen=True)
class SampleSource:
    """A clip (or image) paired with its caption and, for I2V, its start frame."""

    dataset_id: str
    key: str  # relative path without suffix, posix: "a/b" for a/b.mp4
    media_path: Path
    media_type: MediaType
    caption: str
    cond_dataset_id: Optional[str] = None
    cond_path: Optional[Path] = None

    @property
    def sample_id(self) -> str:
        return f"{self.dataset_id}/{self.key}"


@dataclass(frozen=True)
class PlannedSample:
    """A usable sample: what to decode (frame indices at `fps`), its bucket and crops."""

    source: SampleSource
    bucket: Bucket
    frame_indices: tuple[int, ...]  # into the clip's presentation order; (0,) for images
    fps: float
    plan: ResizePlan  # how the clip (or image) maps onto the bucket
    cond_plan: Optional[ResizePlan]  # how the start frame maps onto the same bucket
    crop_style: str
    crop_fraction: tuple[float, float]
    video_info: Optional[VideoInfo] = None


@dataclass
class DatasetPlan:
    """One clip dataset after scanning, pairing and probing."""

    dataset: DatasetConfig
    samples: list[PlannedSample] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    scanned: int = 0

    @property
    def skipped(self) -> list[Problem]:
        return [p for p in self.problems if p.skipped]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.skipped]

    def bucket_counts(self) -> dict[Bucket, int]:
        counts: dict[Bucket, int] = {}
        for sample in self.samples:
            counts[sample.bucket] = counts.get(sample.bucket, 0) + 1
        return dict(sorted(counts.items()))


@dataclass
class DataPlan:
    """Every training dataset's plan, the eval split's, and problems of conditioning sets (orphans)."""

    train: list[DatasetPlan]
    eval: Optional[DatasetPlan]
    conditioning_problems: list[Problem] = field(default_factory=list)

    @property
    def all_plans(self) -> list[DatasetPlan]:
        return self.train + ([self.eval] if self.eval is not None else [])

    @property
    def train_samples(self) -> list[PlannedSample]:
        return [s for plan in self.train for s in plan.samples]


# --- scanning --------------------------------------------------------------------------------------
def scan_media(root: Path, extensions: tuple[str, ...], dataset_id: str) -> tuple[dict[str, Path], list[Problem]]:
    """Files under `root` (recursive, hidden entries ignored) keyed by relative path without suffix."""
    if not root.is_dir():
        raise DataError(
            f"dataset '{dataset_id}': instance_data_dir {root} does not exist or is not a folder; "
            "fix the path in multidatabackend.json"
        )
    found: dict[str, Path] = {}
    problems: list[Problem] = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or Path(name).suffix.lower() not in extensions:
                continue
            path = Path(folder) / name
            key = path.relative_to(root).with_suffix("").as_posix()
            if key in found:
                problems.append(
                    Problem(dataset_id, str(path), f"same name as {found[key].name}; rename one of them (kept {found[key].name})")
                )
                continue
            found[key] = path
    return found, problems


def sidecar_caption_path(media_path: Path) -> Path:
    """`clip.txt` beside `clip.mp4`; also `clip.TXT` / `clip.Txt` (cameras and Windows tools write those)."""
    exact = media_path.with_suffix(".txt")
    if exact.is_file():
        return exact
    # Only when the exact name is missing (rare), so large folders are not listed once per item.
    for candidate in sorted(media_path.parent.glob(glob.escape(media_path.stem) + ".*")):
        if candidate.suffix.lower() == ".txt" and candidate.stem == media_path.stem and candidate.is_file():
            return candidate
    return exact


def read_caption(dataset: DatasetConfig, media_path: Path, key: str) -> tuple[Optional[str], Optional[str]]:
    """(caption, problem). caption None: the item cannot be used; a problem with a caption is a warning."""
    strategy = dataset.caption_strategy
    if strategy is None:
        return "", None
    if strategy == "instanceprompt":
        return dataset.instance_prompt or "", None
    if strategy == "filename":
        caption = " ".join(Path(key).name.replace("_", " ").split())
        return caption, (None if caption else "file name gives an empty caption")
    sidecar = sidecar_caption_path(media_path)
    if not sidecar.is_file():
        return None, f"caption file {sidecar.name} is missing; add it or use caption_strategy 'filename'"
    try:
        caption = " ".join(sidecar.read_text(encoding="utf-8-sig").split())  # -sig: drop a Notepad BOM
    except (OSError, UnicodeDecodeError) as err:
        return None, f"caption file {sidecar.name} is unreadable ({err}); save it as UTF-8 text"
    if not caption:
        return "", f"caption file {sidecar.name} is empty; the item trains unconditioned (empty prompt)"
    return caption, None


def pair_dataset(dataset: DatasetConfig, datasets: DatasetList) -> tuple[list[SampleSource], list[Problem], int, set[tuple[str, str]]]:
    """Scan a clip dataset, read captions, attach start frames. Returns (sources, problems, scanned, used cond keys)."""
    media_type: MediaType = "image" if dataset.dataset_type == "image" else "video"
    media, problems = scan_media(dataset.instance_data_dir, IMAGE_EXTENSIONS if media_type == "image" else VIDEO_EXTENSIONS, dataset.id)
    cond_dataset = datasets.by_id(dataset.conditioning_data[0]) if dataset.conditioning_data else None
    cond_media: dict[str, Path] = {}
    if cond_dataset is not None:
        cond_media, cond_problems = scan_media(cond_dataset.instance_data_dir, IMAGE_EXTENSIONS, cond_dataset.id)
        problems += cond_problems
    sources, used = [], set()
    for key, path in media.items():
        cond_path = cond_media.get(key) if cond_dataset is not None else None
        if cond_path is not None:
            used.add((cond_dataset.id, key))  # paired, even if the clip is skipped for another reason
        caption, caption_problem = read_caption(dataset, path, key)
        if caption is None:
            problems.append(Problem(dataset.id, str(path), caption_problem or "no caption"))
            continue
        if caption_problem:
            problems.append(Problem(dataset.id, str(path), caption_problem, skipped=False))
        if cond_dataset is not None and cond_path is None:
            expected = cond_dataset.instance_data_dir / f"{key}.png"
            problems.append(
                Problem(
                    dataset.id,
                    str(path),
                    f"no start frame: expected {expected} (same relative path and stem, any of "
                    f"{', '.join(IMAGE_EXTENSIONS)}) in conditioning dataset '{cond_dataset.id}'",
                )
            )
            continue
        sources.append(
            SampleSource(dataset.id, key, path, media_type, caption, cond_dataset.id if cond_dataset else None, cond_path)
        )
    return sources, problems, len(media), used


# --- planning --------------------------------------------------------------------------------------
def crop_fraction_for(dataset: DatasetConfig, key: str, seed: int) -> tuple[float, float]:
    """(0.5, 0.5) for center crops; a per-item draw from the seed for `random` (stable across runs)."""
    if dataset.crop_style == "center":
        return 0.5, 0.5
    rng = random.Random(f"{seed}:{dataset.id}:{key}")
    return round(rng.random(), 6), round(rng.random(), 6)


def plan_sample(source: SampleSource, dataset: DatasetConfig, *, alignment: int, seed: int) -> PlannedSample:
    """Probe a paired source and decide its bucket, frames and crops. Raises `DataError` to skip it."""
    resolution = parse_dataset_resolution(dataset.resolution)
    crop_fraction = crop_fraction_for(dataset, source.key, seed)
    if source.media_type == "video":
        info = probe_video(source.media_path)
        settings = dataset.video
        have = available_frames(info.frame_times, settings.fps)
        frames = clip_frame_count(have, settings.num_frames, settings.min_frames, settings.max_frames)
        if frames is None:
            need = settings.min_frames or settings.num_frames
            raise DataError(
                f"too short: {have} frames at {settings.fps:g} fps ({info.frame_times[-1]:.2f} s), {need} needed; "
                "lower video.num_frames, set video.min_frames, or remove the clip"
            )
        indices = tuple(select_frame_indices(info.frame_times, settings.fps, frames))
        src_height, src_width, fps = info.height, info.width, settings.fps
    else:
        info = None
        src_height, src_width = probe_image(source.media_path)
        frames, indices, fps = 1, (0,), 0.0
    height, width = bucket_size(resolution, src_height, src_width, alignment)
    plan = plan_resize(src_height, src_width, height, width, crop=dataset.crop, crop_fraction=crop_fraction)
    cond_plan = None
    if source.cond_path is not None:
        cond_height, cond_width = probe_image(source.cond_path)
        cond_plan = plan_resize(cond_height, cond_width, height, width, crop=dataset.crop, crop_fraction=crop_fraction)
    return PlannedSample(
        source, Bucket(frames, height, width), indices, fps, plan, cond_plan, dataset.crop_style, crop_fraction, info
    )


def aspect_warning(sample: PlannedSample) -> Optional[str]:
    """A start frame whose aspect differs from its clip's is cropped differently: worth a warning."""
    if sample.cond_plan is None or sample.video_info is None:
        return None
    clip_aspect = sample.video_info.width / sample.video_info.height
    cond_aspect = sample.cond_plan.scaled_width / sample.cond_plan.scaled_height
    if abs(clip_aspect / cond_aspect - 1) > 0.02:
        return (
            f"start frame {sample.source.cond_path} has aspect {cond_aspect:.3f} but the clip has {clip_aspect:.3f}; "
            "it is cropped to the clip's bucket, check that it really is the clip's first frame"
        )
    return None


PROBE_WORKERS = min(8, os.cpu_count() or 1)


def plan_dataset(dataset: DatasetConfig, datasets: DatasetList, *, alignment: int, seed: int) -> tuple[DatasetPlan, set[tuple[str, str]]]:
    sources, problems, scanned, used = pair_dataset(dataset, datasets)
    plan = DatasetPlan(dataset, problems=problems, scanned=scanned)

    def attempt(source: SampleSource) -> PlannedSample | LongcatError:
        try:
            return plan_sample(source, dataset, alignment=alignment, seed=seed)
        except LongcatError as err:
            return err

    # Probing decodes one frame per clip; PyAV releases the GIL, so threads overlap the files.
    with ThreadPoolExecutor(max_workers=PROBE_WORKERS) as pool:
        outcomes = list(pool.map(attempt, sources))
    for source, outcome in zip(sources, outcomes):
        if isinstance(outcome, LongcatError):
            # Name the file once: probe messages start with the path of the file that failed.
            message, where = str(outcome), source.media_path
            for path in (source.cond_path, source.media_path):
                if path is not None and message.startswith(f"{path}: "):
                    message, where = message[len(f"{path}: ") :], path
                    break
            plan.problems.append(Problem(dataset.id, str(where), message))
            continue
        warning = aspect_warning(outcome)
        if warning:
            plan.problems.append(Problem(dataset.id, str(source.media_path), warning, skipped=False))
        plan.samples.append(outcome)
    return plan, used


def plan_data(datasets: DatasetList, *, eval_dataset_id: Optional[str], alignment: int = 64, seed: int = 42) -> DataPlan:
    """Plan the training datasets and the eval split; report orphan start frames."""
    train_sets, eval_set = datasets.split(eval_dataset_id)
    used: set[tuple[str, str]] = set()
    train_plans = []
    for dataset in train_sets:
        plan, dataset_used = plan_dataset(dataset, datasets, alignment=alignment, seed=seed)
        train_plans.append(plan)
        used |= dataset_used
    eval_plan = None
    if eval_set is not None:
        eval_plan, eval_used = plan_dataset(eval_set, datasets, alignment=alignment, seed=seed)
        used |= eval_used
    conditioning_problems = []
    users: dict[str, list[str]] = {}
    for dataset in train_sets + ([eval_set] if eval_set else []):
        for cond_id in dataset.conditioning_data:
            users.setdefault(cond_id, []).append(dataset.id)
    for cond_id, clip_ids in users.items():
        cond = datasets.by_id(cond_id)
        media, _ = scan_media(cond.instance_data_dir, IMAGE_EXTENSIONS, cond.id)
        for key, path in media.items():
            if (cond_id, key) not in used:
                conditioning_problems.append(
                    Problem(cond_id, str(path), f"orphan start frame: no clip '{key}.*' in dataset(s) {clip_ids}; remove it or add the clip")
                )
    return DataPlan(train_plans, eval_plan, conditioning_problems)


def require_usable(plan: DataPlan, *, eval_dataset_id: Optional[str]) -> None:
    """Raise `DataError` when training could not start: no usable training sample, or an empty eval split."""
    if not plan.train_samples:
        reasons = [str(p) for dataset_plan in plan.train for p in dataset_plan.skipped][:5]
        scanned = sum(p.scanned for p in plan.train)
        raise DataError(
            f"no usable training sample ({scanned} files scanned in {[p.dataset.id for p in plan.train]})"
            + (": " + "; ".join(reasons) if reasons else ": the folders hold no media of the dataset's type")
        )
    if eval_dataset_id and plan.eval is not None and not plan.eval.samples:
        raise DataError(
            f"eval split '{eval_dataset_id}' has no usable sample; fix the items listed by `longcat-tuner check` "
            "or set validation_using_datasets to false"
        )


def plan_summary(plan: DataPlan) -> dict:
    """A JSON-ready summary per dataset (items, buckets, skipped with reasons): `check --json`, the web UI."""

    def one(dataset_plan: DatasetPlan, role: str) -> dict:
        return {
            "id": dataset_plan.dataset.id,
            "role": role,
            "dataset_type": dataset_plan.dataset.dataset_type,
            "is_i2v": dataset_plan.dataset.is_i2v,
            "conditioning_data": list(dataset_plan.dataset.conditioning_data),
            "scanned": dataset_plan.scanned,
            "items": len(dataset_plan.samples),
            "repeats": dataset_plan.dataset.repeats,
            "buckets": {str(bucket): count for bucket, count in dataset_plan.bucket_counts().items()},
            "skipped": [{"path": p.path, "reason": p.reason} for p in dataset_plan.skipped],
            "warnings": [{"path": p.path, "reason": p.reason} for p in dataset_plan.warnings],
            # The first usable pairs, so the web UI can show start-frame thumbnails next to their clips.
            "samples": [
                {
                    "key": s.source.key,
                    "media": str(s.source.media_path),
                    "start_frame": str(s.source.cond_path) if s.source.cond_path else None,
                    "caption": s.source.caption,
                    "bucket": str(s.bucket),
                }
                for s in dataset_plan.samples[:200]
            ],
        }

    datasets = [one(p, "train") for p in plan.train]
    if plan.eval is not None:
        datasets.append(one(plan.eval, "eval"))
    return {
        "datasets": datasets,
        "conditioning": [{"dataset_id": p.dataset_id, "path": p.path, "reason": p.reason} for p in plan.conditioning_problems],
        "train_items": len(plan.train_samples),
        "eval_items": len(plan.eval.samples) if plan.eval is not None else 0,
    }
