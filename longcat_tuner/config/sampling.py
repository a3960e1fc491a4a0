"""The sampling section of the schema: how one video is sampled, declared once.

`SamplingOptions` holds each sampling option with its default, bounds and description. From it come
`longcat-tuner sample`'s flags (`add_sampling_arguments`), `plan`'s `--resolution` / `--frames`, the web
preview's defaults (its request body and its form, through `/api/schema`), and the validation keys of
config.json (`validation_num_inference_steps` is `sampling_field("steps", ...)`: the same bounds and rules,
the guide's own default). Torch-free.
"""
from __future__ import annotations

import argparse
from typing import Annotated, Any, Iterable, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from longcat_tuner.config.resolution import parse_resolution

# torch.manual_seed takes up to 2**64 - 1; per-rank seeds are derived modulo 2**63 (train/distributed.py),
# validation adds the item index: 2**63 - 1 leaves room for both.
MAX_SEED = 2**63 - 1
# Far above any real video (the causal VAE takes 1 + 4k frames), low enough that a typo is refused up front.
MAX_FRAMES = 4097


# A prompt in a config or flag: the text encoder reads 512 tokens (a few thousand characters) and cuts the rest, so
# this only keeps a pasted file (a 60 MB validation_prompt was accepted and written into config.json) out.
MAX_CONFIG_PROMPT_CHARS = 20_000

# Image-to-video keeps the start frame as latent frame 0 (4 pixel frames a latent after the first): 1-4 frames make
# only that latent and leave nothing to denoise. The dataset rule, `check`'s validation rule, `generate` and the
# frame-count hint below read it (`config.datasets` re-exports it).
MIN_I2V_FRAMES = 5


def causal_frame_count_error(frames: int) -> Optional[str]:
    """Why `frames` does not fit the causal VAE (1 + 4k frames), or None when it does."""
    if frames >= 1 and (frames - 1) % 4 == 0:
        return None
    lower = max(1, frames - (frames - 1) % 4)
    # 1 frame is a still for text-to-video only.
    i2v = f"; image-to-video needs {MIN_I2V_FRAMES} or more" if lower < MIN_I2V_FRAMES else ""
    return f"{frames} frames: (frames - 1) must be divisible by 4 (causal VAE); use {lower} or {lower + 4}{i2v}"


def _causal_frames(value: int) -> int:
    problem = causal_frame_count_error(value)
    if problem:
        raise ValueError(problem)
    return value


def _resolution(value: str) -> str:
    parse_resolution(value)
    return value


FrameCount = Annotated[int, AfterValidator(_causal_frames)]
ResolutionText = Annotated[str, AfterValidator(_resolution)]


class SamplingOptions(BaseModel):
    """One sampled video: size, length, schedule, guidance, seed."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    resolution: ResolutionText = Field(
        "480p",
        description="`HEIGHTxWIDTH` (480x832 is 480 high, 832 wide) or a class (`480p`, `720p`) that follows the "
        "start frame's aspect: the training bucket of that class for the image (480p: 480x832 for 16:9, 608x640 "
        "for a square image; without an image the 16:9 size).",
    )
    frames: FrameCount = Field(
        93, ge=1, le=MAX_FRAMES, description="Pixel frames per video; (frames - 1) must be divisible by 4 (93 is 6.2 s at 15 fps)."
    )
    steps: int = Field(50, ge=1, le=1000, description="Denoising steps (the official pipeline's default is 50).")
    guidance: float = Field(
        4.0, ge=1.0, le=50.0, description="Classifier-free guidance scale (CFG-Zero*); 3.5-5.0 is typical, 1 disables."
    )
    shift: float = Field(12.0, gt=0, le=100, description="Shift of the sampling sigmas (the official 12).")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed for the initial noise and the start frame's latent sample.")
    negative_prompt: str = Field("", max_length=MAX_CONFIG_PROMPT_CHARS,
                                 description="Negative prompt for guidance; empty is the official default.")
    fps: int = Field(15, ge=1, le=240, description="Frame rate written into the mp4 (the model's 15 fps).")
    distilled: bool = Field(
        False, description="16-step distilled schedule (use with the official cfg_step_lora and guidance 1)."
    )


SAMPLING_DEFAULTS = SamplingOptions()


def sampling_field(name: str, default: Any, description: Optional[str] = None) -> Any:
    """A config key that is the sampling option `name` (its type rules and bounds) with another default."""
    base = SamplingOptions.model_fields[name]
    return FieldInfo.merge_field_infos(base, default=default, description=description or base.description)


def check_sampling_value(name: str, value: Any) -> Any:
    """`value` validated as the sampling option `name`; `ValueError` with the schema's message otherwise."""
    try:
        return getattr(SamplingOptions.model_validate({name: value}), name)
    except ValidationError as err:
        from longcat_tuner.config.training import format_validation_error

        raise ValueError(format_validation_error(err, SamplingOptions).removeprefix(f"{name}: ")) from None


def add_sampling_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    names: Optional[Iterable[str]] = None,
    *,
    defaults: bool = True,
    helps: Optional[dict[str, str]] = None,
) -> None:
    """Add `--<name>` (underscores as dashes: `--negative-prompt`) for each sampling option in `names` (all by
    default). Types, bounds and help come from `SamplingOptions`; a value the schema refuses is an argparse
    error naming the rule. With `defaults=False` an option left out is None (the caller picks the default);
    `helps` replaces the description of some options (`plan` sizes a training clip, not a sampled video)."""
    from longcat_tuner.config.training import add_field_argument

    for name in names or SamplingOptions.model_fields:
        field = SamplingOptions.model_fields[name]
        add_field_argument(
            parser, name, field, flag="--" + name.replace("_", "-"),
            default=field.default if defaults else None,
            check=lambda value, name=name: check_sampling_value(name, value),
            description=(helps or {}).get(name),
            # a caller that picks the default itself (`plan`: the training datasets') says so in its own help
            show_default=defaults or name not in (helps or {}),
        )
