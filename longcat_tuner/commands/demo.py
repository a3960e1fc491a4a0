"""`longcat-tuner demo [FOLDER]`: the whole workflow on CPU in a few minutes, with nothing downloaded.

It writes a tiny random checkpoint in the official hub layout, a small synthetic paired dataset (clips of
moving colored shapes, their start frames and captions, plus an eval split), `multidatabackend.json` and
`config.json`; then it trains a LoRA for a few dozen steps with validation, exactly as
`longcat-tuner train --config FOLDER/config.json` would, and prints where the LoRA and the videos are.
The weights are random, so the videos show noise-like motion: the point is the pipeline, not the pictures.
"""
from __future__ import annotations

import argparse
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
        "validation on the CPU in a few minutes. Nothing is downloaded.",
    )
    parser.add_argument("folder", nargs="?", type=Path, default=Path("demo_output"), help="where to put everything")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps to train")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from longcat_tuner.config.training import TrainConfig
    from longcat_tuner.train.trainer import train

    config_path = write_demo(args.folder, steps=args.steps)
    print(f"demo files written to {args.folder.resolve()} (config: {config_path})")
    result = train(TrainConfig.from_file(config_path), progress=not args.no_progress)
    print(f"\nrun folder: {result.run_dir}")
    print(f"LoRA (official LongCat format): {result.lora_path}")
    print(f"LoRA (ComfyUI-WanVideoWrapper): {result.comfyui_lora_path}")
    for video in result.validation_videos:
        print(f"validation video: {video}")
    print(f"events: {result.run_dir / 'events.jsonl'}")
    print(f"train it again yourself: longcat-tuner train --config {config_path}")
    return 0 if result.status == "completed" else 130


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


def write_demo(
    folder: Path, *, steps: int = 40, frames: int = 9, height: int = 64, width: int = 64,
    train_clips: int = 6, eval_clips: int = 2, model_size: str = "tiny", seed: int = 0,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write model, data, multidatabackend.json and config.json under `folder`; returns the config path."""
    from longcat_tuner.model.random_checkpoint import write_random_checkpoint

    folder = Path(folder).resolve()
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
    (folder / "multidatabackend.json").write_text(json.dumps(datasets, indent=2))
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
    path = folder / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path
