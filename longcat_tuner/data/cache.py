"""Latent and text caches: one safetensors file per entry, keyed by a fingerprint in its header.

Three kinds of entries, each in its own folder:
  * clip: `<clip dataset cache_dir_vae>/<relative path>.safetensors`, tensors `mean`, `std` [16, T, h, w]
    (the VAE posterior of the clip encoded as a video, T = 1 + (F - 1) // 4, normalised latent space);
  * start frame: `<conditioning dataset cache_dir_vae>/<variant>/<relative path>.safetensors`, `mean`, `std`
    [16, 1, h, w] (the image encoded alone as a 1-frame video, cropped to its clip's bucket); the variant
    folder is that bucket's `<height>x<width>` (plus the clip dataset's crop when it is not the default), so
    clip datasets of other sizes that share start frames keep one entry each (`data/cache_layout.py`);
  * text: `<cache_dir_text>/<sha256 of the caption>.safetensors`, `embeds` [512, C], `mask` [512]; the
    empty prompt always has one (caption dropout and CFG negatives use it).
The posterior is stored (not a sample) so training draws `mean + std * randn` each time it sees the
clip, as the official code samples `latent_dist.sample()`.

The header metadata holds the fingerprint: every setting that changes the content (format version,
model identity, size, frames, fps, crop, dtype, source path, size and mtime). An entry is reused only
when its stored fingerprint equals the expected one, so a changed input or setting rebuilds exactly the
entries it affects. Files are written to a temporary name and renamed, so a killed build leaves only
complete entries and the next build resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar, Union

import numpy as np
import torch

from longcat_tuner.config.datasets import DatasetConfig, DatasetList, load_datasets
from longcat_tuner.data.backends import (
    DataPlan, DatasetPlan, PlannedSample, Problem, cache_folder_problems, plan_data, require_usable,
)
from longcat_tuner.data.cache_layout import (
    cache_entry_conflicts, clip_entry_path, clip_settings, legacy_start_frame_path, start_frame_entry_path,
    start_frame_settings,
)
from longcat_tuner.data.images import load_image
from longcat_tuner.data.video import decode_frames, frames_to_pixels
from longcat_tuner.devices import default_dtype
from longcat_tuner.errors import DataError, LongcatError
from longcat_tuner.fsutil import atomic_file, is_out_of_space, is_write_error, write_failure

log = logging.getLogger(__name__)

# 2: start frames scaled as the official pipeline scales them (LANCZOS without a pre-shrink, sizes rounded
# down, crop centered at scaled // 2 - target // 2): caches of version 1 hold other pixels and rebuild.
FORMAT_VERSION = "2"
MANIFEST_NAME = "manifest.json"
EMPTY_PROMPT = ""
_T = TypeVar("_T")
_R = TypeVar("_R")


# --- file helpers ------------------------------------------------------------------------------------
def source_stat(path: Path) -> dict[str, str]:
    stat = path.stat()
    return {"source": str(path.resolve()), "source_size": str(stat.st_size), "source_mtime_ns": str(stat.st_mtime_ns)}


def _read_header(path: Path) -> Optional[tuple[dict[str, str], dict[str, tuple[int, ...]]]]:
    """(header metadata, tensor shapes) of a cache file, or None when it is missing or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {}), {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception:  # a truncated or foreign file is just a stale entry
        return None


def read_fingerprint(path: Path) -> Optional[dict[str, str]]:
    """The header metadata of a cache file, or None when it is missing or unreadable (rebuild it)."""
    header = _read_header(path)
    return header[0] if header is not None else None


Shapes = dict[str, tuple[Optional[int], ...]]  # tensor name -> expected shape, None where any size is fine


def is_current(path: Path, fingerprint: dict[str, str], shapes: Optional[Shapes] = None) -> bool:
    """The entry was made from these inputs and settings (its fingerprint) and, with `shapes`, holds those
    tensors with those shapes: a file whose header matches but whose tensors do not (edited, or written by a
    bug) is rebuilt here rather than stopping training when a batch reaches it."""
    header = _read_header(path)
    if header is None or header[0] != fingerprint:
        return False
    found = header[1]
    for name, shape in (shapes or {}).items():
        have = found.get(name)
        if have is None or len(have) != len(shape) or any(w is not None and w != h for w, h in zip(shape, have)):
            return False
    return True


def latent_shapes(frames: int, height: int, width: int) -> Shapes:
    """What a clip or start-frame entry holds: `mean` and `std` [channels, 1 + (frames - 1) // 4, height / 8,
    width / 8] (the VAE's factors, as `CachedVideoDataset` checks them)."""
    shape = (None, 1 + (frames - 1) // 4, height // 8, width // 8)
    return {"mean": shape, "std": shape}


TEXT_SHAPES: Shapes = {"embeds": (None, None), "mask": (None,)}


class CacheWriteError(DataError):
    """A cache entry or manifest could not be written (disk full, read-only folder): not a problem of one
    sample, so the build stops instead of skipping it."""


def _write_failed(path: Path, err: BaseException, what: str = "cache entry") -> CacheWriteError:
    fix = ("free space on that disk or point the dataset's cache_dir_vae / cache_dir_text at a disk with room"
           if is_out_of_space(err, path.parent) else
           "point the dataset's cache_dir_vae / cache_dir_text (multidatabackend.json) at a folder you can write")
    return CacheWriteError(
        f"cannot write {what} {path}: {write_failure(err, path.parent)}; {fix}, then rerun (finished entries are kept)"
    )


def _not_ours(path: Path, what: str) -> CacheWriteError:
    return CacheWriteError(
        f"{path} is {what}; it is not overwritten: move it, or give the dataset's cache_dir_vae / cache_dir_text "
        "(multidatabackend.json) a folder of its own"
    )


def write_entry(path: Path, tensors: dict[str, torch.Tensor], fingerprint: dict[str, str]) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see a partial entry, and a
    failed write (disk full) leaves no file behind and raises `CacheWriteError` naming the entry."""
    from safetensors.torch import save_file

    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise DataError(f"{fingerprint.get('source', path)}: the encoder produced NaN/inf in '{name}'; not cached")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    stored = read_fingerprint(path)
    if stored is not None and "format_version" not in stored:
        raise _not_ours(path, "a safetensors file that is not a cache entry (a LoRA or model file of yours?)")
    try:
        with atomic_file(path) as temporary:  # `<name>.tmp<pid>`, what remove_stale_temporaries looks for
            save_file(tensors, str(temporary), metadata=fingerprint)
    except Exception as err:  # OSError, SafetensorError("... No space left on device ...")
        if not is_write_error(err):
            raise
        raise _write_failed(path, err) from None


def remove_stale_temporaries(folder: Path, older_than_s: float = 600.0) -> int:
    """Delete `*.safetensors.tmp<pid>` files left by killed builds (not fresh ones of a running build)."""
    if not folder.is_dir():
        return 0
    removed, now = 0, time.time()
    for file in folder.rglob("*.safetensors.tmp*"):
        try:
            if now - file.stat().st_mtime > older_than_s:
                file.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def text_cache_path(text_dir: Path, caption: str) -> Path:
    return text_dir / f"{hashlib.sha256(caption.encode('utf-8')).hexdigest()[:32]}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def default_cache_dtype(device: Union[str, torch.device]) -> torch.dtype:
    """bf16 entries on CUDA (half the disk and I/O), fp32 on the CPU; `train` and `cache` share this rule
    because the dtype is part of the fingerprint."""
    return default_dtype(device)


# --- fingerprints ----------------------------------------------------------------------------------
def clip_fingerprint(sample: PlannedSample, vae_identity: str, dtype: torch.dtype) -> dict[str, str]:
    return {
        "format_version": FORMAT_VERSION,
        "model": vae_identity,
        **clip_settings(sample),  # kind, size, frames, fps, frame indices, crop
        "dtype": _dtype_name(dtype),
        **source_stat(sample.source.media_path),
    }


def cond_fingerprint(sample: PlannedSample, vae_identity: str, dtype: torch.dtype) -> dict[str, str]:
    assert sample.source.cond_path is not None and sample.cond_plan is not None
    return {
        "format_version": FORMAT_VERSION,
        "model": vae_identity,
        **start_frame_settings(sample),  # kind, size, frames, crop
        "dtype": _dtype_name(dtype),
        **source_stat(sample.source.cond_path),
    }


def text_fingerprint(caption: str, text_identity: str, dtype: torch.dtype) -> dict[str, str]:
    return {
        "format_version": FORMAT_VERSION,
        "kind": "text",
        "model": text_identity,
        "caption": caption,
        "dtype": _dtype_name(dtype),
    }


def channels_last_conv3d(module: torch.nn.Module) -> int:
    """Store every Conv3d weight as channels_last_3d (NDHWC), so cuDNN picks its tensor-core kernels
    for the VAE's 3D convolutions. Returns how many weights were converted."""
    converted = 0
    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv3d):
            layer.weight.data = layer.weight.data.to(memory_format=torch.channels_last_3d)
            converted += 1
    return converted


# --- encoders, loaded only when something must be built -------------------------------------------
class LazyEncoder:
    """An encoder that is loaded on first use. `identity` is known without loading (for staleness checks)
    when `predicted_identity` is given; after loading, the real `.identity` wins."""

    def __init__(
        self, loader: Callable[[], Any], predicted_identity: Optional[str] = None, instance: Any = None, *, compute_dtype: str
    ) -> None:
        self._loader = loader
        self._instance = instance
        self._predicted = predicted_identity
        self.compute_dtype = compute_dtype

    @classmethod
    def of(cls, instance: Any) -> "LazyEncoder":
        module = getattr(instance, "model", instance)
        dtype = getattr(instance, "dtype", None) or getattr(module, "dtype", None)
        return cls(lambda: instance, instance=instance, compute_dtype=_dtype_name(dtype) if dtype is not None else "unknown")

    @property
    def model_key(self) -> str:
        """What the fingerprint records as `model`: identity and the precision the encoder ran in."""
        return f"{self.identity}@{self.compute_dtype}"

    @property
    def loaded(self) -> bool:
        return self._instance is not None

    @property
    def identity(self) -> str:
        if self._instance is None and self._predicted is not None:
            return self._predicted
        return str(self.get().identity)

    def get(self) -> Any:
        if self._instance is None:
            self._instance = self._loader()
        return self._instance

    def release(self) -> None:
        """Drop the model (frees GPU memory between the text and the VAE stage)."""
        if self._instance is not None and self._loader is not None:
            self._instance = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def predicted_identities(model_root: Path) -> tuple[Optional[str], Optional[str]]:
    """(VAE, text encoder) identities as `longcat_tuner.encoders` computes them, without loading weights.

    Only an optimisation: if the encoders compute something else, the loaded identity wins and the
    entries are checked again against it.
    """
    try:
        from longcat_tuner.encoders.text import folder_identity
        from longcat_tuner.model.loading import find_component

        vae_dir = find_component(model_root, "vae")
        text_dir = find_component(model_root, "text_encoder")
        model_type = json.loads((text_dir / "config.json").read_text()).get("model_type", "")
        return f"wan-vae-{folder_identity(vae_dir)}", f"{model_type}-{folder_identity(text_dir)}"
    except (LongcatError, OSError, ValueError, ImportError):
        return None, None


def load_encoders(model_root: Path, *, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> tuple[LazyEncoder, LazyEncoder]:
    """Lazy handles to the checkpoint's VAE and text encoder (`longcat_tuner.encoders`)."""
    from longcat_tuner.encoders import TextEncoder, VideoVAE
    from longcat_tuner.model.inspect import require_intact_model

    require_intact_model(model_root)  # a damaged config or tokenizer file is named, as `check` names it
    vae_identity, text_identity = predicted_identities(model_root)
    vae = LazyEncoder(
        lambda: VideoVAE.from_pretrained(model_root, dtype=dtype, device=device), vae_identity, compute_dtype=_dtype_name(dtype)
    )
    text = LazyEncoder(
        lambda: TextEncoder.from_pretrained(model_root, dtype=dtype, device=device), text_identity, compute_dtype=_dtype_name(dtype)
    )
    return vae, text


# --- the index the training step reads -----------------------------------------------------------------
@dataclass(frozen=True)
class CachedSample:
    """Where one sample's cached tensors are, plus the metadata training and validation need."""

    sample_id: str
    dataset_id: str
    caption: str
    bucket: tuple[int, int, int]  # frames, height, width (pixels)
    latent_path: str
    text_path: str
    cond_path: Optional[str]
    media_path: str
    cond_media_path: Optional[str]
    repeats: int = 0

    @property
    def group_key(self) -> tuple[int, int, int, bool]:
        """Samples batch together only with the same shape and the same presence of a start frame."""
        return (*self.bucket, self.cond_path is not None)


@dataclass
class CacheReport:
    """Counts per entry kind: built, reused, failed; and the problems met while building."""

    built: dict[str, int] = field(default_factory=lambda: {"clip": 0, "start_frame": 0, "text": 0})
    reused: dict[str, int] = field(default_factory=lambda: {"clip": 0, "start_frame": 0, "text": 0})
    failed: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)  # usable, but not as the user may expect
    seconds: float = 0.0


@dataclass
class CacheIndex:
    """What `build_caches` produced: usable samples of the training datasets and of the eval split."""

    train: list[CachedSample]
    eval: list[CachedSample]
    empty_text_path: str
    plan: DataPlan
    report: CacheReport
    manifests: list[Path] = field(default_factory=list)


def write_manifest(path: Path, dataset_id: str, samples: Sequence[CachedSample], empty_text_path: str) -> None:
    payload = {
        "format_version": FORMAT_VERSION,
        "dataset_id": dataset_id,
        "empty_text_path": empty_text_path,
        "samples": [asdict(s) for s in samples],
    }
    if path.is_file() and path.stat().st_size:
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            # Damaged (a disk error, a partial copy of the cache): kept beside ours, not overwritten.
            kept = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            try:
                path.replace(kept)
            except OSError as err:
                raise _write_failed(path, err, "cache manifest") from None
            log.warning("cache manifest %s was not readable JSON; kept as %s and written anew", path, kept.name)
        else:
            if not (isinstance(earlier, dict) and "dataset_id" in earlier and "samples" in earlier):
                raise _not_ours(path, "a JSON file that is not a cache manifest (yours?)")
    try:
        with atomic_file(path) as temporary:
            temporary.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    except OSError as err:
        raise _write_failed(path, err, "cache manifest") from None


def read_manifest(path: Path) -> tuple[list[CachedSample], str]:
    """(samples, empty-prompt text entry) of a dataset's manifest written by `build_caches`."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"cache manifest {path} is missing or unreadable ({err}); run `longcat-tuner cache`") from None
    if payload.get("format_version") != FORMAT_VERSION:
        raise DataError(f"cache manifest {path} has format {payload.get('format_version')}; rebuild with `longcat-tuner cache`")
    samples = [CachedSample(**{**s, "bucket": tuple(s["bucket"])}) for s in payload["samples"]]
    return samples, payload["empty_text_path"]


# --- building ----------------------------------------------------------------------------------------
def _prefetch(items: Sequence[_T], fn: Callable[[_T], _R], workers: int) -> Iterator[tuple[_T, Union[_R, BaseException]]]:
    """Apply `fn` on a thread pool, `workers` ahead, yielding (item, result or exception) in order.

    Decoding (PyAV releases the GIL) then overlaps with encoding of the previous clip.
    """
    if workers <= 0:
        for item in items:
            try:
                yield item, fn(item)
            except Exception as err:  # reported per item by the caller
                yield item, err
        return

    def guarded(item: _T) -> Union[_R, BaseException]:
        try:
            return fn(item)
        except Exception as err:
            return err

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        iterator = iter(items)
        for item in iterator:
            pending.append((item, pool.submit(guarded, item)))
            if len(pending) > workers:
                break
        while pending:
            item, future = pending.pop(0)
            result = future.result()
            next_item = next(iterator, None)
            if next_item is not None:
                pending.append((next_item, pool.submit(guarded, next_item)))
            yield item, result


def decode_sample(sample: PlannedSample) -> np.ndarray:
    """uint8 [F, H, W, 3] frames of a planned clip or image, on its bucket."""
    if sample.source.media_type == "video":
        assert sample.video_info is not None
        return decode_frames(sample.source.media_path, sample.video_info, sample.frame_indices, sample.plan)
    return load_image(sample.source.media_path, sample.plan)[None]


def _progress(total: int, desc: str, enabled: bool, unit: str):
    from tqdm import tqdm

    # tqdm shows rate (it/s or s/it) and ETA; `mininterval` keeps logs short when stderr is a file.
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled or total == 0, dynamic_ncols=True, mininterval=1.0)


@dataclass
class _Job:
    sample: PlannedSample
    dataset: DatasetConfig
    latent_path: Path
    cond_path: Optional[Path]  # <start-frame cache_dir_vae>/<bucket size[-crop]>/<key>.safetensors (cache_layout.py)
    text_path: Path
    legacy_cond_path: Optional[Path] = None  # where caches before the size folders kept it (moved from there)
    clip_current: bool = False
    cond_current: bool = False


def _plan_jobs(plan: DatasetPlan, datasets: DatasetList) -> list[_Job]:
    return [
        _Job(
            sample,
            plan.dataset,
            clip_entry_path(plan.dataset, sample),
            start_frame_entry_path(plan.dataset, sample, datasets),
            text_cache_path(plan.dataset.text_cache_dir, sample.source.caption),
            legacy_start_frame_path(sample, datasets),
        )
        for sample in plan.samples
    ]


def refuse_entry_conflicts(plan: DataPlan, datasets: DatasetList) -> None:
    """`DataError` naming the cache entries two different items would write (a cache_dir_vae inside another's),
    before any encoder is loaded; `check` refuses the same (`cache_layout.cache_entry_conflicts`)."""
    conflicts = cache_entry_conflicts(plan, datasets)
    if conflicts:
        raise DataError("; ".join(conflicts))


def _adopt_legacy_start_frame(job: _Job, fingerprint: dict[str, str], shapes: Shapes) -> bool:
    """Move a start-frame entry written before the size folders (`<key>.safetensors` beside them) into its
    folder when it is exactly this job's entry (fingerprint and shapes); other old entries are left alone and
    the entry is built."""
    legacy = job.legacy_cond_path
    if legacy is None or job.cond_path is None or legacy == job.cond_path or not is_current(legacy, fingerprint, shapes):
        return False
    try:
        job.cond_path.parent.mkdir(parents=True, exist_ok=True)
        legacy.replace(job.cond_path)
    except OSError as err:
        log.warning("could not move the cache entry %s to %s (%s); building it there", legacy, job.cond_path, err)
        return False
    return True


def _build_text(jobs: list[_Job], text_dirs: set[Path], encoder: LazyEncoder, dtype: torch.dtype, report: CacheReport, *, batch_size: int, progress: bool) -> None:
    wanted: dict[Path, str] = {}
    for folder in text_dirs:
        wanted[text_cache_path(folder, EMPTY_PROMPT)] = EMPTY_PROMPT
    for job in jobs:
        wanted[job.text_path] = job.sample.source.caption

    def stale() -> list[tuple[Path, str]]:
        return [(p, c) for p, c in wanted.items() if not is_current(p, text_fingerprint(c, encoder.model_key, dtype), TEXT_SHAPES)]

    todo = stale()
    if todo and not encoder.loaded:
        encoder.get()
        todo = stale()  # the loaded identity is authoritative
    report.reused["text"] += len(wanted) - len(todo)
    users: dict[str, list[_Job]] = {}
    for job in jobs:
        users.setdefault(job.sample.source.caption, []).append(job)
    with _progress(len(todo), "text embeddings", progress, "caption") as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            _warn_long_captions([caption for _, caption in chunk], encoder.get(), users, report)
            embeds, mask = encoder.get().encode([caption for _, caption in chunk])
            for row, (path, caption) in enumerate(chunk):
                write_entry(path, {"embeds": embeds[row].to(dtype), "mask": mask[row].long()}, text_fingerprint(caption, encoder.model_key, dtype))
                report.built["text"] += 1
            bar.update(len(chunk))


def _warn_long_captions(captions: list[str], encoder: Any, users: dict[str, list["_Job"]], report: CacheReport) -> None:
    """Name the samples whose caption the text encoder truncates (it reads the first 512 tokens)."""
    counts = getattr(encoder, "token_counts", None)
    limit = getattr(encoder, "max_length", None)
    if counts is None or limit is None:
        return
    for caption, count in zip(captions, counts(captions)):
        if count <= limit:
            continue
        for job in users.get(caption, []):
            source = job.sample.source
            problem = Problem(
                source.dataset_id, str(source.media_path),
                f"caption has {count} tokens; the text encoder reads the first {limit}, the rest is ignored; "
                "shorten it to keep every detail",
                skipped=False,
            )
            report.warnings.append(problem)
            log.warning("%s", problem)


def _build_latents(jobs: list[_Job], vae: LazyEncoder, dtype: torch.dtype, report: CacheReport, *, progress: bool, decode_workers: int) -> list[_Job]:
    """Encode stale clip and start-frame entries; returns the jobs whose entries are all usable."""

    def refresh() -> None:
        for job in jobs:
            bucket = job.sample.bucket
            job.clip_current = is_current(job.latent_path, clip_fingerprint(job.sample, vae.model_key, dtype),
                                          latent_shapes(bucket.frames, bucket.height, bucket.width))
            if job.cond_path is None:
                job.cond_current = True
                continue
            fingerprint, shapes = cond_fingerprint(job.sample, vae.model_key, dtype), latent_shapes(1, bucket.height, bucket.width)
            job.cond_current = is_current(job.cond_path, fingerprint, shapes) or _adopt_legacy_start_frame(job, fingerprint, shapes)

    refresh()
    if any(not (j.clip_current and j.cond_current) for j in jobs) and not vae.loaded:
        vae.get()
        refresh()
    todo = [j for j in jobs if not (j.clip_current and j.cond_current)]
    report.reused["clip"] += sum(j.clip_current for j in jobs)
    report.reused["start_frame"] += sum(j.cond_current and j.cond_path is not None for j in jobs)

    def decode(job: _Job) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        frames = None if job.clip_current else decode_sample(job.sample)
        start = None
        if not job.cond_current:
            assert job.sample.source.cond_path is not None and job.sample.cond_plan is not None
            start = load_image(job.sample.source.cond_path, job.sample.cond_plan)[None]
        return frames, start

    failed: set[int] = set()
    written: set[Path] = set()  # start frames built in this run: clip datasets of one size share them
    with _progress(len(todo), "VAE latents", progress, "clip") as bar, _fast_convolutions(vae if todo else None):
        for job, result in _prefetch(todo, decode, decode_workers):
            try:
                if isinstance(result, BaseException):
                    raise result
                frames, start = result
                device = getattr(vae.get(), "device", None)
                if frames is not None:
                    mean, std = vae.get().encode_posterior(frames_to_pixels(frames, device))
                    write_entry(job.latent_path, {"mean": mean[0].to(dtype), "std": std[0].to(dtype)}, clip_fingerprint(job.sample, vae.model_key, dtype))
                    report.built["clip"] += 1
                if start is not None and job.cond_path in written:
                    report.reused["start_frame"] += 1  # one entry per path holds one content (cache_entry_conflicts)
                elif start is not None:
                    mean, std = vae.get().encode_posterior(frames_to_pixels(start, device))
                    write_entry(job.cond_path, {"mean": mean[0].to(dtype), "std": std[0].to(dtype)}, cond_fingerprint(job.sample, vae.model_key, dtype))
                    written.add(job.cond_path)
                    report.built["start_frame"] += 1
            except CacheWriteError:  # the disk, not this sample: stop the build, keep what is finished
                raise
            except torch.cuda.OutOfMemoryError:
                bucket = job.sample.bucket
                raise DataError(
                    f"the VAE ran out of GPU memory encoding {job.sample.source.media_path} (bucket {bucket}); "
                    "lower the dataset's resolution or video.num_frames, free the GPU, or run "
                    "`longcat-tuner cache --device cpu` (slow); finished entries are kept"
                ) from None
            except LongcatError as err:
                source = job.sample.source
                message = str(err)
                where = next((str(p) for p in (source.cond_path, source.media_path) if p and message.startswith(f"{p}: ")), str(source.media_path))
                message = message.removeprefix(f"{where}: ")
                report.failed.append(Problem(source.dataset_id, where, message))
                log.warning("skipped %s: %s", where, message)
                failed.add(id(job))
            bar.update(1)
    return [j for j in jobs if id(j) not in failed]


@contextlib.contextmanager
def _fast_convolutions(vae: Optional[LazyEncoder]) -> Iterator[None]:
    """On CUDA: cuDNN autotuning and channels-last Conv3d weights for the VAE stage.

    Measured on one H100 with the full-size Wan VAE in bf16 (93x480x832): 1.47 s -> 1.14 s per clip
    (bench/bench_cache.py). Clips of one bucket share a shape, so autotuning pays off after the first.
    """
    model = getattr(vae.get(), "model", None) if vae is not None else None
    device = getattr(vae.get(), "device", None) if vae is not None else None
    if not isinstance(model, torch.nn.Module) or device is None or torch.device(device).type != "cuda":
        yield
        return
    channels_last_conv3d(model)
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _cached_samples(jobs: Iterable[_Job]) -> list[CachedSample]:
    out = []
    for job in jobs:
        source, bucket = job.sample.source, job.sample.bucket
        out.append(
            CachedSample(
                sample_id=source.sample_id,
                dataset_id=source.dataset_id,
                caption=source.caption,
                bucket=(bucket.frames, bucket.height, bucket.width),
                latent_path=str(job.latent_path),
                text_path=str(job.text_path),
                cond_path=str(job.cond_path) if job.cond_path else None,
                media_path=str(source.media_path),
                cond_media_path=str(source.cond_path) if source.cond_path else None,
                repeats=job.dataset.repeats,
            )
        )
    return out


def build_latent_cache(
    plan: DataPlan, datasets: DatasetList, *, vae: LazyEncoder, dtype: torch.dtype, progress: bool = True, decode_workers: int = 2
) -> CacheReport:
    """Only the VAE stage of `cache_plan` (clips and start frames; no text): what `bench/bench_cache.py` times."""
    report = CacheReport()
    refuse_entry_conflicts(plan, datasets)
    jobs = [job for dataset_plan in plan.all_plans for job in _plan_jobs(dataset_plan, datasets)]
    _build_latents(jobs, vae, dtype, report, progress=progress, decode_workers=decode_workers)
    return report


def cache_plan(
    plan: DataPlan,
    datasets: DatasetList,
    *,
    vae: LazyEncoder,
    text_encoder: LazyEncoder,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
    text_batch_size: int = 8,
    decode_workers: int = 2,
) -> CacheIndex:
    """Build every stale entry of `plan` (text first, then VAE latents) and write the manifests."""
    started = time.perf_counter()
    report = CacheReport()
    refuse_entry_conflicts(plan, datasets)
    train_jobs = [job for dataset_plan in plan.train for job in _plan_jobs(dataset_plan, datasets)]
    eval_jobs = _plan_jobs(plan.eval, datasets) if plan.eval is not None else []
    all_jobs = train_jobs + eval_jobs
    text_dirs = {dataset_plan.dataset.text_cache_dir for dataset_plan in plan.all_plans}
    cond_dirs = {p.parent for j in all_jobs for p in (j.cond_path, j.legacy_cond_path) if p is not None}
    for folder in {j.latent_path.parent for j in all_jobs} | cond_dirs | text_dirs:
        remove_stale_temporaries(folder)
    _build_text(all_jobs, text_dirs, text_encoder, dtype, report, batch_size=text_batch_size, progress=progress)
    text_encoder.release()  # the VAE stage does not need it; free its memory first
    usable = {id(j) for j in _build_latents(all_jobs, vae, dtype, report, progress=progress, decode_workers=decode_workers)}
    vae.release()
    first_text_dir = sorted(text_dirs)[0]
    empty_text = str(text_cache_path(first_text_dir, EMPTY_PROMPT))
    index = CacheIndex(
        train=_cached_samples(j for j in train_jobs if id(j) in usable),
        eval=_cached_samples(j for j in eval_jobs if id(j) in usable),
        empty_text_path=empty_text,
        plan=plan,
        report=report,
    )
    for dataset_plan in plan.all_plans:
        dataset = dataset_plan.dataset
        samples = [s for s in index.train + index.eval if s.dataset_id == dataset.id]
        manifest = dataset.cache_dir_vae / MANIFEST_NAME
        write_manifest(manifest, dataset.id, samples, str(text_cache_path(dataset.text_cache_dir, EMPTY_PROMPT)))
        index.manifests.append(manifest)
    report.seconds = time.perf_counter() - started
    if not index.train:
        reasons = "; ".join(str(p) for p in report.failed[:5])
        raise DataError(f"no training sample could be cached ({len(report.failed)} failed): {reasons}")
    return index


def build_caches(
    data_backend_config: Union[str, Path, DatasetList],
    *,
    model_root: Optional[Union[str, Path]] = None,
    eval_dataset_id: Optional[str] = None,
    alignment: int = 64,
    seed: int = 42,
    device: Union[str, torch.device] = "cpu",
    encoder_dtype: torch.dtype = torch.float32,
    cache_dtype: Optional[torch.dtype] = None,
    vae: Any = None,
    text_encoder: Any = None,
    progress: bool = True,
    text_batch_size: int = 8,
    decode_workers: int = 2,
) -> CacheIndex:
    """Scan, pair and plan the datasets, then build every stale cache entry (what `train` calls).

    `cache_dtype` defaults to `default_cache_dtype(device)`. Encoders come from `model_root` (loaded
    only if something must be built) unless `vae` /
    `text_encoder` instances are given. Problems with single items are logged and counted in the
    returned index (`index.plan` problems, `index.report.failed`); `DataError` only when no training
    sample (or no eval sample, with `eval_dataset_id`) is usable.
    """
    datasets = data_backend_config if isinstance(data_backend_config, DatasetList) else load_datasets(data_backend_config)
    plan = plan_data(datasets, eval_dataset_id=eval_dataset_id, alignment=alignment, seed=seed)
    for dataset_plan in plan.all_plans:
        for problem in dataset_plan.problems:
            log.warning("%s %s", "skipped" if problem.skipped else "warning", problem)
    for problem in plan.conditioning_problems:
        log.warning("skipped %s", problem)
    require_usable(plan, eval_dataset_id=eval_dataset_id)
    unwritable = cache_folder_problems(datasets)
    if unwritable:  # before an encoder is loaded, not after the first entry is encoded
        raise CacheWriteError("; ".join(unwritable))
    if vae is None or text_encoder is None:
        if model_root is None:
            raise DataError("build_caches needs model_root (pretrained_model_name_or_path) or both encoders")
        lazy_vae, lazy_text = load_encoders(Path(model_root), device=device, dtype=encoder_dtype)
    lazy_vae = LazyEncoder.of(vae) if vae is not None else lazy_vae
    lazy_text = LazyEncoder.of(text_encoder) if text_encoder is not None else lazy_text
    index = cache_plan(
        plan, datasets, vae=lazy_vae, text_encoder=lazy_text, dtype=cache_dtype or default_cache_dtype(device), progress=progress,
        text_batch_size=text_batch_size, decode_workers=decode_workers,
    )
    if eval_dataset_id and plan.eval is not None and not index.eval:
        raise DataError(f"eval split '{eval_dataset_id}': no sample could be cached; see the problems above")
    return index
