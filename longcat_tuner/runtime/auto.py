"""Automatic memory/speed settings: the fastest `MemorySettings` the planner predicts to fit the card.

`choose_plan` is pure (no torch): given the config, which of its memory keys the user set, the largest
training clip shape, the card's memory and the cap (`max_gpu_memory_gib`), it searches checkpointing
mode (and how many blocks keep attention), torch.compile and its scope, and the fewest swapped blocks,
and returns the fastest combination whose predicted peak fits the budget. Policy:

* a key the user sets always wins: its field is pinned and the search varies the others; if nothing fits
  with the pinned fields, `ConfigError` names them, the predicted peak, and the settings that would fit;
* bf16 base weights first; 8-bit storage (`fp8-torchao`) is chosen only when nothing in bf16 fits
  (it changes the numerics of the frozen weights, so it is never picked for speed alone);
* float8 compute (`fp8-compute`) is never chosen here, only run when the user sets it (opt-in);
* the budget is the card less other processes' memory, within the cap, less this process's CUDA context;
  the validation video (batch 2 with CFG) must fit beside the training state as well (if only training
  fits, the plan says validation may run out of memory; that is a warning of the run, not its end);
* the allocator's reserve above the allocation is the calibrated factor of the allocator in use (train
  and sample turn on expandable segments unless the user set the allocator: runtime/allocator.py);
* on the CPU, for full fine-tunes, FSDP, or a DiT of another size than the calibrated 13.6B, the plan
  is the config's own settings (reported as such); the cap is still enforced on CUDA.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator, Optional

from longcat_tuner.errors import ConfigError
from longcat_tuner.runtime import planner
from longcat_tuner.runtime.settings import CONFIG_KEYS, MemorySettings

KEEP_ATTENTION_BLOCK_CHOICES = (None, 36, 24, 12)  # None: every block keeps its attention outputs


@dataclasses.dataclass(frozen=True)
class ClipShape:
    """The largest training micro-batch: pixels per clip, batch size, whether it has a start frame."""

    frames: int
    height: int
    width: int
    batch: int = 1
    has_start_frame: bool = True

    @property
    def text(self) -> str:
        return f"{self.height}x{self.width}x{self.frames} (batch {self.batch})"


@dataclasses.dataclass(frozen=True)
class Plan:
    """The settings a run uses and why; `to_event` is what goes into events.jsonl (`memory_plan`)."""

    settings: MemorySettings
    source: str  # "auto" (chosen here) or "config" (the config's settings as given)
    reason: str
    budget_gib: Optional[float] = None
    card_gib: Optional[float] = None
    cap_gib: Optional[float] = None
    shape: Optional[ClipShape] = None
    predicted_step_s: Optional[float] = None
    predicted_peak_gib: Optional[float] = None
    chosen_by: dict[str, str] = dataclasses.field(default_factory=dict)  # field -> "auto" | "config"
    predicted_validation_peak_gib: Optional[float] = None
    expandable_segments: Optional[bool] = None  # the allocator's (None: not known, e.g. on the CPU)

    def to_event(self) -> dict[str, Any]:
        return {
            "source": self.source, "reason": self.reason, "settings": self.settings.config_values(),
            "describe": self.settings.describe(), "budget_gib": self.budget_gib, "card_gib": self.card_gib,
            "cap_gib": self.cap_gib, "shape": dataclasses.asdict(self.shape) if self.shape else None,
            "predicted_step_s": self.predicted_step_s, "predicted_peak_gib": self.predicted_peak_gib,
            "chosen_by": dict(self.chosen_by), "predicted_validation_peak_gib": self.predicted_validation_peak_gib,
            "expandable_segments": self.expandable_segments,
        }

    def summary(self) -> str:
        """The lines `train` prints before it loads the model."""
        lines = [f"memory plan ({self.source}): {self.settings.describe()}"]
        if self.predicted_step_s is not None:
            lines.append(
                f"  predicted {self.predicted_step_s:.1f} s/step, peak {self.predicted_peak_gib:.1f} GiB allocated "
                f"at {self.shape.text}, budget {self.budget_gib:.1f} GiB"
                + (f"; validation {self.predicted_validation_peak_gib:.1f} GiB" if self.predicted_validation_peak_gib else "")
                + ("; allocator: expandable segments" if self.expandable_segments else "")
            )
        lines.append(f"  why: {self.reason}")
        return "\n".join(lines)


def budget_gib(card_gib: Optional[float], others_gib: float, cap_gib: Optional[float]) -> Optional[float]:
    """What PyTorch's allocator may hold in a run: the card less what other processes hold, within
    `max_gpu_memory_gib` (the whole process's cap), less this process's CUDA context."""
    if card_gib is None:
        return None
    available = card_gib - others_gib
    return round((min(available, cap_gib) if cap_gib else available) - planner.CONTEXT_GIB, 3)


def is_calibrated(dit_config: Any) -> bool:
    """Whether the planner's numbers describe this DiT (the 13.6B release: hidden 4096, FFN 11008, 48 blocks)."""
    return (dit_config.hidden_size, dit_config.ffn_hidden_size, dit_config.depth) == (planner.HIDDEN, planner.FFN, planner.DEPTH)


def pinned_fields(config: Any, explicit: Iterable[str]) -> dict[str, Any]:
    """MemorySettings fields fixed by keys the user set (`explicit`: config key names)."""
    explicit = set(explicit)
    given = MemorySettings.from_config(config)
    pinned: dict[str, Any] = {}
    for field, keys in CONFIG_KEYS.items():
        if field == "checkpointing":
            if "gradient_checkpointing" in explicit and not config.gradient_checkpointing:
                pinned[field] = "none"
            elif "gradient_checkpointing_mode" in explicit:
                pinned[field] = config.gradient_checkpointing_mode
            continue
        if any(key in explicit for key in keys):
            pinned[field] = getattr(given, field)
    # `gradient_checkpointing: true` alone (the guide's config) leaves the mode to the plan, but not "none".
    return pinned


def _candidates(pinned: dict[str, Any], *, allow_none: bool, compile_ok: bool, precision: str) -> Iterator[MemorySettings]:
    """Memory settings to try (pinned fields fixed)."""
    modes = [pinned["checkpointing"]] if "checkpointing" in pinned else (
        ["keep_attention", "full", "offload_inputs"] + (["none"] if allow_none else []))
    compiles = [pinned["compile_blocks"]] if "compile_blocks" in pinned else ([True, False] if compile_ok else [False])
    for mode in modes:
        keeps = [pinned.get("keep_attention_blocks")] if ("keep_attention_blocks" in pinned or mode != "keep_attention") \
            else list(KEEP_ATTENTION_BLOCK_CHOICES)
        for keep in keeps:
            for compiled in compiles:
                scopes = [pinned["compile_scope"]] if "compile_scope" in pinned else (
                    ["block", "checkpointed_block"] if compiled and mode == "keep_attention" else ["block"])
                for scope in scopes:
                    if scope == "checkpointed_block" and not (compiled and mode == "keep_attention"):
                        continue
                    yield MemorySettings(
                        checkpointing=mode, keep_attention_blocks=keep if mode == "keep_attention" else None,
                        uncheckpointed_blocks=pinned.get("uncheckpointed_blocks", 0) if mode != "none" else 0,
                        compile_blocks=compiled, compile_scope=scope, blocks_to_swap=0,
                        swap_device=pinned.get("swap_device", "cpu"), base_precision=precision,
                    )


@dataclasses.dataclass(frozen=True)
class Workload:
    """What a plan is sized for: the largest training clip, the validation video (None: no validation),
    the LoRA rank, whether the allocator runs expandable segments (runtime/allocator.py) and whether the
    self-attention is block-sparse (its time, not its memory, differs)."""

    shape: ClipShape
    lora_rank: int = planner.DEFAULT_LORA_RANK
    validation: Optional[ClipShape] = None  # batch 2 when CFG batches the two passes
    expandable_segments: bool = False
    block_sparse: bool = False  # training's self-attention runs block-sparse (`uses_block_sparse`)
    bsa_sparsity: float = planner.BSA_SPARSITY


def _estimate(settings: MemorySettings, work: Workload) -> planner.Estimate:
    shape = work.shape
    return planner.estimate(planner.Setting.from_memory(
        settings, height=shape.height, width=shape.width, frames=shape.frames, batch=shape.batch,
        lora_rank=work.lora_rank, num_cond_latents=1 if shape.has_start_frame else 0,
        expandable_segments=work.expandable_segments, block_sparse=work.block_sparse, bsa_sparsity=work.bsa_sparsity,
    ))


def uses_block_sparse(attention: str, shape: Optional[ClipShape], *, enable_bsa: bool,
                      chunk: tuple[int, int, int] = (4, 4, 4), triton: bool = True) -> bool:
    """Whether training's self-attention at `shape` runs block-sparse on CUDA: `attention_implementation`
    `block_sparse`, or `auto` on a checkpoint that enables it where the attention policy takes it (more than
    one latent frame, a token grid of whole chunks, Triton installed; model/attention.py)."""
    if attention == "block_sparse":
        return True
    if attention != "auto" or not enable_bsa or shape is None or not triton:
        return False
    grid = planner.token_grid(shape.height, shape.width, shape.frames)
    if grid[0] <= 1:
        return False
    from longcat_tuner.model.block_sparse import block_sparse_supported

    return block_sparse_supported(grid, grid, chunk)[0]


def validation_peak_gib(settings: MemorySettings, work: Workload) -> Optional[float]:
    """Predicted peak allocated GiB of a validation video during training: the resident base weights and the
    LoRA training state (optimizer included) plus one denoising forward's working set at the validation
    shape: `sampling_peak_gib`, what `sample` plans for, plus that state; None without validation."""
    if work.validation is None:
        return None
    lora_state_gib = round(16.0 * planner.lora_params(work.lora_rank) / planner.GIB, 2)  # as the estimate's part
    return round(sampling_peak_gib(work.validation, settings.blocks_to_swap, settings.base_precision,
                                   compiled=settings.compile_blocks) + lora_state_gib, 2)


def _fits(settings: MemorySettings, estimate: planner.Estimate, work: Workload, budget_gib: float) -> bool:
    """Training and (when the run validates) validation both fit `budget_gib`."""
    if not planner.fits(estimate, budget_gib):
        return False
    validation = validation_peak_gib(settings, work)
    return validation is None or planner.fits_gib(validation, budget_gib, estimate.reserved_factor)


def _most_uncheckpointed(settings: MemorySettings, estimate: planner.Estimate, work: Workload,
                         budget_gib: float) -> tuple[MemorySettings, planner.Estimate]:
    """`settings` with the most blocks left out of checkpointing that still fit (each one skips its recompute)."""
    low, high, found = 0, planner.DEPTH, (settings, estimate)
    while low < high:  # the peak grows with every block left out: the largest count that fits
        middle = (low + high + 1) // 2
        candidate = dataclasses.replace(settings, uncheckpointed_blocks=middle)
        candidate_estimate = _estimate(candidate, work)
        if _fits(candidate, candidate_estimate, work, budget_gib):
            low, found = middle, (candidate, candidate_estimate)
        else:
            high = middle - 1
    return found


def _fastest(pinned: dict[str, Any], work: Workload, budget_gib: float, *, compile_ok: bool,
             precisions: tuple[str, ...]) -> Optional[tuple[MemorySettings, planner.Estimate]]:
    """The fastest settings that fit `budget_gib` (fewest swapped blocks per combination), or None.

    The room left at that swap count goes to blocks left out of checkpointing (unless pinned); blocks are
    never swapped to make room for them (a swapped block frees ~0.5 GiB, a block's activations take ~10)."""
    best = None
    for precision in precisions:
        for base in _candidates(pinned, allow_none=True, compile_ok=compile_ok, precision=precision):
            swaps = [pinned["blocks_to_swap"]] if "blocks_to_swap" in pinned else range(0, planner.DEPTH + 1)
            for swap in swaps:
                settings = dataclasses.replace(base, blocks_to_swap=swap)
                estimate = _estimate(settings, work)
                if _fits(settings, estimate, work, budget_gib):
                    if base.checkpointing != "none" and "uncheckpointed_blocks" not in pinned:
                        settings, estimate = _most_uncheckpointed(settings, estimate, work, budget_gib)
                    if best is None or (estimate.step_s, estimate.peak_gib) < (best[1].step_s, best[1].peak_gib):
                        best = (settings, estimate)
                    break  # more swapped blocks are only slower
        if best is not None:
            return best  # bf16 first: 8-bit weights only when nothing in bf16 fits
    return best


def choose_plan(
    config: Any,
    *,
    explicit: Iterable[str],
    shape: Optional[ClipShape],
    cuda: bool,
    card_gib: Optional[float] = None,
    others_gib: float = 0.0,
    compile_ok: bool = True,
    fp8_ok: bool = True,
    calibrated_model: bool = True,
    distributed_strategy: Optional[str] = None,
    validation: Optional[ClipShape] = None,
    expandable_segments: bool = False,
    block_sparse: bool = False,
    bsa_sparsity: float = planner.BSA_SPARSITY,
) -> Plan:
    """The run's `Plan` (see the module docstring). `explicit`: the config keys the user set; `others_gib`:
    memory other processes hold on the card (the plan fits in what is left); `validation`: the largest
    validation video (batch 2 with CFG), which must fit beside the training state too; `expandable_segments`:
    the allocator the run uses (it sets how much the reserve exceeds the allocation); `block_sparse`: the
    training self-attention is block-sparse at `bsa_sparsity` (`uses_block_sparse`), which the step time counts."""
    given = MemorySettings.from_config(config)
    cap = getattr(config, "max_gpu_memory_gib", None)
    budget = budget_gib(card_gib, others_gib, cap)
    as_given = dict(card_gib=card_gib, cap_gib=cap, budget_gib=budget, shape=shape,
                    chosen_by={field: "config" for field in CONFIG_KEYS})
    if not cuda:
        return Plan(given, "config", "no CUDA device: the config's settings as given (the plan sizes GPU runs)", **as_given)
    if config.model_type != "lora":
        return Plan(given, "config", "full fine-tune: the planner models LoRA training; the config's settings as given", **as_given)
    if distributed_strategy == "fsdp":
        return Plan(given, "config", "FSDP shards the weights: the single-GPU plan does not apply; the config's settings as given", **as_given)
    if not calibrated_model:
        return Plan(given, "config", "the planner is calibrated for the 13.6B DiT only; the config's settings as given", **as_given)
    if shape is None or budget is None:
        return Plan(given, "config", "no clip shape or card size known: the config's settings as given", **as_given)
    pinned = pinned_fields(config, explicit)
    precisions = (given.base_precision,) if "base_precision" in pinned else (
        ("no_change", "fp8-torchao") if fp8_ok else ("no_change",))
    work = Workload(shape, lora_rank=config.lora_rank, validation=validation, expandable_segments=expandable_segments,
                    block_sparse=block_sparse, bsa_sparsity=bsa_sparsity)
    found = _fastest(pinned, work, budget, compile_ok=compile_ok, precisions=precisions)
    validation_warning = ""
    if found is None and validation is not None:
        # Training fits but validation beside it does not: train anyway (a validation that runs out of memory
        # is a warning of the run, not its end) and say so now.
        work = dataclasses.replace(work, validation=None)
        found = _fastest(pinned, work, budget, compile_ok=compile_ok, precisions=precisions)
        if found is not None:
            validation_warning = (
                f"; validation at {validation.text} does not fit beside training (predicted "
                f"{validation_peak_gib(found[0], dataclasses.replace(work, validation=validation)):.1f} GiB): "
                "it may run out of memory (training goes on); lower validation_resolution or "
                "validation_num_video_frames, or set validation_guidance 1"
            )
    if found is None:
        free = _fastest({}, work, budget, compile_ok=compile_ok,
                        precisions=("no_change", "fp8-torchao") if fp8_ok else ("no_change",))
        where = f"{shape.text} within {budget:.1f} GiB"
        if pinned and free is not None:
            keys = ", ".join(f"{key}={value!r}" for key, value in _pinned_keys(given, pinned).items())
            raise ConfigError(
                f"the memory settings you set ({keys}) do not fit {where} (max_gpu_memory_gib / the card); "
                f"settings that would fit: {free[0].describe()} (predicted {free[1].peak_gib:.1f} GiB, "
                f"{free[1].step_s:.1f} s/step): remove those keys to let the plan choose, or set these"
            )
        raise ConfigError(
            f"no memory setting fits {where}, even with every block swapped and 8-bit base weights; lower the "
            "training resolution or frame count (the largest bucket sets the size), or raise max_gpu_memory_gib"
        )
    settings, estimate = found
    chosen_by = {field: ("config" if field in pinned else "auto") for field in CONFIG_KEYS}
    auto_fields = [field for field, who in chosen_by.items() if who == "auto"]
    reason = (
        f"the fastest predicted setting that fits {budget:.1f} GiB"
        + (f" (max_gpu_memory_gib {cap:g} on a {card_gib:.0f} GiB card)" if cap else f" (the whole {card_gib:.0f} GiB card)")
        + (f"; {others_gib:.1f} GiB of it held by other processes" if others_gib else "")
        + f" at the largest training clip {shape.text}"
        + (f" with block-sparse attention (sparsity {bsa_sparsity:g})" if block_sparse else "")
        + (f"; set by you: {', '.join(sorted(set(CONFIG_KEYS) - set(auto_fields)))}" if pinned else "")
        + ("; 8-bit base weights because nothing in bf16 fits" if settings.quantized and "base_precision" not in pinned else "")
        + validation_warning
    )
    return Plan(settings, "auto", reason, budget_gib=budget, card_gib=card_gib, cap_gib=cap, shape=shape,
                predicted_step_s=estimate.step_s, predicted_peak_gib=estimate.peak_gib, chosen_by=chosen_by,
                predicted_validation_peak_gib=validation_peak_gib(settings, dataclasses.replace(work, validation=validation)),
                expandable_segments=expandable_segments)


def _pinned_keys(given: MemorySettings, pinned: dict[str, Any]) -> dict[str, Any]:
    values = given.config_values()
    keys = {}
    for field in pinned:
        for key in CONFIG_KEYS[field]:
            keys[key] = values[key]
    return keys


# --- sampling -------------------------------------------------------------------------------------------
# A denoising forward keeps no activations for backward: its working set is a share of the training block
# working set per clip in the batch (CFG batches the conditional and unconditional passes: 2).
# Compiled blocks: measured in validation during `train` (batch 2, 480x832x93, one H100, 2026-12-06,
# bench/results/product-2026-12-06b-h100.json): the validation peak was 32.14 / 10.07 / 16.37 GiB allocated
# under three plans whose weights and LoRA state come to 25.92 / 3.85 / 10.16 GiB, so 6.21 GiB of working set
# each time, 0.304 of the 20.44 GiB two-clip training working set; 0.31 is used. Eager blocks: 0.5. Checked
# against `sample`'s own runtime (bench/bench_sampling.py, same card and shape, no LoRA, 2026-12-06): peaks of
# 35.76 (eager), 31.25 (compiled) and 19.17 GiB (compiled fp8-compute) against 37.02 / 31.63 / 20.36 predicted.
SAMPLING_WORKING_SHARE = {"compiled": 0.31, "eager": 0.5}


def sampling_peak_gib(shape: ClipShape, blocks_to_swap: int, base_precision: str, *, compiled: bool = False) -> float:
    """Predicted peak allocated GiB of one denoising step at `shape` (its `batch`: 2 with CFG)."""
    precision = "bf16" if base_precision == "no_change" else base_precision
    setting = planner.Setting(height=shape.height, width=shape.width, frames=shape.frames, batch=shape.batch,
                              blocks_to_swap=blocks_to_swap, precision=precision, compiled=compiled,
                              num_cond_latents=1 if shape.has_start_frame else 0)
    estimate = planner.estimate(setting)
    memory = estimate.memory_gib
    peak = memory["base_weights"] + _working_share(compiled) * memory["block_working_set"]
    if precision == planner.FP8_COMPUTE:
        # Its matmuls read float8 copies of their inputs, made beside the bf16 working set; the widest is the
        # FFN output layer's (one byte a channel): 0.77 GiB at 480x832x93 with CFG, where the measured peak
        # was 0.64 GiB above the bf16 share (one H100, 2026-12-06, bench/results/product-2026-12-06c-h100-fp8c.jsonl).
        peak += estimate.tokens * shape.batch * planner.FFN / planner.GIB
    return round(peak, 2)


def _working_share(compiled: bool) -> float:
    return SAMPLING_WORKING_SHARE["compiled" if compiled else "eager"]


def choose_sampling_swap(shape: ClipShape, budget_gib: float, *, base_precision: str = "no_change",
                         expandable_segments: bool = False, compiled: bool = False,
                         lora_gib: float = 0.0) -> tuple[int, float]:
    """(fewest swapped blocks whose sampling peak fits `budget_gib`, that peak); `ConfigError` when none does.

    `lora_gib`: un-merged LoRA adapters, which stay on the GPU whatever is swapped (runtime/block_swap.py)."""
    factor = planner.reserved_factor(planner.Setting(expandable_segments=expandable_segments))
    for swap in range(planner.DEPTH + 1):
        peak = sampling_peak_gib(shape, swap, base_precision, compiled=compiled) + lora_gib
        if planner.fits_gib(peak, budget_gib, factor):
            return swap, round(peak, 2)
    lowest = sampling_peak_gib(shape, planner.DEPTH, base_precision, compiled=compiled) + lora_gib
    raise ConfigError(
        f"sampling {shape.text} does not fit {budget_gib:.1f} GiB even with every block swapped "
        f"(predicted {lowest:.1f} GiB"
        + (f", {lora_gib:.1f} of them un-merged LoRA adapters" if lora_gib else "")
        + "): lower --resolution or --frames, use --guidance 1 (one pass per step)"
        + (", merge the LoRAs (--merge-loras on)" if lora_gib else "")
        + ", or raise --max-gpu-memory-gib"
    )
