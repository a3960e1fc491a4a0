"""The LongCat-Video diffusion transformer (`LongCatVideoTransformer3DModel`), written from MODEL.md.

Reads like the model: attention layers, the single-stream block, the final layer, then the DiT whose
`forward` runs in numbered sections. It knows nothing of training: checkpointing, block swap, LoRA and
quantization are applied from outside (`hooks.py`, `lora.py`, `longcat_tuner/train`).

Conditioning (MODEL.md 1.6): the first `num_cond_latents` latent frames are clean condition frames.
Their tokens attend only to each other and get exactly zero cross-attention; noisy tokens attend to all.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn

from longcat_tuner.errors import ShapeError
from longcat_tuner.model.attention import AttentionOptions, attention, validate_backend_name
from longcat_tuner.model.config import DiTConfig
from longcat_tuner.model.layers import (
    AffineLayerNormFP32,
    CaptionEmbedder,
    FP32Linear,
    PatchEmbed,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    apply_rope,
    modulate_fp32,
    rope_tables,
)

Grid = tuple[int, int, int]


@dataclasses.dataclass
class LayerKV:
    """Keys and values of the condition tokens for one block (after q/k-norm and RoPE)."""

    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    recording: bool = False


@dataclasses.dataclass
class KVCache:
    """Condition-latent KV cache (video continuation): built once by `LongCatDiT.build_kv_cache`."""

    cond_frames: int
    layers: list[LayerKV]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.options = AttentionOptions()
        self.sequence_parallel = None  # set from outside (sequence_parallel.py): all-to-all around attention

    def forward(self, x: torch.Tensor, grid: Grid, num_cond_latents: int, kv: Optional[LayerKV]) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        local_grid, sp = grid, self.sequence_parallel
        if sp is not None:  # this rank's rows of all heads -> all tokens of this rank's heads
            q, k, v, grid = sp.gather_sequence(q, k, v, grid)
        N = q.shape[2]

        if kv is not None and not kv.recording:
            # KV-cache call: only noisy tokens are fed; positions continue after the cached condition frames.
            full_grid = (kv.k.shape[2] // (grid[1] * grid[2]) + grid[0], grid[1], grid[2])
            cos, sin = rope_tables(full_grid, self.head_dim, x.device)
            q, k = apply_rope(q, cos[-N:], sin[-N:]), apply_rope(k, cos[-N:], sin[-N:])
            k, v = torch.cat([kv.k, k], dim=2), torch.cat([kv.v, v], dim=2)
            out = attention(q, k, v, q_grid=grid, k_grid=full_grid, options=self.options)
        else:
            cos, sin = rope_tables(grid, self.head_dim, x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if kv is not None:
                kv.k, kv.v = k.detach(), v.detach()
            n_cond = num_cond_latents * grid[1] * grid[2]
            if 0 < n_cond < N:
                cond_grid = (num_cond_latents, grid[1], grid[2])
                noisy_grid = (grid[0] - num_cond_latents, grid[1], grid[2])
                cond = attention(
                    q[:, :, :n_cond], k[:, :, :n_cond], v[:, :, :n_cond],
                    q_grid=cond_grid, k_grid=cond_grid, options=self.options,
                )
                noisy = attention(q[:, :, n_cond:], k, v, q_grid=noisy_grid, k_grid=grid, options=self.options)
                out = torch.cat([cond, noisy], dim=2)
            else:
                out = attention(q, k, v, q_grid=grid, k_grid=grid, options=self.options)
        if sp is not None:
            out = sp.scatter_sequence(out, local_grid)
        return self.proj(out.transpose(1, 2).reshape(B, -1, C))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim, bias=True)
        self.kv_linear = nn.Linear(dim, 2 * dim, bias=True)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.options = AttentionOptions()

    def forward(
        self, x: torch.Tensor, y: Optional[torch.Tensor], key_mask: Optional[torch.Tensor], n_cond_tokens: int
    ) -> torch.Tensor:
        B, N, C = x.shape
        if n_cond_tokens >= N:  # only condition tokens: they never query the text
            return torch.zeros_like(x)
        queries = x[:, n_cond_tokens:]
        q = self.q_linear(queries).view(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_linear(y).view(B, y.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        out = attention(q, k, v, key_mask=key_mask, options=self.options)
        out = self.proj(out.transpose(1, 2).reshape(B, -1, C))
        if n_cond_tokens:
            # Zero after the projection: no bias reaches condition tokens (MODEL.md clarification 2).
            out = torch.cat([out.new_zeros(B, n_cond_tokens, C), out], dim=1)
        return out


class LongCatBlock(nn.Module):
    """Single-stream block: modulated self-attention, plain cross-attention, modulated SwiGLU."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.hidden_size
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), FP32Linear(config.adaln_tembed_dim, 6 * dim))
        self.attn = SelfAttention(dim, config.num_heads)
        self.pre_crs_attn_norm = AffineLayerNormFP32(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, config.num_heads)
        self.ffn = SwiGLU(dim, config.ffn_hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        y: Optional[torch.Tensor],
        t: torch.Tensor,
        grid: Grid,
        num_cond_latents: int = 0,
        key_mask: Optional[torch.Tensor] = None,
        kv: Optional[LayerKV] = None,
    ) -> torch.Tensor:
        B, N, C = x.shape
        frames = grid[0]
        dtype = x.dtype
        # Per-frame modulation in float32: shift, scale, gate for attention, then for the FFN.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(t).unsqueeze(2).chunk(6, dim=-1)
        )

        h = modulate_fp32(x.view(B, frames, -1, C), shift_msa, scale_msa).to(dtype)
        h = self.attn(h.view(B, N, C), grid, num_cond_latents, kv)
        x = (x.view(B, frames, -1, C).float() + gate_msa * h.view(B, frames, -1, C).float()).to(dtype).view(B, N, C)

        n_cond_tokens = num_cond_latents * grid[1] * grid[2]
        x = x + self.cross_attn(self.pre_crs_attn_norm(x), y, key_mask, n_cond_tokens)

        h = modulate_fp32(x.view(B, frames, -1, C), shift_mlp, scale_mlp).to(dtype)
        h = self.ffn(h.view(B, N, C))
        return (x.view(B, frames, -1, C).float() + gate_mlp * h.view(B, frames, -1, C).float()).to(dtype).view(B, N, C)


class FinalLayer(nn.Module):
    """Modulated LayerNorm (shift first, no gate) and the output linear, all in float32."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        patch_volume = config.patch_size[0] * config.patch_size[1] * config.patch_size[2]
        self.linear = FP32Linear(config.hidden_size, patch_volume * config.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), FP32Linear(config.adaln_tembed_dim, 2 * config.hidden_size))

    def forward(self, x: torch.Tensor, t: torch.Tensor, grid: Grid) -> torch.Tensor:
        B, N, C = x.shape
        shift, scale = self.adaLN_modulation(t).unsqueeze(2).chunk(2, dim=-1)
        return self.linear(modulate_fp32(x.view(B, grid[0], -1, C), shift, scale).view(B, N, C))


class LongCatDiT(nn.Module):
    """LongCat-Video DiT. Output: float32 prediction of `x0 - noise` (the sampler negates it)."""

    _repeated_blocks = ("blocks",)  # capability attribute read by checkpointing / block swap / FSDP helpers

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, dim)
        self.t_embedder = TimestepEmbedder(config.adaln_tembed_dim, config.frequency_embedding_size)
        self.y_embedder = CaptionEmbedder(config.caption_channels, dim)
        self.blocks = nn.ModuleList([LongCatBlock(config) for _ in range(config.depth)])
        self.final_layer = FinalLayer(config)
        self.attention_backend = "sdpa"
        self.set_attention_backend("sdpa")
        self.sequence_parallel = None  # set from outside (sequence_parallel.py): split rows, gather the output

    # --- configuration -------------------------------------------------------------------------------------

    def set_attention_backend(self, name: str, *, sparsity: Optional[float] = None) -> None:
        """Route every attention call of the model to backend `name` (see `attention.py`)."""
        name = validate_backend_name(name)
        options = AttentionOptions(
            backend=name,
            enable_bsa=self.config.enable_bsa,
            sparsity=self.config.bsa_sparsity if sparsity is None else sparsity,
            chunk=tuple(self.config.bsa_chunk_q),
        )
        for module in self.modules():
            if isinstance(module, (SelfAttention, CrossAttention)):
                module.options = options
        self.attention_backend = name

    def token_grid(self, latent_shape: tuple[int, ...]) -> Grid:
        T, H, W = latent_shape[-3:]
        pt, ph, pw = self.config.patch_size
        if T % pt or H % ph or W % pw:
            raise ShapeError(
                f"latent frames x height x width {T}x{H}x{W} must be divisible by the patch size "
                f"{pt}x{ph}x{pw}: use pixel heights divisible by {8 * ph} and widths by {8 * pw} (the VAE's 8 x the "
                "checkpoint's patch_size)"
            )
        return (T // pt, H // ph, W // pw)

    # --- forward -------------------------------------------------------------------------------------------

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text_embeds: Optional[torch.Tensor],
        text_mask: Optional[torch.Tensor],
        *,
        num_cond_latents: int = 0,
        kv_cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        if latents.ndim != 5 or latents.shape[1] != self.config.in_channels:
            raise ShapeError(f"latents must be [B, {self.config.in_channels}, T, H, W], got {tuple(latents.shape)}")
        B, latent_height = latents.shape[0], latents.shape[3]
        if self.sequence_parallel is not None:  # this rank's band of rows; the prediction is gathered in 4.
            latents = self.sequence_parallel.split_latents(latents)
        grid = self.token_grid(latents.shape)
        dtype = self.x_embedder.proj.weight.dtype
        if not 0 <= num_cond_latents <= grid[0]:
            raise ShapeError(f"num_cond_latents={num_cond_latents} but the latents have {grid[0]} frames")

        # 1. Per-frame timesteps, rounded to the weight dtype before the sinusoid (MODEL.md 9.1).
        timestep = torch.as_tensor(timestep, device=latents.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(B)
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(B, grid[0])
        if timestep.shape != (B, grid[0]):
            raise ShapeError(f"timestep must be [B] or [B, T]=[{B}, {grid[0]}], got {tuple(timestep.shape)}")
        t = self.t_embedder(timestep.to(dtype).float().flatten()).view(B, grid[0], -1)

        # 2. Patchify the latents and project the caption; padded caption tokens become exact zeros.
        x = self.x_embedder(latents.to(dtype))
        y, key_mask = self._embed_text(text_embeds, text_mask, dtype)

        # 3. Blocks.
        for i, block in enumerate(self.blocks):
            layer_kv = kv_cache.layers[i] if kv_cache is not None else None
            x = block(x, y, t, grid, num_cond_latents, key_mask, layer_kv)

        # 4. Final layer and unpatchify, returned in float32.
        prediction = self.unpatchify(self.final_layer(x, t, grid), grid).float()
        if self.sequence_parallel is not None:
            prediction = self.sequence_parallel.gather_prediction(prediction, latent_height)
        return prediction

    def _embed_text(self, text_embeds, text_mask, dtype):
        if text_embeds is None:
            return None, None
        if text_embeds.ndim == 4:  # official layout [B, 1, L, C]
            text_embeds = text_embeds.squeeze(1)
        if text_embeds.shape[-1] != self.config.caption_channels:
            raise ShapeError(
                f"text embeddings have width {text_embeds.shape[-1]} but the DiT expects caption_channels="
                f"{self.config.caption_channels}: use the checkpoint's own text encoder"
            )
        y = self.y_embedder(text_embeds.to(dtype))
        if text_mask is None:
            return y, None
        text_mask = text_mask.to(y.device)
        if self.config.text_tokens_zero_pad:
            # Zero after the projection, then attend to all tokens (MODEL.md 2, "Masking/padding").
            return y * text_mask[:, :, None].to(y.dtype), None
        return y, text_mask

    @torch.no_grad()
    def build_kv_cache(self, cond_latents: torch.Tensor) -> KVCache:
        """Run the condition latents once at t=0 without cross-attention and keep each block's keys/values.

        A later `forward(noisy_latents, ..., kv_cache=cache)` equals the uncached call with
        `num_cond_latents = cond frames` on the noisy frames (MODEL.md 1.6, clarification 7).
        """
        B = cond_latents.shape[0]
        if self.sequence_parallel is not None:
            cond_latents = self.sequence_parallel.split_latents(cond_latents)
        grid = self.token_grid(cond_latents.shape)
        dtype = self.x_embedder.proj.weight.dtype
        t = self.t_embedder(torch.zeros(B * grid[0], device=cond_latents.device)).view(B, grid[0], -1)
        x = self.x_embedder(cond_latents.to(dtype))
        cache = KVCache(cond_frames=grid[0], layers=[LayerKV(recording=True) for _ in self.blocks])
        # All tokens are condition tokens: they attend among themselves and skip cross-attention.
        for block, layer_kv in zip(self.blocks, cache.layers):
            x = block(x, None, t, grid, grid[0], None, layer_kv)
            layer_kv.recording = False
        return cache

    def unpatchify(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        # Output features are patch-position-major, channel-minor: ((tp*ph + hp)*pw + wp)*C + c.
        B = x.shape[0]
        pt, ph, pw = self.config.patch_size
        C = self.config.out_channels
        x = x.view(B, grid[0], grid[1], grid[2], pt, ph, pw, C)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, C, grid[0] * pt, grid[1] * ph, grid[2] * pw)
