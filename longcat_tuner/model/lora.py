"""LoRA adapters for the DiT: injection for training, and files in the official LongCat, ComfyUI and PEFT formats.

Adapters are attached from outside with forward hooks, so the model's own module tree and state-dict names
stay those of the official checkpoint. Application is un-merged, as in the official code:
`y = linear(x) + multiplier * alpha_scale * up(down(x))`.

Fused projections carry block-diagonal adapters (the official "n_seperate" scheme): `attn.qkv` (3 parts),
`cross_attn.kv_linear` (2), a block's `adaLN_modulation.1` (6), `final_layer.adaLN_modulation.1` (2). The down
projection is `[n*r, in]`; its output splits into n chunks of r, chunk j goes through up block j `[out/n, r]`,
and the results are concatenated. Training uses the same structure, so the official format is exact.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from longcat_tuner.config.training import DEFAULT_LORA_TARGETS
from longcat_tuner.errors import CheckpointError, ConfigError

DEFAULT_TARGETS = DEFAULT_LORA_TARGETS  # every linear of every block (see the config schema)
# Suffix -> number of block-diagonal parts; the first match wins (final_layer before blocks' adaLN).
FUSED_SPLITS = (
    ("final_layer.adaLN_modulation.1", 2),
    ("adaLN_modulation.1", 6),
    ("attn.qkv", 3),
    ("cross_attn.kv_linear", 2),
)
OFFICIAL_PREFIX = "lora___lorahyphen___"
OFFICIAL_SEP = "___lorahyphen___"
COMFY_PREFIX = "diffusion_model."
FORMATS = ("official", "comfyui")


def fused_parts(module_name: str) -> int:
    for suffix, parts in FUSED_SPLITS:
        if module_name == suffix or module_name.endswith("." + suffix):
            return parts
    return 1


class LoRAAdapter(nn.Module):
    """One adapter on one linear layer: `down` `[n*r, in]`, `up` `[n, out/n, r]`, `alpha_scale` a buffer."""

    def __init__(self, in_features: int, out_features: int, rank: int, parts: int, alpha_scale: float, *, dtype, device):
        super().__init__()
        if out_features % parts:
            raise ConfigError(f"cannot split {out_features} outputs into {parts} LoRA blocks")
        self.rank, self.parts = rank, parts
        self.down = nn.Parameter(torch.empty(parts * rank, in_features, dtype=dtype, device=device))
        self.up = nn.Parameter(torch.zeros(parts, out_features // parts, rank, dtype=dtype, device=device))
        self.register_buffer("alpha_scale", torch.tensor(float(alpha_scale), dtype=torch.float32, device=device))
        self.multiplier = 1.0
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update alone, `multiplier * alpha_scale * up(down(x))`, in the adapter's dtype (or autocast's)."""
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.down.dtype)
        h = nn.functional.linear(x, self.down)
        return nn.functional.linear(h * self.scale().to(h.dtype), self.up_matrix().to(h.dtype))

    def add_to(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`output + update(x)`, computed in `output`'s dtype, the up projection accumulating into `output`.

        One GEMM with beta=1 (`addmm`) reads the layer output once and writes the sum, where a separate
        update, scale and add would each pass over the `[tokens, out]` tensor (and its gradient) again:
        ~1 GB per projection at 480x832x93. The dtype is the layer's output dtype, autocast or not: a bf16
        projection gets a bf16 update (as autocast gives), a float32 layer (modulation, final layer) a
        float32 one (as the official float32 autocast region gives).
        """
        dtype = output.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = nn.functional.linear(x.to(dtype), self.down.to(dtype))
            h = h * self.scale().to(dtype)
            flat = torch.addmm(output.reshape(-1, output.shape[-1]), h.reshape(-1, h.shape[-1]), self.up_matrix().to(dtype).t())
        return flat.view(output.shape)

    def scale(self) -> torch.Tensor:
        return self.alpha_scale * self.multiplier

    def delta_weight(self) -> torch.Tensor:
        """The dense `[out, in]` update this adapter adds (for merging and for the ComfyUI export)."""
        return self.up_matrix() @ self.down * self.scale()

    def up_matrix(self) -> torch.Tensor:
        """`[out, n*r]`: the up blocks on the diagonal (a plain `[out, r]` view for one part)."""
        return self.up[0] if self.parts == 1 else torch.block_diag(*self.up.unbind(0))


def _adapter_hook(module: nn.Module, inputs, output):
    for adapter in module.lora_adapters.values():
        output = adapter.add_to(output, inputs[0])
    return output


def _attach(module: nn.Linear, name: str, adapter: LoRAAdapter) -> None:
    if not hasattr(module, "lora_adapters"):
        module.lora_adapters = nn.ModuleDict()
        module._lora_hook = module.register_forward_hook(_adapter_hook)
    if name in module.lora_adapters:
        raise ConfigError(f"a LoRA named '{name}' is already attached; remove it first or choose another name")
    module.lora_adapters[name] = adapter


def lora_modules(model: nn.Module, name: Optional[str] = None) -> dict[str, LoRAAdapter]:
    """`{module path: adapter}` of the adapters named `name` (all adapters when only one name exists)."""
    found = {}
    for path, module in model.named_modules():
        adapters = getattr(module, "lora_adapters", None)
        if not adapters:
            continue
        if name is None:
            if len(adapters) > 1:
                raise ConfigError(f"several LoRAs are attached ({', '.join(adapters)}); name the one you mean")
            found[path] = next(iter(adapters.values()))
        elif name in adapters:
            found[path] = adapters[name]
    return found


def remove_lora(model: nn.Module, name: Optional[str] = None) -> None:
    """Detach the adapter `name` (every adapter when None); the model is exactly as before."""
    for module in model.modules():
        adapters = getattr(module, "lora_adapters", None)
        if adapters is None:
            continue
        for key in [k for k in adapters if name is None or k == name]:
            del adapters[key]
        if not len(adapters):
            module._lora_hook.remove()
            del module._lora_hook
            del module.lora_adapters


def match_targets(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Linear layers whose path ends with one of `targets` (e.g. `attn.qkv` matches `blocks.7.attn.qkv`)."""
    targets = list(targets)
    names = [
        path for path, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(path == t or path.endswith("." + t) for t in targets)
    ]
    unmatched = [t for t in targets if not any(p == t or p.endswith("." + t) for p in names)]
    if unmatched:
        raise ConfigError(
            f"lora_targets {unmatched} match no linear layer of the DiT; valid examples: {', '.join(DEFAULT_TARGETS)}, "
            f"adaLN_modulation.1, final_layer.linear"
        )
    return names


def inject_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: Optional[float] = None,
    targets: Iterable[str] = DEFAULT_TARGETS,
    dtype: torch.dtype = torch.float32,
    name: str = "default",
    freeze_base: bool = True,
) -> dict[str, LoRAAdapter]:
    """Attach fresh trainable adapters (`up` zero, so the model output is unchanged) to the target layers."""
    if rank < 1:
        raise ConfigError(f"lora_rank must be >= 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    if freeze_base:
        model.requires_grad_(False)
    added = {}
    for path in match_targets(model, targets):
        linear = model.get_submodule(path)
        adapter = LoRAAdapter(
            linear.in_features, linear.out_features, rank, fused_parts(path), alpha / rank,
            dtype=dtype, device=linear.weight.device,
        )
        _attach(linear, name, adapter)
        added[path] = adapter
    return added


# --- files --------------------------------------------------------------------------------------------------


def lora_state_dict(model: nn.Module, *, format: str = "official", name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The adapters as a flat tensor dict in the official LongCat format or in ComfyUI (kohya-style) keys."""
    if format not in FORMATS:
        raise ConfigError(f"LoRA format '{format}' is unknown; choose one of {FORMATS}")
    out: dict[str, torch.Tensor] = {}
    for path, adapter in lora_modules(model, name).items():
        down = adapter.down.detach().float().cpu().contiguous()
        if format == "official":
            base = OFFICIAL_PREFIX + path.replace(".", OFFICIAL_SEP)
            out[f"{base}.lora_down.weight"] = down
            if adapter.parts == 1:
                out[f"{base}.lora_up.weight"] = adapter.up[0].detach().float().cpu().contiguous()
            else:
                for j in range(adapter.parts):
                    out[f"{base}.lora_up.blocks.{j}.weight"] = adapter.up[j].detach().float().cpu().contiguous()
            out[f"{base}.alpha_scale"] = adapter.alpha_scale.detach().float().cpu().clone()
        else:
            # A block-diagonal adapter is an ordinary LoRA of rank n*r with a block-diagonal up matrix.
            base = COMFY_PREFIX + path
            total_rank = down.shape[0]
            out[f"{base}.lora_down.weight"] = down
            out[f"{base}.lora_up.weight"] = adapter.up_matrix().detach().float().cpu().contiguous()
            out[f"{base}.alpha"] = (adapter.alpha_scale.detach().float().cpu() * total_rank).clone()
    if not out:
        raise ConfigError("the model has no LoRA attached: nothing to save")
    return out


def save_lora(
    model: nn.Module, path: Union[str, Path], *, format: str = "official", name: Optional[str] = None,
    metadata: Optional[dict] = None,
) -> Path:
    """Write the adapters to a safetensors file (written to a temporary name, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = lora_state_dict(model, format=format, name=name)
    meta = {"longcat_tuner_format": format}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


_UP_BLOCK = re.compile(r"^(?P<module>.+)\.lora_up\.blocks\.(?P<j>\d+)\.weight$")


def _parse_lora_tensors(tensors: dict[str, torch.Tensor], source: str) -> dict[str, dict]:
    """Normalise any supported key scheme to `{module path: {down, ups: [..], alpha_scale}}`."""
    modules: dict[str, dict] = {}

    def entry(path: str) -> dict:
        return modules.setdefault(path, {"down": None, "ups": {}, "alpha_scale": None, "alpha": None})

    for key, value in tensors.items():
        if key.startswith(OFFICIAL_PREFIX):
            key = key[len(OFFICIAL_PREFIX):].replace(OFFICIAL_SEP, ".")
        else:
            for prefix in ("diffusion_model.", "base_model.model.", "transformer.", "model.", "dit."):
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    break
        match = _UP_BLOCK.match(key)
        if match:
            entry(match["module"])["ups"][int(match["j"])] = value
        elif key.endswith((".lora_down.weight", ".lora_A.weight")):
            entry(key.rsplit(".", 2)[0])["down"] = value
        elif key.endswith((".lora_up.weight", ".lora_B.weight")):
            entry(key.rsplit(".", 2)[0])["ups"][0] = value
        elif key.endswith(".alpha_scale"):
            entry(key.rsplit(".", 1)[0])["alpha_scale"] = float(value)
        elif key.endswith(".alpha"):
            entry(key.rsplit(".", 1)[0])["alpha"] = float(value)
        else:
            raise CheckpointError(f"{source}: unrecognised LoRA key '{key}'")
    for path, item in modules.items():
        if item["down"] is None or not item["ups"]:
            raise CheckpointError(f"{source}: LoRA for '{path}' lacks its down or up weight")
    return modules


def load_lora(
    model: nn.Module, path: Union[str, Path], *, multiplier: float = 1.0, name: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
) -> str:
    """Attach a LoRA file (official LongCat, ComfyUI/kohya or PEFT keys) un-merged; returns the adapter name.

    Adapter weights are cast to the model's dtype unless `dtype` is given (the official code does the same).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:
        raise CheckpointError(f"cannot read LoRA file {path}: {err}") from None
    modules = _parse_lora_tensors(tensors, str(path))
    name = name or path.stem.replace(".", "_")
    existing = dict(model.named_modules())
    unknown = [p for p in modules if not isinstance(existing.get(p), nn.Linear)]
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} LoRA modules are not linear layers of this DiT ({', '.join(unknown[:5])}); "
            f"is this a LoRA for another model?"
        )
    for module_path, item in modules.items():
        linear = existing[module_path]
        down = item["down"]
        parts = len(item["ups"])
        ups = [item["ups"][j] for j in range(parts)]
        rank = ups[0].shape[1]
        if down.shape != (parts * rank, linear.in_features) or sum(u.shape[0] for u in ups) != linear.out_features:
            raise CheckpointError(
                f"{path}: LoRA shapes for '{module_path}' (down {tuple(down.shape)}, up {[tuple(u.shape) for u in ups]}) "
                f"do not fit the layer [{linear.out_features}, {linear.in_features}]"
            )
        if item["alpha_scale"] is not None:
            alpha_scale = item["alpha_scale"]
        elif item["alpha"] is not None:
            alpha_scale = item["alpha"] / down.shape[0]
        else:
            alpha_scale = 1.0
        adapter = LoRAAdapter(
            linear.in_features, linear.out_features, rank, parts, alpha_scale,
            dtype=dtype or _compute_dtype(linear), device=linear.weight.device,
        )
        with torch.no_grad():
            adapter.down.copy_(down)
            adapter.up.copy_(torch.stack(ups))
        adapter.requires_grad_(False)
        adapter.multiplier = float(multiplier)
        _attach(linear, name, adapter)
    return name


def _compute_dtype(linear: nn.Linear) -> torch.dtype:
    """The dtype a layer computes in: its weight's, or bf16 for 8-bit (quantized) weights."""
    dtype = linear.weight.dtype
    if dtype.is_floating_point and dtype.itemsize >= 2:
        return dtype
    bias = linear.bias
    return bias.dtype if bias is not None and bias.dtype.itemsize >= 2 else torch.bfloat16


@torch.no_grad()
def merge_lora(model: nn.Module, name: Optional[str] = None) -> None:
    """Fold adapters into the base weights (faster inference) and detach them."""
    modules = lora_modules(model, name)
    for path in modules:
        if model.get_submodule(path).weight.dtype.itemsize < 2:
            raise ConfigError(f"cannot merge a LoRA into the 8-bit weights of '{path}': keep it un-merged")
    for path, adapter in modules.items():
        linear = model.get_submodule(path)
        linear.weight += adapter.delta_weight().to(linear.weight.dtype)
    remove_lora(model, name)
