"""LoRA outputs: official LongCat key names, ComfyUI keys, and exact conversion with `export-lora`."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from longcat_tuner.commands.export_lora import convert_lora_file

TINY = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "longcat-tiny"
pytestmark = pytest.mark.skipif(not TINY.is_dir(), reason=f"tiny reference checkpoint not found at {TINY}")
OFFICIAL_TARGETS = ["attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "ffn.w1", "ffn.w2", "ffn.w3"]


def _keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as handle:
        return set(handle.keys())


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


def _adapted_dit(targets, seed=0):
    from longcat_tuner.model import load_dit
    from longcat_tuner.model.lora import inject_lora

    dit = load_dit(TINY)
    inject_lora(dit, rank=4, alpha=2, targets=targets)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dit.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return dit


def test_official_export_has_official_key_names(tmp_path):
    from longcat_tuner.model.lora import save_lora

    dit = _adapted_dit(OFFICIAL_TARGETS)
    path = save_lora(dit, tmp_path / "lora.safetensors", format="official")
    assert _keys(path) == _keys(TINY / "lora" / "tiny_lora.safetensors")
    tensors = _tensors(path)
    key = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv"
    assert tensors[f"{key}.lora_down.weight"].shape == (3 * 4, 256)
    assert tensors[f"{key}.lora_up.blocks.2.weight"].shape == (256, 4)
    assert float(tensors[f"{key}.alpha_scale"]) == 0.5


def test_export_lora_round_trip_is_exact(tmp_path):
    from longcat_tuner.cli import main
    from longcat_tuner.model.lora import save_lora

    dit = _adapted_dit(["attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear",
                                "cross_attn.proj", "ffn.w1", "ffn.w2", "ffn.w3"])
    official = save_lora(dit, tmp_path / "official.safetensors", format="official")
    assert main(["export-lora", str(official), str(tmp_path / "comfy.safetensors"), "--format", "comfyui"]) == 0
    comfy = _tensors(tmp_path / "comfy.safetensors")
    assert all(k.startswith("diffusion_model.blocks.") for k in comfy)
    expected = save_lora(dit, tmp_path / "direct_comfy.safetensors", format="comfyui")
    direct = _tensors(expected)
    assert comfy.keys() == direct.keys() and all(torch.equal(comfy[k], direct[k]) for k in comfy)
    back = convert_lora_file(tmp_path / "comfy.safetensors", tmp_path / "back.safetensors", format="official")
    original, again = _tensors(official), _tensors(back)
    assert original.keys() == again.keys() and all(torch.allclose(original[k], again[k]) for k in original)


def test_reference_official_lora_converts_and_applies_identically(tmp_path):
    from longcat_tuner.model import load_dit
    from longcat_tuner.model.lora import load_lora

    comfy = convert_lora_file(TINY / "lora" / "tiny_lora.safetensors", tmp_path / "c.safetensors", format="comfyui")
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 2, 4, 4, generator=gen)
    embeds, mask = torch.randn(1, 512, 64, generator=gen), torch.ones(1, 512, dtype=torch.long)
    outputs = []
    for path in (TINY / "lora" / "tiny_lora.safetensors", comfy):
        dit = load_dit(TINY)
        load_lora(dit, path)
        with torch.no_grad():
            outputs.append(dit(latents, torch.tensor([500.0]), embeds, mask))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


def test_dense_fused_lora_converts_to_official_exactly(tmp_path):
    """A dense (not block-diagonal) qkv adapter, as other trainers write it, is kept as one official
    `lora_up.weight` (the official loader infers one part from the keys): same delta, nothing refused."""
    from safetensors.torch import save_file

    down, up = torch.randn(6, 256), torch.randn(768, 6)
    save_file({"diffusion_model.blocks.0.attn.qkv.lora_down.weight": down,
               "diffusion_model.blocks.0.attn.qkv.lora_up.weight": up,
               "diffusion_model.blocks.0.attn.qkv.alpha": torch.tensor(3.0)}, str(tmp_path / "dense.safetensors"))
    out = _tensors(convert_lora_file(tmp_path / "dense.safetensors", tmp_path / "o.safetensors", format="official"))
    key = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv"
    assert set(out) == {f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha_scale"}
    delta = out[f"{key}.lora_up.weight"] @ out[f"{key}.lora_down.weight"] * out[f"{key}.alpha_scale"]
    torch.testing.assert_close(delta, up @ down * 0.5, atol=1e-6, rtol=0)
