"""Merging LoRA files into the DiT's weights for sampling (`sample --merge-loras`, `merge_lora_adapters`).

A merged LoRA must give what the un-merged (official) application gives, with each weight rounded once from a
float32 sum; 8-bit weights take a merge only before they are stored; `sample` and the sampling benchmark prepare
the DiT through the one `prepare_sampling_dit`.
"""
from __future__ import annotations

import pytest
import torch

from longcat_tuner import load_dit
from longcat_tuner.commands.sample import MERGE_MODES, choose_merge, prepare_sampling_dit, sampling_settings
from longcat_tuner.errors import ConfigError
from longcat_tuner.model import lora_formats
from longcat_tuner.model.lora import attach_lora_adapters, lora_modules, merge_lora, merge_lora_adapters


def _run(dit, cases):
    with torch.no_grad():
        return dit(cases["x"], cases["i2v_timestep"], cases["encoder_hidden_states"],
                   cases["encoder_attention_mask"], num_cond_latents=1)


@pytest.fixture
def official_lora(tiny_checkpoint):
    path = tiny_checkpoint / "lora" / "tiny_lora.safetensors"
    return path, lora_formats.read_lora_file(path)[0]


def _random_lora(dit, seed: int, rank: int = 3) -> dict:
    """Adapters on every block's attn.qkv (3 fused parts) and ffn w2, drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for i in range(len(dit.blocks)):
        for name, parts in (("attn.qkv", 3), ("ffn.w2", 1)):
            linear = dit.get_submodule(f"blocks.{i}.{name}")
            down = torch.randn(parts * rank, linear.in_features, generator=generator) * 0.1
            ups = [torch.randn(linear.out_features // parts, rank, generator=generator) * 0.1 for _ in range(parts)]
            adapters[f"blocks.{i}.{name}"] = lora_formats.Adapter(down, ups, 0.5)
    return adapters


def test_a_merged_official_lora_gives_the_official_lora_output(tiny_checkpoint, dit_cases, official_lora):
    path, adapters = official_lora
    dit = load_dit(tiny_checkpoint)
    before = {n: p.clone() for n, p in dit.named_parameters()}
    assert merge_lora_adapters(dit, adapters, path) == len(adapters)
    assert not lora_modules(dit)  # nothing attached: a forward costs the plain model's
    changed = {n for n, p in dit.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"{m}.weight" for m in adapters}  # exactly the adapted weights, biases untouched
    torch.testing.assert_close(_run(dit, dit_cases), dit_cases["i2v_lora_out"], atol=1e-4, rtol=1e-4)


def test_merged_loras_with_multipliers_match_attached_ones(tiny_checkpoint, dit_cases, official_lora):
    path, official = official_lora
    attached, merged = load_dit(tiny_checkpoint), load_dit(tiny_checkpoint)
    loras = [(path, official, 0.7), ("second.safetensors", _random_lora(merged, 1), -1.5)]
    for i, (source, adapters, multiplier) in enumerate(loras):
        attach_lora_adapters(attached, adapters, source, multiplier=multiplier, name=f"lora{i}")
        merge_lora_adapters(merged, adapters, source, multiplier=multiplier)
    want = _run(attached, dit_cases)
    assert (want - _run(load_dit(tiny_checkpoint), dit_cases)).abs().max() > 1e-2  # the LoRAs do change the output
    torch.testing.assert_close(_run(merged, dit_cases), want, atol=2e-5, rtol=2e-5)


def test_bf16_weights_are_rounded_once_from_a_float32_sum(tiny_checkpoint):
    dit = load_dit(tiny_checkpoint, dtype=torch.bfloat16)
    adapters = _random_lora(dit, 2)
    weight = dit.blocks[0].attn.qkv.weight
    want = (weight.float() + 0.25 * adapters["blocks.0.attn.qkv"].delta()).to(torch.bfloat16)
    merge_lora_adapters(dit, adapters, "x.safetensors", multiplier=0.25)
    assert weight.dtype == torch.bfloat16 and torch.equal(weight, want)


def test_attached_adapters_merge_in_float32_too(tiny_checkpoint):
    dit = load_dit(tiny_checkpoint, dtype=torch.bfloat16)
    adapters = _random_lora(dit, 3)
    attach_lora_adapters(dit, adapters, "x.safetensors", multiplier=2.0, name="x")
    adapter = lora_modules(dit)["blocks.1.ffn.w2"]
    weight = dit.blocks[1].ffn.w2.weight
    want = (weight.float() + adapter.up_matrix().float() @ adapter.down.float() * 2.0 * 0.5).to(torch.bfloat16)
    merge_lora(dit)
    assert not lora_modules(dit) and torch.equal(weight, want)


def test_merging_into_8bit_weights_or_with_a_bad_multiplier_is_refused(tiny_checkpoint, official_lora):
    from longcat_tuner.runtime.quantize import quantize_base_weights

    path, adapters = official_lora
    dit = load_dit(tiny_checkpoint)
    with pytest.raises(ConfigError, match="finite"):
        merge_lora_adapters(dit, adapters, path, multiplier=float("nan"))
    quantize_base_weights(dit, "int8-quanto")
    stored = {n: t.clone() for n, t in dit.state_dict().items()}
    with pytest.raises(ConfigError, match="tiny_lora.safetensors.*8-bit.*before"):
        merge_lora_adapters(dit, adapters, path)
    assert all(torch.equal(t, stored[n]) for n, t in dit.state_dict().items())  # nothing half-merged


def test_choose_merge():
    assert MERGE_MODES == ("auto", "on", "off")
    assert choose_merge("auto", base_precision="no_change", loras=1)[0] is True
    assert choose_merge("auto", base_precision="no_change", loras=0)[0] is False
    merge, why = choose_merge("auto", base_precision="fp8-compute", loras=2)
    assert merge is False and "fp8-compute" in why and "--merge-loras on" in why
    assert choose_merge("on", base_precision="int8-quanto", loras=1) == (
        True, "--merge-loras on: LoRAs folded into the weights before they are stored in 8 bits")
    assert choose_merge("off", base_precision="no_change", loras=1)[0] is False
    with pytest.raises(ConfigError, match="--merge-loras 'yes'"):
        choose_merge("yes", base_precision="no_change", loras=1)


@pytest.mark.parametrize("precision", ["int8-quanto", "fp8-compute"])
def test_prepare_sampling_dit_merges_before_8bit_storage_and_attaches_after(tiny_checkpoint, dit_cases, official_lora,
                                                                              precision):
    path, adapters = official_lora
    settings = sampling_settings(device="cpu", steps=2, guidance=1.0, compile="off", base_precision=precision)
    loras = [(str(path), adapters, 1.0)]

    merged = load_dit(tiny_checkpoint)
    prepare_sampling_dit(merged, settings, "cpu", loras, merge=True)
    assert not lora_modules(merged)
    unmerged = load_dit(tiny_checkpoint)
    prepare_sampling_dit(unmerged, settings, "cpu", loras, merge=False)
    assert set(lora_modules(unmerged)) == set(adapters)
    plain = load_dit(tiny_checkpoint)
    prepare_sampling_dit(plain, settings, "cpu", [], merge=True)

    qkv = "blocks.0.attn.qkv"
    # 8-bit storage of the merged weight, not of the base weight: the LoRA went in before the rounding.
    assert merged.get_submodule(qkv).weight.dtype.itemsize == 1
    assert not torch.equal(merged.get_submodule(qkv).weight, plain.get_submodule(qkv).weight)
    assert torch.equal(unmerged.get_submodule(qkv).weight, plain.get_submodule(qkv).weight)
    want = dit_cases["i2v_lora_out"]
    for dit in (merged, unmerged):  # both within 8-bit rounding of the official LoRA output
        got = _run(dit, dit_cases)
        assert ((got - want).norm() / want.norm()) < 0.05
