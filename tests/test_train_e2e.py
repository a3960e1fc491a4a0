"""End-to-end training on the tiny reference checkpoint with tiny synthetic clips.

One in-process reference run (6 steps, checkpoint at 4) is shared by several tests; the interruption
test runs the CLI in subprocesses (SIGTERM, resume, SIGKILL after the step-4 checkpoint, resume) and
checks that every step's loss equals the uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longcat_tuner.train.events import read_events
from conftest import write_paired_workspace

REPO = Path(__file__).resolve().parents[1]
TINY = REPO.parent / "shared" / "reference" / "longcat-tiny"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not TINY.is_dir(), reason=f"tiny reference checkpoint not found at {TINY}"),
]
FRAMES, SIZE = 9, 64


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Synthetic paired clips (2 train, 1 eval) and their multidatabackend.json; caches are shared by all runs."""
    return write_paired_workspace(
        tmp_path_factory.mktemp("train_e2e"), train_clips=2, eval_clips=1, frames=FRAMES, size=SIZE
    )


def write_config(workspace: Path, name: str, **overrides) -> Path:
    config = {
        "pretrained_model_name_or_path": str(TINY),
        "output_dir": name,
        "data_backend_config": "multidatabackend.json",
        "lora_rank": 4,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 2,
        "max_train_steps": 6,
        "checkpoint_step_interval": 4,
        "checkpoints_total_limit": 2,
        "validation_step_interval": None,
        "validation_resolution": f"{SIZE}x{SIZE}",
        "validation_num_video_frames": FRAMES,
        "validation_num_inference_steps": 2,
        "validation_max_samples": 1,
        "eval_dataset_id": "val",
        "caption_dropout_probability": 0.3,
        "seed": 7,
        **overrides,
    }
    path = workspace / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def reference_run(workspace):
    from longcat_tuner.config import TrainConfig
    from longcat_tuner.train.trainer import train

    config = TrainConfig.from_file(write_config(workspace, "reference"))
    return train(config, progress=False)


def test_six_steps_with_checkpoint_validation_and_outputs(reference_run):
    from longcat_tuner.train import checkpoint as ckpt

    run_dir = reference_run.run_dir
    assert reference_run.status == "completed" and reference_run.step == 6
    assert sorted(reference_run.losses) == [1, 2, 3, 4, 5, 6]
    assert all(0 < loss < 100 for loss in reference_run.losses.values())
    assert [s for s, _ in ckpt.list_checkpoints(run_dir / "checkpoints")] == [4, 6]
    state = ckpt.load_checkpoint(run_dir / "checkpoints" / "checkpoint-000004")
    assert state["state"]["step"] == 4 and "sampler" in state["state"]
    assert (run_dir / "checkpoints" / "checkpoint-000004" / "longcat_lora.safetensors").is_file()

    events = read_events(run_dir)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and events[-1]["status"] == "completed"
    assert {"step", "checkpoint", "validation"} <= set(kinds)
    step = next(e for e in events if e["event"] == "step")
    assert {"step", "total_steps", "loss", "lr", "s_per_step", "eta_s", "peak_mem_gib", "time"} <= set(step)
    validation = next(e for e in events if e["event"] == "validation")
    assert validation["step"] == 6 and validation["heldout_loss"] > 0
    (item,) = validation["items"]
    assert (run_dir / item["video"]).stat().st_size > 0 and (run_dir / item["contact_sheet"]).stat().st_size > 0
    assert item["psnr_first_frame"] > 5  # decoded frame 0 resembles the start frame (the condition is held)

    import av

    with av.open(str(run_dir / item["video"])) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 15 and sum(1 for _ in container.decode(stream)) == FRAMES
    assert (run_dir / "longcat_lora.safetensors").is_file() and (run_dir / "longcat_lora_comfyui.safetensors").is_file()


def test_saved_lora_reproduces_the_trained_model(reference_run):
    from longcat_tuner.model import load_dit
    from longcat_tuner.model.lora import load_lora

    trained = reference_run.dit.eval()
    weight = trained.x_embedder.proj.weight  # the base's dtype and device (bf16 on CUDA, fp32 on CPU)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 3, 8, 8, generator=gen).to(weight.device)
    timestep = torch.tensor([[0.0, 700.0, 700.0]], device=weight.device)
    embeds = torch.randn(1, 512, 64, generator=gen).to(weight.device)
    mask = torch.ones(1, 512, dtype=torch.long, device=weight.device)
    with torch.no_grad():
        expected = trained(latents, timestep, embeds, mask, num_cond_latents=1)
        base = load_dit(TINY, dtype=weight.dtype, device=weight.device)
        untouched = base(latents, timestep, embeds, mask, num_cond_latents=1)
    assert (expected - untouched).abs().max() > 1e-4  # training changed the model
    for name in ("longcat_lora.safetensors", "longcat_lora_comfyui.safetensors"):
        dit = load_dit(TINY, dtype=weight.dtype, device=weight.device)
        load_lora(dit, reference_run.run_dir / name, dtype=torch.float32)  # adapters in fp32, as trained
        with torch.no_grad():
            got = dit(latents, timestep, embeds, mask, num_cond_latents=1)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _cli(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [sys.executable, "-m", "longcat_tuner.cli", "train", "--config", str(config), "--no-progress", *extra],
        cwd=config.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait_for(run_dir: Path, process: subprocess.Popen, predicate, timeout: float = 120.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for event in read_events(run_dir):
            if predicate(event):
                return event
        if process.poll() is not None:
            raise AssertionError(f"trainer exited early ({process.returncode}):\n{process.stdout.read()}")
        time.sleep(0.01)
    process.kill()
    raise AssertionError("timed out waiting for an event")


def test_sigterm_and_sigkill_then_resume_reproduce_every_loss(workspace, reference_run):
    config = write_config(workspace, "interrupted")
    run_dir = workspace / "interrupted"

    # 1. SIGTERM after the first step: a checkpoint at the next step boundary and a clean exit.
    process = _cli(config)
    _wait_for(run_dir, process, lambda e: e["event"] == "step" and e["step"] >= 1)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    end = read_events(run_dir)[-1]
    assert end["event"] == "end" and end["status"] == "interrupted" and end["signal"] == "SIGTERM"
    stopped_at = end["step"]
    assert stopped_at < 6 and (run_dir / "checkpoints" / f"checkpoint-{stopped_at:06d}" / "COMPLETE").is_file()

    # 2. Resume, then SIGKILL as soon as the step-4 checkpoint exists (no chance to clean up).
    process = _cli(config, "--resume_from_checkpoint", "latest")
    _wait_for(run_dir, process, lambda e: e["event"] == "checkpoint" and e["step"] == 4)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL

    # 3. Resume again to the end.
    process = _cli(config, "--resume_from_checkpoint", "latest")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    events = read_events(run_dir)
    starts = [e for e in events if e["event"] == "start"]
    assert [s["start_step"] for s in starts] == [0, stopped_at, 4]
    assert events[-1]["event"] == "end" and events[-1]["status"] == "completed"
    steps = [e for e in events if e["event"] == "step"]
    assert {e["step"] for e in steps} == set(range(1, 7))
    for event in steps:  # steps replayed after the kill must match too
        assert event["loss"] == pytest.approx(reference_run.losses[event["step"]], rel=1e-6, abs=1e-7), event["step"]


def test_tiny_overfit_drives_the_loss_down(workspace):
    """A full fine-tune on the two training clips; the held-out loss is measured on those same clips."""
    from longcat_tuner.commands.demo import dataset_entries
    from longcat_tuner.config import TrainConfig
    from longcat_tuner.data.cache import read_manifest
    from longcat_tuner.data.dataset import CachedVideoDataset, collate_samples
    from longcat_tuner.model import load_dit
    from longcat_tuner.train.step import FlowBatch, heldout_loss
    from longcat_tuner.train.trainer import train

    import shutil

    datasets = json.loads((workspace / "multidatabackend.json").read_text())
    # Copies of the training clips: an eval split may not share the training folder (the check refuses it).
    clips, frames = (shutil.copytree(datasets[i]["instance_data_dir"], workspace / "same" / name)
                     for i, name in ((0, "clips"), (1, "frames")))
    same = dataset_entries("same", Path(clips), Path(frames), workspace / "cache", frames=FRAMES, resolution=f"{SIZE}x{SIZE}")
    (workspace / "overfit-data.json").write_text(json.dumps(datasets[:2] + same))
    config = TrainConfig.from_file(write_config(
        workspace, "overfit", model_type="full", max_train_steps=40, learning_rate=1e-3, caption_dropout_probability=0.0,
        checkpoint_step_interval=None, lr_warmup_steps=0, lr_scheduler="constant", data_backend_config="overfit-data.json",
        eval_dataset_id="same", validation_max_samples=2, validation_num_inference_steps=1,
    ))
    result = train(config, progress=False)
    final = [e for e in read_events(result.run_dir) if e["event"] == "validation"][-1]["heldout_loss"]
    samples, empty = read_manifest(workspace / "cache" / "vae" / "same" / "manifest.json")
    dataset, base = CachedVideoDataset(samples, empty), load_dit(TINY)
    before = []
    for index in range(len(dataset)):
        item = collate_samples([dataset[index]])
        batch = FlowBatch(latents=item["latents_mean"].float(), text_embeds=item["text_embeds"].float(),
                          text_mask=item["text_mask"], cond_latents=item["cond_mean"].float())
        before.append(heldout_loss(base, batch, config.validation_loss_sigmas, seed=config.validation_seed))
    before = sum(before) / len(before)
    assert final < 0.4 * before, (before, final)
    assert (result.run_dir / "dit" / "diffusion_pytorch_model.safetensors").is_file()
    reloaded = load_dit(result.run_dir)  # a full fine-tune is saved in the official layout
    torch.testing.assert_close(reloaded.state_dict()["final_layer.linear.weight"],
                               result.dit.state_dict()["final_layer.linear.weight"].cpu())


def _poison_losses(monkeypatch, bad_calls: set[int]):
    """Make `training_loss` return NaN on the given call numbers (1-based)."""
    from longcat_tuner.train import trainer as trainer_module

    real, calls = trainer_module.training_loss, {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] in bad_calls else value

    monkeypatch.setattr(trainer_module, "training_loss", loss)


def test_non_finite_step_is_skipped(workspace, monkeypatch, reference_run):
    from longcat_tuner.config import TrainConfig
    from longcat_tuner.train.trainer import train

    _poison_losses(monkeypatch, {2})
    config = TrainConfig.from_file(write_config(workspace, "one-nan", max_train_steps=3, checkpoint_step_interval=None,
                                                validation_max_samples=1, validation_num_inference_steps=1))
    result = train(config, progress=False)
    assert result.status == "completed" and result.losses[1] == reference_run.losses[1]
    steps = [e for e in read_events(result.run_dir) if e["event"] == "step"]
    assert [e["skipped"] for e in steps] == [False, True, False] and steps[1]["loss"] is None
    errors = [e for e in read_events(result.run_dir) if e["event"] == "error"]
    assert len(errors) == 1 and "non-finite" in errors[0]["message"]


def test_three_non_finite_steps_stop_the_run(workspace, monkeypatch):
    from longcat_tuner.config import TrainConfig
    from longcat_tuner.train.trainer import TrainingDivergedError, train

    _poison_losses(monkeypatch, {2, 3, 4})
    config = TrainConfig.from_file(write_config(workspace, "nans", checkpoint_step_interval=1))
    with pytest.raises(TrainingDivergedError, match="3 steps in a row.*lower learning_rate"):
        train(config, progress=False)
    events = read_events(workspace / "nans")
    assert events[-1]["event"] == "end" and events[-1]["status"] == "failed"
    # Skipped steps leave the weights as step 1 made them: finite, unchanged from one checkpoint to the next.
    from longcat_tuner.train import checkpoint as ckpt

    found = ckpt.list_checkpoints(workspace / "nans" / "checkpoints")
    assert [s for s, _ in found] == [2, 3]  # checkpoints_total_limit 2
    weights = [ckpt.load_checkpoint(path)["weights"] for _, path in found]
    assert all(torch.isfinite(t).all() for t in weights[0].values())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_tensorboard_request_without_the_package_is_a_clear_error(tmp_path):
    from longcat_tuner.errors import ConfigError
    from longcat_tuner.train.events import EventLog

    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            EventLog(tmp_path, tensorboard_dir=tmp_path / "tb")
    else:
        log = EventLog(tmp_path, tensorboard_dir=tmp_path / "tb")
        log.emit("step", step=1, loss=0.5, lr=1e-4)
        log.close()
        assert any((tmp_path / "tb").iterdir())


def test_text_to_video_and_continuation_clips_train_through_the_same_loop(workspace, monkeypatch):
    """Clips without start frames: T2V (no condition), then video continuation (first latent clean)."""
    from longcat_tuner.config import TrainConfig
    from longcat_tuner.train import trainer as trainer_module
    from longcat_tuner.train.trainer import train

    datasets = json.loads((workspace / "multidatabackend.json").read_text())
    plain = {**datasets[0], "id": "plain", "is_i2v": False, "conditioning_data": [],
             "cache_dir_vae": str(workspace / "cache" / "vae" / "plain")}
    (workspace / "plain-data.json").write_text(json.dumps([plain, *datasets[2:]]))
    seen = []
    real = trainer_module.training_loss

    def spy(dit, batch, **kwargs):
        seen.append((batch.cond_latents is None, kwargs["continuation_latents"]))
        return real(dit, batch, **kwargs)

    monkeypatch.setattr(trainer_module, "training_loss", spy)
    for latents in (0, 1):
        config = TrainConfig.from_file(write_config(
            workspace, f"plain-{latents}", data_backend_config="plain-data.json", max_train_steps=2,
            checkpoint_step_interval=None, video_continuation_latents=latents, validation_num_inference_steps=1,
        ))
        result = train(config, progress=False)
        assert result.status == "completed" and all(0 < v < 100 for v in result.losses.values())
    assert seen == [(True, 0), (True, 0), (True, 1), (True, 1)]
