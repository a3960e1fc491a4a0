"""Multi-process training on CPU (gloo, 2 ranks) through `torchrun`, with the tiny reference checkpoint.

One instrumented 2-rank run (this file run as a torchrun script, see `worker`) records, on each rank,
the batches it drew, every step's LoRA weights, the DDP-averaged gradient and the gradient the same
micro-batch gives on the unwrapped model alone. The tests then check: the run completes and only rank 0
writes the LoRA; ranks see different batches; weights are identical on both ranks after every step; the
averaged gradient equals the mean of the two local gradients. A second 2-rank run through the CLI is
stopped by a SIGTERM to rank 1 alone, resumed, and must reproduce every step's (rank-mean) loss; a
single-process resume of a 2-rank checkpoint is refused with a clear message.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_paired_workspace

REPO = Path(__file__).resolve().parents[1]
TINY = REPO.parent / "shared" / "reference" / "longcat-tiny"
FRAMES, SIZE, STEPS, WORLD = 9, 64, 10, 2


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(cwd: Path, *args: str) -> subprocess.Popen:
    # --standalone: a rendezvous on a free local port, so parallel test runs never collide.
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *args],
        cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


# --- the instrumented worker (runs inside each torchrun rank) -------------------------------------------


def worker(config_path: str, out_dir: str) -> None:
    """Train with probes; each rank saves what it saw to `<out_dir>/rank<r>.pt`."""
    import torch.distributed as dist

    from longcat_tuner.config import TrainConfig
    from longcat_tuner.train import trainer as trainer_module
    from longcat_tuner.train.feed import TrainingData

    record: dict = {"indices": [], "weights": {}, "ddp_grads": {}, "local_grads": {}, "losses": {}, "outputs_saved": 0}
    accumulation = TrainConfig.from_file(config_path).gradient_accumulation_steps
    real_loss, real_step, real_outputs = trainer_module.training_loss, trainer_module.optimizer_step, trainer_module.save_outputs
    real_batch = TrainingData.to_flow_batch

    def to_flow_batch(self, indices, **kwargs):
        record["indices"].append(list(indices))
        return real_batch(self, indices, **kwargs)

    def training_loss(model, batch, *, generator, **kwargs):
        # The same micro-batch and noise on the unwrapped DiT, outside DDP: this rank's own gradient.
        raw = model.module
        params = [p for p in raw.parameters() if p.requires_grad]
        replay = torch.Generator().manual_seed(0)
        replay.set_state(generator.get_state())
        local = real_loss(raw, batch, generator=replay, **kwargs)
        grads = torch.autograd.grad(local / accumulation, params)  # as the trainer scales each micro-batch
        pending = record.setdefault("pending", [torch.zeros_like(g) for g in grads])
        for total, grad in zip(pending, grads):
            total += grad
        loss = real_loss(model, batch, generator=generator, **kwargs)
        record.setdefault("pending_losses", []).append(float(loss))
        return loss

    def optimizer_step(run, batches):
        result = real_step(run, batches)
        step = run.step + 1
        record["ddp_grads"][step] = [p.grad.clone() for p in run.params]
        record["local_grads"][step] = record.pop("pending")
        record["losses"][step] = sum(record.pop("pending_losses")) / accumulation  # this rank's own loss
        record["weights"][step] = {k: v.detach().clone() for k, v in trainer_module.trainable_state(run.dit).items()}
        return result

    def save_outputs(*args, **kwargs):
        record["outputs_saved"] += 1
        return real_outputs(*args, **kwargs)

    TrainingData.to_flow_batch = to_flow_batch
    trainer_module.training_loss, trainer_module.optimizer_step = training_loss, optimizer_step
    trainer_module.save_outputs = save_outputs
    result = trainer_module.train(TrainConfig.from_file(config_path), progress=False)
    record["status"] = result.status
    record["rank"] = int(os.environ["RANK"])
    # The single-process guard: train() left no process group behind.
    record["group_left"] = dist.is_initialized()
    torch.save(record, Path(out_dir) / f"rank{record['rank']}.pt")


# --- fixtures --------------------------------------------------------------------------------------------

pytestmark_skip = pytest.mark.skipif(not TINY.is_dir(), reason=f"tiny reference checkpoint not found at {TINY}")


def write_config(root: Path, name: str, **overrides) -> Path:
    config = {
        "pretrained_model_name_or_path": str(TINY), "output_dir": name, "data_backend_config": "multidatabackend.json",
        "lora_rank": 4, "learning_rate": 1e-3, "lr_warmup_steps": 2, "max_train_steps": STEPS,
        "checkpoint_step_interval": 4, "checkpoints_total_limit": 2, "validation_step_interval": None,
        "validation_resolution": f"{SIZE}x{SIZE}", "validation_num_video_frames": FRAMES,
        "validation_num_inference_steps": 1, "validation_max_samples": 1, "eval_dataset_id": "val",
        "caption_dropout_probability": 0.3, "seed": 7,
        # DDP must hold up with both: no_sync on all but the last micro-batch, and recomputed blocks.
        "gradient_accumulation_steps": 2, "gradient_checkpointing": True, **overrides,
    }
    path = root / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """4 training clips (2 batches per rank and epoch) and 1 eval clip; caches shared by all runs."""
    return write_paired_workspace(
        tmp_path_factory.mktemp("train_ddp"), train_clips=4, eval_clips=1, frames=FRAMES, size=SIZE
    )


@pytest.fixture(scope="module")
def ddp_run(workspace):
    """The instrumented 2-rank run: (run folder, [rank 0 record, rank 1 record])."""
    config = write_config(workspace, "ddp")
    probes = workspace / "probes"
    probes.mkdir()
    process = _torchrun(workspace, str(Path(__file__)), str(config), str(probes))
    try:
        output, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, output
    records = [torch.load(probes / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return workspace / "ddp", records


# --- tests -----------------------------------------------------------------------------------------------


def test_single_process_without_torchrun_env():
    from longcat_tuner.train.distributed import init_distributed, launched_by_torchrun, rank_seed

    ctx = init_distributed({})
    assert not ctx.enabled and ctx.is_main and ctx.world_size == 1 and ctx.cpu_group is None
    assert not torch.distributed.is_initialized()
    assert ctx.any(True) and not ctx.any(False) and ctx.mean(2.5) == 2.5 and ctx.gather("x") == ["x"]
    assert not launched_by_torchrun({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert rank_seed(7, 0) == 7 and len({rank_seed(7, r) for r in range(8)}) == 8


def test_unused_trainable_parameter_is_a_clear_error():
    """Under DDP a parameter without a gradient leaves its bucket un-averaged: refused before any update."""
    from types import SimpleNamespace

    from longcat_tuner.errors import ConfigError
    from longcat_tuner.train.trainer import _require_all_trainable_used

    model = torch.nn.ModuleDict({"used": torch.nn.Linear(2, 2), "unused": torch.nn.Linear(2, 2)})
    model["used"](torch.ones(1, 2)).sum().backward()
    with pytest.raises(ConfigError, match=r"2 trainable parameter\(s\) got no gradient.*unused\.weight.*lora_targets"):
        _require_all_trainable_used(SimpleNamespace(dit=model))
    model["unused"].requires_grad_(False)
    _require_all_trainable_used(SimpleNamespace(dit=model))


@pytestmark_skip
def test_two_ranks_complete_and_only_rank0_writes(ddp_run):
    from longcat_tuner.train import checkpoint as ckpt
    from longcat_tuner.train.events import read_events

    run_dir, records = ddp_run
    assert [r["status"] for r in records] == ["completed", "completed"]
    assert [r["outputs_saved"] for r in records] == [1, 0]  # the final LoRA is written once, by rank 0
    assert not any(r["group_left"] for r in records)
    assert (run_dir / "longcat_lora.safetensors").is_file() and (run_dir / "longcat_lora_comfyui.safetensors").is_file()
    events = read_events(run_dir)
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == 1 and kinds.count("end") == 1 and kinds.count("step") == STEPS
    assert events[0]["world_size"] == WORLD and events[-1]["status"] == "completed"
    assert kinds.count("validation") == 1 and kinds.count("checkpoint") == 3  # steps 4, 8, 10
    state = ckpt.load_checkpoint(run_dir / "checkpoints" / ckpt.checkpoint_name(STEPS))
    assert state["state"]["world_size"] == WORLD and len(state["rng"]["ranks"]) == WORLD
    # Each rank's noise stream is its own (the saved generator states differ).
    assert not torch.equal(state["rng"]["ranks"][0]["generators"]["train"], state["rng"]["ranks"][1]["generators"]["train"])


@pytestmark_skip
def test_ranks_take_disjoint_batches_and_stay_identical(ddp_run):
    _, (rank0, rank1) = ddp_run
    assert len(rank0["indices"]) == len(rank1["indices"]) == 2 * STEPS  # 2 micro-batches per step
    for mine, theirs in zip(rank0["indices"], rank1["indices"]):
        assert not set(mine) & set(theirs)  # each rank gets its own share of the epoch
    for step in range(1, STEPS + 1):
        first, second = rank0["weights"][step], rank1["weights"][step]
        assert first.keys() == second.keys() and any("lora" in k for k in first)
        for name in first:
            assert torch.equal(first[name], second[name]), (step, name)
    assert any(not torch.equal(rank0["weights"][1][k], rank0["weights"][STEPS][k]) for k in rank0["weights"][1])


@pytestmark_skip
def test_gradient_and_reported_loss_are_the_means_over_ranks(ddp_run):
    from longcat_tuner.train.events import read_events

    run_dir, (rank0, rank1) = ddp_run
    reported = {e["step"]: e["loss"] for e in read_events(run_dir) if e["event"] == "step"}
    for step in range(1, STEPS + 1):
        assert rank0["losses"][step] != rank1["losses"][step]
        assert reported[step] == pytest.approx((rank0["losses"][step] + rank1["losses"][step]) / 2, rel=1e-9)
    for step in range(1, STEPS + 1):
        local0, local1 = rank0["local_grads"][step], rank1["local_grads"][step]
        assert any(not torch.allclose(a, b) for a, b in zip(local0, local1))  # the ranks' batches differ
        for ddp0, ddp1, a, b in zip(rank0["ddp_grads"][step], rank1["ddp_grads"][step], local0, local1):
            assert torch.equal(ddp0, ddp1)
            torch.testing.assert_close(ddp0, (a + b) / 2, rtol=1e-5, atol=1e-8)


def _worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the torchrun worker with RANK=`rank` (a child of the launcher)."""
    deadline = time.time() + 30
    while time.time() < deadline:
        for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(child)
        time.sleep(0.05)
    raise AssertionError(f"no torchrun worker with RANK={rank}")


@pytestmark_skip
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finding a torchrun worker's pid needs Linux /proc")
def test_sigterm_to_one_rank_then_resume_reproduces_every_loss(workspace, ddp_run):
    from longcat_tuner.train.events import read_events

    reference = {e["step"]: e["loss"] for e in read_events(ddp_run[0]) if e["event"] == "step"}
    config = write_config(workspace, "ddp-interrupted")
    run_dir = workspace / "ddp-interrupted"
    cli = ("-m", "longcat_tuner.cli", "train", "--config", str(config), "--no-progress")

    # 1. SIGTERM reaches rank 1 only: both ranks stop after the same step, rank 0 saves, nobody hangs.
    process = _torchrun(workspace, *cli)
    rank1 = _worker_pid(process, 1)
    deadline = time.time() + 120
    while not any(e["event"] == "step" for e in read_events(run_dir)):
        assert process.poll() is None and time.time() < deadline, process.communicate()[0] if process.poll() is not None else "timeout"
        time.sleep(0.01)
    os.kill(rank1, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    end = read_events(run_dir)[-1]
    assert end["event"] == "end" and end["status"] == "interrupted" and end["signal"] == "SIGTERM", output
    stopped_at = end["step"]
    assert stopped_at < STEPS and (run_dir / "checkpoints" / f"checkpoint-{stopped_at:06d}" / "COMPLETE").is_file()

    # 2. Resume on 2 ranks to the end: every step's mean loss equals the uninterrupted run's.
    process = _torchrun(workspace, *cli, "--resume_from_checkpoint", "latest")
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output
    events = read_events(run_dir)
    assert [e["start_step"] for e in events if e["event"] == "start"] == [0, stopped_at]
    steps = [e for e in events if e["event"] == "step"]
    assert sorted(e["step"] for e in steps) == list(range(1, STEPS + 1))
    for event in steps:
        assert event["loss"] == pytest.approx(reference[event["step"]], rel=1e-6, abs=1e-7), event["step"]
    assert events[-1]["status"] == "completed"


@pytestmark_skip
def test_resume_with_another_world_size_is_refused(workspace, ddp_run):
    from longcat_tuner.config import TrainConfig
    from longcat_tuner.errors import CheckpointError
    from longcat_tuner.train.trainer import train

    copy = workspace / "ddp-single"
    shutil.copytree(ddp_run[0] / "checkpoints", copy / "checkpoints")
    config = TrainConfig.from_file(write_config(workspace, "ddp-single", resume_from_checkpoint="latest"))
    with pytest.raises(CheckpointError, match=r"saved by a run with 2 process\(es\) but this run has 1.*--nproc_per_node=2"):
        train(config, progress=False)


if __name__ == "__main__":  # a torchrun rank of `ddp_run`
    worker(sys.argv[1], sys.argv[2])
