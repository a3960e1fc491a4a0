"""`longcat-tuner train --config config/config.json [--<key> value ...]`: cache, train, validate, checkpoint.

Every config key is also an option (generated from the schema), so `train --help` documents them all
and `--learning_rate 5e-5` overrides the file for one run.
"""
from __future__ import annotations

import argparse
import os

from longcat_tuner.config.training import add_config_arguments, config_overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a LoRA (or the full DiT) from config.json",
        description="Train a LongCat-Video LoRA (image-to-video first) as config.json describes. "
        "Options below override the file's keys for this run.",
    )
    parser.add_argument("--config", required=True, help="path of config.json (relative paths inside resolve against its folder)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars, the libraries' included (events.jsonl is still written)")
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def interrupted_message(step, config_path, *, other_options: bool = False) -> str:
    """What to type to go on after Ctrl-C (`train` and `demo`)."""
    again = " (and the other options you gave this run)" if other_options else ""
    return (f"interrupted at step {step}; resume with: longcat-tuner train --config {config_path} "
            f"--resume_from_checkpoint latest{again}")


def final_weights_label(config) -> str:
    """What `result.lora_path` holds: the official LoRA, the first LoRA format written, or a full fine-tune's DiT."""
    if config.model_type == "full":
        return "DiT weights (full fine-tune, the hub's dit/ layout)"
    formats = config.lora_export_formats
    return "LoRA (official LongCat format)" if "official" in formats else f"LoRA ({formats[0]})"


def other_lora_files(config, result) -> list[tuple[str, "os.PathLike"]]:
    """(client, path) of each LoRA file the run wrote besides `lora_path` and `comfyui_lora_path` (Wan2GP's,
    diffusers'), in the order of `lora_export_formats`."""
    if config.model_type != "lora" or result.lora_path is None:
        return []
    from longcat_tuner.model.lora_formats import FILE_NAMES, WRITTEN_LAYOUTS, resolve_format

    shown, others = {result.lora_path, result.comfyui_lora_path}, []
    for name in dict.fromkeys(resolve_format(f) for f in config.lora_export_formats):
        path = result.lora_path.parent / FILE_NAMES[name]
        if path not in shown and path.is_file():
            others.append((WRITTEN_LAYOUTS[name][0], path))
    return others


def run(args: argparse.Namespace) -> int:
    from longcat_tuner.config.training import TrainConfig
    from longcat_tuner.train.trainer import train

    if args.no_progress:
        from longcat_tuner.commands import quiet_library_progress

        quiet_library_progress()
    from longcat_tuner.commands.argtypes import refuse_long_path

    refuse_long_path("--config", args.config)  # one line naming the flag, not an OSError traceback
    overrides = config_overrides(args)
    config = TrainConfig.from_file(args.config, overrides=overrides)
    result = train(config, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports (it wrote the outputs)
        return 130 if result.status == "interrupted" else 0
    print(f"run folder: {result.run_dir}")
    if result.lora_path is not None:
        print(f"{final_weights_label(config)}: {result.lora_path}")
        if config.model_type == "full" and result.status == "completed":
            # dit/ alone has no text encoder or VAE: `sample` takes them from the base recorded beside it.
            print(f"sample it: longcat-tuner sample --model {result.run_dir} --image START.png --prompt \"...\" "
                  f"--output out.mp4 (the text encoder, tokenizer and VAE come from the base model "
                  f"{config.pretrained_model_name_or_path}, recorded in {result.run_dir}/base_model.json)")
    if result.comfyui_lora_path is not None:
        print(f"LoRA (ComfyUI-WanVideoWrapper): {result.comfyui_lora_path}")
    for client, path in other_lora_files(config, result):
        print(f"LoRA ({client}): {path}")
    for video in result.validation_videos:
        print(f"validation video: {video}")
    if result.status == "interrupted":
        others = bool(set(overrides) - {"resume_from_checkpoint"})
        print(interrupted_message(result.step, args.config, other_options=others))
        return 130
    return 0
