"""Local dataset backend: scan folders, read captions, pair clips with start frames, plan every sample.

A plan says, for each usable item, which source frames become which bucket, without decoding more than
one frame per clip (`probe_video`). Problems are collected, not raised: a missing start frame, an orphan
start frame, a missing or empty caption, an unreadable or too-short clip each become a `Problem` that
names the file and the fix; only settings that make the whole run impossible raise.

Pairing rule (SPEC 4): a clip and its start frame share the relative path and file stem,
`clips/a/b.mp4` <-> `start-frames/a/b.png`.
"""
from __future__ import annotations

import codecs
import glob
import os
import random
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from longcat_tuner.config.datasets import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    DatasetConfig,
    DatasetList,
)
from longcat_tuner.config.resolution import parse_resolution
from longcat_tuner.data.buckets import Bucket, bucket_size
from longcat_tuner.data.images import probe_image
from longcat_tuner.data.video import ResizePlan, VideoInfo, available_frames, clip_frame_count, plan_resize, probe_video, select_frame_indices
from longcat_tuner.errors import DataError, LongcatError
from longcat_tuner.fsutil import folder_problem

MediaType = Literal["video", "image"]
NO_START_FRAME = "no start frame"  # the reason's opening words for an I2V clip whose start frame is missing


@dataclass(frozen=True)
class Problem:
    """Something wrong with one file. `skipped`: the item is left out; otherwise a warning."""

    dataset_id: str
    path: str
    reason: str
    skipped: bool = True
    clip: Optional[str] = None  # a start frame in the wrong folder: the clip it belongs to (check refuses these)

    def __post_init__(self) -> None:
        # A name that is not UTF-8 must not make printing or saving the report fail (`printable`).
        for name in ("path", "reason", "clip"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, printable(value))

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
def scan_media(root: Path, extensions: tuple[str, ...], dataset_id: str, *,
               source: str = "multidatabackend.json") -> tuple[dict[str, Path], list[Problem]]:
    """Files under `root` (recursive, hidden entries ignored) keyed by relative path without suffix, in
    Unicode NFC form (so `café` pairs whether its accent was stored composed or decomposed).

    Symbolic links are followed, but each real folder is entered once (tracked by device and inode), so a
    link loop cannot hang the scan, and a file reached through several names counts once (the real path
    is preferred over a link). Loops and duplicates are warnings that name the link.
    """
    if not root.is_dir():
        raise DataError(
            f"dataset '{dataset_id}': instance_data_dir {root} does not exist or is not a folder; "
            f"fix the path in {source}"
        )
    problems: list[Problem] = []
    candidates: list[tuple[str, Path, bool]] = []  # (key, path, reached through a link)
    for path, through_link in _walk_media(root, extensions, dataset_id, problems):
        if not _is_unicode(str(path)):
            problems.append(Problem(dataset_id, str(path), "file name is not valid UTF-8 (written by a system "
                                    "with another encoding); rename the file (and its caption and start frame)"))
            continue
        if _has_control(path.relative_to(root).as_posix()):
            problems.append(Problem(dataset_id, str(path), "file name holds control characters (a newline, a terminal "
                                    "escape; shown escaped); rename the file (and its caption and start frame)"))
            continue
        # NFC: a name typed on macOS (decomposed "e" + accent) pairs with the same name typed elsewhere.
        key = unicodedata.normalize("NFC", path.relative_to(root).with_suffix("").as_posix())
        candidates.append((key, path, through_link))
    # One entry per real file: the first real (not linked) name wins, else the first name.
    identity: dict[tuple[int, int], int] = {}
    chosen: dict[int, tuple[str, Path, bool]] = {}
    for position, (key, path, through_link) in enumerate(candidates):
        try:
            stat = path.stat()
        except OSError as err:
            problems.append(Problem(dataset_id, str(path), f"cannot be read ({err.strerror or err}); fix or remove it"))
            continue
        real = (stat.st_dev, stat.st_ino)
        first = identity.get(real)
        if first is None:
            identity[real] = position
            chosen[position] = (key, path, through_link)
            continue
        kept = chosen[first]
        if kept[2] and not through_link:  # prefer the real name over a link seen first
            chosen[first] = (key, path, through_link)
            key, path, kept = kept[0], kept[1], (key, path, through_link)
        problems.append(
            Problem(dataset_id, str(path), f"same file as {kept[1]} (reached through a symbolic link); counted once", skipped=False)
        )
    found: dict[str, Path] = {}
    for key, path, _ in (chosen[p] for p in sorted(chosen)):
        if key in found:
            other = found[key]
            twin = other.stem != path.stem and unicodedata.normalize("NFC", other.stem) == unicodedata.normalize("NFC", path.stem)
            why = (" (the two names differ only in Unicode form: one stores accents as separate characters, as macOS "
                   "writes them; they look the same)") if twin else ""
            problems.append(
                Problem(dataset_id, str(path), f"same name as {other.name}{why}; rename one of them (kept {other.name})")
            )
            continue
        found[key] = path
    return found, problems


def _is_unicode(text: str) -> bool:
    """False for a name with bytes that are not UTF-8 (Python keeps them as lone surrogates, which no file
    format, log or terminal can write)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# Bidirectional-text controls: a right-to-left override in a file name makes a terminal show the name's end
# reversed (`clip\u202egnp.mp4` reads as clip4pm.png), so they are escaped like control characters.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _escaped(char: str) -> bool:
    return unicodedata.category(char) == "Cc" or char in _BIDI_CONTROLS


def _has_control(text: str) -> bool:
    return any(_escaped(char) for char in text)


def printable(text: str) -> str:
    """`text` (a path, or a message naming one) as text that can be printed and saved: bytes of a file name
    that were not UTF-8 become U+FFFD, control characters are escaped (`\\n`, `\\x1b`) and so are bidirectional
    overrides (`\\u202e`), so a file name cannot add lines to a report, send escape sequences to the terminal or
    show itself reversed."""
    if not _is_unicode(text):
        try:
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "replace").decode("utf-8")
    if _has_control(text):
        text = "".join((repr(char)[1:-1] if unicodedata.category(char) == "Cc" else f"\\u{ord(char):04x}")
                       if _escaped(char) else char for char in text)
    return text


def _walk_media(root: Path, extensions: tuple[str, ...], dataset_id: str, problems: list[Problem]):
    """Yield (path, reached_through_a_link) for media files, depth first in sorted order (as `os.walk`).

    Real sub-folders are walked first; linked folders afterwards, and only when their target was not
    entered yet (a loop, or a second name for a folder already scanned, is reported and skipped).
    """
    def identity(path: Path) -> tuple[int, int]:
        stat = path.stat()
        return stat.st_dev, stat.st_ino

    visited = {identity(root)}
    pending_links: list[tuple[Path, bool]] = []
    stack: list[tuple[Path, bool]] = [(root, False)]
    while stack or pending_links:
        if not stack:
            link, _ = pending_links.pop(0)
            try:
                target = identity(link)
            except OSError as err:
                problems.append(Problem(dataset_id, str(link), f"broken folder link ({err.strerror or err}); fix or remove it", skipped=False))
                continue
            if target in visited:
                real, parent = os.path.realpath(link), os.path.realpath(link.parent)
                loop = parent == real or parent.startswith(real.rstrip(os.sep) + os.sep)
                what = f"symbolic link loop: points to {real}, a folder that contains it" if loop else (
                    f"symbolic link to {real}, a folder already scanned")
                problems.append(Problem(dataset_id, str(link), f"{what}; not followed (its files count once)", skipped=False))
                continue
            visited.add(target)
            stack.append((link, True))
        folder, through_link = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as err:
            problems.append(Problem(dataset_id, str(folder), f"folder cannot be listed ({err.strerror or err})", skipped=False))
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(folder) / entry.name
            try:
                if entry.is_symlink() and entry.is_dir(follow_symlinks=True):
                    pending_links.append((path, True))
                elif entry.is_dir(follow_symlinks=False):
                    key = identity(path)
                    if key not in visited:  # a bind mount of a folder already scanned
                        visited.add(key)
                        subfolders.append((path, through_link))
                elif path.suffix.lower() in extensions:
                    if entry.is_file(follow_symlinks=True):
                        yield path, through_link or entry.is_symlink()
                    elif entry.is_symlink() and not path.exists():
                        problems.append(Problem(dataset_id, str(path), f"broken symbolic link to {os.readlink(path)}; fix or remove it"))
                    else:  # a pipe, socket or device (or a link to one): reading it would block or never end
                        via = f"symbolic link to {os.readlink(path)}, " if entry.is_symlink() else ""
                        problems.append(Problem(dataset_id, str(path), f"{via}not a regular file (a pipe, socket or "
                                                                       "device); replace it with the file itself"))
            except OSError as err:
                problems.append(Problem(dataset_id, str(path), f"cannot be read ({err.strerror or err}); fix or remove it"))
        stack.extend(reversed(subfolders))


def sidecar_caption_path(media_path: Path) -> Path:
    """`clip.txt` beside `clip.mp4`; also `clip.TXT` / `clip.Txt` (cameras and Windows tools write those), and a
    name equal in Unicode NFC form (`über.txt` typed on Linux beside `über.mp4` stored decomposed by macOS), as
    clips and start frames pair."""
    exact = media_path.with_suffix(".txt")
    if exact.is_file():
        return exact
    # Only when the exact name is missing (rare), so large folders are not listed once per item.
    for candidate in sorted(media_path.parent.glob(glob.escape(media_path.stem) + ".*")):
        if candidate.suffix.lower() == ".txt" and candidate.stem == media_path.stem and candidate.is_file():
            return candidate
    stem = unicodedata.normalize("NFC", media_path.stem)
    if stem != media_path.stem or not stem.isascii():
        for candidate in sorted(media_path.parent.iterdir()):
            if candidate.suffix.lower() == ".txt" and unicodedata.normalize("NFC", candidate.stem) == stem \
                    and candidate.is_file():
                return candidate
    return exact


def clean_caption(text: str) -> tuple[str, int]:
    """(caption with control characters removed and whitespace collapsed, number of characters removed).

    Control characters (NUL, ESC, DEL, C1 codes ...) are never meant in a caption; tab, newline and carriage
    return are whitespace and, like runs of spaces, become one space.
    """
    kept, removed = [], 0
    for char in text:
        if char in "\t\n\r" or unicodedata.category(char) != "Cc":
            kept.append(char)
        else:
            removed += 1
    return " ".join("".join(kept).split()), removed


def _control_note(removed: int) -> str:
    return f"{removed} control character{'s' if removed != 1 else ''} (NUL, ESC, ...) removed"


def decode_caption(data: bytes) -> str:
    """A sidecar caption's text: UTF-8 (a byte-order mark dropped), or UTF-16 when it starts with its
    byte-order mark (Notepad's "Unicode"). Other encodings raise `UnicodeDecodeError`."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    return data.decode("utf-8-sig")


def read_caption(dataset: DatasetConfig, media_path: Path, key: str) -> tuple[Optional[str], Optional[str]]:
    """(caption, problem). caption None: the item cannot be used; a problem with a caption is a warning."""
    strategy = dataset.caption_strategy
    if strategy is None:
        return "", None
    if strategy == "instanceprompt":
        caption, removed = clean_caption(dataset.instance_prompt or "")
        return caption, (f"instance_prompt: {_control_note(removed)}" if removed else None)
    if strategy == "filename":
        caption, removed = clean_caption(Path(key).name.replace("_", " "))
        if not caption:
            return caption, "file name gives an empty caption" + (f" ({_control_note(removed)})" if removed else "")
        return caption, (f"file name: {_control_note(removed)}" if removed else None)
    sidecar = sidecar_caption_path(media_path)
    if not sidecar.is_file():
        if sidecar.is_dir():
            return None, f"caption file {sidecar.name} is a folder; replace it with the caption text file"
        if sidecar.is_symlink() and not sidecar.exists():  # there, but leads nowhere (or round in a loop): not "missing"
            return None, f"caption file {sidecar.name} is a broken symbolic link to {os.readlink(sidecar)}; fix or remove it"
        if sidecar.exists():
            return None, (f"caption file {sidecar.name} is not a regular file (a pipe, socket or device); replace it "
                          "with the caption text file")
        return None, f"caption file {sidecar.name} is missing; add it or use caption_strategy 'filename'"
    try:
        caption, removed = clean_caption(decode_caption(sidecar.read_bytes()))
    except OSError as err:
        return None, f"caption file {sidecar.name} is unreadable ({err.strerror or err}); fix or remove it"
    except UnicodeDecodeError as err:
        return None, (f"caption file {sidecar.name} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                      f"{err.start}, e.g. Latin-1 or Windows-1252); save it as UTF-8")
    if not caption:
        note = f" (it holds only control characters, {removed} removed)" if removed else ""
        return "", f"caption file {sidecar.name} is empty{note}; the item trains unconditioned (empty prompt)"
    if removed:
        return caption, f"caption file {sidecar.name}: {_control_note(removed)}; check that it is a text file"
    return caption, None


# A cache entry is `<stem>.safetensors`, written first as `<stem>.safetensors.tmp<pid>` (pid up to 7 digits);
# most file systems allow 255 bytes per name, so a longer clip stem cannot be cached.
NAME_MAX = 255
CACHE_ENTRY_SUFFIX = ".safetensors.tmp1234567"
MAX_STEM_BYTES = NAME_MAX - len(CACHE_ENTRY_SUFFIX)


def no_media_reason(dataset: DatasetConfig, media_type: MediaType, *, source: str) -> str:
    """Why a dataset folder gave nothing to scan, and the fix: a start-frame or clip folder given as the other is
    named as such (the summary otherwise says "0 usable of 0 files" and lists nothing to fix)."""
    wanted, other = (IMAGE_EXTENSIONS, VIDEO_EXTENSIONS) if media_type == "image" else (VIDEO_EXTENSIONS, IMAGE_EXTENSIONS)
    reason = f"no {media_type} files ({' '.join(wanted)}) in this folder or below"
    found, _ = scan_media(dataset.instance_data_dir, other, dataset.id, source=source)
    if found:
        kind = "image" if media_type == "video" else "video"
        reason += (f"; it holds {len(found)} {kind} file(s) (e.g. {next(iter(found.values())).name}): is it the "
                   f"{'start-frame' if kind == 'image' else 'clip'} folder? set instance_data_dir of dataset "
                   f"'{dataset.id}' in {source} to the folder of its {media_type}s")
    else:
        reason += f"; put the {media_type}s there or fix instance_data_dir of dataset '{dataset.id}' in {source}"
    return reason


def near_start_frames(expected: Path, listings: dict[Path, list[str]]) -> str:
    """Why files beside a missing start frame's expected name were not taken (`; ...`, or "" when none): the same
    stem in a format the loader does not read (.tiff, .heic), the same name in another letter case, or a name
    that is a folder, pipe or device. `listings` caches each folder's names (only the error path lists them)."""
    folder = expected.parent
    if folder not in listings:
        try:
            listings[folder] = sorted(os.listdir(folder))
        except OSError:
            listings[folder] = []
    stem = unicodedata.normalize("NFC", expected.stem)
    notes = []
    for name in listings[folder]:
        base, suffix = os.path.splitext(unicodedata.normalize("NFC", name))
        if base == stem and suffix.lower() in IMAGE_EXTENSIONS:  # there, yet not scanned as an image
            where = folder / name
            kind = "a folder" if where.is_dir() else "a broken link" if not where.exists() else \
                "not a regular file (a pipe or device)"
            notes.append(f"{name} is there but is {kind}")
        elif base == stem:
            notes.append(f"{name} is there, but {suffix or 'a name without extension'} is not a start-frame format: "
                         "convert it to .png or .jpg")
        elif base.casefold() == stem.casefold() and suffix.lower() in IMAGE_EXTENSIONS:
            notes.append(f"{name} differs only in letter case: rename it to {expected.stem}{suffix}")
    return "".join(f"; {note}" for note in notes[:3])


def pair_dataset(dataset: DatasetConfig, datasets: DatasetList) -> tuple[list[SampleSource], list[Problem], int, set[tuple[str, str]]]:
    """Scan a clip dataset, read captions, attach start frames. Returns (sources, problems, scanned, used cond keys)."""
    media_type: MediaType = "image" if dataset.dataset_type == "image" else "video"
    media, problems = scan_media(dataset.instance_data_dir, IMAGE_EXTENSIONS if media_type == "image" else VIDEO_EXTENSIONS, dataset.id,
                                 source=datasets.source)
    if not media:
        problems.append(Problem(dataset.id, str(dataset.instance_data_dir),
                                no_media_reason(dataset, media_type, source=datasets.source), skipped=False))
    cond_dataset = datasets.by_id(dataset.conditioning_data[0]) if dataset.conditioning_data else None
    cond_media: dict[str, Path] = {}
    if cond_dataset is not None:
        cond_media, cond_problems = scan_media(cond_dataset.instance_data_dir, IMAGE_EXTENSIONS, cond_dataset.id,
                                               source=datasets.source)
        problems += cond_problems
    sources, used = [], set()
    listings: dict[Path, list[str]] = {}  # start-frame folders listed to explain a missing start frame
    for key, path in media.items():
        cond_path = cond_media.get(key) if cond_dataset is not None else None
        if cond_path is not None:
            used.add((cond_dataset.id, key))  # paired, even if the clip is skipped for another reason
        stem_bytes = len(Path(key).name.encode("utf-8"))
        if stem_bytes > MAX_STEM_BYTES:
            problems.append(Problem(dataset.id, str(path), (
                f"file name is {stem_bytes} bytes long without its extension; its cache entry (<name>.safetensors, "
                f"written under a longer temporary name) would pass the file system's limit of {NAME_MAX} bytes: shorten the "
                f"name (and its caption's and start frame's) to at most {MAX_STEM_BYTES} bytes")))
            continue
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
                    f"{NO_START_FRAME}: expected {expected} (same relative path and stem, any of "
                    f"{', '.join(IMAGE_EXTENSIONS)}) in conditioning dataset '{cond_dataset.id}'"
                    + near_start_frames(expected, listings),
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
    resolution = parse_resolution(dataset.resolution)
    crop_fraction = crop_fraction_for(dataset, source.key, seed)
    if source.media_type == "video":
        info = probe_video(source.media_path)
        settings = dataset.video
        have = available_frames(info.frame_times, settings.fps, slack=info.time_slack)
        frames = clip_frame_count(have, settings.num_frames, settings.min_frames, settings.max_frames)
        if frames is None:
            need = settings.min_frames or settings.num_frames
            if len(info.frame_pts) == 1:
                raise DataError(
                    f"a single frame (a still image, not a video), {need} frames needed; remove it, or put it in a "
                    "dataset with dataset_type 'image'"
                )
            raise DataError(
                f"too short: {have} frames at {settings.fps:g} fps ({info.frame_times[-1]:.2f} s), {need} needed; "
                "lower video.num_frames, set video.min_frames, or remove the clip"
            )
        indices = tuple(select_frame_indices(info.frame_times, settings.fps, frames, slack=info.time_slack))
        src_height, src_width, fps = info.height, info.width, settings.fps
    else:
        info = None
        src_height, src_width = probe_image(source.media_path)
        frames, indices, fps = 1, (0,), 0.0
    height, width = bucket_size(resolution, src_height, src_width, alignment)
    plan = plan_resize(src_height, src_width, height, width, crop=dataset.crop, crop_fraction=crop_fraction)
    refuse_extreme_crop(plan, src_height, src_width, None)
    cond_plan = None
    if source.cond_path is not None:
        cond_height, cond_width = probe_image(source.cond_path)
        cond_plan = plan_resize(cond_height, cond_width, height, width, crop=dataset.crop, crop_fraction=crop_fraction)
        refuse_extreme_crop(cond_plan, cond_height, cond_width, source.cond_path)
    return PlannedSample(
        source, Bucket(frames, height, width), indices, fps, plan, cond_plan, dataset.crop_style, crop_fraction, info
    )


# The crop may cut away at most this share of the scaled picture's area (1 - 1/16). The bucket grid reaches
# about 4:1, so only sources beyond ~60:1 (a 2x4000 strip) are refused: scaled to cover a bucket they would be
# hundreds of thousands of pixels long, past what the scaler takes (it failed as "Invalid argument").
MAX_CROP_FACTOR = 16


def refuse_extreme_crop(plan: ResizePlan, src_height: int, src_width: int, path: Optional[Path]) -> None:
    """`DataError` when covering the bucket would scale the source to over `MAX_CROP_FACTOR` x its area."""
    if plan.scaled_height * plan.scaled_width <= MAX_CROP_FACTOR * plan.height * plan.width:
        return
    kept = 100 * plan.height * plan.width / (plan.scaled_height * plan.scaled_width)
    raise DataError(
        (f"{path}: " if path is not None else "") + f"{src_width} wide and {src_height} high, too far from any "
        f"bucket's aspect: cropped to the {plan.height}x{plan.width} (height x width) bucket it would keep "
        f"{kept:.2g}% of the picture; crop it to an aspect between 1:4 and 4:1, or remove it"
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
        refuse_shared_files(train_plans, eval_plan)
    conditioning_problems = []
    users: dict[str, list[str]] = {}
    for dataset in train_sets + ([eval_set] if eval_set else []):
        for cond_id in dataset.conditioning_data:
            users.setdefault(cond_id, []).append(dataset.id)
    unpaired = clips_without_start_frame(train_plans + ([eval_plan] if eval_plan else []), datasets)
    skipped_clips = clips_skipped_before_pairing(train_plans + ([eval_plan] if eval_plan else []))
    for cond_id, clip_ids in users.items():
        cond = datasets.by_id(cond_id)
        media, _ = scan_media(cond.instance_data_dir, IMAGE_EXTENSIONS, cond.id, source=datasets.source)
        for key, path in media.items():
            if (cond_id, key) in used:
                continue
            same_stem = [(clip, expected) for clip_id, clip, expected in unpaired.get(key.rsplit("/", 1)[-1], [])
                         if clip_id in clip_ids]
            if same_stem:
                clip, expected = same_stem[0]
                conditioning_problems.append(Problem(
                    cond_id, str(path), f"start frame in the wrong folder: clip {clip} has this name but no start "
                    f"frame; move this file to {expected}{path.suffix} (the clip's relative path and stem)",
                    clip=str(clip),
                ))
            elif key in skipped_clips:
                conditioning_problems.append(Problem(
                    cond_id, str(path), f"start frame unused: its clip {skipped_clips[key]} is skipped (its reason is "
                    "listed with its dataset)"))
            else:
                conditioning_problems.append(
                    Problem(cond_id, str(path), f"orphan start frame: no clip '{key}.*' in dataset(s) {clip_ids}; remove it or add the clip")
                )
    return DataPlan(train_plans, eval_plan, conditioning_problems)


def clips_skipped_before_pairing(plans: list[DatasetPlan]) -> dict[str, str]:
    """Key (relative path without suffix, NFC) -> path of the clips the scan skipped (a broken link, a pipe, a
    second link to one file): their start frames are unused, not orphans."""
    found: dict[str, str] = {}
    for plan in plans:
        root = plan.dataset.instance_data_dir
        for problem in plan.problems:
            if not problem.skipped:
                continue
            try:
                relative = Path(problem.path).relative_to(root)
            except ValueError:
                continue
            found.setdefault(unicodedata.normalize("NFC", relative.with_suffix("").as_posix()), problem.path)
    return found


def clips_without_start_frame(plans: list[DatasetPlan], datasets: DatasetList) -> dict[str, list[tuple[str, Path, Path]]]:
    """File stem -> (dataset id, clip, where its start frame belongs, without suffix) of the I2V clips skipped
    for a missing start frame."""
    found: dict[str, list[tuple[str, Path, Path]]] = {}
    for plan in plans:
        if not plan.dataset.conditioning_data:
            continue
        cond_root = datasets.by_id(plan.dataset.conditioning_data[0]).instance_data_dir
        for problem in plan.problems:
            if problem.reason.startswith(NO_START_FRAME):
                key = Path(problem.path).relative_to(plan.dataset.instance_data_dir).with_suffix("")
                found.setdefault(key.name, []).append((plan.dataset.id, Path(problem.path), cond_root / key))
    return found


def _file_identity(path: Path) -> Optional[tuple[int, int]]:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def refuse_shared_files(train_plans: list[DatasetPlan], eval_plan: DatasetPlan) -> None:
    """`DataError` when an eval clip is also a training clip (the same file, through any link or copy path)."""
    trained: dict[tuple[int, int], tuple[str, Path]] = {}
    for plan in train_plans:
        for sample in plan.samples:
            identity = _file_identity(sample.source.media_path)
            if identity is not None:
                trained.setdefault(identity, (plan.dataset.id, sample.source.media_path))
    shared = []
    for sample in eval_plan.samples:
        hit = trained.get(_file_identity(sample.source.media_path) or (-1, -1))
        if hit is not None:
            shared.append((sample.source.media_path, *hit))
    if shared:
        eval_path, train_id, train_path = shared[0]
        raise DataError(
            f"eval split '{eval_plan.dataset.id}' and training dataset '{train_id}' share {len(shared)} file(s) "
            f"(e.g. {eval_path} is {train_path}), so the held-out loss would be measured on training data; "
            "remove them from one of the two datasets"
        )


def cache_folder_problems(datasets: DatasetList) -> list[str]:
    """The enabled datasets' cache folders that could not be created or written (`fsutil.folder_problem`):
    `check` lists them, the cache stage stops on them before loading an encoder."""
    problems, seen = [], set()
    for dataset in datasets.enabled:
        for key, folder in (("cache_dir_vae", dataset.cache_dir_vae), ("cache_dir_text", dataset.text_cache_dir)):
            if dataset.dataset_type == "conditioning" and key == "cache_dir_text":
                continue  # start frames have no captions: their text folder is never written
            if folder in seen:
                continue
            seen.add(folder)
            problem = folder_problem(Path(folder), f"dataset '{dataset.id}' {key}", datasets.source)
            if problem:
                problems.append(problem)
    return problems


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
        "conditioning": [{"dataset_id": p.dataset_id, "path": p.path, "reason": p.reason, "clip": p.clip}
                         for p in plan.conditioning_problems],
        "train_items": len(plan.train_samples),
        "eval_items": len(plan.eval.samples) if plan.eval is not None else 0,
    }
