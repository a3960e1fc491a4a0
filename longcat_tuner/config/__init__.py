"""Typed schemas of the user's settings, each option declared once: `config.json` (training, with its data keys),
the sampling section (`sample`, the web preview, the validation keys), `multidatabackend.json` (datasets) and the
one resolution parser. Torch-free."""
from longcat_tuner.config.datasets import DatasetConfig, DatasetList, VideoSettings, load_datasets, parse_datasets
from longcat_tuner.config.resolution import parse_resolution
from longcat_tuner.config.sampling import SAMPLING_DEFAULTS, SamplingOptions, add_sampling_arguments
from longcat_tuner.config.training import (
    DATA_KEYS,
    DEFAULT_LORA_TARGETS,
    TrainConfig,
    add_config_arguments,
    config_overrides,
    read_json,
)

__all__ = [
    "DATA_KEYS",
    "DEFAULT_LORA_TARGETS",
    "DatasetConfig",
    "DatasetList",
    "SAMPLING_DEFAULTS",
    "SamplingOptions",
    "TrainConfig",
    "VideoSettings",
    "add_config_arguments",
    "add_sampling_arguments",
    "config_overrides",
    "load_datasets",
    "parse_datasets",
    "parse_resolution",
    "read_json",
]
