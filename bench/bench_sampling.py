"""Benchmark: sampling speed through `longcat-tuner sample`'s own runtime, printed as JSON.

What `sample` runs, without a checkpoint on disk: the full 13.6B DiT with random weights (bench/common.py
`random_dit`; `--tiny`: the tiny test DiT on the CPU), its settings from `sample`'s own
`commands.sample.sampling_settings` (the function `sample` calls: compile, base precision, block swap),
applied through `sample`'s own `prepare_sampling_dit` (LoRA merged or attached, base precision, runtime) as
`load_dit_for_sampling` does, then the sampler `generate` calls (`diffusion.sampler.sample`, CFG passes batched) on I2V latents
of 480x832x93 (37,440 tokens). Each run times its first step (compile included) and `--timed-steps`
steady steps with device syncs in the step callback and extrapolates to its whole grid (every step is
one DiT forward at a fixed shape).

Runtimes (`--runtimes`), each what `sample` runs with these flags:

* `eager`: `--compile off` (bf16 on CUDA, the product's default dtype; fp32 on the CPU);
* `compiled`: `--compile on` (torch.compile per block, as `train`'s `compile_blocks`);
* `compiled_unmerged`: `--compile on --merge-loras off` (the LoRA attached un-merged, the official
  application; the others run `sample`'s default `--merge-loras auto`, which folds it into bf16 weights);
* `compiled_fp8_compute`: `--compile on --base-precision fp8-compute` (float8 matmuls of the frozen block
  linears, runtime/fp8_compute.py; auto keeps the LoRA un-merged on 8-bit weights);
* `compiled_fp8_compute_merged`: the same with `--merge-loras on` (merged before the weights go to 8 bits).

Default: eager, compiled, compiled_fp8_compute. The LoRA runtimes differ only on grids with a LoRA
(distilled16); each result names how its LoRA ran (`lora`: merged, un-merged, or null without one).

Grids (`--grids`), the old modes' meaning:

* `cfg50`: 50 steps, guidance 4 (a batch-2 forward per step): `sample`'s default video;
* `distilled16`: the 16-step distilled grid, guidance 1 (a batch-1 forward per step), with a random LoRA
  shaped like the official `cfg_step_lora` (rank 128 on its targets, MODEL.md 4.4) as the web's fast
  preview loads it;
* `cfg50_kv`: cfg50 with the condition-latent KV cache (23 noisy latents per forward). Not what `sample`
  runs today (`generate` does not use the cache); not in the default grids.

Per run: `first_step_s`, `step_s` (median of the timed steps), `video_s_estimate` (first step + the other
steps at `step_s`), `ratio_to_official` (against the official code's time for the same forwards: 4.58 s a
forward, `OFFICIAL_FORWARD_S`; 458 s for cfg50), the issue's target for the grid and whether it is met,
peak allocated/reserved GiB (weights included), MFU. Each run starts from the same seed; after its steps the
latents are compared with the reference runtime's (eager when it ran): `latents_psnr_db` (peak: the
reference's value range; null when identical) and `update_rel_error` (relative error of the change the steps made to the
latents; after a few of 50 steps the latents are still mostly the shared noise, so the PSNR is high for
any runtime, and this is the sensitive figure). `--timed-steps 15` runs distilled16 to its end: the
PSNR is then that of the final video latents. Per grid, with eager and compiled both run, `compile` gives
the measured break-even of compiling (`compile_break_even_forwards`, the unit of `sample`'s
`AUTO_COMPILE_MIN_FORWARDS`) and what `--compile auto` picks for that grid.

Each run is what one `sample` process does: a freshly drawn model, `torch._dynamo.reset()`, and (default
`--inductor-cache fresh`) an empty inductor cache made for this process, so `first_step_s` includes a cold
compile; later compiled runs of the same process may reuse some generated kernels. `--inductor-cache keep`
uses the machine's cache (run twice to see a warm compile). The weights are drawn and converted on the
compute device (without block swap): `sample` assembles 8-bit models on the host so that a model larger than
the card never lands on it whole; the model `apply_runtime` then places is the same.

Usage (GPU): `python bench/bench_sampling.py [--runtimes eager compiled compiled_fp8_compute] [--grids cfg50
distilled16] [--timed-steps 3] [--out DIR]`; CPU smoke run: `python bench/bench_sampling.py --tiny --out /tmp/x`.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    H100_BF16_PEAK_TFLOPS,
    LATENT_SHAPE,
    TEXT_TOKENS,
    VALID_TEXT_TOKENS,
    forward_flops,
    gib,
    i2v_inputs,
    random_dit,
    sync_time,
    write_result,
)
from longcat_tuner import runtime  # noqa: E402
from longcat_tuner.commands import sample as sample_command  # noqa: E402
from longcat_tuner.devices import default_dtype  # noqa: E402
from longcat_tuner.diffusion.sampler import sample  # noqa: E402
from longcat_tuner.model.config import DiTConfig  # noqa: E402
from longcat_tuner.model import lora_formats  # noqa: E402
from longcat_tuner.model.lora import fused_parts, match_targets  # noqa: E402
from longcat_tuner.model.lora_names import DEFAULT_LORA_TARGETS  # noqa: E402
from longcat_tuner.model.random_checkpoint import SIZES  # noqa: E402

# The official code's DiT forward at 480x832x93 (batch 1, bf16) on one H200: 4.58 s, so a 50-step CFG video
# (100 forwards) takes about 458 s. Source: issue 14 ("its 100 forwards at 4.58 s: about 458 s").
OFFICIAL_FORWARD_S = 4.58
OFFICIAL_VIDEO_S = 100 * OFFICIAL_FORWARD_S
# Issue 14's targets: a 50-step CFG video in <= 0.6x the official time, a 16-step distilled preview <= 40 s.
TARGET_S = {"cfg50": 0.6 * OFFICIAL_VIDEO_S, "cfg50_kv": 0.6 * OFFICIAL_VIDEO_S, "distilled16": 40.0}

# The official cfg_step_lora (MODEL.md 4.4): rank 128, alpha 64, every block linear but cross_attn.proj.
CFG_STEP_LORA_RANK, CFG_STEP_LORA_ALPHA = 128, 64.0
CFG_STEP_LORA_TARGETS = tuple(t for t in DEFAULT_LORA_TARGETS if t != "cross_attn.proj")

GRIDS = {
    "cfg50": dict(steps=50, guidance=4.0, distilled=False, use_kv_cache=False),
    "cfg50_kv": dict(steps=50, guidance=4.0, distilled=False, use_kv_cache=True),
    "distilled16": dict(steps=16, guidance=1.0, distilled=True, use_kv_cache=False),
}
DEFAULT_GRIDS = ("cfg50", "distilled16")
# Runtime -> `sample`'s flags.
RUNTIMES = {
    "eager": dict(compile="off", base_precision="no_change", merge_loras="auto"),
    "compiled": dict(compile="on", base_precision="no_change", merge_loras="auto"),
    "compiled_unmerged": dict(compile="on", base_precision="no_change", merge_loras="off"),
    "compiled_fp8_compute": dict(compile="on", base_precision="fp8-compute", merge_loras="auto"),
    "compiled_fp8_compute_merged": dict(compile="on", base_precision="fp8-compute", merge_loras="on"),
}
DEFAULT_RUNTIMES = ("eager", "compiled", "compiled_fp8_compute")
REFERENCE_ORDER = ("eager", "compiled")  # the runtime the others' latents are compared with: the first that ran

# `--tiny`: the tiny test DiT (model/random_checkpoint.py SIZES["tiny"]) on a small I2V clip, on the CPU.
TINY_LATENT_SHAPE = (1, 16, 3, 8, 8)
TINY_TEXT_TOKENS, TINY_VALID_TEXT_TOKENS = 16, 8
TINY_LORA_RANK = 4


class _Stop(Exception):
    pass


@contextlib.contextmanager
def compile_backend(backend: str):
    """Run `torch.compile` (as `runtime.apply_runtime` calls it) with `backend`; `inductor` changes nothing.
    The smoke run uses dynamo's `eager` backend: the blocks are traced as under compile, without inductor's
    code generation (about 25 s a graph on a CPU)."""
    if backend == "inductor":
        yield
        return
    original = torch.compile
    torch.compile = functools.partial(original, backend=backend)
    try:
        yield
    finally:
        torch.compile = original


def random_lora(dit, rank: int, device: torch.device) -> dict:
    """A random LoRA shaped like the official `cfg_step_lora` (rank `rank` on its targets, alpha scaled as the
    file's 64/128) as `lora_formats.Adapter` records, the form `sample` reads a file into (seed 1: the same
    adapters in every run)."""
    generator = torch.Generator(device="cpu").manual_seed(1)
    scale = CFG_STEP_LORA_ALPHA / CFG_STEP_LORA_RANK
    adapters = {}
    for path in match_targets(dit, CFG_STEP_LORA_TARGETS):
        linear = dit.get_submodule(path)
        parts = fused_parts(path)
        down = torch.randn(parts * rank, linear.in_features, generator=generator) * linear.in_features**-0.5
        ups = [torch.randn(linear.out_features // parts, rank, generator=generator) * 0.01 for _ in range(parts)]
        adapters[path] = lora_formats.Adapter(down.to(device), [u.to(device) for u in ups], scale)
    return adapters


def build_model(config: DiTConfig, settings, device: torch.device, dtype: torch.dtype, *, attention: str,
                lora_rank: int, merge: bool) -> Any:
    """The DiT as `load_dit_for_sampling` builds it under `settings`: random weights (seed 0) instead of a
    checkpoint, then `sample`'s own `prepare_sampling_dit` (the LoRA, a random `cfg_step_lora`-shaped one,
    merged when `merge`; base precision; the runtime)."""
    weights_device = runtime.load_device(settings, device) if settings.blocks_to_swap else device
    dit = random_dit(config, device=str(weights_device), dtype=dtype, seed=0)
    dit.set_attention_backend(attention)
    loras = [("cfg_step_lora", random_lora(dit, lora_rank, weights_device), 1.0)] if lora_rank else []
    sample_command.prepare_sampling_dit(dit, settings, device, loras, merge=merge)
    dit.requires_grad_(False)
    return dit


def time_run(dit, grid: dict, timed_steps: int, inputs, *, num_cond_latents: int = 1) -> tuple[dict, torch.Tensor]:
    """(timings, the latents after the last step run) of `grid` on `dit`, stopped after 1 + `timed_steps` steps."""
    latents, text, mask = inputs
    negative = torch.zeros_like(text)
    negative_mask = torch.zeros_like(mask)
    negative_mask[:, 0] = 1
    marks = [sync_time()]
    last: list[torch.Tensor] = []

    def callback(step, total, current):
        marks.append(sync_time())
        if step > timed_steps or step == total:
            last.append(current.detach().float().cpu())
            if step < total:
                raise _Stop

    try:
        sample(dit, latents, text_embeds=text, text_mask=mask, negative_embeds=negative, negative_mask=negative_mask,
               num_cond_latents=num_cond_latents, shift=12.0, callback=callback, **grid)
    except _Stop:
        pass
    first = marks[1] - marks[0]
    steady = [b - a for a, b in zip(marks[1:], marks[2:])]
    step_s = statistics.median(steady) if steady else first
    video_s = first + step_s * (grid["steps"] - 1)
    return {"steps_run": len(marks) - 1, "first_step_s": round(first, 3), "step_s": round(step_s, 3),
            "step_times_s": [round(s, 3) for s in steady], "video_s_estimate": round(video_s, 1)}, last[0]


def compare_latents(got: torch.Tensor, want: torch.Tensor, start: torch.Tensor) -> dict:
    """PSNR of `got` against `want` (peak: `want`'s value range) and the relative error of the change from
    `start` (the common initial latents)."""
    mse = (got - want).pow(2).mean().item()
    peak = (want.max() - want.min()).item()
    update = (want - start).norm().item()
    return {"latents_psnr_db": round(10 * math.log10(peak**2 / mse), 2) if mse > 0 else None,  # None: identical
            "update_rel_error": round((got - want).norm().item() / update, 5) if update > 0 else None}


def break_even(eager: dict, compiled: dict, forwards_per_step: int) -> dict:
    """What compiling cost and saved for one grid, and after how many DiT forwards it paid back."""
    extra = (compiled["first_step_s"] - compiled["step_s"]) - (eager["first_step_s"] - eager["step_s"])
    saving = eager["step_s"] - compiled["step_s"]
    steps = extra / saving if saving > 0 else None
    return {"extra_first_step_s": round(extra, 2), "saving_per_step_s": round(saving, 3),
            "break_even_steps": round(steps, 1) if steps is not None else None,
            "compile_break_even_forwards": round(steps * forwards_per_step, 1) if steps is not None else None}


def fresh_inductor_cache() -> str:
    """An empty inductor (and Triton) cache for this process: compiles are cold, as a first `sample` run's."""
    folder = tempfile.mkdtemp(prefix="lct-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    os.environ["TRITON_CACHE_DIR"] = os.path.join(folder, "triton")
    return folder


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtimes", nargs="+", choices=list(RUNTIMES), default=list(DEFAULT_RUNTIMES))
    parser.add_argument("--grids", nargs="+", choices=list(GRIDS), default=list(DEFAULT_GRIDS))
    parser.add_argument("--timed-steps", type=int, default=None, help="steady steps timed after the first (default 3; --tiny 2)")
    parser.add_argument("--blocks-to-swap", type=int, default=0, help="as `sample --blocks-to-swap`")
    parser.add_argument("--attention", default="auto", help="as `sample --attention` (default auto, as sample without a LoRA)")
    parser.add_argument("--distilled-lora-rank", type=int, default=None,
                        help=f"rank of the random cfg_step_lora-shaped LoRA of distilled16 (default {CFG_STEP_LORA_RANK}; "
                        f"--tiny {TINY_LORA_RANK}; 0: none)")
    parser.add_argument("--inductor-cache", choices=("fresh", "keep"), default="fresh")
    parser.add_argument("--compile-backend", choices=("inductor", "eager"), default=None,
                        help="torch.compile's backend (default inductor; --tiny: eager, see `compile_backend`)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: the tiny DiT on a small clip, seconds")
    parser.add_argument("--out", default=None, help="result folder (default $OUT or bench/results)")
    parser.add_argument("--name", default=None, help="result file name (default sampling; --tiny: sampling-tiny)")
    args = parser.parse_args(argv)
    if args.timed_steps is None:
        args.timed_steps = 2 if args.tiny else 3
    if args.timed_steps < 1:
        parser.error("--timed-steps must be >= 1")
    if args.distilled_lora_rank is None:
        args.distilled_lora_rank = TINY_LORA_RANK if args.tiny else CFG_STEP_LORA_RANK
    args.compile_backend = args.compile_backend or ("eager" if args.tiny else "inductor")
    args.name = args.name or ("sampling-tiny" if args.tiny else "sampling")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        device = torch.device("cpu")
        config, latent_shape = SIZES["tiny"], TINY_LATENT_SHAPE
        text_tokens, valid_text_tokens = TINY_TEXT_TOKENS, TINY_VALID_TEXT_TOKENS
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_sampling.py measures a CUDA GPU; use --tiny for the CPU smoke run")
        device = torch.device("cuda")
        config, latent_shape, text_tokens, valid_text_tokens = DiTConfig(), LATENT_SHAPE, TEXT_TOKENS, VALID_TEXT_TOKENS
    dtype = default_dtype(device)  # what `sample` loads the DiT in
    cache = fresh_inductor_cache() if args.inductor_cache == "fresh" else None
    inputs = i2v_inputs(device=str(device), latent_shape=latent_shape, text_tokens=text_tokens,
                        caption_channels=config.caption_channels, text_dtype=dtype, valid_text_tokens=valid_text_tokens)
    fwd = forward_flops(config, latent_shape, text_tokens=text_tokens)
    results: dict[str, dict[str, Any]] = {}
    latents_after: dict[tuple[str, str], torch.Tensor] = {}
    for grid_name in args.grids:
        grid = GRIDS[grid_name]
        batch = 2 if grid["guidance"] > 1 else 1
        forwards = sample_command.sampling_forwards(grid["steps"], grid["guidance"])
        for runtime_name in args.runtimes:
            # The settings `sample` would run this grid with under this runtime's flags.
            flags = dict(RUNTIMES[runtime_name])
            merge_loras = flags.pop("merge_loras")
            settings = sample_command.sampling_settings(
                device=device, steps=grid["steps"], guidance=grid["guidance"], blocks_to_swap=args.blocks_to_swap,
                **flags)
            lora_rank = args.distilled_lora_rank if grid["distilled"] else 0
            # How `sample --merge-loras` applies this runtime's LoRA.
            merged, _ = sample_command.choose_merge(merge_loras, base_precision=settings.base_precision,
                                                    loras=1 if lora_rank else 0)
            torch._dynamo.reset()
            with compile_backend(args.compile_backend):
                dit = build_model(config, settings, device, dtype, attention=args.attention, lora_rank=lora_rank,
                                  merge=merged)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                r, final = time_run(dit, grid, args.timed_steps, inputs)
            official = forwards * OFFICIAL_FORWARD_S
            r.update(settings=settings.describe(), lora=("merged" if merged else "un-merged") if lora_rank else None,
                     forwards=forwards, official_s=round(official, 1),
                     ratio_to_official=round(r["video_s_estimate"] / official, 3), target_s=round(TARGET_S[grid_name], 1),
                     meets_target=r["video_s_estimate"] <= TARGET_S[grid_name])
            if device.type == "cuda":
                if not grid["use_kv_cache"]:  # forward_flops counts the whole clip; the cached grid runs fewer tokens
                    r["mfu"] = round(batch * (fwd["linear"] + fwd["attention"]) / r["step_s"] / 1e12 / H100_BF16_PEAK_TFLOPS, 3)
                r["peak_allocated_gib"] = gib(torch.cuda.max_memory_allocated())
                r["peak_reserved_gib"] = gib(torch.cuda.max_memory_reserved())
            latents_after[grid_name, runtime_name] = final
            results.setdefault(grid_name, {})[runtime_name] = r
            del dit
            torch._dynamo.reset()  # compiled code holds the model's tensors until then
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(json.dumps({"grid": grid_name, "runtime": runtime_name, **r}), flush=True)
        by_runtime = results[grid_name]
        reference = next((name for name in REFERENCE_ORDER if name in by_runtime), None)
        start = inputs[0].float().cpu()
        for runtime_name in by_runtime:
            if reference is not None and runtime_name != reference:
                same_steps = by_runtime[runtime_name]["steps_run"] == by_runtime[reference]["steps_run"]
                if same_steps:
                    by_runtime[runtime_name]["vs_" + reference] = compare_latents(
                        latents_after[grid_name, runtime_name], latents_after[grid_name, reference], start)
        summary: dict[str, Any] = {
            "auto_compiles": sample_command.sampling_settings(
                device=device, steps=grid["steps"], guidance=grid["guidance"], compile="auto").compile_blocks,
            "auto_min_forwards": sample_command.AUTO_COMPILE_MIN_FORWARDS,
        }
        if "eager" in by_runtime and "compiled" in by_runtime:
            summary.update(break_even(by_runtime["eager"], by_runtime["compiled"], batch))
        by_runtime["compile"] = summary
    payload = {
        "benchmark": "sampling",
        "setting": {"latents": list(latent_shape), "num_cond_latents": 1, "text_tokens": text_tokens,
                    "dtype": str(dtype).removeprefix("torch."), "weights": "random", "tiny": args.tiny,
                    "attention": args.attention, "blocks_to_swap": args.blocks_to_swap,
                    "timed_steps": args.timed_steps, "distilled_lora_rank": args.distilled_lora_rank,
                    "compile_backend": args.compile_backend, "inductor_cache": args.inductor_cache,
                    "official_forward_s": OFFICIAL_FORWARD_S, "official_video_s": OFFICIAL_VIDEO_S,
                    "forward_tflop": round((fwd["linear"] + fwd["attention"]) / 1e12, 6),
                    "mfu_peak_tflops": H100_BF16_PEAK_TFLOPS},
        "results": results,
    }
    path = write_result(args.name, payload, args.out)
    print(json.dumps(payload), flush=True)
    print(f"wrote {path}", file=sys.stderr)
    if cache is not None:
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
