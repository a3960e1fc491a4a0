"""The `multidatabackend.json` schema: the list of datasets a run trains and validates on.

The guide's keys (`id`, `type`, `dataset_type`, `is_i2v`, `instance_data_dir`, `caption_strategy`,
`resolution`, `cache_dir_vae`, `conditioning_data`) keep their meaning; SPEC section 4 adds `repeats`,
`video: {num_frames, min_frames, max_frames, fps}`, `crop` / `crop_style`, `disabled` and a text-embed
cache location (`cache_dir_text`). Every problem becomes a `ConfigError` naming the file, the dataset
id, the key and the fix. The guide's example (section 3) validates as is.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from longcat_tuner.config.resolution import parse_resolution
from longcat_tuner.config.sampling import MAX_FRAMES, MIN_I2V_FRAMES, causal_frame_count_error  # noqa: F401
from longcat_tuner.config.training import (
    expand_path, numeric_range, plain_type_message, refuse_bool_number, refuse_non_path, shown_input,
)
from longcat_tuner.errors import ConfigError
from longcat_tuner.fsutil import symlink_loop

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".mov", ".webm", ".mkv", ".m4v", ".avi")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# Bounds far above real use, so that a typo (`1e10`, `1e9`) is refused up front.
MAX_REPEATS = 10_000
MAX_FPS = 240.0


class VideoSettings(BaseModel):
    """How clips become training frames."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_frames: int = Field(
        93, ge=1, le=MAX_FRAMES, description="Frames per training clip at `fps`; (frames - 1) % 4 == 0 (93 -> 24 latents)."
    )
    min_frames: Optional[int] = Field(
        None,
        ge=1,
        le=MAX_FRAMES,
        description="Clips with fewer frames (at `fps`) than num_frames but at least this many are kept, "
        "shortened to the largest 1+4k count (a separate bucket). Empty: clips shorter than num_frames "
        "are skipped.",
    )
    max_frames: Optional[int] = Field(
        None, ge=1, le=100 * MAX_FRAMES, description="Only the first max_frames frames (at `fps`) of each clip are considered."
    )
    fps: float = Field(
        15.0,
        ge=1.0,
        le=MAX_FPS,
        description="Frames are picked by timestamp at this rate (the base model's 15 fps); "
        "a 30 fps source gives every second frame.",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_bool_number(cls, info.field_name, value)

    @field_validator("num_frames")
    @classmethod
    def _causal(cls, value: int) -> int:
        problem = causal_frame_count_error(value)
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "VideoSettings":
        if self.min_frames is not None and self.min_frames > self.num_frames:
            raise ValueError(f"min_frames {self.min_frames} > num_frames {self.num_frames}; lower min_frames")
        if self.max_frames is not None and self.max_frames < (self.min_frames or self.num_frames):
            raise ValueError(
                f"max_frames {self.max_frames} is below the frames a clip needs "
                f"({self.min_frames or self.num_frames}); raise max_frames or lower num_frames/min_frames"
            )
        return self


class DatasetConfig(BaseModel):
    """One entry of multidatabackend.json."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    id: str = Field(..., min_length=1, description="Unique name; other datasets and eval_dataset_id refer to it.")
    type: Literal["local"] = Field("local", description="Storage backend; only local folders are supported.")
    dataset_type: Literal["video", "image", "conditioning"] = Field(
        ...,
        description="`video`: clips to train on; `image`: still images (1-frame samples); "
        "`conditioning`: start frames paired with the clips of a video dataset.",
    )
    is_i2v: bool = Field(
        False,
        description="Image-to-video: each clip is paired with its start frame from `conditioning_data`.",
    )
    instance_data_dir: Path = Field(..., description="Folder scanned recursively for media.")
    caption_strategy: Optional[Literal["textfile", "filename", "instanceprompt"]] = Field(
        "textfile",
        description="`textfile`: sidecar .txt with the same stem; `filename`: the file stem "
        "(underscores become spaces); `instanceprompt`: `instance_prompt` for every item; "
        "null: no captions (conditioning sets).",
    )
    instance_prompt: Optional[str] = Field(None, description="Caption for every item with `instanceprompt`.")
    resolution: Union[int, str] = Field(
        480,
        description="Pixel-area target as the guide means it: 480 -> 480p buckets (480x832 for 16:9, 608x640 for "
        "square; a multiple of 16); or a fixed `HEIGHTxWIDTH` such as `480x832`.",
    )
    crop: bool = Field(
        True,
        description="Scale to cover the bucket and crop the overflow (true), or stretch to it (false).",
    )
    crop_style: Literal["center", "random"] = Field(
        "center",
        description="Where the crop sits; `random` is drawn once per item from the seed (cached, stable).",
    )
    cache_dir_vae: Path = Field(..., description="Folder of this dataset's VAE posterior cache (one file per item).")
    cache_dir_text: Optional[Path] = Field(
        None,
        description="Folder of the text-embedding cache. Empty: `text` next to cache_dir_vae "
        "(e.g. /cache/vae/longcat/text for /cache/vae/longcat/video).",
    )
    conditioning_data: list[str] = Field(
        default_factory=list, description="Ids of the conditioning datasets holding this dataset's start frames."
    )
    repeats: int = Field(
        0, ge=0, le=MAX_REPEATS, description="Extra passes over this dataset per epoch (0: each item once)."
    )
    video: VideoSettings = Field(default_factory=VideoSettings, description="Frame count and rate of clips.")
    disabled: bool = Field(False, description="Skip this dataset entirely.")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_bool_number(cls, info.field_name, value)

    @field_validator("instance_data_dir", "cache_dir_vae", "cache_dir_text", mode="before")
    @classmethod
    def _path_is_a_string(cls, value: Any) -> Any:
        return refuse_non_path(value)  # `true`, 5, a list: "expected a path (a string)", not pydantic's wording

    @field_validator("instance_data_dir", "cache_dir_vae", mode="before")
    @classmethod
    def _path_not_blank(cls, value: Any) -> Any:
        # "" would resolve to the folder of multidatabackend.json (cache entries written among the config files).
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty; give a folder path")
        return value

    @field_validator("cache_dir_text", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value  # the default, as the web UI says

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, value: Union[int, str]) -> Union[int, str]:
        parse_resolution(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "DatasetConfig":
        if self.is_i2v and not self.conditioning_data:
            raise ValueError(
                "is_i2v is true but conditioning_data is empty: add the id of the start-frame dataset, "
                'e.g. "conditioning_data": ["longcat-video-cond"]'
            )
        if self.is_i2v and self.dataset_type != "video":
            raise ValueError(f"is_i2v needs dataset_type 'video' (got '{self.dataset_type}')")
        shortest = self.video.min_frames or self.video.num_frames
        if self.is_i2v and shortest < MIN_I2V_FRAMES:
            # The start frame takes latent frame 0; 1-4 frames are one latent, leaving no frame to denoise.
            key = "video.min_frames" if self.video.min_frames else "video.num_frames"
            raise ValueError(
                f"is_i2v needs clips of at least {MIN_I2V_FRAMES} frames (2 latents: the start frame and one to learn), "
                f"got {key} {shortest}; set {key} to {MIN_I2V_FRAMES} or more, or train 1-frame samples without is_i2v"
            )
        if self.dataset_type == "conditioning" and self.conditioning_data:
            raise ValueError("a conditioning dataset cannot itself have conditioning_data; remove the key")
        if self.caption_strategy == "instanceprompt" and not self.instance_prompt:
            raise ValueError("caption_strategy 'instanceprompt' needs instance_prompt; add it")
        return self

    @property
    def text_cache_dir(self) -> Path:
        return self.cache_dir_text if self.cache_dir_text is not None else self.cache_dir_vae.parent / "text"


class DatasetList(BaseModel):
    """All datasets of multidatabackend.json, checked against each other."""

    datasets: list[DatasetConfig]
    source: str = "multidatabackend.json"

    def output_dir_problem(self, output_dir: Path) -> Optional[str]:
        """Why a run may not write into `output_dir`: it is, or lies inside, a dataset's media folder, where the
        validation videos it writes would be scanned as that dataset's clips (and trained on). None if it may."""
        if symlink_loop(output_dir):
            return None  # a loop is named by the output_dir checks (`fsutil.folder_problem`, the run lock)
        out = Path(output_dir).expanduser().resolve()
        for dataset in self.datasets:
            media = Path(dataset.instance_data_dir).expanduser().resolve()
            if out == media or media in out.parents:
                return (f"output_dir {output_dir} is inside the media folder (instance_data_dir) {media} of dataset "
                        f"'{dataset.id}' in {self.source}: the run's validation videos would be scanned as its files; "
                        "choose an output_dir outside the dataset folders")
        return None

    def by_id(self, dataset_id: str) -> DatasetConfig:
        for dataset in self.datasets:
            if dataset.id == dataset_id:
                return dataset
        raise ConfigError(
            f"{self.source}: no dataset with id '{dataset_id}'; known ids: {[d.id for d in self.datasets]}"
        )

    @property
    def enabled(self) -> list[DatasetConfig]:
        return [d for d in self.datasets if not d.disabled]

    def clip_datasets(self) -> list[DatasetConfig]:
        """Enabled datasets that yield samples (video and image); conditioning sets only pair."""
        return [d for d in self.enabled if d.dataset_type != "conditioning"]

    def split(self, eval_dataset_id: Optional[str]) -> tuple[list[DatasetConfig], Optional[DatasetConfig]]:
        """(training datasets, eval dataset). The eval split is never trained on."""
        eval_dataset = None
        if eval_dataset_id:
            if eval_dataset_id not in {d.id for d in self.datasets}:
                raise ConfigError(
                    f"eval split missing: eval_dataset_id '{eval_dataset_id}' (config.json) is not a dataset id in "
                    f"{self.source} (ids: {[d.id for d in self.datasets]}); add the eval split (same paired structure "
                    "as the training set), set eval_dataset_id to one of the ids, or train without an eval split: "
                    "eval_dataset_id: null and validation_using_datasets: false in config.json"
                )
            eval_dataset = self.by_id(eval_dataset_id)
            if eval_dataset.disabled:
                raise ConfigError(
                    f"{self.source}: eval_dataset_id '{eval_dataset_id}' names a disabled dataset; "
                    "set its `disabled` to false or pick another eval split"
                )
            if eval_dataset.dataset_type == "conditioning":
                raise ConfigError(
                    f"{self.source}: eval_dataset_id '{eval_dataset_id}' is a conditioning dataset; point it "
                    "at the eval split's clip dataset (is_i2v with its own conditioning_data)"
                )
        train = [d for d in self.clip_datasets() if eval_dataset is None or d.id != eval_dataset.id]
        if eval_dataset is not None:
            for dataset in train:
                overlap = folders_overlap(eval_dataset.instance_data_dir, dataset.instance_data_dir)
                if overlap:
                    raise ConfigError(
                        f"{self.source}: eval split '{eval_dataset.id}' and training dataset '{dataset.id}' {overlap}, "
                        "so the held-out loss would be measured on training data; give the eval split its own folder "
                        "of clips that are not trained on"
                    )
        if not train:
            raise ConfigError(
                f"{self.source}: no enabled video or image dataset left to train on "
                f"(eval split: {eval_dataset_id!r}); add one"
            )
        return train, eval_dataset


def folders_overlap(a: Path, b: Path) -> Optional[str]:
    """How folders `a` and `b` overlap after resolving links (same folder, one inside the other), or None."""
    real_a, real_b = Path(a).expanduser().resolve(), Path(b).expanduser().resolve()
    if real_a == real_b:
        return f"use the same folder {real_a}"
    if real_b in real_a.parents:
        return f"overlap: {real_a} is inside {real_b}"
    if real_a in real_b.parents:
        return f"overlap: {real_b} is inside {real_a}"
    return None


def _check_cross_references(datasets: list[DatasetConfig], source: str) -> None:
    seen: set[str] = set()
    for dataset in datasets:
        if dataset.id in seen:
            raise ConfigError(f"{source}: dataset id '{dataset.id}' appears twice; ids must be unique")
        seen.add(dataset.id)
    by_id = {d.id: d for d in datasets}
    for dataset in datasets:
        for cond_id in dataset.conditioning_data:
            target = by_id.get(cond_id)
            if target is None:
                raise ConfigError(
                    f"{source}: dataset '{dataset.id}' key 'conditioning_data' names '{cond_id}', which is not "
                    f"a dataset id; known ids: {sorted(by_id)}"
                )
            if target.dataset_type != "conditioning":
                raise ConfigError(
                    f"{source}: dataset '{dataset.id}' key 'conditioning_data' names '{cond_id}', whose "
                    f"dataset_type is '{target.dataset_type}'; set it to 'conditioning'"
                )
            if target.disabled and not dataset.disabled:
                raise ConfigError(
                    f"{source}: dataset '{dataset.id}' uses conditioning dataset '{cond_id}', which is "
                    "disabled; enable it or disable both"
                )
        if len(dataset.conditioning_data) > 1:
            raise ConfigError(
                f"{source}: dataset '{dataset.id}' key 'conditioning_data' lists {len(dataset.conditioning_data)} "
                "datasets; one start-frame dataset per clip dataset is supported"
            )
    vae_dirs: dict[Path, str] = {}
    for dataset in datasets:
        key = Path(dataset.cache_dir_vae).expanduser().resolve()
        if key in vae_dirs:
            raise ConfigError(
                f"{source}: datasets '{vae_dirs[key]}' and '{dataset.id}' share cache_dir_vae {dataset.cache_dir_vae}; "
                "give each its own folder (clips and start frames use separate VAE caches)"
            )
        vae_dirs[key] = dataset.id
    media_dirs = {Path(d.instance_data_dir).expanduser().resolve(): d.id for d in datasets}
    for dataset in datasets:
        for name, folder in (("cache_dir_vae", dataset.cache_dir_vae), ("cache_dir_text", dataset.text_cache_dir)):
            if name == "cache_dir_text" and dataset.dataset_type == "conditioning":
                continue  # start frames have no captions: never written
            owner = media_dirs.get(Path(folder).expanduser().resolve())
            if owner is not None:
                raise ConfigError(
                    f"{source}: dataset '{dataset.id}' key '{name}' is {folder}, the media folder (instance_data_dir) "
                    f"of dataset '{owner}'; cache files and manifest.json would be written among your files: give "
                    "the cache its own folder (e.g. /cache/vae/<dataset id>)"
                )


_UNION_MEMBERS = ("int", "str")


def _format_dataset_error(err: ValidationError, dataset_id: str, index: int, source: str) -> str:
    lines, seen_unions = [], set()
    for problem in err.errors():
        loc = tuple(problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        if len(loc) > 1 and loc[-1] in _UNION_MEMBERS:  # `resolution: int | str`: one line, not one per member
            if loc[:-1] in seen_unions:
                continue
            seen_unions.add(loc[:-1])
            loc, message = loc[:-1], "should be a whole number (480) or a string (\"480x832\")"
        key = ".".join(str(part) for part in loc) or "entry"
        if not loc:  # a rule across keys: its message names them; the whole entry is not worth echoing
            lines.append(message)
        elif problem["type"] == "missing":
            lines.append(f"key '{key}' is required; add it")
        elif problem["type"] == "extra_forbidden":
            known = list(DatasetConfig.model_fields) + [f"video.{k}" for k in VideoSettings.model_fields]
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else "; remove it"
            lines.append(f"unknown key '{key}'{hint}")
        else:
            valid = numeric_range(DatasetConfig, problem["loc"])
            lines.append(f"key '{key}': {plain_type_message(problem, message)} (got {shown_input(problem.get('input'))})"
                         + (f"; valid: {valid}" if valid else ""))
    return f"{source}: dataset '{dataset_id}' (entry {index}): " + "; ".join(lines)


def parse_datasets(data: Any, *, source: str = "multidatabackend.json", base_dir: Optional[Path] = None) -> DatasetList:
    """Validate the parsed JSON list. Relative paths resolve against `base_dir` (the file's folder)."""
    if not isinstance(data, list):
        hint = ""
        if isinstance(data, dict) and "data_backend_config" in data:  # config.json given where the datasets go
            hint = (" (this is a training config, like config.json; data_backend_config / --data_backend_config takes the "
                    f"dataset list, multidatabackend.json, and --config takes config.json)")
        raise ConfigError(f"{source}: expected a JSON list of datasets ([{{...}}, ...]), got {type(data).__name__}{hint}")
    datasets, errors = [], []  # every entry's problems at once, one line each (not only the first entry's)
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            errors.append(f"{source}: entry {index} is a {type(entry).__name__}, expected an object")
            continue
        dataset_id = str(entry.get("id", f"#{index}"))
        try:
            dataset = DatasetConfig.model_validate(entry)
        except ValidationError as err:
            errors.append(_format_dataset_error(err, dataset_id, index, source))
            continue
        if base_dir is not None:
            updates = {}
            for key in ("instance_data_dir", "cache_dir_vae", "cache_dir_text"):
                value = getattr(dataset, key)
                if value is not None:  # `$VAR`, `${VAR}` and `~` expanded (an unset one is refused above)
                    expanded = Path(expand_path(str(value)))
                    updates[key] = expanded if expanded.is_absolute() else base_dir / expanded
            dataset = dataset.model_copy(update=updates)
        for key in ("instance_data_dir", "cache_dir_vae", "cache_dir_text"):
            loop = getattr(dataset, key) is not None and symlink_loop(getattr(dataset, key))
            if loop:  # it would fail in `resolve` below and everywhere after, as a traceback
                errors.append(f"{source}: dataset '{dataset.id}' key '{key}' {getattr(dataset, key)} cannot be "
                              f"used: {loop}; point it at a real folder")
        datasets.append(dataset)
    if errors:
        raise ConfigError("\n".join(errors))
    if not datasets:
        raise ConfigError(f"{source}: the dataset list is empty; add a video dataset (see config/multidatabackend.json.example)")
    _check_cross_references(datasets, source)
    return DatasetList(datasets=datasets, source=source)


def load_datasets(path: str | Path) -> DatasetList:
    """Read and validate multidatabackend.json (`//` comments allowed)."""
    from longcat_tuner.config.training import read_json  # one JSON(C) reader for both config files

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"dataset config {path} is a folder; point data_backend_config at the multidatabackend.json file")
    if not path.is_file():
        raise ConfigError(
            f"dataset config {path} does not exist; create it with "
            "`cp config/multidatabackend.json.example config/multidatabackend.json` and set the folders"
        )
    return parse_datasets(read_json(path), source=str(path), base_dir=path.resolve().parent)
