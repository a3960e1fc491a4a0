"""Resumable training checkpoints, written atomically.

A checkpoint is a folder `checkpoints/checkpoint-<step>/` holding the trainable weights, the optimizer
and LR-schedule states, the trainer state (step, epoch, data-sampler position) and every RNG state.
It is first written to a hidden temporary folder, each file fsync'ed, then a `COMPLETE` marker is
written and the folder renamed into place: a crash or a full disk leaves either the old set of
checkpoints or the new one, never a half-written folder that `resume_from_checkpoint: latest` could
pick. Old checkpoints are pruned only after a new one is complete, so the last good one survives.
Weights or optimizer state holding NaN/inf are refused before anything is written, so `latest` never
points at a poisoned checkpoint; each saved one records `"weights_finite": true` in its trainer state.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from longcat_tuner.errors import CheckpointError
from longcat_tuner.fsutil import is_write_error, shareable, write_failure
from longcat_tuner.train.outputs import (  # torch-free, shared with `check`
    CHECKPOINT_WEIGHTS_FILE, COMPLETE_MARKER, STATE_FILE, list_checkpoints, move_aside, resolved_resume_checkpoint,
    resume_path_problem,
)

WEIGHTS_FILE = CHECKPOINT_WEIGHTS_FILE
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pt"
REQUIRED_FILES = (WEIGHTS_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE, STATE_FILE, COMPLETE_MARKER)


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes the rename itself durable (POSIX); not available everywhere.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def capture_rng_state(
    generators: dict[str, torch.Generator], *, cuda_device: Optional[torch.device] = None
) -> dict[str, Any]:
    """Every RNG that can influence the next step: python, numpy, torch (CPU/CUDA) and named generators.

    `cuda_device` (a multi-GPU rank): only that GPU's state, so a rank never touches the other GPUs.
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {name: gen.get_state() for name, gen in generators.items()},
    }
    if cuda_device is not None and cuda_device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(cuda_device)
    elif torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(
    state: dict[str, Any], generators: dict[str, torch.Generator], *, cuda_device: Optional[torch.device] = None
) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda_device" in state and cuda_device is not None and cuda_device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_device"], cuda_device)
    elif "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in generators.items():
        if name in state["generators"]:
            gen.set_state(state["generators"][name])


def save_checkpoint(
    checkpoints_dir: Path,
    *,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    trainer_state: dict[str, Any],
    rng_state: dict[str, Any],
    extra_files: Optional[dict[str, Any]] = None,
    sharded: Optional[Path] = None,
) -> Path:
    """Write a complete checkpoint atomically and return its folder.

    `extra_files` maps file names to callables `write(path)` (e.g. the LoRA in the official format, so
    an intermediate checkpoint is directly usable). `sharded`: the temporary folder into which every rank
    has just written its shards (`save_sharded_state`); `weights` and `optimizer_state` are then empty and
    the rest is added there. On any failure the temporary folder is removed and a `CheckpointError` says
    why; existing checkpoints are untouched.
    """
    checkpoints_dir = Path(checkpoints_dir)
    poisoned = nonfinite_tensors(weights) + [f"optimizer state {name}" for name in nonfinite_tensors(optimizer_state)]
    if poisoned:
        raise NonFiniteWeightsError(
            f"refusing to save checkpoint for step {step} in {checkpoints_dir}: {len(poisoned)} tensor(s) hold NaN/inf "
            f"(e.g. {poisoned[0]}); earlier checkpoints are kept. Lower learning_rate and resume from the last finite "
            "checkpoint"
        )
    final = checkpoints_dir / checkpoint_name(step)
    tmp = Path(sharded) if sharded is not None else checkpoints_dir / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    try:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        if sharded is None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS_FILE))
            shareable(tmp / WEIGHTS_FILE)
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        torch.save(scheduler_state, tmp / SCHEDULER_FILE)
        torch.save(rng_state, tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state, "weights_finite": True}, indent=2))
        for name, write in (extra_files or {}).items():
            write(tmp / name)
        for path in tmp.iterdir():
            if path.is_file():  # the shard files of `sharded/` were synced by their writers
                _fsync_file(path)
        (tmp / COMPLETE_MARKER).write_text(f"{step}\n")
        _fsync_file(tmp / COMPLETE_MARKER)
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. signal right after a periodic save): replace it
            stale = checkpoints_dir / f".old-{final.name}-{os.getpid()}"
            final.rename(stale)
            tmp.rename(final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(checkpoints_dir)
    except Exception as err:
        # OSError(ENOSPC), safetensors' SafetensorError and torch.save's short-write RuntimeError alike:
        # no half-written folder stays behind, and the message names the disk.
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_write_error(err):
            raise
        raise CheckpointError(
            f"could not save checkpoint for step {step} in {checkpoints_dir}: {write_failure(err, checkpoints_dir)}. "
            "Earlier checkpoints are kept; free space there, set output_dir to a disk with room, "
            "or lower checkpoints_total_limit."
        ) from err
    return final


def set_aside_newer_checkpoints(checkpoints_dir: Path, step: int) -> Optional[Path]:
    """Move the complete checkpoints after `step` into one `superseded-after-checkpoint-<step>-<time>` folder
    beside them, and return it (None when there are none). A run resumed from an earlier checkpoint branches
    there: it would save its own steps over them one by one, and prune them, losing finished work."""
    newer = [path for saved, path in list_checkpoints(checkpoints_dir) if saved > step]
    if not newer:
        return None
    return move_aside(
        newer, Path(checkpoints_dir), f"superseded-after-{checkpoint_name(step)}-{time.strftime('%Y%m%d-%H%M%S')}",
        reason=f"resuming from step {step} would save over the later checkpoints in {checkpoints_dir}",
        fix="move them out of that folder yourself, or resume into another output_dir",
    )


class NonFiniteWeightsError(CheckpointError):
    """Weights (or optimizer state) hold NaN/inf: saving them would make a checkpoint nothing can resume."""


def _named_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix or "tensor", obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _named_tensors(value, f"{prefix}.{index}" if prefix else str(index))


def nonfinite_tensors(state: Any) -> list[str]:
    """Names of the floating-point tensors in `state` (a dict of tensors, or a nested optimizer state)
    that hold NaN or inf."""
    bad = []
    for name, tensor in _named_tensors(state):
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a sharded DTensor: its own shard
        if local.is_floating_point() and local.numel() and not bool(torch.isfinite(local.detach()).all()):
            bad.append(name)
    return bad


def checkpoint_is_finite(path: Path) -> bool:
    """Whether the checkpoint at `path` holds finite weights: its recorded verdict (this version checks
    before saving), else a look at the weights file, one tensor at a time."""
    path = Path(path)
    try:
        if json.loads((path / STATE_FILE).read_text()).get("weights_finite") is True:
            return True
        from safetensors import safe_open

        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as handle:
            return not any(nonfinite_tensors({key: handle.get_tensor(key)}) for key in handle.keys())
    except Exception:  # unreadable: not something to resume from
        return False


def last_finite_checkpoint(checkpoints_dir: Path, *, before: Optional[int] = None) -> Optional[Path]:
    """The newest complete checkpoint with finite weights (optionally older than step `before`)."""
    for step, path in reversed(list_checkpoints(checkpoints_dir)):
        if (before is None or step < before) and checkpoint_is_finite(path):
            return path
    return None


_LEFTOVER = re.compile(r"^\.(tmp|old)-(checkpoint-\d+)-.+$")


def remove_stale_temporaries(checkpoints_dir: Path) -> list[Path]:
    """Delete leftovers of saves that were interrupted, and return the checkpoints put back in place.

    A save over an existing step renames `checkpoint-X` to `.old-checkpoint-X-<pid>`, then its complete
    temporary to `checkpoint-X`: a kill between the two renames leaves no `checkpoint-X`, and its only copies are
    those folders. The complete `.old-` one (else a complete `.tmp-` one, marked `COMPLETE` after every file was
    synced) is renamed back to `checkpoint-X` first; only then is the rest deleted, so no checkpoint is lost."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    leftovers = sorted((path for path in checkpoints_dir.iterdir() if _LEFTOVER.match(path.name)),
                       key=lambda path: (_LEFTOVER.match(path.name)[1] != "old", path.name))  # .old- first
    restored = []
    for path in leftovers:
        final = checkpoints_dir / _LEFTOVER.match(path.name)[2]
        if not final.exists() and path.is_dir() and (path / COMPLETE_MARKER).exists():
            try:
                path.rename(final)
            except OSError:
                continue  # kept, not deleted (below): the next start tries again
            restored.append(final)
    for path in leftovers:
        final = checkpoints_dir / _LEFTOVER.match(path.name)[2]
        if path.exists() and (final.exists() or not (path / COMPLETE_MARKER).exists()):
            shutil.rmtree(path, ignore_errors=True)
    return restored


def prune_checkpoints(checkpoints_dir: Path, limit: Optional[int], *, keep: Path) -> list[Path]:
    """Remove the oldest complete checkpoints beyond `limit`; `keep` (the newest good one) never goes."""
    if limit is None:
        return []
    existing = [path for _, path in list_checkpoints(checkpoints_dir)]
    removed = []
    for path in existing[: max(len(existing) - limit, 0)]:
        if path.resolve() == Path(keep).resolve():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def resolve_resume_path(value: Optional[str], checkpoints_dir: Path) -> Optional[Path]:
    """`latest` -> newest complete checkpoint (None when the run is new); a path -> that folder, which must be a
    complete checkpoint (`resume_path_problem`)."""
    problem = resume_path_problem(value, checkpoints_dir)  # before minutes of caching and model loading
    if problem:
        raise CheckpointError(problem)
    return resolved_resume_checkpoint(value, checkpoints_dir)  # the one `check` asks


def load_checkpoint(path: Path, *, tensors: bool = True) -> dict[str, Any]:
    """Read a checkpoint folder; a missing file or marker is a `CheckpointError` that names it.

    `tensors=False` skips the weights and the optimizer state (`{}` in their place): the FSDP ranks other
    than 0 receive those by broadcast instead of each holding a full copy in host memory.
    """
    path = Path(path)
    sharded = is_sharded_checkpoint(path)
    missing = [name for name in (SHARDED_REQUIRED if sharded else REQUIRED_FILES) if not (path / name).exists()]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is incomplete: missing {', '.join(missing)}. "
            "Resume from an earlier checkpoint folder or use resume_from_checkpoint: latest"
        )
    try:
        return {
            "path": path,
            # A sharded checkpoint's tensors are read by every rank into its shards (`load_sharded_state`).
            "sharded": sharded,
            "weights": load_file(str(path / WEIGHTS_FILE)) if tensors and not sharded else {},
            "optimizer": _load_state(path / OPTIMIZER_FILE) if tensors and not sharded else {},
            "scheduler": _load_state(path / SCHEDULER_FILE),
            "rng": _load_state(path / RNG_FILE),
            "state": _read_trainer_state(path / STATE_FILE),
        }
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {path} holds a file with objects other than tensors, numbers and numpy RNG state, so it "
            f"was not written by longcat-tuner and is not loaded (unpickling it could run code): {str(err)[:300]}"
        ) from None
    except Exception as err:  # corrupt file: say which checkpoint, never a bare pickle trace
        raise CheckpointError(f"checkpoint {path} could not be read ({err}); resume from an earlier one") from err


def _read_trainer_state(file: Path) -> dict[str, Any]:
    """trainer_state.json with the values resume reads checked: a damaged or hand-edited file (a list, a step of
    NaN or "two") is a ValueError that `load_checkpoint` names, not a traceback deep in the resume."""
    state = json.loads(file.read_text())

    def whole(value: Any, low: int = 0) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    sampler = state.get("sampler", {"epoch": 0, "position": 0}) if isinstance(state, dict) else None
    if not (isinstance(state, dict) and whole(state.get("step")) and isinstance(sampler, dict)
            and whole(sampler.get("epoch")) and whole(sampler.get("position"))
            and all(whole(state[key], 1) for key in ("world_size", "data_world_size") if key in state)):
        raise ValueError(f"{file.name} does not hold a step and data-sampler position as longcat-tuner writes them")
    return state


# What `capture_rng_state` pickles besides tensors and Python values: numpy's RNG state array.
_NUMPY_CORE = getattr(np, "_core", None) or np.core
# numpy 1.x names its array rebuilder numpy.core.multiarray, numpy 2 numpy._core.multiarray: a checkpoint
# written before a numpy upgrade (or after a downgrade) resumes under either.
_NUMPY_STATE_GLOBALS = [
    (_NUMPY_CORE.multiarray._reconstruct, f"numpy.{core}.multiarray._reconstruct") for core in ("core", "_core")
] + [np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _load_state(file: Path) -> Any:
    """A `torch.save`d state (optimizer, scheduler, RNG) with `weights_only=True`: tensors, Python values and
    numpy's RNG state load; any other object (code a foreign or tampered checkpoint could run) is refused."""
    with torch.serialization.safe_globals(_NUMPY_STATE_GLOBALS):
        return torch.load(file, map_location="cpu", weights_only=True)


def saved_world_size(path: Path) -> Optional[int]:
    """How many processes trained the checkpoint at `path` (1 before multi-GPU existed); None when its
    state file is missing or unreadable (`load_checkpoint` then says what is wrong)."""
    try:
        state = _read_trainer_state(Path(path) / STATE_FILE)
    except (OSError, ValueError):
        return None
    return int(state.get("world_size", 1))


def apply_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], *, source: Path) -> None:
    """Copy saved trainable tensors into `module`; every saved and every trainable name must match."""
    params = check_weight_names(module, weights, source=source)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name].to(param.dtype))


def check_weight_names(module: torch.nn.Module, weights: dict[str, torch.Tensor], *, source: Path) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters of `module`, after checking that `weights` has exactly their names and
    (full, unsharded) shapes."""
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {source} does not match this run's trainable weights "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}); "
            "resume with the same model_type, lora_rank and lora_targets"
        )
    for name, param in params.items():
        if tuple(weights[name].shape) != tuple(param.shape):  # a DTensor reports its full shape
            raise CheckpointError(
                f"checkpoint {source}: {name} has shape {tuple(weights[name].shape)}, "
                f"the run expects {tuple(param.shape)}; resume with the same lora_rank"
            )
    return params


# --- sharded checkpoints of an FSDP2 model (torch.distributed.checkpoint) -------------------------------------
#
# Under FSDP2 a checkpoint's trainable weights and optimizer state can be written by every rank at once, each
# its own shards, with torch.distributed.checkpoint (DCP): no rank ever holds the whole state, and DCP reshards
# on load, so a run saved with N processes resumes with M. The folder is the usual checkpoint folder (the same
# scheduler, RNG and trainer-state files, the COMPLETE marker, the atomic rename) with `sharded/` in place of
# `trainable.safetensors` and `optimizer.pt`. The folder must be on storage every rank can write (one disk for
# one machine; a shared filesystem across nodes).

SHARDED_DIR = "sharded"
SHARDED_REQUIRED = (f"{SHARDED_DIR}/.metadata", SCHEDULER_FILE, RNG_FILE, STATE_FILE, COMPLETE_MARKER)


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / SHARDED_DIR).is_dir()


def sharded_temporary(checkpoints_dir: Path, step: int) -> Path:
    """The temporary folder all ranks write one sharded save into (the same name on every rank); the writer
    creates it empty before the others start."""
    return Path(checkpoints_dir) / f".tmp-{checkpoint_name(step)}-sharded"


class ShardedSaveError(CheckpointError):
    """The ranks could not write a sharded checkpoint's shards (raised on every rank alike)."""


def fresh_folder(path: Path) -> None:
    """An empty folder at `path` (a leftover of an interrupted save is removed first)."""
    shutil.rmtree(path, ignore_errors=True)
    Path(path).mkdir(parents=True)


def discard_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def nonfinite_problem(dit: torch.nn.Module, optimizer: torch.optim.Optimizer, source: Path) -> Optional[str]:
    """A message when this rank's shards of the loaded weights or optimizer state hold NaN/inf, else None."""
    bad = nonfinite_tensors({n: p for n, p in dit.named_parameters() if p.requires_grad})
    bad += [f"optimizer state {name}" for name in nonfinite_tensors(optimizer.state_dict()["state"])]
    if not bad:
        return None
    return (f"checkpoint {source} holds NaN/inf values ({len(bad)} tensors on this rank, e.g. {bad[0]}); resume "
            "from an earlier checkpoint with a lower learning_rate")


def rescale_sampler_state(state: dict[str, Any], saved_ranks: int, ranks: int) -> dict[str, Any]:
    """A data sampler's position after the number of data-parallel ranks changed: the epoch's batches are dealt
    round-robin, so `position` batches per rank are the epoch's first `position * saved_ranks`; the new ranks go
    on after them (rounded down to a whole round: at most `ranks - 1` batches are seen twice)."""
    return {**state, "position": int(state["position"]) * saved_ranks // ranks}


def _dcp_state(dit: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # Trainable parameters only (a LoRA run's frozen base comes from the model files); sharded DTensors as they
    # are, never gathered. The optimizer's lazily created moments are initialised first, so a fresh optimizer
    # presents the tensors a load fills in.
    model_state, optimizer_state = get_state_dict(dit, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_state, "optimizer": optimizer_state}


def save_sharded_state(folder: Path, dit: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                       process_group: Any = None) -> None:
    """Collective (every rank of `process_group`, default all: the ranks the model is sharded over): write this
    rank's shards of the trainable weights and of the optimizer state into `folder/sharded` (DCP; the
    coordinator rank writes `.metadata` once all ranks are done)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_dcp_state(dit, optimizer), checkpoint_id=str(Path(folder) / SHARDED_DIR), process_group=process_group)


def load_sharded_state(folder: Path, dit: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                       process_group: Any = None) -> None:
    """Collective (like `save_sharded_state`): read a sharded checkpoint into a sharded model and its optimizer, at any world size (each
    rank reads the pieces that overlap its own shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    folder = Path(folder)
    state = _dcp_state(dit, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(folder / SHARDED_DIR), process_group=process_group)
    except Exception as err:  # a missing key or shard file: name the checkpoint
        raise CheckpointError(
            f"sharded checkpoint {folder} could not be read into this run's model ({err}); resume with the same "
            "model_type, lora_rank and lora_targets, or from another checkpoint"
        ) from err
    # Not strict: the state holds the trainable parameters only (a LoRA run's frozen base is not in it, and a
    # strict load refused every LoRA checkpoint for the base keys it lacks); `dcp.load` above already failed on
    # any trainable key the checkpoint does not have.
    set_state_dict(dit, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
