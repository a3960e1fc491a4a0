"""Atomic checkpoints: complete-or-absent folders, pruning, `latest`, disk full, and exact RNG restore."""
from __future__ import annotations

import errno
import random

import pytest
import torch

from longcat_tuner.errors import CheckpointError
from longcat_tuner.train import checkpoint as ckpt


def _save(root, step, value=0.0, **kwargs):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return ckpt.save_checkpoint(
        root, step=step, weights={"w": torch.full((2,), value)}, optimizer_state=optimizer.state_dict(),
        scheduler_state={"last_epoch": step}, trainer_state={"sampler": {"epoch": 0, "position": step}},
        rng_state=ckpt.capture_rng_state({}), **kwargs,
    )


def test_save_is_complete_and_prunes_oldest(tmp_path):
    for step in (2, 4, 6):
        path = _save(tmp_path, step, float(step))
        ckpt.prune_checkpoints(tmp_path, 2, keep=path)
    steps = [s for s, _ in ckpt.list_checkpoints(tmp_path)]
    assert steps == [4, 6]
    loaded = ckpt.load_checkpoint(ckpt.resolve_resume_path("latest", tmp_path))
    assert loaded["state"]["step"] == 6 and float(loaded["weights"]["w"][0]) == 6.0
    assert loaded["state"]["sampler"] == {"epoch": 0, "position": 6}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_incomplete_folder_is_never_latest(tmp_path):
    _save(tmp_path, 2)
    half = tmp_path / ckpt.checkpoint_name(4)
    half.mkdir()
    (half / ckpt.WEIGHTS_FILE).write_bytes(b"partial")
    assert ckpt.resolve_resume_path("latest", tmp_path).name == ckpt.checkpoint_name(2)
    with pytest.raises(CheckpointError, match="missing .*COMPLETE"):
        ckpt.load_checkpoint(half)


def test_disk_full_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    good = _save(tmp_path, 2, 2.0)

    def full_disk(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointError, match="disk is full.*Earlier checkpoints are kept"):
        _save(tmp_path, 4, extra_files={"lora.safetensors": full_disk})
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]
    assert float(ckpt.load_checkpoint(good)["weights"]["w"][0]) == 2.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_resave_same_step_replaces_it(tmp_path):
    _save(tmp_path, 4, 1.0)
    _save(tmp_path, 4, 2.0)
    assert float(ckpt.load_checkpoint(tmp_path / ckpt.checkpoint_name(4))["weights"]["w"][0]) == 2.0


def test_rng_state_round_trip():
    gen = torch.Generator().manual_seed(5)
    state = ckpt.capture_rng_state({"train": gen})
    expected = (torch.rand(3, generator=gen), torch.rand(3), random.random())
    torch.rand(7, generator=gen), torch.rand(2), random.random()
    ckpt.restore_rng_state(state, {"train": gen})
    again = (torch.rand(3, generator=gen), torch.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and torch.equal(expected[1], again[1]) and expected[2] == again[2]


def test_apply_weights_names_mismatches(tmp_path):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match="unexpected.*lora_rank"):
        ckpt.apply_weights(model, {"weight": torch.zeros(2, 3), "bias": torch.zeros(2), "x": torch.zeros(1)},
                           source=tmp_path)
    with pytest.raises(CheckpointError, match="shape"):
        ckpt.apply_weights(model, {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, source=tmp_path)
    with pytest.raises(CheckpointError, match="not a folder"):
        ckpt.resolve_resume_path(str(tmp_path / "nope"), tmp_path)
