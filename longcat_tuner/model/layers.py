"""Building blocks of the LongCat-Video DiT: norms, 3-D RoPE, embedders, SwiGLU, and the fp32 linear.

Numerics follow MODEL.md section 9: modulation, norms, RoPE and the final layer compute in float32 even
when the weights and the residual stream are bfloat16.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from longcat_tuner.model.eager_cache import eager_cache


class FP32Linear(nn.Linear):
    """A linear layer that always computes in float32 (the official code runs it under fp32 autocast).

    Autocast is switched off inside, so a bf16 training autocast cannot lower the modulation and final
    layer to bf16.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float(), bias)


def layer_norm_fp32(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Affine-free LayerNorm computed in float32; returns float32."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


class AffineLayerNormFP32(nn.LayerNorm):
    """LayerNorm with weight and bias, computed in float32, returned in the input dtype (`pre_crs_attn_norm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


class RMSNorm(nn.Module):
    """q/k RMSNorm over head_dim: normalise in float32, cast back, then multiply by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def modulate_fp32(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`LN(x) * (1 + scale) + shift` in float32; x is `[B, T, S, C]`, shift/scale `[B, T, 1, C]`."""
    return layer_norm_fp32(x) * (1 + scale) + shift


# --- 3-D rotary position embedding (MODEL.md section 1.4) -------------------------------------------------


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Split of head_dim over (t, h, w): 44/42/42 for head_dim 128."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


@eager_cache(maxsize=32)
def _rope_tables(grid: tuple[int, int, int], head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    angles = []
    for size, dim, axis in zip(grid, rope_axis_dims(head_dim), range(3)):
        freqs = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        pos = torch.arange(size, dtype=torch.float32, device=device)
        ang = torch.outer(pos, freqs).repeat_interleave(2, dim=-1)  # interleaved pairs: (a0, a0, a1, a1, ...)
        shape = [1, 1, 1, dim]
        shape[axis] = size
        angles.append(ang.view(shape).expand(*grid, dim))
    full = torch.cat(angles, dim=-1).reshape(-1, head_dim)  # tokens in (t, h, w) row-major order, [t | h | w]
    return full.cos(), full.sin()


def rope_tables(grid: tuple[int, int, int], head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, `[T*H*W, head_dim]` in float32, for integer positions on the token grid (cached per grid
    in eager mode, traced under torch.compile: `eager_cache`)."""
    return _rope_tables(tuple(int(g) for g in grid), head_dim, torch.device(device))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-J style (interleaved) rotation in float32: pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
    x32 = x.float()
    pairs = x32.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x32 * cos + rotated * sin).to(x.dtype)


# --- embedders --------------------------------------------------------------------------------------------


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """`[cos(t f), sin(t f)]` with `f_i = exp(-ln(max_period) i / (dim/2))`; t unscaled in [0, 1000]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """sinusoid -> Linear -> SiLU -> Linear, all in float32 (`t_embedder.mlp`)."""

    def __init__(self, out_dim: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            FP32Linear(frequency_embedding_size, out_dim), nn.SiLU(), FP32Linear(out_dim, out_dim)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_sinusoid(t, self.frequency_embedding_size))


class CaptionEmbedder(nn.Module):
    """Linear -> GELU(tanh) -> Linear from the text encoder width to the DiT width (`y_embedder.y_proj`)."""

    def __init__(self, in_channels: int, hidden_size: int):
        super().__init__()
        self.y_proj = nn.Sequential(
            nn.Linear(in_channels, hidden_size), nn.GELU(approximate="tanh"), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = patch size; output tokens in (t, h, w) row-major order (`x_embedder`)."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class SwiGLU(nn.Module):
    """`w2(silu(w1 x) * w3 x)`, bias-free."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
