"""Optimizers: AdamW and bitsandbytes' 8-bit AdamW (states really in 8 bits, and it trains)."""
from __future__ import annotations

import pytest
import torch

from longcat_tuner.errors import ConfigError
from longcat_tuner.train.optim import build_optimizer


def _fit(kind: str) -> tuple[float, float, torch.optim.Optimizer]:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(128, 128) * 0.1)
    target = torch.randn(128, 128) * 0.1
    optimizer = build_optimizer([weight], kind=kind, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    losses = []
    for _ in range(30):
        loss = (weight - target).pow(2).mean()
        losses.append(float(loss))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses[0], losses[-1], optimizer


def test_adamw_trains():
    first, last, _ = _fit("adamw")
    assert last < 0.2 * first


def test_adamw8bit_keeps_8bit_states_and_trains():
    pytest.importorskip("bitsandbytes")
    first, last, optimizer = _fit("adamw8bit")
    assert last < 0.3 * first
    state = next(iter(optimizer.state.values()))
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8


def test_unknown_optimizer_is_named():
    with pytest.raises(ConfigError, match="'sgdx'"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], kind="sgdx", lr=1e-3, betas=(0.9, 0.99),
                        weight_decay=0.0, eps=1e-8)
