"""Block swap: keep the frozen weights of the last N DiT blocks in (pinned) host memory and stream them in.

`apply_block_swap(dit, num_blocks, swap_device="cpu", compute_device="cuda")` moves every frozen parameter
and buffer of the last `num_blocks` blocks to a pinned host copy and leaves an empty placeholder on the
compute device. A block's weights come back right before it runs and leave right after:

* forward (training or sampling): the forward pre-hook of block i makes i resident (waiting on its copy
  if it was prefetched) and prefetches block i+1 on a side CUDA stream, so the copy overlaps block i's
  compute; the forward hook evicts block i again when nothing will need its weights before backward;
* backward with gradient checkpointing: blocks are recomputed in reverse order, so the backward
  pre-hook of block i (which fires before its recompute) makes i resident and prefetches block i-1; the
  backward hook (after the block's input gradients exist) evicts it.

Only host-to-device copies are made: the pinned host copy is the master, eviction drops the device
copy. Trainable tensors never move (LoRA adapters live under `module.lora_adapters` and stay on the
compute device; a swapped block with other trainable weights is refused).

The hooks are module hooks on the block and never wrap `block.forward`, so they compose with
`longcat_tuner.runtime.checkpointing.apply_gradient_checkpointing` applied before or after: checkpointing wraps
`forward`, and its recompute calls the wrapped forward directly, inside the window that the backward
pre-hook and backward hook open and close. Without checkpointing a block's weights are saved for its
backward by autograd, so the block stays resident from its forward to its backward (correct, but
saving memory needs checkpointing).

With `compute_device="cpu"` (tests) the same mechanics run without streams: a "load" copies the host
tensor into a fresh CPU tensor.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn as nn

from longcat_tuner.errors import ConfigError
from longcat_tuner.runtime.checkpointing import CHECKPOINT_ATTR  # set by every checkpointing variant


@dataclasses.dataclass
class _Slot:
    """One swapped tensor: the owning module, its attribute name, the master host copy."""

    module: nn.Module
    name: str
    is_param: bool
    host: torch.Tensor


@dataclasses.dataclass
class _SwappedBlock:
    index: int
    block: nn.Module
    slots: list[_Slot]
    resident: bool = False
    ready: Optional[torch.cuda.Event] = None  # copy finished (CUDA only)
    nbytes: int = 0


def _swappable_tensors(block: nn.Module) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
    """(owner module, attribute, is_parameter, tensor) for the block's frozen base weights and buffers."""
    found = []
    for path, module in block.named_modules():
        if ".lora_adapters" in f".{path}." or path.startswith("lora_adapters"):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                raise ConfigError(
                    f"block swap streams frozen weights only, but '{path}.{name}' is trainable: use "
                    f"model_type 'lora' with musubi_blocks_to_swap, or set musubi_blocks_to_swap to 0"
                )
            found.append((module, name, True, param))
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None:
                found.append((module, name, False, buf))
    return found


class BlockSwap:
    """Handle returned by `apply_block_swap`; `.remove()` puts every weight back on the compute device."""

    def __init__(
        self,
        blocks: nn.ModuleList,
        indices: list[int],
        *,
        swap_device: torch.device,
        compute_device: torch.device,
        prefetch: int,
        on_transfer: Optional[Callable[[str, int], None]] = None,
        recomputed: Optional[Iterable[int]] = None,
    ):
        self.blocks = blocks
        # Blocks recomputed in backward (checkpointed): told by the runtime that wrapped them; None: read
        # the mark each checkpointing wrapper leaves (`CHECKPOINT_ATTR`), for blocks wrapped by hand.
        self.recomputed = None if recomputed is None else frozenset(recomputed)
        self.compute_device = compute_device
        self.swap_device = swap_device
        self.prefetch = prefetch
        self.on_transfer = on_transfer  # test/diagnostic callback: ("load"|"evict", block index)
        self.use_cuda = compute_device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device=compute_device) if self.use_cuda else None
        self.swapped: dict[int, _SwappedBlock] = {}
        self.loads = 0
        self._handles: list = []
        pin = self.use_cuda and swap_device.type == "cpu"
        for i in indices:
            block = blocks[i]
            slots = []
            nbytes = 0
            for module, name, is_param, tensor in _swappable_tensors(block):
                host = tensor.detach().to(swap_device, copy=True)
                if pin:
                    host = host.pin_memory()
                slots.append(_Slot(module, name, is_param, host))
                nbytes += host.numel() * host.element_size()
            self.swapped[i] = _SwappedBlock(i, block, slots, nbytes=nbytes)
            self._set_placeholders(self.swapped[i])
        for i, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(self._make_forward_pre(i)))
            self._handles.append(block.register_forward_hook(self._make_forward_post(i)))
            if i in self.swapped:
                self._handles.append(block.register_full_backward_pre_hook(self._make_backward_pre(i)))
                self._handles.append(block.register_full_backward_hook(self._make_backward_post(i)))
        if self.use_cuda:
            torch.cuda.empty_cache()

    # --- tensor placement -----------------------------------------------------------------------

    def _assign(self, slot: _Slot, value: torch.Tensor) -> None:
        current = getattr(slot.module, slot.name)
        if slot.is_param:
            current.data = value  # keep the Parameter object (optimizers, hooks and names still see it)
        else:
            slot.module._buffers[slot.name] = value
            del current

    def _set_placeholders(self, entry: _SwappedBlock) -> None:
        for slot in entry.slots:
            self._assign(slot, torch.empty(0, dtype=slot.host.dtype, device=self.compute_device))
        entry.resident = False
        entry.ready = None

    def _start_load(self, i: int) -> None:
        entry = self.swapped.get(i)
        if entry is None or entry.resident:
            return
        if self.use_cuda:
            compute = torch.cuda.current_stream(self.compute_device)
            # Allocate on the compute stream (freed there on eviction), copy on the side stream once the
            # compute stream has released whatever memory the allocator hands out.
            targets = [torch.empty_like(slot.host, device=self.compute_device) for slot in entry.slots]
            self.copy_stream.wait_stream(compute)
            with torch.cuda.stream(self.copy_stream):
                for target, slot in zip(targets, entry.slots):
                    target.copy_(slot.host, non_blocking=True)
                entry.ready = torch.cuda.Event()
                entry.ready.record(self.copy_stream)
        else:
            targets = [slot.host.to(self.compute_device, copy=True) for slot in entry.slots]
        for target, slot in zip(targets, entry.slots):
            self._assign(slot, target)
        entry.resident = True
        self.loads += 1
        if self.on_transfer:
            self.on_transfer("load", i)

    def _ensure(self, i: int) -> None:
        entry = self.swapped.get(i)
        if entry is None:
            return
        self._start_load(i)
        if entry.ready is not None:
            torch.cuda.current_stream(self.compute_device).wait_event(entry.ready)
            entry.ready = None

    def _evict(self, i: int) -> None:
        entry = self.swapped.get(i)
        if entry is None or not entry.resident:
            return
        self._set_placeholders(entry)
        if self.on_transfer:
            self.on_transfer("evict", i)

    def _prefetch_from(self, i: int, step: int) -> None:
        for k in range(1, self.prefetch + 1):
            if 0 <= i + step * k < len(self.blocks):
                self._start_load(i + step * k)

    def _evict_stale(self, keep: set[int]) -> None:
        # A block left resident by an interrupted or gradient-free pass would otherwise stay forever.
        for j, entry in self.swapped.items():
            if entry.resident and j not in keep:
                self._evict(j)

    # --- hooks ----------------------------------------------------------------------------------

    def _make_forward_pre(self, i: int):
        def hook(module, args):
            if i == 0 and (not torch.is_grad_enabled() or self._is_recomputed(i, module)):
                # A new pass: blocks left resident by an earlier pass (e.g. the last block kept for a
                # backward that never came) go; without checkpointing they may still be saved for backward.
                self._evict_stale({0})
            self._ensure(i)
            self._prefetch_from(i, +1)

        return hook

    def _make_forward_post(self, i: int):
        def hook(module, args, output):
            if i not in self.swapped:
                return
            if torch.is_grad_enabled():
                if not self._is_recomputed(i, module):
                    return  # autograd saved the weights for backward: keep them until the backward hook
                if i == len(self.blocks) - 1:
                    return  # backward starts here: evicting now would only reload it
            self._evict(i)

        return hook

    def _make_backward_pre(self, i: int):
        def hook(module, grad_output):
            self._ensure(i)
            self._prefetch_from(i, -1)

        return hook

    def _make_backward_post(self, i: int):
        def hook(module, grad_input, grad_output):
            self._evict(i)

        return hook

    def _is_recomputed(self, i: int, block: nn.Module) -> bool:
        if self.recomputed is not None:
            return i in self.recomputed
        return getattr(block, CHECKPOINT_ATTR, None) is not None

    # --- public ---------------------------------------------------------------------------------

    @property
    def swapped_bytes(self) -> int:
        """Bytes of weights that live on the swap device instead of the compute device."""
        return sum(entry.nbytes for entry in self.swapped.values())

    def resident_blocks(self) -> list[int]:
        return sorted(i for i, entry in self.swapped.items() if entry.resident)

    def remove(self) -> None:
        """Detach the hooks and put every swapped weight back on the compute device."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for i in list(self.swapped):
            self._ensure(i)
        if self.use_cuda:
            torch.cuda.current_stream(self.compute_device).synchronize()
        self.swapped.clear()


def apply_block_swap(
    dit: nn.Module,
    num_blocks: int,
    *,
    swap_device: Union[str, torch.device] = "cpu",
    compute_device: Union[str, torch.device, None] = None,
    prefetch: int = 1,
    on_transfer: Optional[Callable[[str, int], None]] = None,
    recomputed: Optional[Iterable[int]] = None,
) -> BlockSwap:
    """Stream the frozen weights of the last `num_blocks` blocks of `dit.blocks` from `swap_device`.

    Call it after the model is on `compute_device` (its non-swapped parts stay where they are) and
    after LoRA injection or quantization (both change which tensors exist). `prefetch` blocks are
    copied ahead of use; `recomputed` names the blocks that are checkpointed (default: those marked). Returns the handle; `handle.remove()` undoes everything.
    """
    blocks = getattr(dit, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError("block swap needs `dit.blocks` as an nn.ModuleList (docs/CONTRACTS.md)")
    if not 0 <= num_blocks <= len(blocks):
        raise ConfigError(f"musubi_blocks_to_swap={num_blocks} but the DiT has {len(blocks)} blocks")
    if prefetch < 1:
        raise ConfigError(f"block swap prefetch must be >= 1, got {prefetch}")
    if compute_device is None:
        compute_device = next(p.device for p in dit.parameters())
    compute_device = torch.device(compute_device)
    if compute_device.type == "cuda" and compute_device.index is None:
        compute_device = torch.device("cuda", torch.cuda.current_device())
    swap_device = torch.device(swap_device)
    if swap_device.type != "cpu":
        raise ConfigError(
            f"musubi_block_swap_device '{swap_device}' is not supported: blocks are swapped to pinned host "
            f"memory; use 'cpu'"
        )
    indices = list(range(len(blocks) - num_blocks, len(blocks)))
    return BlockSwap(
        blocks, indices, swap_device=swap_device, compute_device=compute_device, prefetch=prefetch,
        on_transfer=on_transfer, recomputed=recomputed,
    )


def place_with_swapped_blocks(dit: nn.Module, device: Union[str, torch.device], num_blocks: int) -> None:
    """Move a host-resident DiT to `device`, except the frozen tensors of its last `num_blocks` blocks.

    Lets a model larger than the GPU be placed: load it on the CPU (and quantize or attach adapters
    there), call this, then `apply_block_swap` with the same `num_blocks`, which pins the tensors left
    behind. LoRA adapters always move, so they never leave the GPU afterwards.
    """
    device = torch.device(device)
    first_swapped = len(dit.blocks) - num_blocks
    for name, child in dit.named_children():
        if name != "blocks":
            child.to(device)
    for i, block in enumerate(dit.blocks):
        if i < first_swapped:
            block.to(device)
            continue
        for module in block.modules():
            adapters = getattr(module, "lora_adapters", None)
            if adapters is not None:
                adapters.to(device)
