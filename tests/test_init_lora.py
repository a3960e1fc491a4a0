"""`init_lora`: training starts from a LoRA file (any layout) with exactly its delta weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from longcat_tuner import inject_lora, load_dit
from longcat_tuner.config.training import LORA_FILE_FORMATS, TrainConfig
from longcat_tuner.errors import CheckpointError, ConfigError
from longcat_tuner.model.lora import lora_modules, save_lora


def _trained_lora(tiny_checkpoint, rank=4, alpha=2.0, targets=None):
    dit = load_dit(tiny_checkpoint)
    torch.manual_seed(3)
    kwargs = {"targets": targets} if targets else {}
    inject_lora(dit, rank=rank, alpha=alpha, **kwargs)
    with torch.no_grad():
        for adapter in lora_modules(dit).values():
            adapter.up.normal_(0, 0.05)
    return dit


def _config(tmp_path: Path, tiny_checkpoint, **keys) -> TrainConfig:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "pretrained_model_name_or_path": str(tiny_checkpoint), "data_backend_config": "data.json", "output_dir": "out",
        "model_type": "lora", "max_train_steps": 1, **keys,
    }))
    return TrainConfig.from_file(path)


def _output(dit, dit_cases):
    with torch.no_grad():
        return dit(dit_cases["x"], dit_cases["i2v_timestep"], dit_cases["encoder_hidden_states"],
                   dit_cases["encoder_attention_mask"], num_cond_latents=1)


@pytest.mark.parametrize("fmt", LORA_FILE_FORMATS)
def test_training_starts_from_the_files_delta_weights(tiny_checkpoint, dit_cases, tmp_path, fmt):
    from longcat_tuner.train import trainer

    source = _trained_lora(tiny_checkpoint)
    path = save_lora(source, tmp_path / f"start-{fmt}.safetensors", format=fmt)
    config = _config(tmp_path, tiny_checkpoint, lora_rank=8, lora_alpha=16, init_lora=path.name)
    assert Path(config.init_lora) == path  # relative to the config file, as the other paths
    dit = trainer.build_model(config, trainer.choose_precision(config, torch.device("cpu")))
    started, expected = lora_modules(dit), lora_modules(source)
    assert started.keys() == expected.keys()
    for module, adapter in started.items():
        assert adapter.rank == 8 and adapter.down.requires_grad and adapter.up.requires_grad
        torch.testing.assert_close(adapter.delta_weight(), expected[module].delta_weight(), atol=1e-6, rtol=0)
    torch.testing.assert_close(_output(dit, dit_cases), _output(source, dit_cases), atol=1e-5, rtol=1e-5)


def test_a_file_covering_fewer_layers_leaves_the_others_fresh(tiny_checkpoint, tmp_path):
    from longcat_tuner.train import trainer

    source = _trained_lora(tiny_checkpoint, targets=["attn.qkv"])
    path = save_lora(source, tmp_path / "qkv.safetensors")
    config = _config(tmp_path, tiny_checkpoint, lora_rank=4, init_lora=str(path))
    dit = trainer.build_model(config, trainer.choose_precision(config, torch.device("cpu")))
    for module, adapter in lora_modules(dit).items():
        if module.endswith("attn.qkv") and "cross" not in module:
            assert adapter.up.abs().sum() > 0, module
        else:
            assert adapter.up.abs().sum() == 0, module


def test_refusals_name_the_fix(tiny_checkpoint, tmp_path):
    from longcat_tuner.train import trainer

    path = save_lora(_trained_lora(tiny_checkpoint, rank=8), tmp_path / "r8.safetensors")
    config = _config(tmp_path, tiny_checkpoint, lora_rank=4, init_lora=str(path))
    with pytest.raises(CheckpointError, match="set lora_rank >= 8"):
        trainer.build_model(config, trainer.choose_precision(config, torch.device("cpu")))
    config = _config(tmp_path, tiny_checkpoint, lora_rank=8, lora_targets=["ffn.w1"], init_lora=str(path))
    with pytest.raises(CheckpointError, match="lora_targets"):
        trainer.build_model(config, trainer.choose_precision(config, torch.device("cpu")))
    with pytest.raises(ConfigError, match="model_type 'lora'"):
        _config(tmp_path, tiny_checkpoint, model_type="full", init_lora=str(path))
