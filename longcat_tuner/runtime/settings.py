"""The memory/speed settings applied to a loaded DiT, as one plain value (no torch).

`MemorySettings` is what the runtime applies (`longcat_tuner.runtime.apply`), what the planner estimates
(`longcat_tuner.runtime.planner`) and what the automatic choice returns (`longcat_tuner.runtime.auto`).
Each field is one config key of `TrainConfig` (`CONFIG_KEYS`), so a resolved plan can be written back
into the config snapshot and a user's explicit key can pin the field it names.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

CHECKPOINTING_MODES = ("none", "full", "keep_attention", "offload_inputs")
# 8-bit storage of the frozen block linears; `fp8-compute` also runs their matmuls in float8
# (runtime/fp8_compute.py). Opt-in only: the automatic plan never picks it (runtime/auto.py).
FP8_COMPUTE = "fp8-compute"
QUANTIZED_PRECISIONS = ("int8-quanto", "fp8-torchao", FP8_COMPUTE)

# MemorySettings field -> the TrainConfig key(s) it comes from.
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "checkpointing": ("gradient_checkpointing", "gradient_checkpointing_mode"),
    "keep_attention_blocks": ("gradient_checkpointing_keep_attention_blocks",),
    "uncheckpointed_blocks": ("gradient_checkpointing_uncheckpointed_blocks",),
    "compile_blocks": ("compile_blocks",),
    "compile_scope": ("compile_scope",),
    "blocks_to_swap": ("musubi_blocks_to_swap",),
    "swap_device": ("musubi_block_swap_device",),
    "base_precision": ("base_model_precision",),
}
MEMORY_CONFIG_KEYS = tuple(key for keys in CONFIG_KEYS.values() for key in keys)


@dataclasses.dataclass(frozen=True)
class MemorySettings:
    """How a DiT runs: checkpointing mode, compile, block swap and base-weight precision."""

    checkpointing: str = "full"  # none | full | keep_attention | offload_inputs
    keep_attention_blocks: Optional[int] = None  # keep_attention: the first k blocks keep it (None: all)
    uncheckpointed_blocks: int = 0  # with a checkpointing mode: the first k blocks store their activations instead
    compile_blocks: bool = False
    compile_scope: str = "block"  # block | checkpointed_block (keep_attention only)
    blocks_to_swap: int = 0  # the last N blocks' frozen weights live in pinned host memory
    swap_device: str = "cpu"
    base_precision: str = "no_change"  # no_change | bf16 | fp32 | int8-quanto | fp8-torchao | fp8-compute

    def __post_init__(self) -> None:
        if self.checkpointing not in CHECKPOINTING_MODES:
            raise ValueError(f"checkpointing '{self.checkpointing}' is not one of {', '.join(CHECKPOINTING_MODES)}")
        if self.compile_scope not in ("block", "checkpointed_block"):
            raise ValueError(f"compile_scope '{self.compile_scope}' is not block or checkpointed_block")
        if self.uncheckpointed_blocks < 0:
            raise ValueError(f"uncheckpointed_blocks must be >= 0, got {self.uncheckpointed_blocks}")
        if self.blocks_to_swap < 0:
            raise ValueError(f"blocks_to_swap must be >= 0, got {self.blocks_to_swap}")

    @property
    def quantized(self) -> bool:
        return self.base_precision in QUANTIZED_PRECISIONS

    @property
    def compiles_checkpointed_block(self) -> bool:
        return self.compile_blocks and self.compile_scope == "checkpointed_block"

    @property
    def assembles_on_host(self) -> bool:
        """Load on the host first (block swap or 8-bit weights: the whole bf16 model may not fit the GPU)."""
        return self.blocks_to_swap > 0 or self.quantized

    @classmethod
    def from_config(cls, config: Any) -> "MemorySettings":
        """The settings a `TrainConfig` (or any object with its memory keys) names."""
        mode = config.gradient_checkpointing_mode if config.gradient_checkpointing else "none"
        return cls(
            checkpointing=mode,
            keep_attention_blocks=config.gradient_checkpointing_keep_attention_blocks,
            uncheckpointed_blocks=config.gradient_checkpointing_uncheckpointed_blocks if config.gradient_checkpointing else 0,
            compile_blocks=config.compile_blocks,
            compile_scope=config.compile_scope,
            blocks_to_swap=config.musubi_blocks_to_swap,
            swap_device=config.musubi_block_swap_device,
            base_precision=config.base_model_precision,
        )

    def config_values(self) -> dict[str, Any]:
        """The TrainConfig keys that express these settings (the inverse of `from_config`)."""
        return {
            "gradient_checkpointing": self.checkpointing != "none",
            "gradient_checkpointing_mode": "full" if self.checkpointing == "none" else self.checkpointing,
            "gradient_checkpointing_keep_attention_blocks": self.keep_attention_blocks,
            "gradient_checkpointing_uncheckpointed_blocks": self.uncheckpointed_blocks,
            "compile_blocks": self.compile_blocks,
            "compile_scope": self.compile_scope,
            "musubi_blocks_to_swap": self.blocks_to_swap,
            "musubi_block_swap_device": self.swap_device,
            "base_model_precision": self.base_precision,
        }

    def describe(self) -> str:
        """One line, in config keys, e.g. for the plan printed at the start of a run."""
        parts = [
            "gradient_checkpointing off" if self.checkpointing == "none" else f"gradient_checkpointing_mode {self.checkpointing}"
        ]
        if self.checkpointing == "keep_attention" and self.keep_attention_blocks is not None:
            parts.append(f"gradient_checkpointing_keep_attention_blocks {self.keep_attention_blocks}")
        if self.checkpointing != "none" and self.uncheckpointed_blocks:
            parts.append(f"gradient_checkpointing_uncheckpointed_blocks {self.uncheckpointed_blocks}")
        if self.compile_blocks:
            parts.append(f"compile_blocks (compile_scope {self.compile_scope})")
        parts.append(f"musubi_blocks_to_swap {self.blocks_to_swap}")
        parts.append(f"base_model_precision {self.base_precision}")
        return ", ".join(parts)
