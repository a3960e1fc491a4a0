"""`longcat-tuner sample`: image-to-video (or text-to-video without --image) from a checkpoint and optional LoRAs."""
from __future__ import annotations

import argparse
import json
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Optional

from longcat_tuner.commands.argtypes import bounded_int, finite_float, positive_float, refuse_long_path
from longcat_tuner.config.sampling import add_sampling_arguments

COMPILE_MODES = ("auto", "on", "off")
# `--merge-loras`: fold the LoRAs into the base weights before sampling (a forward then costs the plain
# model's: merged, the rank-128 distilled LoRA's compiled forward at 480x832x93 takes 3.386 s against 3.681 s
# un-merged, with final latents 69.2 dB apart; one H100, bench/results/sampling-2026-12-07-h100-merge.json) or keep
# them un-merged (the official code's application, exact
# in the layers' own arithmetic). auto: merge unless the base weights are stored in 8 bits, where merging
# would put the LoRA's update through the 8-bit rounding too; on merges there before the weights are stored.
MERGE_MODES = ("auto", "on", "off")
# `--compile auto` compiles the DiT blocks on CUDA when the run makes at least this many DiT forwards (a
# denoising step is one forward, two with guidance > 1: CFG batches both passes, twice the tokens). Why 12:
# measured through `sample`'s own runtime (bench/bench_sampling.py, one H100, 2026-12-06,
# bench/results/sampling-2026-12-06-h100.json): at 480x832x93 a cold compile (empty inductor cache) adds
# 11.8 s to the first step and then saves 2.68 s per CFG step (9.48 -> 6.78 s, batch 2), a break-even of 8.8
# forwards; a batch-1 forward with the distilled preview's rank-128 LoRA runs at 3.71 s compiled, against
# 4.77 s eager without the LoRA (2026-11-25; with it eager is slower still), so the 16-forward preview gains too. 12 keeps a margin for smaller clips (less saving
# per forward for about the same compile time) and runs a one-off few-step check eager.
AUTO_COMPILE_MIN_FORWARDS = 12


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sample",
        help="generate a video from a start frame and a prompt",
        description="Image-to-video (text-to-video without --image) with the official Euler sampler and CFG-Zero*.",
    )
    p.add_argument("--model", required=True, help="checkpoint root in the official layout (dit/ text_encoder/ vae/ ...), "
                   "or a full fine-tune's output_dir (its DiT, with the text encoder, tokenizer and VAE of the base "
                   "model recorded in its base_model.json)")
    p.add_argument("--dit", default=None, help="DiT weights to use instead of --model's dit/: a full fine-tune's "
                   "output_dir/dit (or its output_dir); the text encoder, tokenizer and VAE come from --model, the "
                   "base model it was trained from (same DiT sizes, checked)")
    p.add_argument("--lora", action="append", default=[], help="LoRA file (official LongCat, ComfyUI or ours); repeatable")
    p.add_argument("--lora-multiplier", type=finite_float, action="append", default=[], help="strength per --lora (default 1.0)")
    p.add_argument("--image", help="start frame (PNG/JPEG); omit for text-to-video")
    p.add_argument("--prompt", required=True, help="what the video shows; write it as your training captions were "
                   "written (umT5 reads the first 512 tokens)")
    # --resolution --frames --steps --guidance --shift --seed --negative-prompt --fps --distilled: the schema's
    # sampling section (defaults, bounds and help declared once, shared with the web preview and validation).
    add_sampling_arguments(p)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--attention", default=None,
                   help="attention backend: auto, sdpa, xformers, block_sparse, reference (default: the one the first "
                   "--lora was trained with, else auto)")
    p.add_argument("--blocks-to-swap", type=bounded_int(0), default=None,
                   help="keep the weights of the last N DiT blocks in pinned host memory and stream them in (CUDA; "
                   "for GPUs smaller than the model). Default: the fewest that fit the card (or --max-gpu-memory-gib)")
    p.add_argument("--max-gpu-memory-gib", type=positive_float, default=None,
                   help="most GPU memory the sampler may use (enforced); block swap is chosen to fit it")
    p.add_argument("--base-precision", choices=["no_change", "fp8-torchao", "int8-quanto", "fp8-compute"], default="no_change",
                   help="store the DiT block weights in 8 bits (about half the memory; small quality cost; our own layers: no torchao or "
                   "optimum-quanto needed); fp8-compute also runs their matmuls in float8 (rowwise scales; README \"Memory\")")
    p.add_argument("--compile", choices=COMPILE_MODES, default="auto",
                   help="torch.compile each DiT block, as train's compile_blocks does (the first step pays the compile, "
                   f"about 30-60 s at 480x832x93). auto: on CUDA with Triton when the run makes at least "
                   f"{AUTO_COMPILE_MIN_FORWARDS} DiT forwards (steps, twice that with --guidance > 1), else eager; "
                   "on: always (CUDA needs Triton; on the CPU torch.compile's C++ backend); off: eager")
    p.add_argument("--merge-loras", choices=MERGE_MODES, default="auto",
                   help="fold the --lora files into the DiT's weights (forwards as fast as without a LoRA; each weight "
                   "summed in float32 and rounded once) or keep them un-merged (the official application). auto: merge "
                   "unless --base-precision stores the weights in 8 bits; on: merge there too, before they are stored")
    p.add_argument("--output", required=True, help="output video: .mp4, .mov or .mkv (an existing file only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--progress-json", action="store_true",
                   help="print one JSON line per denoising step and phase (decoding, done) instead of a bar (for the web UI)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from longcat_tuner.runtime.allocator import use_default_allocator

    use_default_allocator()  # before CUDA starts (runtime/allocator.py)
    from longcat_tuner.train.distributed import init_distributed

    # Under torchrun every process shares the one clip (sequence parallelism over all of them), rank 0 writes.
    ctx = init_distributed()
    try:
        return _sample(args, ctx)
    finally:
        ctx.close()


def _sample(args: argparse.Namespace, ctx) -> int:
    import torch

    from longcat_tuner.encoders import TextEncoder, VideoVAE
    from longcat_tuner.generate import SamplingProgress, check_i2v_frames, generate
    from longcat_tuner.data.buckets import resolution_size
    from longcat_tuner.data.images import prepare_start_frame, read_image
    from longcat_tuner.devices import chosen_device, default_dtype
    from longcat_tuner.media import image_to_tensor, video_to_uint8

    from longcat_tuner.model.inspect import require_intact_model
    from longcat_tuner.model.lora_formats import check_fits_checkpoint

    from longcat_tuner.model.sources import resolve_model

    for flag, value in [("--model", args.model), ("--dit", getattr(args, "dit", None)), ("--output", args.output),
                        ("--image", args.image), *(("--lora", lora) for lora in args.lora)]:
        refuse_long_path(flag, value)  # a 300-character name: one line naming the flag, not an OSError traceback
    check_video_output(args.output, overwrite=args.overwrite)  # before minutes of work, not when it is written
    loras = read_sampling_loras(args)  # a bad LoRA file is named before minutes of model loading
    # Where each component comes from: a full fine-tune's DiT (--dit, or --model output_dir through its
    # base_model.json) with the base model's text encoder, tokenizer and VAE; from here on args.model is that base
    # and args.dit the DiT folder.
    sources = resolve_model(args.model, getattr(args, "dit", None))
    args.model, args.dit = str(sources.root), str(sources.dit)
    if ctx.is_main and sources.fine_tuned:
        print(sources.describe(), file=sys.stderr)
    if ctx.is_main and sources.warning:
        print(sources.warning, file=sys.stderr)
    if args.attention is None and not args.lora and sources.fine_tuned:
        args.attention = fine_tune_attention(sources)  # the attention it was trained with, as for a LoRA
    # A wrong --model, a missing component or a damaged config or tokenizer file, named as `check` names them,
    # before the compile decision and the loaders.
    require_intact_model(sources.root, dit=sources.dit if sources.fine_tuned else None)
    for lora, adapters, _ in loras:  # a LoRA for another model or size: named now, not after loading the models
        check_fits_checkpoint(adapters, args.dit, lora)
    image = read_image(args.image) if args.image else None
    if image is not None:
        check_i2v_frames(args.frames)
    height, width = resolution_size(args.resolution, source_hw=(image.height, image.width) if image else None)
    device = ctx.device if ctx.enabled else chosen_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)

    merge, why = choose_merge(args.merge_loras, base_precision=args.base_precision, loras=len(loras))
    if loras and ctx.is_main:
        print(f"LoRAs: {why}", file=sys.stderr)
    lora_gib = 0.0 if merge else resident_lora_gib(loras, dtype)
    args.blocks_to_swap = sampling_swap(args, height=height, width=width, device=device, lora_gib=lora_gib)

    def say_compile(why: str) -> None:
        if ctx.is_main:
            print(f"compile: {why}", file=sys.stderr)

    # Decided (and `--compile on` without Triton refused) before minutes of loading.
    settings = sampling_settings_for(args, device, report=say_compile)
    # The text encoder (umT5-XXL, ~11 GB) runs and leaves the GPU before the DiT loads: never both resident.
    text_encoder = TextEncoder.from_pretrained(args.model, dtype=dtype, device=device)
    embeds, mask = text_encoder.encode([args.prompt])
    negative_embeds = negative_mask = None
    if args.guidance > 1:
        negative_embeds, negative_mask = text_encoder.encode([args.negative_prompt])
    del text_encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dit = load_dit_for_sampling(args, dtype=dtype, device=device, settings=settings, loras=loras, merge=merge)
    for lora, adapters, multiplier in loras if ctx.is_main else ():
        print(f"LoRA {lora}: {len(adapters)} layer{'' if len(adapters) == 1 else 's'} adapted, multiplier {multiplier:g}", file=sys.stderr)
    if ctx.enabled:
        from longcat_tuner.model.sequence_parallel import apply_sequence_parallel
        from longcat_tuner.train.distributed import build_mesh

        apply_sequence_parallel(dit, build_mesh(ctx, ctx.world_size, num_heads=dit.config.num_heads).sequence_parallel)
        if ctx.is_main and not args.progress_json:
            print(f"sequence parallel: each clip split over {ctx.world_size} processes", flush=True)
    vae = VideoVAE.from_pretrained(args.model, dtype=dtype, device=device)
    start = image_to_tensor(prepare_start_frame(image, height, width)) if image else None

    def report(phase: str, step: int, total: int) -> None:
        # The VAE decode after the last step can take as long as the denoising: it is a phase of its own.
        if args.progress_json and ctx.is_main:
            print(json.dumps({"event": "sample_step", "step": step, "total": total, "phase": phase}), flush=True)

    result = generate(
        dit, vae, text_embeds=embeds, text_mask=mask, negative_embeds=negative_embeds, negative_mask=negative_mask,
        height=height, width=width, frames=args.frames, start_frame=start, steps=args.steps, guidance=args.guidance,
        shift=args.shift, distilled=args.distilled, seed=args.seed,
        progress=SamplingProgress(label="sampling", bar=not args.progress_json and ctx.is_main, report=report),
    )
    if not result.finite:
        raise nonfinite_output_error(loras, args.dit)
    if not ctx.is_main:
        return 0
    out = write_video_output(args.output, video_to_uint8(result.video), fps=args.fps)
    message = {"event": "sample_done", "output": str(out), "height": height, "width": width, "frames": args.frames}
    print(json.dumps(message) if args.progress_json else f"wrote {out} ({args.frames} frame{'' if args.frames == 1 else 's'}, {height}x{width}, {args.fps} fps)", file=sys.stdout)
    return 0


def nonfinite_output_error(loras, model) -> "NonFiniteOutputError":
    """What to say when the sampled latents hold NaN/inf: which weights to suspect, and that nothing was written."""
    from longcat_tuner.errors import NonFiniteOutputError

    if loras:
        named = ", ".join(f"{path} (multiplier {multiplier:g})" for path, _, multiplier in loras)
        cause = (f"the LoRA weights overflow: {named}; a LoRA with absurd values or alpha, or a multiplier too large. "
                 "Sample without it, or with a smaller --lora-multiplier (say 0.5), to tell")
    else:
        cause = f"the model's weights in {model} overflow (a diverged full fine-tune?); sample with the base model to tell"
    return NonFiniteOutputError(f"sampling produced NaN/inf latents, so the video would be black or noise; no video was "
                                f"written. Likely cause: {cause}")


def resident_lora_gib(loras, dtype) -> float:
    """GiB that `loras` (`read_sampling_loras`) take attached un-merged, in `dtype`: on the GPU whatever is swapped."""
    params = sum(item.down.numel() + sum(u.numel() for u in item.ups) for _, adapters, _ in loras for item in adapters.values())
    return params * dtype.itemsize / 2**30


def sampling_swap(args: argparse.Namespace, *, height: int, width: int, device, lora_gib: float = 0.0) -> int:
    """--blocks-to-swap, or on CUDA the fewest swapped blocks that fit the card or --max-gpu-memory-gib for the
    13.6B DiT (the planner's calibration) beside `lora_gib` of un-merged LoRA adapters (`resident_lora_gib`);
    the cap is enforced with PyTorch's per-process memory fraction."""
    import torch

    from longcat_tuner.errors import ConfigError

    if device.type != "cuda":
        if args.blocks_to_swap:
            raise ConfigError("--blocks-to-swap streams weights to a CUDA device; drop it on the CPU")
        if args.max_gpu_memory_gib is not None:
            raise ConfigError("--max-gpu-memory-gib caps GPU memory; drop it on the CPU")
        return 0
    from longcat_tuner.runtime.apply import gpu_budget

    card_gib, others_gib = gpu_budget(device, args.max_gpu_memory_gib)
    if args.blocks_to_swap is not None:
        return args.blocks_to_swap
    from longcat_tuner.model.config import DiTConfig
    from longcat_tuner.model.loading import find_dit
    from longcat_tuner.runtime.auto import ClipShape, budget_gib, choose_sampling_swap, is_calibrated

    if not is_calibrated(DiTConfig.from_file(find_dit(getattr(args, "dit", None) or args.model) / "config.json")):
        return 0
    budget = budget_gib(card_gib, others_gib, args.max_gpu_memory_gib)
    shape = ClipShape(frames=args.frames, height=height, width=width, batch=2 if args.guidance > 1 else 1,
                      has_start_frame=bool(args.image))
    from longcat_tuner.runtime.allocator import expandable_in_use

    compiled, _ = choose_compile(args.compile, device_type="cuda", steps=args.steps, guidance=args.guidance)
    swap, peak = choose_sampling_swap(shape, budget, base_precision=args.base_precision,
                                      expandable_segments=expandable_in_use(), compiled=compiled, lora_gib=lora_gib)
    with_lora = f", {lora_gib:.1f} GiB of it un-merged LoRA adapters" if lora_gib >= 0.05 else ""
    print(f"memory plan: --blocks-to-swap {swap} (predicted {peak:.1f} GiB at {shape.text}{with_lora}, budget "
          f"{budget:.1f} GiB)", file=sys.stderr)
    return swap


VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv")  # containers that take the H.264 stream `write_mp4` encodes


def check_video_output(output: str, *, overwrite: bool = False) -> None:
    """Refuse an --output that cannot take the video: a folder, a path under a file, another file type, a
    folder that cannot be written, an existing file without `overwrite` (a training clip, an earlier result)."""
    from longcat_tuner.errors import ConfigError
    from longcat_tuner.fsutil import folder_problem

    path = Path(output)
    if path.is_dir():
        raise ConfigError(f"--output {path} is a folder; give a file name such as {path / 'video.mp4'}")
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(f"--output {path} cannot be written: {blocker} is a file, not a folder")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ConfigError(f"--output {path} must end in {', '.join(VIDEO_SUFFIXES)} (the video container), "
                          f"e.g. {path.with_suffix('.mp4')}")
    problem = folder_problem(path.parent, "the folder of --output", "the command line")
    if problem:  # read-only or not ours: found now, not when the finished video is written
        raise ConfigError(problem)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise ConfigError(f"--output {path} already exists; pass --overwrite to replace it, or give another file name")


def write_video_output(output: str, frames, *, fps: int) -> Path:
    """The finished video at --output; a failed write (the disk filled up while sampling) names the file and the
    cause instead of a traceback (`write_mp4` leaves no partial file)."""
    from longcat_tuner.errors import ConfigError
    from longcat_tuner.fsutil import is_write_error, write_failure
    from longcat_tuner.media import write_mp4

    try:
        return write_mp4(output, frames, fps=fps)
    except Exception as err:
        if not is_write_error(err):
            raise
        raise ConfigError(f"cannot write --output {output}: {write_failure(err, Path(output).parent)}") from None


def read_sampling_loras(args: argparse.Namespace) -> list[tuple[str, dict, float]]:
    """(path, adapters, multiplier) of each --lora, read and checked (files, multipliers) without the model."""
    from longcat_tuner.errors import ConfigError
    from longcat_tuner.model.lora_formats import read_lora_file

    from longcat_tuner.train.outputs import checkpoint_weights_problem

    if len(args.lora_multiplier) > len(args.lora):
        raise ConfigError(f"{len(args.lora_multiplier)} --lora-multiplier values for {len(args.lora)} --lora files; "
                          "give one multiplier per --lora, in the same order")
    for lora in args.lora:
        problem = checkpoint_weights_problem(lora)
        if problem:
            raise ConfigError(f"--lora {problem}")
    return [(lora, read_lora_file(lora)[0], args.lora_multiplier[i] if i < len(args.lora_multiplier) else 1.0)
            for i, lora in enumerate(args.lora)]


def load_dit_for_sampling(args: argparse.Namespace, *, dtype, device, settings=None, loras=None, merge=None):
    """The DiT with its LoRAs (`loras`: `read_sampling_loras(args)`, read here when None), prepared by
    `prepare_sampling_dit` under `settings` (default: `sampling_settings_for(args, device)`), the LoRAs merged
    when `merge` (None: as `choose_merge` decides for `--merge-loras`): with block swap or 8-bit weights it is
    assembled on the host first, so a model larger than the GPU never lands on it whole."""
    from longcat_tuner import runtime
    from longcat_tuner.model.loading import load_dit

    if settings is None:
        settings = sampling_settings_for(args, device)
    if loras is None:
        loras = read_sampling_loras(args)
    if merge is None:
        merge, _ = choose_merge(getattr(args, "merge_loras", "auto"), base_precision=settings.base_precision,
                                loras=len(loras))
    attention = args.attention or trained_attention(args.lora) or "auto"
    # --dit: a full fine-tune's DiT folder (`_sample` resolves it, with `model/sources.py`); else --model's dit/.
    dit = load_dit(getattr(args, "dit", None) or args.model, dtype=dtype, device=runtime.load_device(settings, device),
                   attention_backend=attention)
    prepare_sampling_dit(dit, settings, device, loras, merge=merge)
    return dit


def choose_merge(mode: str, *, base_precision: str, loras: int) -> tuple[bool, str]:
    """(merge the LoRAs into the weights?, why) for `--merge-loras` `mode` (see `MERGE_MODES`)."""
    from longcat_tuner.errors import ConfigError

    if mode not in MERGE_MODES:
        raise ConfigError(f"--merge-loras {mode!r} is not one of {', '.join(MERGE_MODES)}")
    if not loras:
        return False, "no --lora to merge"
    if mode == "off":
        return False, "--merge-loras off: LoRAs un-merged (the official application)"
    if mode == "on":
        return True, "--merge-loras on: LoRAs folded into the weights" + (
            " before they are stored in 8 bits" if base_precision != "no_change" else "")
    if base_precision != "no_change":
        return False, (f"--merge-loras auto: un-merged on {base_precision} weights (merging would round the LoRA's "
                       "update to 8 bits too; --merge-loras on to merge anyway)")
    return True, "--merge-loras auto: LoRAs folded into the weights (forwards as fast as without them)"


def prepare_sampling_dit(dit, settings, device, loras, *, merge: bool):
    """Everything sampling does to a loaded DiT, in order: the LoRAs (`(source, adapters, multiplier)`, as
    `read_sampling_loras` gives) folded into the weights (`merge`, before any 8-bit storage) or attached
    un-merged (after it), the base precision, then the runtime (`runtime.apply_runtime` under `settings`).
    `sample` and bench/bench_sampling.py call it; returns the `AppliedRuntime`."""
    import torch

    from longcat_tuner import runtime
    from longcat_tuner.model.lora import attach_lora_adapters, merge_lora_adapters

    device = torch.device(device)
    if merge:
        # Summed where the GPU is when the model sits on the host (block swap, 8-bit assembly): seconds, not minutes.
        at = device if device.type == "cuda" else None
        for lora, adapters, multiplier in loras:
            merge_lora_adapters(dit, adapters, lora, multiplier=multiplier, device=at)
    runtime.prepare_base_weights(dit, settings)
    if not merge:
        for i, (lora, adapters, multiplier) in enumerate(loras):
            attach_lora_adapters(dit, adapters, lora, multiplier=multiplier, name=f"lora{i}")
    return runtime.apply_runtime(dit, settings, device)


def sampling_forwards(steps: int, guidance: float) -> int:
    """DiT forwards of a sampling run in batch-1 units: one per step, two with CFG (guidance > 1)."""
    return steps * (2 if guidance > 1 else 1)


def triton_installed() -> bool:
    """Whether torch.compile's GPU backend (Triton) is importable: the check `train`'s plan makes too."""
    return find_spec("triton") is not None


def choose_compile(mode: str, *, device_type: str, steps: int, guidance: float) -> tuple[bool, str]:
    """(compile the DiT blocks?, why) for `--compile` `mode` (see `AUTO_COMPILE_MIN_FORWARDS`).

    On the CPU `on` compiles as `train` does with `compile_blocks: true` there (torch.compile's C++ backend);
    `auto` stays eager. On CUDA compiling needs Triton: `on` without it is refused, `auto` stays eager.
    """
    from longcat_tuner.errors import ConfigError

    if mode not in COMPILE_MODES:
        raise ConfigError(f"--compile {mode!r} is not one of {', '.join(COMPILE_MODES)}")
    if mode == "off":
        return False, "--compile off"
    if device_type != "cuda":
        if mode == "on":
            return True, "--compile on (CPU: torch.compile's C++ backend, slow to compile)"
        return False, "--compile auto: eager on the CPU (--compile on compiles there too)"
    if not triton_installed():
        if mode == "on":
            raise ConfigError("--compile on needs Triton on CUDA (torch.compile's GPU backend): "
                              "pip install 'longcat-tuner[triton]', or use --compile off")
        return False, "--compile auto: Triton is not installed, eager (pip install 'longcat-tuner[triton]' to compile)"
    if mode == "on":
        return True, "--compile on"
    forwards = sampling_forwards(steps, guidance)
    if forwards >= AUTO_COMPILE_MIN_FORWARDS:
        return True, f"--compile auto: {forwards} DiT forwards >= {AUTO_COMPILE_MIN_FORWARDS}, the first step compiles"
    return False, (f"--compile auto: {forwards} DiT forwards < {AUTO_COMPILE_MIN_FORWARDS}, eager (compiling would cost "
                   "more than it saves; --compile on to compile anyway)")


def sampling_settings(*, device: Any, steps: int, guidance: float, compile: str = "auto", blocks_to_swap: int = 0,
                      base_precision: str = "no_change", report: Optional[Callable[[str], Any]] = None):
    """The `MemorySettings` sampling runs the DiT under (`sample`, the web preview through it, and
    bench/bench_sampling.py): no checkpointing, compile per `choose_compile` (`report` gets its reason),
    block swap, base precision."""
    from longcat_tuner import runtime
    from longcat_tuner.errors import ConfigError

    device_type = getattr(device, "type", None) or str(device).split(":")[0]
    if blocks_to_swap and device_type != "cuda":
        raise ConfigError("--blocks-to-swap streams weights to a CUDA device; drop it on the CPU")
    compiled, why = choose_compile(compile, device_type=device_type, steps=steps, guidance=guidance)
    if report is not None:
        report(why)
    return runtime.MemorySettings(checkpointing="none", compile_blocks=compiled, blocks_to_swap=blocks_to_swap,
                                  base_precision=base_precision)


def sampling_settings_for(args: argparse.Namespace, device: Any, *, report: Optional[Callable[[str], Any]] = None):
    """`sampling_settings` from `sample`'s flags."""
    return sampling_settings(device=device, steps=args.steps, guidance=args.guidance, compile=args.compile,
                             blocks_to_swap=args.blocks_to_swap or 0, base_precision=args.base_precision, report=report)


def fine_tune_attention(sources) -> str | None:
    """The `attention_implementation` a full fine-tune recorded beside its DiT (`base_model.json`), so its weights
    meet at inference the attention they learned with (None when none is recorded or it cannot run here)."""
    name = sources.recorded("attention_implementation")
    return usable_attention(name, sources.dit) if isinstance(name, str) else None


def trained_attention(lora_paths: list[str]) -> str | None:
    """The `attention_implementation` recorded in the first LoRA file by training, so a LoRA meets at
    inference the attention it learned with (None for LoRAs from elsewhere)."""
    if not lora_paths:
        return None
    from safetensors import safe_open

    try:
        with safe_open(lora_paths[0], framework="pt") as handle:
            name = (handle.metadata() or {}).get("attention_implementation")
    except Exception:  # unreadable files get their clear error from load_lora
        return None
    return None if name is None else usable_attention(name, lora_paths[0])


def usable_attention(name: str, trained: Any) -> str | None:
    """`name`, the attention `trained` (a LoRA file, a fine-tuned DiT) recorded, when this machine can run it; else
    a warning and None (sampling goes on with auto): a record from elsewhere does not stop sampling."""
    from longcat_tuner.errors import ConfigError
    from longcat_tuner.model.attention import validate_backend_name

    try:
        return validate_backend_name(name)
    except ConfigError as err:
        print(f"warning: {trained} was trained with attention '{name}', which cannot be used here ({err}); "
              "sampling with auto (pass --attention to choose)", file=sys.stderr)
        return None
