"""Float8 attention, a probe (measured and not kept in the product): dense softmax attention over e4m3 Q, K, V,
forward only, a Triton kernel. `bench/bench_fp8_attention.py` times it against cuDNN's bf16 attention.

It was built as `sample --attention fp8` (2026-12-07) and measured on an H100 at the sampling shape: the kernel ran
at 630-636 TFLOP/s against cuDNN bf16's 588-595, and with the quantization (in torch ops) the call was 0.89x
cuDNN's speed; a compiled CFG sampling step took 6.84 s against 6.79 s in bf16, with 6.8% relative error per
attention output against bf16's 0.2%. It did not win, so the product keeps bf16 attention; this file keeps the
experiment reproducible (`tests/test_bench_fp8_attention.py` checks it through Triton's interpreter). README
"Sampling" has the figures.

Quantization, in plain torch ops:

* K is centred first (the mean key over the call's tokens is subtracted, per batch and head): every score of a
  query row moves by the same `q . mean`, which softmax removes, and the keys' shared offset no longer eats the
  8-bit range (the smoothing SageAttention uses).
* Q and K get one scale per token (amax over the head dimension / 448, e4m3's largest value); the kernel applies
  them to the fp32 scores as a row and a column factor.
* V gets one scale per channel (amax over the tokens), applied to the output columns after the loop; it is stored
  transposed, [B, H, D, N], so the second product reads it K-major as Hopper's float8 MMA wants.
* P, the exponentials, is rounded to e4m3 for the second product, offset so the row maximum is 2^8 instead of 1:
  e4m3's subnormals then reach 2^-17 of the row maximum rather than 2^-9, so the many small weights of a
  37,440-key row are not flushed to zero. The row sums are kept in fp32 and carry the same offset, which cancels.

The kernel is an FA2-style loop (online softmax in base 2) with fp32 accumulation; one program per (query tile,
batch * head). Float8 tensor cores need compute capability 8.9 (Ada) or newer; CPU tensors run through Triton's
interpreter (slow, tests only).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from longcat_tuner.errors import ShapeError
from longcat_tuner.model.block_sparse_triton import LOG2E, _as_fp32, _launcher, _max_combine, _sum_combine

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
P_OFFSET_LOG2 = 8.0  # exponentials are computed as 2^(s - max + 8): the row maximum of P is 256, below 448
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256

# Launch settings (bench/bench_fp8_attention.py --sweep, one H100, 37,440 keys, 32 heads of 128).
KERNEL_CONFIG: dict[str, int] = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "EXP16": 0}
# Under Triton's interpreter (CPU tests): small tiles, so ragged edges are exercised at test sizes.
INTERPRETER_CONFIG: dict[str, int] = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}


def fp8_attention_supported(head_dim: int) -> tuple[bool, str]:
    """Whether the kernel takes this head dimension (and why not)."""
    if head_dim < MIN_HEAD_DIM or head_dim > MAX_HEAD_DIM or head_dim & (head_dim - 1):
        return False, (f"fp8 attention takes a head dimension that is a power of two from {MIN_HEAD_DIM} to "
                       f"{MAX_HEAD_DIM}, got {head_dim}")
    return True, ""


def fp8_device_error(device: torch.device | str) -> str | None:
    """Why float8 attention cannot run on `device` (None when it can; CPU runs Triton's interpreter)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if torch.cuda.get_device_capability(device) < (8, 9):
        return (f"fp8 attention needs float8 tensor cores (compute capability 8.9 or newer: Ada, Hopper), which "
                f"{torch.cuda.get_device_name(device)} lacks")
    return None


@triton.jit
def _fp8_key_tile(acc, l_i, m_i, q, q_scale, k_base, ks_base, v_base, start, cols, n_k, stride_kn,
                  P_OFFSET: tl.constexpr, MASKED: tl.constexpr, ROUND_FIRST: tl.constexpr, EXP16: tl.constexpr):
    """One key tile of the online softmax: (acc, l_i, m_i) updated. MASKED: the tile runs past the last key."""
    keys = start + cols
    if MASKED:
        key_ok = keys < n_k
        k = tl.load(k_base + keys[:, None].to(tl.int64) * stride_kn, mask=key_ok[:, None], other=0.0)
        k_scale = tl.load(ks_base + keys, mask=key_ok, other=0.0)
        v = tl.load(v_base + keys[:, None], mask=key_ok[:, None], other=0.0)
    else:
        k = tl.load(k_base + keys[:, None].to(tl.int64) * stride_kn)
        k_scale = tl.load(ks_base + keys)
        v = tl.load(v_base + keys[:, None])
    # Scores in base 2: dequantised by the row (query) and column (key) scales, softmax scale folded in.
    s = tl.dot(q, tl.trans(k)) * q_scale[:, None] * k_scale[None, :]
    if MASKED:
        s = tl.where(key_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))
    alpha = tl.exp2(m_i - m_new)
    if EXP16:
        # Half the special-function work: two exponentials per instruction in fp16 (P <= 2^8 fits; it is rounded
        # to e4m3 next). GPU only (inline PTX); the row sums stay fp32.
        x = (s - (m_new[:, None] - P_OFFSET)).to(tl.float16)
        p = tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x], dtype=tl.float16, is_pure=True,
                                      pack=2)
        l_i = l_i * alpha + tl.reduce(p.to(tl.float32), 1, _sum_combine)
    else:
        p = tl.exp2(s - (m_new[:, None] - P_OFFSET))
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
    if ROUND_FIRST:
        # Triton's interpreter converts to float8 wrongly when rounding carries into the exponent (31.6 -> 16,
        # not 32): round to e4m3's 4 significant bits in fp32 first (Veltkamp's split), so the conversion is
        # exact. On the GPU the conversion is the hardware's, round to nearest.
        t = p * 1048577.0  # 2^20 + 1: keeps the top 24 - 20 = 4 bits
        p = t - (t - p)
    acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), v)
    return acc, l_i, m_new


@triton.jit
def _fp8_attention_fwd_kernel(
    Q, QS, K, KS, VT, VS, O,
    stride_qz, stride_qh, stride_qn,
    stride_kz, stride_kh, stride_kn,
    stride_vz, stride_vh, stride_vd,
    stride_oz, stride_oh, stride_on,
    num_heads, n_q, n_k, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, P_OFFSET: tl.constexpr,
    EVEN_M: tl.constexpr, ROUND_FIRST: tl.constexpr, EXP16: tl.constexpr,
):
    pid_m = tl.program_id(0)
    zh = tl.program_id(1)
    z = (zh // num_heads).to(tl.int64)
    h = (zh % num_heads).to(tl.int64)
    qk_scale = _as_fp32(qk_scale)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < n_q
    q_ptrs = Q + z * stride_qz + h * stride_qh + rows[:, None].to(tl.int64) * stride_qn + dims[None, :]
    qs_ptrs = QS + zh.to(tl.int64) * n_q + rows
    if EVEN_M:
        q = tl.load(q_ptrs)
        q_scale = tl.load(qs_ptrs) * qk_scale
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        q_scale = tl.load(qs_ptrs, mask=row_ok, other=0.0) * qk_scale
    k_base = K + z * stride_kz + h * stride_kh + dims[None, :]
    ks_base = KS + zh.to(tl.int64) * n_k
    # V^T [D, N]: a [BLOCK_N, D] tile whose tokens are contiguous (K-major for the P @ V product).
    v_base = VT + z * stride_vz + h * stride_vh + dims[None, :].to(tl.int64) * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)
    # Whole key tiles without masks, then the partial last one (37,440 keys are 292.5 tiles of 128).
    n_whole = (n_k // BLOCK_N) * BLOCK_N
    for start in range(0, n_whole, BLOCK_N):
        acc, l_i, m_i = _fp8_key_tile(acc, l_i, m_i, q, q_scale, k_base, ks_base, v_base, start, cols, n_k,
                                      stride_kn, P_OFFSET, False, ROUND_FIRST, EXP16)
    if n_whole < n_k:
        acc, l_i, m_i = _fp8_key_tile(acc, l_i, m_i, q, q_scale, k_base, ks_base, v_base, n_whole, cols, n_k,
                                      stride_kn, P_OFFSET, True, ROUND_FIRST, EXP16)

    v_scale = tl.load(VS + zh.to(tl.int64) * HEAD_DIM + dims)
    acc = acc * (v_scale[None, :] / l_i[:, None])
    o_ptrs = O + z * stride_oz + h * stride_oh + rows[:, None].to(tl.int64) * stride_on + dims[None, :]
    if EVEN_M:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty))
    else:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])


def _per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in e4m3, fp32 scale per token [B, H, N] contiguous) with x ~= x8 * scale[..., None]."""
    scale = (x.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (x / scale).to(FP8), scale.squeeze(-1).contiguous()


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Q, K and V as the kernel takes them (see the module docstring): (q8, q_scale, k8, k_scale, v8 transposed
    [B, H, D, Nk], v_scale [B, H, D]), every scale fp32."""
    qf, kf, vf = q.float(), k.float(), v.float()
    kf = kf - kf.mean(dim=2, keepdim=True)
    q8, q_scale = _per_token(qf)
    k8, k_scale = _per_token(kf)
    v_scale = (vf.abs().amax(dim=2, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    vt8 = (vf / v_scale).to(FP8).transpose(-1, -2).contiguous()
    return q8, q_scale, k8, k_scale, vt8, v_scale.squeeze(2).contiguous()


def fp8_attention_forward(q8: torch.Tensor, q_scale: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor,
                          vt8: torch.Tensor, v_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for the quantized inputs of `quantize`; [B, H, Nq, D] in `out_dtype`."""
    batch, heads, n_q, head_dim = q8.shape
    n_k = k8.shape[2]
    config = dict(KERNEL_CONFIG if q8.is_cuda else INTERPRETER_CONFIG)
    block_m, block_n, exp16 = config.pop("BLOCK_M"), config.pop("BLOCK_N"), bool(config.pop("EXP16", 0))
    o = torch.empty(q8.shape, device=q8.device, dtype=out_dtype)
    _launcher(_fp8_attention_fwd_kernel, q8.device)[(triton.cdiv(n_q, block_m), batch * heads)](
        q8, q_scale, k8, k_scale, vt8, v_scale, o,
        *q8.stride()[:3], *k8.stride()[:3], *vt8.stride()[:3], *o.stride()[:3],
        heads, n_q, n_k, LOG2E / math.sqrt(head_dim),
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, P_OFFSET=P_OFFSET_LOG2,
        EVEN_M=n_q % block_m == 0, ROUND_FIRST=not q8.is_cuda, EXP16=exp16 and q8.is_cuda, **config,
    )
    return o


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Float8 softmax attention, scale 1/sqrt(D); q [B, H, Nq, D], k and v [B, H, Nk, D]; output like q's dtype.

    Forward only: refuses inputs that need a gradient (train with bf16 attention)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError("fp8 attention has no backward (a forward-only probe)")
    ok, why = fp8_attention_supported(q.shape[-1])
    if not ok:
        raise ShapeError(why)
    if q.is_cuda and (why := fp8_device_error(q.device)):
        raise ShapeError(why)
    q8, q_scale, k8, k_scale, vt8, v_scale = quantize(q, k, v)
    return fp8_attention_forward(q8, q_scale, k8, k_scale, vt8, v_scale, q.dtype)


def emulated_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in torch (fp32): the same quantization of Q, K, V and of P (offset from the
    row's global maximum, where the kernel uses the running one). The yardstick of the kernel's tests."""
    q8, q_scale, k8, k_scale, vt8, v_scale = quantize(q, k, v)
    scores = (q8.float() @ k8.float().transpose(-1, -2)) * q_scale[..., :, None] * k_scale[..., None, :]
    scores = scores * (LOG2E / math.sqrt(q.shape[-1]))
    p = torch.exp2(scores - (scores.amax(dim=-1, keepdim=True) - P_OFFSET_LOG2))
    out = (p.to(FP8).float() @ vt8.float().transpose(-1, -2)) * v_scale[..., None, :] / p.sum(-1, keepdim=True)
    return out.to(q.dtype)
