"""Planner: expected peak GPU memory and step time of a LoRA training setting, and settings that fit.

A simple additive model, calibrated by the H100 benchmarks in `bench/results/` (see `CALIBRATION`):

peak memory (allocated) = resident base weights (blocks not swapped, two swap buffers, the rest)
                        + LoRA training state (float32 adapter, gradient, two AdamW moments: 16 B a parameter)
                        + checkpointed block inputs (one bf16 hidden state per block, unless offloaded)
                        + kept attention outputs (selective checkpointing)
                        + the working set of one block's recompute and backward (bytes per token, measured)
step time = attention (forward passes at the measured forward rate, backward at the measured rate)
          + linear layers and element-wise work (effective rate measured, eager or torch.compile)
          + block swap, activation offload and fp8 dequantization costs (measured)

Every constant lives in `CALIBRATION`, next to the measurement it came from. Everything is pure
arithmetic on plain values (no torch), so `longcat-tuner plan` runs anywhere.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from longcat_tuner.config.training import TrainConfig
from longcat_tuner.model.config import DiTConfig

DEFAULT_LORA_RANK: int = TrainConfig.model_fields["lora_rank"].default
BSA_SPARSITY: float = DiTConfig.bsa_sparsity  # the release's block-sparse sparsity (a checkpoint may set another)

GIB = 2**30

# Measured on one NVIDIA H100 80GB HBM3 (torch 2.11.0+cu130, cuDNN SDPA), full 13.6B DiT with random bf16
# weights, I2V, batch 1, 480x832x93 = 37,440 tokens, rank-32 LoRA on the default targets, AdamW, bf16
# autocast, 2026-11-25. Files: bench/results/sdpa_check.json, train_step_ladder.json (eager),
# train_step_speed.json (torch.compile).
CALIBRATION = {
    "device": "NVIDIA H100 80GB HBM3",
    "source": "bench/results/{sdpa_check,train_step_ladder,train_step_speed}.json (2026-11-25)",
    # cuDNN SDPA on the noisy call (35,880 x 37,440, 32 heads of 128): 60.7 ms forward (363 TFLOP/s),
    # 78.8 ms backward (558 TFLOP/s counting 2x the forward FLOPs).
    "attention_fwd_tflops": 363.0,
    "attention_bwd_tflops": 558.0,
    # Linear layers plus all element-wise work, per linear FLOP (forward, recompute, input gradients):
    # eager full checkpointing 19.21 s/step - 9.75 s attention = 9.46 s for 3 x 844.6 TFLOP -> 268;
    # torch.compile'd blocks 14.35 s - 9.75 s = 4.60 s -> 551.
    "linear_tflops_eager": 268.0,
    "linear_tflops_compiled": 551.0,
    # Selective checkpointing (attention kept) measured 12.49 s vs 14.35 s: it saved 63% of one attention
    # forward pass (not 100%: the kept outputs are re-read, and the run also swapped 12 blocks).
    "keep_attention_saving": 0.63,
    # Block swap: 47 blocks cost 0.11 s per step (19.21 -> 19.32 s): copies hide behind compute.
    "swap_s_per_block": 0.0023,
    "h2d_gbps": 20.0,
    # Activation offload: +0.69 s (compiled) / +1.14 s (eager) for 13.7 GiB of block inputs -> ~15 GB/s.
    "offload_gbps": 15.0,
    # fp8 weights: dequantizing per layer call costs 0.3 s per step (19.21 -> 19.51 s), independent of tokens.
    "fp8_dequant_s": 0.3,
    # Working set of one block in recompute + backward beyond the checkpointed inputs, bytes per token:
    # eager 53.27 GiB peak - 25.29 weights - 2.54 LoRA state - 13.71 inputs = 11.73 GiB -> 336 KB;
    # compiled 51.76 GiB -> 10.22 GiB -> 293 KB.
    "working_bytes_per_token_eager": 336_000.0,
    "working_bytes_per_token_compiled": 293_000.0,
    # Offloaded checkpointing holds a larger backward working set (the block's output gradient, its input
    # and the recomputed graph at once): 20.12 GiB measured vs 15.17 GiB counted -> 4.95 GiB -> 142 KB.
    "offload_extra_bytes_per_token_eager": 142_000.0,
    # Compiled blocks hold no such extra: the product benchmark's 24 GiB plan (offload_inputs, compiled, 41
    # swapped, rank 8) peaked at 15.04 GiB allocated against 15.65 counted without it (one H100, 2026-12-06,
    # bench/results/product-2026-12-06-h100-cap24.jsonl; 20.60 with the eager extra).
    "offload_extra_bytes_per_token_compiled": 0.0,
    # Reserved (what nvidia-smi shows) over allocated, seen up to 1.25x with offload; used for "fits".
    "reserved_factor": 1.08,
    # compile_scope checkpointed_block (keep_attention, compiled, 12 swapped blocks), one H200, 2026-12-02
    # (bench/results/train_step_speed-2026-12-02-h200.json): 11.935 s vs 12.086 s for the compiled block
    # inside the checkpoint -> 0.988x; peak allocated 59.96 vs 57.30 GiB -> 2.66 GiB at 37,440 tokens ->
    # 76 KB a token (reserved rose more, 70.8 vs 60.2 GiB).
    "checkpointed_block_time_factor": 0.988,
    "checkpointed_block_extra_bytes_per_token": 76_000.0,
    # The compiled checkpointed block holds more memory reserved but unallocated: on an H200, 2026-12-03
    # (bench/results/train_step_plan_caps-2026-12-03-h200.json) 63.8 GiB allocated / 76.1 reserved
    # (1.19x) on the whole card and 63.8 / 76.6 (1.20x) under an 80 GiB cap; under a 48 GiB cap with 45
    # swapped blocks it ran out of memory with 8.6 GiB reserved but unallocated. 1.25 keeps it off
    # budgets where that slack does not fit.
    "reserved_factor_checkpointed_block": 1.25,
    # With expandable segments (runtime/allocator.py, what train and sample use unless the user sets the
    # allocator) freed pages serve any size, so the reserve stays near the allocation whatever the scope.
    # `longcat-tuner train` on one H100, 2026-12-06 (bench/results/product-2026-12-06b-h100.json): reserved /
    # allocated 65.42 / 64.01 = 1.022 (whole card, compiled checkpointed block, no swap), 43.17 / 41.94 =
    # 1.029 (48 GiB cap, 44 swapped), 21.31 / 19.74 = 1.080 (24 GiB cap, offloaded inputs). 1.04 with the
    # 1.5 GiB headroom covers all three (the predicted allocation is also 0.6 to 1.6 GiB high).
    "reserved_factor_expandable": 1.04,
    # A block left out of checkpointing (gradient_checkpointing_uncheckpointed_blocks) stores its activations
    # for backward instead of its input. Compiled: `longcat-tuner train` on one H100, 2026-12-06
    # (bench/results/product-2026-12-06c-h100-fp8c.jsonl): the whole-card plan with fp8-compute and 2
    # uncheckpointed blocks peaked at 65.14 GiB allocated against 64.01 for bf16 with none. The fp8 weights
    # save 11.3 GiB (the two runs' validation peaks, 32.14 vs 20.86, less fp8's float8 activation copy) to
    # 12.0 (this model's count), so the two blocks hold 12.4 to 13.4 GiB more than the two block inputs they
    # no longer keep: 186 to 197 KB a token; 192 KB is taken (the earlier bound, one block's whole recompute
    # + backward working set, was 293 KB). Eager: not measured, still that bound.
    "uncheckpointed_bytes_per_token_eager": 336_000.0,
    "uncheckpointed_bytes_per_token_compiled": 192_000.0,
    "headroom_gib": 1.5,
    # base_model_precision fp8-compute (runtime/fp8_compute.py): the frozen linears' forward, recompute and
    # input gradient as rowwise-scaled float8 matmuls; memory is fp8-torchao's (same stored weights). The
    # linear and element-wise share runs 1.2x faster than in bf16: `longcat-tuner train` on one H100,
    # 2026-12-06, whole card, compiled checkpointed block, 2 uncheckpointed blocks: 11.47 s/step (predicted
    # 11.49) against 12.22 for bf16 (predicted 12.34); bench/results/product-2026-12-06c-h100-fp8c.jsonl.
    # Hopper's float8 peak is 2x bf16's; the quantization passes of activations and gradients and the
    # LoRA and element-wise work, which stay bf16, take most of it.
    "fp8_compute_linear_speedup": 1.2,
    # Block-sparse self-attention (attention_implementation block_sparse, or auto on a checkpoint that enables
    # it; sparsity 0.9375, the release's): its time as a share of dense SDPA's at the same shape. Our kernel
    # against cuDNN on one H100, 2026-11-25 (bench/results/attention-2026-11-25-h100.json): forward +
    # backward 0.0264 / 0.1363 s = 0.194 at 37,440 tokens (35,880 queries), 0.380 / 2.886 s = 0.132 at 168,960
    # (the kernel gains with size: selection and edge blocks weigh less). In a whole training step the share
    # is higher: the LoRA step at 512x832x93 (39,936 tokens, full checkpointing, eager) on one H200, 2026-12-02
    # (bench/results/train_step_block_sparse-2026-12-02-h200.json) took 11.26 s against 18.85 dense, 7.59 s
    # saved of about 9.87 s of attention (this model's attention share of the dense step), a share of 0.23.
    # Taken: the step's 0.23 at 39,936 tokens, scaled with size as the kernel's share (log-linear in the
    # tokens between the two kernel points, held outside them), and in proportion to the kept fraction
    # (1 - sparsity) / 0.0625 for other sparsities. Cross-attention (512 text tokens) stays dense.
    "bsa_step_share": 0.23,
    "bsa_step_share_tokens": 39_936,
    "bsa_kernel_share_points": ((37_440, 0.194), (168_960, 0.132)),
    "bsa_reference_kept": 0.0625,
}

# What a CUDA context and the kernels loaded with it take on the card outside PyTorch's allocator: 0.8 GiB
# on an H100 with torch 2.11+cu130 (an out-of-memory report of 2026-12-06: 71.71 GiB in use by the process,
# 70.91 reserved by PyTorch). A memory cap is the whole process's, so plans and the allocator get the cap
# less this.
CONTEXT_GIB = 0.8

# LongCat-Video 13.6B shapes (DiTConfig defaults).
HIDDEN = 4096
FFN = 11008
DEPTH = 48
ADALN = 512
CAPTION = 4096
TEXT_TOKENS = 512
LINEAR_TARGETS = {  # (in, out, parts) of the default LoRA targets
    "attn.qkv": (HIDDEN, 3 * HIDDEN, 3),
    "attn.proj": (HIDDEN, HIDDEN, 1),
    "cross_attn.q_linear": (HIDDEN, HIDDEN, 1),
    "cross_attn.kv_linear": (HIDDEN, 2 * HIDDEN, 2),
    "cross_attn.proj": (HIDDEN, HIDDEN, 1),
    "ffn.w1": (HIDDEN, FFN, 1),
    "ffn.w2": (FFN, HIDDEN, 1),
    "ffn.w3": (HIDDEN, FFN, 1),
}
FP8_COMPUTE = "fp8-compute"  # 8-bit storage as fp8-torchao, float8 matmuls (opt-in; never chosen by auto.py)
QUANTIZED = ("int8-quanto", "fp8-torchao", FP8_COMPUTE)


@dataclasses.dataclass(frozen=True)
class Setting:
    """What the planner needs from a training config (plain values)."""

    height: int = 480
    width: int = 832
    frames: int = 93
    batch: int = 1
    lora_rank: int = DEFAULT_LORA_RANK  # the schema's default (the calibration runs used 32)
    blocks_to_swap: int = 0
    precision: str = "bf16"  # bf16 | fp8-torchao | int8-quanto | fp8-compute (no_change = bf16 on CUDA)
    gradient_checkpointing: bool = True
    keep_attention: bool = False  # selective checkpointing: attention outputs kept, not recomputed
    keep_attention_blocks: Optional[int] = None  # with keep_attention: the first k blocks keep it (None: all)
    uncheckpointed_blocks: int = 0  # with checkpointing: the first k blocks store activations, no recompute
    offload_activations: bool = False  # checkpointed block inputs in pinned host memory
    compiled: bool = False  # torch.compile of the blocks
    compile_checkpointed_block: bool = False  # compile_scope checkpointed_block (compiled + keep_attention)
    num_cond_latents: int = 1
    expandable_segments: bool = False  # the CUDA allocator's expandable segments (runtime/allocator.py)
    block_sparse: bool = False  # self-attention runs block-sparse (attention_implementation, see CALIBRATION)
    bsa_sparsity: float = BSA_SPARSITY  # its sparsity (the checkpoint's bsa_sparsity)

    @classmethod
    def from_memory(cls, memory, *, height: int, width: int, frames: int, batch: int = 1,
                    lora_rank: int = DEFAULT_LORA_RANK, num_cond_latents: int = 1,
                    expandable_segments: bool = False, block_sparse: bool = False,
                    bsa_sparsity: float = BSA_SPARSITY) -> "Setting":
        """The planner's view of `memory` (a `runtime.settings.MemorySettings`) at one clip shape."""
        precision = "bf16" if memory.base_precision == "no_change" else memory.base_precision
        return cls(
            height=height, width=width, frames=frames, batch=batch, lora_rank=lora_rank,
            blocks_to_swap=memory.blocks_to_swap, precision=precision,
            gradient_checkpointing=memory.checkpointing != "none",
            keep_attention=memory.checkpointing == "keep_attention",
            keep_attention_blocks=memory.keep_attention_blocks if memory.checkpointing == "keep_attention" else None,
            uncheckpointed_blocks=memory.uncheckpointed_blocks if memory.checkpointing != "none" else 0,
            offload_activations=memory.checkpointing == "offload_inputs",
            compiled=memory.compile_blocks, compile_checkpointed_block=memory.compiles_checkpointed_block,
            num_cond_latents=num_cond_latents, expandable_segments=expandable_segments,
            block_sparse=block_sparse, bsa_sparsity=bsa_sparsity,
        )

    @property
    def uncheckpointed(self) -> int:
        """Blocks that store their activations (all of them without checkpointing)."""
        return min(DEPTH, self.uncheckpointed_blocks) if self.gradient_checkpointing else DEPTH

    @property
    def kept_attention_share(self) -> float:
        """Share of the blocks that are checkpointed and keep their attention outputs: SDPA's, or block-sparse
        attention's forward operator (runtime/selective_checkpoint.py), the same bytes per token either way.

        Until 2026-12-07 the block-sparse forward was an autograd.Function the policy could not see, and such
        plans ran as full checkpointing (`bench/results/train_step_plan_caps-2026-12-07-h100-704x1280-bsa.json`);
        it is an operator now, which the policy keeps."""
        if not self.keep_attention:
            return 0.0
        keeping = DEPTH if self.keep_attention_blocks is None else max(0, min(self.keep_attention_blocks, DEPTH))
        return max(0, keeping - self.uncheckpointed) / DEPTH


@dataclasses.dataclass(frozen=True)
class Estimate:
    tokens: int
    memory_gib: dict[str, float]
    peak_gib: float
    step_s: float
    step_parts_s: dict[str, float]
    reserved_factor: float = 1.08  # reserved / allocated expected for this setting (CALIBRATION)


def token_grid(height: int, width: int, frames: int) -> tuple[int, int, int]:
    """Token grid of a clip: VAE 4x temporal / 8x spatial, then 1x2x2 patches."""
    if height % 16 or width % 16:
        raise ValueError(f"resolution {height}x{width} must be divisible by 16")
    if (frames - 1) % 4:
        raise ValueError(f"frames={frames}: (frames - 1) must be divisible by 4")
    return (1 + (frames - 1) // 4, height // 16, width // 16)


def block_linear_params() -> int:
    block = sum(i * o for i, o, _ in LINEAR_TARGETS.values())
    biases = 3 * HIDDEN + HIDDEN + HIDDEN + 2 * HIDDEN + HIDDEN  # qkv, proj, q, kv, cross proj
    adaln = ADALN * 6 * HIDDEN + 6 * HIDDEN
    norms = 2 * HIDDEN + 2 * (HIDDEN // 32)
    return block, biases + adaln + norms


def weight_bytes_per_block(precision: str) -> float:
    linear, other = block_linear_params()
    per_weight = 1.0 if precision in QUANTIZED else 2.0
    scales = 4.0 * sum(o for _, o, _ in LINEAR_TARGETS.values()) if precision in QUANTIZED else 0.0
    return linear * per_weight + scales + other * 2.0


def other_weight_bytes() -> float:
    """Embedders and the final layer (bf16)."""
    patch = 16 * 4 * HIDDEN + HIDDEN
    caption = CAPTION * HIDDEN + HIDDEN * HIDDEN + 2 * HIDDEN
    timestep = 256 * ADALN + ADALN * ADALN + 2 * ADALN
    final = HIDDEN * 64 + ADALN * 2 * HIDDEN
    return 2.0 * (patch + caption + timestep + final)


def lora_params(rank: int) -> int:
    per_block = sum(parts * rank * i + o * rank for i, o, parts in LINEAR_TARGETS.values())
    return per_block * DEPTH


def flops(setting: Setting) -> dict[str, float]:
    """Forward matmul FLOPs (linear, attention) for the setting; same count as bench/common.py."""
    t, h, w = token_grid(setting.height, setting.width, setting.frames)
    n = t * h * w
    n_cond = setting.num_cond_latents * h * w
    n_noisy = n - n_cond
    c, f = HIDDEN, FFN
    linear = 2 * (n * (4 * c * c + 3 * c * f) + n_noisy * 2 * c * c + TEXT_TOKENS * 2 * c * c)
    self_attention = 4 * c * (n_cond * n_cond + n_noisy * n)
    attention = self_attention + 4 * c * n_noisy * TEXT_TOKENS
    return {"linear": linear * DEPTH * setting.batch, "attention": attention * DEPTH * setting.batch,
            "self_attention": self_attention * DEPTH * setting.batch, "tokens": n}


def block_sparse_share(tokens: int, sparsity: float, calibration: Optional[dict] = None) -> float:
    """Block-sparse self-attention's time in a training step as a share of dense SDPA's (see CALIBRATION)."""
    cal = CALIBRATION if calibration is None else calibration
    (n0, k0), (n1, k1) = cal["bsa_kernel_share_points"]

    def kernel_share(n: float) -> float:
        n = min(max(n, n0), n1)
        return k0 + (k1 - k0) * (math.log(n) - math.log(n0)) / (math.log(n1) - math.log(n0))

    share = cal["bsa_step_share"] * kernel_share(tokens) / kernel_share(cal["bsa_step_share_tokens"])
    return min(1.0, share * (1.0 - sparsity) / cal["bsa_reference_kept"])


def estimate(setting: Setting, calibration: Optional[dict] = None) -> Estimate:
    """Peak allocated GPU memory and seconds per optimizer step (one micro-batch) for `setting`."""
    cal = dict(CALIBRATION, **(calibration or {}))
    precision = "bf16" if setting.precision in ("no_change", "bf16") else setting.precision
    if precision not in ("bf16", "fp32") + QUANTIZED:
        raise ValueError(f"unknown precision {setting.precision}")
    if not 0 <= setting.blocks_to_swap <= DEPTH:
        raise ValueError(f"blocks_to_swap must be within 0..{DEPTH}")
    if (setting.keep_attention or setting.offload_activations) and not setting.gradient_checkpointing:
        raise ValueError("keep_attention and offload_activations are checkpointing variants: enable checkpointing")
    if setting.compile_checkpointed_block and not (setting.compiled and setting.keep_attention):
        raise ValueError("compile_scope checkpointed_block needs compile_blocks and keep_attention")
    f = flops(setting)
    n = f["tokens"] * setting.batch
    mode = "compiled" if setting.compiled else "eager"
    per_block = weight_bytes_per_block(precision) * (2.0 if precision == "fp32" else 1.0)
    resident_blocks = DEPTH - setting.blocks_to_swap + min(2, setting.blocks_to_swap)
    memory = {
        "base_weights": resident_blocks * per_block + other_weight_bytes(),
        "lora_training_state": 16.0 * lora_params(setting.lora_rank),
    }
    hidden_state = n * HIDDEN * 2.0
    working = n * cal[f"working_bytes_per_token_{mode}"]
    checkpointed = DEPTH - setting.uncheckpointed
    if setting.gradient_checkpointing:
        if setting.offload_activations:
            memory["offload_working_set"] = n * cal[f"offload_extra_bytes_per_token_{mode}"]
        else:
            memory["checkpointed_inputs"] = checkpointed * hidden_state
        if setting.kept_attention_share:
            memory["kept_attention"] = setting.kept_attention_share * DEPTH * hidden_state * (
                1 - setting.num_cond_latents * 1.0 / max(1, token_grid(setting.height, setting.width, setting.frames)[0]))
        if setting.uncheckpointed:
            memory["uncheckpointed_activations"] = setting.uncheckpointed * n * cal[f"uncheckpointed_bytes_per_token_{mode}"]
        memory["block_working_set"] = working
        if setting.compile_checkpointed_block:
            memory["compiled_checkpoint_extra"] = n * cal["checkpointed_block_extra_bytes_per_token"]
    else:
        memory["activations"] = DEPTH * working  # every block keeps its whole working set for backward
    peak = sum(memory.values())

    attention_flops = f["attention"]
    if setting.block_sparse:
        attention_flops -= f["self_attention"] * (1.0 - block_sparse_share(f["tokens"], setting.bsa_sparsity, cal))
    attention_fwd = attention_flops / (cal["attention_fwd_tflops"] * 1e12)
    attention_bwd = 2 * attention_flops / (cal["attention_bwd_tflops"] * 1e12)
    recomputed_share = checkpointed / DEPTH  # blocks whose forward runs again in backward
    attention_passes = 1.0 + recomputed_share
    if setting.keep_attention:
        attention_passes -= cal["keep_attention_saving"] * setting.kept_attention_share
    linear_passes = 2.0 + recomputed_share  # forward, input gradients, recompute
    parts = {
        "attention": attention_passes * attention_fwd + attention_bwd,
        "linear_and_elementwise": linear_passes * f["linear"] / (cal[f"linear_tflops_{mode}"] * 1e12),
    }
    if setting.compile_checkpointed_block:
        parts = {k: v * cal["checkpointed_block_time_factor"] for k, v in parts.items()}
    if precision == FP8_COMPUTE:
        parts["linear_and_elementwise"] /= cal["fp8_compute_linear_speedup"]  # uncalibrated (see CALIBRATION)
    elif precision in QUANTIZED:
        parts["dequantize"] = cal["fp8_dequant_s"] * (linear_passes / 3.0)
    if setting.blocks_to_swap:
        # Each swapped block is copied in twice (forward, backward), overlapping the previous block's compute.
        copy_s = per_block / (cal["h2d_gbps"] * 1e9)
        compute_per_block = (parts["attention"] + parts["linear_and_elementwise"]) / DEPTH / 2
        stall = max(0.0, copy_s - compute_per_block)
        parts["block_swap"] = setting.blocks_to_swap * (cal["swap_s_per_block"] + 2 * stall)
    if setting.offload_activations:
        parts["activation_offload"] = checkpointed * hidden_state / (cal["offload_gbps"] * 1e9)
    step = sum(parts.values())
    return Estimate(
        tokens=f["tokens"],
        memory_gib={k: round(v / GIB, 2) for k, v in memory.items()},
        peak_gib=round(peak / GIB, 2),
        step_s=round(step, 2),
        step_parts_s={k: round(v, 2) for k, v in parts.items()},
        reserved_factor=reserved_factor(setting, cal),
    )


def reserved_factor(setting: Setting, calibration: Optional[dict] = None) -> float:
    """Reserved over allocated expected for `setting` under its allocator (see CALIBRATION)."""
    cal = CALIBRATION if calibration is None else calibration
    if setting.expandable_segments:
        return cal["reserved_factor_expandable"]
    return cal["reserved_factor_checkpointed_block"] if setting.compile_checkpointed_block else cal["reserved_factor"]


def fits(est: Estimate, gpu_memory_gib: float) -> bool:
    """Whether the allocator's reserve (allocated x reserved_factor) plus headroom fits the GPU."""
    return fits_gib(est.peak_gib, gpu_memory_gib, est.reserved_factor)


def fits_gib(peak_gib: float, gpu_memory_gib: float, reserved_factor: Optional[float] = None) -> bool:
    """`fits` for a predicted peak allocated GiB (default reserve: CALIBRATION's reserved_factor)."""
    factor = CALIBRATION["reserved_factor"] if reserved_factor is None else reserved_factor
    return peak_gib * factor + CALIBRATION["headroom_gib"] <= gpu_memory_gib


def suggest(setting: Setting, gpu_memory_gib: float) -> list[tuple[Setting, Estimate]]:
    """Settings close to `setting` that fit `gpu_memory_gib`, fastest first.

    Varies only the memory knobs (kept attention, activation offload, block swap, base precision) with
    checkpointing on; keeps the resolution, frames, rank and compile choice, and lowers the rank only if
    nothing else fits. For each combination the fewest swapped blocks that fit are taken.
    """
    candidates = []
    for rank in sorted({setting.lora_rank, min(setting.lora_rank, 16), min(setting.lora_rank, 8)}, reverse=True):
        for precision in ("bf16", "fp8-torchao"):
            # gradient_checkpointing_mode is one of full, keep_attention, offload_inputs: never both.
            for keep, offload in ((True, False), (False, False), (False, True)):
                for swap in range(0, DEPTH + 1):
                    option = dataclasses.replace(
                        setting, lora_rank=rank, precision=precision, gradient_checkpointing=True,
                        keep_attention=keep, offload_activations=offload, blocks_to_swap=swap,
                        compile_checkpointed_block=setting.compile_checkpointed_block and keep,
                    )
                    est = estimate(option)
                    if fits(est, gpu_memory_gib):
                        candidates.append((option, est))
                        break
        if candidates:
            break
    candidates.sort(key=lambda item: (item[1].step_s, item[1].peak_gib))
    return candidates[:4]


def describe(setting: Setting) -> str:
    knobs = [f"lora_rank {setting.lora_rank}", f"base_model_precision {setting.precision}",
             f"musubi_blocks_to_swap {setting.blocks_to_swap}",
             "gradient_checkpointing " + ("on" if setting.gradient_checkpointing else "off")]
    if setting.keep_attention:
        knobs.append("keep attention (selective checkpointing)")
    if setting.gradient_checkpointing and setting.uncheckpointed_blocks:
        knobs.append(f"first {setting.uncheckpointed_blocks} blocks not checkpointed")
    if setting.offload_activations:
        knobs.append("offload block inputs to host")
    if setting.compiled:
        knobs.append("torch.compile" + (" of the checkpointed block" if setting.compile_checkpointed_block else ""))
    if setting.block_sparse:
        knobs.append(f"block-sparse attention (sparsity {setting.bsa_sparsity:g})")
    return ", ".join(knobs)


def format_plan(setting: Setting, gpu_memory_gib: float) -> str:
    est = estimate(setting)
    t, h, w = token_grid(setting.height, setting.width, setting.frames)
    lines = [
        f"setting: {setting.height}x{setting.width}, {setting.frames} frames, batch {setting.batch} "
        f"-> {t}x{h}x{w} = {est.tokens:,} tokens; {describe(setting)}",
        f"expected peak GPU memory: {est.peak_gib:.1f} GiB  ("
        + ", ".join(f"{k} {v:.1f}" for k, v in est.memory_gib.items()) + ")",
        f"expected step time: {est.step_s:.1f} s  ("
        + ", ".join(f"{k} {v:.1f}" for k, v in est.step_parts_s.items()) + ")",
        f"GPU memory: {gpu_memory_gib:g} GiB -> " + ("fits" if fits(est, gpu_memory_gib) else "does NOT fit")
        + f" (needs ~{est.peak_gib * est.reserved_factor:.1f} GiB reserved by the allocator"
        f" + {CALIBRATION['headroom_gib']} GiB headroom)",
    ]
    options = suggest(setting, gpu_memory_gib)
    if options:
        lines.append("settings that fit, fastest first:")
        for option, option_est in options:
            lines.append(f"  {option_est.step_s:5.1f} s/step, {option_est.peak_gib:5.1f} GiB: {describe(option)}")
    else:
        lines.append("nothing fits: lower the resolution or the number of frames")
    lines.append(f"(model calibrated on {CALIBRATION['device']}; {CALIBRATION['source']})")
    return "\n".join(lines)


# --- sequence parallelism (Ulysses, `sequence_parallel_size`) ----------------------------------------------

# Bytes per second of one GPU's all-to-all over its links: an assumption, not a measurement of ours (no
# multi-GPU machine has been lent yet): NVLink 4 on an H100 SXM gives 450 GB/s a direction and NCCL's
# all-to-all reaches a good share of it inside one host; across hosts, InfiniBand NDR gives ~50 GB/s a GPU.
LINK_GBPS = {"nvlink": 300.0, "infiniband": 45.0}


@dataclasses.dataclass(frozen=True)
class SequenceParallelEstimate:
    sp_size: int
    tokens_per_rank: int
    memory_gib: dict[str, float]  # per rank
    peak_gib: float
    compute_s: float  # the single-GPU step's compute, split over the group
    communication_s: float  # the all-to-alls on the critical path
    communication_gib: float  # sent by each rank per optimizer step
    step_s: float


def sequence_parallel_estimate(setting: Setting, sp_size: int, *, link_gbps: float = LINK_GBPS["nvlink"],
                               shard_weights: bool = False, calibration: Optional[dict] = None
                               ) -> SequenceParallelEstimate:
    """Per-rank memory and step time of `setting` with `sp_size` GPUs sharing each clip.

    Memory: what grows with the tokens (checkpointed inputs, kept attention, working sets) is divided by
    `sp_size` (after the all-to-all a rank holds all tokens of `heads / sp_size` heads: the same volume as its
    own rows of all heads); the weights and the LoRA state stay whole on every rank, unless `shard_weights`
    (FSDP2 over the group as well) divides them too. Time: the compute of `estimate` divided by `sp_size`, plus
    the all-to-alls, which wait on the network: in each block, q, k, v and the attention output (4 bf16 hidden
    states of the rank's tokens), of which a rank sends the share `(sp - 1) / sp` to the others; once forward,
    once more in the checkpoint recompute, and the same volume in backward.
    """
    if sp_size < 1:
        raise ValueError(f"sequence_parallel_size must be at least 1, got {sp_size}")
    single = estimate(setting, calibration)
    tokens = single.tokens * setting.batch
    per_rank = -(-tokens // sp_size)
    weights = {"base_weights", "lora_training_state"}
    memory = {name: gib / (sp_size if name not in weights or shard_weights else 1)
              for name, gib in single.memory_gib.items()}
    passes = 2.0 + (1.0 if setting.gradient_checkpointing else 0.0)
    sent = DEPTH * 4 * per_rank * HIDDEN * 2.0 * (sp_size - 1) / sp_size * passes
    compute = single.step_s / sp_size
    communication = sent / (link_gbps * 1e9)
    return SequenceParallelEstimate(
        sp_size=sp_size, tokens_per_rank=per_rank,
        memory_gib={k: round(v, 2) for k, v in memory.items()}, peak_gib=round(sum(memory.values()), 2),
        compute_s=round(compute, 2), communication_s=round(communication, 2),
        communication_gib=round(sent / GIB, 2), step_s=round(compute + communication, 2),
    )


def format_sequence_parallel(setting: Setting, sp_size: int, *, link_gbps: float = LINK_GBPS["nvlink"]) -> str:
    est = sequence_parallel_estimate(setting, sp_size, link_gbps=link_gbps)
    return (f"sequence_parallel_size {sp_size}: {est.tokens_per_rank:,} tokens a GPU, peak ~{est.peak_gib:.1f} GiB "
            f"a GPU, ~{est.step_s:.2f} s/step ({est.compute_s:.2f} compute + {est.communication_s:.2f} all-to-all: "
            f"{est.communication_gib:.1f} GiB sent a GPU at an assumed {link_gbps:.0f} GB/s)")
