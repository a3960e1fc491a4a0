"""`/api/loras`, `/api/models`, `/api/uploads` and `/api/previews`: image-to-video previews through
`longcat-tuner sample`.

The LoRA list holds the LoRAs of this server's runs and of every run folder (one with the trainer's
`events.jsonl`) found in the allowed folders, so a LoRA trained from the command line can be picked
too; any other `.safetensors` file inside the allowed folders can be named by path. The model list holds the
saved config's base model and the full fine-tunes of the same run folders (`model_type: full`: their output_dir,
which `sample --model` takes with the base model recorded in its base_model.json).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import time
import unicodedata
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Optional

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field, field_validator
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from longcat_tuner.config.resolution import parse_resolution
from longcat_tuner.config.sampling import MAX_SEED, MIN_I2V_FRAMES, SAMPLING_DEFAULTS
from longcat_tuner.fsutil import atomic_file
from longcat_tuner.server import security
from longcat_tuner.server.deps import ServerState, StateDep
from longcat_tuner.server.jobs import EVENTS_FILE, Job, tail_lines

router = APIRouter()
# Multipart framing (boundaries, part headers) an upload may add to the image itself.
MULTIPART_OVERHEAD = 64 * 1024
# Preview bounds: the sampler needs (frames - 1) % 4 == 0 and sides divisible by 16.
MAX_PREVIEW_FRAMES = 257
MAX_PREVIEW_SIDE = 2048
MAX_PREVIEW_PIXELS = 1280 * 1280  # 720x1280 (720p) fits
MAX_PROMPT_CHARS = 4000
# How far the LoRA list looks for run folders below each allowed folder (a root may hold a large
# dataset tree: the walk stops at this depth, folder count and time, whichever comes first).
RUN_SCAN_DEPTH = 4
RUN_SCAN_MAX_DIRS = 5000
RUN_SCAN_SECONDS = 2.0


class PreviewBody(BaseModel):
    upload: str = Field(..., description="Id of an uploaded start frame (POST /api/uploads).")
    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    model: Optional[str] = Field(
        None, description="Checkpoint root, or a full fine-tune's output_dir from GET /api/models (its DiT with the "
        "base model's text encoder and VAE); default: the saved config's model.",
    )  # fmt: skip
    dit: Optional[str] = Field(
        None, description="A full fine-tune's DiT folder (output_dir/dit) to sample instead of the model's own dit/; "
        "the model is then the base it was trained from. Empty: the model's DiT.",
    )  # fmt: skip
    lora: Optional[str] = Field(
        None, description="A LoRA file from GET /api/loras or any .safetensors path inside the allowed folders; "
        "empty: the base model.",
    )  # fmt: skip
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

    @field_validator("frames")
    @classmethod
    def _video_frames(cls, value: int) -> int:
        if value < MIN_I2V_FRAMES:  # `sample` would start, load the model, then fail
            raise ValueError(
                f"a preview starts from its start frame, and image-to-video needs at least {MIN_I2V_FRAMES} frames "
                f"(1 + 4k: 5, 9, ..., 93); got {value}"
            )
        return value

    @field_validator("prompt")
    @classmethod
    def _printable(cls, value: str) -> str:
        bad = sorted({f"U+{ord(c):04X}" for c in value if unicodedata.category(c) == "Cc" and c not in "\t\n\r"})
        if bad:
            raise ValueError(f"the prompt contains control characters ({', '.join(bad[:5])}); remove them")
        if not value.strip():
            raise ValueError("the prompt is empty; describe the motion")
        return value


# --- LoRAs -------------------------------------------------------------------------------------------
def looks_like_lora(file: Path) -> bool:
    # The trainer names its LoRA files `longcat_lora*.safetensors` (run folder and each checkpoint);
    # `trainable.safetensors` in a checkpoint holds trainer-internal names, and `.tmp-*` folders are
    # checkpoints still being written.
    return "lora" in file.name.lower() and not any(part.startswith(".tmp") for part in file.parts)


def run_loras(run_dir: Path) -> list[Path]:
    """The LoRA files of a run folder in the trainer's layout: final ones in the folder, one per checkpoint."""
    files = sorted(run_dir.glob("*.safetensors")) + sorted(run_dir.glob("checkpoints/*/*.safetensors"))
    return [file for file in files if looks_like_lora(file)]


def find_run_folders(roots: Iterable[Path], *, depth: int = RUN_SCAN_DEPTH, max_dirs: int = RUN_SCAN_MAX_DIRS,
                     seconds: float = RUN_SCAN_SECONDS) -> list[Path]:  # fmt: skip
    """Folders holding a trainer `events.jsonl` within `depth` levels of each root (hidden folders and
    symlinks to folders are not entered; a run folder's own subfolders are not searched)."""
    found: list[Path] = []
    deadline = time.monotonic() + seconds
    visited = 0
    queue = [(Path(root), 0) for root in roots]
    while queue and visited < max_dirs and time.monotonic() < deadline:
        folder, level = queue.pop(0)
        visited += 1
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        if any(entry.name == EVENTS_FILE and entry.is_file() for entry in entries):
            found.append(folder)
            continue
        if level < depth:
            queue += [
                (Path(entry.path), level + 1) for entry in sorted(entries, key=lambda e: e.name)
                if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False)
            ]  # fmt: skip
    return found


def lora_entry(file: Path, run_dir: Path, run: Optional[str]) -> dict[str, Any]:
    return {"path": str(file), "run": run, "run_dir": str(run_dir), "name": str(file.relative_to(run_dir)),
            "modified": file.stat().st_mtime}  # fmt: skip


@router.get("/api/loras")
def list_loras(state: StateDep) -> list[dict[str, Any]]:
    """LoRAs of this server's runs (`run`: the run id) and of run folders in the allowed folders (`run`: null)."""
    found: dict[str, dict[str, Any]] = {}
    for job in state.store.list("run"):
        output_dir = Path(job.extra.get("output_dir") or "")
        if output_dir.is_dir():
            for file in run_loras(output_dir):
                found.setdefault(str(file.resolve()), lora_entry(file, output_dir, job.id))
    for run_dir in find_run_folders(state.settings.roots):
        for file in run_loras(run_dir):
            found.setdefault(str(file.resolve()), lora_entry(file, run_dir, None))
    return sorted(found.values(), key=lambda item: -item["modified"])


# --- models: the base and full fine-tunes -------------------------------------------------------------
def run_model(run_dir: Path) -> Optional[dict[str, Any]]:
    """A full fine-tune's result in a run folder (its dit/ and the base_model.json `train` writes beside it), as
    GET /api/models lists it, or None."""
    from longcat_tuner.model.sources import BASE_MODEL_FILE, pointer_payload

    pointer = run_dir / BASE_MODEL_FILE
    if not pointer.is_file() or not (run_dir / "dit" / "config.json").is_file():
        return None
    recorded = pointer_payload(pointer)
    return {"path": str(run_dir), "kind": "full", "dit": str(run_dir / "dit"), "base_model": recorded.get("base_model"),
            "step": recorded.get("step"), "modified": pointer.stat().st_mtime}  # fmt: skip


@router.get("/api/models")
def list_models(state: StateDep) -> list[dict[str, Any]]:
    """Models a preview can use: the saved config's base model (`kind: base`) and the full fine-tunes of this
    server's runs (`run`: its id) and of run folders in the allowed folders (`kind: full`, newest first; each
    `path` is the run's output_dir, which `sample --model` takes as it is)."""
    found: dict[str, dict[str, Any]] = {}
    for job in state.store.list("run"):
        output_dir = Path(job.extra.get("output_dir") or "")
        entry = run_model(output_dir) if output_dir.is_dir() else None
        if entry is not None:
            found.setdefault(str(output_dir.resolve()), {**entry, "run": job.id})
    for run_dir in find_run_folders(state.settings.roots):
        entry = run_model(run_dir)
        if entry is not None:
            found.setdefault(str(run_dir.resolve()), {**entry, "run": None})
    models = sorted(found.values(), key=lambda item: -item["modified"])
    try:
        base = state.saved_config().get("pretrained_model_name_or_path")
    except Exception:  # an unreadable saved config is reported by GET /api/config; the fine-tunes are still listed
        base = None
    if isinstance(base, str) and base.strip():
        models.insert(0, {"path": base, "kind": "base", "run": None})
    return models


def preview_sources(model_path: Path, dit: Optional[str], roots: Iterable[Path]) -> tuple[Optional[Path], Path]:
    """(the --dit to pass or None, the base model folder) of a preview: a full fine-tune's output_dir as the model
    resolves to its recorded base, which must lie inside the allowed folders too; a DiT folder that does not fit
    the model (another size, incomplete) is refused now (422), not after the subprocess starts loading."""
    from longcat_tuner.errors import CheckpointError
    from longcat_tuner.model.sources import resolve_model

    dit_path = security.resolve_inside(dit.strip(), roots, what="dit") if dit and dit.strip() else None
    try:
        sources = resolve_model(model_path, dit_path, model_flag="model", dit_flag="dit")
    except CheckpointError as err:
        raise HTTPException(422, str(err)) from None
    root = security.resolve_inside(sources.root, roots, what="base model")  # a pointer may name any folder
    if sources.fine_tuned:  # the pointer's DiT folder beside it may be a symlink to any folder too
        security.resolve_inside(sources.dit, roots, what="dit")
    return dit_path, root


# --- uploads -----------------------------------------------------------------------------------------
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


@router.post("/api/uploads")
async def upload_image(request: Request, state: StateDep) -> dict[str, Any]:
    """A start frame as the multipart field `file`, at most `max_upload_bytes`.

    The body is counted as it streams in (a chunked body has no Content-Length): past the limit
    the server stops reading and answers 413. Nothing is written to disk before the image is
    decoded; the part is held in memory (bounded by the limit), and only the decoded image is
    saved, under a random name.
    """
    max_bytes = state.settings.max_upload_bytes
    limit = max_bytes + MULTIPART_OVERHEAD
    too_large = f"upload is larger than the {max_bytes}-byte limit; use a smaller start frame"
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
    return await run_in_threadpool(store_upload, state, data, name)


def store_upload(state: ServerState, data: bytes, name: Optional[str]) -> dict[str, Any]:
    image = security.decode_upload_image(data, max_bytes=state.settings.max_upload_bytes)
    upload_id = secrets.token_hex(16)  # random name: the client never chooses a file name
    target = state.uploads / f"{upload_id}.png"
    try:
        with atomic_file(target, suffix=".tmp") as partial:
            image.save(partial, format="PNG")
    except OSError as err:
        raise HTTPException(507, f"cannot store the upload in {state.uploads}: {err}; free space there") from None
    return {"id": upload_id, "width": image.width, "height": image.height, "name": name}


def upload_file(state: ServerState, upload_id: str) -> Path:
    if not re.fullmatch(r"[0-9a-f]{32}", upload_id):
        raise HTTPException(400, "bad upload id")
    path = state.uploads / f"{upload_id}.png"
    if not path.is_file():
        raise HTTPException(404, f"no upload {upload_id}; upload the start frame again")
    return path


@router.get("/api/uploads/{upload_id}")
def get_upload(upload_id: str, state: StateDep) -> FileResponse:
    return FileResponse(upload_file(state, upload_id), media_type="image/png")


# --- previews ----------------------------------------------------------------------------------------
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


def log_event(line: str) -> Optional[dict[str, Any]]:
    """The JSON event a `sample --progress-json` line holds (`{"event": ...}`), or None for plain output."""
    if not line.startswith("{"):
        return None
    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        return None
    return message if isinstance(message, dict) and isinstance(message.get("event"), str) else None


def preview_progress(lines: list[str]) -> Optional[dict[str, int]]:
    """Latest `{"event": "sample_step", "step", "total"}` line printed by `sample --progress-json`."""
    for line in reversed(lines):
        message = log_event(line)
        if message is not None and message["event"] == "sample_step":
            return {"done": int(message["step"]), "total": int(message["total"])}
    return None


def human_line(message: dict[str, Any]) -> str:
    """One progress event in words: `sampling step 3 / 16`, `done: wrote ... (5 frames, 64x64)`, `error: ...`."""
    kind = message["event"]
    fields = {k: v for k, v in message.items() if k not in ("event", "time")}
    if kind == "sample_done":
        size = f", {fields['height']}x{fields['width']}" if "height" in fields and "width" in fields else ""
        frames = f"{fields['frames']} frames" if "frames" in fields else ""
        return f"done: wrote {fields.get('output', 'the video')}" + (f" ({frames}{size})" if frames or size else "")
    if kind == "error" or "message" in fields and len(fields) == 1:
        return f"{kind}: {fields.get('message', '')}"
    what = kind.removeprefix("sample_").replace("_", " ")
    what = "sampling" if what == "step" else what
    if "step" in fields and "total" in fields:
        rest = {k: v for k, v in fields.items() if k not in ("step", "total")}
        extra = "".join(f", {k} {v}" for k, v in rest.items())
        return f"{what} step {fields['step']} / {fields['total']}{extra}"
    return f"{what}: " + ", ".join(f"{k} {v}" for k, v in fields.items()) if fields else what


def preview_messages(lines: list[str]) -> list[str]:
    """The log as the page shows it: events in words, consecutive step events as their latest one."""
    out: list[str] = []
    previous_kind = None
    for line in lines:
        message = log_event(line)
        text = human_line(message) if message is not None else line
        kind = message["event"] if message is not None and "step" in message and "total" in message else None
        if kind is not None and kind == previous_kind:
            out[-1] = text  # a progress bar: its latest state
        else:
            out.append(text)
        previous_kind = kind
    return out


@router.post("/api/previews")
def start_preview(body: PreviewBody, state: StateDep) -> dict[str, Any]:
    roots = state.settings.roots
    image = upload_file(state, body.upload)
    model = body.model or state.saved_config().get("pretrained_model_name_or_path")
    if not model:
        raise HTTPException(422, "no model: set pretrained_model_name_or_path on the Config page")
    model_path = security.resolve_inside(model, roots, what="model")
    resolution = preview_resolution(body.resolution)
    if (body.frames - 1) % 4:
        down = body.frames - (body.frames - 1) % 4
        raise HTTPException(422, f"frames {body.frames}: the VAE needs (frames - 1) % 4 == 0, e.g. {down} or {down + 4}")
    # `--prompt=<text>`: a prompt that starts with `-` is then the option's value, not an option.
    args = ["sample", "--model", str(model_path), "--image", str(image), f"--prompt={body.prompt}", "--progress-json"]
    if body.lora:
        lora = security.resolve_inside(body.lora.strip(), roots, what="lora")
        if not lora.is_file() or lora.suffix != ".safetensors":
            raise HTTPException(404, f"LoRA {lora} is not a .safetensors file")
        args += ["--lora", str(lora)]
    dit_path, base_root = preview_sources(model_path, body.dit, roots)
    if dit_path is not None:
        args += ["--dit", str(dit_path)]
    steps, guidance = body.steps, body.guidance
    if body.fast:
        # The official CFG- and step-distilled LoRA: 16 steps on the distilled grid, no CFG (MODEL.md 4.4).
        distill = base_root / "lora" / "cfg_step_lora.safetensors"  # a full fine-tune's: its base model's
        if not distill.is_file():
            raise HTTPException(404, f"fast preview needs the official {distill}; it is not in the model folder")
        args += ["--lora", str(distill), "--distilled"]
        steps, guidance = 16, 1.0
    with state.launching:
        state.check_job_room()
        job_id, folder = state.store.new_folder("preview")
        output = folder / "preview.mp4"
        args += [
            "--frames", str(body.frames), "--steps", str(steps), "--guidance", str(guidance),
            "--resolution", resolution, "--seed", str(body.seed), "--output", str(output),
        ]  # fmt: skip
        job = state.store.start("preview", job_id, folder, args, {"output": str(output), "request": body.model_dump()})
    return preview_summary(state, job)


def preview_summary(state: ServerState, job: Job) -> dict[str, Any]:
    alive = state.store.alive(job)
    output = Path(job.extra["output"])
    lines = tail_lines(job.log_path, 40)
    status = state.job_status(job, alive=alive, produced=job.returncode in (0, None) and output.is_file())
    return {
        "id": job.id,
        "status": status,
        "returncode": job.returncode,
        "progress": preview_progress(lines),
        "request": job.extra.get("request"),
        "video": f"/api/previews/{job.id}/video" if status == "completed" else None,
        "log": lines,
        "messages": preview_messages(lines),
        "started": job.started,
    }


@router.get("/api/previews")
def list_previews(state: StateDep) -> list[dict[str, Any]]:
    return [preview_summary(state, job) for job in state.store.list("preview")]


@router.get("/api/previews/{job_id}")
def get_preview(job_id: str, state: StateDep) -> dict[str, Any]:
    return preview_summary(state, state.job("preview", job_id))


@router.post("/api/previews/{job_id}/stop")
def stop_preview(job_id: str, state: StateDep) -> dict[str, Any]:
    return preview_summary(state, state.stop("preview", job_id))


@router.get("/api/previews/{job_id}/video")
def preview_video(job_id: str, state: StateDep) -> FileResponse:
    job = state.job("preview", job_id)
    output = Path(job.extra["output"])
    if not output.is_file():
        raise HTTPException(404, f"preview {job_id} has no video yet")
    return FileResponse(output, media_type="video/mp4")
