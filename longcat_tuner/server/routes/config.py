"""`/api/info`, `/api/schema` and `/api/config`: the form's schema and the saved config files."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse

from longcat_tuner.config.sampling import SamplingOptions
from longcat_tuner.config.datasets import DatasetConfig
from longcat_tuner.config.training import PATH_FIELDS, TrainConfig, read_json, resolve_paths
from longcat_tuner.errors import ConfigError
from longcat_tuner.runtime.settings import MEMORY_CONFIG_KEYS
from longcat_tuner.server import security
from longcat_tuner.server.configfiles import (
    ConfigBody, dataset_paths, read_json_file, validate_files, with_path, write_json,
)
from longcat_tuner.server.deps import StateDep
from longcat_tuner.server.settings import DATASET_PATH_FIELDS

router = APIRouter()


@router.get("/api/info")
async def info(state: StateDep) -> dict[str, Any]:
    settings = state.settings
    return {
        "data_dir": str(state.data_dir),
        "allowed_roots": [str(root) for root in settings.roots],
        "config_path": str(settings.config_path),
        "datasets_path": str(settings.datasets_path),
        "cwd": str(settings.cwd),
        "max_upload_bytes": settings.max_upload_bytes,
        "max_jobs": settings.max_jobs,
    }


@router.get("/api/schema")
async def schema() -> dict[str, Any]:
    return {
        "config": TrainConfig.model_json_schema(),
        "dataset": DatasetConfig.model_json_schema(),
        "sampling": SamplingOptions.model_json_schema(),  # the preview form's defaults
        "path_fields": {"config": list(PATH_FIELDS), "dataset": list(DATASET_PATH_FIELDS)},
        # Keys the memory plan chooses when a config leaves them out: the form writes them only when
        # the loaded config has them or the user changes them (a written key pins its setting).
        "planned_fields": list(MEMORY_CONFIG_KEYS),
    }


@router.get("/api/config")
def get_config(state: StateDep) -> dict[str, Any]:
    """The saved files; a file that exists but cannot be read (not UTF-8, broken JSON) is a 422 naming it
    and the problem, never an empty form (a save would then overwrite it)."""
    settings = state.settings
    with state.config_files():  # both files from one save
        config = read_json_file(settings.config_path, {})
        datasets = read_json_file(settings.datasets_path, [])
        saved = settings.config_path.is_file()
    if not isinstance(config, dict):
        raise HTTPException(422, f"cannot read the saved file {settings.config_path}: it is not a JSON object of "
                                 "settings (fix or remove it)")  # fmt: skip
    return {
        "config": config,
        "datasets": datasets,
        "saved": saved,
        "config_path": str(settings.config_path),
        "datasets_path": str(settings.datasets_path),
    }


@router.get("/api/config/import")
def import_config(path: str, state: StateDep) -> dict[str, Any]:
    """Read an existing config.json (and the multidatabackend.json it names) without saving.

    Relative paths inside the files resolve against their own folders, as `train` reads them.
    """
    roots = state.settings.roots
    file = security.resolve_inside(path, roots, what="config file")
    try:
        config = read_json(file) if file.is_file() else None
    except (ConfigError, OSError, UnicodeDecodeError) as err:
        raise HTTPException(422, with_path(file, err)) from None
    if not isinstance(config, dict):
        raise HTTPException(422, f"{file} is not a config.json (a JSON object of settings)")
    config = resolve_paths(config, file.parent)
    datasets: list[Any] = []
    if config.get("data_backend_config"):
        datasets_file = security.resolve_inside(config["data_backend_config"], roots, what="data_backend_config")
        try:
            loaded = read_json(datasets_file) if datasets_file.is_file() else []
        except (ConfigError, OSError, UnicodeDecodeError) as err:
            raise HTTPException(422, with_path(datasets_file, err)) from None
        datasets = [dataset_paths(entry, datasets_file.parent) for entry in (loaded if isinstance(loaded, list) else [])]
    return {"config": config, "datasets": datasets, "source": str(file)}


@router.post("/api/config/validate")
def validate_config(body: ConfigBody, state: StateDep) -> dict[str, Any]:
    _, _, errors = validate_files(state.settings, body)
    return {"valid": not errors, "errors": errors}


@router.put("/api/config")
def save_config(body: ConfigBody, state: StateDep) -> JSONResponse:
    settings = state.settings
    config, datasets, errors = validate_files(settings, body)
    if errors:
        return JSONResponse({"valid": False, "errors": errors}, status_code=422)
    with state.config_files():  # the pair as one unit: a concurrent save writes both before or after this one
        write_json(settings.datasets_path, datasets)
        write_json(settings.config_path, config)
    return JSONResponse({"valid": True, "config_path": str(settings.config_path), "datasets_path": str(settings.datasets_path)})
