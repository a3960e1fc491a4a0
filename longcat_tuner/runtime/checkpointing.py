"""Gradient checkpointing of the DiT blocks, applied from outside (the model knows nothing of training).

Each mode is a wrapper of a block's `forward` built by `checkpointed_forward` (plain `torch.utils.checkpoint`
here; the selective and host-offloaded variants in `selective_checkpoint.py`), which the model's contract
allows (blocks take tensors and plain Python values only). `longcat_tuner.runtime.apply` composes it with
torch.compile and block swap; `apply_gradient_checkpointing` is its plain mode on a whole model (tests,
notebooks), through the same `apply_runtime`.
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
    """Recompute every DiT block in backward instead of storing its activations; returns the count.

    `apply_runtime` with `MemorySettings(checkpointing="full")` on the model's own device.
    """
    from longcat_tuner.runtime.apply import apply_runtime, model_device
    from longcat_tuner.runtime.settings import MemorySettings

    return len(apply_runtime(dit, MemorySettings(checkpointing="full"), model_device(dit)).recomputed)


def remove_gradient_checkpointing(dit: torch.nn.Module) -> None:
    """Undo any checkpointing wrapper (found by its mark) on every block."""
    from longcat_tuner.runtime.apply import _restore

    for block in dit.blocks:
        original = getattr(block, CHECKPOINT_ATTR, None)
        if original is not None:
            _restore(block, original)


def checkpointed_forward(forward: Callable[..., Any], mode: str, *, save_attention: bool = True,
                         stream: Optional[Any] = None) -> Callable[..., Any]:
    """`forward` wrapped for one checkpointing mode (`full`, `keep_attention`, `offload_inputs`).

    `save_attention` (keep_attention): this block keeps its attention outputs (else it recomputes them, as
    `full`); `stream` (offload_inputs): the CUDA side stream of the input copies (None on the CPU).
    """
    if mode == "full":
        return _checkpointed(forward)
    if mode == "keep_attention":
        from longcat_tuner.runtime.selective_checkpoint import selective_forward

        return selective_forward(forward, save_attention)
    if mode == "offload_inputs":
        from longcat_tuner.runtime.selective_checkpoint import offloaded_forward

        return offloaded_forward(forward, stream)
    raise ConfigError(f"gradient_checkpointing_mode '{mode}' is unknown; use full, keep_attention or offload_inputs")
