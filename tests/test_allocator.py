"""The CUDA allocator setting (`runtime/allocator.py`) and the trainer's memory peaks around validation."""
from __future__ import annotations

import os
import types

import pytest
import torch

from longcat_tuner.runtime import allocator

KEYS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


@pytest.fixture
def clean_env(monkeypatch):
    """Neither allocator variable set; whatever a test sets is undone afterwards."""
    for key in KEYS:
        monkeypatch.setenv(key, "x")  # recorded as absent-or-prior, restored at teardown
        monkeypatch.delenv(key)
    return monkeypatch


def test_parsing_and_precedence():
    assert allocator.parse_expandable("expandable_segments:True")
    assert allocator.parse_expandable("max_split_size_mb:128, expandable_segments:true")
    assert not allocator.parse_expandable("expandable_segments:False")
    assert not allocator.parse_expandable("expandable_segments:True,expandable_segments:False")  # the last wins
    assert not allocator.parse_expandable("max_split_size_mb:128") and not allocator.parse_expandable(None)
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "PYTORCH_ALLOC_CONF": "expandable_segments:False"}
    assert allocator.user_setting(env) == "expandable_segments:False"  # the device-generic name wins
    assert allocator.user_setting({"PYTORCH_ALLOC_CONF": "  "}) is None
    assert allocator.would_use_expandable({}) and not allocator.would_use_expandable(env)


def test_default_is_set_only_when_the_user_set_nothing():
    env: dict[str, str] = {}
    assert allocator.use_default_allocator(env) is True
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}
    assert allocator.use_default_allocator(mine) is False and mine == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}
    other = {"PYTORCH_ALLOC_CONF": "garbage_collection_threshold:0.8"}
    assert allocator.use_default_allocator(other) is False and "PYTORCH_CUDA_ALLOC_CONF" not in other


def test_nothing_is_set_once_cuda_has_started(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    env: dict[str, str] = {}
    assert allocator.use_default_allocator(env) is False and env == {}  # too late: the allocator has its setting


def test_commands_set_it_before_cuda_starts(clean_env, tmp_path):
    """`cache` (and `train`, `sample`) set the allocator first thing, even when they then fail on the config."""
    from longcat_tuner.cli import main

    assert main(["cache", "--config", str(tmp_path / "missing.json")]) != 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_train_sets_it_before_anything_else(clean_env, monkeypatch, tmp_path):
    from longcat_tuner.train import trainer

    calls = []
    monkeypatch.setattr(trainer, "use_default_allocator", lambda: calls.append("allocator"))

    def strategy(config):
        calls.append("parallel")
        raise RuntimeError("stop here")

    monkeypatch.setattr(trainer, "parallel_strategy", strategy)
    with pytest.raises(RuntimeError, match="stop here"):
        trainer.train(types.SimpleNamespace())
    assert calls == ["allocator", "parallel"]


def test_validation_is_measured_from_a_clean_allocator(monkeypatch):
    """`MemoryPeaks.phase`: the cache is handed back before and after, the phase's peaks are its own, and the
    run's peaks still count what came before the phase."""
    from longcat_tuner.train.trainer import MemoryPeaks

    state = {"allocated": 40 * 2**30, "reserved": 46 * 2**30}
    calls = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))

    def reset(device=None):
        calls.append("reset")
        state.update(allocated=0, reserved=0)

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    peaks = MemoryPeaks(torch.device("cuda", 0))
    assert peaks.read() == {"peak_mem_gib": 40.0, "peak_reserved_gib": 46.0}
    with peaks.phase() as phase:
        assert calls == ["empty_cache", "reset"]
        state.update(allocated=12 * 2**30, reserved=14 * 2**30)  # what validation itself used
    assert calls == ["empty_cache", "reset", "empty_cache"]
    assert phase == {"peak_mem_gib": 12.0, "peak_reserved_gib": 14.0}
    assert peaks.read() == {"peak_mem_gib": 40.0, "peak_reserved_gib": 46.0}  # the run's, training included
    state.update(allocated=41 * 2**30, reserved=43 * 2**30)  # a later step above the earlier peak
    assert peaks.read() == {"peak_mem_gib": 41.0, "peak_reserved_gib": 46.0}


def test_peaks_are_none_off_cuda():
    from longcat_tuner.train.trainer import MemoryPeaks

    peaks = MemoryPeaks(torch.device("cpu"))
    with peaks.phase() as phase:
        pass
    assert phase == {"peak_mem_gib": None, "peak_reserved_gib": None} == peaks.read()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_expandable_segments_respect_the_memory_fraction():
    """On a real GPU (in a fresh process: the allocator reads its setting once): with expandable segments the
    per-process memory fraction still stops an allocation beyond the cap."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "torch.cuda.set_per_process_memory_fraction(4 * 2**30 / torch.cuda.get_device_properties(0).total_memory, 0)\n"
        "x = torch.empty(3 * 2**30, dtype=torch.uint8, device='cuda')\n"
        "try:\n"
        "    y = torch.empty(2 * 2**30, dtype=torch.uint8, device='cuda')\n"
        "    print('NOT-ENFORCED', torch.cuda.memory_reserved() / 2**30)\n"
        "except torch.OutOfMemoryError:\n"
        "    print('ENFORCED')\n"
    )
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ENFORCED" in out.stdout and "NOT-ENFORCED" not in out.stdout, out.stdout + out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_validation_phase_on_a_real_gpu():
    """`MemoryPeaks.phase` on CUDA: the phase's peak is its own allocation, the run's peak keeps the earlier
    one, and the cache is handed back afterwards."""
    from longcat_tuner.train.trainer import MemoryPeaks

    device = torch.device("cuda", torch.cuda.current_device())
    peaks = MemoryPeaks(device)
    big = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
    del big  # freed but cached: the training step's activations
    before, cached = peaks.read(), torch.cuda.memory_reserved(device)
    with peaks.phase() as phase:
        assert torch.cuda.memory_reserved(device) <= cached - 512 * 2**20  # the cache was handed back first
        inside = torch.cuda.memory_reserved(device)
        small = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
        del small
    allocated_before = torch.cuda.memory_allocated(device) / 2**30  # tensors other tests may still hold
    assert allocated_before + 64 / 1024 <= phase["peak_mem_gib"] + 1e-6 < allocated_before + 512 / 1024
    assert peaks.read()["peak_mem_gib"] >= before["peak_mem_gib"] >= 512 / 1024
    assert torch.cuda.memory_reserved(device) <= inside  # and handed back again afterwards
