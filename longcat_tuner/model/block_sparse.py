"""Block-sparse attention (BSA) as LongCat-Video defines it, with a plain-torch reference and a Triton kernel.

Semantics (MODEL.md section 6 and clarification 6, fixture `reference/parity/bsa_case.safetensors`):

1. Tokens arrive in (t, h, w) row-major order over a token grid (T, H, W). The grid is cut into 3-D chunks of
   `chunk` = (4, 4, 4) tokens, so each block holds 64 tokens; blocks are numbered row-major over
   (T/4, H/4, W/4) and the tokens inside a block keep their (t, h, w) row-major order.
2. Gating: per (batch, head, query block) every key block is scored by the dot product of the mean-pooled
   query block and the mean-pooled key block (no softmax scale), and the top
   `k = int((1 - sparsity) * n_key_blocks)` key blocks are kept, in `torch.topk` order.
3. Ordinary softmax attention (scale 1/sqrt(head_dim)) of each query restricted to the keys of its block's
   selected key blocks; the output comes back in the original (t, h, w) token order.

Two choices of ours beyond the official code:

* When `int((1 - sparsity) * n_key_blocks)` is 0 (tiny key grids), one key block is kept: the official
  code leaves this case undefined, and zero keys would make the softmax empty.
* Ragged grids. The official kernel asserts T, H, W are multiples of the chunk. LongCat's image-to-video
  attention calls it with a 1-frame condition grid and a (T-1)-frame noisy grid, so here a grid axis that is
  not a multiple of the chunk ends in a partial block: a block holds the tokens whose coordinates fall in it,
  and its mean pooling is over the tokens actually present. On divisible grids nothing changes.

`q` and `k` may have different grids (the split condition/noise calls and the KV-cache call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longcat_tuner.errors import ConfigError, ShapeError
from longcat_tuner.model.eager_cache import eager_cache

Grid = tuple[int, int, int]

DEFAULT_SPARSITY = 0.9375
DEFAULT_CHUNK: Grid = (4, 4, 4)
# The Triton kernel keeps a whole block (rows) and a whole head (columns) in one tile.
MAX_KERNEL_BLOCK_TOKENS = 128
MAX_KERNEL_HEAD_DIM = 256
# The PyTorch operator that runs the kernel's forward (block_sparse_triton.py), named here, where Triton is not
# needed: keep_attention's checkpoint policy keeps its outputs by this name (runtime/selective_checkpoint.py).
FORWARD_OP = "longcat_tuner::block_sparse_attention_forward"


@dataclass(frozen=True)
class BlockLayout:
    """How the tokens of one (T, H, W) grid map to blocks (partial blocks at the end of ragged axes)."""

    grid: Grid
    chunk: Grid
    blocks_per_axis: Grid
    token_block: torch.Tensor  # [N] long: block id of each token, blocks row-major over blocks_per_axis
    block_count: torch.Tensor  # [n_blocks] long: tokens present in each block

    @property
    def num_blocks(self) -> int:
        return math.prod(self.blocks_per_axis)

    @property
    def divisible(self) -> bool:
        """Every axis is a multiple of the chunk (the official kernel's precondition)."""
        return all(g % c == 0 for g, c in zip(self.grid, self.chunk))


def _as_grid(grid: tuple[int, ...] | list[int] | torch.Tensor, name: str) -> Grid:
    values = tuple(int(g) for g in (grid.tolist() if isinstance(grid, torch.Tensor) else grid))
    if len(values) != 3 or min(values) < 1:
        raise ShapeError(f"block-sparse attention: {name} must be a (T, H, W) token grid of positive ints, got {grid!r}")
    return values  # type: ignore[return-value]


@eager_cache(maxsize=64)
def block_layout(grid: Grid, chunk: Grid = DEFAULT_CHUNK, device: torch.device | str = "cpu") -> BlockLayout:
    """Block id of every token of `grid` and token count of every block (cached per grid, chunk, device)."""
    grid, chunk = _as_grid(grid, "grid"), _as_grid(chunk, "chunk")
    blocks_per_axis = tuple(-(-g // c) for g, c in zip(grid, chunk))
    t, h, w = torch.meshgrid(*(torch.arange(g, device=device) for g in grid), indexing="ij")
    _, nbh, nbw = blocks_per_axis
    token_block = ((t // chunk[0]) * (nbh * nbw) + (h // chunk[1]) * nbw + (w // chunk[2])).reshape(-1)
    # Tokens per block from each axis' count (a full chunk, the remainder in the last block): plain arithmetic
    # rather than a bincount, whose data-dependent size breaks torch.compile's graph at every attention call.
    per_axis = [(g - torch.arange(n, device=device) * c).clamp(max=c) for g, c, n in zip(grid, chunk, blocks_per_axis)]
    block_count = (per_axis[0][:, None, None] * per_axis[1][None, :, None] * per_axis[2][None, None, :]).reshape(-1)
    return BlockLayout(
        grid=grid,
        chunk=chunk,
        blocks_per_axis=blocks_per_axis,  # type: ignore[arg-type]
        token_block=token_block,
        block_count=block_count,
    )


def pool_blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Mean of x [B, heads, N, D] over the tokens present in each block, in float32: [B, heads, n_blocks, D].

    Blocks hold tokens in (t, h, w) chunks; a ragged grid is zero-padded up to whole chunks first and each
    sum divided by the number of real tokens.
    """
    b, heads, _, d = x.shape
    (t, h, w), (ct, ch, cw), (nt, nh, nw) = layout.grid, layout.chunk, layout.blocks_per_axis
    x = x.reshape(b, heads, t, h, w, d)
    if not layout.divisible:
        x = F.pad(x, (0, 0, 0, nw * cw - w, 0, nh * ch - h, 0, nt * ct - t))
    summed = x.reshape(b, heads, nt, ct, nh, ch, nw, cw, d).sum((3, 5, 7), dtype=torch.float32)
    return summed.reshape(b, heads, nt * nh * nw, d) / layout.block_count.to(torch.float32)[:, None]


def num_selected_blocks(n_key_blocks: int, sparsity: float) -> int:
    """`int((1 - sparsity) * n)` as in the official gating, but at least one block (our choice for tiny grids)."""
    if not 0.0 <= sparsity < 1.0:
        raise ShapeError(f"block-sparse attention: sparsity must be in [0, 1), got {sparsity}")
    return min(n_key_blocks, max(1, int((1.0 - sparsity) * n_key_blocks)))


@torch.no_grad()
def _select(
    q: torch.Tensor, k: torch.Tensor, q_layout: BlockLayout, k_layout: BlockLayout, sparsity: float, *, ordered: bool
) -> torch.Tensor:
    scores = pool_blocks(q, q_layout) @ pool_blocks(k, k_layout).transpose(-1, -2)
    topk = num_selected_blocks(k_layout.num_blocks, sparsity)
    # Attention does not depend on the order of the selected blocks, so it skips topk's final sort.
    return torch.topk(scores, topk, dim=-1, largest=True, sorted=ordered).indices


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_grid: Grid, k_grid: Grid, chunk: Grid
) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ShapeError(
            f"block-sparse attention takes q, k, v as [batch, heads, tokens, head_dim], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ShapeError(
            f"block-sparse attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must share batch, "
            "heads and head_dim, and k and v must have the same shape"
        )
    for name, x, grid in (("q", q, q_grid), ("k", k, k_grid)):
        if x.shape[2] != math.prod(grid):
            raise ShapeError(
                f"block-sparse attention: {name} has {x.shape[2]} tokens but its grid {grid} holds {math.prod(grid)}; "
                f"pass the (T, H, W) token grid of {name}"
            )


def select_key_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    q_grid: Grid,
    k_grid: Grid,
    *,
    sparsity: float = DEFAULT_SPARSITY,
    chunk: Grid = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Selected key blocks per query block: LongTensor [B, heads, n_query_blocks, topk] in `torch.topk` order."""
    q_grid, k_grid, chunk = _as_grid(q_grid, "q_grid"), _as_grid(k_grid, "k_grid"), _as_grid(chunk, "chunk")
    _check_inputs(q, k, k, q_grid, k_grid, chunk)
    q_layout, k_layout = block_layout(q_grid, chunk, q.device), block_layout(k_grid, chunk, k.device)
    return _select(q, k, q_layout, k_layout, sparsity, ordered=True)


def block_mask_from_indices(indices: torch.Tensor, n_key_blocks: int) -> torch.Tensor:
    """[B, heads, n_query_blocks, topk] block ids -> boolean [B, heads, n_query_blocks, n_key_blocks]."""
    mask = torch.zeros(*indices.shape[:-1], n_key_blocks, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, indices, True)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_layout: BlockLayout,
    k_layout: BlockLayout,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Masked dense attention in the original token order (pure torch, differentiable).

    Builds a [B, heads, Nq, Nk] boolean mask, so it is meant for small grids and for checking the kernel.
    """
    block_mask = block_mask_from_indices(indices, k_layout.num_blocks)
    token_mask = block_mask[:, :, q_layout.token_block][:, :, :, k_layout.token_block]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def block_sparse_supported(
    q_grid: Grid, k_grid: Grid, chunk: Grid = DEFAULT_CHUNK, device: torch.device | str | None = None
) -> tuple[bool, str]:
    """Whether the `auto` attention policy should use BSA for these grids (and device, when given).

    `auto` keeps the official condition: grids that are multiples of the chunk, on CUDA with Triton.
    Forcing `block_sparse` also works on ragged grids (partial edge blocks, see the module docstring).
    """
    q_grid, k_grid, chunk = _as_grid(q_grid, "q_grid"), _as_grid(k_grid, "k_grid"), _as_grid(chunk, "chunk")
    for name, grid in (("query", q_grid), ("key", k_grid)):
        if any(g % c for g, c in zip(grid, chunk)):
            return False, (
                f"{name} token grid {grid} is not a multiple of the block-sparse chunk {chunk} (the official kernel "
                "needs whole blocks); use sizes whose latent grid divides by the chunk, or force "
                "attention_implementation 'block_sparse' to use partial edge blocks"
            )
    if math.prod(chunk) > MAX_KERNEL_BLOCK_TOKENS:
        return False, f"chunk {chunk} holds {math.prod(chunk)} tokens; the Triton kernel takes at most {MAX_KERNEL_BLOCK_TOKENS}"
    if device is not None:
        if torch.device(device).type != "cuda":
            return False, f"block-sparse attention runs its kernel on CUDA only (device is {device})"
        if not _triton_available():
            return False, "block-sparse attention needs the triton package (pip install 'longcat-tuner[triton]')"
    return True, ""


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_grid: Grid,
    k_grid: Grid,
    *,
    sparsity: float = DEFAULT_SPARSITY,
    chunk: Grid = DEFAULT_CHUNK,
    impl: str = "auto",
) -> torch.Tensor:
    """LongCat block-sparse attention. q [B, heads, Nq, D], k/v [B, heads, Nk, D] -> [B, heads, Nq, D].

    impl: "reference" (pure torch masked attention), "triton" (our kernel, forward and backward; CPU tensors
    run through Triton's interpreter, which is slow and meant for tests) or "auto" (triton on CUDA, else
    reference).
    """
    q_grid, k_grid, chunk = _as_grid(q_grid, "q_grid"), _as_grid(k_grid, "k_grid"), _as_grid(chunk, "chunk")
    _check_inputs(q, k, v, q_grid, k_grid, chunk)
    if impl == "auto":
        impl = "triton" if q.is_cuda and _triton_available() else "reference"
    if impl not in ("reference", "triton"):
        raise ShapeError(f"block-sparse attention: impl must be 'auto', 'reference' or 'triton', got {impl!r}")
    q_layout, k_layout = block_layout(q_grid, chunk, q.device), block_layout(k_grid, chunk, k.device)
    indices = _select(q, k, q_layout, k_layout, sparsity, ordered=False)
    if impl == "reference":
        return reference_attention(q, k, v, q_layout, k_layout, indices)

    if not _triton_available():
        raise ConfigError(
            "block-sparse attention impl 'triton' needs the triton package: pip install 'longcat-tuner[triton]', "
            "or use impl='reference' (small grids only)"
        )
    from longcat_tuner.model.block_sparse_triton import triton_block_sparse_attention

    return triton_block_sparse_attention(q, k, v, indices, q_grid, k_grid, chunk)
