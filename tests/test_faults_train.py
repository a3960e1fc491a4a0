"""Fault injection in the training runtime: disk full at every write site, a failing final validation,
poisoned (NaN/inf/exploding) runs and two runs on one output_dir.

Disk full is injected as the writers raise it when space runs out: `OSError(ENOSPC)` from Python,
safetensors' `SafetensorError("... No space left on device (os error 28)")`, torch.save's short-write
`RuntimeError("... unexpected pos ...")`; where this machine lets us mount a small tmpfs, also for real.
Training runs are a few steps of the tiny reference checkpoint on the CPU, sharing one cached workspace.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import safetensors
import torch

from conftest import TINY, write_paired_workspace
from longcat_tuner.errors import CheckpointError, ConfigError, DataError
from longcat_tuner.fsutil import write_failure
from longcat_tuner.train import checkpoint as ckpt
from longcat_tuner.train import run_lock
from longcat_tuner.train.events import EventLog, read_events

REPO = Path(__file__).resolve().parents[1]
FRAMES, SIZE = 9, 64
needs_tiny = pytest.mark.skipif(not TINY.is_dir(), reason=f"tiny reference checkpoint not found at {TINY}")


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _safetensors_full(*_args, **_kwargs):
    raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _torch_short_write(*_args, **_kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


# --- checkpoints, unit level --------------------------------------------------------------------------
def _save(root, step, value=0.0, **kwargs):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return ckpt.save_checkpoint(
        root, step=step, weights={"w": torch.full((2,), value)}, optimizer_state=optimizer.state_dict(),
        scheduler_state={"last_epoch": step}, trainer_state={"sampler": {"epoch": 0, "position": step}},
        rng_state=ckpt.capture_rng_state({}), **kwargs,
    )


def _fail_site(monkeypatch, site: str, error):
    """Make one write of `save_checkpoint` fail: tensors, optimizer state, metadata json or the LoRA file."""
    if site == "tensors":
        monkeypatch.setattr(ckpt, "save_file", error)
    elif site == "optimizer":
        real = torch.save

        def save(obj, path, *args, **kwargs):
            if Path(path).name == ckpt.OPTIMIZER_FILE:
                error()
            return real(obj, path, *args, **kwargs)

        monkeypatch.setattr(ckpt.torch, "save", save)
    elif site == "metadata":
        real_write = Path.write_text

        def write_text(self, *args, **kwargs):
            if self.name in (ckpt.STATE_FILE, ckpt.COMPLETE_MARKER):
                error()
            return real_write(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
    return {"lora.safetensors": lambda path: error()} if site == "lora" else {}


@pytest.mark.parametrize("site", ["tensors", "optimizer", "metadata", "lora"])
@pytest.mark.parametrize("error", [_enospc, _safetensors_full, _torch_short_write], ids=["oserror", "safetensors", "torch"])
def test_disk_full_at_each_checkpoint_write_site(tmp_path, monkeypatch, site, error):
    good = _save(tmp_path, 2, 2.0)
    if error is _torch_short_write:  # torch names no errno: the free space decides that the disk is full
        monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(total=10**9, used=10**9, free=4096))
    extra = _fail_site(monkeypatch, site, error)
    with pytest.raises(CheckpointError) as caught:
        _save(tmp_path, 4, 4.0, extra_files=extra)
    message = str(caught.value)
    assert "disk is full" in message and str(tmp_path) in message
    assert "free space" in message and "output_dir" in message and "checkpoints_total_limit" in message
    monkeypatch.undo()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]
    assert ckpt.resolve_resume_path("latest", tmp_path) == good
    assert float(ckpt.load_checkpoint(good)["weights"]["w"][0]) == 2.0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_write_failure_names_other_causes(tmp_path):
    assert "not writable" in write_failure(PermissionError(errno.EACCES, "Permission denied"), tmp_path)
    assert "read-only" in write_failure(OSError(errno.EROFS, "Read-only file system"), tmp_path)
    # A short write on a disk with room left is not called "full", but it is still named.
    assert "cut short" in write_failure(RuntimeError("unexpected pos 1 vs 2"), tmp_path)


def test_non_finite_weights_are_never_saved(tmp_path):
    good = _save(tmp_path, 2, 2.0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ckpt.NonFiniteWeightsError, match="refusing to save checkpoint for step 4.*NaN/inf.*w"):
            _save(tmp_path, 4, bad)
    assert ckpt.resolve_resume_path("latest", tmp_path) == good
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert json.loads((good / ckpt.STATE_FILE).read_text())["weights_finite"] is True


def test_last_finite_checkpoint_skips_poisoned_ones(tmp_path):
    from safetensors.torch import save_file

    first, second = _save(tmp_path, 2, 2.0), _save(tmp_path, 4, 4.0)
    # A checkpoint of an older version that saved NaN weights (no verdict recorded).
    save_file({"w": torch.full((2,), float("nan"))}, str(second / ckpt.WEIGHTS_FILE))
    state = json.loads((second / ckpt.STATE_FILE).read_text())
    del state["weights_finite"]
    (second / ckpt.STATE_FILE).write_text(json.dumps(state))
    assert ckpt.last_finite_checkpoint(tmp_path) == first
    assert ckpt.last_finite_checkpoint(tmp_path, before=2) is None


def test_weights_problem_sees_nan_inf_and_explosion():
    from longcat_tuner.train.trainer import weights_problem

    ok = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.zeros(3))]
    assert weights_problem(ok) is None
    for value, words in ((float("nan"), "non-finite"), (float("-inf"), "non-finite"), (5e29, "exploded")):
        bad = torch.zeros(3)
        bad[1] = value
        assert words in weights_problem(ok + [torch.nn.Parameter(bad)])


# --- real disk full on a small tmpfs (root only) ----------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs; skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_real_disk_full_checkpoint_cache_and_events(small_disk):
    from longcat_tuner.data.cache import CacheWriteError, write_entry

    checkpoints = small_disk / "checkpoints"
    good = _save(checkpoints, 2, 2.0)
    big = {"w": torch.zeros(400_000)}  # 1.6 MB of weights on a 1 MiB disk
    with pytest.raises(CheckpointError, match="disk is full"):
        ckpt.save_checkpoint(checkpoints, step=4, weights=big, optimizer_state={}, scheduler_state={},
                             trainer_state={}, rng_state=ckpt.capture_rng_state({}))
    assert ckpt.resolve_resume_path("latest", checkpoints) == good
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]

    entry = small_disk / "cache" / "clip.safetensors"
    with pytest.raises(CacheWriteError, match=f"cannot write cache entry {re.escape(str(entry))}: the disk is full"):
        write_entry(entry, {"mean": torch.zeros(400_000)}, {"kind": "clip"})
    assert list(entry.parent.iterdir()) == []

    log = EventLog(small_disk)
    log.emit("step", step=1)
    filler = small_disk / "filler"
    with filler.open("wb") as handle:  # take the rest of the disk
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    for step in range(2, 200):
        log.emit("step", step=step, padding="x" * 200)  # kept in memory, training goes on
    filler.unlink()
    log.emit("end", status="completed")
    assert [e.get("step") for e in read_events(small_disk)] == [*range(1, 200), None]


# --- cache stage and event log ------------------------------------------------------------------------
@pytest.mark.parametrize("error", [_enospc, _safetensors_full], ids=["oserror", "safetensors"])
def test_cache_entry_disk_full_names_the_entry_and_leaves_no_file(tmp_path, monkeypatch, error):
    import safetensors.torch

    from longcat_tuner.data.cache import CacheWriteError, write_entry

    real = safetensors.torch.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # the temporary file got (some) bytes, then space ran out
        error()

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    path = tmp_path / "vae" / "clip.safetensors"
    with pytest.raises(CacheWriteError, match=f"cannot write cache entry {re.escape(str(path))}: the disk is full.*free space") as caught:
        write_entry(path, {"mean": torch.zeros(4)}, {"kind": "clip"})
    assert isinstance(caught.value, DataError)
    assert list(path.parent.iterdir()) == []


@needs_tiny
def test_cache_stage_stops_on_a_full_disk_instead_of_skipping_samples(workspace, monkeypatch):
    """A full disk is not a problem of one clip: the build stops naming the entry (it used to report every
    clip as failed, or raise a raw SafetensorError)."""
    import safetensors.torch

    from longcat_tuner.data.cache import CacheWriteError, build_caches

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if "latents-full" in str(filename):
            _safetensors_full()
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    datasets = json.loads((workspace / "multidatabackend.json").read_text())
    fresh = [{**d, "cache_dir_vae": str(workspace / "latents-full" / d["id"])} for d in datasets]
    (workspace / "full-data.json").write_text(json.dumps(fresh))
    with pytest.raises(CacheWriteError, match=r"cannot write cache entry .*latents-full.*the disk is full"):
        build_caches(workspace / "full-data.json", model_root=TINY, eval_dataset_id="val", progress=False)
    leftovers = [p for p in (workspace / "latents-full").rglob("*") if p.is_file()]
    assert leftovers == []


def test_event_log_keeps_events_through_a_full_disk(tmp_path, monkeypatch):
    log = EventLog(tmp_path)
    log.emit("start", run_dir=str(tmp_path))
    real_write = os.write
    state = {"fail": True}

    def write(fd, data):
        if state["fail"]:
            real_write(fd, bytes(data)[: len(data) // 2])  # half a line reaches the file, then ENOSPC
            _enospc()
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    log.emit("step", step=1, loss=0.5)
    log.emit("step", step=2, loss=0.4)
    assert [e["event"] for e in read_events(tmp_path)] == ["start"]  # no torn line was left behind
    assert (tmp_path / "events.jsonl").read_text().endswith("\n")
    state["fail"] = False
    log.emit("step", step=3, loss=0.3)
    assert [e.get("step") for e in read_events(tmp_path)] == [None, 1, 2, 3]


# --- the output_dir lock ------------------------------------------------------------------------------
def _hold_lock_in_subprocess(folder: Path) -> subprocess.Popen:
    code = ("import sys, time; from longcat_tuner.train import run_lock; lock = run_lock.acquire(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(120)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_lock_refuses_a_second_holder_and_names_it(tmp_path):
    folder = tmp_path / "run"
    holder = _hold_lock_in_subprocess(folder)
    try:
        info = run_lock.read_lock(tmp_path / "run" / ".." / "run")  # resolved: one folder, one lock
        assert info is not None and info.pid == holder.pid and info.host == socket.gethostname()
        with pytest.raises(run_lock.RunLockedError,
                           match=f"output_dir {re.escape(str(folder))} is in use by pid {holder.pid} on host .* since .*; "
                                 "wait for it or choose another output_dir"):
            run_lock.acquire(folder)
    finally:
        holder.kill()
        holder.wait()
    # Killed (SIGKILL: no cleanup): its lock file stays, but it is stale and taken over.
    assert (folder / run_lock.LOCK_FILE).is_file() and run_lock.read_lock(folder) is None
    with run_lock.RunLock(folder) as lock:
        assert lock.took_over is not None and lock.took_over.pid == holder.pid
        assert run_lock.read_lock(folder).pid == os.getpid()
        with pytest.raises(run_lock.RunLockedError, match=f"pid {os.getpid()}"):  # same process, second call
            run_lock.acquire(folder)
    assert not (folder / run_lock.LOCK_FILE).exists() and run_lock.read_lock(folder) is None


def test_a_lock_that_cannot_be_written_advises_by_its_cause(tmp_path, monkeypatch):
    """Before: a read-only output_dir was told to "free space there"."""
    def fail(errno_value):
        def _acquire(self):
            raise OSError(errno_value, os.strerror(errno_value))
        return _acquire

    monkeypatch.setattr(run_lock.RunLock, "_acquire", fail(errno.EROFS))
    with pytest.raises(ConfigError, match="read-only file system .*; choose an output_dir you can write to$"):
        run_lock.acquire(tmp_path)
    monkeypatch.setattr(run_lock.RunLock, "_acquire", fail(errno.ENOSPC))
    with pytest.raises(ConfigError, match="the disk is full .*; free space there or choose another output_dir$"):
        run_lock.acquire(tmp_path)


def test_lock_of_another_host_is_not_taken_over(tmp_path):
    (tmp_path / run_lock.LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "other-machine", "started": time.time()}))
    assert run_lock.read_lock(tmp_path).host == "other-machine"
    with pytest.raises(run_lock.RunLockedError, match="other-machine.*delete .*longcat-tuner.lock"):
        run_lock.acquire(tmp_path)


# --- training runs on the tiny checkpoint ---------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return write_paired_workspace(tmp_path_factory.mktemp("faults"), train_clips=2, eval_clips=1, frames=FRAMES, size=SIZE)


def make_config(workspace: Path, name: str, **overrides):
    """A short run; `overrides` go around the schema's validation (model_copy), as a value that slipped
    through it would."""
    from longcat_tuner.config import TrainConfig

    base = {
        "pretrained_model_name_or_path": str(TINY), "output_dir": name, "data_backend_config": "multidatabackend.json",
        "lora_rank": 4, "learning_rate": 1e-3, "lr_warmup_steps": 0, "max_train_steps": 2,
        "checkpoint_step_interval": 1, "checkpoints_total_limit": 3, "validation_step_interval": None,
        "validation_resolution": f"{SIZE}x{SIZE}", "validation_num_video_frames": FRAMES,
        "validation_num_inference_steps": 1, "validation_max_samples": 1, "eval_dataset_id": "val", "seed": 7,
    }
    path = workspace / f"{name}.json"
    path.write_text(json.dumps(base))
    config = TrainConfig.from_file(path)
    return config.model_copy(update=overrides) if overrides else config


def _end(run_dir: Path) -> dict:
    events = read_events(run_dir)
    assert events[-1]["event"] == "end", events[-1]
    return events[-1]


def _errors(run_dir: Path) -> list[str]:
    return [e["message"] for e in read_events(run_dir) if e["event"] == "error"]


@needs_tiny
def test_disk_full_checkpoint_mid_run_training_goes_on(workspace, monkeypatch):
    from longcat_tuner.train.trainer import train

    calls = {"n": 0}
    real = ckpt.save_file

    def save_file(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-2 checkpoint's tensors
            _safetensors_full()
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    config = make_config(workspace, "ckpt-full", max_train_steps=3)
    result = train(config, progress=False)
    run_dir = result.run_dir
    assert result.status == "completed" and sorted(result.losses) == [1, 2, 3]
    assert [s for s, _ in ckpt.list_checkpoints(run_dir / "checkpoints")] == [1, 3]
    (message,) = _errors(run_dir)
    assert "step 2" in message and "disk is full" in message and "Training goes on" in message
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-checkpoint-")]
    assert [e["step"] for e in read_events(run_dir) if e["event"] == "checkpoint"] == [1, 3]
    assert _end(run_dir)["status"] == "completed"


@needs_tiny
def test_final_lora_disk_full_fails_clearly_and_keeps_the_checkpoint(workspace, monkeypatch):
    import safetensors.torch

    from longcat_tuner.train.trainer import LORA_FILE, train

    run_dir = workspace / "lora-full"
    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if Path(filename).parent == run_dir:  # the final LoRA files; the checkpoints' copies go elsewhere
            Path(filename).write_bytes(b"partial")
            _enospc()
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(CheckpointError, match=rf"could not write the final LoRA in {re.escape(str(run_dir))}: the disk "
                                              rf"is full.*last good checkpoint .*checkpoint-000002 is kept"):
        train(make_config(workspace, "lora-full"), progress=False)
    end = _end(run_dir)
    assert end["status"] == "failed"
    assert "could not write the final LoRA" in _errors(run_dir)[-1]
    final = run_dir / "checkpoints" / "checkpoint-000002"
    assert (final / ckpt.COMPLETE_MARKER).is_file() and (final / LORA_FILE).is_file()
    assert ckpt.resolve_resume_path("latest", run_dir / "checkpoints") == final
    assert not list(run_dir.glob("*.safetensors*"))  # no partial or temporary LoRA file
    assert not (run_dir / run_lock.LOCK_FILE).exists()  # released on the error path


@needs_tiny
def test_final_validation_failure_keeps_the_final_outputs(workspace, monkeypatch):
    """The end saves before it validates: the LoRA and final checkpoint exist when validation starts, and
    a failing validation (here: out of memory) is an error event and a warning of a completed run."""
    from longcat_tuner.train import trainer as trainer_module
    from longcat_tuner.train.trainer import LORA_FILE, train

    run_dir = workspace / "val-fails"
    seen = {}

    def run_validation(*args, **kwargs):
        seen["lora"] = (run_dir / LORA_FILE).is_file()
        seen["checkpoint"] = (run_dir / "checkpoints" / "checkpoint-000002" / ckpt.COMPLETE_MARKER).is_file()
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(trainer_module, "run_validation", run_validation)
    result = train(make_config(workspace, "val-fails", checkpoint_step_interval=None), progress=False)
    assert seen == {"lora": True, "checkpoint": True}
    assert result.status == "completed" and result.lora_path == run_dir / LORA_FILE
    assert result.checkpoint_path == run_dir / "checkpoints" / "checkpoint-000002"
    (warning,) = result.warnings
    assert "final validation at step 2 failed: out of memory" in warning and "validation_resolution" in warning
    assert _errors(run_dir) == [warning]
    end = _end(run_dir)
    assert end["status"] == "completed" and end["warnings"] == [warning] and end["lora_path"] == str(run_dir / LORA_FILE)


@needs_tiny
def test_unwritable_validation_folder_does_not_stop_training(workspace):
    from longcat_tuner.train.trainer import LORA_FILE, train

    run_dir = workspace / "val-unwritable"
    run_dir.mkdir()
    (run_dir / "validation").write_text("a file where the folder should be")  # unwritable, also for root
    result = train(make_config(workspace, "val-unwritable", max_train_steps=2, validation_step_interval=1,
                               checkpoint_step_interval=None), progress=False)
    assert result.status == "completed" and sorted(result.losses) == [1, 2]
    periodic, final = result.warnings
    assert periodic.startswith("validation at step 1 failed") and "training goes on" in periodic
    assert final.startswith("final validation at step 2 failed") and str(run_dir / "validation") in final
    assert (run_dir / LORA_FILE).is_file() and ckpt.list_checkpoints(run_dir / "checkpoints")[-1][0] == 2


@needs_tiny
def test_infinite_learning_rate_fails_and_saves_nothing(workspace):
    from longcat_tuner.train.trainer import LORA_FILE, TrainingDivergedError, train

    run_dir = workspace / "lr-inf"
    with pytest.raises(TrainingDivergedError, match="weights are non-finite .* after step 1.*no finite checkpoint"):
        train(make_config(workspace, "lr-inf", learning_rate=float("inf"), max_train_steps=3), progress=False)
    assert _end(run_dir)["status"] == "failed"
    assert ckpt.list_checkpoints(run_dir / "checkpoints") == [] and not (run_dir / LORA_FILE).exists()


@needs_tiny
def test_exploding_learning_rate_fails_naming_the_last_finite_checkpoint(workspace):
    """learning_rate 1e30 with warmup: step 1 (lr 0) is fine and saved, step 2 blows the weights up to
    ~1e29 with a finite loss. The run fails naming checkpoint 1; `latest` is that one, never a poisoned one."""
    from longcat_tuner.train.trainer import LORA_FILE, TrainingDivergedError, train

    run_dir = workspace / "lr-huge"
    first = run_dir / "checkpoints" / "checkpoint-000001"
    with pytest.raises(TrainingDivergedError, match=rf"exploded .* after step 2.*last finite checkpoint is {re.escape(str(first))}"):
        train(make_config(workspace, "lr-huge", learning_rate=1e30, lr_warmup_steps=2, max_train_steps=4),
              progress=False)
    assert _end(run_dir)["status"] == "failed"
    assert [s for s, _ in ckpt.list_checkpoints(run_dir / "checkpoints")] == [1]
    assert ckpt.resolve_resume_path("latest", run_dir / "checkpoints") == first
    weights = ckpt.load_checkpoint(first)["weights"]
    assert all(torch.isfinite(t).all() and t.abs().max() < 1e6 for t in weights.values())
    assert not (run_dir / LORA_FILE).exists()


@needs_tiny
def test_nan_losses_fail_naming_the_last_finite_checkpoint_and_poisoned_resume_is_refused(workspace, monkeypatch):
    from safetensors.torch import load_file, save_file

    from longcat_tuner.train import trainer as trainer_module
    from longcat_tuner.train.trainer import TrainingDivergedError, train

    real, calls = trainer_module.training_loss, {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] >= 3 else value

    monkeypatch.setattr(trainer_module, "training_loss", loss)
    run_dir = workspace / "nan-loss"
    # Skipped steps leave the weights as step 2 made them: checkpoints 3 and 4 are finite copies of them.
    last = run_dir / "checkpoints" / "checkpoint-000004"
    with pytest.raises(TrainingDivergedError, match=rf"3 steps in a row.*last finite checkpoint is {re.escape(str(last))}"):
        train(make_config(workspace, "nan-loss", max_train_steps=6), progress=False)
    assert _end(run_dir)["status"] == "failed"
    assert [s for s, _ in ckpt.list_checkpoints(run_dir / "checkpoints")] == [2, 3, 4]
    monkeypatch.undo()

    # A poisoned `latest` (as an older version could write it) is refused on resume, naming the finite one.
    weights = load_file(str(last / ckpt.WEIGHTS_FILE))
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, str(last / ckpt.WEIGHTS_FILE))
    state = json.loads((last / ckpt.STATE_FILE).read_text())
    del state["weights_finite"]
    (last / ckpt.STATE_FILE).write_text(json.dumps(state))
    earlier = run_dir / "checkpoints" / "checkpoint-000003"
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(last))} holds NaN/inf.*resume from {re.escape(str(earlier))}"):
        train(make_config(workspace, "nan-loss", max_train_steps=6, resume_from_checkpoint="latest"), progress=False)


@needs_tiny
def test_a_checkpoint_without_the_sampler_position_is_refused_naming_it(workspace):
    """Before: a trainer_state.json without the data sampler's position (hand-edited, or not written by a
    training run) was a KeyError traceback in the resume, after the weights were loaded."""
    from longcat_tuner.train.trainer import train

    train(make_config(workspace, "no-sampler", max_train_steps=1), progress=False)
    last = workspace / "no-sampler" / "checkpoints" / "checkpoint-000001"
    state = json.loads((last / ckpt.STATE_FILE).read_text())
    del state["sampler"]
    (last / ckpt.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(last))}: its trainer_state.json holds no data-sampler"):
        train(make_config(workspace, "no-sampler", max_train_steps=2, resume_from_checkpoint="latest"), progress=False)


@needs_tiny
def test_resuming_from_an_earlier_checkpoint_keeps_the_later_ones(workspace, capsys):
    """Before: resuming from checkpoint 1 of a run that had saved 1..3 saved step 2 over the finished
    checkpoint-000002 (and step 3 over -000003): finished work lost without a word."""
    from longcat_tuner.train.trainer import train

    train(make_config(workspace, "branch", max_train_steps=3), progress=False)
    checkpoints = workspace / "branch" / "checkpoints"
    later = {name: (checkpoints / name / ckpt.WEIGHTS_FILE).read_bytes()
             for name in ("checkpoint-000002", "checkpoint-000003")}
    first = checkpoints / "checkpoint-000001"
    train(make_config(workspace, "branch", max_train_steps=2, resume_from_checkpoint=str(first)), progress=False)
    aside = [p for p in checkpoints.iterdir() if p.name.startswith("superseded-after-checkpoint-000001-")]
    assert len(aside) == 1 and f"moved, untouched, to {aside[0]}" in capsys.readouterr().out
    for name, weights in later.items():  # the earlier training's checkpoints, byte for byte
        assert (aside[0] / name / ckpt.WEIGHTS_FILE).read_bytes() == weights
    assert [s for s, _ in ckpt.list_checkpoints(checkpoints)] == [1, 2]  # the branch's own step 2, written anew:
    assert (checkpoints / "checkpoint-000002" / ckpt.WEIGHTS_FILE).read_bytes() == later["checkpoint-000002"]  # same state


@needs_tiny
def test_overwriting_an_output_dir_moves_the_earlier_run_aside(workspace, capsys):
    """Before: `overwrite_output_dir` left the earlier run's checkpoints 2 and 3 beside the new run's 1 (three
    folders under a limit of 2), `latest` then resumed the replaced run at step 3, the pruning removed the new
    run's checkpoint, and events.jsonl held both runs back to back."""
    from longcat_tuner.train.trainer import train

    run_dir, limit = workspace / "overwrite", {"checkpoints_total_limit": 2}
    train(make_config(workspace, "overwrite", max_train_steps=3, **limit), progress=False)
    checkpoints = run_dir / "checkpoints"
    earlier = {path.relative_to(run_dir): path.read_bytes() for path in run_dir.rglob("*")
               if path.is_file() and path.name != run_lock.LOCK_FILE}
    assert [s for s, _ in ckpt.list_checkpoints(checkpoints)] == [2, 3] and Path("longcat_lora.safetensors") in earlier
    capsys.readouterr()

    train(make_config(workspace, "overwrite", max_train_steps=1, overwrite_output_dir=True, **limit), progress=False)
    aside = [p for p in run_dir.iterdir() if p.name.startswith("superseded-run-")]
    assert len(aside) == 1 and f"moved, untouched, to {aside[0]}" in capsys.readouterr().out
    for name, content in earlier.items():  # the earlier run, byte for byte: checkpoints, final files, events
        assert (aside[0] / name).read_bytes() == content, name
    assert [s for s, _ in ckpt.list_checkpoints(checkpoints)] == [1]
    assert [e["start_step"] for e in read_events(run_dir) if e["event"] == "start"] == [0]  # a new events.jsonl

    train(make_config(workspace, "overwrite", max_train_steps=4, resume_from_checkpoint="latest", **limit), progress=False)
    starts = [e for e in read_events(run_dir) if e["event"] == "start"]
    assert starts[-1]["resumed_from"] == str(checkpoints / "checkpoint-000001")  # the new run, not the replaced one
    assert [s for s, _ in ckpt.list_checkpoints(checkpoints)] == [3, 4]
    assert [p for p in run_dir.iterdir() if p.name.startswith("superseded-run-")] == aside  # resume moves nothing
    assert [s for s, _ in ckpt.list_checkpoints(aside[0] / "checkpoints")] == [2, 3]  # never pruned


@needs_tiny
def test_second_run_on_a_locked_output_dir_is_refused_and_touches_nothing(workspace):
    from longcat_tuner.train.trainer import train

    run_dir = workspace / "busy"
    holder = _hold_lock_in_subprocess(run_dir)
    in_progress = run_dir / "checkpoints" / ".tmp-checkpoint-000004-99999"  # the holder's save under way
    in_progress.mkdir(parents=True)
    try:
        with pytest.raises(run_lock.RunLockedError, match=f"in use by pid {holder.pid} on host"):
            train(make_config(workspace, "busy"), progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert in_progress.is_dir() and not (run_dir / "events.jsonl").exists()


@needs_tiny
def test_stale_lock_is_taken_over_and_released(workspace, capfd):
    from longcat_tuner.train.trainer import train

    run_dir = workspace / "stale"
    run_dir.mkdir()
    dead = _dead_pid()
    (run_dir / run_lock.LOCK_FILE).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": 1.0}))
    result = train(make_config(workspace, "stale", max_train_steps=1, checkpoint_step_interval=None), progress=False)
    assert result.status == "completed"
    assert f"stale lock of pid {dead}" in capfd.readouterr().err
    assert not (run_dir / run_lock.LOCK_FILE).exists()


@needs_tiny
def test_torchrun_ranks_all_stop_on_a_locked_output_dir(workspace):
    """Only rank 0 asks for the lock; its refusal reaches rank 1, so no rank waits for the other."""
    config = make_config(workspace, "busy-ddp")
    holder = _hold_lock_in_subprocess(workspace / "busy-ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "longcat_tuner.cli",
             "train", "--config", str(workspace / "busy-ddp.json"), "--no-progress"],
            cwd=workspace, env=env, capture_output=True, text=True, timeout=180,
        )
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert output.count(f"is in use by pid {holder.pid} on host") == 2, output  # both ranks report it
    assert not (Path(config.output_dir) / "events.jsonl").exists()


@needs_tiny
@pytest.mark.parametrize("key", ["lora_alpha", "flow_schedule_shift"])
def test_infinite_hyperparameter_fails_instead_of_completing(workspace, key):
    from longcat_tuner.train.trainer import LORA_FILE, TrainingDivergedError, train

    run_dir = workspace / f"inf-{key}"
    with pytest.raises(TrainingDivergedError, match=f"3 steps in a row.*{key}"):
        train(make_config(workspace, f"inf-{key}", max_train_steps=4, checkpoint_step_interval=None,
                          **{key: float("inf")}), progress=False)
    assert _end(run_dir)["status"] == "failed" and not (run_dir / LORA_FILE).exists()


@needs_tiny
def test_weights_poisoned_after_the_step_check_are_neither_checkpointed_nor_exported(workspace, monkeypatch):
    """Defence in depth: whatever makes the weights NaN, the save and the final export look again."""
    from longcat_tuner.train import trainer as trainer_module
    from longcat_tuner.train.trainer import LORA_FILE, TrainingDivergedError, train

    real, calls = trainer_module.agreed_weights_problem, {"n": 0}

    def agreed_weights_problem(run):
        calls["n"] += 1
        verdict = real(run)
        if calls["n"] == 2:  # the loop's check after step 2 passed; then the weights go bad
            with torch.no_grad():
                run.params[0].fill_(float("nan"))
        return verdict

    monkeypatch.setattr(trainer_module, "agreed_weights_problem", agreed_weights_problem)
    run_dir = workspace / "poisoned-late"
    with pytest.raises(TrainingDivergedError, match="refusing to write the final weights: they are non-finite"):
        train(make_config(workspace, "poisoned-late", checkpoint_step_interval=None), progress=False)
    assert any("refusing to save checkpoint for step 2" in m for m in _errors(run_dir))
    assert ckpt.list_checkpoints(run_dir / "checkpoints") == [] and not (run_dir / LORA_FILE).exists()
    assert _end(run_dir)["status"] == "failed"


def _plan_leaving_blocks_uncheckpointed(monkeypatch, chosen_by: str) -> None:
    """`train`'s plan, as on a GPU where the planner left the first 2 blocks out of checkpointing (`chosen_by`:
    "auto", the plan's choice, or "config", the user's key)."""
    import dataclasses

    from longcat_tuner.train import trainer as trainer_module

    real_plan = trainer_module.plan_memory

    def plan_memory(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        settings = dataclasses.replace(plan.settings, checkpointing="full", uncheckpointed_blocks=2)
        return dataclasses.replace(plan, settings=settings, source="auto",
                                   chosen_by={**plan.chosen_by, "uncheckpointed_blocks": chosen_by})

    monkeypatch.setattr(trainer_module, "plan_memory", plan_memory)


def _fails_while_blocks_are_uncheckpointed(monkeypatch, at_call: int) -> dict:
    """optimizer_step runs out of memory at its `at_call`-th call if blocks are left out of checkpointing then."""
    from longcat_tuner.train import trainer as trainer_module

    real_step = trainer_module.optimizer_step
    calls = {"n": 0, "failed": 0}

    def optimizer_step(run, batches):
        calls["n"] += 1
        if calls["n"] == at_call and run.applied.settings.uncheckpointed_blocks:
            calls["failed"] += 1
            next(batches)  # a step failing midway has taken its batch and drawn noise
            run.generator.seed()
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB.")
        return real_step(run, batches)

    monkeypatch.setattr(trainer_module, "optimizer_step", optimizer_step)
    return calls


@needs_tiny
def test_out_of_memory_with_blocks_the_plan_left_uncheckpointed_retries_the_step_checkpointed(workspace, monkeypatch):
    """When the plan itself chose to leave blocks out of checkpointing and a step runs out of memory, the step
    is retried, with the same batch and noise, under every block checkpointed, and the run says so."""
    from longcat_tuner.train.trainer import train

    reference = train(make_config(workspace, "oom-reference", max_train_steps=3), progress=False)
    _plan_leaving_blocks_uncheckpointed(monkeypatch, "auto")
    calls = _fails_while_blocks_are_uncheckpointed(monkeypatch, at_call=2)
    result = train(make_config(workspace, "oom-revised", max_train_steps=3), progress=False)

    assert calls["failed"] == 1 and result.status == "completed" and result.step == 3
    losses = lambda run_dir: [e["loss"] for e in read_events(run_dir) if e["event"] == "step"]  # noqa: E731
    assert losses(result.run_dir) == losses(reference.run_dir)  # step 2 retried on its own batch and noise
    plans = [e for e in read_events(result.run_dir) if e["event"] == "memory_plan"]
    assert [p["settings"]["gradient_checkpointing_uncheckpointed_blocks"] for p in plans] == [2, 0]
    assert plans[-1]["revised"] is True and "retrying it with every block checkpointed" in plans[-1]["reason"]
    warning = _end(result.run_dir)["warnings"][0]
    assert warning.startswith("step 2 ran out of GPU memory (CUDA out of memory. Tried to allocate 9.00 GiB.)")
    assert "gradient_checkpointing_uncheckpointed_blocks 0" in warning
    from longcat_tuner.runtime.checkpointing import CHECKPOINT_ATTR

    assert all(getattr(block, CHECKPOINT_ATTR, None) is not None for block in result.dit.blocks)  # all recomputed


@needs_tiny
def test_out_of_memory_inside_the_update_is_never_retried(workspace, monkeypatch):
    """A failure inside the optimizer's update may have moved some weights: the run stops instead of a retry
    that would move them twice."""
    from longcat_tuner.errors import GPUMemoryError
    from longcat_tuner.train.trainer import train

    _plan_leaving_blocks_uncheckpointed(monkeypatch, "auto")
    calls = {"n": 0}
    real = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB.")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(GPUMemoryError, match="step 2 ran out of GPU memory"):
        train(make_config(workspace, "oom-update", max_train_steps=3), progress=False)


@needs_tiny
def test_out_of_memory_with_uncheckpointed_blocks_you_set_stops_the_run(workspace, monkeypatch):
    from longcat_tuner.errors import GPUMemoryError
    from longcat_tuner.train.trainer import train

    _plan_leaving_blocks_uncheckpointed(monkeypatch, "config")
    calls = _fails_while_blocks_are_uncheckpointed(monkeypatch, at_call=2)
    with pytest.raises(GPUMemoryError, match="step 2 ran out of GPU memory"):
        train(make_config(workspace, "oom-pinned", max_train_steps=3), progress=False)
    assert calls["failed"] == 1


@needs_tiny
def test_out_of_memory_in_a_step_names_the_settings_and_the_fix(workspace, monkeypatch):
    """A training step that runs out of GPU memory ends the run `failed` with a message that names the memory
    settings in use, the keys that make room and the checkpoint to resume from, not a raw traceback."""
    from longcat_tuner.errors import GPUMemoryError
    from longcat_tuner.train import trainer as trainer_module
    from longcat_tuner.train.trainer import train

    real_step = trainer_module.optimizer_step
    calls = {"n": 0}

    def optimizer_step(run, batches):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 788.00 MiB.\nmore detail")
        return real_step(run, batches)

    monkeypatch.setattr(trainer_module, "optimizer_step", optimizer_step)
    run_dir = workspace / "oom-step"
    with pytest.raises(GPUMemoryError) as caught:
        train(make_config(workspace, "oom-step", max_train_steps=4, checkpoint_step_interval=2), progress=False)
    message = str(caught.value)
    assert message.startswith("step 3 ran out of GPU memory (CUDA out of memory. Tried to allocate 788.00 MiB.)")
    assert "gradient_checkpointing_mode full" in message and "max_gpu_memory_gib" in message
    assert "musubi_blocks_to_swap" in message and "--resume_from_checkpoint latest" in message
    assert "checkpoint-000002" in message
    assert _end(run_dir)["status"] == "failed" and _errors(run_dir)[-1] == message
