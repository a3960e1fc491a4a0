"""`longcat-tuner plan`: expected peak GPU memory and step time of a training config, and settings that fit.

Reads the config with its own loader (`TrainConfig.from_file`); the clip size comes from
`--resolution`/`--frames`, else from the training datasets (their `resolution` and `video.num_frames`:
the largest), else the validation resolution and frame count. First comes the memory plan `train` would
choose on a card of `--gpu-memory` GiB (`runtime.auto.choose_plan`, the same function), then the
config's own settings and the settings close to them that fit, and for cards of 24 or 32 GB the
allocator setting they need. The numbers come from `longcat_tuner.runtime.planner`, calibrated by the
benchmarks in `bench/results/`. Sizes are read by the one resolution parser (`config.resolution`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from longcat_tuner.commands.argtypes import positive_float, refuse_long_path
from longcat_tuner.config.sampling import add_sampling_arguments
from longcat_tuner.config.training import add_config_arguments
from longcat_tuner.errors import ConfigError
from longcat_tuner.runtime.settings import MEMORY_CONFIG_KEYS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="estimate peak GPU memory and step time of a training config",
        description="Print the memory plan `train` would choose on a GPU of --gpu-memory GiB, then the expected "
        "peak GPU memory and seconds per step of a LoRA training config's own settings, and the settings (block "
        "swap, base precision, checkpointing) close to them that fit. The clip size is the largest training clip "
        "of the datasets file (else the validation size); --resolution / --frames override it.",
    )
    parser.add_argument("--config", type=Path, required=True, help="config.json")
    parser.add_argument("--gpu-memory", type=positive_float, default=80.0, help="GPU memory in GiB (default 80)")
    add_sampling_arguments(parser, ("resolution", "frames"), defaults=False, helps={
        "resolution": "Training clip size: HEIGHTxWIDTH, or a class (480p) taken at its 16:9 size (every bucket of a "
        "class has about the same area). Default: the largest training dataset, else validation_resolution.",
        "frames": "Frames per training clip; (frames - 1) must be divisible by 4. Default: the largest training "
        "dataset's video.num_frames, else validation_num_video_frames.",
    })
    # The memory keys themselves, from the schema (`--gradient_checkpointing_mode keep_attention`,
    # `--compile_blocks`, ...): they override the file as `train`'s flags do, and pin the plan the same way.
    add_config_arguments(parser, names=(*MEMORY_CONFIG_KEYS, "attention_implementation"),
                         title="memory keys and the attention (override config.json)")
    parser.set_defaults(func=run)


def clip_size(spec, aspect: tuple[int, int] | None = None) -> tuple[int, int]:
    """(height, width) of a resolution setting through the one parser: a class follows `aspect` (height,
    width), else its 16:9 size."""
    from longcat_tuner.data.buckets import resolution_size

    return resolution_size(spec, aspect)


def checkpoint_dit_config(config):
    """The checkpoint's `dit/config.json` as `train` reads it, or None when it is not readable here (plan runs
    without the weights: the planner's figures are then the 13.6B release's)."""
    from longcat_tuner.errors import CheckpointError
    from longcat_tuner.model.config import DiTConfig
    from longcat_tuner.model.loading import find_component

    try:
        return DiTConfig.from_file(find_component(config.pretrained_model_name_or_path, "dit") / "config.json")
    except (CheckpointError, OSError):
        return None


def setting_from_config(config, *, resolution: str | None, frames: int | None, dit=None):
    """The planner's view of the config's memory keys (`MemorySettings.from_config`, as `train` reads them)
    and of its attention (block-sparse or not, as `train` plans it from `dit`, the checkpoint's DiT config:
    `checkpoint_dit_config`; None: the release's)."""
    from longcat_tuner.model.config import DiTConfig
    from longcat_tuner.runtime.auto import ClipShape, uses_block_sparse
    from longcat_tuner.runtime.planner import Setting
    from longcat_tuner.runtime.settings import MemorySettings

    height, width = clip_size(resolution or config.validation_resolution)
    if config.model_type != "lora":
        raise ConfigError("plan estimates LoRA training (model_type 'lora'); full fine-tuning needs several GPUs")
    frames = frames or config.validation_num_video_frames
    dit = dit or DiTConfig()
    shape = ClipShape(frames=frames, height=height, width=width, batch=config.train_batch_size)
    return Setting.from_memory(
        MemorySettings.from_config(config), height=height, width=width,
        frames=frames, batch=config.train_batch_size, lora_rank=config.lora_rank,
        block_sparse=uses_block_sparse(config.attention_implementation, shape, enable_bsa=dit.enable_bsa,
                                       chunk=tuple(dit.bsa_chunk_k)),
        bsa_sparsity=dit.bsa_sparsity,
    )


def training_shape(config) -> tuple[str, int] | None:
    """(HEIGHTxWIDTH, frames) of the largest training clip the datasets file asks for, or None if unreadable.

    An area target N (the guide's 480) is taken at its 16:9 size (480 -> 480x832): every bucket of a target
    has about the same pixel count, so the same tokens.
    """
    from longcat_tuner.config.datasets import load_datasets
    from longcat_tuner.errors import LongcatError

    try:
        train, _ = load_datasets(config.data_backend_config).split(config.eval_dataset_id)
    except (LongcatError, OSError):  # plan works without the data; `check` reports what is wrong with it
        return None
    best = None
    for dataset in train:
        height, width = clip_size(dataset.resolution)
        frames = dataset.video.num_frames if dataset.dataset_type == "video" else 1
        if best is None or height * width * frames > best[0]:
            best = (height * width * frames, f"{height}x{width}", frames)
    return None if best is None else best[1:]


def model_size_note(config, dit) -> tuple[bool, str | None]:
    """(whether the planner's numbers describe `dit`, the config's DiT (`checkpoint_dit_config`), a note saying
    so when they do not).

    The planner is calibrated for the 13.6B release; for another DiT (the demo's tiny random checkpoint, say)
    `train` takes the config's settings as given, so `plan` says that instead of an automatic plan that
    `train` would never choose. A model folder that is absent or unreadable here counts as the release."""
    from longcat_tuner.model.loading import find_component
    from longcat_tuner.runtime.auto import is_calibrated

    if dit is None or is_calibrated(dit):
        return True, None
    path = find_component(config.pretrained_model_name_or_path, "dit")
    return False, (f"note: {path} is not the 13.6B LongCat-Video DiT ({dit.depth} blocks, "
                   f"hidden {dit.hidden_size}); "
                   "the figures below are the 13.6B release's, and `train` runs this model with the config's "
                   "settings as given")


def auto_plan_text(config, setting, card_gib: float, *, calibrated_model: bool = True) -> str:
    """What `train` would choose on a card of `card_gib` (within max_gpu_memory_gib), as it prints it."""
    from longcat_tuner.runtime.auto import ClipShape, choose_plan
    from longcat_tuner.runtime.settings import MEMORY_CONFIG_KEYS

    from longcat_tuner.runtime.allocator import would_use_expandable

    shape = ClipShape(frames=setting.frames, height=setting.height, width=setting.width, batch=setting.batch)
    # Validation taken at the training size (its start frames are the eval clips', usually the same bucket).
    validation = ClipShape(frames=config.validation_num_video_frames, height=setting.height, width=setting.width,
                           batch=2 if config.validation_guidance > 1 else 1)
    def plan_for(config):
        return choose_plan(config, explicit=config.model_fields_set & set(MEMORY_CONFIG_KEYS), shape=shape,
                           cuda=True, card_gib=card_gib, validation=validation,
                           expandable_segments=would_use_expandable(), calibrated_model=calibrated_model,
                           block_sparse=setting.block_sparse, bsa_sparsity=setting.bsa_sparsity)

    try:
        plan = plan_for(config)
    except ConfigError as err:
        return f"memory plan: {err}"
    text = plan.summary()
    if "base_model_precision" not in config.model_fields_set and plan.predicted_step_s is not None:
        # The opt-in the plan never takes by itself: what it would give here, so the trade is visible.
        try:
            fp8 = plan_for(config.model_copy(update={"base_model_precision": "fp8-compute"}))
        except ConfigError:
            return text
        if fp8.predicted_step_s is not None and fp8.predicted_step_s < plan.predicted_step_s:
            text += (f"\n  opt-in, not chosen: base_model_precision fp8-compute (float8 matmuls) would give "
                     f"{fp8.predicted_step_s:.1f} s/step, {fp8.predicted_peak_gib:.1f} GiB ({fp8.settings.describe()}); "
                     "its losses stray from bf16's a few times more than bf16 runs from each other (README: fp8-compute)")
    return text


def run(args: argparse.Namespace) -> int:
    from longcat_tuner.config.training import TrainConfig, config_overrides
    from longcat_tuner.runtime.planner import format_plan

    refuse_long_path("--config", args.config)  # one line naming the flag, not an OSError traceback
    config = TrainConfig.from_file(args.config, overrides=config_overrides(args))
    resolution, frames = args.resolution, args.frames
    if resolution is None or frames is None:
        # What is not given comes from the largest training clip (`--resolution` alone used to take the frame
        # count from validation_num_video_frames, `--frames` alone the validation size, unlike --help said).
        shape = training_shape(config)
        if shape is not None:
            resolution, frames = resolution or shape[0], frames or shape[1]
    dit = checkpoint_dit_config(config)  # read once: the attention and the size note both come from it
    setting = setting_from_config(config, resolution=resolution, frames=frames, dit=dit)
    calibrated, note = model_size_note(config, dit)
    print(auto_plan_text(config, setting, args.gpu_memory, calibrated_model=calibrated))
    print()
    print("the config's own settings:")
    if note:
        print(note)
    try:
        print(format_plan(setting, args.gpu_memory))
        if config.sequence_parallel_size > 1:
            from longcat_tuner.runtime.planner import format_sequence_parallel

            print(format_sequence_parallel(setting, config.sequence_parallel_size))
    except ValueError as err:
        raise ConfigError(f"{args.config}: {err}") from None
    advice = allocator_advice(args.gpu_memory)
    if advice:
        print()
        print(advice)
    return 0


# Cards up to this size (the 24 and 32 GB classes) run the low-memory settings within a GiB or two of their
# size: README "Memory ladder" (the 20.1 GiB step reserves up to 25 GiB with the default allocator).
EXPANDABLE_SEGMENTS_UP_TO_GIB = 40.0
ALLOCATOR_SETTING = "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"


def allocator_advice(card_gib: float) -> str | None:
    """Advice when this shell's allocator setting turns off the expandable segments a small card needs
    (`train` and `sample` use them unless PYTORCH_CUDA_ALLOC_CONF says otherwise), else None."""
    from longcat_tuner.runtime.allocator import user_setting, would_use_expandable

    if card_gib > EXPANDABLE_SEGMENTS_UP_TO_GIB or would_use_expandable():
        return None
    return (
        f"a {card_gib:g} GiB card needs the allocator's expandable segments (README \"Memory ladder\": at the "
        "lowest-memory settings the default allocator's reserve comes within a GiB or so of a 24 GB card), but this "
        f"shell sets {user_setting()!r}: unset it (train then uses them) or `export {ALLOCATOR_SETTING}`."
    )
