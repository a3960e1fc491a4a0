"""Every LoRA file layout this project reads or writes: the one place that knows key names, alpha and splits.

A LoRA is handled here as `{official module path: Adapter}`, where the path is a linear layer of the official
LongCat-Video DiT (`blocks.7.attn.qkv`, `final_layer.linear`, ...) and `Adapter` holds plain tensors:

    delta_W = scale * up @ down        (down [R, in]; up [out, R], block-diagonal when it has several parts)

Written layouts (`LORA_FILE_FORMATS`), each named for the client that loads it:

* `official` - LongCat-Video's own `lora_utils` (`dit.load_lora(path, key, lora_network_dim=...)`):
  `lora___lorahyphen___<path, "." -> "___lorahyphen___">.lora_down.weight`, `.lora_up.weight` or, for a
  block-diagonal adapter on a fused projection, `.lora_up.blocks.{j}.weight`, and `.alpha_scale`
  (the scale itself). The official loader takes one rank for every module, so every adapter is written
  at the largest rank, zero-padded (exact); the header's `lora_network_dim` is the value to pass.
* `comfyui-wanvideowrapper` - ComfyUI with kijai's ComfyUI-WanVideoWrapper, whose LongCat model is its
  `WanModel(is_longcat=True)` with Wan module names: `diffusion_model.<wrapper path>.lora_down.weight`,
  `.lora_up.weight`, `.alpha` (alpha / rank = scale). The fused `attn.qkv` is written as `self_attn.q/k/v`
  and `cross_attn.kv_linear` as `cross_attn.k/v`: part j of a block-diagonal adapter is the adapter
  (down rows of part j, up block j), part j of a dense one is (down, rows j of up); both give exactly the
  rows of our delta. Renames: `attn.proj -> self_attn.o`, `cross_attn.q_linear -> cross_attn.q`,
  `cross_attn.proj -> cross_attn.o`, `adaLN_modulation.1 -> modulation.1`, `final_layer.linear ->
  head.head`, `final_layer.adaLN_modulation.1 -> head.modulation.1`, `y_embedder.y_proj.{0,2} ->
  text_embedding.{0,2}`, `t_embedder.mlp.{0,2} -> time_embedding.mlp.{0,2}`; `ffn.w1/w2/w3` unchanged
  (names read from the wrapper's `wanvideo/modules/model.py` and `LongCat/layers.py`, see README "LoRA files
  and clients"). The wrapper's un-merged LoRA path (GGUF, fp8-scaled, merge_loras off) skips `head.*`.
  ComfyUI core has no LongCat-Video model, so `comfyui` is an alias of this format.
* `wan2gp` - official module paths with kohya-style suffixes, `diffusion_model.<path>.lora_down.weight`,
  `.lora_up.weight` (the block-diagonal up as one matrix), `.alpha`: what Wan2GP's loader (mmgp) reads for
  its official-layout LongCat model. ComfyUI's wrapper would apply only its FFN keys (its q/k/v are split).
* `diffusers` - PEFT keys as SimpleTuner writes them, `transformer.<path>.lora_A.weight` / `.lora_B.weight`,
  with rank and alpha in the safetensors header (`lora_adapter_metadata`: `transformer.r`,
  `transformer.lora_alpha`, and `rank_pattern` / `alpha_pattern` keyed by full module path where a module
  differs).

Read layouts: all of the above, plus DiffSynth-Studio (`blocks.N.attn.qkv.lora_A.default.weight`, no alpha:
scale 1), the musubi-tuner LongCat fork (`lora_unet_blocks_N_attn_qkv.lora_down.weight` + `.alpha`),
VideoX-Fun (`lora_unet__blocks_N_attn_qkv...` + `.alpha`, or its PEFT file `blocks.N.attn.qkv.lora_A.weight`),
and files named the wrapper's way (kijai) under any of the prefixes above. Alpha comes from `.alpha_scale` or
`.alpha` tensors, else from PEFT header metadata (`lora_alpha`, `alpha_pattern`, `use_rslora`), else it
equals the rank (scale 1, as ComfyUI and PEFT assume). Adapters that target parts of one fused projection
(wrapper-named q/k/v, k/v) are merged exactly into one adapter on the fused layer: equal ranks and scales
give a block-diagonal adapter [A_q; A_k; A_v] with up blocks B_q, B_k, B_v; otherwise each part's scale is
folded into its up block and the merged adapter has scale 1 (alpha = merged rank), missing parts being zero.
Keys that match no layout are an error that lists them.
"""
from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from longcat_tuner.model.lora_names import BLOCK_LINEARS, LORA_FILE_FORMATS, TOP_LINEARS, matching_target
from longcat_tuner.errors import CheckpointError, ConfigError

# --- the official module tree ------------------------------------------------------------------------------

# BLOCK_LINEARS / TOP_LINEARS (torch-free, in `lora_names`): the linear layers of one official block and
# outside the blocks.
# Suffix -> number of block-diagonal parts of the official adapter ("n_seperate"); first match wins.
FUSED_SPLITS: tuple[tuple[str, int], ...] = (
    ("final_layer.adaLN_modulation.1", 2),
    ("adaLN_modulation.1", 6),
    ("attn.qkv", 3),
    ("cross_attn.kv_linear", 2),
)

OFFICIAL_PREFIX = "lora___lorahyphen___"
OFFICIAL_SEP = "___lorahyphen___"
COMFY_PREFIX = "diffusion_model."
DIFFUSERS_PREFIX = "transformer."
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

# The run-folder file each format is written to by `train`.
FILE_NAMES: dict[str, str] = {
    "official": "longcat_lora.safetensors",
    "comfyui-wanvideowrapper": "longcat_lora_comfyui.safetensors",
    "wan2gp": "longcat_lora_wan2gp.safetensors",
    "diffusers": "longcat_lora_diffusers.safetensors",
}
FORMAT_ALIASES: dict[str, str] = {"comfyui": "comfyui-wanvideowrapper"}  # ComfyUI runs LongCat only via the wrapper

# name -> (client, one example key); used in messages and kept in step with the README table.
WRITTEN_LAYOUTS: dict[str, tuple[str, str]] = {
    "official": ("LongCat-Video lora_utils", "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn"
                 "___lorahyphen___qkv.lora_up.blocks.0.weight"),
    "comfyui-wanvideowrapper": ("ComfyUI-WanVideoWrapper (kijai)", "diffusion_model.blocks.0.self_attn.q.lora_up.weight"),
    "wan2gp": ("Wan2GP", "diffusion_model.blocks.0.attn.qkv.lora_up.weight"),
    "diffusers": ("diffusers/PEFT (SimpleTuner)", "transformer.blocks.0.attn.qkv.lora_B.weight"),
}
READ_ONLY_LAYOUTS: dict[str, str] = {
    "DiffSynth-Studio": "blocks.0.attn.qkv.lora_B.default.weight",
    "musubi-tuner LongCat": "lora_unet_blocks_0_attn_qkv.lora_up.weight",
    "VideoX-Fun": "lora_unet__blocks_0_attn_qkv.lora_up.weight",
    "kijai / wrapper names": "blocks.0.self_attn.q.lora_B.weight (any prefix above)",
}
assert tuple(WRITTEN_LAYOUTS) == LORA_FILE_FORMATS == tuple(FILE_NAMES)

# Official suffix -> the wrapper's names for it, one per equal slice of the output rows.
_WRAPPER_BLOCK: dict[str, tuple[str, ...]] = {
    "adaLN_modulation.1": ("modulation.1",),
    "attn.qkv": ("self_attn.q", "self_attn.k", "self_attn.v"),
    "attn.proj": ("self_attn.o",),
    "cross_attn.q_linear": ("cross_attn.q",),
    "cross_attn.kv_linear": ("cross_attn.k", "cross_attn.v"),
    "cross_attn.proj": ("cross_attn.o",),
    "ffn.w1": ("ffn.w1",),
    "ffn.w2": ("ffn.w2",),
    "ffn.w3": ("ffn.w3",),
}
_WRAPPER_TOP: dict[str, tuple[str, ...]] = {
    "t_embedder.mlp.0": ("time_embedding.mlp.0",),
    "t_embedder.mlp.2": ("time_embedding.mlp.2",),
    "y_embedder.y_proj.0": ("text_embedding.0",),
    "y_embedder.y_proj.2": ("text_embedding.2",),
    "final_layer.adaLN_modulation.1": ("head.modulation.1",),
    "final_layer.linear": ("head.head",),
}
assert set(_WRAPPER_BLOCK) == set(BLOCK_LINEARS) and set(_WRAPPER_TOP) == set(TOP_LINEARS)


def _reverse(table: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, Optional[int], int]]:
    out: dict[str, tuple[str, Optional[int], int]] = {}
    for official, names in table.items():
        out[official] = (official, None, 1)
        for j, name in enumerate(names):
            out.setdefault(name, (official, None if len(names) == 1 else j, len(names)))
    return out


# Any accepted module name (official or wrapper) -> (official suffix, slice index or None, number of slices).
_BLOCK_NAMES = _reverse(_WRAPPER_BLOCK)
_TOP_NAMES = _reverse(_WRAPPER_TOP)
_BLOCK_UNDERSCORED = {name.replace(".", "_"): name for name in _BLOCK_NAMES}
_TOP_UNDERSCORED = {name.replace(".", "_"): name for name in _TOP_NAMES}
_BLOCK_PATH = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_UNDERSCORED_PATH = re.compile(r"^blocks_(\d+)_(.+)$")


def fused_parts(module_name: str) -> int:
    """Block-diagonal parts the official scheme gives an adapter on this layer (1: an ordinary adapter)."""
    for suffix, parts in FUSED_SPLITS:
        if module_name == suffix or module_name.endswith("." + suffix):
            return parts
    return 1


def official_linears(depth: int) -> list[str]:
    """Every linear layer of the official DiT with `depth` blocks, by module path."""
    return [f"blocks.{i}.{s}" for i in range(depth) for s in BLOCK_LINEARS] + list(TOP_LINEARS)


def wrapper_names(path: str) -> tuple[str, ...]:
    """The wrapper's module path(s) for an official linear: several when it splits the fused layer."""
    match = _BLOCK_PATH.match(path)
    if match and match[2] in _WRAPPER_BLOCK:
        return tuple(f"blocks.{match[1]}.{name}" for name in _WRAPPER_BLOCK[match[2]])
    if path in _WRAPPER_TOP:
        return _WRAPPER_TOP[path]
    raise ConfigError(f"'{path}' is not a linear layer of the LongCat DiT, so it has no ComfyUI-WanVideoWrapper name")


def resolve_format(name: str) -> str:
    name = FORMAT_ALIASES.get(name, name)
    if name not in LORA_FILE_FORMATS:
        raise ConfigError(f"LoRA format '{name}' is unknown; choose one of {', '.join(LORA_FILE_FORMATS)}")
    return name


# --- adapters as tensors -----------------------------------------------------------------------------------


@dataclass
class Adapter:
    """`delta = scale * up @ down`: `down` [R, in]; `ups` one dense [out, R] or n blocks [out/n, R/n] on the
    diagonal (block j reads down rows j*R/n ... (j+1)*R/n and writes output rows j*out/n ...)."""

    down: torch.Tensor
    ups: list[torch.Tensor]
    scale: float

    @property
    def parts(self) -> int:
        return len(self.ups)

    @property
    def rank(self) -> int:
        """Rank of each part (the whole rank for a dense adapter)."""
        return self.down.shape[0] // self.parts

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def out_features(self) -> int:
        return sum(u.shape[0] for u in self.ups)

    def up_matrix(self) -> torch.Tensor:
        return self.ups[0] if self.parts == 1 else torch.block_diag(*self.ups)

    def delta(self) -> torch.Tensor:
        """The dense `[out, in]` update, in float32."""
        return (self.up_matrix().float() @ self.down.float()) * self.scale

    def row_slice(self, j: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) of an adapter whose delta is exactly rows j of n equal slices of this one's, same scale."""
        if self.parts == n:
            r = self.rank
            return self.down[j * r : (j + 1) * r], self.ups[j]
        rows = self.out_features // n
        return self.down, self.up_matrix()[j * rows : (j + 1) * rows]

    def padded(self, rank: int) -> "Adapter":
        """The same delta with every part widened to `rank` by zero rows of down and zero columns of up."""
        extra = rank - self.rank
        if extra <= 0:
            return self
        downs = self.down.split(self.rank)
        down = torch.cat([torch.cat([d, d.new_zeros(extra, d.shape[1])]) for d in downs])
        ups = [torch.cat([u, u.new_zeros(u.shape[0], extra)], dim=1) for u in self.ups]
        return Adapter(down, ups, self.scale)

    def check(self, where: str) -> None:
        shapes = f"down {tuple(self.down.shape)}, up {[tuple(u.shape) for u in self.ups]}"
        if self.down.ndim != 2 or any(u.ndim != 2 for u in self.ups):
            raise CheckpointError(f"{where}: LoRA weights are not matrices ({shapes}); conv or LoCon LoRAs are not supported")
        if self.down.shape[0] % self.parts or any(u.shape != self.ups[0].shape for u in self.ups) \
                or self.ups[0].shape[1] != self.rank:
            raise CheckpointError(f"{where}: LoRA down and up weights do not fit together ({shapes})")


def _as_block_diagonal(adapter: Adapter, parts: int) -> Adapter:
    """A dense adapter whose up matrix is exactly block-diagonal in `parts` equal blocks, as those blocks."""
    if adapter.parts != 1 or parts == 1:
        return adapter
    up = adapter.up_matrix()
    total, out = adapter.down.shape[0], up.shape[0]
    if total % parts or out % parts:
        return adapter
    r, rows = total // parts, out // parts
    mask = torch.block_diag(*[torch.ones(rows, r, dtype=torch.bool)] * parts)
    if bool(up[~mask].any()):
        return adapter
    return Adapter(adapter.down, [up[j * rows : (j + 1) * rows, j * r : (j + 1) * r] for j in range(parts)], adapter.scale)


def _merge_slices(pieces: dict[Optional[int], Adapter], n: int, path: str, source: str) -> Adapter:
    """One adapter on the fused layer `path` from adapters on its row slices (and/or on the whole layer)."""
    if set(pieces) == {None}:
        return pieces[None]
    in_sizes = {a.in_features for a in pieces.values()}
    if len(in_sizes) != 1:  # torch.cat below would fail with a RuntimeError traceback
        raise CheckpointError(f"{source}: the split adapters for '{path}' read inputs of different sizes "
                              f"{sorted(in_sizes)}; the file mixes LoRAs of different models or is damaged")
    slice_rows = {a.out_features for j, a in pieces.items() if j is not None}
    if len(slice_rows) != 1:
        raise CheckpointError(f"{source}: the split adapters for '{path}' have different output sizes {sorted(slice_rows)}")
    rows = slice_rows.pop()
    if None not in pieces and set(pieces) == set(range(n)):
        subs = [pieces[j] for j in range(n)]
        if all(a.parts == 1 for a in subs) and len({a.down.shape[0] for a in subs}) == 1 \
                and len({a.scale for a in subs}) == 1:
            return Adapter(torch.cat([a.down for a in subs]), [a.ups[0] for a in subs], subs[0].scale)
    # General case, still exact: concatenate the downs, place each up (times its scale) at its rows.
    downs, ups = [], []
    for j, a in sorted(pieces.items(), key=lambda item: -1 if item[0] is None else item[0]):
        up = a.up_matrix().float() * a.scale
        if j is not None:
            full = up.new_zeros(rows * n, up.shape[1])
            full[j * rows : (j + 1) * rows] = up
            up = full
        elif up.shape[0] != rows * n:
            raise CheckpointError(f"{source}: the adapters for '{path}' and its parts have inconsistent sizes")
        downs.append(a.down.float())
        ups.append(up)
    return Adapter(torch.cat(downs), [torch.cat(ups, dim=1)], 1.0)


# --- reading -----------------------------------------------------------------------------------------------

_UP_BLOCK = re.compile(r"^(?P<m>.+)\.lora_up\.blocks\.(?P<j>\d+)\.weight$")
_DOWN = re.compile(r"^(?P<m>.+)\.(?:lora_down|lora_A)(?:\.[A-Za-z0-9_\-]+)?\.weight$")
_UP = re.compile(r"^(?P<m>.+)\.(?:lora_up|lora_B)(?:\.[A-Za-z0-9_\-]+)?\.weight$")
_DOTTED_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "pipe.dit.",
                    "dit.", "model.")
_UNDERSCORED_PREFIXES = ("lora_unet_", "lora_transformer_")
# Adapter kinds other than a plain LoRA (their delta is not `scale * up @ down`), by the keys that mark them:
# named as such, not as a LoRA for another model.
_UNSUPPORTED_KINDS: tuple[tuple[str, re.Pattern], ...] = (
    ("DoRA", re.compile(r"\.(dora_scale|magnitude|lora_magnitude_vector(\.[A-Za-z0-9_\-]+)?)$")),
    ("LoKr (LyCORIS)", re.compile(r"\.lokr_[A-Za-z0-9_]+$")),
    ("LoHa (LyCORIS)", re.compile(r"\.hada_[A-Za-z0-9_]+$")),
    ("LoCon/Tucker mid weights (LyCORIS)", re.compile(r"\.lora_mid\.weight$")),
    ("full-weight diff", re.compile(r"\.(diff|diff_b)$")),
)
# Module names of other models' LoRAs (kohya `_` or dotted paths), checked in this order: the file is named as
# such a LoRA rather than listed against every LongCat layout.
_FOREIGN_MODELS: tuple[tuple[str, re.Pattern], ...] = (
    ("Wan 2.1/2.2", re.compile(r"(^|[._])(blocks[._]\d+[._](ffn[._][02]|cross_attn[._][kv]_img|attn[12][._]to_)"
                               r"|img_emb|time_projection|time_embedding[._][02]|condition_embedder)([._]|$)")),
    ("Flux or HunyuanVideo", re.compile(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks|"
                                        r"token_refiner)([._]|$)")),
    ("Stable Diffusion 1.x/2.x/SDXL", re.compile(r"(^|[._])(down_blocks|up_blocks|mid_block|lora_te\d?|"
                                                 r"input_blocks|output_blocks)([._]|$)")),
)


def _strip_prefix(name: str) -> str:
    """A module name without the file's prefix (the name PEFT patterns are written against)."""
    if name.startswith(OFFICIAL_PREFIX):
        return name[len(OFFICIAL_PREFIX):].replace(OFFICIAL_SEP, ".")
    for prefix in _UNDERSCORED_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):].lstrip("_")
    for prefix in _DOTTED_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _normalise_module(name: str) -> Optional[tuple[str, Optional[int], int]]:
    """A module name in any supported scheme -> (official path, slice index or None, slices), or None."""
    underscored = name.startswith(_UNDERSCORED_PREFIXES)
    name = _strip_prefix(name)
    if underscored:
        match = _BLOCK_UNDERSCORED_PATH.match(name)
        if match and match[2] in _BLOCK_UNDERSCORED:
            name = f"blocks.{match[1]}.{_BLOCK_UNDERSCORED[match[2]]}"
        elif name in _TOP_UNDERSCORED:
            name = _TOP_UNDERSCORED[name]
        else:
            return None
    match = _BLOCK_PATH.match(name)
    if match and match[2] in _BLOCK_NAMES:
        suffix, j, n = _BLOCK_NAMES[match[2]]
        return f"blocks.{match[1]}.{suffix}", j, n
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    return None


def _peft_config(metadata: dict[str, str], source: str) -> Optional[dict[str, Any]]:
    """The transformer's PEFT LoraConfig fields from a diffusers header (`lora_adapter_metadata`), if any."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        config = None
    if not isinstance(config, dict):
        # Its alpha sets the strength of every layer: guessing alpha = rank would change the LoRA silently.
        raise CheckpointError(f"{source}: the header's {PEFT_METADATA_KEY} is not a JSON object ({raw[:80]!r}), so the "
                              "LoRA's alpha cannot be read; the file is damaged or was exported wrongly: export it again")
    prefixed = {k[len(DIFFUSERS_PREFIX):]: v for k, v in config.items() if k.startswith(DIFFUSERS_PREFIX)}
    return prefixed or config


def _peft_scale(config: dict[str, Any], module: str, rank: int, source: str) -> Optional[float]:
    alpha = config.get("lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise CheckpointError(f"{source}: the header's {PEFT_METADATA_KEY} alpha_pattern is not an object "
                              f"({patterns!r}); the file is damaged or was exported wrongly")
    for pattern, value in patterns.items():
        try:
            hit = pattern == module or re.match(rf"(.*\.)?({pattern})$", module) is not None
        except re.error:
            hit = pattern == module
        if hit:
            alpha = value
            break
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"{source}: the header's {PEFT_METADATA_KEY} gives '{module}' the alpha {alpha!r}, not a "
                              "number; the file is damaged or was exported wrongly")
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _unmatched_error(source: str, keys: list[str], total: int) -> CheckpointError:
    """The error for `keys` (of the file's `total`) that match no layout, naming the kind of file where it is plain."""
    shown = ", ".join(sorted(keys)[:8]) + (f" (and {len(keys) - 8} more)" if len(keys) > 8 else "")
    layouts = "; ".join(f"{name} ({client}): {example}" for name, (client, example) in WRITTEN_LAYOUTS.items())
    foreign = "; ".join(f"{name}: {example}" for name, example in READ_ONLY_LAYOUTS.items())
    what = ""  # what the file is, where its keys say so plainly
    kinds = [kind for kind, pattern in _UNSUPPORTED_KINDS if any(pattern.search(k) for k in keys)]
    models = [(model, k) for model, pattern in _FOREIGN_MODELS for k in sorted(keys) if pattern.search(k)]
    if kinds:
        example = next(k for k in sorted(keys) if any(pattern.search(k) for _, pattern in _UNSUPPORTED_KINDS))
        what = (f" This is a {'/'.join(kinds)} file, not a plain LoRA ({example}): DoRA, LoKr, LoHa, LoCon mid weights "
                "and full-weight diffs are not supported; train or export it as a plain LoRA (lora_down/lora_up or "
                "lora_A/lora_B only).")
    elif len(keys) == total and all(k.endswith((".weight", ".bias")) and "lora" not in k.lower() for k in keys):
        what = (f" This holds a model's own weights ({sorted(keys)[0]}), not a LoRA (no lora_down/lora_up or "
                "lora_A/lora_B keys); give a LoRA file (sample --model takes the model folder).")
    elif models:
        what = (f" This looks like a {models[0][0]} LoRA, not a LongCat-Video one ({models[0][1]}): a LoRA trained "
                "for another model cannot be applied to LongCat-Video; use one trained for LongCat-Video.")
    return CheckpointError(
        f"{source}: {len(keys)} keys match no known LongCat LoRA layout: {shown}.{what} "
        f"Known layouts - written: {layouts}. Read as well: {foreign}."
        + ("" if what else " Is this a LoRA for another model?")
    )


def _check_values(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse integer (quantized) weights and NaN/Inf values: either would run and give a broken video."""
    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")

    integer = [k for k, v in tensors.items() if not v.dtype.is_floating_point and k.endswith(".weight")]  # not alpha
    if integer:
        dtypes = sorted({str(tensors[k].dtype).removeprefix("torch.") for k in integer})
        raise CheckpointError(
            f"{source}: {len(integer)} tensors hold {'/'.join(dtypes)} values, not floats ({listed(integer)}); "
            "quantized LoRA files are not supported: use a float16, bfloat16 or float32 export of the LoRA"
        )
    broken = [k for k, v in tensors.items() if not bool(torch.isfinite(v.float()).all())]
    if broken:
        raise CheckpointError(
            f"{source}: {len(broken)} tensors hold NaN or Inf values ({listed(broken)}); the LoRA is broken (a "
            "diverged training run?): use an earlier checkpoint of it"
        )


def _classify(key: str) -> tuple[Optional[str], Optional[str], Optional[int], Optional[tuple[str, Optional[int], int]]]:
    """(role, module name in the file, up block index, `_normalise_module` target or None) of one tensor key."""
    role, module, j = None, None, None
    if (match := _UP_BLOCK.match(key)):
        role, module, j = "up_block", match["m"], int(match["j"])
    elif (match := _DOWN.match(key)):
        role, module = "down", match["m"]
    elif (match := _UP.match(key)):
        role, module = "up", match["m"]
    elif key.endswith(".alpha_scale"):
        role, module = "alpha_scale", key[: -len(".alpha_scale")]
    elif key.endswith(".alpha"):
        role, module = "alpha", key[: -len(".alpha")]
    return role, module, j, _normalise_module(module) if module is not None else None


def parse_lora(tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None,
               source: str = "LoRA") -> dict[str, Adapter]:
    """Any supported layout -> `{official module path: Adapter}` (tensors in float32)."""
    groups: dict[str, dict[str, Any]] = {}
    unmatched: list[str] = []
    for key, value in tensors.items():
        role, module, j, target = _classify(key)
        if target is None:
            unmatched.append(key)
            continue
        group = groups.setdefault(module, {"target": target, "down": None, "ups": {}, "alpha": None, "alpha_scale": None})
        if role == "down":
            group["down"] = value
        elif role == "up":
            group["ups"][-1] = value
        elif role == "up_block":
            group["ups"][j] = value
        else:
            group[role] = float(value.float().reshape(-1)[0]) if value.numel() == 1 else None
            if group[role] is None:
                unmatched.append(key)
    if unmatched:
        raise _unmatched_error(source, unmatched, len(tensors))
    if not groups:
        raise CheckpointError(f"{source}: the file holds no tensors, so it is not a LoRA")
    _check_values(tensors, source)
    # The PEFT header is read only for adapters that carry no alpha of their own (so a damaged header refuses
    # just the files that depend on it), and parsed once.
    peft = functools.cache(lambda: _peft_config(metadata or {}, source))
    pieces: dict[str, dict[Optional[int], Adapter]] = {}
    slices: dict[str, int] = {}
    for module, group in groups.items():
        path, j, n = group["target"]
        where = f"{source}: '{module}'"
        ups = group["ups"]
        if group["down"] is None or not ups:
            raise CheckpointError(f"{where} lacks its {'down' if group['down'] is None else 'up'} weight")
        if -1 in ups and len(ups) > 1:
            raise CheckpointError(f"{where} has both a plain up weight and up blocks")
        if -1 not in ups and sorted(ups) != list(range(len(ups))):
            raise CheckpointError(f"{where}: up blocks {sorted(ups)} are not numbered 0..{len(ups) - 1}")
        up_list = [ups[-1]] if -1 in ups else [ups[k] for k in range(len(ups))]
        down, ups_float = group["down"].float(), [u.float() for u in up_list]
        Adapter(down, ups_float, 1.0).check(where)  # matrices that fit together, before their sizes are used
        total_rank = down.shape[0]
        if total_rank == 0:
            raise CheckpointError(f"{where} has rank 0 (down {tuple(down.shape)}): an empty adapter; "
                                  "the file is damaged or was exported wrongly")
        if group["alpha_scale"] is not None:
            scale = group["alpha_scale"]
        elif group["alpha"] is not None:
            scale = group["alpha"] / total_rank
        elif peft() is not None and (peft_scale := _peft_scale(peft(), _strip_prefix(module), total_rank, source)) is not None:
            scale = peft_scale
        else:
            scale = 1.0  # no alpha anywhere: alpha = rank, as ComfyUI and PEFT assume
        if scale == 0 or not math.isfinite(scale):
            raise CheckpointError(f"{where} has alpha {'0, so the LoRA would change nothing' if scale == 0 else scale}; "
                                  "the file is damaged or was exported wrongly (alpha is usually the rank)")
        adapter = Adapter(down, ups_float, float(scale))
        by_slice = pieces.setdefault(path, {})
        if j in by_slice:
            raise CheckpointError(f"{source}: '{path}' (or the same part of it) has two adapters in the file; "
                                  "it mixes naming schemes or holds two LoRAs")
        by_slice[j] = adapter
        if j is not None:
            slices[path] = n
    return {
        path: _as_block_diagonal(_merge_slices(by_slice, slices.get(path, 1), path, source), fused_parts(path))
        for path, by_slice in pieces.items()
    }


def read_lora_file(path: Union[str, Path]) -> tuple[dict[str, Adapter], dict[str, str]]:
    """(adapters, header metadata) of a LoRA safetensors file in any supported layout."""
    from safetensors import safe_open

    from longcat_tuner.model.inspect import read_safetensors_header

    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.safetensors"))
        raise CheckpointError(
            f"LoRA path {path} is a folder, not a file; give the LoRA .safetensors file itself"
            + (f" (in it: {', '.join(inside[:5])})" if inside else " (it holds no .safetensors file)")
        )
    if not path.is_file():
        if path.exists():
            raise CheckpointError(f"LoRA path {path} is not a regular file (a pipe, socket or device); give the LoRA "
                                  ".safetensors file itself")
        raise CheckpointError(f"LoRA file {path} does not exist; check the path (a LoRA is one .safetensors file)")
    # The header names an empty, truncated or pickled file, and a file of other keys (a whole model passed as a
    # LoRA), before any tensor is read.
    header = read_safetensors_header(path)
    unmatched = [key for key in header if _classify(key)[3] is None]
    if unmatched:
        raise _unmatched_error(str(path), unmatched, len(header))
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = dict(handle.metadata() or {})
    except Exception as err:
        raise CheckpointError(f"cannot read LoRA file {path}: {err}") from None
    peft = metadata
    if PEFT_METADATA_KEY not in metadata and (config := _adapter_config(path)) is not None:
        peft = {**metadata, PEFT_METADATA_KEY: config}  # read, not written into converted files' headers
    return parse_lora(tensors, peft, str(path)), metadata


PEFT_CONFIG_NAME = "adapter_config.json"  # PEFT's save_pretrained: adapter_model.safetensors + this (r, lora_alpha)


def _adapter_config(path: Path) -> Optional[str]:
    """The `adapter_config.json` PEFT writes beside its `adapter_model.safetensors` (the file itself holds no alpha),
    as JSON text of its LoRA fields; None for any other file or when there is none."""
    config_path = path.with_name(PEFT_CONFIG_NAME)
    if path.name != "adapter_model.safetensors" or not config_path.is_file():
        return None
    where = f"{config_path} (the PEFT config of {path.name}, which sets the LoRA's alpha)"
    try:
        if config_path.stat().st_size > 2**20:
            raise ValueError("larger than 1 MiB")
        config = json.loads(config_path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{where} cannot be read ({err}); fix or restore it") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} is not a JSON object; fix or restore it")
    alphas = {"lora_alpha": config.get("lora_alpha")}
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise CheckpointError(f"{where}: alpha_pattern is not an object ({patterns!r}); fix or restore it")
    alphas.update({f"alpha_pattern {k!r}": v for k, v in patterns.items()})
    for key, alpha in alphas.items():
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                                  or not math.isfinite(alpha) or alpha == 0):
            raise CheckpointError(f"{where}: {key} is {alpha!r}, not a finite non-zero number; fix or restore it")
    return json.dumps({k: config[k] for k in ("r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora")
                       if k in config})


def check_fits(linears: dict[str, tuple[int, int]], adapters: dict[str, Adapter], path: Union[str, Path]) -> None:
    """Refuse adapters (read from `path`) on layers that `linears` (`{module path: (in, out)}` of a DiT) lacks or
    whose sizes differ: a LoRA for another model, or for another size of this one."""
    unknown = [p for p in adapters if p not in linears]
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} LoRA modules are not linear layers of this DiT ({', '.join(unknown[:5])}); "
            f"is this a LoRA for another model or a model with fewer blocks?"
        )
    for module_path, item in adapters.items():
        in_features, out_features = linears[module_path]
        if item.in_features != in_features or item.out_features != out_features:
            raise CheckpointError(
                f"{path}: LoRA shapes for '{module_path}' (down {tuple(item.down.shape)}, up "
                f"{[tuple(u.shape) for u in item.ups]}) do not fit the layer [{out_features}, {in_features}]; "
                "is this a LoRA for another model or another size of it?"
            )


def check_fits_checkpoint(adapters: dict[str, Adapter], model: Union[str, Path], path: Union[str, Path]) -> None:
    """`check_fits` against the DiT that `model` (a checkpoint folder, or a DiT folder: `find_dit`) declares in its
    config.json, before minutes of loading it (and the text encoder)."""
    from longcat_tuner.model.config import DiTConfig
    from longcat_tuner.model.inspect import find_dit

    config = DiTConfig.from_file(find_dit(model) / "config.json")
    shapes = config.expected_shapes()
    check_fits({p: shapes[f"{p}.weight"][::-1] for p in official_linears(config.depth)}, adapters, path)


def check_targets(adapters: dict[str, Adapter], targets: Iterable[str], path: Union[str, Path]) -> None:
    """Refuse adapters (read from `path`) on layers that `lora_targets` gives no trainable adapter (the model's rule:
    a layer path equal to a target or ending with `.` + target): an `init_lora` that cannot start this run."""
    targets = tuple(targets)
    outside = [p for p in adapters if matching_target(p, targets) is None]
    if outside:
        raise CheckpointError(
            f"{path}: {len(outside)} LoRA modules have no trainable adapter here ({', '.join(outside[:5])}); "
            "add their layers to lora_targets, or use a LoRA trained for this model"
        )


def trainable_form(item: Adapter, module_path: str, parts: int, rank: int, path: Union[str, Path]) -> Adapter:
    """`item` (read from `path`) in the shape of the trainable adapter on `module_path` that it starts (`parts`
    blocks of `rank`), before zero-padding to that rank: a dense adapter on a 1-part layer as is, block-diagonal
    parts as one dense adapter. Refused (`CheckpointError`): a dense adapter where the trainer keeps per-projection
    blocks, and a rank above `rank` (lora_rank). `init_lora_from_file` and `check_init_lora` apply the same rule."""
    if item.parts != parts:
        if parts != 1:
            raise CheckpointError(
                f"{path}: '{module_path}' holds one dense adapter where this trainer keeps {parts} "
                "per-projection blocks; it cannot start from it exactly"
            )
        item = Adapter(item.down, [item.up_matrix()], item.scale)
    if item.rank > rank:
        raise CheckpointError(
            f"{path}: '{module_path}' has rank {item.rank}, above lora_rank {rank}; set lora_rank "
            f">= {item.rank} to start from this file"
        )
    return item


def check_init_lora(path: Union[str, Path], targets: Iterable[str], model: Union[str, Path, None],
                    rank: Optional[int] = None) -> None:
    """What `train` refuses about an `init_lora` file before it builds caches or loads a model, and `check` reports:
    an unreadable file, a LoRA for another model or size (against `model`'s dit/config.json alone; not compared when
    `model` is None), modules outside `targets` (lora_targets) and, given `rank` (lora_rank), an adapter the trainable
    one cannot hold (`trainable_form`: a rank above it, or a dense adapter on a layer trained in blocks)."""
    adapters, _ = read_lora_file(path)
    if model is not None:
        check_fits_checkpoint(adapters, model, path)
    check_targets(adapters, targets, path)
    if rank is not None:
        for module_path, item in adapters.items():
            trainable_form(item, module_path, fused_parts(module_path), rank, path)


# --- writing -----------------------------------------------------------------------------------------------


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """A float32 CPU copy that owns its memory: safetensors refuses to write tensors sharing storage (the one down
    matrix of a fused adapter, written for each of q, k and v)."""
    return t.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


def format_tensors(adapters: dict[str, Adapter], format: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the extra header entries of `adapters` written in `format`."""
    format = resolve_format(format)
    if not adapters:
        raise ConfigError("no LoRA adapters to write")
    tensors: dict[str, torch.Tensor] = {}
    header: dict[str, str] = {}
    items = sorted(adapters.items(), key=lambda kv: _sort_key(kv[0]))
    if format == "official":
        # LongCat's loader counts a layer's `lora_up.blocks.*` keys to build it, so a single adapter on a fused
        # layer (as PEFT, DiffSynth or musubi train attn.qkv) is written as one `lora_up.weight` and loads as is.
        rank = max(a.rank for a in adapters.values())
        header["lora_network_dim"] = str(rank)
        for path, adapter in items:
            adapter = adapter.padded(rank)
            base = OFFICIAL_PREFIX + path.replace(".", OFFICIAL_SEP)
            tensors[f"{base}.lora_down.weight"] = _cpu(adapter.down)
            if adapter.parts == 1:
                tensors[f"{base}.lora_up.weight"] = _cpu(adapter.ups[0])
            else:
                for j, up in enumerate(adapter.ups):
                    tensors[f"{base}.lora_up.blocks.{j}.weight"] = _cpu(up)
            tensors[f"{base}.alpha_scale"] = _scalar(adapter.scale)
    elif format == "comfyui-wanvideowrapper":
        for path, adapter in items:
            names = wrapper_names(path)
            for j, name in enumerate(names):
                down, up = (adapter.down, adapter.up_matrix()) if len(names) == 1 else adapter.row_slice(j, len(names))
                base = COMFY_PREFIX + name
                tensors[f"{base}.lora_down.weight"] = _cpu(down)
                tensors[f"{base}.lora_up.weight"] = _cpu(up)
                tensors[f"{base}.alpha"] = _scalar(adapter.scale * down.shape[0])
    elif format == "wan2gp":
        for path, adapter in items:
            base = COMFY_PREFIX + path
            tensors[f"{base}.lora_down.weight"] = _cpu(adapter.down)
            tensors[f"{base}.lora_up.weight"] = _cpu(adapter.up_matrix())
            tensors[f"{base}.alpha"] = _scalar(adapter.scale * adapter.down.shape[0])
    else:  # diffusers / PEFT, alpha in the header as SimpleTuner (diffusers' save_lora_weights) writes it
        ranks, alphas = {}, {}
        for path, adapter in items:
            base = DIFFUSERS_PREFIX + path
            tensors[f"{base}.lora_A.weight"] = _cpu(adapter.down)
            tensors[f"{base}.lora_B.weight"] = _cpu(adapter.up_matrix())
            ranks[path] = adapter.down.shape[0]
            alphas[path] = adapter.scale * adapter.down.shape[0]
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        config = {
            "r": r, "lora_alpha": alpha,
            "rank_pattern": {p: v for p, v in ranks.items() if v != r},
            "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha},
            "target_modules": sorted(ranks, key=_sort_key), "use_rslora": False, "use_dora": False,
            "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True,
        }
        header["format"] = "pt"
        header[PEFT_METADATA_KEY] = json.dumps({DIFFUSERS_PREFIX + k: v for k, v in config.items()}, indent=2, sort_keys=True)
    return tensors, header


def _sort_key(path: str) -> tuple:
    match = _BLOCK_PATH.match(path)
    return (0, int(match[1]), match[2]) if match else (1, 0, path)


# Header entries that describe a file's own layout: dropped when a file is converted to another.
_LAYOUT_HEADER_KEYS = ("longcat_tuner_format", "lora_network_dim", PEFT_METADATA_KEY, "format")


def write_lora_file(adapters: dict[str, Adapter], path: Union[str, Path], format: str,
                    metadata: Optional[dict[str, Any]] = None) -> Path:
    """Write `adapters` in `format` (to a temporary name, then renamed); `metadata` goes into the header."""
    from safetensors.torch import save_file

    from longcat_tuner.fsutil import atomic_file

    format = resolve_format(format)
    tensors, header = format_tensors(adapters, format)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()
            if k not in _LAYOUT_HEADER_KEYS}
    meta["longcat_tuner_format"] = format
    meta.update(header)
    path = Path(path)
    with atomic_file(path) as tmp:  # a failed write (disk full) leaves neither a partial file nor a temporary
        save_file(tensors, str(tmp), metadata=meta)
    return path


def convert_lora_file(source: Union[str, Path], target: Union[str, Path], format: str) -> Path:
    """Any supported layout -> `format`; the delta of every layer is unchanged, other header entries are kept."""
    adapters, metadata = read_lora_file(source)
    return write_lora_file(adapters, target, format, metadata)


def write_formats(adapters: dict[str, Adapter], folder: Union[str, Path], formats: Iterable[str],
                  metadata: Optional[dict[str, Any]] = None) -> dict[str, Path]:
    """Each format's file (`FILE_NAMES`) in `folder`; returns `{format: path}` in the order asked."""
    written: dict[str, Path] = {}
    for name in formats:
        name = resolve_format(name)
        if name not in written:
            written[name] = write_lora_file(adapters, Path(folder) / FILE_NAMES[name], name, metadata)
    return written
