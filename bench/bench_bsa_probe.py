"""Diagnostic benchmark: where the block-sparse forward kernel's time goes at 168,960 tokens (GPU only).

Issue 14 asks for a forward <= 0.065 s at 48x44x80 tokens (32 heads of 128, bf16, sparsity 0.9375: each
64-token query block reads 165 of 2,640 key blocks). This script runs the forward kernel's loop in variants
that each remove one part of the work, on the same selection, and prints one JSON object:

* `product`: the product's operator (`block_sparse_triton.block_sparse_forward`);
* mode 0: the same loop (a copy of the product kernel without the ragged-block masks), per launch setting;
  `ws`: the loop under Triton's automatic warp specialization (`tl.range(warp_specialize=True)`);
* mode 1: no softmax (p = s): the two products and the loads;
* mode 2: the loads only (K and V tiles summed, no products): the data-movement floor;
* mode 3: products and softmax on one K/V tile loaded before the loop: the compute floor;
* `tma`: the full loop with K/V tiles read by TMA as [1, 4, 4, 4, 128] boxes of a 5-D descriptor.

`tflops_equiv` divides the full kernel's FLOPs by each variant's time; `kv_bytes_TBps` is the K/V bytes the
loop reads (2 x 64 x 128 x 2 bytes per selected block) over the time.

    python bench/bench_bsa_probe.py --out bench/results/bsa_probe-$(date +%F)-h100.json
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import longcat_tuner.model.block_sparse_triton as K  # noqa: E402
from longcat_tuner.model.block_sparse_triton import _block_rows  # noqa: E402
from longcat_tuner.model.block_sparse import select_key_blocks  # noqa: E402
from bench_attention import time_cuda  # noqa: E402  (median of CUDA-event timings after a warm-up call)

@triton.jit
def _softmax_step(q, k, v, m_i, l_i, acc, qk_scale):
    """One key tile of the forward's online softmax in base 2 (as the product kernel, without masks)."""
    s = tl.dot(q, tl.trans(k))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def probe_fwd(Q, KK, V, O, KV_IDX, stride_qh, stride_qn, stride_kh, stride_kn,
              q_t, q_h, q_w, q_nbh, q_nbw, n_q_blocks, n_selected, qk_scale,
              BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr,
              MODE: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr):
    q_block = tl.program_id(0)
    zh = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    q_tok, q_valid = _block_rows(q_block, rows, q_t, q_h, q_w, q_nbh, q_nbw, CT, CH, CW)
    q = tl.load(Q + zh * stride_qh + q_tok[:, None] * stride_qn + dims[None, :])
    k_base = KK + zh * stride_kh + dims[None, :]
    v_base = V + zh * stride_kh + dims[None, :]
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK, BLOCK_D], 0.0, dtype=tl.float32)
    idx_ptr = KV_IDX + (zh * n_q_blocks + q_block) * n_selected
    k0_tok, _ = _block_rows(tl.load(idx_ptr), rows, q_t, q_h, q_w, q_nbh, q_nbw, CT, CH, CW)
    k0 = tl.load(k_base + k0_tok[:, None] * stride_kn)
    v0 = tl.load(v_base + k0_tok[:, None] * stride_kn)
    for j in tl.range(0, n_selected, num_stages=STAGES, warp_specialize=WS):
        if MODE == 3:
            k = k0
            v = v0
        else:
            k_block = tl.load(idx_ptr + j)
            k_tok, _ = _block_rows(k_block, rows, q_t, q_h, q_w, q_nbh, q_nbw, CT, CH, CW)
            k = tl.load(k_base + k_tok[:, None] * stride_kn)
            v = tl.load(v_base + k_tok[:, None] * stride_kn)
        if MODE == 2:
            acc += k.to(tl.float32) + v.to(tl.float32)
        elif MODE == 1:
            s = tl.dot(q, tl.trans(k))
            acc += tl.dot(s.to(v.dtype), v)
        else:
            m_i, l_i, acc = _softmax_step(q, k, v, m_i, l_i, acc, qk_scale)
    if MODE == 0 or MODE == 3:
        acc = acc / l_i[:, None]
    tl.store(O + zh * stride_qh + q_tok[:, None] * stride_qn + dims[None, :], acc.to(O.dtype.element_ty))


@triton.jit
def probe_tma(Q, k_desc, v_desc, O, KV_IDX, stride_qh, stride_qn,
              q_t, q_h, q_w, q_nbh, q_nbw, n_q_blocks, n_selected, qk_scale,
              BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr,
              STAGES: tl.constexpr):
    q_block = tl.program_id(0)
    zh = tl.program_id(1)
    rows = tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    q_tok, q_valid = _block_rows(q_block, rows, q_t, q_h, q_w, q_nbh, q_nbw, CT, CH, CW)
    q = tl.load(Q + zh.to(tl.int64) * stride_qh + q_tok[:, None] * stride_qn + dims[None, :])
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK, BLOCK_D], 0.0, dtype=tl.float32)
    idx_ptr = KV_IDX + (zh.to(tl.int64) * n_q_blocks + q_block) * n_selected
    for j in tl.range(0, n_selected, num_stages=STAGES):
        kb = tl.load(idx_ptr + j)
        bt = kb // (q_nbh * q_nbw)
        bh = (kb // q_nbw) % q_nbh
        bw = kb % q_nbw
        k = tl.reshape(k_desc.load([zh, bt * CT, bh * CH, bw * CW, 0]), [BLOCK, BLOCK_D])
        v = tl.reshape(v_desc.load([zh, bt * CT, bh * CH, bw * CW, 0]), [BLOCK, BLOCK_D])
        m_i, l_i, acc = _softmax_step(q, k, v, m_i, l_i, acc, qk_scale)
    acc = acc / l_i[:, None]
    tl.store(O + zh.to(tl.int64) * stride_qh + q_tok[:, None] * stride_qn + dims[None, :], acc.to(O.dtype.element_ty))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_bsa_probe needs a CUDA device", file=sys.stderr)
        return 2
    grid, heads, d, sparsity, chunk = (48, 44, 80), 32, 128, 0.9375, (4, 4, 4)
    g = torch.Generator(device="cuda").manual_seed(0)
    n = math.prod(grid)
    q, k, v = (torch.randn(1, heads, n, d, device="cuda", generator=g).bfloat16() for _ in range(3))
    idx = select_key_blocks(q, k, grid, grid, sparsity=sparsity)
    kv_idx = idx.to(torch.int32).reshape(heads, idx.shape[2], idx.shape[3]).contiguous()
    nqb, nsel = kv_idx.shape[1], kv_idx.shape[2]
    flops = 4.0 * heads * nqb * nsel * 64 * 64 * d
    out = torch.empty_like(q)
    geom = K._geometry(grid, chunk)
    rows = []
    ref = K.block_sparse_forward(q, k, v, kv_idx, list(grid), list(grid), list(chunk))[0]
    rows.append({"variant": "product", "s": time_cuda(lambda: K.block_sparse_forward(q, k, v, kv_idx, list(grid), list(grid), list(chunk)))})
    print(json.dumps(rows[-1]), flush=True)
    for mode in (0, 1, 2, 3):
        for ws in (False, True):
            for warps, stages in ((4, 3), (4, 2), (8, 3)):
                if ws and mode != 0:
                    continue
                def call():
                    probe_fwd[(nqb, heads)](q, k, v, out, kv_idx, q.stride(1), q.stride(2), k.stride(1), k.stride(2),
                                            *geom, nqb, nsel, (1 / math.sqrt(d)) * K.LOG2E, BLOCK_D=d, BLOCK=64,
                                            CT=4, CH=4, CW=4, MODE=mode, WS=ws, STAGES=stages, num_warps=warps)
                try:
                    t0 = time.time(); call(); torch.cuda.synchronize()
                    row = {"mode": mode, "ws": ws, "warps": warps, "stages": stages, "s": time_cuda(call),
                           "compile_s": round(time.time() - t0, 1)}
                    if mode == 0:
                        row["max_err"] = (out.float() - ref.float()).abs().max().item()
                except Exception as exc:  # noqa
                    row = {"mode": mode, "ws": ws, "warps": warps, "stages": stages, "error": str(exc)[:300]}
                if "s" in row:
                    row["tflops_equiv"] = round(flops / row["s"] / 1e12, 1)
                    row["kv_bytes_TBps"] = round(heads * nqb * nsel * 2 * 64 * d * 2 / row["s"] / 1e12, 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
        T, H, W = grid
        descs = [TensorDescriptor(x, [heads, T, H, W, d], [n * d, H * W * d, W * d, d, 1], [1, 4, 4, 4, d]) for x in (k, v)]
        for warps, stages in ((4, 3), (4, 2), (8, 3)):
            def call():
                probe_tma[(nqb, heads)](q, descs[0], descs[1], out, kv_idx, q.stride(1), q.stride(2), *geom, nqb, nsel,
                                        (1 / math.sqrt(d)) * K.LOG2E, BLOCK_D=d, BLOCK=64, CT=4, CH=4, CW=4,
                                        STAGES=stages, num_warps=warps)
            try:
                call(); torch.cuda.synchronize()
                row = {"mode": "tma", "warps": warps, "stages": stages, "s": time_cuda(call),
                       "max_err": (out.float() - ref.float()).abs().max().item()}
                row["tflops_equiv"] = round(flops / row["s"] / 1e12, 1)
            except Exception as exc:  # noqa
                row = {"mode": "tma", "warps": warps, "stages": stages, "error": str(exc)[:400]}
            rows.append(row); print(json.dumps(row), flush=True)
    except Exception as exc:  # noqa
        print("tma setup failed", exc)
    report = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "rows": rows}
    print(json.dumps(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
