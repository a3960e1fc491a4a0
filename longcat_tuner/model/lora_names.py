"""Names of LoRA targets and LoRA file layouts, torch-free: the config schema, the CLI and the web UI list them
without importing the model; `longcat_tuner.model.lora` and `.lora_formats` use the same tuples."""
from __future__ import annotations

import re
from typing import Iterable, Optional

# Every linear layer of every DiT block: the official cfg_step_lora targets (MODEL.md 4.4) plus cross_attn.proj.
DEFAULT_LORA_TARGETS: tuple[str, ...] = (
    "attn.qkv",
    "attn.proj",
    "cross_attn.q_linear",
    "cross_attn.kv_linear",
    "cross_attn.proj",
    "ffn.w1",
    "ffn.w2",
    "ffn.w3",
)

# Linear layers of one official block and outside the blocks (the official LongCatVideoTransformer3DModel).
# (The default LoRA targets are every linear layer of a block but the modulation.)
BLOCK_LINEARS: tuple[str, ...] = ("adaLN_modulation.1",) + DEFAULT_LORA_TARGETS
TOP_LINEARS: tuple[str, ...] = (
    "t_embedder.mlp.0",
    "t_embedder.mlp.2",
    "y_embedder.y_proj.0",
    "y_embedder.y_proj.2",
    "final_layer.adaLN_modulation.1",
    "final_layer.linear",
)
_BLOCK_TARGET = re.compile(r"^(?:blocks\.)?(\d+)\.")


def matching_target(path: str, targets: Iterable[str]) -> Optional[str]:
    """The first of `targets` (lora_targets) that names the layer at module `path`, by the rule the model applies
    (the path equals the target or ends with `.` + target: `attn.qkv` names `blocks.7.attn.qkv`), or None."""
    return next((t for t in targets if path == t or path.endswith("." + t)), None)


def unknown_targets(targets: list[str]) -> list[str]:
    """The `lora_targets` entries that name no linear layer of the LongCat DiT at any depth, by the rule the
    model applies (a layer path equal to the target or ending with `.` + target); a block index beyond the
    checkpoint's depth is left to the model to refuse."""
    unknown = []
    for target in targets:
        match = _BLOCK_TARGET.match(target)
        paths = [f"blocks.{match[1] if match else 0}.{name}" for name in BLOCK_LINEARS] + list(TOP_LINEARS)
        if not any(matching_target(path, (target,)) is not None for path in paths):
            unknown.append(target)
    return unknown


# LoRA file layouts `train` and `export-lora` can write, each named for the client that loads it; the
# layouts themselves live in `longcat_tuner.model.lora_formats`.
LORA_FILE_FORMATS: tuple[str, ...] = ("official", "comfyui-wanvideowrapper", "wan2gp", "diffusers")
