"""Ulysses sequence parallelism for the DiT, applied from outside the model.

`apply_sequence_parallel(dit, sp)` makes `sp.size` ranks share one forward of the DiT: each rank holds a band
of token rows of every latent frame, and only self-attention ever needs the whole sequence.

- **Split at the input, gather at the output.** The latents `[B, 16, T, H, W]` are cut along the height into
  `sp.size` equal bands of whole token rows (the last band padded with zero rows when the token height is not a
  multiple of the size); patch embedding, modulation, cross-attention, the FFN and the final layer run on the
  rank's band. The prediction bands are gathered back into the full `[B, 16, T, H, W]` on every rank. Cutting
  rows (not frames) keeps whole frames' worth of rows on each rank, so the per-frame modulation and the
  condition frames (the first `num_cond_latents` frames, which now start every rank's band) need no change.
- **Self-attention: all-to-all over heads.** After the q/k norms, one all-to-all scatters the heads and gathers
  the sequence: each rank then holds `heads / size` heads of all tokens, in (t, h, w) order with the padding rows
  dropped. RoPE, the I2V attention isolation (condition queries attend to condition keys only, MODEL.md 1.6),
  the KV cache and every attention backend (block-sparse included: it selects blocks per head) run exactly as
  in a single process on those heads. The inverse all-to-all brings the output back to the rank's rows.
- **Cross-attention** needs no communication: the text tokens are replicated on every rank, and each query
  token attends to them on its own.
- **Gradients.** The output gather returns, in backward, the rank's own slice of the gradient (every rank
  computes the same loss from the same gathered prediction), and the all-to-all's backward is the reverse
  all-to-all. A parameter's gradient on one rank is then the part contributed by that rank's tokens: the sum
  over the sequence-parallel group is the full gradient (`sum_gradients`, or the data-parallel wrappers in
  `train/distributed.py`, which divide by the data-parallel size only).

`sp.size` must divide the head count (`check_sequence_parallel_size`). Ranks of one group must feed identical
inputs (the same batch, noise and timesteps). The group's all-to-all is a collective: every rank of the group
runs the same forward.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longcat_tuner.errors import ConfigError, ShapeError

Grid = tuple[int, int, int]


def check_sequence_parallel_size(size: int, *, world_size: int, num_heads: int) -> None:
    """`sequence_parallel_size` must divide both the number of processes and the DiT's attention heads."""
    if size < 1:
        raise ConfigError(f"sequence_parallel_size must be at least 1, got {size}")
    if world_size % size:
        raise ConfigError(
            f"sequence_parallel_size {size} does not divide the {world_size} process(es) of this run; "
            f"set it to a divisor of --nproc_per_node x --nnodes (e.g. {math.gcd(size, world_size)})"
        )
    if num_heads % size:
        raise ConfigError(
            f"sequence_parallel_size {size} does not divide the DiT's {num_heads} attention heads (each rank "
            f"attends with heads / size of them); use a divisor of {num_heads} (e.g. {math.gcd(size, num_heads)})"
        )


def _exchange(x: torch.Tensor, group: Any, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    size = dist.get_world_size(group)
    inputs = [chunk.contiguous() for chunk in x.chunk(size, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(size)]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Scatter `scatter_dim` over the group and gather `gather_dim`; backward does the reverse exchange."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _exchange(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _exchange(grad, ctx.group, gather_dim, scatter_dim), None, None, None


class _GatherKeepLocalGrad(torch.autograd.Function):
    """All-gather along `dim` (rank order); backward keeps the rank's own slice of the gradient.

    Every rank computes the same loss from the gathered tensor, so the gradient of its slice is already
    complete on the rank: no reduction (a reduce-scatter would count it `size` times)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        size = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        rank = dist.get_rank(ctx.group)
        return grad.chunk(dist.get_world_size(ctx.group), dim=ctx.dim)[rank].contiguous(), None, None


@dataclasses.dataclass
class SequenceParallel:
    """The sequence-parallel group of this rank and the token grid of the forward in flight."""

    group: Any
    size: int
    rank: int
    patch_height: int = 2
    # Set by `split_latents` at the start of each DiT call and read by that call's self-attention (and by its
    # checkpoint recompute in backward, which follows before the next call).
    full_grid: Optional[Grid] = None

    @classmethod
    def from_group(cls, group: Any, *, patch_height: int = 2) -> "SequenceParallel":
        return cls(group=group, size=dist.get_world_size(group), rank=dist.get_rank(group), patch_height=patch_height)

    # --- the DiT's input and output ----------------------------------------------------------------------

    def rows_per_rank(self, token_height: int) -> int:
        return -(-token_height // self.size)

    def split_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """This rank's band of latent rows `[B, C, T, rows, W]`, zero-padded at the bottom on the last ranks."""
        T, H, W = latents.shape[-3:]
        ph = self.patch_height
        if H % ph:
            raise ShapeError(f"latent height {H} must be divisible by the patch height {ph}: use pixel heights divisible by {8 * ph}")
        rows = self.rows_per_rank(H // ph)
        padded = rows * self.size * ph
        self.full_grid = (T, H // ph, W)  # frames and token rows; the width is read from the blocks' grid
        if padded != H:
            latents = F.pad(latents, (0, 0, 0, padded - H))
        return latents[..., self.rank * rows * ph:(self.rank + 1) * rows * ph, :]

    def gather_prediction(self, prediction: torch.Tensor, latent_height: int) -> torch.Tensor:
        """The full `[B, C, T, H, W]` prediction on every rank from each rank's band (padding rows dropped)."""
        full = _GatherKeepLocalGrad.apply(prediction, self.group, prediction.ndim - 2)
        return full[..., :latent_height, :]

    # --- self-attention ------------------------------------------------------------------------------------

    def _full_grid(self, local_grid: Grid) -> Grid:
        if self.full_grid is None:
            raise ShapeError("sequence parallel: the DiT's self-attention ran before its latents were split "
                             "(apply_sequence_parallel must wrap the DiT, not single blocks)")
        T, H, _ = self.full_grid
        if local_grid[0] != T or local_grid[1] != self.rows_per_rank(H):
            raise ShapeError(f"sequence parallel: a block got the token grid {local_grid}, but this forward split "
                             f"a {T}x{H} grid into {self.rows_per_rank(H)} rows per rank")
        return (T, H, local_grid[2])

    def gather_sequence(self, q, k, v, local_grid: Grid):
        """`[B, heads, local tokens, D]` q, k, v -> `[B, heads / size, all tokens, D]` in (t, h, w) order, and
        the full token grid."""
        grid = self._full_grid(local_grid)
        B, heads, _, D = q.shape
        qkv = _AllToAll.apply(torch.cat([q, k, v]), self.group, 1, 2)  # [3B, heads/size, size*local, D]
        T, rows, W = local_grid
        qkv = qkv.view(3 * B, heads // self.size, self.size, T, rows, W, D).transpose(2, 3)
        qkv = qkv.reshape(3 * B, heads // self.size, T, self.size * rows, W, D)[:, :, :, : grid[1]]
        q, k, v = qkv.reshape(3 * B, heads // self.size, -1, D).chunk(3)
        return q, k, v, grid

    def scatter_sequence(self, out: torch.Tensor, local_grid: Grid) -> torch.Tensor:
        """Inverse of `gather_sequence` for the attention output: `[B, heads, local tokens, D]`."""
        B, heads_here, _, D = out.shape
        T, rows, W = local_grid
        out = out.reshape(B, heads_here, T, -1, W, D)
        out = F.pad(out, (0, 0, 0, 0, 0, self.size * rows - out.shape[3]))
        out = out.view(B, heads_here, T, self.size, rows, W, D).transpose(2, 3).reshape(B, heads_here, -1, D)
        return _AllToAll.apply(out, self.group, 2, 1)


def apply_sequence_parallel(dit: torch.nn.Module, sp: Optional[SequenceParallel]) -> None:
    """Route `dit`'s forward through `sp` (None, or a group of size 1, turns it off)."""
    from longcat_tuner.model.dit import SelfAttention

    if sp is not None and sp.size == 1:
        sp = None
    if sp is not None:
        check_sequence_parallel_size(sp.size, world_size=sp.size, num_heads=dit.config.num_heads)
        sp.patch_height = dit.config.patch_size[1]
    dit.sequence_parallel = sp
    for module in dit.modules():
        if isinstance(module, SelfAttention):
            module.sequence_parallel = sp


def sum_gradients(parameters, sp: SequenceParallel) -> None:
    """Sum the gradients of `parameters` over the sequence-parallel group (each rank holds its tokens' part);
    for runs without a data-parallel wrapper, which would otherwise do it (`train/distributed.py`)."""
    for param in parameters:
        if param.grad is not None:
            dist.all_reduce(param.grad, group=sp.group)
