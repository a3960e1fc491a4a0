"""Progress during validation and sampling, Ctrl-C during validation, and the early-frame drift metric.

Training runs are a few steps of the tiny reference checkpoint on the CPU (one cached workspace). A real
SIGINT is sent to this process from inside validation, right after its first denoising step: the run must
stop there (no later denoising step, no decode), keep its checkpoint (and, at the end, its LoRA) and return.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ASSETS, TINY, write_paired_workspace
from longcat_tuner.train import checkpoint as ckpt
from longcat_tuner.train.events import read_events

FRAMES, SIZE = 9, 64
needs_tiny = pytest.mark.skipif(not TINY.is_dir(), reason=f"tiny reference checkpoint not found at {TINY}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return write_paired_workspace(tmp_path_factory.mktemp("progress"), train_clips=2, eval_clips=1, frames=FRAMES, size=SIZE)


def make_config(workspace: Path, name: str, **overrides):
    from longcat_tuner.config import TrainConfig

    config = {
        "pretrained_model_name_or_path": str(TINY), "output_dir": name, "data_backend_config": "multidatabackend.json",
        "lora_rank": 4, "learning_rate": 1e-3, "max_train_steps": 2, "checkpoint_step_interval": None,
        "validation_step_interval": None, "validation_resolution": f"{SIZE}x{SIZE}",
        "validation_num_video_frames": FRAMES, "validation_num_inference_steps": 3, "validation_max_samples": 1,
        "eval_dataset_id": "val", "seed": 7, **overrides,
    }
    path = workspace / f"{name}.json"
    path.write_text(json.dumps(config))
    return TrainConfig.from_file(path)


def _progress(run_dir: Path) -> list[tuple[int, str, int, int]]:
    return [(e["step"], e["phase"], e["denoise_step"], e["of"])
            for e in read_events(run_dir) if e["event"] == "validation_progress"]


def _interrupt_after_first_denoising_step(monkeypatch) -> list[int]:
    """SIGINT to this process from the first denoising step's progress report; returns the DiT calls
    counted from then on (a stop within one denoising step makes none)."""
    from longcat_tuner.train import trainer as trainer_module

    real, calls_after = trainer_module.validation_progress, []

    def validation_progress(run, index, count):
        progress = real(run, index, count)
        report = progress.report

        def interrupting(phase, step, of):
            report(phase, step, of)
            if phase == "denoising" and step == 1 and not calls_after:
                calls_after.append(0)
                forward = run.dit.forward

                def counting(*args, **kwargs):
                    calls_after[0] += 1
                    return forward(*args, **kwargs)

                run.dit.forward = counting
                os.kill(os.getpid(), signal.SIGINT)

        progress.report = interrupting
        return progress

    monkeypatch.setattr(trainer_module, "validation_progress", validation_progress)
    return calls_after


@needs_tiny
def test_validation_reports_each_denoising_step_and_the_decode(workspace):
    from longcat_tuner.train.trainer import train

    result = train(make_config(workspace, "progress", max_train_steps=2, validation_step_interval=1), progress=False)
    assert result.status == "completed"
    expected = []
    for step in (1, 2):  # a validation after step 1 and the final one
        expected += [(step, "denoising", k, 3) for k in (1, 2, 3)] + [(step, "decoding", 3, 3), (step, "done", 3, 3)]
    assert _progress(result.run_dir) == expected
    events = read_events(result.run_dir)
    kinds = [e["event"] for e in events]
    # Progress comes before its validation event, and names the video.
    assert kinds.index("validation_progress") < kinds.index("validation")
    first = next(e for e in events if e["event"] == "validation_progress")
    assert first["video"] == 1 and first["videos"] == 1
    (item,) = next(e for e in events if e["event"] == "validation")["items"]
    assert item["early_frames"] == 4 and item["early_frame_drift_psnr"] > 0


@needs_tiny
def test_sigint_during_final_validation_stops_it_and_keeps_the_outputs(workspace, monkeypatch):
    from longcat_tuner.train.trainer import LORA_FILE, train

    calls_after = _interrupt_after_first_denoising_step(monkeypatch)
    handler = signal.getsignal(signal.SIGINT)
    result = train(make_config(workspace, "sigint-final", validation_num_inference_steps=5), progress=False)
    run_dir = result.run_dir
    assert calls_after == [0]  # no denoising step after the signal, and no decode
    assert _progress(run_dir) == [(2, "denoising", 1, 5)]
    assert result.status == "completed" and result.step == 2
    assert (run_dir / LORA_FILE).is_file() and result.lora_path == run_dir / LORA_FILE
    assert [s for s, _ in ckpt.list_checkpoints(run_dir / "checkpoints")] == [2]
    (warning,) = result.warnings
    assert "final validation at step 2 stopped (SIGINT)" in warning and "are saved" in warning
    events = read_events(run_dir)
    validation = next(e for e in events if e["event"] == "validation")
    assert validation["items"] == [] and "stopped after denoising step 1/5" in validation["stopped"]
    end = events[-1]
    assert end["event"] == "end" and end["status"] == "completed" and end["signal"] == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is given back


@needs_tiny
def test_sigint_during_a_mid_run_validation_saves_a_checkpoint_and_exits(workspace, monkeypatch):
    from longcat_tuner.train.trainer import LORA_FILE, train

    calls_after = _interrupt_after_first_denoising_step(monkeypatch)
    result = train(make_config(workspace, "sigint-mid", max_train_steps=4, validation_step_interval=2,
                               validation_num_inference_steps=5), progress=False)
    run_dir = result.run_dir
    assert calls_after == [0]
    assert result.status == "interrupted" and result.step == 2 and sorted(result.losses) == [1, 2]
    assert [s for s, _ in ckpt.list_checkpoints(run_dir / "checkpoints")] == [2]
    assert not (run_dir / LORA_FILE).exists()  # the run is not finished: resume it from the checkpoint
    end = read_events(run_dir)[-1]
    assert end["status"] == "interrupted" and end["step"] == 2 and end["signal"] == "SIGINT"


def test_a_second_signal_waits_for_the_file_being_written():
    from longcat_tuner.train.trainer import StopRequest

    with StopRequest() as stop:
        stop._handle(signal.SIGINT, None)
        assert stop.requested and stop.signal_name == "SIGINT"
        written = []
        with pytest.raises(KeyboardInterrupt):
            with stop.shielded():
                stop._handle(signal.SIGINT, None)  # a second Ctrl-C mid-write: the write finishes first
                written.append("checkpoint")
        assert written == ["checkpoint"]
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)  # outside a write: at once


# --- sampling progress ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models():
    """The tiny DiT, VAE, [prompt, ""] embeddings and a 64x64 start frame, loaded once (tests may add LoRAs
    to a copy of the DiT only)."""
    from longcat_tuner import TextEncoder, VideoVAE, load_dit
    from longcat_tuner.data.images import prepare_start_frame, read_image
    from longcat_tuner.media import image_to_tensor

    dit, vae = load_dit(TINY), VideoVAE.from_pretrained(TINY)
    embeds, mask = TextEncoder.from_pretrained(TINY).encode(["a girl turns her head", ""])
    start = image_to_tensor(prepare_start_frame(read_image(ASSETS / "girl.png"), 64, 64))
    return dit, vae, embeds, mask, start


@needs_tiny
def test_generate_reports_steps_then_decoding_and_can_be_stopped(tiny_models):
    from longcat_tuner.generate import SamplingProgress, SamplingStopped, generate

    dit, vae, embeds, mask, start = tiny_models
    seen = []
    decoded = []
    real_decode = vae.decode

    class Recording:  # the VAE, noting which phase was reported when its decode ran
        device = vae.device
        encode = vae.encode

        def decode(self, latents):
            decoded.append(seen[-1])
            return real_decode(latents)

    vae = Recording()
    kwargs = dict(text_embeds=embeds[:1], text_mask=mask[:1], negative_embeds=embeds[1:], negative_mask=mask[1:],
                  height=64, width=64, frames=FRAMES, start_frame=start, steps=3, seed=1)
    generate(dit, vae, progress=SamplingProgress(bar=False, report=lambda *event: seen.append(event)), **kwargs)
    assert seen == [("denoising", 1, 3), ("denoising", 2, 3), ("denoising", 3, 3), ("decoding", 3, 3), ("done", 3, 3)]
    assert decoded == [("decoding", 3, 3)]  # the decoding phase is reported before the decode runs

    seen.clear()
    stop = SamplingProgress(bar=False, report=lambda *event: seen.append(event), should_stop=lambda: len(seen) >= 2)
    with pytest.raises(SamplingStopped, match="after denoising step 2/3"):
        generate(dit, vae, progress=stop, **kwargs)
    assert seen == [("denoising", 1, 3), ("denoising", 2, 3)] and len(decoded) == 1


@needs_tiny
def test_sample_progress_json_reports_the_decoding_phase(tmp_path):
    out = tmp_path / "p.mp4"
    done = subprocess.run(
        [sys.executable, "-m", "longcat_tuner.cli", "sample", "--model", str(TINY), "--image", str(ASSETS / "girl.png"),
         "--prompt", "a girl", "--frames", "5", "--steps", "2", "--resolution", "64x64", "--output", str(out),
         "--progress-json"], capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(m["event"], m.get("phase"), m.get("step")) for m in lines] == [
        ("sample_step", "denoising", 1), ("sample_step", "denoising", 2), ("sample_step", "decoding", 2),
        ("sample_step", "done", 2), ("sample_done", None, None)]


# --- the early-frame drift metric ---------------------------------------------------------------------------
def test_early_frame_psnr_ignores_frame_zero_and_follows_the_early_frames():
    from longcat_tuner.media import psnr
    from longcat_tuner.train.validate import early_frame_psnr

    generator = torch.Generator().manual_seed(0)
    start = torch.rand(3, 16, 16, generator=generator) * 2 - 1
    video = start[:, None].repeat(1, 9, 1, 1) + 0.1 * torch.randn(3, 9, 16, 16, generator=generator)
    base = early_frame_psnr(video, start)
    assert base == pytest.approx(psnr(video[:, 1:5], start[:, None].expand(3, 4, 16, 16)))
    other_first = video.clone()
    other_first[:, 0] = -start  # frame 0 is the condition's VAE round trip: not part of the metric
    assert early_frame_psnr(other_first, start) == base
    drifted = video.clone()
    drifted[:, 2] += 0.5  # an early generated frame moves away from the start frame
    assert early_frame_psnr(drifted, start) < base - 1
    later = video.clone()
    later[:, 8] += 0.5  # past the early frames
    assert early_frame_psnr(later, start) == base
    assert early_frame_psnr(video[:, :1], start) is None


@needs_tiny
def test_early_frame_drift_moves_with_a_lora_where_the_first_frame_psnr_does_not(tmp_path, tiny_models):
    """Validation of the same item with and without a LoRA that changes the model: frame 0 (held condition)
    is the same, the early generated frames are not; only the drift metric sees it."""
    import copy

    from longcat_tuner.model.lora import inject_lora
    from longcat_tuner.train.validate import ValidationItem, run_validation

    dit, vae, embeds, mask, start = tiny_models
    dit = copy.deepcopy(dit)
    item = ValidationItem(name="girl", prompt="a girl", text_embeds=embeds[:1], text_mask=mask[:1], start_frame=start)

    def validate(folder):
        (result,) = run_validation(dit, vae, [item], step=0, run_dir=tmp_path / folder, num_frames=FRAMES, steps=3,
                                   guidance=4.0, shift=12.0, negative_embeds=embeds[1:], negative_mask=mask[1:],
                                   seed=3, device=torch.device("cpu"))
        return result

    base = validate("base")
    inject_lora(dit, rank=4)
    with torch.no_grad():
        for name, param in dit.named_parameters():
            if "lora" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.5)
    tuned = validate("lora")
    assert tuned["psnr_first_frame"] == pytest.approx(base["psnr_first_frame"], abs=1e-4)
    assert abs(tuned["early_frame_drift_psnr"] - base["early_frame_drift_psnr"]) > 0.05
