"""What an earlier run left in an `output_dir`, asked the same way by `train` (before it writes there) and by
`check` (which imports no torch, so neither does this module)."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Optional

from longcat_tuner.errors import CheckpointError

COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# What a run writes into its output_dir (besides its lock): an earlier run's copies are set aside together.
RUN_FOLDERS = ("checkpoints", "dit", "validation", "tensorboard")
# train/events.py EVENTS_FILE, a full fine-tune's model/sources.py BASE_MODEL_FILE (beside its dit/) and the demo's
# loss chart (commands/demo.py: left in place, the chart of the earlier run sat beside the new one's outputs after
# `train --config FOLDER/config.json`, the demo's own advice); the final LoRA weights are the folder's *.safetensors
RUN_FILES = ("events.jsonl", "base_model.json", "loss.png")


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (with the marker), oldest first."""
    found = []
    if not Path(checkpoints_dir).is_dir():
        return found
    for path in Path(checkpoints_dir).iterdir():
        match = CHECKPOINT_NAME.match(path.name)
        if match and path.is_dir() and (path / COMPLETE_MARKER).exists():
            found.append((int(match.group(1)), path))
    return sorted(found)


def earlier_outputs(run_dir: Path) -> list[str]:
    """What an earlier run left in `run_dir` that a new run from step 0 would mix with or replace."""
    run_dir = Path(run_dir)
    found = []
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint(s), the newest {checkpoints[-1][1].name}")
    if run_dir.is_dir():
        found += sorted(path.name for path in run_dir.glob("*.safetensors"))
    if (run_dir / "dit").is_dir():
        found.append("dit/ (a full fine-tune)")
    return found


def earlier_run_problem(run_dir: Path, *, resume_from_checkpoint: Optional[str], overwrite_output_dir: bool) -> Optional[str]:
    """Why a new run (no resume) into `run_dir` is refused: it holds an earlier run's checkpoints or final
    weights and `overwrite_output_dir` is off. None when the run may go on."""
    if resume_from_checkpoint or overwrite_output_dir:
        return None
    found = earlier_outputs(run_dir)
    if not found:
        return None
    return (
        f"output_dir {run_dir} already holds an earlier run ({', '.join(found[:4])}); continue it with "
        "--resume_from_checkpoint latest, choose a fresh output_dir, or set overwrite_output_dir: true to "
        "train from step 0 there (the earlier run is then moved, untouched, into a superseded-run-<date>-<time> "
        "folder in it)"
    )


def set_aside_earlier_run(run_dir: Path) -> Optional[Path]:
    """Move what an earlier run left in `run_dir` (checkpoints/, final weights, dit/, validation/, tensorboard/,
    events.jsonl, base_model.json, the demo's loss.png) into one new `superseded-run-<date>-<time>` folder there,
    and return it (None when there is nothing). `overwrite_output_dir` starts from step 0: left in place, the earlier checkpoints would be what
    `latest` resumes and what `checkpoints_total_limit` prunes among the new run's, and its events and validation
    videos would be appended to or saved over."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    earlier = [run_dir / name for name in RUN_FOLDERS if (run_dir / name).is_dir() and any((run_dir / name).iterdir())]
    earlier += [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
    earlier += sorted(path for path in run_dir.glob("*.safetensors") if path.is_file())
    if not earlier:
        return None
    return move_aside(
        earlier, run_dir, f"superseded-run-{time.strftime('%Y%m%d-%H%M%S')}",
        reason=f"overwrite_output_dir starts a new run in {run_dir}",
        fix="move them out of that folder yourself, choose a fresh output_dir, or continue the earlier run with "
            "--resume_from_checkpoint latest",
    )


def move_aside(paths: list[Path], parent: Path, name: str, *, reason: str, fix: str) -> Path:
    """Move `paths` into a new folder `parent/name` (`name-2`, ... when that exists: two runs within a second) and
    return it; on one disk they are renamed, never copied. A failure is a `CheckpointError` saying `reason`, what
    could not be moved where, and `fix`."""
    folder, number = Path(parent) / name, 1
    while folder.exists():
        number += 1
        folder = Path(parent) / f"{name}-{number}"
    try:
        folder.mkdir()
        for path in paths:
            path.rename(folder / path.name)
    except OSError as err:
        raise CheckpointError(f"{reason}, and moving {', '.join(p.name for p in paths)} aside into {folder} failed "
                              f"({err}); {fix}") from None
    return folder


def resume_path_problem(value: Optional[str], checkpoints_dir: Path) -> Optional[str]:
    """Why `resume_from_checkpoint` (a path; `latest` always may go on) names no complete checkpoint folder, or
    None: asked by `train` before the data and the model, and by `check`. A run's output_dir or its checkpoints/
    folder given instead is pointed at the newest checkpoint in it."""
    if value is None or value == "latest":
        return None
    path = Path(value)
    example = Path(checkpoints_dir) / "checkpoint-000100"
    if not path.is_dir():
        return (f"resume_from_checkpoint: {path} is not a folder; give a checkpoint folder (e.g. {example}) or 'latest'"
                + ("; to start training from a LoRA file, set init_lora to it instead" if path.is_file() else ""))
    if (path / COMPLETE_MARKER).exists():
        return None
    inside = list_checkpoints(path) or list_checkpoints(path / "checkpoints")
    what = (f"the newest complete checkpoint in it is {inside[-1][1]}" if inside
            else "an unfinished save, or not a checkpoint folder")
    return (f"resume_from_checkpoint: {path} is not a complete checkpoint (no {COMPLETE_MARKER} marker: {what}); "
            f"give a checkpoint folder (e.g. {example}) or 'latest'")


# What decides which items form each optimizer step (the sampler cuts batches of train_batch_size, a step takes
# gradient_accumulation_steps of them): each checkpoint's trainer_state.json records them, and a resume must keep
# them, or the data position it restores (batches taken in the epoch) no longer continues the run it saved.
STEP_DATA_KEYS = ("train_batch_size", "gradient_accumulation_steps")


STATE_FILE = "trainer_state.json"  # a checkpoint's step, schedule, sampler position and the settings above


def saved_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json, or {} when it cannot be read as a JSON object (the resume itself names a
    damaged one: `checkpoint.load_checkpoint`); for the checks that can only speak about what it records."""
    try:
        state = json.loads((Path(checkpoint) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def resolved_resume_checkpoint(value: Optional[str], checkpoints_dir: Path) -> Optional[Path]:
    """The checkpoint folder `resume_from_checkpoint` resumes (`latest`: the newest complete one), or None (no
    resume, none yet, or a path `resume_path_problem` refuses)."""
    if value is None:
        return None
    if value == "latest":
        found = list_checkpoints(checkpoints_dir)
        return found[-1][1] if found else None
    return None if resume_path_problem(value, checkpoints_dir) else Path(value)


def resume_settings_problem(checkpoint: Path, config: Any) -> Optional[str]:
    """Why `config` cannot resume `checkpoint`: a `STEP_DATA_KEYS` value other than the one its run trained with
    (each step would take other items, the restored data position would not continue that run). None when they
    agree, or for a checkpoint that predates the record (its state file's problems are named by the resume)."""
    checkpoint = Path(checkpoint)
    state = saved_state(checkpoint)
    changed = [(key, state[key], getattr(config, key)) for key in STEP_DATA_KEYS
               if key in state and state[key] != getattr(config, key)]
    if not changed:
        return None
    values = " and ".join(f"{key} {new} (the checkpoint's run used {old})" for key, old, new in changed)
    back = ", ".join(f"{key}: {old}" for key, old, _ in changed)
    lora = checkpoint / CHECKPOINT_LORA_FILE
    # A fresh output_dir: overwrite_output_dir would first move this checkpoint (and its LoRA) aside.
    fresh = (f"start a new run from its weights: init_lora: {lora} in a fresh output_dir, without "
             "resume_from_checkpoint" if lora.is_file()
             else "start a new run in a fresh output_dir, without resume_from_checkpoint")
    return (f"resume_from_checkpoint {checkpoint}: this config sets {values}; these decide which items form each step, so "
            "the saved data position (batches taken in the epoch) would not continue that run. Set "
            f"{back} again to resume it, or {fresh}")


def resume_seed_warning(checkpoint: Path, config: Any) -> Optional[str]:
    """A warning when `config.seed` differs from the seed of the run that wrote `checkpoint` (its data sampler's,
    in trainer_state.json): resuming restores the checkpoint's random state (data order, noise, sigmas), so the new
    seed has no effect. None when they agree, or when the checkpoint records no seed."""
    try:
        saved = saved_state(checkpoint)["sampler"]["seed"]
    except (KeyError, TypeError):
        return None
    if not isinstance(saved, int) or isinstance(saved, bool) or saved == config.seed:
        return None
    return (f"warning: resume_from_checkpoint {checkpoint}: this config sets seed {config.seed}, the checkpoint's run "
            f"used seed {saved}; resuming restores the checkpoint's random state (data order, noise, sigmas), so seed "
            f"{saved} is used and seed {config.seed} has no effect. Set seed: {saved} to resume without this warning, "
            f"or start a new run (without resume_from_checkpoint) to train with seed {config.seed}")


CHECKPOINT_WEIGHTS_FILE = "trainable.safetensors"  # a checkpoint's trainable weights, under the model's own names
CHECKPOINT_LORA_FILE = "longcat_lora.safetensors"  # the same adapters in the official LoRA format, beside them


def checkpoint_weights_problem(path: Path) -> Optional[str]:
    """Why a checkpoint's `trainable.safetensors`, given where a LoRA file is expected (`sample --lora`,
    `export-lora`, `init_lora`), is not one, naming the LoRA file beside it; None for any other path.

    Its keys are the model's own parameter names, which no LoRA reader knows: without this the error listed
    every known layout and asked whether it was a LoRA for another model."""
    path = Path(path)
    if path.name != CHECKPOINT_WEIGHTS_FILE or not (path.parent / COMPLETE_MARKER).exists():
        return None
    lora = path.parent / CHECKPOINT_LORA_FILE
    if lora.is_file():
        return f"{path} is a checkpoint's training state, not a LoRA file; use {lora} (the same adapters, official format)"
    return (f"{path} is a checkpoint's training state (a full fine-tune's holds no LoRA), not a LoRA file; "
            f"give a LoRA .safetensors file (a LoRA run writes {CHECKPOINT_LORA_FILE} in each checkpoint)")
