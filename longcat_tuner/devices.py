"""The one precision rule for weights, encoders and caches when the user sets none.

bf16 on CUDA (as the official demos load every component; half the memory and the disk), fp32 on the CPU
(bf16 matmuls there are slow and lossy). `train`, `cache`, `sample` and validation all ask `default_dtype`,
so a cache built by `cache` is the one `train` expects (the dtype is part of each entry's fingerprint).
"""
from __future__ import annotations

from typing import Union


def default_dtype(device: Union[str, "torch.device"]):  # noqa: F821  (torch is imported when called)
    """torch.bfloat16 for a CUDA device, torch.float32 otherwise."""
    import torch

    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
