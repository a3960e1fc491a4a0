"""The one attention entry point of the model, with a registry of backends.

Every attention call in the DiT goes through `attention(q, k, v, ...)` with tensors laid out
`[batch, heads, tokens, head_dim]`. Which kernel runs is decided here, never in the model:

- `sdpa`: `torch.nn.functional.scaled_dot_product_attention`; on CUDA one kernel is pinned per call
  signature: cuDNN for bf16/fp16 without a mask (fastest on Hopper), memory-efficient otherwise.
- `xformers`: `xformers.ops.memory_efficient_attention`, only when xformers is installed.
- `reference`: plain torch softmax attention (slow, the numeric yardstick for the others).
- `block_sparse`: LongCat's block-sparse attention (MODEL.md section 6), our Triton kernel on CUDA and a torch
  reference elsewhere. Needs the token grids; calls without a grid (cross-attention) run dense.
- `auto`: block-sparse where the checkpoint enables it (`enable_bsa`), the device is CUDA with Triton and the key
  grid (the whole latent grid for noisy queries) is a multiple of the block shape with more than one frame, as the
  official code requires; `sdpa` otherwise. The query grid may be ragged: with one condition latent the noisy
  queries span T-1 frames, which our kernel takes without padding. The 1-frame condition call runs dense.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from longcat_tuner.errors import ConfigError, ShapeError

Grid = tuple[int, int, int]


@dataclasses.dataclass
class AttentionOptions:
    """What the model tells the dispatcher: the chosen backend and the block-sparse parameters."""

    backend: str = "sdpa"
    enable_bsa: bool = False  # the checkpoint's `enable_bsa`, consulted by `auto`
    sparsity: float = 0.9375
    chunk: Grid = (4, 4, 4)


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable[..., torch.Tensor]
    available: Callable[[], bool]
    needs_grid: bool = False
    supports_key_mask: bool = True


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def available_backends() -> list[str]:
    return [name for name, b in _BACKENDS.items() if b.available()]


def validate_backend_name(name: str) -> str:
    if name == "auto":
        return name
    if name not in _BACKENDS:
        raise ConfigError(
            f"attention_implementation '{name}' is unknown; choose one of: auto, {', '.join(sorted(_BACKENDS))}"
        )
    if not _BACKENDS[name].available():
        hint = " (pip install xformers)" if name == "xformers" else ""
        raise ConfigError(f"attention_implementation '{name}' is not available on this machine{hint}")
    return name


def _key_mask_bias(key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # [B, Nk] (1 = attend) -> additive bias [B, 1, 1, Nk]
    bias = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
    bias.masked_fill_(key_mask == 0, float("-inf"))
    return bias[:, None, None, :]


def reference_attention(q, k, v, *, key_mask=None, **_unused) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if key_mask is not None:
        scores = scores + _key_mask_bias(key_mask, scores.dtype)
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)


def _cuda_sdpa_kernel(q: torch.Tensor, bias) -> list:
    """One SDPA kernel per call signature, so a checkpointed block recomputes with the kernel it ran forward
    with (a kernel fallback list can pick differently on recompute and break checkpointing). cuDNN is the
    fastest on Hopper (backward 79 ms vs flash 179 ms at 37,440 tokens, bench/results/sdpa_check.json)."""
    from torch.nn.attention import SDPBackend

    if q.dtype in (torch.bfloat16, torch.float16) and bias is None and q.shape[-1] <= 128:
        return [SDPBackend.CUDNN_ATTENTION]
    return [SDPBackend.EFFICIENT_ATTENTION]


def sdpa_attention(q, k, v, *, key_mask=None, **_unused) -> torch.Tensor:
    bias = None if key_mask is None else _key_mask_bias(key_mask, q.dtype)
    if q.is_cuda:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(_cuda_sdpa_kernel(q, bias)):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def xformers_attention(q, k, v, *, key_mask=None, **_unused) -> torch.Tensor:
    import xformers.ops as xops

    bias = None
    if key_mask is not None:
        bias = _key_mask_bias(key_mask, q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
    )
    return out.transpose(1, 2)


def block_sparse_attention(q, k, v, *, q_grid, k_grid, options: AttentionOptions, **_unused) -> torch.Tensor:
    from longcat_tuner.model import block_sparse

    return block_sparse.block_sparse_attention(
        q, k, v, q_grid, k_grid, sparsity=options.sparsity, chunk=options.chunk, impl="auto"
    )


def _has_module(name: str) -> Callable[[], bool]:
    return lambda: importlib.util.find_spec(name) is not None


register_backend(Backend("sdpa", sdpa_attention, lambda: True))
register_backend(Backend("reference", reference_attention, lambda: True))
register_backend(Backend("xformers", xformers_attention, _has_module("xformers")))
register_backend(
    Backend(
        "block_sparse",
        block_sparse_attention,
        _has_module("longcat_tuner.model.block_sparse"),
        needs_grid=True,
        supports_key_mask=False,
    )
)



def _auto_uses_block_sparse(q: torch.Tensor, k_grid: Optional[Grid], chunk: Grid) -> bool:
    if k_grid is None or k_grid[0] <= 1 or not q.is_cuda:
        return False
    from longcat_tuner.model.block_sparse import block_sparse_supported

    return block_sparse_supported(k_grid, k_grid, chunk, q.device)[0]


def resolve_backend(q: torch.Tensor, q_grid, k_grid, key_mask, options: AttentionOptions) -> Backend:
    """The backend that runs this call (see the module docstring for the policy)."""
    name = options.backend
    if name == "auto":
        name = "block_sparse" if options.enable_bsa and _auto_uses_block_sparse(q, k_grid, options.chunk) else "sdpa"
    backend = _BACKENDS[name]
    if backend.needs_grid and (q_grid is None or k_grid is None):
        # Cross-attention has no token grid: block-sparse applies to self-attention only.
        backend = _BACKENDS["sdpa"]
    if key_mask is not None and not backend.supports_key_mask:
        backend = _BACKENDS["sdpa"]
    return backend


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_grid: Optional[Grid] = None,
    k_grid: Optional[Grid] = None,
    key_mask: Optional[torch.Tensor] = None,
    options: Optional[AttentionOptions] = None,
) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(head_dim); q, k, v are `[B, heads, N, D]`.

    `q_grid`/`k_grid` are the (T, H, W) token grids of self-attention calls (needed by block-sparse
    attention); `key_mask` `[B, Nk]` marks the keys to attend to (1) and to ignore (0).
    """
    options = options or AttentionOptions()
    if q.shape[-1] != k.shape[-1] or k.shape[:-1] != v.shape[:-1]:
        raise ShapeError(f"attention got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    backend = resolve_backend(q, q_grid, k_grid, key_mask, options)
    return backend.fn(q, k, v, q_grid=q_grid, k_grid=k_grid, key_mask=key_mask, options=options)
