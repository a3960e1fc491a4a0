"""Shared pieces of the GPU benchmarks: a random full-size DiT, FLOP counts, timing and the result file.

Imports only the model modules (no diffusers / av / pydantic), so the scripts run on a bare GPU image.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Optional

import torch

from longcat_tuner.model.config import DiTConfig
from longcat_tuner.model.dit import LongCatDiT
from longcat_tuner.model.loading import build_dit

H100_BF16_PEAK_TFLOPS = 989.0  # dense bf16 tensor-core peak of an H100 SXM (datasheet), the MFU denominator

# The setting: 480x832, 93 frames -> latents [1, 16, 24, 60, 104] -> 24 x 30 x 52 = 37,440 tokens.
LATENT_SHAPE = (1, 16, 24, 60, 104)
TEXT_TOKENS = 512
VALID_TEXT_TOKENS = 200  # a typical caption; padded tokens become zeros (text_tokens_zero_pad)


@torch.no_grad()
def random_dit(config: DiTConfig = DiTConfig(), *, device: str = "cuda", dtype=torch.bfloat16, seed: int = 0) -> LongCatDiT:
    """The DiT with random weights, materialized straight on `device` in `dtype` (no checkpoint needed)."""
    dit = build_dit(config, device="meta").to(dtype)
    dit = dit.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in dit.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            fan_in = param[0].numel() if param.ndim > 1 else param.numel()
            std = 1.0 / math.sqrt(fan_in)
            if name.endswith(("attn.proj.weight", "ffn.w2.weight")):
                std *= 0.2  # keep the random residual stream bounded over 48 blocks
            param.normal_(0.0, std, generator=gen)
    dit.eval().requires_grad_(False)
    return dit


def i2v_inputs(device: str = "cuda", batch: int = 1, latent_shape=LATENT_SHAPE, text_tokens: int = TEXT_TOKENS,
               caption_channels: int = 4096, seed: int = 0, text_dtype=torch.bfloat16,
               valid_text_tokens: int = VALID_TEXT_TOKENS):
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, *latent_shape[1:])
    latents = torch.randn(shape, generator=gen, device=device)
    text = torch.randn(batch, text_tokens, caption_channels, generator=gen, device=device, dtype=text_dtype)
    mask = torch.zeros(batch, text_tokens, dtype=torch.long, device=device)
    mask[:, :valid_text_tokens] = 1
    return latents, text, mask


def forward_flops(config: DiTConfig, latent_shape=LATENT_SHAPE, *, num_cond_latents: int = 1,
                  text_tokens: int = TEXT_TOKENS, self_attention_kept: float = 1.0) -> dict[str, float]:
    """Matmul FLOPs of one DiT forward (batch 1), split into linear layers and attention.

    Per block: self-attention projections and the SwiGLU over all N tokens; cross-attention query and
    output projections over the noisy tokens only (condition tokens skip it); key/value projections over
    the text tokens. Self-attention: the condition call (cond x cond) plus the noisy call (noisy x all),
    4*n_q*n_k*hidden each (QK^T and PV). Embedders, adaLN and the final layer are <0.1% and left out.
    `self_attention_kept`: the share of key blocks block-sparse attention computes (`block_sparse_kept`); the
    noisy self-attention call counts only that work.
    """
    _, _, T, H, W = latent_shape
    pt, ph, pw = config.patch_size
    per_frame = (H // ph) * (W // pw)
    n = (T // pt) * per_frame
    n_cond = num_cond_latents * per_frame
    n_noisy = n - n_cond
    c, f = config.hidden_size, config.ffn_hidden_size
    linear = 2 * (n * (3 * c * c + c * c + 3 * c * f) + n_noisy * 2 * c * c + text_tokens * 2 * c * c)
    attention = 4 * c * (n_cond * n_cond + n_noisy * n * self_attention_kept) + 4 * c * n_noisy * text_tokens
    return {"linear": linear * config.depth, "attention": attention * config.depth, "tokens": n}


def block_sparse_kept(config: DiTConfig, latent_shape) -> float:
    """Share of the key blocks block-sparse self-attention computes over `latent_shape`'s token grid (the
    selection rule of `model/block_sparse.py` at the checkpoint's sparsity and chunk)."""
    import math

    from longcat_tuner.model.block_sparse import num_selected_blocks

    _, _, T, H, W = latent_shape
    pt, ph, pw = config.patch_size
    grid = (T // pt, H // ph, W // pw)
    blocks = math.prod(-(-g // c) for g, c in zip(grid, config.bsa_chunk_k))
    return num_selected_blocks(blocks, config.bsa_sparsity) / blocks


def lora_train_flops(config: DiTConfig, latent_shape=LATENT_SHAPE, *, recompute: str = "full",
                     self_attention_kept: float = 1.0) -> dict[str, float]:
    """Model and hardware FLOPs of one LoRA training step.

    Model FLOPs (the MFU numerator) are what LoRA training must do: the forward, the input gradients of
    every frozen linear (no weight gradients: 2x linear) and attention's backward (2x its forward: 3x).
    Hardware FLOPs add the recompute of checkpointing: the whole forward (`full`) or all but attention
    (`attention_saved`). Adapter FLOPs (<1%) are left out.
    """
    fwd = forward_flops(config, latent_shape, self_attention_kept=self_attention_kept)
    model = 2 * fwd["linear"] + 3 * fwd["attention"]
    recomputed = fwd["linear"] + (fwd["attention"] if recompute == "full" else 0.0)
    return {"model": model, "hardware": model + recomputed, "forward": fwd["linear"] + fwd["attention"]}


def sync_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def environment() -> dict:
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if not torch.cuda.is_available():  # CPU smoke runs (e.g. bench_sampling.py --tiny)
        return {"date": date, "device": f"cpu ({platform.processor() or platform.machine()})",
                "torch": torch.__version__, "python": platform.python_version()}
    props = torch.cuda.get_device_properties(0)
    return {
        "date": date,
        "device": torch.cuda.get_device_name(0),
        "device_memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
    }


def gib(nbytes: float) -> float:
    return round(nbytes / 2**30, 2)


def write_result(name: str, payload: dict, out_dir: Optional[str] = None) -> Path:
    """Write `payload` (with the environment) as JSON to `$OUT` (device runs) or `bench/results/`."""
    folder = Path(out_dir or os.environ.get("OUT") or Path(__file__).parent / "results")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2))
    return path


def select_sdpa_backend(name: str) -> None:
    """Make the model's `sdpa` attention use exactly one kernel (`cudnn` or `flash`), the fastest first."""
    from torch.nn.attention import SDPBackend

    from longcat_tuner.model import attention

    # One kernel only: the backward pass recomputes checkpointed blocks on the autograd thread, and a
    # fallback list could pick a different kernel there than in the forward (seen with flash first).
    order = {
        "cudnn": [SDPBackend.CUDNN_ATTENTION],
        "flash": [SDPBackend.FLASH_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    }[name]
    # The model picks its kernel per call in `_cuda_sdpa_kernel` (cuDNN unless a mask bias or another dtype
    # rules it out); calls it would send elsewhere keep its choice.
    default = getattr(attention._cuda_sdpa_kernel, "model_default", attention._cuda_sdpa_kernel)

    def chosen(q, bias):
        return order if bias is None else default(q, bias)

    chosen.model_default = default
    attention._cuda_sdpa_kernel = chosen
