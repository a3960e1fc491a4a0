"""The `config.json` schema: one typed, documented model of every training setting.

The guide's flat JSON keys are the user contract (SPEC section 3). `TrainConfig` validates them up
front, rejects unknown keys by name (with the closest known key as a hint), and is the single source
of truth for `longcat-tuner train --help` (`add_config_arguments`), the web UI form
(`TrainConfig.model_json_schema()`) and the docs. Components get the few values they need, never this
object as a whole.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from longcat_tuner.config.resolution import parse_resolution  # noqa: F401  (re-exported: the one parser)
from longcat_tuner.config.sampling import MAX_CONFIG_PROMPT_CHARS, MAX_SEED, sampling_field
from longcat_tuner.errors import ConfigError
from longcat_tuner.model.lora_names import BLOCK_LINEARS, DEFAULT_LORA_TARGETS, LORA_FILE_FORMATS, TOP_LINEARS, unknown_targets

# Upper bounds of the schema's counts: far above any real run, low enough that a typo (`1e10`, `2**70`)
# is refused up front instead of overflowing a tensor or running "forever".
MAX_LORA_RANK = 1024
MAX_STEPS = 1_000_000_000
# The largest peak learning rate that makes sense per optimizer (AdamW steps are ~lr per weight, so
# lr > 1 destroys the weights in one step). An adaptive optimizer (Prodigy-like, lr ~ 1) would go up to
# the field's hard cap of 10.
OPTIMIZER_MAX_LEARNING_RATE: dict[str, float] = {"adamw": 1.0, "adamw8bit": 1.0}

# Fields holding filesystem paths: `from_file` resolves them against the config file's folder.
PATH_FIELDS: tuple[str, ...] = (
    "pretrained_model_name_or_path",
    "output_dir",
    "data_backend_config",
    "resume_from_checkpoint",
    "init_lora",
)


# The data section: the keys the data pipeline reads; `check` and `cache` take them as flags (from the schema).
DATA_KEYS: tuple[str, ...] = (
    "data_backend_config", "eval_dataset_id", "aspect_bucket_alignment", "train_batch_size", "seed",
)


class TrainConfig(BaseModel):
    """Every setting of a training run, as flat keys of `config.json`."""

    # allow_inf_nan=False: every float key refuses Infinity / -Infinity / NaN (JSON `Infinity` parses in Python).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # --- model -----------------------------------------------------------------------------------
    model_family: Literal["longcat_video"] = Field(
        "longcat_video", description="Model family. Only LongCat-Video is supported."
    )
    model_flavour: Literal["final"] = Field(
        "final",
        description="Checkpoint flavour. `final` serves both text-to-video and image-to-video; the task "
        "comes from the data and validation settings.",
    )
    model_type: Literal["lora", "full"] = Field(
        "lora", description="`lora` trains low-rank adapters only; `full` trains every DiT weight."
    )
    pretrained_model_name_or_path: Path = Field(
        ...,
        description="Local folder in the official hub layout (dit/ text_encoder/ tokenizer/ vae/ scheduler/).",
    )
    base_model_precision: Literal["no_change", "bf16", "fp32", "int8-quanto", "fp8-torchao", "fp8-compute"] = Field(
        "no_change",
        description="Storage precision of the frozen base weights. `no_change` means bf16 on CUDA and "
        "fp32 on CPU; `int8-quanto` / `fp8-torchao` store the block linears in 8 bits with per-row scales "
        "(our own layers: neither optimum-quanto nor torchao is needed). Left unset on CUDA, the memory plan "
        "picks `fp8-torchao` only when nothing in bf16 fits. `fp8-compute` (LoRA only, opt-in: never picked "
        "by the plan) stores them as `fp8-torchao` does and also runs their forward, recompute and input "
        "gradient as float8 matmuls (rowwise scales); adapters stay bf16/fp32.",
    )
    attention_implementation: Literal["auto", "sdpa", "xformers", "block_sparse"] = Field(
        "auto",
        description="Attention backend: `auto` uses block-sparse on CUDA where the checkpoint enables it "
        "and the token grid allows, else SDPA. The run trains and samples with the same backend.",
    )

    # --- LoRA ------------------------------------------------------------------------------------
    lora_rank: int = Field(
        8, ge=1, le=MAX_LORA_RANK, description="LoRA rank (adapter width); at most the narrowest adapted layer."
    )
    lora_alpha: Optional[float] = Field(
        None,
        gt=0,
        le=4096,
        description="LoRA alpha; the adapter output is scaled by alpha/rank. Empty means alpha = rank (scale 1).",
    )
    lora_targets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        description="Linear layers that get adapters, matched by name in every block (default: every linear layer of a block "
        "but its adaLN modulation); `adaLN_modulation.1`, a block-specific `blocks.3.attn.qkv` and the layers outside "
        "the blocks (`t_embedder.mlp.0`, `final_layer.linear`, ...) may be named too.",
    )
    init_lora: Optional[str] = Field(
        None, description="A LoRA file (any layout `sample --lora` reads: ours, ComfyUI-WanVideoWrapper, Wan2GP, "
        "diffusers/PEFT, DiffSynth, musubi, VideoX-Fun) to start training from instead of fresh adapters: its "
        "delta weights exactly, at lora_rank (>= the file's rank). A resumed checkpoint takes precedence.",
    )
    lora_export_formats: list[Literal[LORA_FILE_FORMATS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["official", "comfyui-wanvideowrapper"],
        min_length=1,
        description="LoRA files written at the end of training, into the run folder: `official` "
        "(longcat_lora.safetensors, LongCat-Video's own loader), `comfyui-wanvideowrapper` "
        "(longcat_lora_comfyui.safetensors, kijai's ComfyUI-WanVideoWrapper names, q/k/v split exactly), "
        "`wan2gp` (longcat_lora_wan2gp.safetensors, official names with kohya suffixes), `diffusers` "
        "(longcat_lora_diffusers.safetensors, PEFT keys with alpha in the header, as SimpleTuner writes). "
        "`export-lora` converts any of them later.",
    )

    # --- data ------------------------------------------------------------------------------------
    data_backend_config: Path = Field(
        ..., description="Path of multidatabackend.json (the dataset list: clips, start frames, eval split)."
    )
    aspect_bucket_alignment: int = Field(
        64,
        ge=16,
        le=1024,
        description="Bucket grid step in pixels (a multiple of 16). The grid is anchored at the native size of "
        "the resolution class (480x832 for 480), so 480p buckets are 480x832, 832x480, 608x640, ...; for sizes "
        "on whole multiples of 64 (a block-sparse-friendly token grid) use a resolution such as 512 or 704.",
    )
    train_batch_size: int = Field(1, ge=1, le=4096, description="Clips per optimizer micro-step (same bucket).")
    caption_dropout_probability: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Chance that a training caption is replaced by the empty-prompt embedding "
        "(keeps classifier-free guidance working).",
    )
    video_continuation_latents: int = Field(
        0,
        ge=0,
        le=1024,
        description="For clips without a start frame: keep this many leading clip latents clean as "
        "condition (video continuation). 0 trains those clips as text-to-video.",
    )

    # --- objective -------------------------------------------------------------------------------
    flow_schedule_shift: float = Field(
        12.0, gt=0, le=100, description="Shift applied to training sigmas: s' = shift*s / (1 + (shift-1)*s)."
    )
    flow_sigma_distribution: Literal["uniform", "logit_normal"] = Field(
        "uniform", description="Base distribution of training sigmas before the shift."
    )

    # --- optimisation ----------------------------------------------------------------------------
    learning_rate: float = Field(
        1e-4, gt=0, le=10, description="Peak learning rate (AdamW: at most 1; typical 1e-5 to 1e-3)."
    )
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="AdamW, or bitsandbytes' 8-bit AdamW (needs bitsandbytes; CPU or CUDA; moments in 8 bits)."
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_weight_decay: float = Field(1e-2, ge=0, le=10, description="AdamW decoupled weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0, le=1, description="AdamW epsilon.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant_with_warmup", description="Learning-rate schedule after warmup."
    )
    lr_warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Optimizer steps of linear warmup from 0.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the gradient norm to this value (0 disables).")
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=65536, description="Micro-batches summed before each optimizer step."
    )
    max_train_steps: Optional[int] = Field(
        1000, ge=1, le=MAX_STEPS, description="Optimizer steps to train. Empty (or left out while num_train_epochs "
        "is set) means use num_train_epochs; set both and max_train_steps wins."
    )
    num_train_epochs: Optional[int] = Field(
        None, ge=1, le=1_000_000, description="Epochs to train when max_train_steps is empty or left out."
    )
    seed: int = Field(
        42, ge=0, le=MAX_SEED, description="Seed for noise, sigmas, caption dropout and data order."
    )
    mixed_precision: Literal["bf16", "no"] = Field(
        "bf16", description="bf16 autocast on CUDA (`no`: full fp32). CPU always runs fp32."
    )

    # --- memory ----------------------------------------------------------------------------------
    max_gpu_memory_gib: Optional[float] = Field(
        None, gt=0, le=4096, allow_inf_nan=False,
        description="Most GPU memory (GiB) the run may use: the automatic memory plan fits within it and "
        "the run enforces it (PyTorch's per-process memory fraction), so a large card can stand in for a "
        "24, 48 or 80 GB one. Empty: the whole card. The memory keys below that you leave unset are chosen "
        "by the plan (the fastest predicted setting that fits); a key you set always wins.",
    )
    gradient_checkpointing: bool = Field(
        True, description="Recompute each DiT block in backward instead of storing its activations."
    )
    gradient_checkpointing_mode: Literal["full", "keep_attention", "offload_inputs"] = Field(
        "full",
        description="`full`: recompute whole blocks. `keep_attention`: keep the self-attention outputs and "
        "recompute the rest (saves one attention forward per block in backward, ~0.3 GB more per block at "
        "480x832x93). `offload_inputs`: keep each block's input in pinned host memory until backward (the "
        "lowest GPU memory; CUDA).",
    )
    gradient_checkpointing_keep_attention_blocks: Optional[int] = Field(
        None, ge=0, le=1024, description="With `keep_attention`: how many blocks (from the first) keep attention; empty: all."
    )
    gradient_checkpointing_uncheckpointed_blocks: int = Field(
        0, ge=0, le=1024,
        description="With gradient checkpointing: the first N blocks are not checkpointed (they store their "
        "activations, ~10 GiB per block at 480x832x93, and skip the recompute in backward). Left unset on "
        "CUDA, the memory plan picks N from the room the card has.",
    )
    compile_blocks: bool = Field(
        False, description="torch.compile each DiT block (fuses the fp32 modulation/norm/RoPE chains; CUDA; "
        "the first step pays the compile time)."
    )
    compile_scope: Literal["block", "checkpointed_block"] = Field(
        "block", description="With compile_blocks: `block` compiles the block inside its checkpoint; "
        "`checkpointed_block` compiles the checkpointed block as a whole (keep_attention only; on an H200 "
        "1.2% faster at 480x832x93, with ~2.7 GiB more allocated and ~10 GiB more reserved).",
    )
    musubi_blocks_to_swap: int = Field(
        0, ge=0, le=1024, description="Keep the last N DiT blocks on musubi_block_swap_device and stream them in."
    )
    musubi_block_swap_device: Literal["cpu"] = Field(
        "cpu", description="Where swapped blocks live: pinned host memory (`cpu`, the only choice; the key is the guide's)."
    )
    distributed_strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Under torchrun: `ddp` keeps the whole DiT on every GPU and averages gradients; "
        "`fsdp` (FSDP2) shards the weights, gradients and optimizer states of each block over the GPUs, "
        "so a full fine-tune (or a LoRA on cards smaller than the model) fits. Ignored on one process.",
    )
    sequence_parallel_size: int = Field(
        1, ge=1, le=1024, description="Under torchrun: how many GPUs share each clip (Ulysses sequence parallelism: "
        "each holds a band of token rows, self-attention exchanges heads). Must divide the number of processes and "
        "the DiT's attention heads (32); the remaining factor is the data-parallel size. 1 turns it off.",
    )
    enable_group_offload: bool = Field(
        False,
        description="Group offloading (diffusers) is not available for training: it moves trainable adapters "
        "between devices. true stops with a pointer to musubi_blocks_to_swap, which streams the same "
        "frozen weights while adapters stay resident.",
    )

    # --- validation ------------------------------------------------------------------------------
    validation_step_interval: Optional[int] = Field(
        100, ge=1, le=MAX_STEPS, description="Run validation every N optimizer steps (and at the end). Empty: only at the end."
    )
    validation_using_datasets: bool = Field(
        True, description="Take validation start frames and captions from the eval split."
    )
    eval_dataset_id: Optional[str] = Field(
        "longcat-video-val",
        description="`id` of the eval split in multidatabackend.json (never trained on).",
    )
    validation_resolution: str = sampling_field(
        "resolution", "480x832",
        "`HEIGHTxWIDTH` (480x832 is 480 high, 832 wide) or a class (`480p`, `720p`) that follows the start "
        "frame's aspect (the training bucket of that class for the image).",
    )
    validation_num_video_frames: int = sampling_field(
        "frames", 93, "Frames per validation video; (frames - 1) must be divisible by 4."
    )
    validation_num_inference_steps: int = sampling_field("steps", 40, "Sampling steps per validation video.")
    validation_guidance: float = sampling_field("guidance", 4.0)
    validation_prompt: Optional[str] = Field(
        None, max_length=MAX_CONFIG_PROMPT_CHARS,
        description="Prompt used when validation_using_datasets is false (text-to-video samples).",
    )
    validation_negative_prompt: str = sampling_field("negative_prompt", "")
    validation_seed: int = sampling_field("seed", 42, "Seed for validation noise (same every validation).")
    validation_max_samples: int = Field(4, ge=1, le=10_000, description="At most this many eval items per validation.")
    validation_loss_sigmas: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75, 0.9],
        description="Fixed sigmas (after shift) at which the held-out flow-matching loss is measured.",
    )

    # --- checkpoints and logging -----------------------------------------------------------------
    output_dir: Path = Field(
        ..., description="Run folder: checkpoints, validation videos, final LoRA and events.jsonl."
    )
    checkpoint_step_interval: Optional[int] = Field(
        500, ge=1, le=MAX_STEPS, description="Save a resumable checkpoint every N optimizer steps. Empty: only on exit."
    )
    checkpoints_total_limit: Optional[int] = Field(
        3, ge=1, description="Keep at most this many checkpoints (oldest removed first). Empty: keep all."
    )
    resume_from_checkpoint: Optional[str] = Field(
        None, description="`latest` (newest complete checkpoint in output_dir) or a checkpoint folder."
    )
    overwrite_output_dir: bool = Field(
        False, description="Start from step 0 in an output_dir that holds an earlier run's checkpoints or final "
        "files; the earlier run is first moved, untouched, into a superseded-run-<date>-<time> folder there "
        "(false: such a run is refused, naming resume_from_checkpoint and a fresh folder).",
    )
    report_to: Literal["none", "tensorboard"] = Field(
        "none", description="Also log to TensorBoard (needs the tensorboard package)."
    )

    # --- validators ------------------------------------------------------------------------------
    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # JSON `true` would otherwise pass as 1 for every int key (`max_train_steps: true` ran 1 step).
        return refuse_bool_number(cls, info.field_name, value)

    @field_validator(*PATH_FIELDS, mode="before")
    @classmethod
    def _path_is_a_string(cls, value: Any) -> Any:
        # `"output_dir": true` (or 5, or a list) would otherwise become a folder named `True`.
        return refuse_non_path(value)

    @field_validator("pretrained_model_name_or_path", "data_backend_config", "output_dir", mode="before")
    @classmethod
    def _path_not_blank(cls, value: Any) -> Any:
        # "" would resolve to the config file's own folder (output_dir: the run would write there).
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty; give a folder or file path")
        return value

    @field_validator("init_lora", "resume_from_checkpoint", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value  # as the web UI's empty field

    @field_validator("aspect_bucket_alignment")
    @classmethod
    def _alignment_multiple_of_16(cls, value: int) -> int:
        if value % 16:
            raise ValueError(f"{value} is not a multiple of 16 (VAE 8 x patch 2); use 64")
        return value

    @field_validator("lora_targets")
    @classmethod
    def _targets_non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("empty list; leave the key out to adapt every linear layer of every block")
        unknown = unknown_targets(value)
        if unknown:
            raise ValueError(
                f"{unknown} match no linear layer of the LongCat DiT; valid: {', '.join(BLOCK_LINEARS)} (each block), "
                f"{', '.join(TOP_LINEARS)}, or one block's layer such as blocks.7.attn.qkv"
            )
        return value

    @field_validator("validation_loss_sigmas")
    @classmethod
    def _sigmas_in_range(cls, value: list[float]) -> list[float]:
        if not value:  # the held-out loss is their mean: every validation failed with a ZeroDivisionError
            raise ValueError("empty list; give at least one sigma, or leave the key out for [0.25, 0.5, 0.75, 0.9]")
        bad = [s for s in value if not 0.0 < s <= 1.0]
        if bad:
            raise ValueError(f"sigmas {bad} are outside (0, 1]")
        return value

    @model_validator(mode="before")
    @classmethod
    def _epochs_without_steps(cls, data: Any) -> Any:
        # `num_train_epochs: 3` with max_train_steps left out used to train max_train_steps' default (1000 steps)
        # and ignore the epochs; a max_train_steps that is written (a number, or null) still decides as before.
        if isinstance(data, dict) and data.get("num_train_epochs") is not None and "max_train_steps" not in data:
            data = {**data, "max_train_steps": None}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        top = OPTIMIZER_MAX_LEARNING_RATE.get(self.optimizer)
        if top is not None and self.learning_rate > top:
            raise ValueError(
                f"learning_rate {self.learning_rate:g} is above {top:g}, the most that makes sense for optimizer "
                f"'{self.optimizer}' (valid: 0 < learning_rate <= {top:g}; typical 1e-5 to 1e-3); lower it"
            )
        if self.max_train_steps is None and self.num_train_epochs is None:
            raise ValueError("set max_train_steps or num_train_epochs")
        if self.compile_scope == "checkpointed_block" and not (
            self.compile_blocks and self.gradient_checkpointing and self.gradient_checkpointing_mode == "keep_attention"
        ):
            raise ValueError(
                "compile_scope 'checkpointed_block' needs compile_blocks: true, gradient_checkpointing: true and "
                "gradient_checkpointing_mode: keep_attention; otherwise use compile_scope 'block'"
            )
        if self.distributed_strategy == "fsdp" and (
            self.musubi_blocks_to_swap or self.base_model_precision in ("int8-quanto", "fp8-torchao", "fp8-compute")
        ):
            raise ValueError(
                "distributed_strategy 'fsdp' shards the weights over the GPUs; it does not combine with "
                "musubi_blocks_to_swap or 8-bit base_model_precision: set those to 0 / no_change, or use 'ddp'"
            )
        if self.init_lora and self.model_type != "lora":
            raise ValueError("init_lora starts LoRA adapters from a file; it needs model_type 'lora'")
        if self.validation_using_datasets and not self.eval_dataset_id:
            raise ValueError(
                "validation_using_datasets is true but eval_dataset_id is empty: name the eval split's id"
            )
        if not self.validation_using_datasets and self.validation_prompt \
                and not isinstance(parse_resolution(self.validation_resolution), tuple):
            # A class such as 480p is sized from each start frame's aspect; a prompt has none (`train` stopped
            # here after loading the model, where `check` had said yes).
            raise ValueError(
                "text-to-video validation (validation_using_datasets: false, validation_prompt set) needs "
                f"validation_resolution as HEIGHTxWIDTH (e.g. 480x832), got '{self.validation_resolution}'"
            )
        return self

    # --- helpers ---------------------------------------------------------------------------------
    @property
    def effective_lora_alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config",
                  command_line: Iterable[str] = ()) -> "TrainConfig":
        """Validate a dict; problems become a `ConfigError` naming the key, the source and the fix. Keys in
        `command_line` came from flags: their problems name the flag, not the file."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object of settings, got {type(data).__name__}")
        known = list(cls.model_fields)
        unknown = [key for key in data if key not in cls.model_fields]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1)
                hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            raise ConfigError(
                f"{source}: unknown key(s) {', '.join(hints)}. Remove them or fix the spelling; "
                "`longcat-tuner train --help` lists every key."
            )
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(f"{source}: {format_validation_error(err, command_line=command_line)}") from None

    @classmethod
    def from_file(cls, path: str | Path, *, overrides: Optional[dict[str, Any]] = None) -> "TrainConfig":
        """Read config.json (comments allowed); relative paths resolve against the file's folder."""
        path = Path(path)
        if not path.exists():
            raise ConfigError(
                f"config file {path} does not exist; create it with "
                "`cp config/config.json.example config/config.json` and fill the paths"
            )
        data = read_json(path)
        if not isinstance(data, dict):
            hint = ""
            if isinstance(data, list):  # the dataset list given where config.json goes: the two files swapped
                hint = (" (this file is a JSON list, like multidatabackend.json: --config takes config.json, whose "
                        f"data_backend_config key names the datasets file, e.g. \"data_backend_config\": \"{path.name}\")")
            raise ConfigError(f"{path}: expected a JSON object of settings{hint}")
        data = resolve_paths(data, path.resolve().parent)
        # Command-line overrides are relative to the working directory, not to the file.
        data.update(resolve_paths(dict(overrides or {}), Path.cwd()))
        return cls.from_dict(data, source=str(path), command_line=overrides or ())


def resolve_paths(data: dict[str, Any], base: Path, keys: Iterable[str] = PATH_FIELDS) -> dict[str, Any]:
    """Make the path-valued keys of `data` (`keys`: config.json's by default) absolute, relative to `base`."""
    for key in keys:
        value = data.get(key)
        if value is None or (isinstance(value, str) and not value.strip()) or (key == "resume_from_checkpoint" and value == "latest"):
            continue  # (a blank path is refused or unset by the schema, not made the config's folder)
        if not isinstance(value, (str, os.PathLike)):
            continue  # `true`, 5, a list: refused by the schema (`refuse_non_path`), never made a folder name
        if path_text_problem(str(value)):
            continue  # an unset `$VAR` or a Windows path: left as written, for the schema to name the key
        candidate = Path(expand_path(str(value)))
        data[key] = str(candidate if candidate.is_absolute() else (base / candidate))
    return data


# `$VAR` and `${VAR}` as `os.path.expandvars` finds them (on POSIX); what it leaves behind names an unset variable.
_ENV_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")
_WINDOWS_DRIVE = re.compile(r"^([A-Za-z]):(?:[\\/]|$)")  # C:\Users, D:/data, C:


def expand_path(text: str) -> str:
    """A path key's text with `$VAR` / `${VAR}` and then `~` expanded; an unset variable is left as written
    (`path_text_problem` names it)."""
    return os.path.expanduser(os.path.expandvars(text))


def path_text_problem(text: str) -> Optional[str]:
    """Why a path key's text cannot be used as a path on this machine, or None: an environment variable that is not
    set (it would become a folder literally named `$HOME`), or, on POSIX, a Windows path (`C:\\Users\\me`,
    `D:/data`, `\\\\server\\share`), which would become an odd relative folder name. A backslash inside a
    POSIX name is fine."""
    if os.name == "posix":
        drive = _WINDOWS_DRIVE.match(text)
        if drive or text.startswith("\\\\"):
            if drive:
                rest = text[drive.end():].replace("\\", "/").strip("/")
                example = f"/mnt/{drive[1].lower()}" + (f"/{rest}" if rest else "")
                where = f"e.g. {example} under WSL"
            else:
                where = "e.g. the folder where the share is mounted, such as /mnt/share"
            return (f"this is a Windows path, which this {sys.platform} machine would take as a relative folder name; "
                    f"give the path as this machine sees it ({where})")
    unset = sorted({match[0] for match in _ENV_VARIABLE.finditer(os.path.expandvars(text))})
    if unset:
        names = ", ".join(unset)
        if len(unset) == 1:
            return f"environment variable {names} is not set; set it or write the path out"
        return f"environment variables {names} are not set; set them or write the path out"
    return None


MAX_SETTINGS_BYTES = 16 * 2**20  # config.json and multidatabackend.json are a few kB


def read_json(path: Path) -> Any:
    """Parse JSON, allowing `//` and `/* */` comments as in the guide's jsonc examples.

    UTF-8 with or without a byte-order mark (Windows Notepad writes one); a key given twice is an error (JSON
    would keep the last silently); other encodings, folders, empty and unreadable files are a `ConfigError`
    naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a JSON file; give the path of the .json file")
    if path.exists() and not path.is_file():  # reading a pipe waits forever, /dev/zero fills the memory
        raise ConfigError(f"{path} is not a regular file (a pipe or a device); give the path of the .json file")
    if path.is_file() and path.stat().st_size > MAX_SETTINGS_BYTES:  # a video given by mistake is not read whole
        raise ConfigError(f"{path} is {path.stat().st_size / 2**20:.0f} MiB, too large for a settings file (at most "
                          f"{MAX_SETTINGS_BYTES // 2**20} MiB); give the path of the .json file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); save the file as "
            "UTF-8 (e.g. in your editor's 'Save with encoding' menu)"
        ) from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err}); fix the path or its permissions") from None
    if not text.strip():
        raise ConfigError(f"{path} is empty; fill it with JSON (config/*.json.example show the layout)")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys(path))
    except (json.JSONDecodeError, RecursionError):
        pass
    stripped = _strip_json_comments(text)
    try:
        return json.loads(stripped, object_pairs_hook=_unique_keys(path))
    except json.JSONDecodeError as err:
        hint = ""
        if err.msg.startswith(("Expecting property name", "Expecting value")) and stripped[: err.pos].rstrip().endswith(","):
            hint = " (a trailing comma before '}' or ']'? JSON allows none: remove it)"
        raise ConfigError(f"{path}: not valid JSON at line {err.lineno} column {err.colno}: {err.msg}{hint}") from None
    except RecursionError:
        raise ConfigError(f"{path}: lists or objects nested too deeply to be a settings file; check its contents") from None


def _unique_keys(path: Path) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ConfigError(f"{path}: key '{key}' is given twice ({out[key]!r} and {value!r}); keep one")
            out[key] = value
        return out

    return build


def _strip_json_comments(text: str) -> str:
    # Walk the text so that "//" inside strings (URLs, paths) is kept.
    out, i, in_string = [], 0, False
    while i < len(text):
        char = text[i]
        if in_string:
            out.append(char)
            if char == "\\" and i + 1 < len(text):
                out.append(text[i + 1])
                i += 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
            out.append(char)
        elif text.startswith("//", i):
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = len(text) if end < 0 else end + 2
            continue
        else:
            out.append(char)
        i += 1
    return "".join(out)


def shown_input(value: Any, limit: int = 120) -> str:
    """`repr(value)` for an error message, its middle cut when long (a 20,000-character prompt is not echoed)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit // 2]}...{text[-(limit // 4):]} ({len(text)} characters)"


def plain_type_message(problem: dict[str, Any], message: str) -> str:
    """Pydantic's message for a wrong type, with the fix where it is plain: null given for a value, or one string
    given where a list goes (`"conditioning_data": "train-cond"` -> `["train-cond"]`)."""
    value = problem.get("input")
    if value is None and problem["type"] != "missing":
        what = "a path" if problem["type"].startswith("path") else "a value"
        return f"null is not allowed here; give {what}"
    if problem["type"] == "list_type" and isinstance(value, str):
        return f"{message}; write it as a list: [{json.dumps(value)}]"
    return message


def format_validation_error(err: ValidationError, model: type[BaseModel] = TrainConfig, *,
                            command_line: Iterable[str] = ()) -> str:
    """One line per problem: `key: message (got value)`, plus the valid range of a numeric key. A key in
    `command_line` was typed as a flag (it overrides the file): its line names `--key (command line)`."""
    lines = []
    flags = set(command_line)
    for problem in err.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "config"
        if problem["loc"] and problem["loc"][0] in flags:
            key = f"--{key} (command line)"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "missing":
            message = "required; add it to config.json"
            lines.append(f"{key}: {message}")
            continue
        if not problem["loc"]:  # a rule across keys: the message names them; the input is the whole file
            lines.append(f"{key}: {message}")
            continue
        line = f"{key}: {plain_type_message(problem, message)} (got {shown_input(problem.get('input'))})"
        valid = numeric_range(model, problem["loc"])
        if valid and "valid:" not in message:
            line += f"; valid: {valid}"
        lines.append(line)
    return "; ".join(lines)


# --- numbers: no bools, finite, bounded ------------------------------------------------------------
def _numeric_kind(annotation: Any) -> Optional[type]:
    """int or float for a (possibly optional, possibly list-of) number field; None otherwise."""
    annotation, _ = _unwrap_optional(annotation)
    if typing.get_origin(annotation) is list:
        (annotation,) = typing.get_args(annotation) or (None,)
    if annotation is bool:
        return None
    return annotation if annotation in (int, float) else None


def refuse_non_path(value: Any) -> Any:
    """A path key holds a string (or a Path, from Python): JSON `true`, a number or a list is refused, not turned
    into a folder named `True` / `5`. None passes (an unset optional path; a required one is refused as null)."""
    if value is None or isinstance(value, (str, os.PathLike)):
        if value is not None and "\x00" in str(value):  # JSON "\u0000": every file call failed with a ValueError
            raise ValueError("contains a NUL character (\\u0000), which no file path may hold; remove it")
        problem = None if value is None else path_text_problem(str(value))
        if problem:  # (`resolve_paths` leaves such a value as written)
            raise ValueError(problem)
        return value
    try:
        shown = json.dumps(value)
    except (TypeError, ValueError):
        shown = repr(value)
    raise ValueError(f"expected a path (a string), not {shown}")


def refuse_bool_number(model: type[BaseModel], name: Optional[str], value: Any) -> Any:
    """`true`/`false` given for a number key is a mistake (pydantic would read it as 1/0): refuse it."""
    field = model.model_fields.get(name or "")
    if field is None or _numeric_kind(field.annotation) is None:
        return value
    values = value if isinstance(value, list) else [value]
    if any(isinstance(item, bool) for item in values):
        kind = "a whole number" if _numeric_kind(field.annotation) is int else "a number"
        raise ValueError(f"expected {kind}, not {json.dumps(value)}")
    return value


def numeric_range(model: type[BaseModel], loc: tuple) -> Optional[str]:
    """`'1 <= lora_rank <= 1024 (whole number)'` for the number field at `loc` (nested models followed)."""
    field, name = None, None
    for part in loc:
        if not isinstance(part, str) or model is None or part not in model.model_fields:
            break
        field, name = model.model_fields[part], part
        inner, _ = _unwrap_optional(field.annotation)
        model = inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None
    if field is None:
        return None
    kind = _numeric_kind(field.annotation)
    if kind is None:
        return None
    low = high = ""
    for rule in field.metadata:
        for attr, template in (("gt", "{} < "), ("ge", "{} <= ")):
            if getattr(rule, attr, None) is not None:
                low = template.format(_number(getattr(rule, attr)))
        for attr, template in (("lt", " < {}"), ("le", " <= {}")):
            if getattr(rule, attr, None) is not None:
                high = template.format(_number(getattr(rule, attr)))
    if not (low or high):
        return None
    return f"{low}{name}{high} ({'whole number' if kind is int else 'finite number'})"


def _number(value: Any) -> str:
    if isinstance(value, int) and abs(value) >= 10**6:
        exponent = len(str(abs(value))) - 1
        if value == 10**exponent:
            return f"1e{exponent}"
        if value == 2**63 - 1:
            return "2**63-1"
    return f"{value:g}" if isinstance(value, float) else str(value)


# --- argparse generated from the schema -----------------------------------------------------------
def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _cli_value(text: str, kind: Any, optional: bool) -> Any:
    if optional and text.lower() in ("none", "null", ""):
        return None
    return kind(text) if kind in (int, float) else text


def _argument_type(kind: Any, optional: bool, check: Optional[Callable[[Any], Any]]) -> Callable[[str], Any]:
    """Text -> value of `kind` (None for `none`/`null`/empty when optional), then `check` (schema rules)."""

    def convert(text: str) -> Any:
        try:
            value = _cli_value(text, kind, optional)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole number' if kind is int else 'number'}") from None
        try:
            return value if check is None or value is None else check(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = kind.__name__ if isinstance(kind, type) else "value"
    return convert


def add_field_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    name: str,
    field: Any,
    *,
    flag: Optional[str] = None,
    default: Any = argparse.SUPPRESS,
    check: Optional[Callable[[Any], Any]] = None,
    description: Optional[str] = None,
    show_default: bool = True,
) -> None:
    """Add one schema field as a command-line flag: its type, choices and help (with its default) from the schema.

    `default=argparse.SUPPRESS` leaves the option out of the namespace unless typed (config overrides);
    `check` validates a typed value by the schema's rules (an argparse error otherwise); `show_default=False`
    leaves the schema's default out of the help, for a caller whose `description` says where the default comes from.
    """
    annotation, optional = _unwrap_optional(field.annotation)
    shown = "required" if field.is_required() else field.get_default(call_default_factory=True)
    help_text = (f"{description or field.description}" + (f" [default: {shown}]" if show_default else "")).replace("%", "%%")
    flag = flag or f"--{name}"
    common = {"default": default, "help": help_text, "dest": name}
    if annotation is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
    elif typing.get_origin(annotation) is Literal:
        parser.add_argument(flag, choices=list(typing.get_args(annotation)), **common)
    elif typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if typing.get_origin(item) is Literal:  # a list of names (lora_export_formats)
            parser.add_argument(flag, nargs="+", choices=list(typing.get_args(item)), metavar=name.upper(), **common)
        else:
            parser.add_argument(flag, nargs="+", type=item, metavar=name.upper(), **common)
    elif annotation in (int, float, str):
        metavar = annotation.__name__.upper() if annotation is not str else "VALUE"
        parser.add_argument(flag, type=_argument_type(annotation, optional, check), metavar=metavar, **common)
    else:  # paths
        parser.add_argument(flag, type=str, metavar="VALUE", **common)


def add_config_arguments(
    parser: argparse.ArgumentParser, model: type[BaseModel] = TrainConfig, names: Optional[Iterable[str]] = None,
    *, title: str = "config keys (override config.json)", description: Optional[str] = None,
) -> argparse._ArgumentGroup:
    """Add `--<key>` for every schema field (or those in `names`); help text and defaults come from the schema.

    Defaults are suppressed in the namespace so that only options the user typed override the file.
    """
    group = parser.add_argument_group(title, description)
    for name in names or model.model_fields:
        add_field_argument(group, name, model.model_fields[name])
    return group


def config_overrides(args: argparse.Namespace, model: type[BaseModel] = TrainConfig) -> dict[str, Any]:
    """The schema keys the user typed on the command line."""
    return {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}
