"""Loading the DiT from a checkpoint in the official hub layout (`dit/ text_encoder/ tokenizer/ vae/ scheduler/`).

Weights are streamed tensor by tensor from single or sharded safetensors (`*.index.json`) into a model
built on the meta device, so the 13.6B model never exists twice in memory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Union

import torch
import torch.nn as nn
from safetensors import safe_open

from longcat_tuner.errors import CheckpointError
from longcat_tuner.model.config import DiTConfig
from longcat_tuner.model.dit import LongCatDiT

# The torch-free folder helpers live in `inspect` (used by `check`); re-exported here for the loaders.
from longcat_tuner.model.inspect import (  # noqa: F401
    WEIGHTS_NAME,
    find_component,
    find_dit,
    verify_weight_files,
    weight_files,
)

PathLike = Union[str, Path]


def iter_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
        except Exception as err:  # safetensors raises its own error types for truncated files
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(f"cannot read {file}: {err}; the file may be incomplete, download it again") from None


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter):
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = value


def load_state_streaming(
    model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], *, dtype: torch.dtype, device, source: str
) -> None:
    """Assign every tensor into a (meta) model, casting on the way; errors list missing or unexpected keys."""
    expected = dict(model.named_parameters())
    expected.update(dict(model.named_buffers()))
    seen: set[str] = set()
    unexpected: list[str] = []
    for name, value in tensors:
        if name not in expected:
            unexpected.append(name)
            continue
        if tuple(value.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(value.shape)}, the config implies "
                f"{tuple(expected[name].shape)}; config.json and the weights do not belong together"
            )
        _set_tensor(model, name, value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype))
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''})")
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected ({', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''})"
            )
        raise CheckpointError(
            f"{source}: the weights do not match the official LongCat-Video key names: {'; '.join(parts)}. "
            f"Check that the folder holds the complete official checkpoint"
        )


def build_dit(config: DiTConfig, *, device="meta") -> LongCatDiT:
    with torch.device(device):
        return LongCatDiT(config)


def load_dit(
    path: PathLike, *, dtype: torch.dtype = torch.float32, device="cpu", attention_backend: str = "sdpa"
) -> LongCatDiT:
    """Load the DiT from a checkpoint root, its `dit/` folder, a full fine-tune's output_dir or any folder whose
    config.json declares the DiT (`find_dit`; single or sharded safetensors)."""
    folder = find_dit(path)
    config = DiTConfig.from_file(folder / "config.json")
    model = build_dit(config, device="meta")
    # Headers first: a truncated or damaged file is named before any tensor is read.
    files = verify_weight_files(folder)
    load_state_streaming(model, iter_safetensors(files), dtype=dtype, device=device, source=str(folder))
    model.set_attention_backend(attention_backend)
    return model.eval().requires_grad_(False)
