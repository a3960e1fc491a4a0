"""float8 compute for the frozen linear layers of the DiT (`base_model_precision: fp8-compute`).

The frozen block linears are stored as `fp8-torchao` stores them (`runtime/quantize.py`: float8 e4m3 with
one float32 scale per output row, quantized once when the model is prepared) and, beyond that, their
matmuls run in float8 (`torch._scaled_mm`, rowwise scales) instead of dequantizing the weight to bf16:

* forward and the checkpointed recompute (the same forward, run again): `y = x @ W.T + b` with `x`
  quantized per token (row) to e4m3 and `W` the stored e4m3 weight with its per-output-row scale, so
  `y[m, n] = sx[m] * sw[n] * sum_k xq[m, k] * wq[n, k]`: both scales are those of `_scaled_mm`'s rowwise
  mode (`scale_a` `[M, 1]`, `scale_b` `[1, N]`), accumulated in float32;
* input gradient `dX = dY @ W = (dY * sw) @ Wq`: the weight's per-row scale (a scale along the
  contraction dimension, which no output scale can express) is folded into the output gradient before
  it is quantized per token, so the stored e4m3 weight is used as it is (no second copy, no
  re-quantization); the gradient is quantized to e4m3 as well (`GRAD_DTYPE`, see below);
* the frozen weight gets no gradient, and nothing of the activation is saved for backward (the weight
  gradient, the only thing that would need `x`, is never computed).

Gradients in e4m3, not e5m2: e5m2 exists for gradients under one scale per tensor, where the range of
a whole tensor must fit. With one scale per row the largest value of each row maps to 448 and e4m3 still
resolves values 2**17 times smaller (subnormals included), below which a term cannot matter to that
row's dot products; e4m3's extra mantissa bit halves the rounding error. bench/bench_fp8_quality.py
measures both on real gradients of the tiny DiT.

LoRA adapters are untouched: they hang on the same `nn.Linear` through its forward hook (`model/lora.py`)
and add their bf16/float32 update to this layer's output with exact gradients. The model knows nothing of
this; `runtime.apply.prepare_base_weights` converts the layers when the settings ask for `fp8-compute`.
On CUDA every converted layer needs in/out features divisible by 16 (`_scaled_mm`); a layer that is not
keeps the weight-only path of `fp8-torchao` (same storage, bf16 compute).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from longcat_tuner.runtime.quantize import QUANTIZED, QuantizedLinear, quantize_base_weights

FP8_COMPUTE = "fp8-compute"
STORAGE = "fp8-torchao"  # the stored weights are exactly fp8-torchao's
WEIGHT_DTYPE = QUANTIZED[STORAGE]  # float8 e4m3
ACTIVATION_DTYPE = torch.float8_e4m3fn
GRAD_DTYPE = torch.float8_e4m3fn  # see the module docstring (e5m2 measured in bench/bench_fp8_quality.py)
ALIGNMENT = 16  # _scaled_mm on CUDA: the contraction and output dimensions are multiples of 16


def quantize_per_row(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 `x` `[M, K]`, float32 scale `[M, 1]`) with `x ~= q * scale`, one scale per row.

    Unlike `quantize.quantize_rows` (made once per weight), this runs on every activation and gradient:
    it makes no float32 copy of `x` (the row maxima come from a norm reduction, the scaling is one
    multiply in `x`'s dtype), which matters at 37,440 tokens in eager mode.
    """
    if x.dtype not in (torch.bfloat16, torch.float32):
        x = x.float()  # float16 would overflow on qmax / amax
    qmax = torch.finfo(dtype).max
    amax = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True).float().clamp_(min=1e-12)
    # The largest element lands on qmax (within x's rounding, far from the 464 where e4m3 would overflow).
    q = (x * (qmax / amax).to(x.dtype)).to(dtype)
    return q, amax / qmax


def _matmul_dtype(device: torch.device, out_dtype: torch.dtype) -> torch.dtype:
    # CUDA's rowwise-scaled kernels write bf16 only; the CPU kernel writes any float dtype.
    return torch.bfloat16 if device.type == "cuda" else out_dtype


class Fp8Linear(torch.autograd.Function):
    """`x @ dequant(W).T + b` as a float8 matmul; backward gives `x` its float8 gradient and nothing else."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                out_dtype: torch.dtype) -> torch.Tensor:
        lead, features = x.shape[:-1], x.shape[-1]
        with torch.autocast(x.device.type, enabled=False):  # the dtypes below are chosen here, not by autocast
            xq, x_scale = quantize_per_row(x.reshape(-1, features), ACTIVATION_DTYPE)
            out = torch._scaled_mm(xq, qweight.t(), scale_a=x_scale, scale_b=scale[None, :],
                                   out_dtype=_matmul_dtype(x.device, out_dtype))
        if bias is not None:
            out = out + bias.to(out.dtype)
        ctx.save_for_backward(qweight, scale)
        ctx.input_shape, ctx.input_dtype = x.shape, x.dtype
        return out.to(out_dtype).view(*lead, qweight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        qweight, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        grad = grad_out.reshape(-1, qweight.shape[0])
        with torch.autocast(grad.device.type, enabled=False):
            # dY @ W = (dY * sw) @ Wq: the weight's row scale moves onto the gradient's columns.
            gq, g_scale = quantize_per_row(grad * scale.to(grad.dtype), GRAD_DTYPE)
            ones = torch.ones(1, qweight.shape[1], dtype=torch.float32, device=qweight.device)
            weight_cols = qweight.t().contiguous().t()  # [out, in] column-major: _scaled_mm's second operand
            grad_x = torch._scaled_mm(gq, weight_cols, scale_a=g_scale, scale_b=ones,
                                      out_dtype=_matmul_dtype(grad.device, ctx.input_dtype))
        return grad_x.to(ctx.input_dtype).view(ctx.input_shape), None, None, None, None


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear` would return for `x` here: autocast's when it is on, else `x`'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class Fp8ComputeLinear(QuantizedLinear):
    """A `QuantizedLinear` (float8 e4m3 weight, per-row `weight_scale`) whose matmuls run in float8."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != WEIGHT_DTYPE:
            return super().forward(x)  # raises: the weight was cast after quantization
        return Fp8Linear.apply(x, self.weight, self.weight_scale, self.bias, output_dtype(x))


def fits_fp8_matmul(linear: nn.Linear) -> bool:
    return linear.in_features % ALIGNMENT == 0 and linear.out_features % ALIGNMENT == 0


def convert_to_fp8_compute(dit: nn.Module, **targets) -> int:
    """Store the frozen block linears of `dit` in float8 (`quantize_base_weights`, fp8-torchao's format) and
    run their matmuls in float8; returns how many layers compute in float8.

    `targets` / `skip` are those of `quantize_base_weights`. Layers whose sizes `_scaled_mm` cannot take
    (not multiples of 16) keep fp8-torchao's weight-only compute.
    """
    quantize_base_weights(dit, STORAGE, **targets)
    count = 0
    for module in dit.modules():
        if type(module) is QuantizedLinear and module.weight.dtype == WEIGHT_DTYPE and fits_fp8_matmul(module):
            module.__class__ = Fp8ComputeLinear
            count += 1
    return count
