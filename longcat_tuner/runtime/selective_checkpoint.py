"""Selective gradient checkpointing: recompute a block in backward, except its attention kernels.

Plain checkpointing (`checkpointing.apply_gradient_checkpointing`) recomputes the whole block, attention
included, and attention is the largest cost at video lengths (37,440 tokens: ~22 TFLOP per block,
forward). Here the block is checkpointed with a PyTorch selective-checkpoint policy that saves the
outputs of the long self-attention SDPA kernel (attention output and its log-sum-exp, ~290 MB per block
at 480x832x93)
and recomputes everything else (projections, norms, RoPE, the FFN), so backward skips one attention
forward per block. Block-sparse attention's forward is an operator of ours
(`longcat_tuner::block_sparse_attention_forward`, `model/block_sparse_triton.py`), kept the same way: its output
and log-sum-exp, the same bytes as SDPA's.

`apply_selective_checkpointing(dit, save_attention_blocks=k)` applies it to the first k blocks (all
by default) and plain checkpointing to the rest, which trades memory for speed in a controlled way. It
marks blocks with the same attribute as `checkpointing.apply_gradient_checkpointing`, so
`checkpointing.remove_gradient_checkpointing` undoes it. The trainer reaches these wrappers through
`checkpointing.checkpointed_forward` (composed by `longcat_tuner.runtime.apply`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from longcat_tuner.model.block_sparse import FORWARD_OP as BLOCK_SPARSE_FORWARD_OP


def _attention_ops() -> set:
    aten = torch.ops.aten
    names = (
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_flash_attention_forward",
        "_efficient_attention_forward",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


# Attention calls with fewer keys are cheap to recompute and are not kept: cross-attention to the 512
# text tokens, and the condition frames' self-attention (one latent frame, 1,560 keys at 480x832).
SAVE_MIN_KEYS = 4096


def _save_attention_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if _is_attention(op) and args[1].shape[-2] >= SAVE_MIN_KEYS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_ATTENTION_OPS = _attention_ops()


def _is_attention(op) -> bool:
    # Our block-sparse forward is matched by name: registering the operator needs Triton, not imported here.
    return op in _ATTENTION_OPS or (getattr(op, "namespace", None) == "longcat_tuner" and op.name() == BLOCK_SPARSE_FORWARD_OP)


def _context_fn():
    return create_selective_checkpoint_contexts(_save_attention_policy)


def selective_forward(forward: Callable[..., Any], save_attention: bool) -> Callable[..., Any]:
    """`forward` checkpointed; with `save_attention` the long self-attention outputs are kept, not recomputed."""
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        if save_attention:
            return checkpoint(forward, *args, use_reentrant=False, context_fn=_context_fn, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_selective_checkpointing(
    dit: torch.nn.Module,
    *,
    save_attention_blocks: Optional[int] = None,
    compile_blocks: bool = False,
) -> int:
    """Checkpoint every block; the first `save_attention_blocks` (None: all) keep their attention outputs.

    `compile_blocks` compiles each checkpointed block forward with `torch.compile` (fuses the float32
    modulation, norm and RoPE element-wise chains; the first step pays the compile time). This is
    `apply_runtime` with `checkpointing="keep_attention"` (compile scope `checkpointed_block`) on the
    model's own device. Returns the number of blocks that keep attention outputs.
    """
    from longcat_tuner.runtime.apply import apply_runtime, model_device
    from longcat_tuner.runtime.settings import MemorySettings

    blocks = len(dit.blocks)
    keep = blocks if save_attention_blocks is None else max(0, min(save_attention_blocks, blocks))
    settings = MemorySettings(checkpointing="keep_attention", keep_attention_blocks=keep, compile_blocks=compile_blocks,
                              compile_scope="checkpointed_block")
    apply_runtime(dit, settings, model_device(dit))
    return keep


# --- checkpointing with the block inputs in pinned host memory -----------------------------------------


class _OffloadedBlock(torch.autograd.Function):
    """Run a block without saving anything on the GPU; keep its input hidden state in pinned host memory.

    Backward copies the input back, recomputes the block with grad enabled and back-propagates through
    it (adapter gradients accumulate inside, as in reentrant checkpointing). Only `x` may need a
    gradient: the text and timestep embeddings come from frozen layers.
    """

    @staticmethod
    def forward(ctx, x, forward, stream, rest, kwargs):
        with torch.no_grad():
            out = forward(x, *rest, **kwargs)
        if x.is_cuda:
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                host.copy_(x, non_blocking=True)
            x.record_stream(stream)  # the allocator keeps x's memory until the copy is done
        else:
            host = x.detach().clone()
        ctx.host, ctx.device, ctx.forward, ctx.rest, ctx.kwargs = host, x.device, forward, rest, kwargs
        ctx.stream = stream
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.stream is not None:
            torch.cuda.current_stream(ctx.device).wait_stream(ctx.stream)  # the forward copy has landed
        x = ctx.host.to(ctx.device, non_blocking=True).requires_grad_(True)
        with torch.enable_grad():
            out = ctx.forward(x, *ctx.rest, **ctx.kwargs)
        torch.autograd.backward(out, grad_out)
        return x.grad, None, None, None, None


def offloaded_forward(forward: Callable[..., Any], stream) -> Callable[..., Any]:
    """`forward` checkpointed with its input hidden state kept in pinned host memory until backward."""
    @functools.wraps(forward)
    def run(x: torch.Tensor, *rest: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(x, *rest, **kwargs)
        if any(isinstance(r, torch.Tensor) and r.requires_grad for r in rest):
            raise RuntimeError("offloaded checkpointing supports gradients for the hidden state only")
        if not x.requires_grad:
            # The first block's input comes from frozen layers; the Function needs a differentiable input
            # so that backward reaches the adapters inside (as reentrant checkpointing does).
            x = x.detach().requires_grad_(True)
        return _OffloadedBlock.apply(x, forward, stream, rest, kwargs)

    return run


def apply_offloaded_checkpointing(dit: torch.nn.Module) -> int:
    """Checkpoint every block and keep its input hidden state in pinned host memory until backward.

    Saves the ~0.3 GB per block (14 GB over 48 blocks at 480x832x93) that plain checkpointing keeps on
    the GPU, for one host-to-device copy per block in backward. Composes with block swap. This is
    `apply_runtime` with `checkpointing="offload_inputs"` on the model's own device; returns the number
    of blocks.
    """
    from longcat_tuner.runtime.apply import apply_runtime, model_device
    from longcat_tuner.runtime.settings import MemorySettings

    return len(apply_runtime(dit, MemorySettings(checkpointing="offload_inputs"), model_device(dit)).recomputed)
