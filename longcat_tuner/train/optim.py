"""Optimizer and learning-rate schedule construction from a few plain values."""
from __future__ import annotations

from typing import Iterable

import torch

from longcat_tuner.errors import ConfigError


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    *,
    kind: str,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (optimizer states in 8 bits: ~4x less optimizer memory)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("no trainable parameters: check lora_targets (they match no layer of the DiT)")
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if kind == "adamw8bit":
        try:
            import bitsandbytes  # noqa: PLC0415 - optional dependency
        except ImportError:
            raise ConfigError(
                "optimizer 'adamw8bit' needs bitsandbytes: `pip install bitsandbytes`, or set optimizer to 'adamw'"
            ) from None
        return bitsandbytes.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    raise ConfigError(f"optimizer {kind!r} is not supported; use 'adamw' or 'adamw8bit'")


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, *, name: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' schedules (`constant`, `constant_with_warmup`, `linear`, `cosine`) over optimizer steps."""
    from diffusers.optimization import get_scheduler

    if name not in ("constant", "constant_with_warmup", "linear", "cosine"):
        raise ConfigError(f"lr_scheduler {name!r} is not supported; use constant, constant_with_warmup, linear or cosine")
    if name == "constant" and warmup_steps:
        name = "constant_with_warmup"  # a warmup the user asked for is never silently ignored
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(total_steps, 1))
