"""Typed schemas of the user's JSON files: `config.json` (training) and `multidatabackend.json` (datasets)."""
from longcat_tuner.config.datasets import DatasetConfig, DatasetList, VideoSettings, load_datasets, parse_datasets
from longcat_tuner.config.training import (
    DEFAULT_LORA_TARGETS,
    TrainConfig,
    add_config_arguments,
    config_overrides,
    parse_resolution,
    read_json,
)

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "DatasetConfig",
    "DatasetList",
    "TrainConfig",
    "VideoSettings",
    "add_config_arguments",
    "config_overrides",
    "load_datasets",
    "parse_datasets",
    "parse_resolution",
    "read_json",
]
