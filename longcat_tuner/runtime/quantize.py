"""Low-precision storage for the frozen base weights (`base_model_precision`).

`fp8-torchao` and `int8-quanto` keep the guide's names but run on our own small weight-only scheme,
written on plain PyTorch (no torchao or optimum-quanto needed at run time; optimum-quanto is
unmaintained, and torchao's APIs move between releases):

* each targeted `nn.Linear` weight `[out, in]` is stored as float8 (e4m3) or int8 with one float32 scale
  per output row (`scale = max|row| / qmax`), halving the bf16 bytes;
* compute stays in the activation dtype (bf16 on GPU): the weight is dequantized per layer call and the
  dequantized copy is not kept for backward (the backward pass dequantizes again), so activation memory
  is the same as with bf16 weights;
* the module stays an `nn.Linear` (its class becomes a subclass), so LoRA's `match_targets` and the forward
  hooks of `lora.py` keep working on top; block swap moves the quantized weight and its scale.

Only the large linear layers inside the DiT blocks are quantized by default. Float32 layers
(`FP32Linear`: adaLN modulation, timestep MLP, final layer), embedders and adapters keep their dtype.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from longcat_tuner.errors import ConfigError
from longcat_tuner.model.layers import FP32Linear
from longcat_tuner.model.lora_names import matching_target

PRECISIONS = ("no_change", "bf16", "fp32", "int8-quanto", "fp8-torchao")
QUANTIZED = {"fp8-torchao": torch.float8_e4m3fn, "int8-quanto": torch.int8}
DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
                   "ffn.w1", "ffn.w2", "ffn.w3")


def _qmax(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max) if dtype.is_floating_point else float(torch.iinfo(dtype).max)


def quantize_rows(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantized weight, float32 per-row scale) with `weight ~= quantized * scale[:, None]`."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1).clamp(min=1e-12)
    scale = amax / _qmax(dtype)
    scaled = w / scale[:, None]
    if dtype.is_floating_point:
        q = scaled.clamp(-_qmax(dtype), _qmax(dtype)).to(dtype)
    else:
        q = scaled.round().clamp(-_qmax(dtype), _qmax(dtype)).to(dtype)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)[:, None]


class _WeightOnlyLinear(torch.autograd.Function):
    """`x @ dequant(W).T + b`, saving the quantized weight (not the dequantized copy) for backward."""

    @staticmethod
    def forward(ctx, x, qweight, scale, bias):
        weight = dequantize_rows(qweight, scale, x.dtype)
        ctx.save_for_backward(qweight, scale)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        qweight, scale = ctx.saved_tensors
        grad_x = grad_out @ dequantize_rows(qweight, scale, grad_out.dtype)
        return grad_x, None, None, None


class QuantizedLinear(nn.Linear):
    """An `nn.Linear` whose frozen `weight` is float8/int8 with a per-row `weight_scale` buffer."""

    weight_scale: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype not in QUANTIZED.values():
            # `model.to(dtype)` casts float8 weights like any float tensor, which would silently drop the scales.
            raise RuntimeError(
                f"quantized weight was cast to {self.weight.dtype}: call model.to(dtype) before quantizing, "
                "never after"
            )
        return _WeightOnlyLinear.apply(x, self.weight, self.weight_scale, self.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_rows(self.weight, self.weight_scale, dtype)

    @classmethod
    def convert(cls, linear: nn.Linear, dtype: torch.dtype) -> "QuantizedLinear":
        """Turn `linear` into a QuantizedLinear in place (same object: hooks and adapters stay)."""
        q, scale = quantize_rows(linear.weight, dtype)
        linear.__class__ = cls
        linear.weight = nn.Parameter(q, requires_grad=False)
        linear.register_buffer("weight_scale", scale)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        return linear


def _matches(path: str, targets: Iterable[str]) -> bool:
    return matching_target(path, targets) is not None


def quantize_base_weights(
    dit: nn.Module,
    precision: str,
    *,
    targets: Iterable[str] = DEFAULT_TARGETS,
    skip: Iterable[str] = (),
) -> int:
    """Store the targeted frozen linear weights of `dit` as `precision`; returns how many layers changed.

    `precision` is `fp8-torchao` (float8 e4m3, per-row scales) or `int8-quanto` (int8, per-row scales).
    Layers whose path ends with one of `skip` are left alone. Call before attaching block swap; LoRA
    adapters may be attached before or after.
    """
    if precision not in QUANTIZED:
        raise ConfigError(f"base_model_precision '{precision}' is not a quantized format; choose one of {tuple(QUANTIZED)}")
    dtype = QUANTIZED[precision]
    targets, skip = tuple(targets), tuple(skip)
    count = 0
    for path, module in dit.named_modules():
        if ".lora_adapters" in f".{path}" or type(module) is not nn.Linear or isinstance(module, FP32Linear):
            continue
        if not _matches(path, targets) or _matches(path, skip):
            continue
        if module.weight.requires_grad:
            raise ConfigError(
                f"base_model_precision '{precision}' quantizes frozen weights, but '{path}.weight' is "
                f"trainable: use model_type 'lora' or base_model_precision 'bf16'"
            )
        QuantizedLinear.convert(module, dtype)
        count += 1
    if count == 0:
        raise ConfigError(f"base_model_precision '{precision}': no linear layer matched {targets}")
    return count


def apply_base_precision(dit: nn.Module, precision: str, *, device: torch.device) -> Optional[int]:
    """Apply `base_model_precision`: cast (`bf16`, `fp32`, `no_change`) or quantize the frozen weights.

    `no_change` means bf16 on CUDA and float32 elsewhere. Quantized formats first make the model bf16 on
    CUDA (float32 elsewhere) for the layers they leave alone. Returns the number of quantized layers.
    It casts the whole model, so call it before `inject_lora` (adapters keep their own dtype) and before
    block swap, and never call `model.to(dtype)` afterwards.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"base_model_precision '{precision}' is unknown; choose one of {PRECISIONS}")
    device = torch.device(device)
    if precision == "fp32":
        dit.to(torch.float32)
        return None
    if precision == "bf16" or device.type == "cuda":
        dit.to(torch.bfloat16)
    else:
        dit.to(torch.float32)
    if precision in QUANTIZED:
        return quantize_base_weights(dit, precision)
    return None


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by parameters and buffers (what the base model costs in memory)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
