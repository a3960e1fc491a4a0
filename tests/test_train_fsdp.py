"""FSDP2 under torchrun (`distributed_strategy: fsdp`), 2 CPU ranks over gloo, on the tiny checkpoint.

The sharded run must train exactly what the DDP run trains (same batches, noise and averaged gradients),
write the same outputs, resume exactly, and refuse a checkpoint of the other strategy.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from longcat_tuner.train.events import read_events
from test_train_distributed import STEPS, TINY, _torchrun, ddp_run, workspace, write_config  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not TINY.is_dir(), reason=f"tiny reference checkpoint not found at {TINY}")


def _train(workspace, name: str, *extra: str, **overrides):
    config = write_config(workspace, name, distributed_strategy="fsdp", **overrides)
    process = _torchrun(workspace, "-m", "longcat_tuner.cli", "train", "--config", str(config), "--no-progress", *extra)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    return workspace / name


def _losses(run_dir) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(run_dir) if e["event"] == "step"}


def test_fsdp_lora_trains_what_ddp_trains(workspace, ddp_run):
    ddp_dir, _ = ddp_run
    run_dir = _train(workspace, "fsdp-lora")
    want, got = _losses(ddp_dir), _losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:  # reduce-scatter vs all-reduce: the same sums up to float rounding
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-6), step
    ours, theirs = load_file(run_dir / "longcat_lora.safetensors"), load_file(ddp_dir / "longcat_lora.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-4, rtol=1e-3)
    events = read_events(run_dir)
    assert [e["event"] for e in events].count("validation") == 1  # every rank sampled, rank 0 reported
    checkpoint = run_dir / "checkpoints" / f"checkpoint-{STEPS:06d}"
    assert (checkpoint / "longcat_lora.safetensors").is_file()
    # It really ran sharded: the checkpoint says so, and holds every rank's shards (torch.distributed.checkpoint)
    # of each trainable weight and its AdamW moments, with no gathered weights or optimizer file.
    assert json.loads((checkpoint / "trainer_state.json").read_text())["distributed_strategy"] == "fsdp"
    assert not (checkpoint / "trainable.safetensors").exists() and not (checkpoint / "optimizer.pt").exists()
    from torch.distributed.checkpoint import FileSystemReader

    saved = set(FileSystemReader(str(checkpoint / "sharded")).read_metadata().state_dict_metadata)
    names = {k.removeprefix("model.") for k in saved if k.startswith("model.")}
    assert names and all("lora_adapters" in n for n in names)  # the adapters (and their scale buffers) only
    params = {n for n in names if n.endswith((".down", ".up"))}
    assert params and all(f"optimizer.state.{n}.exp_avg" in saved for n in params)
    assert len(list((checkpoint / "sharded").glob("*.distcp"))) == 2


def test_fsdp_full_finetune_resumes_exactly(workspace):
    full = {"model_type": "full", "learning_rate": 1e-5, "checkpoint_step_interval": 2, "gradient_accumulation_steps": 1}
    reference = _train(workspace, "fsdp-full", max_train_steps=4, **full)
    first = _train(workspace, "fsdp-full-resumed", max_train_steps=2, **full)
    resumed = _train(workspace, "fsdp-full-resumed", "--resume_from_checkpoint", "latest", max_train_steps=4, **full)
    assert resumed == first
    want, got = _losses(reference), _losses(resumed)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-7), step
    weights = load_file(resumed / "dit" / "diffusion_pytorch_model.safetensors")
    baseline = load_file(reference / "dit" / "diffusion_pytorch_model.safetensors")
    assert weights.keys() == baseline.keys() and len(weights) > 10
    for key in weights:
        torch.testing.assert_close(weights[key], baseline[key], atol=1e-5, rtol=1e-4)

    # The 2-rank sharded checkpoint of step 2 resumes in one process (resharded; the data order goes on).
    import shutil
    import subprocess
    import sys

    from test_train_distributed import _env

    shutil.copytree(first / "checkpoints" / "checkpoint-000002", workspace / "fsdp-full-one" / "checkpoints" / "checkpoint-000002")
    config = write_config(workspace, "fsdp-full-one", distributed_strategy="fsdp", max_train_steps=4, **full)
    done = subprocess.run([sys.executable, "-m", "longcat_tuner.cli", "train", "--config", str(config), "--no-progress",
                           "--resume_from_checkpoint", "latest"], cwd=workspace, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "saved by 2 process(es), now 1" in done.stdout
    one = _losses(workspace / "fsdp-full-one")
    assert sorted(one) == [3, 4] and all(v is not None for v in one.values())
    assert (workspace / "fsdp-full-one" / "dit" / "diffusion_pytorch_model.safetensors").is_file()


def test_resume_with_the_other_strategy_is_refused(workspace, ddp_run):
    import shutil

    from longcat_tuner.config import TrainConfig
    from longcat_tuner.errors import CheckpointError
    from longcat_tuner.train.distributed import check_resume_strategy

    with pytest.raises(CheckpointError, match="saved with distributed_strategy 'ddp' but this run uses 'fsdp'"):
        check_resume_strategy("ddp", "fsdp", "checkpoint-000004")
    # End to end: the DDP run's checkpoint under fsdp stops before training, naming both strategies.
    copy = workspace / "fsdp-from-ddp"
    shutil.copytree(ddp_run[0] / "checkpoints", copy / "checkpoints")
    config = write_config(workspace, "fsdp-from-ddp", distributed_strategy="fsdp", resume_from_checkpoint="latest")
    process = _torchrun(workspace, "-m", "longcat_tuner.cli", "train", "--config", str(config), "--no-progress")
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0 and "saved with distributed_strategy 'ddp'" in output
    assert TrainConfig.from_file(config).distributed_strategy == "fsdp"


def test_fsdp_refuses_block_swap_and_8bit_weights():
    from longcat_tuner.config import TrainConfig
    from longcat_tuner.errors import ConfigError

    base = {"pretrained_model_name_or_path": "m", "output_dir": "o", "data_backend_config": "d",
            "distributed_strategy": "fsdp"}
    for extra in ({"musubi_blocks_to_swap": 4}, {"base_model_precision": "fp8-torchao"}):
        with pytest.raises(ConfigError, match="does not combine with"):
            TrainConfig.from_dict({**base, **extra})
