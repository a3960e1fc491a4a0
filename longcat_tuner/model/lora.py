"""LoRA adapters for the DiT: injection for training, and LoRA files (via `lora_formats`).

Adapters are attached from outside with forward hooks, so the model's own module tree and state-dict names
stay those of the official checkpoint. Application is un-merged, as in the official code:
`y = linear(x) + multiplier * alpha_scale * up(down(x))`; for inference `merge_lora_adapters` can instead
fold a file's adapters into the base weights (`sample --merge-loras`).

Fused projections carry block-diagonal adapters (the official "n_seperate" scheme): `attn.qkv` (3 parts),
`cross_attn.kv_linear` (2), a block's `adaLN_modulation.1` (6), `final_layer.adaLN_modulation.1` (2). The down
projection is `[n*r, in]`; its output splits into n chunks of r, chunk j goes through up block j `[out/n, r]`,
and the results are concatenated. Training uses the same structure, so the official format is exact.

Every file layout (official LongCat, ComfyUI-WanVideoWrapper, Wan2GP, diffusers/PEFT and the peer trainers'
layouts read on import) is known to `longcat_tuner.model.lora_formats` alone; this module turns attached
adapters into its `Adapter` records and back.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
import torch.nn as nn

from longcat_tuner.model.lora_names import DEFAULT_LORA_TARGETS, LORA_FILE_FORMATS, matching_target
from longcat_tuner.errors import CheckpointError, ConfigError
from longcat_tuner.model import lora_formats
from longcat_tuner.model.lora_formats import FUSED_SPLITS, fused_parts  # noqa: F401  (re-exported)

DEFAULT_TARGETS = DEFAULT_LORA_TARGETS  # every linear of every block (see the config schema)
FORMATS = LORA_FILE_FORMATS


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
        if isinstance(module, nn.Linear) and matching_target(path, targets) is not None
    ]
    unmatched = [t for t in targets if not any(matching_target(p, (t,)) is not None for p in names)]
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


def lora_adapters(model: nn.Module, name: Optional[str] = None) -> dict[str, lora_formats.Adapter]:
    """The attached adapters as layout-free records `{module path: Adapter}` (scale = alpha/rank, no multiplier)."""
    found = {
        path: lora_formats.Adapter(adapter.down.detach(), list(adapter.up.detach().unbind(0)), float(adapter.alpha_scale))
        for path, adapter in lora_modules(model, name).items()
    }
    if not found:
        raise ConfigError("the model has no LoRA attached: nothing to save")
    return found


def lora_state_dict(model: nn.Module, *, format: str = "official", name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The adapters as a flat tensor dict in one of `FORMATS` (see `lora_formats`)."""
    return lora_formats.format_tensors(lora_adapters(model, name), format)[0]


def save_lora(
    model: nn.Module, path: Union[str, Path], *, format: str = "official", name: Optional[str] = None,
    metadata: Optional[dict] = None,
) -> Path:
    """Write the adapters to a safetensors file in `format` (written to a temporary name, then renamed)."""
    return lora_formats.write_lora_file(lora_adapters(model, name), path, format, metadata)


def save_lora_formats(
    model: nn.Module, folder: Union[str, Path], formats: Iterable[str], *, name: Optional[str] = None,
    metadata: Optional[dict] = None,
) -> dict[str, Path]:
    """One file per format in `folder` (names from `lora_formats.FILE_NAMES`); `{format: path}`."""
    return lora_formats.write_formats(lora_adapters(model, name), folder, formats, metadata)


def load_lora(
    model: nn.Module, path: Union[str, Path], *, multiplier: float = 1.0, name: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
) -> str:
    """Attach a LoRA file in any supported layout un-merged; returns the adapter name.

    Adapter weights are cast to the model's dtype unless `dtype` is given (the official code does the same).
    """
    path = Path(path)
    adapters, _ = lora_formats.read_lora_file(path)
    return attach_lora_adapters(model, adapters, path, multiplier=multiplier,
                                name=name or path.stem.replace(".", "_"), dtype=dtype)


def _check_fits(model: nn.Module, adapters: dict[str, lora_formats.Adapter], path: Path) -> dict[str, nn.Linear]:
    """`{module path: linear}` for `adapters` (read from `path`); a module or shape the DiT lacks is an error."""
    linears = {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    lora_formats.check_fits({p: (m.in_features, m.out_features) for p, m in linears.items()}, adapters, path)
    return {module_path: linears[module_path] for module_path in adapters}


def attach_lora_adapters(
    model: nn.Module, adapters: dict[str, lora_formats.Adapter], path: Union[str, Path], *, multiplier: float = 1.0,
    name: str, dtype: Optional[torch.dtype] = None,
) -> str:
    """`load_lora` for adapters already read from `path` (`lora_formats.read_lora_file`): `sample` reads its
    files before minutes of model loading, so a bad file is named at once."""
    if not math.isfinite(multiplier):
        raise ConfigError(f"LoRA multiplier for {path} is {multiplier}; give a finite number such as 1.0")
    existing = _check_fits(model, adapters, Path(path))
    if any(name in getattr(linear, "lora_adapters", {}) for linear in existing.values()):  # before attaching any
        raise ConfigError(f"a LoRA named '{name}' is already attached; remove it first or choose another name")
    for module_path, item in adapters.items():
        linear = existing[module_path]
        adapter = LoRAAdapter(
            linear.in_features, linear.out_features, item.rank, item.parts, item.scale,
            dtype=dtype or _compute_dtype(linear), device=linear.weight.device,
        )
        with torch.no_grad():
            adapter.down.copy_(item.down)
            adapter.up.copy_(torch.stack(item.ups))
        adapter.requires_grad_(False)
        adapter.multiplier = float(multiplier)
        _attach(linear, name, adapter)
    return name


def init_lora_from_file(model: nn.Module, path: Union[str, Path], *, name: str = "default") -> int:
    """Start the trainable adapters `name` from a LoRA file in any supported layout; returns the count set.

    Each adapter in the file must sit on a layer that has a trainable adapter, with a rank (per fused
    part) no larger than the trainable one: its weights are zero-padded to that rank and its `up` rescaled
    by file scale / trainable scale, so every delta weight equals the file's exactly. Layers the file does
    not cover keep fresh adapters (no update); a file layer with no trainable adapter is an error.
    """
    path = Path(path)
    items, _ = lora_formats.read_lora_file(path)
    trainable = lora_modules(model, name)
    missing = sorted(set(items) - set(trainable))
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} LoRA modules have no trainable adapter here ({', '.join(missing[:5])}); "
            "add their layers to lora_targets, or use a LoRA trained for this model"
        )
    _check_fits(model, items, path)
    for module_path, item in items.items():
        adapter = trainable[module_path]
        # The rule `check_init_lora` applies before the model loads (`train`, `check`).
        item = lora_formats.trainable_form(item, module_path, adapter.parts, adapter.rank, path).padded(adapter.rank)
        ratio = item.scale / float(adapter.alpha_scale)
        with torch.no_grad():
            adapter.down.copy_(item.down)
            adapter.up.copy_(torch.stack([u.float() * ratio for u in item.ups]))
    return len(items)


def _compute_dtype(linear: nn.Linear) -> torch.dtype:
    """The dtype a layer computes in: its weight's, or bf16 for 8-bit (quantized) weights."""
    dtype = linear.weight.dtype
    if dtype.is_floating_point and dtype.itemsize >= 2:
        return dtype
    bias = linear.bias
    return bias.dtype if bias is not None and bias.dtype.itemsize >= 2 else torch.bfloat16


def _refuse_8bit(linears: dict[str, nn.Linear], what: str) -> None:
    """Before any weight changes: merging into 8-bit weights is refused (nothing is half-merged)."""
    low = [path for path, linear in linears.items() if linear.weight.dtype.itemsize < 2]
    if low:
        raise ConfigError(f"cannot merge {what} into the 8-bit weights of '{low[0]}': merge before the base weights "
                          "are stored in 8 bits, or keep it un-merged")


def _fold(linear: nn.Linear, delta: torch.Tensor, device: Optional[torch.device]) -> None:
    """`linear.weight += delta`, summed in float32 on `device` (default: the weight's) and rounded once."""
    weight = linear.weight
    device = device or weight.device
    merged = weight.detach().to(device, torch.float32) + delta.to(device, torch.float32)
    weight.data.copy_(merged.to(weight.dtype))


@torch.no_grad()
def merge_lora(model: nn.Module, name: Optional[str] = None) -> None:
    """Fold attached adapters into the base weights (faster inference) and detach them."""
    modules = lora_modules(model, name)
    _refuse_8bit({path: model.get_submodule(path) for path in modules}, "a LoRA")
    for path, adapter in modules.items():
        linear = model.get_submodule(path)
        with torch.autocast(device_type=linear.weight.device.type, enabled=False):
            delta = adapter.up_matrix().float() @ adapter.down.float() * adapter.scale()
        _fold(linear, delta, None)
    remove_lora(model, name)


@torch.no_grad()
def merge_lora_adapters(
    model: nn.Module, adapters: dict[str, lora_formats.Adapter], path: Union[str, Path], *, multiplier: float = 1.0,
    device: Optional[torch.device] = None,
) -> int:
    """Fold adapters read from `path` (`lora_formats.read_lora_file`) into the base weights; returns the count.

    The inference alternative to `attach_lora_adapters`: afterwards a forward costs what the plain model's
    costs. Each weight becomes `round(weight + multiplier * scale * up @ down)`, summed in float32 from the
    file's own values (not from adapters cast to the model's dtype) and rounded to the weight's dtype once;
    `device` (e.g. the GPU while the model sits on the host) is where that arithmetic runs. 8-bit weights
    are refused: merge before `runtime.prepare_base_weights` stores them in 8 bits.
    """
    if not math.isfinite(multiplier):
        raise ConfigError(f"LoRA multiplier for {path} is {multiplier}; give a finite number such as 1.0")
    existing = _check_fits(model, adapters, Path(path))
    _refuse_8bit(existing, str(path))
    for module_path, item in adapters.items():
        linear = existing[module_path]
        at = device or linear.weight.device
        with torch.autocast(device_type=torch.device(at).type, enabled=False):
            on_device = lora_formats.Adapter(item.down.to(at), [u.to(at) for u in item.ups], item.scale * float(multiplier))
            _fold(linear, on_device.delta(), at)
    return len(adapters)
