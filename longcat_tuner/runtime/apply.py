"""Apply `MemorySettings` to a loaded DiT: the one code path of `train`, `sample`, validation and the benchmarks.

A model goes through three calls, in this order:

1. `load_device(settings, device)`: where to load it (the host first when block swap or 8-bit weights
   mean the whole bf16 model may not fit the GPU);
2. `prepare_base_weights(dit, settings)`: 8-bit storage of the frozen linear weights (and, for
   `fp8-compute`, float8 matmuls: `runtime/fp8_compute.py`), before adapters are attached (so only base
   weights are quantized);
3. (the caller attaches LoRA adapters or unfreezes the model) `apply_runtime(dit, settings, device)`:
   placement on the device (all but the swapped blocks' frozen tensors), then one forward per block,
   composed once from the original: torch.compile (scope `block`) inside, the checkpointing mode around
   it, torch.compile of the checkpointed block (scope `checkpointed_block`) outside; the first
   `uncheckpointed_blocks` blocks are not checkpointed (compiled whole when compile is on); then block swap,
   told explicitly which blocks are recomputed in backward. The returned `AppliedRuntime.remove()`
   restores every block.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn

from longcat_tuner.errors import ConfigError
from longcat_tuner.runtime.checkpointing import CHECKPOINT_ATTR, checkpointed_forward
from longcat_tuner.runtime.planner import CONTEXT_GIB
from longcat_tuner.runtime.settings import FP8_COMPUTE, MemorySettings

Device = Union[str, torch.device]


@dataclasses.dataclass
class AppliedRuntime:
    """What `apply_runtime` did to a DiT; `remove()` undoes it (weights back on the device, plain forwards)."""

    dit: nn.Module
    settings: MemorySettings
    originals: dict[int, Callable[..., Any]]
    recomputed: frozenset[int]
    swap: Any = None  # runtime.block_swap.BlockSwap

    def remove(self) -> None:
        if self.swap is not None:
            self.swap.remove()
            self.swap = None
        for i, original in self.originals.items():
            _restore(self.dit.blocks[i], original)
        self.originals.clear()


def _restore(block: nn.Module, original: Callable[..., Any]) -> None:
    """Give `block` back its `original` forward and drop the checkpoint mark."""
    if getattr(original, "__func__", None) is type(block).forward:
        block.__dict__.pop("forward", None)  # the class method again, not a bound copy
    else:
        block.forward = original
    if getattr(block, CHECKPOINT_ATTR, None) is not None:
        setattr(block, CHECKPOINT_ATTR, None)


def is_wrapped(block: nn.Module) -> bool:
    """Whether a runtime (or a hand-applied wrapper) already replaced this block's forward."""
    own = block.__dict__.get("forward")
    return getattr(block, CHECKPOINT_ATTR, None) is not None or (
        own is not None and getattr(own, "__func__", None) is not type(block).forward
    )


def model_device(dit: nn.Module) -> torch.device:
    """The device of a model's first parameter (the host for a model without parameters)."""
    return next((p.device for p in dit.parameters()), torch.device("cpu"))


def trains_base_weights(dit: nn.Module) -> bool:
    """Whether any weight outside the LoRA adapters is trainable (a full fine-tune)."""
    return any(p.requires_grad for name, p in dit.named_parameters() if "lora_adapters" not in name)


def refuse_trained_base(settings: MemorySettings) -> None:
    """The settings that only work on frozen base weights, refused for a model that trains them (a full
    fine-tune). `train` calls it before loading; `prepare_base_weights` and `apply_runtime` on a model
    whose base weights are trainable."""
    if settings.quantized:
        raise ConfigError(
            f"base_model_precision '{settings.base_precision}' stores frozen weights in 8 bits"
            + (" and gives them no gradient (float8 matmuls)" if settings.base_precision == FP8_COMPUTE else "")
            + "; a full fine-tune trains them: use model_type 'lora' or base_model_precision 'no_change'"
        )
    if settings.blocks_to_swap:
        raise ConfigError("musubi_blocks_to_swap streams frozen weights; a full fine-tune trains them: use model_type 'lora'")


def gpu_budget(device: Device, cap_gib: Optional[float]) -> tuple[float, float]:
    """(the card's GiB, GiB other processes hold on it now), with `cap_gib` enforced on this process: the cap
    is the whole process's, so PyTorch's per-process memory fraction is the cap less the CUDA context
    (`CONTEXT_GIB`, outside the allocator). `train` and `sample` plan within `runtime.auto.budget_gib`."""
    device = torch.device(device)
    if device.index is None:  # "cuda": the current device (the memory-fraction call wants an index)
        device = torch.device("cuda", torch.cuda.current_device())
    card_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    if cap_gib is not None:
        torch.cuda.set_per_process_memory_fraction(min(1.0, max(0.0, cap_gib - CONTEXT_GIB) / card_gib), device)
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = (total - free - torch.cuda.memory_reserved(device)) / 2**30 - CONTEXT_GIB
    return card_gib, (used_by_others if used_by_others >= 1.0 else 0.0)


def load_device(settings: MemorySettings, device: Device) -> torch.device:
    """The device to load the DiT on: the host when it is assembled there first, else `device`."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "cuda" and settings.assembles_on_host else device


def prepare_base_weights(dit: nn.Module, settings: MemorySettings) -> int:
    """Store the frozen linear weights in 8 bits when `base_precision` asks for it; returns the layer count.

    `train` and `sample` call it before adapters are attached (after, it still converts only the base
    layers). A model with trainable base weights (a full fine-tune) is refused.
    """
    if not settings.quantized:
        return 0
    from longcat_tuner.runtime.quantize import quantize_base_weights

    if trains_base_weights(dit):
        refuse_trained_base(settings)
    if settings.base_precision == FP8_COMPUTE:
        from longcat_tuner.runtime.fp8_compute import convert_to_fp8_compute

        return convert_to_fp8_compute(dit)
    return quantize_base_weights(dit, settings.base_precision)


def _compose(forward: Callable[..., Any], settings: MemorySettings, index: int, stream: Any) -> tuple[Callable[..., Any], bool]:
    """(the block's forward under `settings`, whether backward recomputes it)."""
    mode = settings.checkpointing
    outer = settings.compiles_checkpointed_block
    if mode == "none" or index < settings.uncheckpointed_blocks:
        # Not checkpointed (mode none, or one of the first `uncheckpointed_blocks`): backward reads the
        # activations this forward stores; compiled as the block itself under either scope.
        return (torch.compile(forward) if settings.compile_blocks else forward), False
    if settings.compile_blocks and not outer:
        forward = torch.compile(forward)
    keep = settings.keep_attention_blocks
    wrapped = checkpointed_forward(forward, mode, save_attention=keep is None or index < keep, stream=stream)
    return (torch.compile(wrapped) if outer else wrapped), True


def apply_runtime(dit: nn.Module, settings: MemorySettings, device: Device, *,
                  on_transfer: Optional[Callable[[str, int], None]] = None) -> AppliedRuntime:
    """Place `dit` on `device` and run its blocks under `settings` (see the module docstring)."""
    blocks = getattr(dit, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError("the runtime needs `dit.blocks` as an nn.ModuleList (docs/CONTRACTS.md)")
    device = torch.device(device)
    if settings.compiles_checkpointed_block and settings.checkpointing != "keep_attention":
        raise ConfigError(
            "compile_scope 'checkpointed_block' needs gradient_checkpointing_mode: keep_attention; use compile_scope 'block'"
        )
    if settings.blocks_to_swap:
        if device.type != "cuda":
            raise ConfigError("musubi_blocks_to_swap streams weights to a CUDA device; set it to 0 on the CPU")
        if settings.blocks_to_swap > len(blocks):
            raise ConfigError(f"musubi_blocks_to_swap={settings.blocks_to_swap} but the DiT has {len(blocks)} blocks")
        if trains_base_weights(dit):
            refuse_trained_base(settings)
    from longcat_tuner.runtime.block_swap import apply_block_swap, place_with_swapped_blocks

    place_with_swapped_blocks(dit, device, settings.blocks_to_swap)
    stream = torch.cuda.Stream(device=device) if settings.checkpointing == "offload_inputs" and device.type == "cuda" else None
    originals: dict[int, Callable[..., Any]] = {}
    recomputed = set()
    for i, block in enumerate(blocks):
        if is_wrapped(block):
            raise RuntimeError(
                f"block {i} already has a wrapped forward: call remove() on the earlier AppliedRuntime "
                "(or checkpointing.remove_gradient_checkpointing) first"
            )
        original = block.forward
        forward, is_recomputed = _compose(original, settings, i, stream)
        if forward is not original:
            originals[i] = original
            block.forward = forward
        if is_recomputed:
            recomputed.add(i)
            setattr(block, CHECKPOINT_ATTR, original)  # the mark: block swap and remove_gradient_checkpointing read it
    applied = AppliedRuntime(dit, settings, originals, frozenset(recomputed))
    if settings.blocks_to_swap:
        applied.swap = apply_block_swap(
            dit, settings.blocks_to_swap, swap_device=settings.swap_device, compute_device=device,
            on_transfer=on_transfer, recomputed=applied.recomputed,
        )
    return applied
