"""config.json and multidatabackend.json as the server reads, validates, checks and writes them.

Paths are made absolute with the trainer's own rule (`config.training.resolve_paths`): against the
server's working folder for what a client sends, against each file's folder for files on disk. Every
path the files imply, defaults included, must lie inside the allowed folders (`security.resolve_inside`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import threading
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, Field, ValidationError

from longcat_tuner.config.datasets import DatasetConfig, parse_datasets
from longcat_tuner.config.training import PATH_FIELDS, TrainConfig, plain_type_message, read_json, resolve_paths
from longcat_tuner.errors import ConfigError
from longcat_tuner.fsutil import atomic_file
from longcat_tuner.server import security
from longcat_tuner.server.security import GuardError
from longcat_tuner.server.settings import DATASET_PATH_FIELDS, DATASETS_NAME, ServerSettings


class ConfigBody(BaseModel):
    config: dict[str, Any]
    datasets: list[Any] = Field(default_factory=list)


def error_list(err: ValidationError, prefix: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Pydantic errors as `{loc, msg}` for the form (loc `[]` = the whole file)."""
    items = []
    for problem in err.errors():
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key; remove it or fix the spelling"
        elif problem["type"] == "missing":
            message = "required"
        else:  # the CLI's wording: `null is not allowed here; give a path`, a string where a list goes
            message = plain_type_message(problem, message)
        items.append({"loc": list(prefix) + [str(p) for p in problem["loc"]], "msg": message})
    return items


def client_paths(values: dict[str, Any], keys: tuple[str, ...], base: Path) -> dict[str, Any]:
    """A copy of `values` with its path keys absolute against `base`; a key a client sent empty (`""`)
    stays as sent, for the schema and the path checks to judge, instead of silently becoming `base`."""
    return resolve_paths(dict(values), base, [key for key in keys if values.get(key) != ""])


def dataset_paths(entry: Any, base: Path) -> Any:
    """A dataset entry with its path keys absolute against `base` (anything else is returned as is)."""
    return client_paths(entry, DATASET_PATH_FIELDS, base) if isinstance(entry, dict) else entry


def nonfinite_errors(value: Any, loc: list[str]) -> list[dict[str, Any]]:
    """`Infinity`/`NaN` anywhere in a body (Python's JSON reader accepts them; JSON itself has none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [{"loc": loc, "msg": f"must be a finite number (got {value}); JSON has no Infinity or NaN, write a number"}]
    if isinstance(value, dict):
        return [e for key, item in value.items() for e in nonfinite_errors(item, loc + [str(key)])]
    if isinstance(value, list):
        return [e for index, item in enumerate(value) for e in nonfinite_errors(item, loc + [str(index)])]
    return []


def implied_paths(config: dict[str, Any], datasets: list[Any]) -> list[tuple[list[str], str, str]]:
    """(loc, path, what) of every folder or file the trainer reads or writes for these (absolute) files,
    the defaults included: a dataset without `cache_dir_text` caches its text embeddings in
    `<cache_dir_vae>/../text` (`DatasetConfig.text_cache_dir`, the trainer's own rule)."""
    found = []
    for key in PATH_FIELDS:
        value = config.get(key)
        if value in (None, "") or (key == "resume_from_checkpoint" and value == "latest"):
            continue
        found.append((["config", key], str(value), key))
    for index, entry in enumerate(datasets):
        if not isinstance(entry, dict):
            continue
        for key in DATASET_PATH_FIELDS:
            if entry.get(key) not in (None, ""):
                found.append((["datasets", str(index), key], str(entry[key]), key))
        if entry.get("cache_dir_text") in (None, "") and entry.get("cache_dir_vae") not in (None, ""):
            try:
                default = DatasetConfig.model_validate(entry).text_cache_dir
            except ValidationError:
                continue  # reported as a validation error of the entry
            found.append((
                ["datasets", str(index), "cache_dir_text"], str(default),
                f"cache_dir_text (empty, so it defaults to <cache_dir_vae>/../text = {default}; set it to a folder "
                "inside the allowed folders)",
            ))  # fmt: skip
    return found


def path_errors(settings: ServerSettings, config: dict[str, Any], datasets: list[Any]) -> list[dict[str, Any]]:
    """An error for each implied path that resolves outside the allowed folders."""
    errors = []
    for loc, value, what in implied_paths(config, datasets):
        try:
            security.resolve_inside(value, settings.roots, what=what)
        except GuardError as err:
            errors.append({"loc": loc, "msg": str(err)})
    return errors


def validate_files(settings: ServerSettings, body: ConfigBody) -> tuple[dict[str, Any], list[Any], list[dict[str, Any]]]:
    """Normalize and validate both files; returns (config, datasets, errors)."""
    errors: list[dict[str, Any]] = []
    config = dict(body.config)
    config["data_backend_config"] = str(settings.datasets_path.resolve())
    config = client_paths(config, PATH_FIELDS, settings.cwd)
    try:
        TrainConfig.model_validate(config)
    except ValidationError as err:
        errors.extend(error_list(err, ("config",)))

    datasets: list[Any] = []
    for index, entry in enumerate(body.datasets):
        if not isinstance(entry, dict):
            errors.append({"loc": ["datasets", str(index)], "msg": "expected an object"})
            continue
        entry = dataset_paths(entry, settings.cwd)
        datasets.append(entry)
        try:
            DatasetConfig.model_validate(entry)
        except ValidationError as err:
            errors.extend(error_list(err, ("datasets", str(index))))
    # A safety net for values the schemas let through: Infinity / NaN anywhere (each key reported once).
    reported = {tuple(error["loc"]) for error in errors}
    for error in nonfinite_errors(body.config, ["config"]) + nonfinite_errors(body.datasets, ["datasets"]):
        if tuple(error["loc"]) not in reported:
            errors.append(error)
    # A key the schema refused (an unset `$VAR`, a Windows path) is named once, not also as a folder "outside".
    refused = {tuple(error["loc"]) for error in errors}
    errors.extend(error for error in path_errors(settings, config, datasets) if tuple(error["loc"]) not in refused)
    if not errors:
        try:  # cross-dataset rules (unique ids, conditioning references, separate caches)
            parse_datasets(datasets, source=DATASETS_NAME)
        except ConfigError as err:
            errors.append({"loc": ["datasets"], "msg": str(err)})
    return config, datasets, errors


def launch_files(
    settings: ServerSettings, config: dict[str, Any], datasets: Any, *, config_dir: Path, datasets_dir: Path
) -> tuple[dict[str, Any], list[Any]]:
    """The files a run or check is started with, paths made absolute as `train` reads them (against each
    file's folder) and every implied path checked again: the files may predate this server's folders
    or have been edited by hand. Raises 403 naming the key."""
    config = resolve_paths(dict(config), config_dir)
    if not isinstance(datasets, list):
        raise HTTPException(422, f"{DATASETS_NAME} is not a JSON list of datasets; save the Config page again")
    datasets = [dataset_paths(entry, datasets_dir) for entry in datasets]
    check = dict(config)
    check.pop("data_backend_config", None)  # the server's own file (or the run's snapshot of it)
    problems = path_errors(settings, check, datasets)
    if problems:
        first = problems[0]
        raise HTTPException(403, f"{'.'.join(first['loc'])}: {first['msg']}")
    return config, datasets


def write_json(path: Path, data: Any) -> None:
    """Write `path` atomically through a temporary of its own (`<name>.tmp<pid>-<random>`): concurrent writers
    never share a temporary file, so none renames another's half-written file or finds its own gone."""
    with atomic_file(path, suffix=f".tmp{os.getpid()}-{secrets.token_hex(4)}") as partial:
        partial.write_text(json.dumps(data, indent=2) + "\n")


try:
    import fcntl
except ImportError:  # not on Windows: the thread lock alone
    fcntl = None  # type: ignore[assignment]

CONFIG_LOCK_NAME = ".config.lock"


@contextlib.contextmanager
def config_files_lock(thread_lock: threading.Lock, folder: Path) -> Any:
    """Hold while the saved config pair (config.json + multidatabackend.json) is written or read as one unit:
    `thread_lock` for this server's worker threads, and a `fcntl.flock` on `<folder>/.config.lock` for another
    server process on the same data folder (where flock is available)."""
    with thread_lock:
        if fcntl is None:
            yield
            return
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / CONFIG_LOCK_NAME, "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def with_path(path: Any, err: Exception) -> str:
    """`err`'s message naming `path` once (the readers' own messages often begin with it: "X: X: not valid JSON")."""
    text = str(err)
    return text if str(path) in text else f"{path}: {text}"


def read_json_file(path: Path, default: Any) -> Any:
    """A JSON file read as the CLI reads it (`config.training.read_json`: UTF-8 with or without a byte-order mark,
    `//` comments, a repeated key refused); `default` when it does not exist. A file that exists but cannot be
    read (not UTF-8, broken JSON, empty, a folder) is a 422 naming the file and the problem, never `default`:
    the page would show an empty form and a save would overwrite the user's file."""
    try:
        if not path.exists() and not path.is_symlink():
            return default
        return read_json(path)
    except ConfigError as err:
        raise HTTPException(422, f"cannot read the saved file {with_path(path, err)} (fix or remove it)") from None
    except (OSError, ValueError) as err:  # a name too long, a NUL byte
        raise HTTPException(422, f"cannot read {path}: {err}") from None


def read_report(path: Path, default: Any) -> Any:
    """A JSON file a job writes (the check report): `default` when it is missing, empty or torn (a job that
    crashed before writing it)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default
