"""Benchmark float8 attention (the probe `bench/fp8_attention_probe.py`) against cuDNN bf16 attention.

The sampling call of LongCat-Video I2V at 480x832x93: noisy queries (23 x 30 x 52 = 35,880 tokens) against the
whole clip's keys (24 x 30 x 52 = 37,440), 32 heads of 128, batch 2 (a CFG pair) and 1 (a distilled step). Per
case: seconds per call (median of CUDA-event timings) of `fp8_attention` (quantization in torch ops included) and
of the kernel alone, cuDNN bf16 (what `sdpa` runs), TFLOP/s (4 * Nq * Nk * D * heads *
batch per call), and the relative error (Frobenius) of both against fp32 attention on the first 1,024 query rows.
`--sweep` also times kernel launch settings (tiles, warps, stages).

    python bench/bench_fp8_attention.py [--sweep] [--out DIR]
    python bench/bench_fp8_attention.py --tiny          # CPU smoke run through Triton's interpreter
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from bench import fp8_attention_probe as fp8  # noqa: E402
from bench.bench_attention import time_cuda  # noqa: E402

H100_BF16_PEAK_TFLOPS = 989.0  # dense bf16; float8 peaks at twice this
CASES = {"cfg_pair": dict(batch=2), "distilled": dict(batch=1)}
NOISY_TOKENS, ALL_TOKENS, HEADS, HEAD_DIM = 23 * 30 * 52, 24 * 30 * 52, 32, 128
TINY = dict(n_q=40, n_k=48, heads=2, head_dim=32)
CHECK_ROWS = 1024


def time_call(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median seconds per call (`bench_attention.time_cuda`; one wall-clock call on the CPU)."""
    if device.type == "cuda":
        return time_cuda(fn, repeat=repeat)
    import time

    fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return round(((got.float() - want).norm() / want.norm()).item(), 5)


def reference_rows(q, k, v, rows: int) -> torch.Tensor:
    """fp32 attention of the first `rows` queries (in slices, to bound the score matrix)."""
    outs = []
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            s = (q[b, h, :rows].float() @ k[b, h].float().T) / math.sqrt(q.shape[-1])
            outs.append(torch.softmax(s, -1) @ v[b, h].float())
    return torch.stack(outs).reshape(q.shape[0], q.shape[1], -1, q.shape[-1])


def run_case(batch: int, n_q: int, n_k: int, heads: int, head_dim: int, device: torch.device, repeat: int,
             sweep: bool) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape_q, shape_k = (batch, heads, n_q, head_dim), (batch, heads, n_k, head_dim)
    # Scores with a spread like a trained model's (not all near zero) and keys with a shared offset.
    q = (1.5 * torch.randn(shape_q, device=device, generator=gen)).to(dtype)
    k = (torch.randn(shape_k, device=device, generator=gen)
         + 0.5 * torch.randn((1, heads, 1, head_dim), device=device, generator=gen)).to(dtype)
    v = torch.randn(shape_k, device=device, generator=gen).to(dtype)
    flop = 4.0 * batch * heads * n_q * n_k * head_dim
    rows = min(CHECK_ROWS, n_q)
    want = reference_rows(q, k, v, rows)
    r: dict = {"batch": batch, "n_q": n_q, "n_k": n_k, "heads": heads, "head_dim": head_dim, "tflop": round(flop / 1e12, 4)}
    with torch.no_grad():
        product = lambda: fp8.fp8_attention(q, k, v)  # noqa: E731
        quantized = fp8.quantize(q, k, v)
        kernel = lambda: fp8.fp8_attention_forward(*quantized, q.dtype)  # noqa: E731
        r["fp8_s"] = time_call(product, device, repeat)
        r["fp8_kernel_s"] = time_call(kernel, device, repeat)
        r["fp8_error"] = relative_error(product()[:, :, :rows], want)
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def cudnn():
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v)

            r["bf16_cudnn_s"] = time_call(cudnn, device, repeat)
            r["bf16_error"] = relative_error(cudnn()[:, :, :rows], want)
            r["fp8_tflops"] = round(flop / r["fp8_s"] / 1e12, 1)
            r["fp8_kernel_tflops"] = round(flop / r["fp8_kernel_s"] / 1e12, 1)
            r["bf16_cudnn_tflops"] = round(flop / r["bf16_cudnn_s"] / 1e12, 1)
            r["speedup_vs_cudnn"] = round(r["bf16_cudnn_s"] / r["fp8_s"], 3)
        if sweep:
            r["sweep"] = sweep_configs(kernel, device, repeat, flop)
    return r


# (BLOCK_M, BLOCK_N, num_warps, num_stages, EXP16): the fastest settings of the 2026-12-07 H100 sweep
# (bench/results/fp8_attention-sweep-2026-12-07c-h100.json), each with fp32 and with packed fp16 exponentials.
SWEEP = [(*tiles, exp16) for tiles in ((64, 128, 4, 3), (64, 128, 4, 2), (128, 128, 8, 3), (128, 128, 8, 2),
                                       (64, 64, 4, 3)) for exp16 in (0, 1)]


def sweep_configs(kernel: Callable[[], torch.Tensor], device: torch.device, repeat: int, flop: float) -> list[dict]:
    saved = dict(fp8.KERNEL_CONFIG)
    rows = []
    try:
        for block_m, block_n, warps, stages, exp16 in SWEEP:
            fp8.KERNEL_CONFIG.update(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, EXP16=exp16)
            entry = dict(fp8.KERNEL_CONFIG)
            try:
                seconds = time_call(kernel, device, repeat)
                entry.update(s=round(seconds, 5), tflops=round(flop / seconds / 1e12, 1))
            except Exception as err:  # a setting that does not compile (shared memory) is reported, not fatal
                entry["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            rows.append(entry)
            print(json.dumps(entry), flush=True)
    finally:
        fp8.KERNEL_CONFIG.clear()
        fp8.KERNEL_CONFIG.update(saved)
    return rows


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run (Triton's interpreter, tiny shapes)")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=None, help="folder for the JSON (default $OUT or bench/results)")
    parser.add_argument("--name", default="fp8_attention")
    args = parser.parse_args(argv)
    if args.tiny:
        device = torch.device("cpu")
        shapes = {"tiny": dict(batch=1, **TINY)}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_fp8_attention.py measures a CUDA GPU; use --tiny for the CPU smoke run")
        device = torch.device("cuda")
        shapes = {name: dict(batch=c["batch"], n_q=NOISY_TOKENS, n_k=ALL_TOKENS, heads=HEADS, head_dim=HEAD_DIM)
                  for name, c in CASES.items()}
    results = {}
    for name, shape in shapes.items():
        results[name] = run_case(**shape, device=device, repeat=args.repeat, sweep=args.sweep and name == "cfg_pair")
        print(json.dumps({name: {k: v for k, v in results[name].items() if k != "sweep"}}), flush=True)
    payload = {"benchmark": "fp8_attention", "kernel_config": dict(fp8.KERNEL_CONFIG),
               "peak_tflops_bf16": H100_BF16_PEAK_TFLOPS, "results": results}
    path = write_result(args.name, payload, args.out)
    print(f"wrote {path}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
