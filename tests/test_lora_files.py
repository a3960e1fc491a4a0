"""LoRA injection and files: official LongCat keys, the ComfyUI-WanVideoWrapper layout (and its `comfyui` alias), round trips and errors."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from longcat_tuner import inject_lora, load_dit, load_lora, save_lora
from longcat_tuner.errors import CheckpointError, ConfigError
from longcat_tuner.model.lora import DEFAULT_TARGETS, lora_modules, merge_lora, remove_lora


def _run(dit, cases):
    with torch.no_grad():
        return dit(cases["x"], cases["i2v_timestep"], cases["encoder_hidden_states"],
                   cases["encoder_attention_mask"], num_cond_latents=1)


def _randomize(dit):
    with torch.no_grad():
        for adapter in lora_modules(dit).values():
            adapter.up.normal_(0, 0.05)


def test_injected_lora_starts_as_identity_and_trains_only_adapters(tiny_checkpoint, dit_cases):
    dit = load_dit(tiny_checkpoint)
    added = inject_lora(dit, rank=4, alpha=2)
    assert len(added) == len(DEFAULT_TARGETS) * 2
    assert added["blocks.0.attn.qkv"].parts == 3 and added["blocks.0.cross_attn.kv_linear"].parts == 2
    trainable = [n for n, p in dit.named_parameters() if p.requires_grad]
    assert trainable and all("lora_adapters" in n for n in trainable)
    torch.testing.assert_close(_run(dit, dit_cases), dit_cases["i2v_out"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["official", "comfyui-wanvideowrapper", "comfyui"])
def test_save_and_reload_reproduces_adapted_model(tiny_checkpoint, dit_cases, tmp_path, fmt):
    dit = load_dit(tiny_checkpoint)
    inject_lora(dit, rank=4, alpha=8)
    _randomize(dit)
    expected = _run(dit, dit_cases)
    path = save_lora(dit, tmp_path / f"lora-{fmt}.safetensors", format=fmt)
    fresh = load_dit(tiny_checkpoint)
    load_lora(fresh, path)
    torch.testing.assert_close(_run(fresh, dit_cases), expected, atol=1e-5, rtol=1e-5)
    assert (expected - dit_cases["i2v_out"]).abs().max() > 1e-3


def test_official_key_names(tiny_checkpoint, tmp_path):
    # The official LoRAs (cfg_step_lora, the fixture) target every block linear except cross_attn.proj.
    dit = load_dit(tiny_checkpoint)
    inject_lora(dit, rank=4, alpha=2, targets=[t for t in DEFAULT_TARGETS if t != "cross_attn.proj"])
    path = save_lora(dit, tmp_path / "l.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert float(f.get_tensor(
            "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv.alpha_scale")) == 0.5
    with safe_open(str(tiny_checkpoint / "lora" / "tiny_lora.safetensors"), "pt") as f:
        official = set(f.keys())
    assert keys == official


def test_multiplier_and_merge(tiny_checkpoint, dit_cases):
    base = _run(load_dit(tiny_checkpoint), dit_cases)
    lora_path = tiny_checkpoint / "lora" / "tiny_lora.safetensors"
    dit = load_dit(tiny_checkpoint)
    load_lora(dit, lora_path, multiplier=0.0)
    torch.testing.assert_close(_run(dit, dit_cases), base, atol=1e-6, rtol=0)
    remove_lora(dit)
    load_lora(dit, lora_path)
    merge_lora(dit)
    assert not lora_modules(dit)
    torch.testing.assert_close(_run(dit, dit_cases), dit_cases["i2v_lora_out"], atol=1e-4, rtol=1e-4)


def test_bad_targets_and_foreign_files(tiny_checkpoint, tmp_path):
    dit = load_dit(tiny_checkpoint)
    with pytest.raises(ConfigError, match="match no linear"):
        inject_lora(dit, rank=4, targets=["attn.qkvv"])
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0.lora_up.weight": torch.zeros(8, 4)}, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(CheckpointError, match="another model"):
        load_lora(dit, tmp_path / "sdxl.safetensors")
