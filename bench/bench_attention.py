"""Benchmark block-sparse attention (our Triton kernel) against dense SDPA on LongCat-sized token grids.

Prints one JSON object (and writes it to --out): BSA forward and forward+backward at a 48x44x80 token grid
(168,960 tokens, 32 heads of 128, bf16, batch 1, sparsity 0.9375), dense SDPA forward+backward with the flash
and cuDNN backends chosen explicitly, and LongCat's image-to-video split calls at 24x30x52 tokens (a 1-frame
condition call and a 23-frame noisy call against all 24 frames of keys). `--sweep` also times a few launch
settings per kernel (see `block_sparse_triton.KERNEL_CONFIG`).

    python bench/bench_attention.py --out bench/results/attention-$(date +%F)-h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longcat_tuner.model import block_sparse_triton as kernels  # noqa: E402
from longcat_tuner.model.block_sparse import (  # noqa: E402
    block_layout,
    block_sparse_attention,
    num_selected_blocks,
    pool_blocks,
    select_key_blocks,
)

# Issue 14's targets at 168,960 tokens: 1.5x the official Triton kernel (0.111 s / 0.378 s on an H200), which
# were 0.12 / 0.41 s (parity with it) before.
TARGETS = {"bsa_fwd_s": 0.065, "bsa_fwd_bwd_s": 0.25}


def time_cuda(fn: Callable[[], object], *, warmup: int = 1, repeat: int = 5) -> float:
    """Median seconds per call, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def make_qkv(q_grid, k_grid, heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0, skewed: bool = False):
    """Random q, k, v. skewed: every query block prefers the key blocks of the first 4 frames, so a few key
    blocks are selected by all query blocks and most by none (worst case for the dK/dV pass's balance)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, heads, math.prod(q_grid), head_dim, device="cuda", generator=gen)
    k = torch.randn(1, heads, math.prod(k_grid), head_dim, device="cuda", generator=gen)
    v = torch.randn(1, heads, math.prod(k_grid), head_dim, device="cuda", generator=gen)
    if skewed:
        direction = torch.randn(1, heads, 1, head_dim, device="cuda", generator=gen)
        q += direction
        k[:, :, : 4 * k_grid[1] * k_grid[2]] += 2 * direction
    return tuple(x.to(dtype).requires_grad_(True) for x in (q, k, v))


def bsa_calls(q, k, v, q_grid, k_grid, sparsity: float):
    grad_out = torch.randn_like(q)

    def forward():
        with torch.no_grad():
            return block_sparse_attention(q, k, v, q_grid, k_grid, sparsity=sparsity, impl="triton")

    def forward_backward():
        out = block_sparse_attention(q, k, v, q_grid, k_grid, sparsity=sparsity, impl="triton")
        return torch.autograd.grad(out, (q, k, v), grad_out)

    def selection():
        return select_key_blocks(q, k, q_grid, k_grid, sparsity=sparsity)

    return forward, forward_backward, selection


def sdpa_calls(q, k, v, backend):
    from torch.nn.attention import sdpa_kernel

    grad_out = torch.randn_like(q)

    def forward():
        with torch.no_grad(), sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)

    def forward_backward():
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    return forward, forward_backward


def selection_breakdown(q, k, q_grid, k_grid, sparsity: float, repeat: int) -> dict:
    """Seconds of each gating step: mean pooling, block scores, top-k (sorted and not)."""
    q_layout, k_layout = block_layout(q_grid, device=q.device), block_layout(k_grid, device=k.device)
    with torch.no_grad():
        q_pooled, k_pooled = pool_blocks(q, q_layout), pool_blocks(k, k_layout)
        scores = q_pooled @ k_pooled.transpose(-1, -2)
        topk = num_selected_blocks(k_layout.num_blocks, sparsity)
        return {
            "pool_s": time_cuda(lambda: (pool_blocks(q, q_layout), pool_blocks(k, k_layout)), repeat=repeat),
            "scores_s": time_cuda(lambda: q_pooled @ k_pooled.transpose(-1, -2), repeat=repeat),
            "topk_sorted_s": time_cuda(lambda: torch.topk(scores, topk, dim=-1, sorted=True), repeat=repeat),
            "topk_unsorted_s": time_cuda(lambda: torch.topk(scores, topk, dim=-1, sorted=False), repeat=repeat),
        }


def bsa_flops(q_grid, k_grid, heads: int, head_dim: int, sparsity: float) -> float:
    """Matmul FLOPs of the forward pass counting whole 64-token tiles (4 * rows * cols * head_dim per tile)."""
    n_q, n_k = block_layout(q_grid).num_blocks, block_layout(k_grid).num_blocks
    return 4.0 * heads * n_q * num_selected_blocks(n_k, sparsity) * 64 * 64 * head_dim


def bench_case(
    name, q_grid, k_grid, heads, head_dim, sparsity, *, dense: bool, dense_repeat: int, repeat: int, skewed=False
) -> dict:
    from torch.nn.attention import SDPBackend

    q, k, v = make_qkv(q_grid, k_grid, heads, head_dim, torch.bfloat16, skewed=skewed)
    forward, forward_backward, selection = bsa_calls(q, k, v, q_grid, k_grid, sparsity)
    result: dict = {
        "q_grid": list(q_grid),
        "k_grid": list(k_grid),
        "q_tokens": math.prod(q_grid),
        "k_tokens": math.prod(k_grid),
        "heads": heads,
        "head_dim": head_dim,
        "sparsity": sparsity,
        "selected_key_blocks": num_selected_blocks(block_layout(k_grid).num_blocks, sparsity),
        "key_blocks": block_layout(k_grid).num_blocks,
        "bsa_select_s": time_cuda(selection, repeat=repeat),
        "bsa_select_breakdown": selection_breakdown(q, k, q_grid, k_grid, sparsity, repeat),
        "bsa_fwd_s": time_cuda(forward, repeat=repeat),
        "bsa_fwd_bwd_s": time_cuda(forward_backward, repeat=repeat),
    }
    flops = bsa_flops(q_grid, k_grid, heads, head_dim, sparsity)
    result["bsa_fwd_tflops"] = flops / result["bsa_fwd_s"] / 1e12
    result["bsa_fwd_bwd_tflops"] = 3.5 * flops / result["bsa_fwd_bwd_s"] / 1e12
    if dense:
        for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                dense_fwd, dense_fwd_bwd = sdpa_calls(q, k, v, backend)
                result[f"sdpa_{label}_fwd_s"] = time_cuda(dense_fwd, repeat=dense_repeat)
                result[f"sdpa_{label}_fwd_bwd_s"] = time_cuda(dense_fwd_bwd, repeat=dense_repeat)
            except RuntimeError as exc:  # a backend that refuses these shapes on this build
                result[f"sdpa_{label}_error"] = str(exc).splitlines()[0]
    print(json.dumps({name: result}), file=sys.stderr, flush=True)
    return result


def sweep_configs(q_grid, heads: int, head_dim: int, sparsity: float) -> list[dict]:
    """Time each kernel's candidate launch settings, the others held at their defaults."""
    candidates = {
        "fwd": [(4, 2), (4, 3), (4, 4), (8, 3)],
        "bwd_dkdv": [(4, 1), (4, 2), (4, 3), (8, 2)],
        "bwd_dq": [(4, 1), (4, 2), (4, 3), (8, 2)],
    }
    q, k, v = make_qkv(q_grid, q_grid, heads, head_dim, torch.bfloat16)
    forward, forward_backward, _ = bsa_calls(q, k, v, q_grid, q_grid, sparsity)
    rows, best = [], {}
    for kernel, settings in candidates.items():
        default = dict(kernels.KERNEL_CONFIG[kernel])
        timings = []
        for warps, stages in settings:
            kernels.KERNEL_CONFIG[kernel] = {"num_warps": warps, "num_stages": stages}
            try:
                seconds = time_cuda(forward if kernel == "fwd" else forward_backward, repeat=3)
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for this setting
                rows.append({"kernel": kernel, "num_warps": warps, "num_stages": stages, "error": str(exc)[:200]})
                continue
            rows.append({"kernel": kernel, "num_warps": warps, "num_stages": stages, "seconds": seconds})
            timings.append((seconds, warps, stages))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        kernels.KERNEL_CONFIG[kernel] = default
        if timings:
            _, warps, stages = min(timings)
            best[kernel] = {"num_warps": warps, "num_stages": stages}
    kernels.KERNEL_CONFIG.update(best)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--grid", default="48,44,80", help="T,H,W token grid of the full-size case")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.9375)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dense-repeat", type=int, default=2, help="dense SDPA at 168,960 tokens takes seconds")
    parser.add_argument("--no-dense", action="store_true", help="skip dense SDPA")
    parser.add_argument("--sweep", action="store_true", help="tune num_warps/num_stages per kernel first")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA device", file=sys.stderr)
        return 2

    import triton

    grid = tuple(int(x) for x in args.grid.split(","))
    report: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": "bfloat16",
        "targets": TARGETS,
    }
    if args.sweep:
        report["sweep"] = sweep_configs(grid, args.heads, args.head_dim, args.sparsity)
    report["kernel_config"] = {name: dict(cfg) for name, cfg in kernels.KERNEL_CONFIG.items()}
    common = dict(heads=args.heads, head_dim=args.head_dim, sparsity=args.sparsity, repeat=args.repeat)
    full = bench_case("full", grid, grid, dense=not args.no_dense, dense_repeat=args.dense_repeat, **common)
    full["meets_targets"] = {key: full[key] <= limit for key, limit in TARGETS.items()}
    report["full"] = full
    report["full_skewed_selection"] = bench_case("full_skewed_selection", grid, grid, dense=False, dense_repeat=0,
                                                 skewed=True, **common)
    # LongCat I2V at 24 latent frames of 30x52 tokens: condition queries see the condition frame only,
    # noisy queries see all frames (MODEL.md 1.6); both grids are ragged (T = 1 and 23, H = 30).
    t, h, w = 24, 30, 52
    report["i2v_condition_call"] = bench_case(
        "i2v_condition_call", (1, h, w), (1, h, w), dense=True, dense_repeat=args.repeat, **common
    )
    report["i2v_noisy_call"] = bench_case(
        "i2v_noisy_call", (t - 1, h, w), (t, h, w), dense=True, dense_repeat=args.repeat, **common
    )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
