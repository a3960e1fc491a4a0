"""`longcat-tuner export-lora IN OUT --format official|comfyui`: convert a LoRA file between key schemes.

Works on the tensors alone (no model needed). Official LongCat files keep fused projections as
block-diagonal adapters (`lora_up.blocks.j`) with a per-module `alpha_scale`; ComfyUI (kohya-style) files
hold the equivalent rank-`n*r` adapter with a block-diagonal up matrix and `alpha = alpha_scale * n*r`.
Both directions are exact.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from longcat_tuner.errors import CheckpointError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-lora",
        help="convert a LoRA between the official LongCat format and ComfyUI keys",
        description="Convert a LoRA file (official LongCat, ComfyUI/kohya or PEFT keys) to another key scheme.",
    )
    parser.add_argument("input", type=Path, help="LoRA .safetensors file to convert")
    parser.add_argument("output", type=Path, help="where to write the converted file")
    parser.add_argument("--format", choices=("official", "comfyui"), default="comfyui", help="output key scheme")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = convert_lora_file(args.input, args.output, format=args.format)
    print(f"wrote {path} ({args.format} format)")
    return 0


def _split_block_diagonal(up: torch.Tensor, parts: int, rank: int, module: str, source: Path) -> list[torch.Tensor]:
    """Blocks of a block-diagonal `[out, parts*rank]` matrix; off-diagonal entries must be zero."""
    rows = up.shape[0] // parts
    blocks = []
    for j in range(parts):
        band = up[j * rows : (j + 1) * rows]
        block = band[:, j * rank : (j + 1) * rank]
        rest = torch.cat([band[:, : j * rank], band[:, (j + 1) * rank :]], dim=1)
        if rest.numel() and float(rest.abs().max()) > 0:
            raise CheckpointError(
                f"{source}: the up matrix of '{module}' is not block-diagonal, so it cannot be written in the "
                "official LongCat format (which stores fused projections per part); keep the ComfyUI format"
            )
        blocks.append(block.contiguous())
    return blocks


def convert_tensors(tensors: dict[str, torch.Tensor], *, format: str, source: Path) -> dict[str, torch.Tensor]:
    """Any supported key scheme -> `format` (official or comfyui)."""
    from longcat_tuner.model.lora import (
        COMFY_PREFIX,
        OFFICIAL_PREFIX,
        OFFICIAL_SEP,
        _parse_lora_tensors,
        fused_parts,
    )

    out: dict[str, torch.Tensor] = {}
    for module, item in _parse_lora_tensors(tensors, str(source)).items():
        down = item["down"].float().contiguous()
        ups = [item["ups"][j].float() for j in sorted(item["ups"])]
        total_rank = down.shape[0]
        if item["alpha_scale"] is not None:
            alpha_scale = item["alpha_scale"]
        elif item["alpha"] is not None:
            alpha_scale = item["alpha"] / total_rank
        else:
            alpha_scale = 1.0
        parts = fused_parts(module)
        if format == "official":
            if len(ups) == 1 and parts > 1:  # a ComfyUI/PEFT file: the up matrix holds all parts
                ups = _split_block_diagonal(ups[0], parts, total_rank // parts, module, source)
            base = OFFICIAL_PREFIX + module.replace(".", OFFICIAL_SEP)
            out[f"{base}.lora_down.weight"] = down
            if len(ups) == 1:
                out[f"{base}.lora_up.weight"] = ups[0].contiguous()
            else:
                for j, up in enumerate(ups):
                    out[f"{base}.lora_up.blocks.{j}.weight"] = up.contiguous()
            out[f"{base}.alpha_scale"] = torch.tensor(float(alpha_scale))
        else:
            base = COMFY_PREFIX + module
            out[f"{base}.lora_down.weight"] = down
            out[f"{base}.lora_up.weight"] = torch.block_diag(*ups).contiguous()
            out[f"{base}.alpha"] = torch.tensor(float(alpha_scale) * total_rank)
    return out


def convert_lora_file(source: Path, target: Path, *, format: str) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    source, target = Path(source), Path(target)
    if not source.is_file():
        raise CheckpointError(f"LoRA file {source} does not exist")
    try:
        with safe_open(str(source), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = dict(handle.metadata() or {})
    except Exception as err:
        raise CheckpointError(f"cannot read LoRA file {source}: {err}") from None
    converted = convert_tensors(tensors, format=format, source=source)
    metadata["longcat_tuner_format"] = format
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    save_file(converted, str(tmp), metadata=metadata)
    tmp.replace(target)
    return target
