"""Triton kernels for block-sparse attention, forward and backward (written from the semantics in MODEL.md 6).

Tensors stay in (t, h, w) token order: a program computes the token index of each row of its 3-D block from
the grid (`_block_rows`), so there are no permuted copies, and partial edge blocks of ragged grids are row
masks. One key block is one tile, as in the official `_attn_fwd_bsa_varlen_align` path.

* Forward: one program per (query block, batch * head); loops over the selected key block ids with an
  FA2-style online softmax in base 2 (exp2, scores pre-multiplied by scale * log2(e)); writes O and the
  base-2 log-sum-exp per query token.
* Backward: `delta = rowsum(dO * O)`; dK/dV per key block, looping over the query blocks that selected it
  (the transposed key -> query lists, built with one sort); dQ per query block, looping over its key blocks.

Matrix products take the input dtype (bf16/fp16; fp32 stays exact with input_precision "ieee") and
accumulate in fp32. CPU tensors run through Triton's interpreter (slow, for tests only). Triton 3.9's
interpreter miscomputes `tl.dot` on bf16 operands, so CPU tests use fp32/fp16.
"""

from __future__ import annotations

import functools
import math
import types

import torch
import triton
import triton.language as tl

from longcat_tuner.errors import ShapeError
from longcat_tuner.model.block_sparse import FORWARD_OP, MAX_KERNEL_BLOCK_TOKENS, MAX_KERNEL_HEAD_DIM

LOG2E = 1.4426950408889634

# Launch settings per kernel (tuned on an H100 at 168,960 tokens, 32 heads of 128; bench/bench_attention.py --sweep).
KERNEL_CONFIG: dict[str, dict[str, int]] = {
    "fwd": {"num_warps": 4, "num_stages": 3},
    "bwd_dkdv": {"num_warps": 4, "num_stages": 2},
    "bwd_dq": {"num_warps": 4, "num_stages": 3},
}


def check_kernel_shapes(head_dim: int, block_tokens: int) -> None:
    """Raise ShapeError for shapes the kernel cannot tile."""
    if head_dim > MAX_KERNEL_HEAD_DIM:
        raise ShapeError(
            f"block-sparse Triton kernel supports head_dim up to {MAX_KERNEL_HEAD_DIM}, got {head_dim}; "
            "use impl='reference' or the sdpa attention backend"
        )
    if block_tokens > MAX_KERNEL_BLOCK_TOKENS:
        raise ShapeError(
            f"block-sparse Triton kernel takes chunks of at most {MAX_KERNEL_BLOCK_TOKENS} tokens, got {block_tokens}; "
            "use a smaller chunk"
        )


# Reductions go through tl.reduce with combine functions of our own rather than tl.max/tl.sum: those are jit'd
# library functions, which Triton's interpreter can only call when TRITON_INTERPRET was set before triton was
# imported. Each combiner's global name is its function name: torch.compile (inductor) re-emits a user kernel's
# jit'd helpers under their own names, so an alias (say `_max_combine = tl.standard._elementwise_max`) would
# be undefined in the compiled module. Under the interpreter, `_interpreted` swaps in Triton's own combiners,
# which it runs natively (fast numpy path), so CPU tests need no environment setup.
@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _sum_combine(a, b):
    return a + b


# torch.compile (inductor) passes a Python float argument of a user kernel as fp64 (its
# `_use_fp64_for_unbacked_floats`), where a plain launch passes fp32: the forward's running max then changes type
# inside the loop (a compile error) and the backward's score tiles would be computed in fp64. Every scale is cast
# once, at the top of each kernel, so both launches run the same fp32 code.
@triton.jit
def _as_fp32(x):
    return tl.cast(x, tl.float32)


# Our combiners and the library's that the interpreter runs natively (where this Triton has them).
_INTERPRETER_COMBINERS = {"_max_combine": "_elementwise_max", "_sum_combine": "_sum_combine"}


@triton.jit
def _block_rows(block, rows, grid_t, grid_h, grid_w, nb_h, nb_w,
                CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr):
    """Token index (int64, (t, h, w) row-major) of each tile row of `block`, and whether the row is a token.

    Row r of a block is its (r // (CH*CW), r // CW % CH, r % CW) chunk position, so block tiles are read
    straight from the (t, h, w)-ordered tensors: no permuted copies, and partial edge blocks are just masks.
    """
    bt = block // (nb_h * nb_w)
    bh = (block // nb_w) % nb_h
    bw = block % nb_w
    t = bt * CT + rows // (CH * CW)
    h = bh * CH + (rows // CW) % CH
    w = bw * CW + rows % CW
    valid = (rows < CT * CH * CW) & (t < grid_t) & (h < grid_h) & (w < grid_w)
    token = (t.to(tl.int64) * grid_h + h) * grid_w + w
    return token, valid


@triton.jit
def _bsa_fwd_kernel(
    Q, K, V, O, LSE, KV_IDX,
    stride_qz, stride_qh, stride_qn,
    stride_kz, stride_kh, stride_kn,
    stride_vz, stride_vh, stride_vn,
    stride_oz, stride_oh, stride_on,
    q_t, q_h, q_w, q_nbh, q_nbw,
    k_t, k_h, k_w, k_nbh, k_nbw,
    num_heads, n_q_blocks, n_selected, n_q_tokens, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
    CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
):
    q_block = tl.program_id(0)
    zh = tl.program_id(1)
    z = (zh // num_heads).to(tl.int64)
    h = (zh % num_heads).to(tl.int64)
    qk_scale = _as_fp32(qk_scale)
    rows = tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    d_valid = dims < HEAD_DIM
    q_tok, q_valid = _block_rows(q_block, rows, q_t, q_h, q_w, q_nbh, q_nbw, CT, CH, CW)
    q_ptrs = Q + z * stride_qz + h * stride_qh + q_tok[:, None] * stride_qn + dims[None, :]
    if MASKED:
        q = tl.load(q_ptrs, mask=q_valid[:, None] & d_valid[None, :], other=0.0)
    else:
        q = tl.load(q_ptrs)
    k_base = K + z * stride_kz + h * stride_kh + dims[None, :]
    v_base = V + z * stride_vz + h * stride_vh + dims[None, :]

    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK, BLOCK_D], 0.0, dtype=tl.float32)
    idx_ptr = KV_IDX + (zh.to(tl.int64) * n_q_blocks + q_block) * n_selected
    for j in range(n_selected):
        k_block = tl.load(idx_ptr + j)
        k_tok, k_valid = _block_rows(k_block, rows, k_t, k_h, k_w, k_nbh, k_nbw, CT, CH, CW)
        if MASKED:
            kv_mask = k_valid[:, None] & d_valid[None, :]
            k = tl.load(k_base + k_tok[:, None] * stride_kn, mask=kv_mask, other=0.0)
            v = tl.load(v_base + k_tok[:, None] * stride_vn, mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_base + k_tok[:, None] * stride_kn)
            v = tl.load(v_base + k_tok[:, None] * stride_vn)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if MASKED:
            s = tl.where(k_valid[None, :], s, float("-inf"))
        # The scale goes into the max and the exponent (one FMA per score) rather than a separate multiply.
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
        acc = acc * alpha[:, None]
        if IEEE:
            acc += tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = O + z * stride_oz + h * stride_oh + q_tok[:, None] * stride_on + dims[None, :]
    lse_ptrs = LSE + zh.to(tl.int64) * n_q_tokens + q_tok
    if MASKED:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=q_valid[:, None] & d_valid[None, :])
        tl.store(lse_ptrs, m_i + tl.log2(l_i), mask=q_valid)
    else:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty))
        tl.store(lse_ptrs, m_i + tl.log2(l_i))


@triton.jit
def _bsa_bwd_delta_kernel(
    O, DO, DELTA,
    stride_oz, stride_oh, stride_on,
    stride_dz, stride_dh, stride_dn,
    num_heads, n_q_tokens,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """delta = rowsum(dO * O) per query token (plain token order: no blocks needed)."""
    tile = tl.program_id(0)
    zh = tl.program_id(1)
    z = (zh // num_heads).to(tl.int64)
    h = (zh % num_heads).to(tl.int64)
    tok = tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    valid = tok < n_q_tokens
    mask = valid[:, None] & (dims[None, :] < HEAD_DIM)
    o = tl.load(O + z * stride_oz + h * stride_oh + tok[:, None] * stride_on + dims[None, :], mask=mask, other=0.0)
    do = tl.load(DO + z * stride_dz + h * stride_dh + tok[:, None] * stride_dn + dims[None, :], mask=mask, other=0.0)
    delta = tl.reduce(o.to(tl.float32) * do.to(tl.float32), 1, _sum_combine)
    tl.store(DELTA + zh.to(tl.int64) * n_q_tokens + tok, delta, mask=valid)


@triton.jit
def _bsa_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, T_OFFSETS, T_Q_IDX,
    stride_qz, stride_qh, stride_qn,
    stride_kz, stride_kh, stride_kn,
    stride_vz, stride_vh, stride_vn,
    stride_dz, stride_dh, stride_dn,
    stride_dkz, stride_dkh, stride_dkn,
    stride_dvz, stride_dvh, stride_dvn,
    q_t, q_h, q_w, q_nbh, q_nbw,
    k_t, k_h, k_w, k_nbh, k_nbw,
    num_heads, n_k_blocks, n_q_tokens, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
    CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
):
    k_block = tl.program_id(0)
    zh = tl.program_id(1)
    z = (zh // num_heads).to(tl.int64)
    h = (zh % num_heads).to(tl.int64)
    qk_scale, sm_scale = _as_fp32(qk_scale), _as_fp32(sm_scale)
    rows = tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    d_valid = dims < HEAD_DIM
    k_tok, k_valid = _block_rows(k_block, rows, k_t, k_h, k_w, k_nbh, k_nbw, CT, CH, CW)
    k_ptrs = K + z * stride_kz + h * stride_kh + k_tok[:, None] * stride_kn + dims[None, :]
    v_ptrs = V + z * stride_vz + h * stride_vh + k_tok[:, None] * stride_vn + dims[None, :]
    kv_mask = k_valid[:, None] & d_valid[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    q_base = Q + z * stride_qz + h * stride_qh + dims[None, :]
    do_base = DO + z * stride_dz + h * stride_dh + dims[None, :]
    lse_base = LSE + zh.to(tl.int64) * n_q_tokens
    delta_base = DELTA + zh.to(tl.int64) * n_q_tokens

    dk = tl.full([BLOCK, BLOCK_D], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK, BLOCK_D], 0.0, dtype=tl.float32)
    list_id = zh.to(tl.int64) * n_k_blocks + k_block
    start = tl.load(T_OFFSETS + list_id)
    end = tl.load(T_OFFSETS + list_id + 1)
    for t in range(start, end):
        q_block = tl.load(T_Q_IDX + t)
        q_tok, q_valid = _block_rows(q_block, rows, q_t, q_h, q_w, q_nbh, q_nbw, CT, CH, CW)
        if MASKED:
            q_mask = q_valid[:, None] & d_valid[None, :]
            q = tl.load(q_base + q_tok[:, None] * stride_qn, mask=q_mask, other=0.0)
            do = tl.load(do_base + q_tok[:, None] * stride_dn, mask=q_mask, other=0.0)
            lse = tl.load(lse_base + q_tok, mask=q_valid, other=float("inf"))
            delta = tl.load(delta_base + q_tok, mask=q_valid, other=0.0)
        else:
            q = tl.load(q_base + q_tok[:, None] * stride_qn)
            do = tl.load(do_base + q_tok[:, None] * stride_dn)
            lse = tl.load(lse_base + q_tok)
            delta = tl.load(delta_base + q_tok)
        # Transposed tiles (keys along rows) so dK and dV accumulate without transposing the result.
        if IEEE:
            s_t = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale
        else:
            s_t = tl.dot(k, tl.trans(q)) * qk_scale
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:
            p_t = tl.where(k_valid[:, None] & q_valid[None, :], p_t, 0.0)
        if IEEE:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision="ieee")
            dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        else:
            dv += tl.dot(p_t.to(do.dtype), do)
            dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        if IEEE:
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision="ieee")
        else:
            dk += tl.dot(ds_t.to(q.dtype), q)

    dk = dk * sm_scale
    dk_ptrs = DK + z * stride_dkz + h * stride_dkh + k_tok[:, None] * stride_dkn + dims[None, :]
    dv_ptrs = DV + z * stride_dvz + h * stride_dvh + k_tok[:, None] * stride_dvn + dims[None, :]
    if MASKED:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)
    else:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty))
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty))


@triton.jit
def _bsa_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KV_IDX,
    stride_qz, stride_qh, stride_qn,
    stride_kz, stride_kh, stride_kn,
    stride_vz, stride_vh, stride_vn,
    stride_dz, stride_dh, stride_dn,
    stride_dqz, stride_dqh, stride_dqn,
    q_t, q_h, q_w, q_nbh, q_nbw,
    k_t, k_h, k_w, k_nbh, k_nbw,
    num_heads, n_q_blocks, n_selected, n_q_tokens, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
    CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
):
    q_block = tl.program_id(0)
    zh = tl.program_id(1)
    z = (zh // num_heads).to(tl.int64)
    h = (zh % num_heads).to(tl.int64)
    qk_scale, sm_scale = _as_fp32(qk_scale), _as_fp32(sm_scale)
    rows = tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    d_valid = dims < HEAD_DIM
    q_tok, q_valid = _block_rows(q_block, rows, q_t, q_h, q_w, q_nbh, q_nbw, CT, CH, CW)
    q_ptrs = Q + z * stride_qz + h * stride_qh + q_tok[:, None] * stride_qn + dims[None, :]
    do_ptrs = DO + z * stride_dz + h * stride_dh + q_tok[:, None] * stride_dn + dims[None, :]
    lse_ptrs = LSE + zh.to(tl.int64) * n_q_tokens + q_tok
    delta_ptrs = DELTA + zh.to(tl.int64) * n_q_tokens + q_tok
    q_mask = q_valid[:, None] & d_valid[None, :]
    if MASKED:
        q = tl.load(q_ptrs, mask=q_mask, other=0.0)
        do = tl.load(do_ptrs, mask=q_mask, other=0.0)
        lse = tl.load(lse_ptrs, mask=q_valid, other=float("inf"))
        delta = tl.load(delta_ptrs, mask=q_valid, other=0.0)
    else:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    k_base = K + z * stride_kz + h * stride_kh + dims[None, :]
    v_base = V + z * stride_vz + h * stride_vh + dims[None, :]

    dq = tl.full([BLOCK, BLOCK_D], 0.0, dtype=tl.float32)
    idx_ptr = KV_IDX + (zh.to(tl.int64) * n_q_blocks + q_block) * n_selected
    for j in range(n_selected):
        k_block = tl.load(idx_ptr + j)
        k_tok, k_valid = _block_rows(k_block, rows, k_t, k_h, k_w, k_nbh, k_nbw, CT, CH, CW)
        if MASKED:
            kv_mask = k_valid[:, None] & d_valid[None, :]
            k = tl.load(k_base + k_tok[:, None] * stride_kn, mask=kv_mask, other=0.0)
            v = tl.load(v_base + k_tok[:, None] * stride_vn, mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_base + k_tok[:, None] * stride_kn)
            v = tl.load(v_base + k_tok[:, None] * stride_vn)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale
            dp = tl.dot(do, tl.trans(v))
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(k_valid[None, :] & q_valid[:, None], p, 0.0)
        ds = p * (dp - delta[:, None])
        if IEEE:
            dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
        else:
            dq += tl.dot(ds.to(k.dtype), k)

    dq = dq * sm_scale
    dq_ptrs = DQ + z * stride_dqz + h * stride_dqh + q_tok[:, None] * stride_dqn + dims[None, :]
    if MASKED:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=q_mask)
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty))


# Jit'd helpers that kernels call; the interpreter path swaps in their plain Python functions.
@functools.lru_cache(maxsize=None)
def _interpreted(kernel):
    """The kernel under Triton's interpreter, with jit'd helpers replaced by their Python functions
    (a jit'd function can only be called from interpreted code when TRITON_INTERPRET was set at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    fn = kernel.fn
    scope = dict(fn.__globals__)
    for name, value in scope.items():  # every jit'd helper of the kernel's module (bench/fp8_attention_probe.py has its own)
        if isinstance(value, triton.runtime.JITFunction) and value is not kernel:
            scope[name] = value.fn
    for name, library in _INTERPRETER_COMBINERS.items():
        if name in scope:
            scope[name] = getattr(tl.standard, library, scope[name])
    plain = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    return InterpretedFunction(plain)


def _launcher(kernel, device: torch.device):
    """The compiled kernel on CUDA; Triton's interpreter for CPU tensors (tests)."""
    if device.type == "cuda" or not hasattr(kernel, "fn"):
        return kernel
    return _interpreted(kernel)


def _transpose_lists(indices: torch.Tensor, n_k_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key -> query lists from the query -> key selection [ZH, n_q_blocks, topk]: CSR offsets
    [ZH * n_k_blocks + 1] (int64) and the query block ids (int32), grouped by (batch*head, key block).

    Sort + searchsorted rather than bincount, which would synchronize with the GPU to size its output.
    """
    zh, n_q_blocks, n_selected = indices.shape
    key = indices.to(torch.int64) + (torch.arange(zh, device=indices.device) * n_k_blocks)[:, None, None]
    sorted_key, order = torch.sort(key.reshape(-1), stable=True)
    q_ids = (order // n_selected) % n_q_blocks
    bounds = torch.arange(zh * n_k_blocks + 1, device=indices.device, dtype=torch.int64)
    offsets = torch.searchsorted(sorted_key, bounds)
    return offsets, q_ids.to(torch.int32)


def _geometry(grid: tuple[int, int, int], chunk: tuple[int, int, int]) -> tuple[int, int, int, int, int]:
    """(T, H, W, blocks along H, blocks along W): what `_block_rows` needs."""
    return (*grid, -(-grid[1] // chunk[1]), -(-grid[2] // chunk[2]))


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _tiles(q: torch.Tensor, q_grid, k_grid, chunk) -> tuple[int, int, bool, float]:
    """(rows per tile, head-dim tile, whether rows or columns need masks, softmax scale) of a call."""
    head_dim, block_tokens = q.shape[-1], math.prod(chunk)
    block, block_d = max(16, triton.next_power_of_2(block_tokens)), max(16, triton.next_power_of_2(head_dim))
    divisible = all(g % c == 0 for g, c in zip((*q_grid, *k_grid), (*chunk, *chunk)))
    masked = not (divisible and block == block_tokens and block_d == head_dim)
    return block, block_d, masked, 1.0 / math.sqrt(head_dim)


# The kernels as PyTorch operators (torch.library.custom_op) rather than an autograd.Function: an operator is
# one opaque node to torch.compile (no kernel tracing, no graph break) and one op a selective-checkpoint policy
# can name, so `gradient_checkpointing_mode: keep_attention` keeps the forward's output and log-sum-exp
# (`runtime/selective_checkpoint.py`) instead of running the forward kernel again in backward.


@torch.library.custom_op(FORWARD_OP, mutates_args=())
def block_sparse_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor,
                         q_grid: list[int], k_grid: list[int], chunk: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(O like q, base-2 log-sum-exp [batch * heads, Nq] float32) of q over its selected key blocks
    (`kv_idx` [batch * heads, n_q_blocks, topk] int32); q, k, v have contiguous last dimensions."""
    z, heads, n_q_tokens, head_dim = q.shape
    zh, n_q_blocks, n_selected = kv_idx.shape
    block, block_d, masked, sm_scale = _tiles(q, q_grid, k_grid, chunk)
    # Allocated like q, so a [B, N, heads, D]-strided q gives an output the projection reads without a copy.
    o = torch.empty_like(q)
    lse = torch.empty(zh, n_q_tokens, device=q.device, dtype=torch.float32)
    _launcher(_bsa_fwd_kernel, q.device)[(n_q_blocks, zh)](
        q, k, v, o, lse, kv_idx,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        *_geometry(q_grid, chunk), *_geometry(k_grid, chunk),
        heads, n_q_blocks, n_selected, n_q_tokens, sm_scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK=block, CT=chunk[0], CH=chunk[1], CW=chunk[2],
        MASKED=masked, IEEE=q.dtype == torch.float32, **KERNEL_CONFIG["fwd"],
    )
    return o, lse


@block_sparse_forward.register_fake
def _(q, k, v, kv_idx, q_grid, k_grid, chunk):
    return torch.empty_like(q), q.new_empty((kv_idx.shape[0], q.shape[2]), dtype=torch.float32)


@torch.library.custom_op("longcat_tuner::block_sparse_attention_backward", mutates_args=())
def block_sparse_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                          lse: torch.Tensor, kv_idx: torch.Tensor, q_grid: list[int], k_grid: list[int],
                          chunk: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `block_sparse_forward` for the output gradient `grad_out`."""
    z, heads, n_q_tokens, head_dim = q.shape
    zh, n_q_blocks, n_selected = kv_idx.shape
    block, block_d, masked, sm_scale = _tiles(q, q_grid, k_grid, chunk)
    n_k_blocks = math.prod(-(-g // c) for g, c in zip(k_grid, chunk))
    do = _last_dim_contiguous(grad_out)
    geometry = (*_geometry(q_grid, chunk), *_geometry(k_grid, chunk))
    tiles = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK=block, CT=chunk[0], CH=chunk[1], CW=chunk[2],
                 MASKED=masked, IEEE=q.dtype == torch.float32)

    delta = torch.empty_like(lse)
    delta_rows = 64
    _launcher(_bsa_bwd_delta_kernel, q.device)[(triton.cdiv(n_q_tokens, delta_rows), zh)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], heads, n_q_tokens,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=delta_rows,
    )
    # Every token row belongs to exactly one block, whose program writes it: no zero fill needed.
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    offsets, q_ids = _transpose_lists(kv_idx, n_k_blocks)
    _launcher(_bsa_bwd_dkdv_kernel, q.device)[(n_k_blocks, zh)](
        q, k, v, do, dk, dv, lse, delta, offsets, q_ids,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        *geometry, heads, n_k_blocks, n_q_tokens, sm_scale * LOG2E, sm_scale,
        **tiles, **KERNEL_CONFIG["bwd_dkdv"],
    )
    _launcher(_bsa_bwd_dq_kernel, q.device)[(n_q_blocks, zh)](
        q, k, v, do, dq, lse, delta, kv_idx,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        *geometry, heads, n_q_blocks, n_selected, n_q_tokens, sm_scale * LOG2E, sm_scale,
        **tiles, **KERNEL_CONFIG["bwd_dq"],
    )
    return dq, dk, dv


@block_sparse_backward.register_fake
def _(grad_out, q, k, v, o, lse, kv_idx, q_grid, k_grid, chunk):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kv_idx, q_grid, k_grid, chunk = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, kv_idx)
    ctx.mark_non_differentiable(lse)
    ctx.grids = (q_grid, k_grid, chunk)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, o, lse, kv_idx = ctx.saved_tensors
    dq, dk, dv = block_sparse_backward(grad_out, q, k, v, o, lse, kv_idx, *ctx.grids)
    return dq, dk, dv, None, None, None, None


block_sparse_forward.register_autograd(_backward, setup_context=_setup_context)


def triton_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    q_grid: tuple[int, int, int],
    k_grid: tuple[int, int, int],
    chunk: tuple[int, int, int],
) -> torch.Tensor:
    """Block-sparse attention of q [B, heads, Nq, D] over k, v [B, heads, Nk, D], all in (t, h, w) token order.

    indices: [B, heads, n_q_blocks, topk] selected key blocks (any order). Any strides with a contiguous
    last dimension are read in place; the output has q's memory layout.
    """
    check_kernel_shapes(q.shape[-1], math.prod(chunk))
    z, heads = q.shape[:2]
    kv_idx = indices.to(torch.int32).reshape(z * heads, indices.shape[2], indices.shape[3]).contiguous()
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    return block_sparse_forward(q, k, v, kv_idx, list(q_grid), list(k_grid), list(chunk))[0]
