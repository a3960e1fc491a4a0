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
