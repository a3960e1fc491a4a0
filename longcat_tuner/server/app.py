"""The web UI's HTTP server: a thin FastAPI app over config files, CLI subprocesses and event files.

It never imports torch: it writes `config.json` / `multidatabackend.json`, starts `longcat-tuner
check | train | sample` as subprocesses (see `jobs.py`) and reads their output and the run's
`events.jsonl`. Every request passes `guard` (Host header, token, custom header on writes, see
`security.py`); every path a client names, or that a saved config implies (such as the default text
cache `<cache_dir_vae>/../text`), is resolved and kept inside the allowed folders.

Routes that touch files are plain `def` functions, which FastAPI runs in its worker threads, so a
slow disk, a large upload or a long events file never stalls the other requests; events files are
read incrementally (`jobs.EVENTS`).
"""
from __future__ import annotations

import asyncio
import io
import json
import math
import os
import re
import secrets
import threading
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from longcat_tuner.config.datasets import DatasetConfig, parse_datasets
from longcat_tuner.config.sampling import MAX_SEED, SAMPLING_DEFAULTS, SamplingOptions
from longcat_tuner.config.training import PATH_FIELDS, TrainConfig, parse_resolution, read_json, resolve_paths
from longcat_tuner.data.images import open_image
from longcat_tuner.errors import ConfigError, DataError
from longcat_tuner.runtime.settings import MEMORY_CONFIG_KEYS
from longcat_tuner.server import security
from longcat_tuner.server.jobs import (
    Job,
    JobStore,
    find_events_file,
    is_own_start,
    read_events,
    run_digest,
    same_folder,
    select_run_events,
    tail_lines,
)
from longcat_tuner.server.security import GuardError
from longcat_tuner.train import run_lock
from longcat_tuner.train.events import EVENT_KINDS

STATIC_DIR = Path(__file__).resolve().parent / "static"
CONFIG_NAME = "config.json"
DATASETS_NAME = "multidatabackend.json"
DATASET_PATH_FIELDS = ("instance_data_dir", "cache_dir_vae", "cache_dir_text")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MEDIA_TYPES = {".mp4": "video/mp4", ".webm": "video/webm", ".mov": "video/quicktime", ".m4v": "video/mp4"}
# Multipart framing (boundaries, part headers) an upload may add to the image itself.
MULTIPART_OVERHEAD = 64 * 1024
# Preview bounds: the sampler needs (frames - 1) % 4 == 0 and sides divisible by 16.
MAX_PREVIEW_FRAMES = 257
MAX_PREVIEW_SIDE = 2048
MAX_PREVIEW_PIXELS = 1280 * 1280  # 720x1280 (720p) fits
MAX_PROMPT_CHARS = 4000


@dataclass(frozen=True)
class ServerSettings:
    """Everything the app needs; built by `longcat-tuner server` from its flags."""

    token: str
    data_dir: Path
    allowed_roots: tuple[Path, ...] = ()
    host: str = "127.0.0.1"
    extra_hosts: tuple[str, ...] = ()
    max_upload_bytes: int = 20 * 1024 * 1024
    # Check and preview jobs that may run at once (a preview holds a GPU; each loads a model).
    max_jobs: int = 2
    cwd: Path = field(default_factory=Path.cwd)
    # How to call the CLI; default `python -m longcat_tuner.cli` with this interpreter (tests swap it).
    cli: tuple[str, ...] = ()

    @property
    def roots(self) -> tuple[Path, ...]:
        """Folders a client may name: the data folder plus `--allow-dir` folders."""
        return (self.data_dir.resolve(),) + tuple(root.resolve() for root in self.allowed_roots)

    @property
    def config_path(self) -> Path:
        return self.data_dir / "config" / CONFIG_NAME

    @property
    def datasets_path(self) -> Path:
        return self.data_dir / "config" / DATASETS_NAME


# --- request bodies --------------------------------------------------------------------------------
class ConfigBody(BaseModel):
    config: dict[str, Any]
    datasets: list[Any] = Field(default_factory=list)


class RunBody(BaseModel):
    resume_from: Optional[str] = Field(None, description="Run id whose config and output_dir to resume.")


class PreviewBody(BaseModel):
    upload: str = Field(..., description="Id of an uploaded start frame (POST /api/uploads).")
    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    model: Optional[str] = Field(None, description="Checkpoint root; default: the saved config's model.")
    lora: Optional[str] = Field(None, description="A LoRA file from GET /api/loras; empty: the base model.")
    # Defaults: the schema's sampling section (`sample` has the same; the page reads them from /api/schema).
    frames: int = Field(SAMPLING_DEFAULTS.frames, ge=1, le=MAX_PREVIEW_FRAMES, strict=True, description="(frames - 1) % 4 == 0, e.g. 93.")
    steps: int = Field(SAMPLING_DEFAULTS.steps, ge=1, le=200, strict=True)
    guidance: float = Field(SAMPLING_DEFAULTS.guidance, ge=1.0, le=20.0, allow_inf_nan=False)
    resolution: str = Field(SAMPLING_DEFAULTS.resolution, max_length=32, description="HEIGHTxWIDTH, or 480p / 720p following the image's aspect.")
    seed: int = Field(SAMPLING_DEFAULTS.seed, ge=0, le=MAX_SEED, strict=True, description=f"A whole number from 0 to {MAX_SEED}.")
    fast: bool = Field(
        False,
        description="16-step distilled preview (guidance 1) with the checkpoint's official lora/cfg_step_lora.safetensors; "
        "steps and guidance are then ignored.",
    )

    @field_validator("prompt")
    @classmethod
    def _printable(cls, value: str) -> str:
        bad = sorted({f"U+{ord(c):04X}" for c in value if unicodedata.category(c) == "Cc" and c not in "\t\n\r"})
        if bad:
            raise ValueError(f"the prompt contains control characters ({', '.join(bad[:5])}); remove them")
        if not value.strip():
            raise ValueError("the prompt is empty; describe the motion")
        return value


# --- helpers ---------------------------------------------------------------------------------------
def error_list(err: ValidationError, prefix: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Pydantic errors as `{loc, msg}` for the form (loc `[]` = the whole file)."""
    items = []
    for problem in err.errors():
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key; remove it or fix the spelling"
        elif problem["type"] == "missing":
            message = "required"
        items.append({"loc": list(prefix) + [str(p) for p in problem["loc"]], "msg": message})
    return items


def absolute_paths(values: dict[str, Any], keys: tuple[str, ...], base: Path) -> dict[str, Any]:
    """Path-valued keys made absolute against `base` (the server's working folder)."""
    out = dict(values)
    for key in keys:
        value = out.get(key)
        if value in (None, "") or (key == "resume_from_checkpoint" and value == "latest"):
            continue
        path = Path(str(value)).expanduser()
        out[key] = str(path if path.is_absolute() else base / path)
    return out


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
    config = absolute_paths(config, PATH_FIELDS, settings.cwd)
    try:
        TrainConfig.model_validate(config)
    except ValidationError as err:
        errors.extend(error_list(err, ("config",)))

    datasets: list[Any] = []
    for index, entry in enumerate(body.datasets):
        if not isinstance(entry, dict):
            errors.append({"loc": ["datasets", str(index)], "msg": "expected an object"})
            continue
        entry = absolute_paths(entry, DATASET_PATH_FIELDS, settings.cwd)
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
    errors.extend(path_errors(settings, config, datasets))
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
    datasets = [absolute_paths(e, DATASET_PATH_FIELDS, datasets_dir) if isinstance(e, dict) else e for e in datasets]
    check = dict(config)
    check.pop("data_backend_config", None)  # the server's own file (or the run's snapshot of it)
    problems = path_errors(settings, check, datasets)
    if problems:
        first = problems[0]
        raise HTTPException(403, f"{'.'.join(first['loc'])}: {first['msg']}")
    return config, datasets


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def read_json_file(path: Path, default: Any) -> Any:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return default


def run_events(job: Job) -> tuple[Optional[Path], list[dict[str, Any]]]:
    """This run's events, every one (a resumed run may append to the same file after earlier runs).

    Reads the whole file: for the API's `events=all`; the run list and status use `run_digest`.
    """
    path = find_events_file(job)
    if path is None:
        return None, []
    events, _ = read_events(path)
    return path, select_run_events(events, job)


def run_status(job: Job, alive: bool, events: list[dict[str, Any]]) -> tuple[str, Optional[str]]:
    """(status, message) from this run's events and whether its pid is alive; never cached.

    Only `start`, `error` and `end` events matter here, so callers may pass just those. Without an
    `end` event: a process stopped from the UI is `stopped` (e.g. during caching, before the trainer
    handles SIGTERM), one that exited with code 0 `completed`, any other `died`.
    """
    end = next((e for e in reversed(events) if e.get("event") == "end"), None)
    if end is not None:
        return str(end.get("status", "completed")), None
    if alive:
        if job.stop_requested:
            return "stopping", "SIGTERM sent; the trainer is writing a resumable checkpoint"
        started = any(e.get("event") == "start" for e in events)
        return ("running" if started else "starting"), None
    code = job.returncode
    errors = [e.get("message") for e in events if e.get("event") == "error"]
    if job.stop_requested:
        where = "before training started (while loading or caching)" if not events else "before it wrote its end event"
        return "stopped", f"stopped on request (SIGTERM) {where}; Resume continues from the latest checkpoint, if any"
    if code == 0:
        return "completed", "the process exited with code 0; its events file has no end event for this run"
    message = f"the process exited{'' if code is None else f' with code {code}'} without an end event"
    return "died", message + (f": {errors[-1]}" if errors else "; see the log below")


def run_dir_of(job: Job, events: list[dict[str, Any]]) -> Path:
    start = next((e for e in events if e.get("event") == "start"), None)
    if start and start.get("run_dir"):
        return Path(start["run_dir"])
    return Path(job.extra["output_dir"])


def run_summary(store: JobStore, job: Job, *, events: Optional[str] = None) -> dict[str, Any]:
    """The run's summary from the incremental digest of its events file; `events` adds the log tail
    and the events: `all`, `none` or a comma list of kinds (only `step` needs a full read)."""
    known = job.extra.get("events_file")
    path = find_events_file(job)
    if path is not None and known != str(path):
        store.save(job)  # later requests skip the folder scan, also after a server restart
    digest = run_digest(path, job)
    alive = store.alive(job)
    status, message = run_status(job, alive, digest.events)
    last = digest.last_step or {}
    start = next((e for e in digest.events if e.get("event") == "start"), {})
    summary: dict[str, Any] = {
        "id": job.id,
        "status": status,
        "message": message,
        "alive": alive,
        "pid": job.pid,
        "started": job.started,
        "returncode": job.returncode,
        "output_dir": job.extra.get("output_dir"),
        "resumed_from": job.extra.get("resumed_from"),
        "events_file": str(path) if path else None,
        "step": last.get("step"),
        "total_steps": last.get("total_steps", start.get("total_steps")),
        "loss": last.get("loss"),
        "s_per_step": last.get("s_per_step"),
        "eta_s": last.get("eta_s"),
        # None on CPU (the trainer reports no GPU memory there); the page then shows "-".
        "peak_mem_gib": digest.peak_mem_gib,
    }
    end = next((e for e in reversed(digest.events) if e.get("event") == "end"), None)
    summary["lora_path"] = end.get("lora_path") if end else None
    if events is not None:
        kinds = set(EVENT_KINDS) if events == "all" else set() if events == "none" else set(events.split(","))
        unknown = kinds - set(EVENT_KINDS)
        if unknown:
            raise HTTPException(
                422, f"events: unknown kind(s) {sorted(unknown)}; use all, none or a comma list of {', '.join(EVENT_KINDS)}"
            )
        if "step" in kinds:
            chosen = run_events(job)[1]
        else:
            chosen = digest.events
        summary["events"] = [e for e in chosen if e.get("event") in kinds]
        summary["log"] = tail_lines(job.log_path, 100)
    return summary


def sse(kind: str, data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def preview_progress(lines: list[str]) -> Optional[dict[str, int]]:
    """Latest `{"event": "sample_step", "step", "total"}` line printed by `sample --progress-json`."""
    for line in reversed(lines):
        if not line.startswith("{"):
            continue
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(message, dict) and message.get("event") == "sample_step":
            return {"done": int(message["step"]), "total": int(message["total"])}
    return None


# --- the app ---------------------------------------------------------------------------------------
def create_app(settings: ServerSettings) -> FastAPI:
    """Build the app; state lives in `settings.data_dir` (config files, job folders, uploads)."""
    data_dir = settings.data_dir.resolve()
    for sub in ("config", "uploads", "jobs"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    store = JobStore(data_dir / "jobs", cwd=settings.cwd, cli=list(settings.cli) or None)
    allowed_hosts = security.allowed_host_names(settings.host, settings.extra_hosts)
    uploads = data_dir / "uploads"

    app = FastAPI(title="longcat-tuner", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.store = store

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        try:
            security.check_host(request.headers.get("host"), allowed_hosts)
            path = request.url.path
            query_token = request.query_params.get("token") if path == "/" else None
            if query_token is not None:
                if not security.token_matches(query_token, settings.token):
                    raise GuardError(401, "wrong token; open the URL the server printed at start")
                # First page load: move the token into an HttpOnly cookie and drop it from the URL.
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(
                    security.COOKIE_NAME, settings.token, httponly=True, samesite="strict", path="/"
                )
                return response
            given = security.bearer_token(request.headers.get("authorization")) or request.cookies.get(
                security.COOKIE_NAME
            )
            if not security.token_matches(given, settings.token):
                raise GuardError(
                    401,
                    "missing or wrong token: send `Authorization: Bearer <token>` "
                    "(API) or open the URL with ?token=<token> printed by `longcat-tuner server`",
                )
            if request.method in security.WRITE_METHODS and request.headers.get(security.WRITE_HEADER) != "1":
                raise GuardError(403, f"state-changing requests need the header `{security.WRITE_HEADER}: 1`")
        except GuardError as err:
            if request.url.path.startswith("/api/"):
                return JSONResponse({"detail": str(err)}, status_code=err.status)
            return HTMLResponse(f"<h1>{err.status}</h1><p>{_html_escape(str(err))}</p>", status_code=err.status)
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    @app.exception_handler(GuardError)
    async def guard_error(_: Request, err: GuardError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer echoes the input, which fails to serialise for `1e400` (inf) and gave
        # a 500: each problem is reported as its location and message only.
        detail = []
        for problem in err.errors():
            loc = [str(part) for part in problem.get("loc", ())]
            where = ".".join(loc[1:] if loc[:1] == ["body"] else loc) or "request body"
            detail.append({"loc": loc, "msg": f"{where}: {str(problem.get('msg', 'invalid value')).removeprefix('Value error, ')}"})
        return JSONResponse({"detail": detail}, status_code=422)

    # --- pages ---------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        response = FileResponse(STATIC_DIR / "index.html", media_type="text/html")
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; style-src 'self'; "
            "script-src 'self'; connect-src 'self'; frame-ancestors 'none'"
        )
        return response

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # Routes that read or write files are plain `def`: FastAPI runs them in worker threads.
    # Starting a job (check, run, preview) holds this lock from the "is it busy" test to the start.
    launching = threading.Lock()

    # --- config --------------------------------------------------------------------------------
    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        return {
            "data_dir": str(data_dir),
            "allowed_roots": [str(root) for root in settings.roots],
            "config_path": str(settings.config_path),
            "datasets_path": str(settings.datasets_path),
            "cwd": str(settings.cwd),
            "max_upload_bytes": settings.max_upload_bytes,
            "max_jobs": settings.max_jobs,
        }

    @app.get("/api/schema")
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

    @app.get("/api/config")
    def get_config() -> dict[str, Any]:
        return {
            "config": read_json_file(settings.config_path, {}),
            "datasets": read_json_file(settings.datasets_path, []),
            "saved": settings.config_path.is_file(),
            "config_path": str(settings.config_path),
            "datasets_path": str(settings.datasets_path),
        }

    @app.get("/api/config/import")
    def import_config(path: str) -> dict[str, Any]:
        """Read an existing config.json (and the multidatabackend.json it names) without saving.

        Relative paths inside the files resolve against their own folders, as `train` reads them.
        """
        file = security.resolve_inside(path, settings.roots, what="config file")
        try:
            config = read_json(file) if file.is_file() else None
        except (ConfigError, OSError, UnicodeDecodeError) as err:
            raise HTTPException(422, f"{file}: {err}") from None
        if not isinstance(config, dict):
            raise HTTPException(422, f"{file} is not a config.json (a JSON object of settings)")
        config = resolve_paths(config, file.parent)
        datasets: list[Any] = []
        if config.get("data_backend_config"):
            datasets_file = security.resolve_inside(config["data_backend_config"], settings.roots, what="data_backend_config")
            try:
                loaded = read_json(datasets_file) if datasets_file.is_file() else []
            except (ConfigError, OSError, UnicodeDecodeError) as err:
                raise HTTPException(422, f"{datasets_file}: {err}") from None
            datasets = [
                absolute_paths(entry, DATASET_PATH_FIELDS, datasets_file.parent) if isinstance(entry, dict) else entry
                for entry in (loaded if isinstance(loaded, list) else [])
            ]
        return {"config": config, "datasets": datasets, "source": str(file)}

    @app.post("/api/config/validate")
    def validate_config(body: ConfigBody) -> dict[str, Any]:
        _, _, errors = validate_files(settings, body)
        return {"valid": not errors, "errors": errors}

    @app.put("/api/config")
    def save_config(body: ConfigBody) -> JSONResponse:
        config, datasets, errors = validate_files(settings, body)
        if errors:
            return JSONResponse({"valid": False, "errors": errors}, status_code=422)
        write_json(settings.datasets_path, datasets)
        write_json(settings.config_path, config)
        return JSONResponse(
            {"valid": True, "config_path": str(settings.config_path), "datasets_path": str(settings.datasets_path)}
        )

    def saved_config() -> dict[str, Any]:
        if not settings.config_path.is_file():
            raise HTTPException(409, "no saved config yet: fill the Config page and press Save")
        config = read_json_file(settings.config_path, None)
        if not isinstance(config, dict):
            raise HTTPException(422, f"{settings.config_path} is not a JSON object of settings; save the Config page again")
        return config

    def saved_files() -> tuple[dict[str, Any], list[Any]]:
        """The saved config and datasets, paths absolute and every implied path checked (403 otherwise)."""
        return launch_files(
            settings, saved_config(), read_json_file(settings.datasets_path, []),
            config_dir=settings.config_path.parent, datasets_dir=settings.datasets_path.parent,
        )  # fmt: skip

    def check_job_room() -> None:
        """429 when `max_jobs` check/preview jobs already run (each loads a model; a preview holds a GPU)."""
        running = store.running("check", "preview")
        if len(running) >= settings.max_jobs:
            names = ", ".join(f"{job.kind} {job.id}" for job in running)
            raise HTTPException(
                429, f"{len(running)} job{'s' if len(running) != 1 else ''} already running ({names}); wait or stop one "
                f"(at most {settings.max_jobs} check/preview jobs run at a time)",
            )  # fmt: skip

    # --- dataset check -------------------------------------------------------------------------
    @app.post("/api/checks")
    def start_check() -> dict[str, Any]:
        saved_files()
        with launching:
            check_job_room()
            job_id, folder = store.new_folder("check")
            report = folder / "report.json"
            # `check --json` prints the summary on stdout; messages and warnings go to the log.
            job = store.start(
                "check", job_id, folder, ["check", "--config", str(settings.config_path), "--json"],
                {"report": str(report)}, stdout=report,
            )  # fmt: skip
        return check_summary(job)

    def check_summary(job: Job) -> dict[str, Any]:
        alive = store.alive(job)
        report_path = Path(job.extra["report"])
        report = read_json_file(report_path, None) if not alive else None
        # Exit code 1 with a report means "checked, training could not start" (report.blocking says why).
        if alive:
            status = "stopping" if job.stop_requested else "running"
        elif isinstance(report, dict) and "datasets" in report:
            status = "completed"
        elif job.stop_requested:
            status = "stopped"
        else:
            status = "failed"
        return {
            "id": job.id,
            "status": status,
            "returncode": job.returncode,
            "report": report,
            "log": tail_lines(job.log_path, 200),
        }

    @app.get("/api/checks/{job_id}")
    def get_check(job_id: str) -> dict[str, Any]:
        return check_summary(job_or_404(store, "check", job_id))

    @app.post("/api/checks/{job_id}/stop")
    def stop_check(job_id: str) -> dict[str, Any]:
        job = job_or_404(store, "check", job_id)
        if not store.stop(job):
            raise HTTPException(409, f"check {job_id} is not running")
        return check_summary(job)

    @app.get("/api/image")
    def image_thumbnail(path: str, size: int = 256) -> Response:
        """A thumbnail of an image inside the allowed folders (dataset start frames).

        Opened as training opens it (`data.images.open_image`): the header is read first, and an image
        over the trainer's pixel limit (a decompression bomb) is refused with 422 naming the file and
        its size, before anything is decoded.
        """
        file = security.resolve_inside(path, settings.roots, what="image")
        if file.suffix.lower() not in IMAGE_SUFFIXES or not file.is_file():
            raise HTTPException(404, f"{file} is not an image file")
        size = max(16, min(size, 1024))
        try:
            with open_image(file) as image:
                image.thumbnail((size, size))
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="PNG")
        except DataError as err:
            raise HTTPException(422, str(err)) from None
        except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt pixel data
            raise HTTPException(422, f"{file} is not a readable image: {err}; re-save or remove it") from None
        return Response(buffer.getvalue(), media_type="image/png")

    # --- runs ----------------------------------------------------------------------------------
    @app.get("/api/runs")
    def list_runs() -> list[dict[str, Any]]:
        return [run_summary(store, job) for job in store.list("run")]

    def output_dir_busy(output_dir: Any) -> Optional[str]:
        """Why `output_dir` cannot take a new run, or None: a live run of this server writing to the
        same folder (paths resolved: `a/../a/out` and symlinks name one folder), or the trainer's
        lock file held by another process (a run started from a shell, another server)."""
        if not output_dir:
            return None
        for other in store.list("run"):
            if same_folder(other.extra.get("output_dir"), output_dir) and store.alive(other):
                return f"run {other.id} is still writing to {other.extra.get('output_dir')}; stop it first"
        try:
            holder = run_lock.read_lock(output_dir)
        except (OSError, ValueError, RuntimeError):
            return None
        if holder is None:
            return None
        message = f"output_dir {output_dir} is in use by {holder.describe()} (lock file {holder.path}); "
        if holder.on_this_host:
            return message + "wait for that run or stop it, or choose another output_dir"
        return message + f"if no run is active on {holder.host}, delete the lock file"

    @app.post("/api/runs")
    def start_run(body: RunBody) -> dict[str, Any]:
        if body.resume_from:
            previous = job_or_404(store, "run", body.resume_from)
            config, datasets = launch_files(
                settings, read_json_file(previous.folder / CONFIG_NAME, {}),
                read_json_file(previous.folder / DATASETS_NAME, []),
                config_dir=previous.folder, datasets_dir=previous.folder,
            )  # fmt: skip
            config["resume_from_checkpoint"] = "latest"
        else:
            config, datasets = saved_files()
        with launching:
            busy = output_dir_busy(config.get("output_dir"))
            if busy:
                raise HTTPException(409, busy)
            job_id, folder = store.new_folder("run")
            # The run keeps its own snapshot, so editing the config later does not change it.
            config["data_backend_config"] = str(folder / DATASETS_NAME)
            write_json(folder / DATASETS_NAME, datasets)
            write_json(folder / CONFIG_NAME, config)
            job = store.start(
                "run",
                job_id,
                folder,
                ["train", "--config", str(folder / CONFIG_NAME)],
                {"output_dir": config.get("output_dir"), "resumed_from": body.resume_from},
            )
        return run_summary(store, job)

    @app.get("/api/runs/{run_id}")
    def get_run(run_id: str, events: str = "all") -> dict[str, Any]:
        """The run's summary, log tail and events: `events=all` (default), a comma list of kinds
        (e.g. `validation`, what the gallery needs on a long run) or `none`."""
        return run_summary(store, job_or_404(store, "run", run_id), events=events)

    @app.post("/api/runs/{run_id}/stop")
    def stop_run(run_id: str) -> dict[str, Any]:
        job = job_or_404(store, "run", run_id)
        if not store.stop(job):
            raise HTTPException(409, f"run {run_id} is not running")
        return run_summary(store, job)

    @app.post("/api/runs/{run_id}/resume")
    def resume_run(run_id: str) -> dict[str, Any]:
        job = job_or_404(store, "run", run_id)
        if store.alive(job):
            raise HTTPException(409, f"run {run_id} is still running")
        return start_run(RunBody(resume_from=run_id))

    @app.get("/api/runs/{run_id}/log")
    def run_log(run_id: str, lines: int = 200) -> dict[str, Any]:
        job = job_or_404(store, "run", run_id)
        return {"lines": tail_lines(job.log_path, max(1, min(lines, 2000)))}

    @app.get("/api/runs/{run_id}/files/{relative:path}")
    def run_file(run_id: str, relative: str) -> FileResponse:
        job = job_or_404(store, "run", run_id)
        digest = run_digest(find_events_file(job), job)
        file = security.child_path(run_dir_of(job, digest.events), relative, what="run file")
        if not file.is_file():
            raise HTTPException(404, f"{relative} does not exist in run {run_id}")
        return FileResponse(file, media_type=MEDIA_TYPES.get(file.suffix.lower()))

    @app.get("/api/runs/{run_id}/events")
    def run_event_stream(run_id: str, request: Request) -> StreamingResponse:
        job = job_or_404(store, "run", run_id)
        return StreamingResponse(
            stream_run(job, request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def stream_run(job: Job, request: Request) -> AsyncIterator[bytes]:
        """Server-sent events: each training event, new log lines, and status changes.

        The events file and the log are read incrementally, in worker threads and at most
        STREAM_CHUNK_BYTES per poll, so a long run neither stalls the server nor costs more per poll.
        """
        state = StreamState(log_offset=await run_in_threadpool(log_tail_offset, job.log_path))
        while True:
            messages, done, more = await run_in_threadpool(stream_poll, store, job, state)
            if messages:
                yield b"".join(messages)  # one write per poll, however many events it read
            if done or await request.is_disconnected():
                return
            if not more:
                await asyncio.sleep(0.5)

    # --- LoRAs, uploads, previews --------------------------------------------------------------
    @app.get("/api/loras")
    def list_loras() -> list[dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for job in store.list("run"):
            output_dir = Path(job.extra.get("output_dir") or "")
            if not output_dir.is_dir():
                continue
            # The trainer's layout: final LoRAs in the run folder, one per checkpoint below it.
            files = sorted(output_dir.glob("*.safetensors")) + sorted(output_dir.glob("checkpoints/*/*.safetensors"))
            for file in files:
                if _looks_like_lora(file):
                    found[str(file)] = {
                        "path": str(file),
                        "run": job.id,
                        "name": str(file.relative_to(output_dir)),
                        "modified": file.stat().st_mtime,
                    }
        return sorted(found.values(), key=lambda item: -item["modified"])

    @app.post("/api/uploads")
    async def upload_image(request: Request) -> dict[str, Any]:
        """A start frame as the multipart field `file`, at most `max_upload_bytes`.

        The body is counted as it streams in (a chunked body has no Content-Length): past the limit
        the server stops reading and answers 413. Nothing is written to disk before the image is
        decoded; the part is held in memory (bounded by the limit), and only the decoded image is
        saved, under a random name.
        """
        limit = settings.max_upload_bytes + MULTIPART_OVERHEAD
        too_large = f"upload is larger than the {settings.max_upload_bytes}-byte limit; use a smaller start frame"
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise HTTPException(413, too_large)
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise HTTPException(415, "send the start frame as multipart/form-data with the field `file`")
        parser = MultiPartParser(request.headers, limited_stream(request, limit), max_files=1, max_fields=8)
        parser.spool_max_size = limit + 1  # the part stays in memory: no temporary file to leave behind
        try:
            form = await parser.parse()
        except UploadTooLarge:
            raise HTTPException(413, too_large) from None
        except MultiPartException as err:
            raise HTTPException(400, f"upload is not valid multipart/form-data ({err.message}); send the field `file`") from None
        try:
            file = form.get("file")
            if not isinstance(file, UploadFile):
                raise HTTPException(422, "upload has no file in the field `file`; choose a PNG, JPEG or WebP start frame")
            data = await file.read()
            name = file.filename
        finally:
            await form.close()
        return await run_in_threadpool(store_upload, data, name)

    def store_upload(data: bytes, name: Optional[str]) -> dict[str, Any]:
        image = security.decode_upload_image(data, max_bytes=settings.max_upload_bytes)
        upload_id = secrets.token_hex(16)  # random name: the client never chooses a file name
        target = uploads / f"{upload_id}.png"
        partial = uploads / f".{upload_id}.png.tmp"
        try:
            image.save(partial, format="PNG")
            partial.replace(target)
        except OSError as err:
            partial.unlink(missing_ok=True)
            raise HTTPException(507, f"cannot store the upload in {uploads}: {err}; free space there") from None
        return {"id": upload_id, "width": image.width, "height": image.height, "name": name}

    @app.get("/api/uploads/{upload_id}")
    def get_upload(upload_id: str) -> FileResponse:
        return FileResponse(upload_file(upload_id), media_type="image/png")

    def upload_file(upload_id: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{32}", upload_id):
            raise HTTPException(400, "bad upload id")
        path = uploads / f"{upload_id}.png"
        if not path.is_file():
            raise HTTPException(404, f"no upload {upload_id}; upload the start frame again")
        return path

    @app.post("/api/previews")
    def start_preview(body: PreviewBody) -> dict[str, Any]:
        image = upload_file(body.upload)
        model = body.model or saved_config().get("pretrained_model_name_or_path")
        if not model:
            raise HTTPException(422, "no model: set pretrained_model_name_or_path on the Config page")
        model_path = security.resolve_inside(model, settings.roots, what="model")
        resolution = preview_resolution(body.resolution)
        if (body.frames - 1) % 4:
            down = body.frames - (body.frames - 1) % 4
            raise HTTPException(422, f"frames {body.frames}: the VAE needs (frames - 1) % 4 == 0, e.g. {down} or {down + 4}")
        # `--prompt=<text>`: a prompt that starts with `-` is then the option's value, not an option.
        args = ["sample", "--model", str(model_path), "--image", str(image), f"--prompt={body.prompt}", "--progress-json"]
        if body.lora:
            lora = security.resolve_inside(body.lora, settings.roots, what="lora")
            if not lora.is_file() or lora.suffix != ".safetensors":
                raise HTTPException(404, f"LoRA {lora} is not a .safetensors file")
            args += ["--lora", str(lora)]
        steps, guidance = body.steps, body.guidance
        if body.fast:
            # The official CFG- and step-distilled LoRA: 16 steps on the distilled grid, no CFG (MODEL.md 4.4).
            distill = model_path / "lora" / "cfg_step_lora.safetensors"
            if not distill.is_file():
                raise HTTPException(404, f"fast preview needs the official {distill}; it is not in the model folder")
            args += ["--lora", str(distill), "--distilled"]
            steps, guidance = 16, 1.0
        with launching:
            check_job_room()
            job_id, folder = store.new_folder("preview")
            output = folder / "preview.mp4"
            args += [
                "--frames", str(body.frames), "--steps", str(steps), "--guidance", str(guidance),
                "--resolution", resolution, "--seed", str(body.seed), "--output", str(output),
            ]  # fmt: skip
            job = store.start("preview", job_id, folder, args, {"output": str(output), "request": body.model_dump()})
        return preview_summary(job)

    def preview_summary(job: Job) -> dict[str, Any]:
        alive = store.alive(job)
        output = Path(job.extra["output"])
        lines = tail_lines(job.log_path, 40)
        if alive:
            status = "stopping" if job.stop_requested else "running"
        elif job.returncode in (0, None) and output.is_file():
            status = "completed"
        elif job.stop_requested:
            status = "stopped"
        else:
            status = "failed"
        return {
            "id": job.id,
            "status": status,
            "returncode": job.returncode,
            "progress": preview_progress(lines),
            "request": job.extra.get("request"),
            "video": f"/api/previews/{job.id}/video" if status == "completed" else None,
            "log": lines,
            "started": job.started,
        }

    @app.get("/api/previews")
    def list_previews() -> list[dict[str, Any]]:
        return [preview_summary(job) for job in store.list("preview")]

    @app.get("/api/previews/{job_id}")
    def get_preview(job_id: str) -> dict[str, Any]:
        return preview_summary(job_or_404(store, "preview", job_id))

    @app.post("/api/previews/{job_id}/stop")
    def stop_preview(job_id: str) -> dict[str, Any]:
        job = job_or_404(store, "preview", job_id)
        if not store.stop(job):
            raise HTTPException(409, f"preview {job_id} is not running")
        return preview_summary(job)

    @app.get("/api/previews/{job_id}/video")
    def preview_video(job_id: str) -> FileResponse:
        job = job_or_404(store, "preview", job_id)
        output = Path(job.extra["output"])
        if not output.is_file():
            raise HTTPException(404, f"preview {job_id} has no video yet")
        return FileResponse(output, media_type="video/mp4")

    return app


class UploadTooLarge(Exception):
    """The request body passed the upload limit while streaming in."""


async def limited_stream(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body, counted as it arrives; raises `UploadTooLarge` as soon as it passes `limit`
    bytes, so the rest of an oversize (e.g. chunked) body is never read."""
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise UploadTooLarge(received)
        yield chunk


def preview_resolution(value: str) -> str:
    """The preview's `--resolution`, checked as `sample` reads it and bounded (422 otherwise)."""
    spec = value.strip()
    try:
        parsed = parse_resolution(spec)
    except ValueError as err:
        raise HTTPException(422, f"resolution {err}; use HEIGHTxWIDTH such as 480x832, or 480p / 720p") from None
    if isinstance(parsed, tuple):
        height, width = parsed
        if not (16 <= height <= MAX_PREVIEW_SIDE and 16 <= width <= MAX_PREVIEW_SIDE) or height * width > MAX_PREVIEW_PIXELS:
            raise HTTPException(
                422, f"resolution {height}x{width}: previews are 16 to {MAX_PREVIEW_SIDE} pixels a side and at most "
                f"{MAX_PREVIEW_PIXELS} pixels (720x1280 fits); use a smaller size",
            )  # fmt: skip
        return f"{height}x{width}"
    return f"{parsed}p"


# The SSE stream reads at most this much of an events file per poll (a long run arrives in steps).
STREAM_CHUNK_BYTES = 4 << 20


@dataclass
class StreamState:
    """Where one SSE stream of a run is: file offsets and what it has seen."""

    log_offset: int
    offset: int = 0
    mine: bool = False
    last_status: Optional[tuple[str, bool]] = None
    milestones: list[dict[str, Any]] = field(default_factory=list)  # this run's start / error / end events
    earlier: dict[int, float] = field(default_factory=dict)  # step -> loss of the runs before this one in the file


def stream_poll(store: JobStore, job: Job, state: StreamState) -> tuple[list[bytes], bool, bool]:
    """One poll of a run's SSE stream (run in a worker thread): (messages, done, more to read now)."""
    out: list[bytes] = []
    more = False
    path = find_events_file(job)
    if path is not None:
        before = state.offset
        events, state.offset = read_events(path, state.offset, max_bytes=STREAM_CHUNK_BYTES)
        try:  # lines were read and bytes remain: the rest of a long file at once, not 0.5 s later
            more = state.offset > before and path.stat().st_size > state.offset
        except OSError:
            more = False
        for event in events:
            if event.get("event") == "start":
                state.mine = is_own_start(event, job)
                if state.mine and state.earlier:
                    # A resumed run continues the earlier runs' curve up to its checkpoint; steps
                    # after it were redone (the latest run's value wins for a step run twice).
                    upto = int(event.get("start_step") or 0)
                    points = sorted([s, v] for s, v in state.earlier.items() if s <= upto)
                    if points:
                        out.append(sse("history", {"points": points, "start_step": upto}))
            if not state.mine and event.get("event") == "step" and event.get("loss") is not None:
                state.earlier[int(event["step"])] = float(event["loss"])
            if state.mine:
                out.append(sse("train", event))
                if event.get("event") in ("start", "error", "end"):
                    state.milestones.append(event)
    state.log_offset, lines, partial = read_new_lines(job.log_path, state.log_offset)
    if lines or partial:
        out.append(sse("log", {"lines": lines, "partial": partial}))
    if more:  # the rest of a long file first; the status once it is read
        return out, False, True
    alive = store.alive(job)
    status, message = run_status(job, alive, state.milestones)
    # The `end` event comes a moment before the process exits: report both changes.
    if (status, alive) != state.last_status:
        state.last_status = (status, alive)
        out.append(sse("status", {"id": job.id, "status": status, "message": message, "alive": alive,
                                  "returncode": job.returncode}))  # fmt: skip
    if not alive and status not in ("starting", "running", "stopping"):
        out.append(sse("done", {"status": status}))
        return out, True, False
    return out, False, False


def job_or_404(store: JobStore, kind: str, job_id: str) -> Job:
    job = store.get(kind, job_id) if re.fullmatch(r"[0-9A-Za-z_-]+", job_id) else None
    if job is None:
        raise HTTPException(404, f"no {kind} with id {job_id!r}")
    return job


def log_tail_offset(path: Path, keep: int = 32 * 1024) -> int:
    """Where to start streaming a log: its last `keep` bytes, from a line start (a long log is not replayed)."""
    if not path.is_file() or path.stat().st_size <= keep:
        return 0
    with open(path, "rb") as handle:
        handle.seek(-keep, os.SEEK_END)
        data = handle.read()
    cut = data.find(b"\n") + 1
    return path.stat().st_size - len(data) + cut


def read_new_lines(path: Path, offset: int) -> tuple[int, list[str], Optional[str]]:
    """Output appended to a log since `offset` (at most 64 KiB per call): (offset, lines, partial).

    Progress bars (tqdm) redraw one line with carriage returns: a finished line is reported as its
    last state, and the line still being redrawn comes back as `partial` (None when there is none).
    """
    if not path.is_file():
        return offset, [], None
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(64 * 1024)
    end = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
    *complete, tail = data[:end].decode("utf-8", "replace").split("\n")
    lines = [last for part in complete if (last := _last_state(part))]
    return offset + end, lines, _last_state(tail) or None


def _last_state(line: str) -> str:
    states = [state for state in line.split("\r") if state.strip()]
    return states[-1] if states else ""


def _looks_like_lora(file: Path) -> bool:
    # The trainer names its LoRA files `longcat_lora*.safetensors` (run folder and each checkpoint);
    # `trainable.safetensors` in a checkpoint holds trainer-internal names, and `.tmp-*` folders are
    # checkpoints still being written.
    return "lora" in file.name.lower() and not any(part.startswith(".tmp") for part in file.parts)


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
