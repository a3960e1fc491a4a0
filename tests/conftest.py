"""Shared test fixtures: paths to ../shared (read-only reference data) and the `gpu` marker policy."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference"
TINY = REFERENCE / "longcat-tiny"
PARITY = REFERENCE / "parity"
ASSETS = SHARED / "assets"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not REFERENCE.exists():
        pytest.skip(f"{SHARED} (reference fixtures) is not beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def tiny_checkpoint(shared_dir) -> Path:
    return TINY


@pytest.fixture(scope="session")
def dit_cases(shared_dir):
    from safetensors.torch import load_file

    return load_file(str(PARITY / "dit_cases.safetensors"))


@pytest.fixture(scope="session")
def pipeline_cases(shared_dir):
    from safetensors.torch import load_file

    return load_file(str(PARITY / "pipeline_cases.safetensors"))


def write_paired_workspace(root: Path, *, train_clips: int, eval_clips: int, frames: int, size: int) -> Path:
    """Synthetic paired clips + start frames (a train and a `val` split) and their multidatabackend.json."""
    import json

    from longcat_tuner.commands.demo import dataset_entries, write_split

    clips, starts = write_split(root / "data" / "train", count=train_clips, frames=frames, height=size, width=size, seed=0)
    val_clips, val_starts = write_split(root / "data" / "val", count=eval_clips, frames=frames, height=size, width=size, seed=1)
    resolution = f"{size}x{size}"
    datasets = dataset_entries("train", clips, starts, root / "cache", frames=frames, resolution=resolution)
    datasets += dataset_entries("val", val_clips, val_starts, root / "cache", frames=frames, resolution=resolution)
    (root / "multidatabackend.json").write_text(json.dumps(datasets))
    return root
