"""Checkpoint loading: official layout, shards, errors, and the full 13.6B parameter count."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat_tuner import load_dit
from longcat_tuner.errors import CheckpointError
from longcat_tuner.model.config import DiTConfig
from longcat_tuner.model.loading import build_dit


def test_full_config_parameter_count_and_names():
    model = build_dit(DiTConfig(), device="meta")
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == 1022
    assert sum(p.numel() for p in model.parameters()) == 13_581_071_424
    assert "blocks.47.cross_attn.kv_linear.weight" in names
    assert dict(model.named_parameters())["x_embedder.proj.weight"].shape == (4096, 16, 1, 2, 2)
    assert DiTConfig().ffn_hidden_size == 11008


def test_root_and_dit_folder_both_load(tiny_checkpoint):
    a = load_dit(tiny_checkpoint)
    b = load_dit(tiny_checkpoint / "dit")
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_sharded_checkpoint_with_index(tiny_checkpoint, tmp_path, dit_cases):
    state = load_file(str(tiny_checkpoint / "dit" / "diffusion_pytorch_model.safetensors"))
    folder = tmp_path / "ckpt" / "dit"
    folder.mkdir(parents=True)
    shutil.copy(tiny_checkpoint / "dit" / "config.json", folder / "config.json")
    names = sorted(state)
    weight_map = {}
    for i in range(3):
        shard = f"diffusion_pytorch_model-0000{i + 1}-of-00003.safetensors"
        save_file({n: state[n] for n in names[i::3]}, str(folder / shard))
        weight_map.update({n: shard for n in names[i::3]})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    dit = load_dit(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert dit.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert not any(p.is_meta for p in dit.parameters())
    with torch.no_grad():
        out = load_dit(tmp_path / "ckpt")(dit_cases["x"], dit_cases["t2v_timestep"],
                                          dit_cases["encoder_hidden_states"], dit_cases["encoder_attention_mask"])
    torch.testing.assert_close(out, dit_cases["t2v_out"], atol=1e-4, rtol=1e-4)


def test_missing_shard_is_named(tiny_checkpoint, tmp_path):
    folder = tmp_path / "dit"
    folder.mkdir()
    shutil.copy(tiny_checkpoint / "dit" / "config.json", folder / "config.json")
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x_embedder.proj.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="00001-of-00002"):
        load_dit(folder)


def test_missing_and_unexpected_keys_are_listed(tiny_checkpoint, tmp_path):
    state = load_file(str(tiny_checkpoint / "dit" / "diffusion_pytorch_model.safetensors"))
    state.pop("blocks.1.ffn.w2.weight")
    state["blocks.1.ffn.w4.weight"] = torch.zeros(1)
    folder = tmp_path / "dit"
    folder.mkdir()
    shutil.copy(tiny_checkpoint / "dit" / "config.json", folder / "config.json")
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_dit(tmp_path)
    message = str(err.value)
    assert "blocks.1.ffn.w2.weight" in message and "blocks.1.ffn.w4.weight" in message and str(folder) in message


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(CheckpointError, match="official layout"):
        load_dit(tmp_path)


def test_a_size_the_patch_does_not_divide_names_the_pixel_multiple_of_this_checkpoint():
    from longcat_tuner.errors import ShapeError

    # A DiT with 4x4 patches needs pixel sizes in multiples of 32, not the release's 16: 48x80 px -> 6x10 latents.
    dit = build_dit(DiTConfig(hidden_size=32, depth=1, num_heads=2, caption_channels=8, adaln_tembed_dim=8,
                              patch_size=(1, 4, 4)), device="cpu")
    with pytest.raises(ShapeError, match=r"6x10 must be divisible by the patch size 1x4x4: use pixel heights divisible "
                                         r"by 32 and widths by 32"):
        dit.token_grid((1, 16, 2, 6, 10))
