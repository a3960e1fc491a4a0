"""`longcat-tuner sample` end to end on the tiny official-layout checkpoint."""
from __future__ import annotations

import subprocess
import sys

import av
import pytest
import torch

from conftest import ASSETS


def _run(*args):
    return subprocess.run([sys.executable, "-m", "longcat_tuner.cli", "sample", *args], capture_output=True, text=True)


def test_i2v_sample_writes_video_with_encoded_start_frame(tiny_checkpoint, tmp_path):
    out = tmp_path / "x.mp4"
    result = _run("--model", str(tiny_checkpoint), "--image", str(ASSETS / "girl.png"), "--prompt",
                  "a girl turns her head", "--frames", "9", "--steps", "4", "--resolution", "256x256",
                  "--output", str(out))
    assert result.returncode == 0, result.stderr
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        rate = container.streams.video[0].average_rate
    assert len(frames) == 9 and frames[0].shape == (256, 256, 3) and rate == 15


def test_an_existing_output_is_replaced_only_with_overwrite(tiny_checkpoint, tmp_path):
    """Before: `--output data/clips/a.mp4` replaced a training clip (or an earlier result) without a word."""
    clip = tmp_path / "a.mp4"
    clip.write_bytes(b"the user's clip")
    args = ["--model", str(tiny_checkpoint), "--prompt", "x", "--frames", "5", "--steps", "1", "--resolution", "64x64",
            "--output", str(clip)]
    result = _run(*args)
    assert result.returncode == 2 and f"--output {clip} already exists; pass --overwrite" in result.stderr
    assert clip.read_bytes() == b"the user's clip"
    result = _run(*args, "--overwrite")
    assert result.returncode == 0, result.stderr
    with av.open(str(clip)) as container:
        assert len(list(container.decode(video=0))) == 5


def test_generate_keeps_encoded_start_frame(tiny_checkpoint, shared_dir):
    from longcat_tuner import TextEncoder, VideoVAE, load_dit
    from longcat_tuner.generate import generate
    from longcat_tuner.data.images import prepare_start_frame, read_image
    from longcat_tuner.media import image_to_tensor

    dit, vae = load_dit(tiny_checkpoint), VideoVAE.from_pretrained(tiny_checkpoint)
    embeds, mask = TextEncoder.from_pretrained(tiny_checkpoint).encode(["a girl turns her head", ""])
    start = image_to_tensor(prepare_start_frame(read_image(ASSETS / "girl.png"), 64, 96))
    result = generate(dit, vae, text_embeds=embeds[:1], text_mask=mask[:1], negative_embeds=embeds[1:],
                      negative_mask=mask[1:], height=64, width=96, frames=9, start_frame=start, steps=3, seed=7)
    expected = vae.encode(start.reshape(1, 3, 1, 64, 96), generator=torch.Generator().manual_seed(7))
    assert torch.equal(result.latents[:, :, :1], expected.float())
    assert result.video.shape == (3, 9, 64, 96)


@pytest.mark.parametrize("args,message", [
    (["--frames", "10"], "(frames - 1) must be divisible by 4"),
    (["--resolution", "250x256"], "divisible by 16"),
    # One latent frame is all start frame: refused before the models load, not after.
    (["--frames", "1", "--image", str(ASSETS / "girl.png")], "image-to-video needs at least 5 frames, got 1"),
])
def test_bad_sizes_are_clear_errors(tiny_checkpoint, tmp_path, args, message):
    result = _run("--model", str(tiny_checkpoint), "--prompt", "x", "--steps", "1", "--output", str(tmp_path / "y.mp4"), *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("flag", ["--model", "--output"])
def test_an_over_long_path_is_one_line_naming_the_flag(tiny_checkpoint, tmp_path, monkeypatch, capsys, flag):
    # Before: `OSError: [Errno 36] File name too long` as a traceback (exit 1).
    from longcat_tuner.cli import main

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)  # `sample` sets it
    paths = {"--model": str(tiny_checkpoint), "--output": str(tmp_path / "y.mp4")}
    paths[flag] = str(tmp_path / ("x" * 300)) + (".mp4" if flag == "--output" else "")
    argv = ["sample", "--prompt", "x", "--frames", "5", "--steps", "1", "--resolution", "64x64"]
    assert main(argv + ["--model", paths["--model"], "--output", paths["--output"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} ") and "too long for the file system" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("precision", ["int8-quanto", "fp8-compute"])
def test_sample_with_8bit_weights_and_a_lora(tiny_checkpoint, tmp_path, precision):
    out = tmp_path / "q.mp4"
    result = _run("--model", str(tiny_checkpoint), "--lora", str(tiny_checkpoint / "lora" / "tiny_lora.safetensors"),
                  "--base-precision", precision, "--prompt", "a cat", "--frames", "5", "--steps", "2",
                  "--resolution", "64x64", "--output", str(out))
    assert result.returncode == 0, result.stderr
    # auto keeps the LoRA un-merged on 8-bit weights (merging would round its update to 8 bits too)
    assert f"LoRAs: --merge-loras auto: un-merged on {precision} weights" in result.stderr
    with av.open(str(out)) as container:
        assert len(list(container.decode(video=0))) == 5


@pytest.mark.parametrize("flag, merged", [(None, True), ("off", False), ("on", True)])
def test_sample_merges_loras_by_default(tiny_checkpoint, tmp_path, monkeypatch, capsys, flag, merged):
    from longcat_tuner.cli import main
    from longcat_tuner.commands import sample as sample_command
    from longcat_tuner.model.lora import lora_modules

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)  # `sample` sets it
    calls = []
    real = sample_command.prepare_sampling_dit

    def spy(dit, settings, device, loras, *, merge):
        calls.append((merge, [(source, multiplier) for source, _, multiplier in loras]))
        applied = real(dit, settings, device, loras, merge=merge)
        calls.append(bool(lora_modules(dit)))
        return applied

    monkeypatch.setattr(sample_command, "prepare_sampling_dit", spy)
    planned = []  # the un-merged adapters' GiB the memory plan counts (none once merged)
    real_swap = sample_command.sampling_swap

    def swap_spy(args, *, height, width, device, lora_gib=0.0):
        planned.append(lora_gib)
        return real_swap(args, height=height, width=width, device=device, lora_gib=lora_gib)

    monkeypatch.setattr(sample_command, "sampling_swap", swap_spy)
    lora = str(tiny_checkpoint / "lora" / "tiny_lora.safetensors")
    out = tmp_path / "m.mp4"
    argv = ["sample", "--model", str(tiny_checkpoint), "--lora", lora, "--lora-multiplier", "0.5", "--prompt", "a cat",
            "--frames", "5", "--steps", "1", "--resolution", "64x64", "--device", "cpu", "--output", str(out)]
    assert main(argv + (["--merge-loras", flag] if flag else [])) == 0
    assert calls == [(merged, [(lora, 0.5)]), not merged]  # merged: no adapter left attached
    assert len(planned) == 1 and (planned[0] == 0) == merged
    err = capsys.readouterr().err
    assert ("LoRAs folded into the weights" in err) == merged and out.is_file()


def test_block_swap_needs_cuda(tiny_checkpoint, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU error")
    result = _run("--model", str(tiny_checkpoint), "--prompt", "x", "--blocks-to-swap", "1", "--frames", "5",
                  "--steps", "1", "--resolution", "64x64", "--output", str(tmp_path / "s.mp4"))
    assert result.returncode == 2 and "CUDA" in result.stderr


def test_sample_defaults_to_the_attention_a_lora_was_trained_with(tiny_checkpoint, tmp_path):
    from longcat_tuner import inject_lora, load_dit, save_lora
    from longcat_tuner.commands.sample import trained_attention

    dit = load_dit(tiny_checkpoint)
    inject_lora(dit, rank=2)
    ours = save_lora(dit, tmp_path / "ours.safetensors", metadata={"attention_implementation": "block_sparse"})
    assert trained_attention([str(ours)]) == "block_sparse"
    assert trained_attention([str(tiny_checkpoint / "lora" / "tiny_lora.safetensors")]) is None  # official file
    assert trained_attention([]) is None


def test_cli_silences_dependency_warnings_users_cannot_act_on(capsys):
    import logging

    from longcat_tuner.cli import QUIET_LOGGERS, main

    assert main([]) == 0
    for name in QUIET_LOGGERS:
        assert logging.getLogger(name).getEffectiveLevel() >= logging.ERROR


def test_compile_flag_parses_with_auto_as_default():
    from longcat_tuner.cli import build_parser

    parser = build_parser("sample")
    base = ["sample", "--model", "m", "--prompt", "x", "--output", "o.mp4"]
    assert parser.parse_args(base).compile == "auto"  # the web preview passes no --compile: it gets auto
    assert parser.parse_args(base + ["--compile", "off"]).compile == "off"
    assert parser.parse_args(base + ["--compile", "on"]).compile == "on"
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--compile", "yes"])


@pytest.mark.parametrize("triton", [True, False])
def test_sampling_settings_compile_by_the_auto_rule(monkeypatch, triton):
    from longcat_tuner.commands import sample as sample_command
    from longcat_tuner.commands.sample import AUTO_COMPILE_MIN_FORWARDS, sampling_settings
    from longcat_tuner.errors import ConfigError

    monkeypatch.setattr(sample_command, "triton_installed", lambda: triton)
    cuda = torch.device("cuda")  # a device object only: nothing runs on it

    def compiles(device=cuda, **kwargs) -> bool:
        return sampling_settings(device=device, **kwargs).compile_blocks

    assert AUTO_COMPILE_MIN_FORWARDS == 12
    # auto on CUDA: compile when the run makes >= 12 forwards (a CFG step is two), and only with Triton.
    assert compiles(steps=50, guidance=4.0) is triton  # sample's default video: 100 forwards
    assert compiles(steps=6, guidance=4.0) is triton  # 12 forwards
    assert compiles(steps=5, guidance=4.0) is False  # 10
    assert compiles(steps=12, guidance=1.0) is triton
    assert compiles(steps=11, guidance=1.0) is False
    assert compiles(steps=16, guidance=1.0) is triton  # the distilled preview
    assert compiles(steps=50, guidance=4.0, compile="off") is False
    if triton:
        assert compiles(steps=1, guidance=1.0, compile="on") is True
    else:
        with pytest.raises(ConfigError, match="--compile on needs Triton.*--compile off"):
            compiles(steps=1, guidance=1.0, compile="on")
    # The CPU: auto stays eager; on compiles, as train's compile_blocks does there (Triton not needed).
    assert compiles(device=torch.device("cpu"), steps=50, guidance=4.0) is False
    assert compiles(device="cpu", steps=1, guidance=1.0, compile="on") is True
    settings = sampling_settings(device=cuda, steps=50, guidance=4.0, blocks_to_swap=3, base_precision="fp8-compute")
    assert (settings.checkpointing, settings.blocks_to_swap, settings.base_precision) == ("none", 3, "fp8-compute")
    with pytest.raises(ConfigError, match="--blocks-to-swap"):
        sampling_settings(device="cpu", steps=50, guidance=4.0, blocks_to_swap=1)


def test_a_lora_that_overflows_gives_an_error_not_a_black_video(tiny_checkpoint, tmp_path):
    """Finite but absurd LoRA values pass every file check; the sampled latents are NaN/inf and the video came out
    black with exit status 0. Now nothing is written and the error names the LoRA and its multiplier."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tiny_checkpoint / "lora" / "tiny_lora.safetensors"))
    huge = tmp_path / "huge.safetensors"
    save_file({k: v * 1e18 if k.endswith(".weight") else v for k, v in tensors.items()}, str(huge))
    out = tmp_path / "x.mp4"
    result = _run("--model", str(tiny_checkpoint), "--lora", str(huge), "--prompt", "a cat", "--frames", "5",
                  "--steps", "1", "--resolution", "64x64", "--output", str(out))
    assert result.returncode == 2, result.stderr
    assert "sampling produced NaN/inf latents" in result.stderr and f"{huge} (multiplier 1)" in result.stderr
    assert not out.exists()
