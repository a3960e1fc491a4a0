"""`longcat-tuner plan`: expected peak GPU memory and step time of a training config, and settings that fit.

Reads the config with its own loader (`TrainConfig.from_file`); the clip size comes from
`--resolution`/`--frames`, else from the training datasets (their `resolution` and `video.num_frames`:
the largest), else the validation resolution and frame count. First comes the memory plan `train` would
choose on a card of `--gpu-memory` GiB (`runtime.auto.choose_plan`, the same function), then the
config's own settings and the settings close to them that fit. The numbers come from
`longcat_tuner.runtime.planner`, calibrated by the benchmarks in `bench/results/`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from longcat_tuner.errors import ConfigError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="estimate peak GPU memory and step time of a training config",
        description="Print the expected peak GPU memory and seconds per step of a LoRA training config, "
        "and the settings (block swap, base precision, checkpointing) that fit a GPU.",
    )
    parser.add_argument("--config", type=Path, required=True, help="config.json")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GPU memory in GiB (default 80)")
    parser.add_argument("--resolution", help="training clip size HEIGHTxWIDTH (default: validation_resolution)")
    parser.add_argument("--frames", type=int, help="frames per training clip (default: validation_num_video_frames)")
    parser.add_argument("--keep-attention", action="store_true",
                        help="plan for gradient_checkpointing_mode keep_attention (default: as in the config)")
    parser.add_argument("--offload-activations", action="store_true",
                        help="plan for gradient_checkpointing_mode offload_inputs (default: as in the config)")
    parser.add_argument("--compile", action="store_true", help="plan for compile_blocks (default: as in the config)")
    parser.set_defaults(func=run)


def _resolution(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"resolution '{text}' must be HEIGHTxWIDTH, e.g. 480x832") from None
    return height, width


def setting_from_config(
    config, *, resolution: str | None, frames: int | None, keep_attention: bool = False,
    offload_activations: bool = False, compiled: bool = False,
):
    from longcat_tuner.runtime.planner import Setting

    text = resolution or config.validation_resolution
    if text in ("480p", "720p"):
        text = {"480p": "480x832", "720p": "720x1280"}[text]
    height, width = _resolution(text)
    if config.model_type != "lora":
        raise ConfigError("plan estimates LoRA training (model_type 'lora'); full fine-tuning needs several GPUs")
    precision = config.base_model_precision
    if precision == "no_change":
        precision = "bf16"
    return Setting(
        height=height,
        width=width,
        frames=frames or config.validation_num_video_frames,
        batch=config.train_batch_size,
        lora_rank=config.lora_rank,
        blocks_to_swap=config.musubi_blocks_to_swap,
        precision=precision,
        gradient_checkpointing=config.gradient_checkpointing,
        # The config's own choices count too; the flags add to them.
        keep_attention=keep_attention or config.gradient_checkpointing_mode == "keep_attention",
        offload_activations=offload_activations or config.gradient_checkpointing_mode == "offload_inputs",
        compiled=compiled or config.compile_blocks,
        compile_checkpointed_block=config.compile_scope == "checkpointed_block",
    )


def training_shape(config) -> tuple[str, int] | None:
    """(HEIGHTxWIDTH, frames) of the largest training clip the datasets file asks for, or None if unreadable.

    An area target N (the guide's 480) is taken at 16:9 (480 -> 480x832): every bucket of a target has
    about the same pixel count, so the same tokens.
    """
    from longcat_tuner.config.datasets import load_datasets
    from longcat_tuner.errors import LongcatError

    try:
        train, _ = load_datasets(config.data_backend_config).split(config.eval_dataset_id)
    except (LongcatError, OSError):  # plan works without the data; `check` reports what is wrong with it
        return None
    best = None
    for dataset in train:
        if isinstance(dataset.resolution, str) and "x" in dataset.resolution.lower():
            height, width = _resolution(dataset.resolution)
        else:
            height = int(dataset.resolution)
            width = 16 * round(height * 832 / 480 / 16)
        frames = dataset.video.num_frames if dataset.dataset_type == "video" else 1
        if best is None or height * width * frames > best[0]:
            best = (height * width * frames, f"{height}x{width}", frames)
    return None if best is None else best[1:]


def auto_plan_text(config, setting, card_gib: float) -> str:
    """What `train` would choose on a card of `card_gib` (within max_gpu_memory_gib), as it prints it."""
    from longcat_tuner.runtime.auto import ClipShape, choose_plan
    from longcat_tuner.runtime.settings import MEMORY_CONFIG_KEYS

    shape = ClipShape(frames=setting.frames, height=setting.height, width=setting.width, batch=setting.batch)
    try:
        plan = choose_plan(config, explicit=config.model_fields_set & set(MEMORY_CONFIG_KEYS), shape=shape,
                           cuda=True, card_gib=card_gib)
    except ConfigError as err:
        return f"memory plan: {err}"
    return plan.summary()


def run(args: argparse.Namespace) -> int:
    from longcat_tuner.config.training import TrainConfig
    from longcat_tuner.runtime.planner import format_plan

    config = TrainConfig.from_file(args.config)
    resolution, frames = args.resolution, args.frames
    if resolution is None and frames is None:
        shape = training_shape(config)
        if shape is not None:
            resolution, frames = shape
    setting = setting_from_config(
        config, resolution=resolution, frames=frames, keep_attention=args.keep_attention,
        offload_activations=args.offload_activations, compiled=args.compile,
    )
    print(auto_plan_text(config, setting, args.gpu_memory))
    print()
    print("the config's own settings:")
    try:
        print(format_plan(setting, args.gpu_memory))
        if config.sequence_parallel_size > 1:
            from longcat_tuner.runtime.planner import format_sequence_parallel

            print(format_sequence_parallel(setting, config.sequence_parallel_size))
    except ValueError as err:
        raise ConfigError(f"{args.config}: {err}") from None
    return 0
