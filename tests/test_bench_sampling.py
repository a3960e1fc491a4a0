"""The sampling benchmark (bench/bench_sampling.py) measures `sample`'s own path: it takes its settings from
the function `sample` calls, runs end to end in its CPU smoke mode and prints every figure as JSON."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _bench():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_sampling", REPO / "bench" / "bench_sampling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def settings_calls(monkeypatch):
    """Every call of `commands.sample.sampling_settings` (keyword arguments and the settings returned)."""
    from longcat_tuner.commands import sample as sample_command

    calls = []
    real = sample_command.sampling_settings

    def spy(**kwargs):
        settings = real(**kwargs)
        calls.append((kwargs, settings))
        return settings

    monkeypatch.setattr(sample_command, "sampling_settings", spy)
    return calls


@pytest.fixture
def compiled_forwards(monkeypatch):
    """DiT block forwards given to torch.compile, compiled with dynamo's eager backend (no inductor code
    generation); other callers (libraries compiling their own functions) are passed through."""
    from longcat_tuner.model.dit import LongCatBlock

    compiled = []
    real = torch.compile

    def recording_compile(fn=None, **kwargs):
        if not isinstance(getattr(fn, "__self__", None), LongCatBlock):
            return real(fn, **kwargs) if fn is not None else real(**kwargs)
        compiled.append(fn)
        return real(fn, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", recording_compile)
    torch._dynamo.reset()
    return compiled


def test_sample_and_the_benchmark_take_their_settings_from_one_function(tiny_checkpoint, tmp_path, monkeypatch,
                                                                        settings_calls, compiled_forwards, capsys):
    from longcat_tuner.cli import main
    from longcat_tuner.commands import sample as sample_command

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)  # `sample` sets it (restored after the test)
    out = tmp_path / "c.mp4"
    assert main(["sample", "--model", str(tiny_checkpoint), "--prompt", "a cat", "--frames", "5", "--steps", "2",
                 "--resolution", "64x64", "--device", "cpu", "--compile", "on", "--output", str(out)]) == 0
    assert out.is_file() and "compile: --compile on" in capsys.readouterr().err
    (kwargs, settings), = settings_calls
    assert kwargs["compile"] == "on" and kwargs["steps"] == 2 and settings.compile_blocks
    depth = 2  # the tiny checkpoint's blocks: each one's forward went through torch.compile
    assert len(compiled_forwards) == depth

    settings_calls.clear()
    compiled_forwards.clear()
    prepared = []  # (merge, with a LoRA) of each model the bench prepared: through `sample`'s own function
    real_prepare = sample_command.prepare_sampling_dit

    def prepare_spy(dit, settings, device, loras, *, merge):
        prepared.append((merge, bool(loras)))
        return real_prepare(dit, settings, device, loras, merge=merge)

    monkeypatch.setattr(sample_command, "prepare_sampling_dit", prepare_spy)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # the bench points these at its own
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    assert _bench().main(["--tiny", "--timed-steps", "1", "--out", str(tmp_path)]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads((tmp_path / "sampling-tiny.json").read_text())["results"] == payload["results"]

    assert [merge for merge, lora in prepared if lora] == [True, True, False]  # distilled16's LoRA: auto's choice
    assert [lora for _, lora in prepared] == [False] * 3 + [True] * 3
    runs = [(kw["steps"], kw["compile"], kw["base_precision"]) for kw, _ in settings_calls if kw["compile"] != "auto"]
    assert runs == [(50, "off", "no_change"), (50, "on", "no_change"), (50, "on", "fp8-compute"),
                    (16, "off", "no_change"), (16, "on", "no_change"), (16, "on", "fp8-compute")]
    assert len(compiled_forwards) == 4 * depth  # the compiled runs (2 runtimes x 2 grids) compiled every block
    for grid, steps in (("cfg50", 50), ("distilled16", 16)):
        by_runtime = payload["results"][grid]
        for name in ("eager", "compiled", "compiled_fp8_compute"):
            run = by_runtime[name]
            assert run["steps_run"] == 2 and run["first_step_s"] > 0 and run["step_s"] > 0
            assert run["video_s_estimate"] == pytest.approx(run["first_step_s"] + (steps - 1) * run["step_s"], abs=0.1)
            assert run["ratio_to_official"] == pytest.approx(run["video_s_estimate"] / run["official_s"], abs=2e-3)
        assert "compile_blocks" not in by_runtime["eager"]["settings"]
        assert "compile_blocks" in by_runtime["compiled"]["settings"]
        assert "fp8-compute" in by_runtime["compiled_fp8_compute"]["settings"]
        lora = [by_runtime[name]["lora"] for name in ("eager", "compiled", "compiled_fp8_compute")]
        assert lora == ([None] * 3 if grid == "cfg50" else ["merged", "merged", "un-merged"])
        fp8 = by_runtime["compiled_fp8_compute"]["vs_eager"]
        assert 20 < fp8["latents_psnr_db"] < 200 and 0 < fp8["update_rel_error"] < 0.5  # float8: close, not equal
        assert by_runtime["compiled"]["vs_eager"]["update_rel_error"] < 1e-5  # the eager backend: the same ops
        assert by_runtime["compile"]["auto_compiles"] is False  # auto never compiles on the CPU
    assert payload["results"]["cfg50"]["eager"]["official_s"] == 458.0
    assert payload["setting"]["official_video_s"] == 458.0


def test_break_even_and_latent_comparison():
    bench = _bench()
    eager = {"first_step_s": 10.0, "step_s": 9.5}
    compiled = {"first_step_s": 57.5, "step_s": 7.5}
    got = bench.break_even(eager, compiled, forwards_per_step=2)
    # compile cost 50 - 0.5 = 49.5 s more on the first step, saving 2 s a step -> 24.75 steps, 49.5 forwards
    assert got == {"extra_first_step_s": 49.5, "saving_per_step_s": 2.0, "break_even_steps": 24.8,
                   "compile_break_even_forwards": 49.5}
    assert bench.break_even(eager, {"first_step_s": 60.0, "step_s": 9.6}, 1)["break_even_steps"] is None

    start = torch.zeros(1000)
    want = torch.linspace(-1, 1, 1000)
    same = bench.compare_latents(want.clone(), want, start)
    assert same["latents_psnr_db"] is None and same["update_rel_error"] == 0
    off = bench.compare_latents(want + 0.02, want, start)
    assert off["latents_psnr_db"] == pytest.approx(20 * torch.log10(torch.tensor(2 / 0.02)).item(), abs=0.01)
    assert off["update_rel_error"] == pytest.approx(0.02 * 1000**0.5 / want.norm().item(), rel=1e-3)
