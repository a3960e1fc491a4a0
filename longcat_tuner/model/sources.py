"""Where sampling finds each part of a model: the text encoder, tokenizer, VAE and scheduler of a checkpoint in
the official hub layout, and a DiT that may come from a full fine-tune instead of that checkpoint's `dit/`.

A full fine-tune (`model_type: full`) writes only `output_dir/dit/` (config.json and the weights): the other
components are the base model's, unchanged. `train` records that base in `output_dir/base_model.json`
(`write_base_pointer`), so `sample --model output_dir` finds them there, and `sample --model BASE --dit
output_dir/dit` says it explicitly (any DiT folder of the base's size). Nothing is copied: the multi-GB DiT is
read where it is. Torch-free (the web UI's preview route resolves a model with it too).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from longcat_tuner.errors import CheckpointError
from longcat_tuner.fsutil import path_too_long
from longcat_tuner.model.config import DiTConfig
from longcat_tuner.model.inspect import DIT_CLASS_NAME, config_class

PathLike = Union[str, Path]
BASE_MODEL_FILE = "base_model.json"  # in a full fine-tune's output_dir, beside dit/
POINTER_KIND = "longcat-tuner full fine-tune"
# What a DiT folder alone lacks, and the base model supplies (the scheduler is optional: our own schedule).
BASE_COMPONENTS = ("text_encoder", "tokenizer", "vae")
# dit/config.json fields that fix the weights' shapes and what the base's text encoder and VAE must feed the DiT.
SIZE_FIELDS = ("in_channels", "out_channels", "hidden_size", "depth", "num_heads", "caption_channels", "mlp_ratio",
               "adaln_tembed_dim", "frequency_embedding_size", "patch_size")
_LAYOUT = "the official layout (dit/ text_encoder/ tokenizer/ vae/ scheduler/)"


@dataclass(frozen=True)
class ModelSources:
    """`root`: the checkpoint whose text_encoder/ tokenizer/ vae/ scheduler/ (and lora/) are used; `dit`: the DiT
    folder (`root/dit` unless a full fine-tune's); `pointer`: the base_model.json that named `root`, if one did;
    `warning`: something the user should read (a --dit trained from another base of the same size)."""

    root: Path
    dit: Path
    pointer: Optional[Path] = None
    warning: Optional[str] = None

    @property
    def fine_tuned(self) -> bool:
        """Whether the DiT comes from somewhere else than the checkpoint's own dit/."""
        return self.dit != self.root / "dit"

    def recorded(self, key: str) -> Any:
        """A value the fine-tune recorded in the base_model.json beside its DiT (e.g. `attention_implementation`),
        or None."""
        pointer = pointer_for(self.dit) if self.fine_tuned else None
        return None if pointer is None else pointer_payload(pointer).get(key)

    def describe(self) -> str:
        """One line saying where each part comes from (printed by `sample` when the DiT is a fine-tune's)."""
        recorded = f" (recorded in {self.pointer})" if self.pointer else ""
        return f"model: DiT from {self.dit}; text encoder, tokenizer and VAE from the base model {self.root}{recorded}"


# --- the pointer a full fine-tune leaves ----------------------------------------------------------------
def write_base_pointer(run_dir: PathLike, base_model: PathLike, *, dit: str = "dit",
                       extra: Optional[dict[str, Any]] = None) -> Path:
    """Record in `run_dir/base_model.json` the base checkpoint a full fine-tune started from (an absolute path), so
    `sample --model run_dir` takes the text encoder, tokenizer and VAE from it; returns the file."""
    from longcat_tuner.fsutil import atomic_file

    path = Path(run_dir) / BASE_MODEL_FILE
    payload = {"kind": POINTER_KIND, "base_model": str(Path(base_model).expanduser().resolve()), "dit": dit,
               **(extra or {})}
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path


def read_base_pointer(path: PathLike, *, model_flag: str = "--model", dit_flag: str = "--dit") -> tuple[Path, Path]:
    """(the base checkpoint, the DiT folder) a `base_model.json` records; errors name the file and the fix."""
    path = Path(path)
    run_dir = path.parent
    fix = (f"pass the base model yourself: {model_flag} /path/to/LongCat-Video {dit_flag} {run_dir / 'dit'}, or write "
           f"its folder into {path} as {{\"base_model\": \"/path/to/LongCat-Video\"}}")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); it records the base model of the full fine-tune in "
                              f"{run_dir}: {fix}") from None
    base = payload.get("base_model") if isinstance(payload, dict) else None
    dit = payload.get("dit", "dit") if isinstance(payload, dict) else None
    if not isinstance(base, str) or not base.strip() or "\x00" in base:
        raise CheckpointError(f"{path} has no 'base_model' folder (got {str(base)[:80]!r}); {fix}")
    if not isinstance(dit, str) or not dit or Path(dit).name != dit or dit in (".", ".."):
        raise CheckpointError(f"{path}: 'dit' must name the DiT folder beside it (\"dit\"), got {dit!r}; {fix}")
    for key, value in (("base_model", base), ("dit", dit)):  # the file system's ENAMETOOLONG: a 500 in the web UI
        too_long = path_too_long(value)
        if too_long:
            raise CheckpointError(f"{path}: its '{key}' is no usable path: {too_long}; {fix}")
    root = Path(base).expanduser()
    root = root if root.is_absolute() else run_dir / root
    if not root.is_dir():
        raise CheckpointError(
            f"{path} records the base model {root}, which {'is not a folder' if root.exists() else 'does not exist'} "
            f"(moved or deleted since the fine-tune?); the fine-tune's DiT needs that model's text encoder, tokenizer "
            f"and VAE: {fix}")
    return root, run_dir / dit


def pointer_for(model: Path) -> Optional[Path]:
    """The base_model.json of a full fine-tune's output_dir given as `model`, or of the output_dir whose DiT folder
    `model` is (`--model output_dir/dit`); None for anything else."""
    if (model / BASE_MODEL_FILE).is_file():
        return model / BASE_MODEL_FILE
    beside = model.parent / BASE_MODEL_FILE
    named = pointer_payload(beside).get("dit", "dit") if beside.is_file() else None
    if named == model.name and (model / "config.json").is_file():
        return beside
    return None


def pointer_payload(path: Path) -> dict[str, Any]:
    """What a base_model.json holds, or {} when it cannot be read as a JSON object (`read_base_pointer` is the
    reader that names such a file; this one serves the lookups that fall back to the defaults)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return payload if isinstance(payload, dict) else {}


# --- what a folder is -----------------------------------------------------------------------------------
def dit_alone(folder: Path) -> Optional[Path]:
    """The DiT folder of `folder` when it holds a DiT but none of the base components (a full fine-tune's output,
    or the DiT folder itself), else None."""
    if any((folder / name).exists() for name in BASE_COMPONENTS):
        return None
    if (folder / "dit" / "config.json").is_file():
        return folder / "dit"
    if config_class(folder) == DIT_CLASS_NAME:
        return folder
    return None


def is_training_checkpoint(folder: Path) -> bool:
    from longcat_tuner.train.outputs import CHECKPOINT_WEIGHTS_FILE, COMPLETE_MARKER

    return (folder / COMPLETE_MARKER).exists() or (folder / CHECKPOINT_WEIGHTS_FILE).is_file()


def dit_folder_of(value: PathLike, *, dit_flag: str = "--dit") -> Path:
    """The DiT folder a `--dit` value names: a folder holding config.json and the weights (any name), or one with a
    dit/ folder (a full fine-tune's output_dir, a checkpoint root). Errors name the path and what to give."""
    path = Path(value).expanduser()
    what = "give a full fine-tune's DiT folder (output_dir/dit) or its output_dir"
    if not path.exists():
        raise CheckpointError(f"{dit_flag} {path} does not exist; {what}")
    if path.is_file():
        raise CheckpointError(f"{dit_flag} {path} is a file; give the folder holding it (config.json and "
                              f"diffusion_pytorch_model.safetensors, e.g. output_dir/dit)")
    if (path / "dit").is_dir():
        return path / "dit"
    if is_training_checkpoint(path):
        final = path.parent.parent / "dit"
        raise CheckpointError(
            f"{dit_flag} {path} is a training checkpoint (trainer state for --resume_from_checkpoint), not a DiT "
            f"folder; a full fine-tune writes its DiT at the end of the run, into {final}: give that, or resume the "
            "run to write it")
    declared = config_class(path)
    if (path / "config.json").is_file() and declared != DIT_CLASS_NAME:
        raise CheckpointError(f"{dit_flag} {path}: its config.json configures {declared or 'something else'}, not the "
                              f"LongCat-Video DiT ({DIT_CLASS_NAME}, with caption_channels); {what}")
    if not (path / "config.json").is_file() and not any(path.glob("*.safetensors")):
        raise CheckpointError(f"{dit_flag} {path} holds no DiT (no config.json, no *.safetensors, no dit/ folder); {what}")
    return path


def dit_folder_problem(folder: Path, *, flag: str) -> Optional[str]:
    """Why a fine-tune's DiT folder is incomplete (the run stopped while writing it, a copy cut short), or None.
    Damaged or mismatched weights are named by `require_intact_model`, which reads every header."""
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json"))
    if not (folder / "config.json").is_file():
        return (f"{flag} {folder} has no config.json{'' if has_weights else ' and no weights'}: the DiT was not "
                "completely written (a full fine-tune writes config.json last, so a run stopped while saving leaves "
                "it out; a copy may have been cut short). Rerun `longcat-tuner train --config ... "
                "--resume_from_checkpoint latest` to write it, or copy the folder again")
    if not has_weights:
        return (f"{flag} {folder} has config.json but no diffusion_pytorch_model.safetensors (nor its shards): "
                "the weights are missing; copy them again, or rerun the fine-tune with --resume_from_checkpoint latest")
    return None


def size_mismatch(dit_config: DiTConfig, base_config: DiTConfig) -> list[str]:
    """The size fields where two DiT configs differ, as `name A (base B)`."""
    return [f"{name} {getattr(dit_config, name)!r} (base {getattr(base_config, name)!r})"
            for name in SIZE_FIELDS if getattr(dit_config, name) != getattr(base_config, name)]


# --- the whole resolution ---------------------------------------------------------------------------------
def resolve_model(model: PathLike, dit: Optional[PathLike] = None, *, model_flag: str = "--model",
                  dit_flag: str = "--dit") -> ModelSources:
    """Where `sample --model MODEL [--dit DIT]` reads each component (config and file checks only; no weights):

    - `MODEL` a checkpoint in the official layout, no `DIT`: everything from it;
    - `MODEL` a full fine-tune's output_dir (or its dit/ folder) with the `base_model.json` `train` writes: the DiT
      from it, the rest from the recorded base;
    - `DIT` given: the DiT from there (a DiT folder or a fine-tune's output_dir), the rest from `MODEL` (or from
      the base `MODEL`'s pointer records).

    The DiT must have the base DiT's sizes (`SIZE_FIELDS` of their config.json): one trained from another base is
    refused naming both. A DiT folder given alone as `MODEL` (a fine-tune without its pointer) is refused naming
    the `--dit` form. Damaged files are left to `require_intact_model(root, dit=dit)`, which the caller runs next.
    """
    path = Path(model).expanduser()
    if not path.exists():
        raise CheckpointError(f"{model_flag} {path} does not exist: give a LongCat-Video folder in {_LAYOUT}, or a "
                              f"full fine-tune's output_dir (it records its base model in {BASE_MODEL_FILE})")
    pointer = pointer_for(path) if path.is_dir() else None
    if pointer is not None:
        root, own_dit = read_base_pointer(pointer, model_flag=model_flag, dit_flag=dit_flag)
    else:
        root, own_dit = path, None
    if dit is not None:
        folder, flag = dit_folder_of(dit, dit_flag=dit_flag), dit_flag
    elif own_dit is not None:
        folder, flag = own_dit, f"{model_flag} {path}:"
    else:
        alone = dit_alone(path) if path.is_dir() else None
        if alone is not None:
            raise CheckpointError(
                f"{model_flag} {path} holds a DiT but no {'/, '.join(BASE_COMPONENTS)}/: a full fine-tune's output "
                f"(model_type: full writes only the DiT) without its {BASE_MODEL_FILE}? Give the base model it was "
                f"trained from as well: {model_flag} /path/to/LongCat-Video {dit_flag} {alone}")
        return ModelSources(root=path, dit=path / "dit")
    problem = dit_folder_problem(folder, flag=flag)
    if problem:
        raise CheckpointError(problem)
    alone = dit_alone(root)
    if alone is not None:  # `--model OTHER_FINE_TUNE --dit ...`: no text encoder there either
        raise CheckpointError(
            f"{model_flag} {root} holds a DiT but no {'/, '.join(BASE_COMPONENTS)}/ (another fine-tune's output?); "
            f"with {dit_flag}, {model_flag} must be the base model in {_LAYOUT} whose text encoder, tokenizer and VAE "
            "the DiT was trained with")
    warning = None
    base_config_file = root / "dit" / "config.json"
    if base_config_file.is_file():
        fine = DiTConfig.from_file(folder / "config.json")
        base = DiTConfig.from_file(base_config_file)
        differ = size_mismatch(fine, base)
        if differ:
            recorded = ""
            theirs = pointer_for(folder)  # the fine-tune's own record of its base, if it has one
            if theirs is not None and theirs != pointer:
                try:
                    recorded = f" ({theirs} records that it was trained from {read_base_pointer(theirs)[0]})"
                except CheckpointError:
                    recorded = ""
            raise CheckpointError(
                f"the DiT in {folder} does not belong to the base model {root}: {', '.join(differ)} in their "
                f"config.json. A fine-tuned DiT samples with the base it was trained from{recorded}: give that "
                f"folder as {model_flag} (with {dit_flag} {folder})")
        theirs = pointer_for(folder) if dit is not None else None
        if theirs is not None:
            try:
                recorded_base = read_base_pointer(theirs)[0]
            except CheckpointError:
                recorded_base = None
            if recorded_base is not None and recorded_base.resolve() != root.resolve():
                warning = (f"warning: {theirs} records that this DiT was trained from {recorded_base}, but the text "
                           f"encoder, tokenizer and VAE come from {root} (same DiT sizes, so it runs; check it is the "
                           "same model)")
    return ModelSources(root=root, dit=folder, pointer=pointer, warning=warning)
