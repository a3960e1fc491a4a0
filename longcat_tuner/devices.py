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


def chosen_device(text: "str | None"):
    """`--device` as a torch.device (CUDA when there is one, else the CPU, when not given); a name torch does
    not know, or a CUDA device this machine lacks, is a `ConfigError` naming the flag (not a torch traceback)."""
    import torch

    from longcat_tuner.errors import ConfigError

    if not text:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"--device {text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"--device {text}: torch sees {torch.cuda.device_count()} CUDA device(s) here; use cpu or "
                          "an existing cuda:N")
    return device
