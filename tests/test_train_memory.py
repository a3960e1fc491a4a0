"""The config's checkpointing modes give the same gradients as no checkpointing (tiny model, CPU)."""
from __future__ import annotations

import pytest
import torch

from longcat_tuner import inject_lora, load_dit
from longcat_tuner.errors import ConfigError
from longcat_tuner.model.lora import lora_modules
from longcat_tuner.train.memory import CHECKPOINT_ATTR, apply_memory_options


def _grads(tiny_checkpoint, dit_cases, **options):
    dit = load_dit(tiny_checkpoint)
    torch.manual_seed(0)
    inject_lora(dit, rank=4, alpha=4)
    with torch.no_grad():
        for adapter in lora_modules(dit).values():
            adapter.up.normal_(0, 0.05)
    apply_memory_options(dit, **options)
    out = dit(dit_cases["x"], dit_cases["i2v_timestep"], dit_cases["encoder_hidden_states"],
              dit_cases["encoder_attention_mask"], num_cond_latents=1)
    out[:, :, 1:].pow(2).mean().backward()
    marked = [getattr(b, CHECKPOINT_ATTR, None) is not None for b in dit.blocks]
    return {n: p.grad.clone() for n, p in dit.named_parameters() if p.requires_grad}, marked


@pytest.mark.parametrize("mode", ["full", "keep_attention", "offload_inputs"])
def test_checkpointing_modes_match_plain_backward(tiny_checkpoint, dit_cases, mode):
    expected, plain_marks = _grads(tiny_checkpoint, dit_cases, gradient_checkpointing=False)
    got, marks = _grads(tiny_checkpoint, dit_cases, gradient_checkpointing=True, mode=mode)
    assert not any(plain_marks) and all(marks)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)


def test_unknown_mode_is_named(tiny_checkpoint):
    with pytest.raises(ConfigError, match="'fast'"):
        apply_memory_options(load_dit(tiny_checkpoint), gradient_checkpointing=True, mode="fast")
