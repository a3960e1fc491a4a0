"""Benchmark: sampling speed of the full 13.6B DiT at 480x832x93 I2V on one GPU, printed as JSON.

Runs the project's sampler (`longcat_tuner.diffusion.sampler.sample`, conditional and unconditional passes
batched) with random bf16 weights, times its first steps with CUDA syncs in the step callback, and
extrapolates to the full grid (every step costs the same: one DiT forward at a fixed shape):

* `cfg50`: 50 steps, guidance 4 (a batch-2 forward per step);
* `cfg50_kv`: the same with the condition-latent KV cache (`use_kv_cache`: 23 noisy latents per forward);
* `distilled16`: the 16-step distilled grid, guidance 1 (a batch-1 forward per step).

Usage: `python bench/bench_sampling.py [--timed-steps 3] [--sdpa cudnn]`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    H100_BF16_PEAK_TFLOPS,
    LATENT_SHAPE,
    forward_flops,
    i2v_inputs,
    random_dit,
    select_sdpa_backend,
    sync_time,
    write_result,
)
from longcat_tuner.diffusion.sampler import sample  # noqa: E402
from longcat_tuner.model.config import DiTConfig  # noqa: E402

MODES = {
    "cfg50": dict(steps=50, guidance=4.0, distilled=False, use_kv_cache=False),
    "cfg50_kv": dict(steps=50, guidance=4.0, distilled=False, use_kv_cache=True),
    "distilled16": dict(steps=16, guidance=1.0, distilled=True, use_kv_cache=False),
}


class _Stop(Exception):
    pass


def time_mode(dit, mode: dict, timed_steps: int, inputs) -> dict:
    latents, text, mask = inputs
    negative = torch.zeros_like(text)
    negative_mask = torch.zeros_like(mask)
    negative_mask[:, 0] = 1
    marks = [sync_time()]

    def callback(step, total, _latents):
        marks.append(sync_time())
        if step > timed_steps:  # the first step warms up (kernels, RoPE tables, KV cache build)
            raise _Stop

    try:
        sample(dit, latents, text_embeds=text, text_mask=mask, negative_embeds=negative, negative_mask=negative_mask,
               num_cond_latents=1, shift=12.0, callback=callback, **mode)
    except _Stop:
        pass
    per_step = sorted(b - a for a, b in zip(marks[1:], marks[2:]))
    step_s = per_step[len(per_step) // 2]
    return {"first_step_s": round(marks[1] - marks[0], 3), "step_s": round(step_s, 3),
            "video_s_estimate": round(step_s * mode["steps"] + (marks[1] - marks[0] - step_s), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timed-steps", type=int, default=3)
    parser.add_argument("--sdpa", default="cudnn", choices=("cudnn", "flash"))
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    args = parser.parse_args()
    select_sdpa_backend(args.sdpa)
    config = DiTConfig()
    dit = random_dit(config)
    inputs = i2v_inputs()
    fwd = forward_flops(config)
    results = {}
    with torch.inference_mode():
        for name in args.modes:
            torch.cuda.reset_peak_memory_stats()
            r = time_mode(dit, MODES[name], args.timed_steps, inputs)
            batch = 2 if MODES[name]["guidance"] > 1 else 1
            r["forward_pair_s" if batch == 2 else "forward_s"] = r["step_s"]
            r["mfu"] = round(batch * (fwd["linear"] + fwd["attention"]) / r["step_s"] / 1e12 / H100_BF16_PEAK_TFLOPS, 3)
            r["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            results[name] = {"mode": MODES[name], **r}
            print(name, json.dumps(results[name]), flush=True)
    payload = {"benchmark": "sampling", "setting": {"latents": list(LATENT_SHAPE), "num_cond_latents": 1,
               "sdpa": args.sdpa, "weights": "bf16"}, "results": results}
    path = write_result("sampling", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
