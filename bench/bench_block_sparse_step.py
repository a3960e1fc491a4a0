"""Benchmark: a LoRA training step with block-sparse attention forced vs dense SDPA, printed as JSON.

The full 13.6B DiT with random bf16 weights, I2V (one condition latent), batch 1, 512x832x93
(latents [1,16,24,64,104], token grid 24x32x52, a multiple of the 4x4x4 blocks), rank-32 adapters,
bf16 autocast, plain gradient checkpointing, AdamW. Both runs use the same weights and inputs; the
output difference of one forward (block-sparse vs dense, relative L2) is reported with the times.
With one condition latent the noisy queries span 23 frames (a ragged block row) against all 24 key
frames: our kernel takes that without padding (the official kernel cannot).

Usage: `python bench/bench_block_sparse_step.py [--depth N] [--steps 1]`; the JSON goes to `$OUT` or
bench/results/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import gib, i2v_inputs, lora_train_flops, random_dit, sync_time, write_result  # noqa: E402
from longcat_tuner.diffusion.flow import frame_timesteps  # noqa: E402
from longcat_tuner.model.config import DiTConfig  # noqa: E402
from longcat_tuner.model.lora import inject_lora  # noqa: E402
from longcat_tuner.runtime.checkpointing import apply_gradient_checkpointing  # noqa: E402
from longcat_tuner.train.step import flow_matching_loss  # noqa: E402

LATENTS_512 = (1, 16, 24, 64, 104)


def timed_steps(dit, optimizer, inputs, steps: int, warmup: int) -> list[float]:
    latents, text, mask = inputs
    noise = torch.randn_like(latents)
    sigma = torch.full((1,), 0.7, device=latents.device)
    times = []
    for i in range(warmup + steps):
        start = sync_time()
        loss = flow_matching_loss(dit, latents, noise, sigma, text, mask, 1, autocast_dtype=torch.bfloat16)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(sync_time() - start)
    return times


@torch.no_grad()
def forward_once(dit, inputs) -> torch.Tensor:
    latents, text, mask = inputs
    t = frame_timesteps(torch.full((1,), 0.7, device=latents.device), latents.shape[2], 1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return dit(latents, t, text, mask, num_cond_latents=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=None, help="fewer blocks for a quick check")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    config = DiTConfig() if args.depth is None else DiTConfig(depth=args.depth)
    dit = random_dit(config)
    torch.manual_seed(0)
    inject_lora(dit, rank=32, alpha=32)
    apply_gradient_checkpointing(dit)
    dit.train()
    optimizer = torch.optim.AdamW([p for p in dit.parameters() if p.requires_grad], lr=1e-5)
    inputs = i2v_inputs(latent_shape=LATENTS_512)
    flops = lora_train_flops(config, LATENTS_512)

    outputs, results = {}, {}
    for backend in ("sdpa", "block_sparse"):
        dit.set_attention_backend(backend)
        outputs[backend] = forward_once(dit, inputs).float()
        torch.cuda.reset_peak_memory_stats()
        times = timed_steps(dit, optimizer, inputs, args.steps, args.warmup)
        results[backend] = {
            "step_s": min(times),
            "step_times_s": times,
            "peak_allocated_gib": gib(torch.cuda.max_memory_allocated()),
        }
    dense, sparse = outputs["sdpa"], outputs["block_sparse"]
    payload = {
        "benchmark": "lora_train_step_block_sparse",
        "setting": {"latents": list(LATENTS_512), "token_grid": [24, 32, 52], "num_cond_latents": 1,
                    "depth": config.depth, "lora_rank": 32, "checkpointing": "full", "sparsity": config.bsa_sparsity},
        "results": results,
        "speedup_vs_dense": results["sdpa"]["step_s"] / results["block_sparse"]["step_s"],
        "dense_model_tflop": flops["model"] / 1e12,
        "forward_output_rel_l2_vs_dense": float((sparse - dense).norm() / dense.norm()),
        "forward_output_max_abs_vs_dense": float((sparse - dense).abs().max()),
    }
    name = "train_step_block_sparse" + ("" if args.depth is None else f"_depth{args.depth}")
    print(write_result(name, payload).read_text())


if __name__ == "__main__":
    main()
