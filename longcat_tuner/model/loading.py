"""Loading the DiT from a checkpoint in the official hub layout (`dit/ text_encoder/ tokenizer/ vae/ scheduler/`).

Weights are streamed tensor by tensor from single or sharded safetensors (`*.index.json`) into a model
built on the meta device, so the 13.6B model never exists twice in memory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator, Union

import torch
import torch.nn as nn
from safetensors import safe_open

from longcat_tuner.errors import CheckpointError
from longcat_tuner.model.config import DiTConfig
from longcat_tuner.model.dit import LongCatDiT

PathLike = Union[str, Path]
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def find_component(path: PathLike, component: str, marker: str = "config.json") -> Path:
    """`path` may be the checkpoint root or the component folder itself; returns the component folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist: point pretrained_model_name_or_path / --model at a LongCat-Video folder "
            f"in the official layout (dit/ text_encoder/ tokenizer/ vae/ scheduler/)"
        )
    if (path / component / marker).exists():
        return path / component
    if path.name == component and (path / marker).exists():
        return path
    raise CheckpointError(f"{path} has no {component}/{marker}: expected the official layout with a {component}/ folder")


def weight_files(folder: Path, base_name: str = WEIGHTS_NAME) -> list[Path]:
    """The safetensors files of a component: the index's shards, or the single file."""
    index = folder / f"{base_name}.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{folder} is missing shards listed in {index.name}: {', '.join(missing)}")
        return files
    single = folder / base_name
    if single.exists():
        return [single]
    candidates = sorted(folder.glob("*.safetensors"))
    if candidates:
        return candidates
    raise CheckpointError(f"{folder} has no {base_name} (nor an index.json, nor any *.safetensors file)")


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
    """Load the DiT from a checkpoint root or its `dit/` folder (single or sharded safetensors)."""
    folder = find_component(path, "dit")
    config = DiTConfig.from_file(folder / "config.json")
    model = build_dit(config, device="meta")
    load_state_streaming(
        model, iter_safetensors(weight_files(folder)), dtype=dtype, device=device, source=str(folder)
    )
    model.set_attention_backend(attention_backend)
    return model.eval().requires_grad_(False)
