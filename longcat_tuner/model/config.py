"""The DiT's hyper-parameters, read from `dit/config.json` of a checkpoint in the official hub layout."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from longcat_tuner.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Fields of `LongCatVideoTransformer3DModel`'s config (MODEL.md section 1.1); defaults are the 13.6B release."""

    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 4096
    depth: int = 48
    num_heads: int = 32
    caption_channels: int = 4096
    mlp_ratio: float = 4
    adaln_tembed_dim: int = 512
    frequency_embedding_size: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_tokens_zero_pad: bool = True
    enable_bsa: bool = False
    bsa_sparsity: float = 0.9375
    bsa_chunk_q: tuple[int, int, int] = (4, 4, 4)
    bsa_chunk_k: tuple[int, int, int] = (4, 4, 4)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_hidden_size(self) -> int:
        # SwiGLU width: 2/3 of mlp_ratio * hidden, rounded up to a multiple of 256 (11008 for the release).
        return 256 * math.ceil(int(2 * self.hidden_size * self.mlp_ratio / 3) / 256)

    @classmethod
    def from_dict(cls, raw: dict) -> "DiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        if "patch_size" in values:
            values["patch_size"] = tuple(values["patch_size"])
        bsa = raw.get("bsa_params") or {}
        if "sparsity" in bsa:
            values["bsa_sparsity"] = float(bsa["sparsity"])
        if "chunk_3d_shape_q" in bsa:
            values["bsa_chunk_q"] = tuple(bsa["chunk_3d_shape_q"])
        if "chunk_3d_shape_k" in bsa:
            values["bsa_chunk_k"] = tuple(bsa["chunk_3d_shape_k"])
        config = cls(**values)
        if config.patch_size[0] != 1:
            raise CheckpointError(f"patch_size {config.patch_size}: LongCat-Video uses a temporal patch of 1")
        if config.hidden_size % config.num_heads:
            raise CheckpointError(f"hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}")
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "DiTConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing: a LongCat-Video checkpoint has dit/config.json") from None
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path} is not valid JSON ({err})") from None
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        """The official config.json fields (what `write_random_checkpoint` saves)."""
        return {
            "_class_name": "LongCatVideoTransformer3DModel",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "hidden_size": self.hidden_size,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "caption_channels": self.caption_channels,
            "mlp_ratio": self.mlp_ratio,
            "adaln_tembed_dim": self.adaln_tembed_dim,
            "frequency_embedding_size": self.frequency_embedding_size,
            "patch_size": list(self.patch_size),
            "enable_flashattn2": True,
            "enable_flashattn3": False,
            "enable_xformers": False,
            "enable_bsa": self.enable_bsa,
            "bsa_params": {
                "sparsity": self.bsa_sparsity,
                "chunk_3d_shape_q": list(self.bsa_chunk_q),
                "chunk_3d_shape_k": list(self.bsa_chunk_k),
            },
            "cp_split_hw": [1, 1],
            "text_tokens_zero_pad": self.text_tokens_zero_pad,
        }
