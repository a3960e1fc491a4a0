"""Memory options applied to the DiT from outside (the model knows nothing of training).

Gradient checkpointing wraps each block's `forward` with `torch.utils.checkpoint`, which the model's
contract allows (blocks take tensors and plain Python values only). Block swap and low-precision base
weights live in `block_swap.py` and `quantize.py`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

from longcat_tuner.errors import ConfigError


# Marks a checkpointed block (holds its original forward); shared by every checkpointing variant and
# read by block swap, which must know whether a block is recomputed in backward.
CHECKPOINT_ATTR = "_longcat_checkpointed_forward"


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
        if getattr(block, CHECKPOINT_ATTR, None) is None:
            original = block.forward
            setattr(block, CHECKPOINT_ATTR, original)
            block.forward = _checkpointed(original)
    return len(blocks)


def remove_gradient_checkpointing(dit: torch.nn.Module) -> None:
    for block in dit.blocks:
        original = getattr(block, CHECKPOINT_ATTR, None)
        if original is not None:
            block.forward = original
            setattr(block, CHECKPOINT_ATTR, None)


def apply_memory_options(
    dit: torch.nn.Module,
    *,
    gradient_checkpointing: bool,
    mode: str = "full",
    keep_attention_blocks: Optional[int] = None,
    compile_blocks: bool = False,
    compile_scope: str = "block",
) -> None:
    """The config's compute/memory trade-offs, in the order they compose: compile inside, checkpoint outside.

    `compile_scope="checkpointed_block"` (keep_attention only) compiles the checkpointed block as a whole
    instead. Block swap (`block_swap.apply_block_swap`) goes on afterwards: it reads which blocks are
    checkpointed.
    """
    if compile_scope not in ("block", "checkpointed_block"):
        raise ConfigError(f"compile_scope '{compile_scope}' is unknown; use block or checkpointed_block")
    outer = compile_blocks and compile_scope == "checkpointed_block"
    if outer and not (gradient_checkpointing and mode == "keep_attention"):
        raise ConfigError(
            "compile_scope 'checkpointed_block' needs gradient_checkpointing_mode: keep_attention; use compile_scope 'block'"
        )
    if compile_blocks and not outer:
        for block in dit.blocks:
            block.forward = torch.compile(block.forward)
    if not gradient_checkpointing:
        return
    if mode == "full":
        apply_gradient_checkpointing(dit)
    elif mode == "keep_attention":
        from longcat_tuner.train.selective_checkpoint import apply_selective_checkpointing

        apply_selective_checkpointing(dit, save_attention_blocks=keep_attention_blocks, compile_blocks=outer)
    elif mode == "offload_inputs":
        from longcat_tuner.train.selective_checkpoint import apply_offloaded_checkpointing

        apply_offloaded_checkpointing(dit)
    else:
        raise ConfigError(f"gradient_checkpointing_mode '{mode}' is unknown; use full, keep_attention or offload_inputs")
