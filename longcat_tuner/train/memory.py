"""Memory options applied to the DiT from outside (the model knows nothing of training).

Gradient checkpointing wraps each block's `forward` with `torch.utils.checkpoint`, which the model's
contract allows (blocks take tensors and plain Python values only). Block swap and low-precision base
weights live in `block_swap.py` and `quantize.py`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint


_WRAPPED_ATTR = "_longcat_checkpointed_forward"


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        # Only recompute when a backward pass will need it; sampling under no_grad runs plainly.
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


def apply_gradient_checkpointing(dit: torch.nn.Module) -> int:
    """Recompute every DiT block in backward instead of storing its activations; returns the count."""
    blocks = getattr(dit, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise TypeError("gradient checkpointing needs `dit.blocks` as an nn.ModuleList (docs/CONTRACTS.md)")
    for block in blocks:
        if getattr(block, _WRAPPED_ATTR, None) is None:
            original = block.forward
            setattr(block, _WRAPPED_ATTR, original)
            block.forward = _checkpointed(original)
    return len(blocks)


def remove_gradient_checkpointing(dit: torch.nn.Module) -> None:
    for block in dit.blocks:
        original = getattr(block, _WRAPPED_ATTR, None)
        if original is not None:
            block.forward = original
            setattr(block, _WRAPPED_ATTR, None)
