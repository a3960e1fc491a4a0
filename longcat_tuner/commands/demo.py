"""`longcat-tuner demo [FOLDER]`: the whole workflow on CPU in a few minutes, with nothing downloaded.

It writes a tiny random checkpoint in the official hub layout, a small synthetic paired dataset (clips of
moving colored shapes, their start frames and captions, plus an eval split), `multidatabackend.json` and
`config.json`; then it trains a LoRA for a few dozen steps with validation, exactly as
`longcat-tuner train --config FOLDER/config.json` would, and prints where the LoRA and the videos are, a loss
chart (`loss.png` in the run folder) and what the demo proves. The weights are random, so the validation videos
are coloured noise by design: the point is the pipeline, not the pictures.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

# Shapes and colours of the synthetic clips; each caption says what moves where.
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
BACKGROUNDS = {"dark": (20, 20, 30), "grey": (120, 120, 120), "white": (235, 235, 235)}
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train a tiny LoRA end to end on CPU (random model, synthetic data)",
        description="Create a tiny random checkpoint and a synthetic paired dataset, then train a LoRA with "
        "validation on the CPU in a few minutes. Nothing is downloaded. The model is random, so its validation "
        "videos are coloured noise by design; the demo proves the pipeline (loss curve, held-out loss, files).",
    )
    parser.add_argument("folder", nargs="?", type=Path, default=Path("demo_output"), help="where to put everything (default: demo_output in the current "
                        "folder; rerunning into it starts afresh, the earlier run moved into "
                        "output/superseded-run-*; a config.json or multidatabackend.json it did not write, or "
                        "one you edited since, is refused, never replaced)")
    from longcat_tuner.commands.argtypes import bounded_int
    from longcat_tuner.config.training import MAX_STEPS

    # Refused by argparse, before anything is written (0 used to write the whole demo, then fail max_train_steps).
    parser.add_argument("--steps", type=bounded_int(1, MAX_STEPS), default=40,
                        help="optimizer steps to train, at least 1 (default: 40)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (the libraries' included)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from longcat_tuner.config.training import TrainConfig
    from longcat_tuner.train.trainer import train

    if args.no_progress:
        from longcat_tuner.commands import quiet_library_progress

        quiet_library_progress()
    config_path = write_demo(args.folder, steps=args.steps)
    print(f"demo files written to {args.folder.resolve()} (config: {config_path})")
    result = train(TrainConfig.from_file(config_path), progress=not args.no_progress)
    print(f"\nrun folder: {result.run_dir}")
    if result.status == "interrupted":  # no final LoRA yet: say how to go on, not where the files would be
        from longcat_tuner.commands.train import interrupted_message

        print(interrupted_message(result.step, config_path))
        return 130
    print(f"LoRA (official LongCat format): {result.lora_path}")
    print(f"LoRA (ComfyUI-WanVideoWrapper): {result.comfyui_lora_path}")
    for video in result.validation_videos:
        print(f"validation video: {video}")
    print(f"events: {result.run_dir / 'events.jsonl'}")
    losses, heldout = read_losses(result.run_dir / "events.jsonl")
    chart = write_loss_chart(losses, heldout, result.run_dir / "loss.png") if losses else None
    print()
    print(demo_guide(result.run_dir, loss_chart=chart, losses=losses, heldout=heldout))
    print(f"\ntrain it again yourself: longcat-tuner train --config {config_path}")
    return 0 if result.status == "completed" else 130


def read_losses(events_path: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(training loss per step, held-out loss per validation step) from a run's events.jsonl."""
    losses: dict[int, float] = {}
    heldout: dict[int, float] = {}
    if not events_path.is_file():
        return losses, heldout
    for line in events_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "step" and isinstance(record.get("loss"), (int, float)):
            losses[int(record["step"])] = float(record["loss"])
        elif record.get("event") == "validation" and isinstance(record.get("heldout_loss"), (int, float)):
            heldout[int(record["step"])] = float(record["heldout_loss"])
    return losses, heldout


def write_loss_chart(losses: dict[int, float], heldout: dict[int, float], path: Path, *, size=(640, 320)) -> Path:
    """A PNG line chart: training loss per step (blue), held-out loss at each validation (orange dots)."""
    from PIL import Image, ImageDraw

    width, height = size
    margin = 40
    steps = sorted(losses) + sorted(heldout)
    values = list(losses.values()) + list(heldout.values())
    low, high = min(values), max(values)
    high = high if high > low else low + 1.0
    first, last = min(steps), max(steps)
    span = max(1, last - first)

    def point(step: int, value: float) -> tuple[float, float]:
        x = margin + (step - first) / span * (width - 2 * margin)
        y = height - margin - (value - low) / (high - low) * (height - 2 * margin)
        return x, y

    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle((margin, margin, width - margin, height - margin), outline=(180, 180, 180))
    line = [point(step, losses[step]) for step in sorted(losses)]
    if len(line) > 1:
        draw.line(line, fill=(40, 90, 200), width=2)
    for step in sorted(heldout):
        x, y = point(step, heldout[step])
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(230, 120, 20))
    draw.text((margin, 8), f"training loss (blue) and held-out loss (orange), steps {first}-{last}", fill=(0, 0, 0))
    draw.text((4, margin - 12), f"{high:.3f}", fill=(0, 0, 0))
    draw.text((4, height - margin), f"{low:.3f}", fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def demo_guide(run_dir: Path, *, loss_chart: Path | None = None, losses: dict[int, float] | None = None,
               heldout: dict[int, float] | None = None) -> str:
    """What the demo proves and where to look: the videos of a random model are noise by design."""
    lines = [
        "What the demo shows:",
        "  The model is a tiny network with random weights (nothing pretrained), so its validation videos are",
        "  coloured noise by design: it has never learned to draw. The demo proves the pipeline, end to end on",
        "  this machine: caches, LoRA training with checkpoints, validation, the held-out loss and the LoRA files.",
        "Where to look:",
    ]
    if loss_chart is not None:
        lines.append(f"  - the loss curve: {loss_chart} (training loss per step, held-out loss at each validation)")
    if losses:
        steps = sorted(losses)
        head, tail = steps[: max(1, len(steps) // 5)], steps[-max(1, len(steps) // 5):]
        mean = lambda keys: sum(losses[k] for k in keys) / len(keys)  # noqa: E731
        first, last = mean(head), mean(tail)
        # Only what the numbers show: a few steps of a random model are mostly noise (the sigma drawn each step).
        verdict = ("falling: the LoRA fits the training clips" if last < first else
                   f"not lower over {len(steps)} step(s): so few steps of a random model are mostly the noise of the "
                   "sigma drawn each step" + ("; the demo's default 40 steps show the fall" if len(steps) < 40 else ""))
        lines.append(f"  - training loss: {first:.4f} over the first steps, {last:.4f} over the last ({verdict})")
    if heldout:
        marks = ", ".join(f"step {step}: {value:.4f}" for step, value in sorted(heldout.items()))
        lines.append(f"  - held-out loss on the eval clips at fixed sigmas: {marks}")
    else:
        lines.append("  - held-out loss: the \"validation\" events of events.jsonl (fixed sigmas on the eval clips)")
    lines += [
        f"  - the files: {run_dir / 'longcat_lora.safetensors'} (and the ComfyUI file beside it), the validation "
        f"videos under {run_dir / 'validation'}, checkpoints under {run_dir / 'checkpoints'}, every step in "
        f"{run_dir / 'events.jsonl'}",
        "Real videos need the real model: set pretrained_model_name_or_path to the LongCat-Video checkpoint "
        "(README, \"Using it on the real model\").",
    ]
    return "\n".join(lines)


def render_clip(
    *, colour: tuple[int, int, int], background: tuple[int, int, int], direction: tuple[int, int],
    frames: int, height: int, width: int, size: int, start: tuple[int, int],
) -> np.ndarray:
    """`[F,H,W,3]` uint8: a square of `size` px moving 3 px per frame over a vertical gradient."""
    ramp = np.linspace(0.7, 1.3, height)[:, None, None]
    base = np.clip(np.asarray(background, dtype=np.float32)[None, None] * ramp, 0, 255)
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    for i in range(frames):
        frame = np.broadcast_to(base, (height, width, 3)).copy()
        x = int(np.clip(start[0] + 3 * i * direction[0], 0, width - size))
        y = int(np.clip(start[1] + 3 * i * direction[1], 0, height - size))
        frame[y : y + size, x : x + size] = colour
        video[i] = frame.astype(np.uint8)
    return video


def write_split(
    root: Path, *, count: int, frames: int, height: int, width: int, seed: int
) -> tuple[Path, Path]:
    """`root/clips/*.mp4` + captions and `root/start-frames/*.png` (frame 0 of each clip, same stem)."""
    from PIL import Image

    from longcat_tuner.media import write_mp4

    rng = np.random.default_rng(seed)
    clips, starts = root / "clips", root / "start-frames"
    clips.mkdir(parents=True, exist_ok=True)
    starts.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        size = int(rng.integers(height // 5, height // 3))
        start = (int(rng.integers(0, width - size)), int(rng.integers(0, height - size)))
        video = render_clip(
            colour=COLOURS[colour], background=BACKGROUNDS[background], direction=DIRECTIONS[direction],
            frames=frames, height=height, width=width, size=size, start=start,
        )
        stem = f"clip_{index:03d}"
        write_mp4(clips / f"{stem}.mp4", video, fps=15)
        Image.fromarray(video[0]).save(starts / f"{stem}.png")
        (clips / f"{stem}.txt").write_text(f"a {colour} square moves {direction} over a {background} background\n")
    return clips, starts


def dataset_entries(prefix: str, clips: Path, starts: Path, cache: Path, *, frames: int, resolution: str) -> list[dict[str, Any]]:
    """A clip dataset (I2V) and its start-frame conditioning dataset, in multidatabackend.json form."""
    return [
        {
            "id": prefix,
            "type": "local",
            "dataset_type": "video",
            "is_i2v": True,
            "instance_data_dir": str(clips),
            "caption_strategy": "textfile",
            "resolution": resolution,
            "cache_dir_vae": str(cache / "vae" / prefix),
            "cache_dir_text": str(cache / "text"),
            "conditioning_data": [f"{prefix}-cond"],
            "video": {"num_frames": frames, "fps": 15},
        },
        {
            "id": f"{prefix}-cond",
            "type": "local",
            "dataset_type": "conditioning",
            "instance_data_dir": str(starts),
            "caption_strategy": None,
            "resolution": resolution,
            "cache_dir_vae": str(cache / "vae" / f"{prefix}-cond"),
        },
    ]


DEMO_IDS = ("demo-train", "demo-train-cond", "demo-val", "demo-val-cond")
# What the demo last wrote: the SHA-256 of each config file, so a rerun can tell a file the user edited since
# (a changed learning_rate) from its own, and keep it.
DEMO_RECORD = ".longcat-demo.json"
DEMO_CONFIGS = ("config.json", "multidatabackend.json")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_config_file(folder: Path, name: str, data: Any) -> Path:
    """Write one of the demo's config files and record its digest in DEMO_RECORD."""
    path = folder / name
    path.write_text(json.dumps(data, indent=2))
    record_path = folder / DEMO_RECORD
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    record = record if isinstance(record, dict) else {}
    record[name] = _digest(path)
    record_path.write_text(json.dumps(record, indent=2))
    return path


def not_the_demos(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files and folders the demo did not write, config files it wrote that were edited since) in `folder`.

    Not written: config.json / multidatabackend.json that are not the demo's, and, where no demo ran before, the
    model/ data/ cache/ output/ it would write into: `demo .` in a project folder would otherwise replace the
    user's own files (captions, clips, a finished run's LoRA and checkpoints) without a word. Edited: a demo
    config whose content no longer matches what the demo recorded (a rerun reverted the user's changes)."""
    found, edited = [], []
    if not any((folder / name).exists() for name in DEMO_CONFIGS):
        found += [folder / name for name in ("model", "data", "cache", "output") if (folder / name).exists()]
    try:
        record = json.loads((folder / DEMO_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    record = record if isinstance(record, dict) else {}
    for name in DEMO_CONFIGS:
        path = folder / name
        if not path.exists():
            continue
        if not path.is_file():  # a folder, a pipe (reading it waited forever) or a device: not the demo's
            found.append(path)
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            found.append(path)
            continue
        ours = (isinstance(data, dict) and data.get("eval_dataset_id") == "demo-val") if name == "config.json" else (
            isinstance(data, list) and all(isinstance(d, dict) and d.get("id") in DEMO_IDS for d in data))
        if not ours:
            found.append(path)
        elif name in record and record[name] != _digest(path):
            edited.append(path)
    return found, edited


def write_demo(
    folder: Path, *, steps: int = 40, frames: int = 9, height: int = 64, width: int = 64,
    train_clips: int = 6, eval_clips: int = 2, model_size: str = "tiny", seed: int = 0,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write model, data, multidatabackend.json and config.json under `folder`; returns the config path."""
    from longcat_tuner.model.random_checkpoint import write_random_checkpoint

    from longcat_tuner.errors import ConfigError
    from longcat_tuner.fsutil import folder_problem

    problem = folder_problem(Path(folder), "the demo folder", "the command line")  # a file, a link loop, read-only
    if problem:
        raise ConfigError(problem)
    folder = Path(folder).resolve()
    foreign, edited = not_the_demos(folder)
    if foreign:
        raise ConfigError(
            f"{', '.join(map(str, foreign))}: not written by the demo, which writes config.json, multidatabackend.json, "
            f"model/, data/, cache/ and output/ in {folder}; give the demo a new or empty folder "
            "(`longcat-tuner demo FOLDER`; default demo_output)"
        )
    if edited:
        names = ", ".join(map(str, edited))
        raise ConfigError(
            f"{names}: changed since the demo wrote it, and the demo would write its own again; to train with your "
            f"changes run `longcat-tuner train --config {folder / 'config.json'}`, or move the file away (or delete "
            "it) for a fresh demo, or give the demo a new folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model"
    if not (model / "dit" / "config.json").exists():
        write_random_checkpoint(model, size=model_size, seed=seed)
    resolution = f"{height}x{width}"
    train_clips_dir, train_starts = write_split(folder / "data" / "train", count=train_clips, frames=frames,
                                                height=height, width=width, seed=seed)
    eval_clips_dir, eval_starts = write_split(folder / "data" / "val", count=eval_clips, frames=frames,
                                              height=height, width=width, seed=seed + 1)
    datasets = dataset_entries("demo-train", train_clips_dir, train_starts, folder / "cache", frames=frames, resolution=resolution)
    datasets += dataset_entries("demo-val", eval_clips_dir, eval_starts, folder / "cache", frames=frames, resolution=resolution)
    _write_config_file(folder, "multidatabackend.json", datasets)
    config = {
        "model_family": "longcat_video",
        "model_flavour": "final",
        "model_type": "lora",
        "pretrained_model_name_or_path": "model",
        "output_dir": "output",
        "overwrite_output_dir": True,  # the demo starts afresh each time it is run (no earlier-run refusal)
        "data_backend_config": "multidatabackend.json",
        "train_batch_size": 1,
        "gradient_checkpointing": True,
        "lora_rank": 8,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 2,
        "max_train_steps": steps,
        "validation_step_interval": max(1, steps // 2),
        "validation_resolution": resolution,
        "validation_num_video_frames": frames,
        "validation_num_inference_steps": 8,
        "validation_guidance": 4.0,
        "validation_using_datasets": True,
        "validation_max_samples": 2,
        "eval_dataset_id": "demo-val",
        "checkpoint_step_interval": max(1, steps // 2),
        "checkpoints_total_limit": 2,
        "seed": seed,
        **(extra_config or {}),
    }
    return _write_config_file(folder, "config.json", config)
