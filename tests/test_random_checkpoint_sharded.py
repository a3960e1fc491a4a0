"""Sharded random checkpoints (the full-size benchmark's writer) load through the real loaders."""
from __future__ import annotations

import json

import torch

from longcat_tuner.model.config import DiTConfig
from longcat_tuner.model.loading import load_dit
from longcat_tuner.model.random_checkpoint import write_dit_sharded, write_text_encoder_sharded


def test_sharded_dit_loads_and_every_shard_is_listed(tmp_path):
    config = DiTConfig(hidden_size=64, depth=3, num_heads=4, caption_channels=32, adaln_tembed_dim=32)
    files = write_dit_sharded(tmp_path / "dit", config, num_shards=3, device="cpu", seed=1)
    assert len(files) == 3 and all(f.is_file() for f in files)
    index = json.loads((tmp_path / "dit" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    dit = load_dit(tmp_path, dtype=torch.float32)
    assert len(dit.blocks) == 3
    assert set(index["weight_map"]) == set(dit.state_dict())
    norms = [p for n, p in dit.named_parameters() if n.endswith("norm.weight")]
    assert all(torch.isfinite(p).all() for p in dit.parameters())
    assert not norms or all((p.float() - 1).abs().max() < 1 for p in norms)


def test_sharded_text_encoder_loads_with_transformers(tmp_path):
    from transformers import UMT5EncoderModel

    files = write_text_encoder_sharded(tmp_path, vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                       num_heads=4, num_shards=2, device="cpu", dtype=torch.float32)
    assert len(files) == 2
    model = UMT5EncoderModel.from_pretrained(tmp_path)
    out = model(input_ids=torch.tensor([[5, 6, 1]])).last_hidden_state
    assert out.shape == (1, 3, 32) and torch.isfinite(out).all()
