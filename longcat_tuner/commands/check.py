"""`longcat-tuner check`: validate config.json, multidatabackend.json, the media and the model folder, without GPU or weights.

Prints, per dataset, the usable items, their buckets, and every skipped file with its reason; exits
non-zero when training could not start (bad config, no usable training item, empty or missing eval
split, a missing or broken model folder). Start frames are decoded in full, so `check` and `train` agree
on which are usable; the model folder is checked from its configs and safetensors headers alone.
Nothing here imports torch.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from longcat_tuner.errors import ConfigError


@dataclass(frozen=True)
class DataSettings:
    """The few config.json values the data pipeline uses."""

    data_backend_config: Path
    eval_dataset_id: Optional[str]
    alignment: int = 64
    seed: int = 42
    train_batch_size: int = 1
    model_root: Optional[Path] = None
    lora_rank: Optional[int] = None  # with lora_targets: checked against the DiT's layer widths
    lora_targets: Optional[tuple[str, ...]] = None


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="config.json (reads data_backend_config, eval_dataset_id, "
                        "aspect_bucket_alignment, seed, train_batch_size, pretrained_model_name_or_path)")
    parser.add_argument("--data_backend_config", type=Path, help="multidatabackend.json (overrides the config's)")
    parser.add_argument("--eval_dataset_id", help="eval split id (overrides the config's; 'none' for no eval split)")
    parser.add_argument("--aspect_bucket_alignment", type=int, help="bucket grid in pixels (default 64)")


def data_settings(args: argparse.Namespace) -> DataSettings:
    """Settings from `--config` (validated by the training schema) and command-line overrides."""
    values: dict = {}
    if args.config is not None:
        from longcat_tuner.config.training import TrainConfig

        config = TrainConfig.from_file(args.config)
        values = {
            "data_backend_config": config.data_backend_config,
            "eval_dataset_id": config.eval_dataset_id,
            "alignment": config.aspect_bucket_alignment,
            "seed": config.seed,
            "train_batch_size": config.train_batch_size,
            "model_root": config.pretrained_model_name_or_path,
        }
        if config.model_type == "lora":
            values.update(lora_rank=config.lora_rank, lora_targets=tuple(config.lora_targets))
    if args.data_backend_config is not None:
        values["data_backend_config"] = args.data_backend_config
    if args.eval_dataset_id is not None:
        values["eval_dataset_id"] = None if args.eval_dataset_id.lower() in ("", "none", "null") else args.eval_dataset_id
    if args.aspect_bucket_alignment is not None:
        values["alignment"] = args.aspect_bucket_alignment
    if "data_backend_config" not in values:
        raise ConfigError("give --config config/config.json (or --data_backend_config multidatabackend.json)")
    values.setdefault("eval_dataset_id", None)
    return DataSettings(**values)


def format_summary(summary: dict, *, max_listed: int = 20) -> str:
    lines = []
    for dataset in summary["datasets"]:
        kind = "I2V clips" if dataset["is_i2v"] else dataset["dataset_type"]
        pairing = f" + start frames from {dataset['conditioning_data'][0]}" if dataset["conditioning_data"] else ""
        lines.append(
            f"[{dataset['role']}] {dataset['id']} ({kind}{pairing}): {dataset['items']} usable of {dataset['scanned']} "
            f"files, {len(dataset['skipped'])} skipped" + (f", repeats {dataset['repeats']}" if dataset["repeats"] else "")
        )
        for bucket, count in dataset["buckets"].items():
            lines.append(f"    bucket {bucket} (frames x height x width): {count}")
        for label, problems in (("skipped", dataset["skipped"]), ("warning", dataset["warnings"])):
            for problem in problems[:max_listed]:
                lines.append(f"    {label}: {problem['path']}: {problem['reason']}")
            if len(problems) > max_listed:
                lines.append(f"    ... and {len(problems) - max_listed} more {label}")
    for problem in summary["conditioning"][:max_listed]:
        lines.append(f"[conditioning] {problem['dataset_id']}: {problem['path']}: {problem['reason']}")
    if len(summary["conditioning"]) > max_listed:
        lines.append(f"[conditioning] ... and {len(summary['conditioning']) - max_listed} more")
    return "\n".join(lines)


def largest_batch_group(plan) -> int:
    """Items (with repeats) in the biggest group the batch sampler can fill: same bucket, same I2V-ness."""
    groups: dict[tuple, int] = {}
    for dataset_plan in plan.train:
        for sample in dataset_plan.samples:
            key = (sample.bucket, sample.source.cond_path is not None)
            groups[key] = groups.get(key, 0) + 1 + dataset_plan.dataset.repeats
    return max(groups.values(), default=0)


def blocking_problems(summary: dict, settings: DataSettings, *, data_only: bool) -> list[str]:
    """Reasons training could not start."""
    problems = []
    if summary["train_items"] == 0:
        problems.append("no usable training item: fix or add the files listed above")
    if settings.eval_dataset_id and summary["eval_items"] == 0:
        problems.append(f"eval split '{settings.eval_dataset_id}' has no usable item")
    if not data_only and settings.model_root is not None:
        missing = [c for c in ("vae", "text_encoder", "tokenizer", "dit") if not (Path(settings.model_root) / c).is_dir()]
        if missing:
            problems.append(
                f"model folder {settings.model_root} lacks {', '.join(missing)}/ (official hub layout expected); "
                "fix pretrained_model_name_or_path, or pass --data-only to check the data alone"
            )
        elif summary.get("model"):
            problems.extend(summary["model"]["problems"])
    return problems


def model_summary(settings: DataSettings) -> Optional[dict]:
    """The cheap model-folder check (configs, shard index, safetensors headers, DiT shapes; no weights, no torch)."""
    if settings.model_root is None:
        return None
    root = Path(settings.model_root)
    if not all((root / c).is_dir() for c in ("vae", "text_encoder", "tokenizer", "dit")):
        return None  # `blocking_problems` names the missing folders
    from longcat_tuner.model.inspect import inspect_model

    return inspect_model(root, lora_rank=settings.lora_rank, lora_targets=settings.lora_targets).to_dict()


def run(args: argparse.Namespace) -> int:
    from longcat_tuner.config.datasets import load_datasets
    from longcat_tuner.data.backends import plan_data, plan_summary

    settings = data_settings(args)
    datasets = load_datasets(settings.data_backend_config)
    plan = plan_data(datasets, eval_dataset_id=settings.eval_dataset_id, alignment=settings.alignment, seed=settings.seed)
    summary = plan_summary(plan)
    if not args.data_only:
        summary["model"] = model_summary(settings)
    problems = blocking_problems(summary, settings, data_only=args.data_only)
    largest = largest_batch_group(plan)
    if 0 < largest < settings.train_batch_size:
        # The trainer drops short batches (every step sees train_batch_size items of one bucket).
        problems.append(
            f"train_batch_size {settings.train_batch_size} is larger than the biggest bucket ({largest} items "
            "counting repeats), so no full batch can be formed; lower train_batch_size or add repeats or data"
        )
    summary["ok"] = not problems
    summary["blocking"] = problems
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(format_summary(summary))
        model = summary.get("model")
        if model and model["ok"]:
            parts = "; ".join(f"{name} {note}" for name, note in model["components"].items())
            print(f"[model] {model['root']}: ok ({parts})")
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if not problems:
            print(f"ok: {summary['train_items']} training items, {summary['eval_items']} eval items")
    return 1 if problems else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check",
        help="validate config and data (pairs, sizes, frame counts, unreadable files) without GPU or weights",
        description=__doc__,
    )
    add_data_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--data-only", "--data_only", dest="data_only", action="store_true",
                        help="do not check the model folder (by default its configs, shard index, safetensors headers "
                        "and DiT shapes are checked, without loading weights)")
    parser.set_defaults(func=run)
