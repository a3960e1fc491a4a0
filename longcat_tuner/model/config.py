"""The DiT's hyper-parameters, read from `dit/config.json` of a checkpoint in the official hub layout."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from longcat_tuner.errors import CheckpointError


_REDOWNLOAD = "the file is damaged or not a LongCat-Video DiT config; download dit/config.json again"

# Largest value accepted for a size field: well above the 13.6B release (hidden 4096, depth 48).
_MAX_SIZE = 1 << 20


def _checked_value(name: str, value, kind: str, source: str):
    """`value` of config field `name`, checked against the field's annotation (int, float, bool, 3-tuple)."""
    where = f"{source}: key '{name if not name.startswith('bsa_') else 'bsa_params'}'"
    if kind == "bool":
        if not isinstance(value, bool):
            raise CheckpointError(f"{where} must be true or false, got {value!r}; {_REDOWNLOAD}")
        return value
    if kind.startswith("tuple"):
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 64 for v in value)
        ):
            raise CheckpointError(f"{where} must be a list of 3 positive integers, got {value!r}; {_REDOWNLOAD}")
        return tuple(value)
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= _MAX_SIZE:
            raise CheckpointError(f"{where} must be a whole number in 1..{_MAX_SIZE}, got {value!r}; {_REDOWNLOAD}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise CheckpointError(f"{where} must be a positive finite number, got {value!r}; {_REDOWNLOAD}")
        if name == "bsa_sparsity" and not value < 1:
            raise CheckpointError(f"{where}: sparsity must lie in (0, 1), got {value!r}; {_REDOWNLOAD}")
        return value
    return value


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
    def from_dict(cls, raw: dict, *, source: str = "dit/config.json") -> "DiTConfig":
        """Validate the official fields; a wrong type or value is a `CheckpointError` naming `source` and the key."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: expected a JSON object of DiT settings, got {type(raw).__name__}; {_REDOWNLOAD}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        bsa = raw.get("bsa_params") or {}
        if not isinstance(bsa, dict):
            raise CheckpointError(f"{source}: key 'bsa_params' must be an object, got {bsa!r}; {_REDOWNLOAD}")
        for official, name in (("sparsity", "bsa_sparsity"), ("chunk_3d_shape_q", "bsa_chunk_q"), ("chunk_3d_shape_k", "bsa_chunk_k")):
            if official in bsa:
                values[name] = bsa[official]
        for name, value in list(values.items()):
            values[name] = _checked_value(name, value, str(known[name].type), source)
        config = cls(**values)
        if config.patch_size[0] != 1:
            raise CheckpointError(f"{source}: patch_size {config.patch_size}: LongCat-Video uses a temporal patch of 1")
        if config.hidden_size % config.num_heads:
            raise CheckpointError(
                f"{source}: hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}"
            )
        if config.head_dim % 2:  # it used to pass `check`, then stop the first step with a RoPE shape traceback
            raise CheckpointError(
                f"{source}: hidden_size {config.hidden_size} / num_heads {config.num_heads} gives an odd head_dim "
                f"{config.head_dim}, but the 3-D RoPE rotates pairs of channels: the head_dim must be even "
                f"(128 in the release); {_REDOWNLOAD}"
            )
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "DiTConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing: a LongCat-Video checkpoint has dit/config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path} is not valid JSON ({err}); {_REDOWNLOAD}") from None
        except OSError as err:
            raise CheckpointError(f"{path} cannot be read ({err})") from None
        return cls.from_dict(raw, source=str(path))

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name of the official DiT state dict and its shape, computed without torch.

        The same layout `LongCatDiT` builds (tests compare the two); `check` reads safetensors headers against it.
        """
        dim, head, ffn, tdim = self.hidden_size, self.head_dim, self.ffn_hidden_size, self.adaln_tembed_dim
        patch = tuple(self.patch_size)
        shapes: dict[str, tuple[int, ...]] = {
            "x_embedder.proj.weight": (dim, self.in_channels, *patch),
            "x_embedder.proj.bias": (dim,),
            "t_embedder.mlp.0.weight": (tdim, self.frequency_embedding_size),
            "t_embedder.mlp.0.bias": (tdim,),
            "t_embedder.mlp.2.weight": (tdim, tdim),
            "t_embedder.mlp.2.bias": (tdim,),
            "y_embedder.y_proj.0.weight": (dim, self.caption_channels),
            "y_embedder.y_proj.0.bias": (dim,),
            "y_embedder.y_proj.2.weight": (dim, dim),
            "y_embedder.y_proj.2.bias": (dim,),
            "final_layer.linear.weight": (math.prod(patch) * self.out_channels, dim),
            "final_layer.linear.bias": (math.prod(patch) * self.out_channels,),
            "final_layer.adaLN_modulation.1.weight": (2 * dim, tdim),
            "final_layer.adaLN_modulation.1.bias": (2 * dim,),
        }
        block = {
            "adaLN_modulation.1.weight": (6 * dim, tdim),
            "adaLN_modulation.1.bias": (6 * dim,),
            "attn.qkv.weight": (3 * dim, dim),
            "attn.qkv.bias": (3 * dim,),
            "attn.q_norm.weight": (head,),
            "attn.k_norm.weight": (head,),
            "attn.proj.weight": (dim, dim),
            "attn.proj.bias": (dim,),
            "pre_crs_attn_norm.weight": (dim,),
            "pre_crs_attn_norm.bias": (dim,),
            "cross_attn.q_linear.weight": (dim, dim),
            "cross_attn.q_linear.bias": (dim,),
            "cross_attn.kv_linear.weight": (2 * dim, dim),
            "cross_attn.kv_linear.bias": (2 * dim,),
            "cross_attn.q_norm.weight": (head,),
            "cross_attn.k_norm.weight": (head,),
            "cross_attn.proj.weight": (dim, dim),
            "cross_attn.proj.bias": (dim,),
            "ffn.w1.weight": (ffn, dim),
            "ffn.w2.weight": (dim, ffn),
            "ffn.w3.weight": (ffn, dim),
        }
        for index in range(self.depth):
            shapes.update({f"blocks.{index}.{name}": shape for name, shape in block.items()})
        return shapes

    def linear_widths(self, target: str) -> tuple[int, int]:
        """(in, out) features of the block linear `target` (e.g. `attn.proj`); KeyError for an unknown target."""
        out_features, in_features = self.expected_shapes()[f"blocks.0.{target}.weight"] if self.depth else (0, 0)
        return in_features, out_features

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
