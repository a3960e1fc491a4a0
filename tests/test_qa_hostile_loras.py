"""LoRA files from other tools and models, and hand-written configs, found by QA: each is refused naming the file
and the fix (exit 2, no traceback, nothing written), or loaded at its trained strength."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat_tuner import load_dit, load_lora
from longcat_tuner.cli import main
from longcat_tuner.config.training import TrainConfig
from longcat_tuner.errors import CheckpointError, ConfigError
from longcat_tuner.model import lora_formats as lf
from longcat_tuner.model.lora import lora_modules, remove_lora

R, H, F = 4, 256, 768  # the tiny DiT: hidden 256, ffn.w1 256 -> 768


@pytest.fixture(scope="module")
def dit(tiny_checkpoint):
    return load_dit(tiny_checkpoint)


def _pair(prefix: str, down_in: int, up_out: int, *, a="lora_down", b="lora_up") -> dict[str, torch.Tensor]:
    return {f"{prefix}.{a}.weight": torch.randn(R, down_in), f"{prefix}.{b}.weight": torch.randn(up_out, R)}


def test_split_adapters_that_read_different_input_sizes_are_named(dit, tmp_path, capsys):
    # Wrapper-named q/k/v are merged into attn.qkv: a k of another width was a RuntimeError traceback (torch.cat).
    tensors = {}
    for part, width in (("q", H), ("k", 2 * H), ("v", H)):
        tensors |= _pair(f"diffusion_model.blocks.0.self_attn.{part}", width, H)
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"split adapters for 'blocks.0.attn.qkv' read inputs of different sizes"):
        load_lora(dit, path)
    assert not lora_modules(dit)
    out = tmp_path / "out.safetensors"
    assert main(["export-lora", str(path), str(out)]) == 2
    err = capsys.readouterr().err
    assert "read inputs of different sizes [256, 512]" in err and "Traceback" not in err
    assert not out.exists()


def test_a_peft_adapter_model_takes_its_alpha_from_adapter_config_json(dit, tmp_path, capsys):
    # PEFT's save_pretrained keeps alpha in adapter_config.json, not in the safetensors file: it loaded at alpha = rank
    # (4x too strong here) and export-lora wrote that wrong strength into the converted file.
    folder = tmp_path / "peft"
    folder.mkdir()
    tensors = _pair("base_model.model.blocks.0.attn.proj", H, H, a="lora_A", b="lora_B")
    tensors |= _pair("base_model.model.blocks.0.ffn.w1", H, F, a="lora_A", b="lora_B")
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": R, "lora_alpha": 1, "alpha_pattern": {"ffn.w1": 8}, "target_modules": ["attn.proj"]}))
    load_lora(dit, folder / "adapter_model.safetensors", name="peft")
    try:
        scales = {path: float(a.alpha_scale) for path, a in lora_modules(dit, "peft").items()}
    finally:
        remove_lora(dit)
    assert scales == {"blocks.0.attn.proj": 0.25, "blocks.0.ffn.w1": 2.0}
    out = tmp_path / "comfy.safetensors"
    assert main(["export-lora", str(folder / "adapter_model.safetensors"), str(out)]) == 0
    written = load_file(str(out))
    assert float(written["diffusion_model.blocks.0.self_attn.o.alpha"]) == 1.0
    assert float(written["diffusion_model.blocks.0.ffn.w1.alpha"]) == 8.0
    # A damaged config is named, not guessed around.
    (folder / "adapter_config.json").write_text('{"r": 4, "lora_alpha": "sixteen"}')
    with pytest.raises(CheckpointError, match=r"adapter_config.json .*lora_alpha is 'sixteen'"):
        lf.read_lora_file(folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text("[1]")
    with pytest.raises(CheckpointError, match=r"adapter_config.json .*is not a JSON object"):
        lf.read_lora_file(folder / "adapter_model.safetensors")


KINDS = {
    "dora_peft": ({**_pair("base_model.model.blocks.0.attn.proj", H, H, a="lora_A", b="lora_B"),
                   "base_model.model.blocks.0.attn.proj.lora_magnitude_vector": torch.ones(H)},
                  "This is a DoRA file, not a plain LoRA"),
    "dora_magnitude": ({**_pair("transformer.blocks.0.attn.proj", H, H, a="lora_A", b="lora_B"),
                        "transformer.blocks.0.attn.proj.magnitude": torch.ones(H)}, "This is a DoRA file"),
    "lokr_factored": ({f"lora_unet_blocks_0_attn_proj.lokr_w{i}_{ab}": torch.ones(16, 2) for i in (1, 2) for ab in "ab"},
                      "This is a LoKr \\(LyCORIS\\) file"),
    "wan21": ({**_pair("diffusion_model.blocks.0.self_attn.q", 1536, 1536),
               **_pair("diffusion_model.blocks.0.ffn.0", 1536, 8960)}, "This looks like a Wan 2.1/2.2 LoRA"),
    "wan21_i2v": (_pair("lora_unet_blocks_0_cross_attn_k_img", 5120, 5120), "This looks like a Wan 2.1/2.2 LoRA"),
    "flux": (_pair("lora_unet_double_blocks_0_img_attn_qkv", 3072, 9216), "This looks like a Flux or HunyuanVideo LoRA"),
    "flux_diffusers": (_pair("transformer.single_transformer_blocks.0.attn.to_q", 3072, 3072, a="lora_A", b="lora_B"),
                       "This looks like a Flux or HunyuanVideo LoRA"),
    "sdxl": (_pair("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 640, 640),
             "This looks like a Stable Diffusion 1.x/2.x/SDXL LoRA"),
    "whole_model": ({"blocks.0.attn.qkv.weight": torch.ones(3 * H, H), "blocks.0.attn.qkv.bias": torch.ones(3 * H)},
                    "This holds a model's own weights .*not a LoRA"),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_other_adapter_kinds_and_other_models_are_named_as_such(tmp_path, kind):
    # They were all "N keys match no known LongCat LoRA layout ... Is this a LoRA for another model?", a LongCat
    # DoRA or LoKr file included.
    tensors, message = KINDS[kind]
    path = tmp_path / f"{kind}.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=message) as err:
        lf.read_lora_file(path)
    assert str(path) in str(err.value)
    if kind != "whole_model":
        assert "another model?" not in str(err.value)


def _bigger_model_lora(tmp_path):
    path = tmp_path / "longcat_512.safetensors"  # a LongCat LoRA for a model of hidden size 512
    save_file(_pair("diffusion_model.blocks.0.attn.proj", 2 * H, 2 * H), str(path))
    return path


def test_sample_refuses_a_lora_of_another_model_size_before_loading_the_models(tiny_checkpoint, tmp_path, capsys,
                                                                             monkeypatch):
    # The sizes were compared only after the text encoder had run and the DiT had loaded (minutes on the real model).
    import longcat_tuner.encoders as encoders

    class NotLoaded:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise AssertionError("a model was loaded before the LoRA sizes were checked")

    monkeypatch.setattr(encoders, "TextEncoder", NotLoaded)
    path = _bigger_model_lora(tmp_path)
    out = tmp_path / "o.mp4"
    argv = ["sample", "--model", str(tiny_checkpoint), "--prompt", "x", "--frames", "5", "--resolution", "64x64",
            "--steps", "1", "--output", str(out), "--lora", str(path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "LoRA shapes for 'blocks.0.attn.proj' (down (4, 512)" in err and "do not fit the layer [256, 256]" in err
    assert not out.exists()


def test_train_names_an_init_lora_that_cannot_start_this_run_before_the_data(tiny_checkpoint, tmp_path, capsys):
    # Another model's size, or layers outside lora_targets, were refused only after caching and model loading.
    def run(init_lora, **extra):
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"pretrained_model_name_or_path": str(tiny_checkpoint),
                                      "output_dir": str(tmp_path / "run"), "init_lora": str(init_lora),
                                      "data_backend_config": str(tmp_path / "datasets.json"), **extra}))
        return main(["train", "--config", str(config)])  # datasets.json does not exist: the LoRA is named first

    assert run(_bigger_model_lora(tmp_path)) == 2
    assert "do not fit the layer [256, 256]" in capsys.readouterr().err
    outside = tmp_path / "ffn.safetensors"
    save_file(_pair("diffusion_model.blocks.0.ffn.w1", H, F), str(outside))
    assert run(outside, lora_targets=["attn.qkv"]) == 2
    assert "have no trainable adapter here (blocks.0.ffn.w1); add their layers to lora_targets" in capsys.readouterr().err


def test_config_refuses_empty_loss_sigmas_and_nul_in_paths(tmp_path):
    base = {"pretrained_model_name_or_path": str(tmp_path / "model"), "output_dir": str(tmp_path / "run"),
            "data_backend_config": str(tmp_path / "datasets.json")}
    # [] was accepted and every validation then failed with "ZeroDivisionError: float division by zero".
    with pytest.raises(ConfigError, match=r"validation_loss_sigmas: empty list; give at least one sigma"):
        TrainConfig.from_dict({**base, "validation_loss_sigmas": []})
    # JSON "\u0000" in a path was accepted, then `check` and `train` failed with "ValueError: embedded null byte".
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**base, "output_dir": "run\u0000x"}))
    with pytest.raises(ConfigError, match=r"output_dir: contains a NUL character"):
        TrainConfig.from_file(config)
