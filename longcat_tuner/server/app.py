"""The web UI's HTTP server: a thin FastAPI app over config files, CLI subprocesses and event files.

It never imports torch: it writes `config.json` / `multidatabackend.json`, starts `longcat-tuner
check | train | sample` as subprocesses (see `jobs.py`) and reads their output and the run's
`events.jsonl`. Every request passes `guard` (Host header, token, custom header on writes, see
`security.py`); every path a client names is resolved and kept inside the allowed folders.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field, ValidationError

from longcat_tuner.config.datasets import DatasetConfig, parse_datasets
from longcat_tuner.config.training import PATH_FIELDS, TrainConfig, read_json, resolve_paths
from longcat_tuner.errors import ConfigError
from longcat_tuner.server import security
from longcat_tuner.server.jobs import (
    Job,
    JobStore,
    find_events_file,
    is_own_start,
    read_events,
    select_run_events,
    tail_lines,
)
from longcat_tuner.server.security import GuardError
from longcat_tuner.train.events import EVENT_KINDS

STATIC_DIR = Path(__file__).resolve().parent / "static"
CONFIG_NAME = "config.json"
DATASETS_NAME = "multidatabackend.json"
DATASET_PATH_FIELDS = ("instance_data_dir", "cache_dir_vae", "cache_dir_text")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MEDIA_TYPES = {".mp4": "video/mp4", ".webm": "video/webm", ".mov": "video/quicktime", ".m4v": "video/mp4"}


@dataclass(frozen=True)
class ServerSettings:
    """Everything the app needs; built by `longcat-tuner server` from its flags."""

    token: str
    data_dir: Path
    allowed_roots: tuple[Path, ...] = ()
    host: str = "127.0.0.1"
    extra_hosts: tuple[str, ...] = ()
    max_upload_bytes: int = 20 * 1024 * 1024
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
    prompt: str = Field(..., min_length=1)
    model: Optional[str] = Field(None, description="Checkpoint root; default: the saved config's model.")
    lora: Optional[str] = Field(None, description="A LoRA file from GET /api/loras; empty: the base model.")
    frames: int = Field(93, ge=1)
    steps: int = Field(40, ge=1, le=200)
    guidance: float = Field(4.0, ge=1.0, le=20.0)
    resolution: str = Field("480p", description="HEIGHTxWIDTH, or 480p / 720p following the image's aspect.")
    seed: int = 42
    fast: bool = Field(
        False,
        description="16-step distilled preview (guidance 1) with the checkpoint's official lora/cfg_step_lora.safetensors; "
        "steps and guidance are then ignored.",
    )


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


def validate_files(settings: ServerSettings, body: ConfigBody) -> tuple[dict[str, Any], list[Any], list[dict[str, Any]]]:
    """Normalize and validate both files; returns (config, datasets, errors)."""
    errors: list[dict[str, Any]] = []
    config = dict(body.config)
    config["data_backend_config"] = str(settings.datasets_path.resolve())
    config = absolute_paths(config, PATH_FIELDS, settings.cwd)
    for key in PATH_FIELDS:
        value = config.get(key)
        if value in (None, "") or (key == "resume_from_checkpoint" and value == "latest"):
            continue
        try:
            security.resolve_inside(value, settings.roots, what=key)
        except GuardError as err:
            errors.append({"loc": ["config", key], "msg": str(err)})
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
        for key in DATASET_PATH_FIELDS:
            if entry.get(key) not in (None, ""):
                try:
                    security.resolve_inside(entry[key], settings.roots, what=key)
                except GuardError as err:
                    errors.append({"loc": ["datasets", str(index), key], "msg": str(err)})
        try:
            DatasetConfig.model_validate(entry)
        except ValidationError as err:
            errors.extend(error_list(err, ("datasets", str(index))))
    if not errors:
        try:  # cross-dataset rules (unique ids, conditioning references, separate caches)
            parse_datasets(datasets, source=DATASETS_NAME)
        except ConfigError as err:
            errors.append({"loc": ["datasets"], "msg": str(err)})
    return config, datasets, errors


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
    """This run's events (a resumed run may append to the same file after earlier runs)."""
    path = find_events_file(job)
    if path is None:
        return None, []
    events, _ = read_events(path)
    return path, select_run_events(events, job)


def run_status(job: Job, alive: bool, events: list[dict[str, Any]]) -> tuple[str, Optional[str]]:
    """(status, message) from this run's events and whether its pid is alive; never cached.

    Only `start`, `error` and `end` events matter here, so callers may pass just those.
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
    message = f"the process exited{'' if code is None else f' with code {code}'} without an end event"
    return "died", message + (f": {errors[-1]}" if errors else "; see the log below")


def run_dir_of(job: Job, events: list[dict[str, Any]]) -> Path:
    start = next((e for e in events if e.get("event") == "start"), None)
    if start and start.get("run_dir"):
        return Path(start["run_dir"])
    return Path(job.extra["output_dir"])


def run_summary(store: JobStore, job: Job, *, detail: bool = False) -> dict[str, Any]:
    path, events = run_events(job)
    alive = store.alive(job)
    status, message = run_status(job, alive, events)
    steps = [e for e in events if e.get("event") == "step"]
    last = steps[-1] if steps else {}
    start = next((e for e in events if e.get("event") == "start"), {})
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
        "peak_mem_gib": max((e["peak_mem_gib"] for e in steps if e.get("peak_mem_gib") is not None), default=None),
    }
    end = next((e for e in reversed(events) if e.get("event") == "end"), None)
    summary["lora_path"] = end.get("lora_path") if end else None
    if detail:
        summary["events"] = events
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

    # --- config --------------------------------------------------------------------------------
    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        return {
            "data_dir": str(data_dir),
            "allowed_roots": [str(root) for root in settings.roots],
            "config_path": str(settings.config_path),
            "datasets_path": str(settings.datasets_path),
            "cwd": str(settings.cwd),
        }

    @app.get("/api/schema")
    async def schema() -> dict[str, Any]:
        return {
            "config": TrainConfig.model_json_schema(),
            "dataset": DatasetConfig.model_json_schema(),
            "path_fields": {"config": list(PATH_FIELDS), "dataset": list(DATASET_PATH_FIELDS)},
        }

    @app.get("/api/config")
    async def get_config() -> dict[str, Any]:
        return {
            "config": read_json_file(settings.config_path, {}),
            "datasets": read_json_file(settings.datasets_path, []),
            "saved": settings.config_path.is_file(),
            "config_path": str(settings.config_path),
            "datasets_path": str(settings.datasets_path),
        }

    @app.get("/api/config/import")
    async def import_config(path: str) -> dict[str, Any]:
        """Read an existing config.json (and the multidatabackend.json it names) without saving.

        Relative paths inside the files resolve against their own folders, as `train` reads them.
        """
        file = security.resolve_inside(path, settings.roots, what="config file")
        try:
            config = read_json(file) if file.is_file() else None
        except ConfigError as err:
            raise HTTPException(422, str(err)) from None
        if not isinstance(config, dict):
            raise HTTPException(422, f"{file} is not a config.json (a JSON object of settings)")
        config = resolve_paths(config, file.parent)
        datasets: list[Any] = []
        if config.get("data_backend_config"):
            datasets_file = security.resolve_inside(config["data_backend_config"], settings.roots, what="data_backend_config")
            try:
                loaded = read_json(datasets_file) if datasets_file.is_file() else []
            except ConfigError as err:
                raise HTTPException(422, str(err)) from None
            datasets = [
                absolute_paths(entry, DATASET_PATH_FIELDS, datasets_file.parent) if isinstance(entry, dict) else entry
                for entry in (loaded if isinstance(loaded, list) else [])
            ]
        return {"config": config, "datasets": datasets, "source": str(file)}

    @app.post("/api/config/validate")
    async def validate_config(body: ConfigBody) -> dict[str, Any]:
        _, _, errors = validate_files(settings, body)
        return {"valid": not errors, "errors": errors}

    @app.put("/api/config")
    async def save_config(body: ConfigBody) -> JSONResponse:
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
        return read_json_file(settings.config_path, {})

    # --- dataset check -------------------------------------------------------------------------
    @app.post("/api/checks")
    async def start_check() -> dict[str, Any]:
        saved_config()
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
            status = "running"
        elif isinstance(report, dict) and "datasets" in report:
            status = "completed"
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
    async def get_check(job_id: str) -> dict[str, Any]:
        return check_summary(job_or_404(store, "check", job_id))

    @app.get("/api/image")
    async def image_thumbnail(path: str, size: int = 256) -> Response:
        """A thumbnail of an image inside the allowed folders (dataset start frames)."""
        file = security.resolve_inside(path, settings.roots, what="image")
        if file.suffix.lower() not in IMAGE_SUFFIXES or not file.is_file():
            raise HTTPException(404, f"{file} is not an image file")
        size = max(16, min(size, 1024))
        try:
            with Image.open(file) as image:
                image.thumbnail((size, size))
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="PNG")
        except OSError as err:
            raise HTTPException(422, f"{file} is not a readable image: {err}") from None
        return Response(buffer.getvalue(), media_type="image/png")

    # --- runs ----------------------------------------------------------------------------------
    @app.get("/api/runs")
    async def list_runs() -> list[dict[str, Any]]:
        return [run_summary(store, job) for job in store.list("run")]

    @app.post("/api/runs")
    async def start_run(body: RunBody) -> dict[str, Any]:
        if body.resume_from:
            previous = job_or_404(store, "run", body.resume_from)
            config = read_json_file(previous.folder / CONFIG_NAME, {})
            datasets = read_json_file(previous.folder / DATASETS_NAME, [])
            config["resume_from_checkpoint"] = "latest"
        else:
            config = saved_config()
            datasets = read_json_file(settings.datasets_path, [])
        for other in store.list("run"):
            if other.extra.get("output_dir") == config.get("output_dir") and store.alive(other):
                raise HTTPException(409, f"run {other.id} is still writing to {config.get('output_dir')}; stop it first")
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
    async def get_run(run_id: str, events: str = "all") -> dict[str, Any]:
        """The run's summary, log tail and events: `events=all` (default), a comma list of kinds
        (e.g. `validation`, what the gallery needs on a long run) or `none`."""
        summary = run_summary(store, job_or_404(store, "run", run_id), detail=True)
        if events != "all":
            kinds = set() if events == "none" else set(events.split(","))
            unknown = kinds - set(EVENT_KINDS)
            if unknown:
                raise HTTPException(
                    422, f"events: unknown kind(s) {sorted(unknown)}; use all, none or a comma list of {', '.join(EVENT_KINDS)}"
                )
            summary["events"] = [e for e in summary["events"] if e.get("event") in kinds]
        return summary

    @app.post("/api/runs/{run_id}/stop")
    async def stop_run(run_id: str) -> dict[str, Any]:
        job = job_or_404(store, "run", run_id)
        if not store.stop(job):
            raise HTTPException(409, f"run {run_id} is not running")
        return run_summary(store, job)

    @app.post("/api/runs/{run_id}/resume")
    async def resume_run(run_id: str) -> dict[str, Any]:
        job = job_or_404(store, "run", run_id)
        if store.alive(job):
            raise HTTPException(409, f"run {run_id} is still running")
        return await start_run(RunBody(resume_from=run_id))

    @app.get("/api/runs/{run_id}/log")
    async def run_log(run_id: str, lines: int = 200) -> dict[str, Any]:
        job = job_or_404(store, "run", run_id)
        return {"lines": tail_lines(job.log_path, max(1, min(lines, 2000)))}

    @app.get("/api/runs/{run_id}/files/{relative:path}")
    async def run_file(run_id: str, relative: str) -> FileResponse:
        job = job_or_404(store, "run", run_id)
        _, events = run_events(job)
        file = security.child_path(run_dir_of(job, events), relative, what="run file")
        if not file.is_file():
            raise HTTPException(404, f"{relative} does not exist in run {run_id}")
        return FileResponse(file, media_type=MEDIA_TYPES.get(file.suffix.lower()))

    @app.get("/api/runs/{run_id}/events")
    async def run_event_stream(run_id: str, request: Request) -> StreamingResponse:
        job = job_or_404(store, "run", run_id)
        return StreamingResponse(
            stream_run(job, request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def stream_run(job: Job, request: Request) -> AsyncIterator[bytes]:
        """Server-sent events: each training event, new log lines, and status changes.

        The events file and the log are read incrementally, so a long run costs the same per poll
        as a short one.
        """
        offset, mine, last_status = 0, False, None
        log_offset = log_tail_offset(job.log_path)
        milestones: list[dict[str, Any]] = []  # this run's start / error / end events
        earlier: dict[int, float] = {}  # step -> loss of the runs before this one in the same file
        while True:
            path = find_events_file(job)
            if path is not None:
                events, offset = read_events(path, offset)
                for event in events:
                    if event.get("event") == "start":
                        mine = is_own_start(event, job)
                        if mine and earlier:
                            # A resumed run continues the earlier runs' curve up to its checkpoint; steps
                            # after it were redone (the latest run's value wins for a step run twice).
                            upto = int(event.get("start_step") or 0)
                            points = sorted([s, v] for s, v in earlier.items() if s <= upto)
                            if points:
                                yield sse("history", {"points": points, "start_step": upto})
                    if not mine and event.get("event") == "step" and event.get("loss") is not None:
                        earlier[int(event["step"])] = float(event["loss"])
                    if mine:
                        yield sse("train", event)
                        if event.get("event") in ("start", "error", "end"):
                            milestones.append(event)
            log_offset, lines, partial = read_new_lines(job.log_path, log_offset)
            if lines or partial:
                yield sse("log", {"lines": lines, "partial": partial})
            alive = store.alive(job)
            status, message = run_status(job, alive, milestones)
            # The `end` event comes a moment before the process exits: report both changes.
            if (status, alive) != last_status:
                last_status = (status, alive)
                yield sse("status", {"id": job.id, "status": status, "message": message, "alive": alive,
                                     "returncode": job.returncode})  # fmt: skip
            if not alive and status not in ("starting", "running", "stopping"):
                yield sse("done", {"status": status})
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.5)

    # --- LoRAs, uploads, previews --------------------------------------------------------------
    @app.get("/api/loras")
    async def list_loras() -> list[dict[str, Any]]:
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
    async def upload_image(request: Request, file: UploadFile = File(...)) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_upload_bytes + 64 * 1024:
            raise HTTPException(413, f"upload is larger than the {settings.max_upload_bytes}-byte limit")
        data = await file.read(settings.max_upload_bytes + 1)
        image = security.decode_upload_image(data, max_bytes=settings.max_upload_bytes)
        upload_id = secrets.token_hex(16)  # random name: the client never chooses a file name
        image.save(uploads / f"{upload_id}.png", format="PNG")
        return {"id": upload_id, "width": image.width, "height": image.height, "name": file.filename}

    @app.get("/api/uploads/{upload_id}")
    async def get_upload(upload_id: str) -> FileResponse:
        return FileResponse(upload_file(upload_id), media_type="image/png")

    def upload_file(upload_id: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{32}", upload_id):
            raise HTTPException(400, "bad upload id")
        path = uploads / f"{upload_id}.png"
        if not path.is_file():
            raise HTTPException(404, f"no upload {upload_id}; upload the start frame again")
        return path

    @app.post("/api/previews")
    async def start_preview(body: PreviewBody) -> dict[str, Any]:
        image = upload_file(body.upload)
        model = body.model or saved_config().get("pretrained_model_name_or_path")
        if not model:
            raise HTTPException(422, "no model: set pretrained_model_name_or_path on the Config page")
        model_path = security.resolve_inside(model, settings.roots, what="model")
        if not re.fullmatch(r"\d+\s*[xX]\s*\d+|\d+p", body.resolution.strip()):
            raise HTTPException(422, f"resolution {body.resolution!r}: use HEIGHTxWIDTH such as 480x832")
        args = ["sample", "--model", str(model_path), "--image", str(image), "--prompt", body.prompt, "--progress-json"]
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
        job_id, folder = store.new_folder("preview")
        output = folder / "preview.mp4"
        args += [
            "--frames", str(body.frames), "--steps", str(steps), "--guidance", str(guidance),
            "--resolution", body.resolution.strip(), "--seed", str(body.seed), "--output", str(output),
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
    async def list_previews() -> list[dict[str, Any]]:
        return [preview_summary(job) for job in store.list("preview")]

    @app.get("/api/previews/{job_id}")
    async def get_preview(job_id: str) -> dict[str, Any]:
        return preview_summary(job_or_404(store, "preview", job_id))

    @app.post("/api/previews/{job_id}/stop")
    async def stop_preview(job_id: str) -> dict[str, Any]:
        job = job_or_404(store, "preview", job_id)
        if not store.stop(job):
            raise HTTPException(409, f"preview {job_id} is not running")
        return preview_summary(job)

    @app.get("/api/previews/{job_id}/video")
    async def preview_video(job_id: str) -> FileResponse:
        job = job_or_404(store, "preview", job_id)
        output = Path(job.extra["output"])
        if not output.is_file():
            raise HTTPException(404, f"preview {job_id} has no video yet")
        return FileResponse(output, media_type="video/mp4")

    return app


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
