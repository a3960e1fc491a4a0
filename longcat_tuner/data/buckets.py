"""Buckets (frames, height, width) and a batch sampler that never mixes them.

Bucket rule for an area target `resolution: R` (the guide's 480 means 480p):
  * the native size N(R) = R x W(R), W(R) = 16/9 x R rounded to a multiple of 64: the model's 16:9
    format at that height (480 -> 480x832, 720 -> 720x1280, 704 -> 704x1280); area A = R x W(R);
  * the bucket grid is anchored at the native size with the `aspect_bucket_alignment` step a:
    heights R + k*a paired with widths W(R) + j*a (landscape side), and the transpose (portrait side);
    for each grid height the grid width that brings the area closest to A is the candidate;
  * the bucket is the candidate whose aspect W/H is closest to the source's in log ratio (ties: larger
    area, then smaller height).
At 480 with a = 64: 16:9 -> 480x832, 9:16 -> 832x480, 1:1 -> 608x640, 4:3 -> 544x704 (480x832 and
608x640 are what the official 480p bucket table gives for 16:9 and square inputs). Why anchored: the
guide's 480x832 is not on a 0-based 64 px grid (480 = 7.5 x 64), so a grid through 0 could never give
the model's own 480p size; anchoring keeps it and still steps buckets by `aspect_bucket_alignment`.
Every size is a multiple of 16 (R and a are). The grid sits on multiples of 64 (block-sparse friendly
token grid) when R is: `resolution: 704` gives 704x1280 for 16:9, the official 720p refinement size.
A fixed `HEIGHTxWIDTH` resolution is used as is for every item.

The sampler shuffles deterministically from (seed, epoch), batches within a bucket, shuffles the
batch order, and can save and restore its position (epoch, batches done) for exact resume.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Iterator, Optional, Sequence, Union

from longcat_tuner.config.resolution import parse_resolution
from longcat_tuner.errors import ConfigError, DataError, ShapeError


@dataclass(frozen=True, order=True)
class Bucket:
    """The tensor shape of a sample in pixels: frames x height x width."""

    frames: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def latent_frames(self) -> int:
        return 1 + (self.frames - 1) // 4


def native_size(resolution: int) -> tuple[int, int]:
    """The model's 16:9 frame of height `resolution`, width snapped to 64 (480 -> (480, 832))."""
    return resolution, max(64, round(resolution * 16 / 9 / 64) * 64)


def area_target(resolution: int) -> int:
    """Pixel area the buckets of `resolution` aim for (480 -> 480 * 832)."""
    height, width = native_size(resolution)
    return height * width


def check_alignment(alignment: int) -> None:
    if alignment < 16 or alignment % 16:
        raise ConfigError(
            f"aspect_bucket_alignment {alignment} must be a positive multiple of 16 (VAE 8 x patch 2); use 64"
        )


def check_resolution(resolution: int) -> None:
    if resolution % 16:
        lower = resolution - resolution % 16
        raise ConfigError(f"resolution {resolution} must be a multiple of 16; use {lower} or {lower + 16}")


def _lattice_start(anchor: int, step: int) -> int:
    """Smallest positive member of the lattice anchor + k * step."""
    return anchor - (anchor // step) * step or step


def bucket_candidates(resolution: int, alignment: int = 64) -> list[tuple[int, int]]:
    """(height, width) pairs of the grid anchored at `native_size(resolution)`, area closest to A."""
    check_alignment(alignment)
    check_resolution(resolution)
    native_h, native_w = native_size(resolution)
    area = native_h * native_w
    # Past 4:1 either way the buckets are degenerate strips; no real clip needs them.
    tallest = math.isqrt(4 * area)
    candidates = set()
    for height_anchor, width_anchor in ((native_h, native_w), (native_w, native_h)):
        height_start = _lattice_start(height_anchor, alignment)
        width_start = _lattice_start(width_anchor, alignment)
        for height in range(height_start, tallest + 1, alignment):
            steps = max(0, round((area / height - width_start) / alignment))
            width = min(
                (width_start + k * alignment for k in (steps - 1, steps, steps + 1) if k >= 0),
                key=lambda w: (abs(height * w - area), w),
            )
            if 0.25 <= width / height <= 4.0:
                candidates.add((height, width))
    return sorted(candidates)


def bucket_size(
    resolution: Union[int, tuple[int, int]], src_height: int, src_width: int, alignment: int = 64
) -> tuple[int, int]:
    """(height, width) of the bucket for a source of (src_height, src_width); see the module docstring."""
    if isinstance(resolution, tuple):
        height, width = resolution
        if height % 16 or width % 16:
            raise ShapeError(f"resolution {height}x{width}: height and width must be divisible by 16")
        return height, width
    if src_height <= 0 or src_width <= 0:
        raise DataError(f"source size {src_height}x{src_width} is empty")
    aspect = math.log(src_width / src_height)
    return min(
        bucket_candidates(resolution, alignment),
        key=lambda hw: (round(abs(math.log(hw[1] / hw[0]) - aspect), 9), -hw[0] * hw[1], hw[0]),
    )


def resolution_size(
    spec: Union[int, str], source_hw: Optional[tuple[int, int]] = None, alignment: int = 64
) -> tuple[int, int]:
    """(height, width) for a resolution setting (`config.resolution.parse_resolution` reads it): `480x832` as
    is; a class (`480p`, 480) -> the training bucket for a source of `source_hw` (height, width) on the
    `alignment` grid, so sampling, validation and training agree; without a source, the class's native
    16:9 size (480p -> 480x832)."""
    try:
        parsed = parse_resolution(spec)
    except ValueError as err:
        raise ShapeError(f"resolution {err}") from None
    if isinstance(parsed, tuple):
        return parsed
    return bucket_size(parsed, *(source_hw or native_size(parsed)), alignment)


def group_counts(items: Iterable[tuple[Hashable, int]]) -> dict[Hashable, int]:
    """Items per batch group from (group key, repeats) pairs, each counted 1 + repeats times: what the batch
    sampler can fill."""
    counts: dict[Hashable, int] = {}
    for key, repeat in items:
        counts[key] = counts.get(key, 0) + 1 + repeat
    return counts


def unbatched_warning(groups: dict[tuple[int, int, int, bool], int], batch_size: int) -> str:
    """The buckets too small for one batch (a batch never mixes buckets): their items would never be trained on."""
    named = ", ".join(f"{frames}x{height}x{width} {'image-to-video' if has_start else 'text-to-video'} ({count})"
                      for (frames, height, width, has_start), count in sorted(groups.items()))
    return (f"warning: {sum(groups.values())} training item(s) are never trained on: bucket(s) {named} hold fewer "
            f"items (counting repeats) than train_batch_size {batch_size}, and a batch never mixes buckets; lower "
            "train_batch_size, add repeats to those datasets, or give them a size or frame count of a larger bucket "
            "(`longcat-tuner check` lists the buckets)")


def continuation_problem(items: Iterable[tuple[str, int, bool]], continuation_latents: int) -> Optional[str]:
    """What is wrong with `video_continuation_latents` for samples (dataset id, frames, has start frame): clips
    without a start frame keep that many latents clean, so each needs at least one latent more (images have 1)."""
    if not continuation_latents:
        return None
    short: dict[str, int] = {}
    for dataset_id, frames, has_start in items:
        latents = 1 + (frames - 1) // 4
        if not has_start and latents <= continuation_latents:
            short[dataset_id] = min(latents, short.get(dataset_id, latents))
    if not short:
        return None
    named = ", ".join(f"'{dataset_id}' ({latents} latent frame(s))" for dataset_id, latents in sorted(short.items()))
    return (f"video_continuation_latents {continuation_latents} keeps that many latents of each clip without a start "
            f"frame clean, but dataset(s) {named} have samples with no frame left to denoise; lower "
            f"video_continuation_latents, give those datasets more frames (at least {1 + 4 * continuation_latents}), "
            "or set disabled: true on them (image datasets have one latent frame)")


def validation_size_problem(setting: Union[int, str], sizes: Iterable[tuple[int, int, Optional[str]]],
                            patch_size: Sequence[int]) -> Optional[str]:
    """Why the validation videos (height, width, the eval start frame that sized it or None) of
    `validation_resolution` `setting` cannot be sampled by a DiT of `patch_size`: each side must be a multiple of
    the VAE's 8 x the patch (the release's (1, 2, 2) takes every multiple of 16; (1, 4, 4) needs 32). The rule
    `check` applies to the bucket sizes; `check` and `train` (before loading the model) ask this one."""
    _, patch_h, patch_w = patch_size
    step_h, step_w = 8 * patch_h, 8 * patch_w
    bad = [(height, width, source) for height, width, source in sizes if height % step_h or width % step_w]
    if not bad:
        return None
    height, width, source = bad[0]
    need = (f"not a multiple of {step_h}x{step_w} (height x width), which this checkpoint's patch_size "
            f"(1, {patch_h}, {patch_w}) needs (the VAE's 8 x the patch), so every validation would fail")
    if source is None:  # a fixed HEIGHTxWIDTH
        example = "x".join(str(max(step, math.floor(side / step + 0.5) * step))
                           for side, step in ((height, step_h), (width, step_w)))
        return f"validation_resolution {setting}: {height}x{width} is {need}; set it to multiples of {step_h}x{step_w} (e.g. {example})"
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return (f"validation_resolution {setting}: the validation video of {source} (sized from its start frame) is "
            f"{height}x{width}{more}, {need}; "
            f"set validation_resolution to HEIGHTxWIDTH in multiples of {step_h}x{step_w}, or aspect_bucket_alignment "
            f"to a multiple of {max(step_h, step_w)}")


class BucketBatchSampler:
    """Yields lists of dataset indices; every batch comes from one group (bucket).

    `group_keys[i]` is the bucket (or any hashable group) of item i and `repeats[i]` how many extra times
    it appears per epoch. Per epoch (seed, epoch) fixes a shuffle within each group, batches of
    `batch_size` are cut from it (the last short batch of a group is dropped with `drop_last`), and the
    batch order is shuffled. With `world_size > 1` rank r takes batches r, r+W, ... of the epoch.

    Iterating continues from the saved position to the end of the current epoch and then advances the
    epoch; `state_dict()` / `load_state_dict()` save and restore (epoch, position).
    """

    def __init__(
        self,
        group_keys: Sequence[Hashable],
        batch_size: int,
        *,
        seed: int = 0,
        repeats: Optional[Sequence[int]] = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"train_batch_size {batch_size} must be at least 1")
        if not group_keys:
            raise DataError("no cached samples to train on; run `longcat-tuner check` to see why items were skipped")
        if repeats is not None and len(repeats) != len(group_keys):
            raise ValueError(f"repeats has {len(repeats)} entries for {len(group_keys)} items")
        self.group_keys = list(group_keys)
        self.batch_size = batch_size
        self.seed = seed
        self.repeats = list(repeats) if repeats is not None else [0] * len(group_keys)
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0  # batches of this rank already yielded in `epoch`
        if not self.batches_for_epoch(0):
            raise DataError(
                f"no bucket holds {batch_size} samples (x {world_size} ranks), so no full batch can be formed; "
                "lower train_batch_size, add repeats, or add data (`longcat-tuner check` lists the buckets)"
            )

    def batches_for_epoch(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in order (a pure function of seed, epoch and the items)."""
        rng = random.Random(f"{self.seed}:{epoch}")
        groups: dict[Hashable, list[int]] = {}
        for index, key in enumerate(self.group_keys):
            groups.setdefault(key, []).extend([index] * (1 + self.repeats[index]))
        batches: list[list[int]] = []
        for key in sorted(groups, key=repr):  # a fixed group order keeps the shuffle reproducible
            members = groups[key]
            rng.shuffle(members)
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        if self.world_size > 1:
            usable = len(batches) - len(batches) % self.world_size  # equal step counts on every rank
            batches = batches[self.rank : usable : self.world_size]
        return batches

    def __len__(self) -> int:
        return len(self.batches_for_epoch(self.epoch))

    def unbatched_groups(self) -> dict[Hashable, int]:
        """Groups holding fewer items (counting repeats) than one batch, with their counts: with `drop_last`
        no batch is ever cut from them, so their items are never trained on."""
        if not self.drop_last:
            return {}
        counts = group_counts(zip(self.group_keys, self.repeats))
        return {key: count for key, count in counts.items() if count < self.batch_size}

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches_for_epoch(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    def layout(self) -> str:
        """A fingerprint of what the epochs' batches are cut from: each item's group (bucket) and repeats."""
        return hashlib.sha256(repr(list(zip(self.group_keys, self.repeats))).encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """Position to resume from. With DataLoader prefetching, save the count the trainer consumed. `batch_size`
        and `layout` say what the position counts: batches of that size, cut from items in those groups."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_items": len(self.group_keys),
                "batch_size": self.batch_size, "layout": self.layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position; refused (`DataError`) when it would point at other batches than the ones it counted
        (a checkpoint written before `batch_size` and `layout` were saved is checked for its item count only)."""
        if state.get("num_items", len(self.group_keys)) != len(self.group_keys):
            raise DataError(
                f"the checkpoint's data sampler saw {state['num_items']} items but the cache now has "
                f"{len(self.group_keys)}; the data changed since the checkpoint, so the position cannot be "
                "restored exactly (resume with the same data, or start a new run)"
            )
        if state.get("batch_size", self.batch_size) != self.batch_size:
            raise DataError(
                f"train_batch_size is {self.batch_size}, the checkpoint's data position counts batches of "
                f"{state['batch_size']}: it would point at other batches of the epoch; set train_batch_size back to "
                f"{state['batch_size']} to resume, or start a new run (init_lora: the checkpoint's "
                "longcat_lora.safetensors, in a fresh output_dir)"
            )
        if state.get("layout", self.layout()) != self.layout():
            raise DataError(
                f"the {len(self.group_keys)} cached items fall into other buckets or repeat other counts than at the "
                "checkpoint (a dataset's resolution, repeats, crop or aspect_bucket_alignment, or its files, changed), "
                "so its data position would point at other batches; resume with the data settings of the run, or "
                "start a new run (init_lora: the checkpoint's longcat_lora.safetensors, in a fresh output_dir)"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state.get("seed", self.seed))
