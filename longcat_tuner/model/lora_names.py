"""Names of LoRA targets and LoRA file layouts, torch-free: the config schema, the CLI and the web UI list them
without importing the model; `longcat_tuner.model.lora` and `.lora_formats` use the same tuples."""
from __future__ import annotations

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

# LoRA file layouts `train` and `export-lora` can write, each named for the client that loads it; the
# layouts themselves live in `longcat_tuner.model.lora_formats`.
LORA_FILE_FORMATS: tuple[str, ...] = ("official", "comfyui-wanvideowrapper", "wan2gp", "diffusers")
