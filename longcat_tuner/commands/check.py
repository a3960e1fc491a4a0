"""`longcat-tuner check`: validate config.json, multidatabackend.json, the media and the model folder, without GPU or weights.

Prints, per dataset, the usable items, their buckets, and every skipped file with its reason, and what the
validation settings will cost; exits non-zero when `train` would stop (bad config, no usable training item,
empty or missing eval split, a missing or broken model folder, an output_dir or a dataset's cache folder that
cannot be created or written, a cache entry two items would write (a cache_dir_vae inside another's), an
output_dir holding an earlier run without resume or overwrite, a start frame in
another folder than its clip, settings this machine cannot run: block swap
without CUDA, xformers or bitsandbytes not installed). Start frames are decoded in full, so `check` and
`train` agree on which are usable; the model folder is checked from its configs and safetensors headers
alone. An `init_lora` file is refused as `train` refuses it (unreadable, for another model or size, modules outside
lora_targets, a rank above lora_rank); so are a lora_rank above the narrowest adapted layer, a validation_resolution
the DiT's patch cannot take, and a resume with another train_batch_size or gradient_accumulation_steps. Nothing here imports torch (CUDA is asked about in a child process, only when a setting needs it)
except to read an `init_lora` file's tensors.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

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
    config: Optional[Any] = None  # the whole TrainConfig when --config was given (run-level checks)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    from longcat_tuner.config.training import DATA_KEYS, add_config_arguments

    parser.add_argument("--config", type=Path, help="config.json (its data keys and pretrained_model_name_or_path; "
                        "the flags below override them)")
    add_config_arguments(
        parser, names=DATA_KEYS, title="data keys (override config.json; `none` clears eval_dataset_id)",
        description="The defaults shown are config.json's. Without --config, no dataset is held out as the eval "
        "split unless --eval_dataset_id names it (every dataset is then checked or cached as training data).")


def data_settings(args: argparse.Namespace) -> DataSettings:
    """Settings from `--config` (validated by the training schema) and command-line overrides."""
    from longcat_tuner.config.training import DATA_KEYS, TrainConfig

    values: dict = {}
    overrides = {key: getattr(args, key) for key in DATA_KEYS if hasattr(args, key)}
    if args.config is not None:
        from longcat_tuner.commands.argtypes import refuse_long_path

        refuse_long_path("--config", args.config)  # one line naming the flag, not an OSError traceback
        config = TrainConfig.from_file(args.config, overrides=overrides)
        values = {
            "data_backend_config": config.data_backend_config,
            "eval_dataset_id": config.eval_dataset_id,
            "alignment": config.aspect_bucket_alignment,
            "seed": config.seed,
            "train_batch_size": config.train_batch_size,
            "model_root": config.pretrained_model_name_or_path,
            "config": config,
        }
        if config.model_type == "lora":
            values.update(lora_rank=config.lora_rank, lora_targets=tuple(config.lora_targets))
    else:
        # Without a config the flags are checked by the same schema rules, one key at a time.
        for key, value in overrides.items():
            values[{"aspect_bucket_alignment": "alignment"}.get(key, key)] = value
        if values.get("data_backend_config") is not None:
            values["data_backend_config"] = Path(values["data_backend_config"])
    if values.get("data_backend_config") is None:
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


def batch_groups(plan) -> dict[tuple, int]:
    """Items (with repeats) per group the batch sampler fills: same bucket, same I2V-ness."""
    from longcat_tuner.data.buckets import group_counts

    return group_counts(((sample.bucket, sample.source.cond_path is not None), dataset_plan.dataset.repeats)
                        for dataset_plan in plan.train for sample in dataset_plan.samples)


def largest_batch_group(plan) -> int:
    """Items (with repeats) in the biggest group the batch sampler can fill."""
    return max(batch_groups(plan).values(), default=0)


def checkpoint_patch_size(model_root: Path) -> Optional[tuple[int, int, int]]:
    """The patch_size of the checkpoint's dit/config.json, or None when it cannot be read (the model check names
    a damaged config)."""
    from longcat_tuner.model.config import DiTConfig

    try:
        return tuple(DiTConfig.from_file(Path(model_root) / "dit" / "config.json").patch_size)
    except Exception:
        return None


def patch_problem(plan, model_root: Path) -> Optional[str]:
    """Bucket sizes the checkpoint's DiT cannot patchify (pixels = VAE 8 x patch_size): the release's (1, 2, 2)
    takes every size the buckets make (multiples of 16); another patch would stop the run at its first step."""
    patch = checkpoint_patch_size(model_root)
    if patch is None:
        return None
    _, ph, pw = patch
    step_h, step_w = 8 * ph, 8 * pw
    bad = sorted({(s.bucket.height, s.bucket.width, p.dataset.id) for p in plan.all_plans for s in p.samples
                  if s.bucket.height % step_h or s.bucket.width % step_w})
    if not bad:
        return None
    named = ", ".join(f"{h}x{w} ('{dataset}')" for h, w, dataset in bad[:8]) + (" ..." if len(bad) > 8 else "")
    return (f"bucket size(s) {named} are not multiples of {step_h}x{step_w} (height x width), which this checkpoint's "
            f"patch_size (1, {ph}, {pw}) needs (the VAE's 8 x the patch); set those datasets' resolution to multiples "
            f"of {step_h}x{step_w}, or aspect_bucket_alignment to a multiple of {max(step_h, step_w)}")


def validation_sizes(config: Any, plan: Any) -> list[tuple[int, int, Optional[str]]]:
    """(height, width, the start frame that sized it or None) of each validation video `train` would sample, as
    `train.feed.validation_items` sizes them: the first `validation_max_samples` eval samples in cache order (a
    resolution class follows each start frame's aspect, displayed as EXIF says), or the `validation_prompt` video."""
    from longcat_tuner.config.resolution import parse_resolution
    from longcat_tuner.data.buckets import resolution_size
    from longcat_tuner.data.images import probe_image
    from longcat_tuner.errors import LongcatError

    setting = config.validation_resolution
    fixed = parse_resolution(setting)
    if not config.validation_using_datasets:
        return [(*fixed, None)] if config.validation_prompt and isinstance(fixed, tuple) else []
    if plan.eval is None:
        return []
    sizes = []
    for sample in plan.eval.samples[: config.validation_max_samples]:
        if isinstance(fixed, tuple):
            sizes.append((*fixed, None))
        elif sample.source.cond_path is not None:  # (a class without a start frame: `eval_size_problem`)
            try:
                source_hw = probe_image(sample.source.cond_path, decode=False)
            except LongcatError:  # an unreadable start frame is named by the data check
                continue
            sizes.append((*resolution_size(setting, source_hw, config.aspect_bucket_alignment),
                          f"eval sample {sample.source.media_path}"))
    return sizes


def validation_patch_problem(config: Any, plan: Any, model_root: Path) -> Optional[str]:
    """`patch_problem` for the validation videos: a `validation_resolution` the checkpoint's DiT cannot patchify
    (48x80 with patch_size (1, 4, 4)) failed every validation as a warning; `train` refuses it before loading."""
    from longcat_tuner.data.buckets import validation_size_problem

    patch = checkpoint_patch_size(model_root)
    if patch is None:
        return None
    return validation_size_problem(config.validation_resolution, validation_sizes(config, plan), patch)


def blocking_problems(summary: dict, settings: DataSettings, *, data_only: bool) -> list[str]:
    """Reasons training could not start."""
    problems = []
    if summary["train_items"] == 0:
        problems.append("no usable training item: fix or add the files listed above")
    if settings.eval_dataset_id and summary["eval_items"] == 0:
        problems.append(f"eval split '{settings.eval_dataset_id}' has no usable item")
    for problem in summary["conditioning"]:
        if problem.get("clip"):  # a start frame in another folder than its clip's: that clip is left out of training
            problems.append(f"{problem['path']}: {problem['reason']}")
    if not data_only and settings.model_root is not None:
        root = Path(settings.model_root)
        missing = [c for c in ("vae", "text_encoder", "tokenizer", "dit") if not (root / c).is_dir()]
        if not root.exists():
            problems.append(
                f"model folder {root} (pretrained_model_name_or_path) does not exist; download the checkpoint there "
                "(e.g. `huggingface-cli download meituan-longcat/LongCat-Video --local-dir <folder>`) or fix the path, "
                "or pass --data-only to check the data alone"
            )
        elif not root.is_dir():
            problems.append(f"model folder {root} (pretrained_model_name_or_path) is a file, not a folder; fix the path")
        elif missing:
            problems.append(
                f"model folder {settings.model_root} lacks {', '.join(missing)}/ (official hub layout expected); "
                "fix pretrained_model_name_or_path, or pass --data-only to check the data alone"
            )
        elif summary.get("model"):
            problems.extend(summary["model"]["problems"])
    return problems


# One measured sampling step (bench/results/sampling.json, H100, bf16, cuDNN SDPA): a CFG step at 480x832x93 I2V
# runs the DiT on a batch of 2 in 9.537 s. Other shapes scale by the DiT's FLOPs (the same count as the planner);
# the 16-step distilled run (batch 1) measured 4.766 s, the FLOP ratio predicts 4.77 s.
SAMPLING_REFERENCE = {"device": "H100", "step_s": 9.537, "height": 480, "width": 832, "frames": 93, "batch": 2}


def sampling_step_seconds(height: int, width: int, frames: int, *, guidance: float, start_frame: bool = True) -> float:
    """Predicted seconds of one denoising step on the reference GPU (both CFG passes when guidance > 1)."""
    from longcat_tuner.runtime.planner import Setting, flops

    def total(h: int, w: int, f: int, batch: int, cond: int) -> float:
        counts = flops(Setting(height=h, width=w, frames=f, batch=batch, num_cond_latents=cond))
        return counts["linear"] + counts["attention"]

    ref = SAMPLING_REFERENCE
    ratio = total(height, width, frames, 2 if guidance > 1 else 1, 1 if start_frame else 0) / total(
        ref["height"], ref["width"], ref["frames"], ref["batch"], 1)
    return ref["step_s"] * ratio


def validation_estimate(config: Any, eval_items: int) -> Optional[dict]:
    """What the validation settings cost: videos per validation, validations per run, predicted seconds."""
    from longcat_tuner.data.buckets import resolution_size

    if config.validation_using_datasets:
        videos = min(config.validation_max_samples, eval_items)
    else:
        videos = 1 if config.validation_prompt else 0
    if not videos:
        return None
    # A class (480p) follows each start frame's aspect; every bucket of a class has about the same area (tokens).
    height, width = resolution_size(config.validation_resolution)
    frames, steps = config.validation_num_video_frames, config.validation_num_inference_steps
    per_step = sampling_step_seconds(height, width, frames, guidance=config.validation_guidance,
                                     start_frame=config.validation_using_datasets)
    runs = None
    if config.max_train_steps is not None:
        interval = config.validation_step_interval
        runs = 1 if not interval else config.max_train_steps // interval + (1 if config.max_train_steps % interval else 0)
    per_video = per_step * steps
    return {
        "videos_per_validation": videos, "validations": runs, "height": height, "width": width, "frames": frames,
        "steps": steps, "cfg": config.validation_guidance > 1, "seconds_per_step": round(per_step, 2),
        "seconds_per_video": round(per_video, 1),
        "seconds_total": None if runs is None else round(per_video * videos * runs, 1),
        "device": SAMPLING_REFERENCE["device"],
    }


def format_validation_estimate(estimate: dict) -> str:
    shape = f"{estimate['height']}x{estimate['width']}x{estimate['frames']}"
    line = (
        f"[validation] {estimate['videos_per_validation']} video(s) of {shape} at {estimate['steps']} steps"
        f"{' with CFG' if estimate['cfg'] else ''}: ~{estimate['seconds_per_video']:.0f} s per video on an "
        f"{estimate['device']} with the 13.6B model ({estimate['seconds_per_step']:.1f} s per step; VAE decode not counted)"
    )
    if estimate["seconds_total"] is not None:
        line += f", {estimate['validations']} validation(s) -> ~{estimate['seconds_total'] / 60:.0f} min of the run"
        if estimate["seconds_total"] >= 60:  # advice worth giving only when validation costs something
            line += ("; lower validation_num_inference_steps or validation_max_samples, or raise "
                     "validation_step_interval, to spend less")
    return line


def output_dir_problem(output_dir: Path) -> Optional[str]:
    """Why `train` could not create or write `output_dir`, or None (`fsutil.folder_problem`)."""
    from longcat_tuner.fsutil import folder_problem

    return folder_problem(output_dir, "output_dir", "config.json")


def cuda_available() -> bool:
    """Whether torch sees a CUDA device, asked in a child process (`check` itself imports no torch)."""
    import subprocess

    try:
        result = subprocess.run([sys.executable, "-c", "import torch; print(int(torch.cuda.is_available()))"],
                                capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.stdout.strip().endswith("1")


def init_lora_problem(path: Path, targets: Iterable[str], model_root: Optional[Path] = None,
                      rank: Optional[int] = None) -> Optional[str]:
    """Why `train` would refuse the `init_lora` file, or None: first from its header alone; then as `train` does
    before caching or loading anything (`lora_formats.check_init_lora`: the LoRA's tensors are read, which imports
    torch): modules outside `targets` (lora_targets), given `rank` (lora_rank) a layer of a higher rank, and, given
    `model_root` (a model folder whose check passed), a LoRA for another model or size, against its dit/config.json
    (no weights loaded)."""
    from longcat_tuner.errors import CheckpointError, LongcatError
    from longcat_tuner.model.inspect import read_safetensors_header

    from longcat_tuner.train.outputs import checkpoint_weights_problem

    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        return f"init_lora {path} {what}; give the LoRA .safetensors file to start from, or remove the key"
    problem = checkpoint_weights_problem(path)
    if problem:
        return f"init_lora: {problem}"
    try:
        read_safetensors_header(path)
    except CheckpointError as err:
        return f"init_lora: {err}"
    from longcat_tuner.model.lora_formats import check_init_lora

    try:
        check_init_lora(path, targets, model_root, rank)
    except LongcatError as err:
        return f"init_lora: {err}"
    return None


def run_problems(config: Any, *, model_checked: bool = False) -> list[str]:
    """What `train` would refuse about this config on this machine, before touching data or weights.
    `model_checked`: the model folder passed its check, so an `init_lora` is compared with its DiT's layer sizes."""
    from importlib.util import find_spec

    problems = []
    from longcat_tuner.train.outputs import (
        earlier_run_problem, resolved_resume_checkpoint, resume_path_problem, resume_settings_problem,
    )

    problem = output_dir_problem(Path(config.output_dir)) or earlier_run_problem(
        Path(config.output_dir), resume_from_checkpoint=config.resume_from_checkpoint,
        overwrite_output_dir=config.overwrite_output_dir)
    if problem:
        problems.append(problem)
    checkpoints = Path(config.output_dir) / "checkpoints"
    problem = resume_path_problem(config.resume_from_checkpoint, checkpoints)
    if problem:
        problems.append(problem)
    resumed = resolved_resume_checkpoint(config.resume_from_checkpoint, checkpoints)
    problem = resume_settings_problem(resumed, config) if resumed is not None else None
    if problem:  # train_batch_size or gradient_accumulation_steps changed since that checkpoint
        problems.append(problem)
    if config.init_lora:
        problem = init_lora_problem(Path(config.init_lora), config.lora_targets,
                                    Path(config.pretrained_model_name_or_path) if model_checked else None,
                                    config.lora_rank)
        if problem:
            problems.append(problem)
    if config.attention_implementation == "xformers" and find_spec("xformers") is None:
        problems.append("attention_implementation 'xformers' but xformers is not installed: `pip install xformers`, "
                        "or set attention_implementation to auto or sdpa")
    if config.optimizer == "adamw8bit" and find_spec("bitsandbytes") is None:
        problems.append("optimizer 'adamw8bit' needs bitsandbytes, which is not installed: `pip install bitsandbytes`, "
                        "or set optimizer to adamw")
    if config.musubi_blocks_to_swap and not cuda_available():
        problems.append(f"musubi_blocks_to_swap {config.musubi_blocks_to_swap} streams weights to a CUDA device and this "
                        "machine has none (torch sees no GPU): set it to 0 here, or run on a GPU machine")
    return problems


def run_warnings(config: Any) -> list[str]:
    """What `train` would warn about this config and go on: a resume with another `seed` than its checkpoint's run
    (the checkpoint's random state is restored, so the new seed has no effect)."""
    from longcat_tuner.train.outputs import resolved_resume_checkpoint, resume_seed_warning

    resumed = resolved_resume_checkpoint(config.resume_from_checkpoint, Path(config.output_dir) / "checkpoints")
    warning = resume_seed_warning(resumed, config) if resumed is not None else None
    return [warning] if warning else []


def model_summary(settings: DataSettings) -> Optional[dict]:
    """The cheap model-folder check (configs, shard index, safetensors headers, DiT shapes; no weights, no torch)."""
    if settings.model_root is None:
        return None
    root = Path(settings.model_root)
    if not all((root / c).is_dir() for c in ("vae", "text_encoder", "tokenizer", "dit")):
        return None  # `blocking_problems` names the missing folders
    from longcat_tuner.model.inspect import inspect_model

    return inspect_model(root, lora_rank=settings.lora_rank, lora_targets=settings.lora_targets).to_dict()


def eval_size_problem(config: Any, plan: Any) -> Optional[str]:
    """Why validation cannot size a video, as `train` finds after loading the model: a validated eval sample
    without a start frame (text-to-video) and a `validation_resolution` class (480p), which follows a start
    frame's aspect. The validated samples are the eval split's first `validation_max_samples`, in cache order."""
    from longcat_tuner.config.resolution import parse_resolution

    if not config.validation_using_datasets or plan.eval is None:
        return None
    if isinstance(parse_resolution(config.validation_resolution), tuple):
        return None
    for sample in plan.eval.samples[: config.validation_max_samples]:
        if sample.source.cond_path is None:
            return (f"eval sample {sample.source.media_path} has no start frame, so validation_resolution must be "
                    f"HEIGHTxWIDTH (e.g. 480x832), not '{config.validation_resolution}', which follows a start frame's aspect")
    return None


def run(args: argparse.Namespace) -> int:
    from longcat_tuner.config.datasets import MIN_I2V_FRAMES, load_datasets
    from longcat_tuner.data.backends import cache_folder_problems, plan_data, plan_summary
    from longcat_tuner.data.buckets import continuation_problem, unbatched_warning
    from longcat_tuner.data.cache_layout import cache_entry_conflicts

    settings = data_settings(args)
    datasets = load_datasets(settings.data_backend_config)
    plan = plan_data(datasets, eval_dataset_id=settings.eval_dataset_id, alignment=settings.alignment, seed=settings.seed)
    summary = plan_summary(plan)
    if not args.data_only:
        summary["model"] = model_summary(settings)
    problems = blocking_problems(summary, settings, data_only=args.data_only) + cache_folder_problems(datasets)
    problems += cache_entry_conflicts(plan, datasets)  # two items, one cache file: each run would overwrite the other
    model_ok = bool(summary.get("model")) and not summary["model"]["problems"]
    if model_ok:
        problem = patch_problem(plan, Path(settings.model_root))
        problems += [problem] if problem else []
    if settings.config is not None:
        problems += run_problems(settings.config, model_checked=model_ok)
        problem = datasets.output_dir_problem(Path(settings.config.output_dir))
        if problem:
            problems.append(problem)
        problem = continuation_problem(
            ((p.dataset.id, s.bucket.frames, s.source.cond_path is not None)
             for p in plan.all_plans for s in p.samples),
            settings.config.video_continuation_latents)
        problems += [problem] if problem else []
        eval_starts = plan.eval is not None and any(s.source.cond_path is not None for s in plan.eval.samples)
        frames = settings.config.validation_num_video_frames
        if settings.config.validation_using_datasets and eval_starts and frames < MIN_I2V_FRAMES:
            problems.append(
                f"validation_num_video_frames {frames}: image-to-video validation needs at least {MIN_I2V_FRAMES} "
                f"frames (the start frame is the first latent frame); set it to {MIN_I2V_FRAMES} or more"
            )
        problem = eval_size_problem(settings.config, plan)
        problems += [problem] if problem else []
        problem = validation_patch_problem(settings.config, plan, Path(settings.model_root)) if model_ok else None
        problems += [problem] if problem else []
        summary["validation_estimate"] = validation_estimate(settings.config, summary["eval_items"])
    largest = largest_batch_group(plan)
    if 0 < largest < settings.train_batch_size:
        # The trainer drops short batches (every step sees train_batch_size items of one bucket).
        problems.append(
            f"train_batch_size {settings.train_batch_size} is larger than the biggest bucket ({largest} items "
            "counting repeats), so no full batch can be formed; lower train_batch_size or add repeats or data"
        )
    # Smaller groups are never trained on, and the run goes on without them: a warning (when some group fills a batch).
    unbatched = {(b.frames, b.height, b.width, start): n for (b, start), n in batch_groups(plan).items()
                 if n < settings.train_batch_size}
    notes = [unbatched_warning(unbatched, settings.train_batch_size)] if unbatched and largest >= settings.train_batch_size else []
    notes += run_warnings(settings.config) if settings.config is not None else []
    summary["ok"] = not problems
    summary["blocking"] = problems
    summary["batch_warnings"] = notes
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(format_summary(summary))
        model = summary.get("model")
        if model and model["ok"]:
            parts = "; ".join(f"{name} {note}" for name, note in model["components"].items())
            print(f"[model] {model['root']}: ok ({parts})")
        if summary.get("validation_estimate"):
            print(format_validation_estimate(summary["validation_estimate"]))
        for note in notes:
            print(note)
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
