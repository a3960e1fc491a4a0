"""`/api/runs`: start, stop and resume `longcat-tuner train`, its status from the events file, the
live server-sent event stream, the run's files, and the start frame of each validation video.

A run's status is never cached: it comes from the run's `start` / `error` / `end` events and from
whether its process is alive (`run_status`). Events files are read incrementally (`jobs.EVENTS`).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from longcat_tuner.config.datasets import load_datasets
from longcat_tuner.data.backends import pair_dataset
from longcat_tuner.errors import ConfigError
from longcat_tuner.server import security
from longcat_tuner.server.configfiles import launch_files, read_json_file, write_json
from longcat_tuner.server.deps import StateDep
from longcat_tuner.server.jobs import (
    Job,
    JobStore,
    find_events_file,
    is_own_start,
    last_error_line,
    read_events,
    run_digest,
    same_folder,
    select_run_events,
    tail_lines,
)
from longcat_tuner.server.routes.datasets import thumbnail_png
from longcat_tuner.server.settings import CONFIG_NAME, DATASETS_NAME
from longcat_tuner.train import run_lock
from longcat_tuner.train.events import EVENT_KINDS

router = APIRouter()
MEDIA_TYPES = {".mp4": "video/mp4", ".webm": "video/webm", ".mov": "video/quicktime", ".m4v": "video/mp4"}
# The SSE stream reads at most this much of an events file per poll (a long run arrives in steps).
STREAM_CHUNK_BYTES = 4 << 20


class RunBody(BaseModel):
    resume_from: Optional[str] = Field(None, description="Run id whose config and output_dir to resume.")


# --- status and summary ------------------------------------------------------------------------------
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
    reason = errors[-1] if errors else last_error_line(job.log_path)
    return "died", message + (f": {reason}" if reason else "; see the log below")


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
        chosen = run_events(job)[1] if "step" in kinds else digest.events
        summary["events"] = [e for e in chosen if e.get("event") in kinds]
        summary["log"] = tail_lines(job.log_path, 100)
    return summary


def output_dir_busy(store: JobStore, output_dir: Any) -> Optional[str]:
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


# --- routes ------------------------------------------------------------------------------------------
@router.get("/api/runs")
def list_runs(state: StateDep) -> list[dict[str, Any]]:
    return [run_summary(state.store, job) for job in state.store.list("run")]


@router.post("/api/runs")
def start_run(body: RunBody, state: StateDep) -> dict[str, Any]:
    store = state.store
    if body.resume_from:
        previous = state.job("run", body.resume_from)
        config, datasets = launch_files(
            state.settings, read_json_file(previous.folder / CONFIG_NAME, {}),
            read_json_file(previous.folder / DATASETS_NAME, []),
            config_dir=previous.folder, datasets_dir=previous.folder,
        )  # fmt: skip
        config["resume_from_checkpoint"] = "latest"
    else:
        config, datasets = state.saved_files()
    with state.launching:
        busy = output_dir_busy(store, config.get("output_dir"))
        if busy:
            raise HTTPException(409, busy)
        job_id, folder = store.new_folder("run")
        # The run keeps its own snapshot, so editing the config later does not change it.
        config["data_backend_config"] = str(folder / DATASETS_NAME)
        write_json(folder / DATASETS_NAME, datasets)
        write_json(folder / CONFIG_NAME, config)
        job = store.start(
            "run", job_id, folder, ["train", "--config", str(folder / CONFIG_NAME)],
            {"output_dir": config.get("output_dir"), "resumed_from": body.resume_from},
        )  # fmt: skip
    return run_summary(store, job)


@router.get("/api/runs/{run_id}")
def get_run(run_id: str, state: StateDep, events: str = "all") -> dict[str, Any]:
    """The run's summary, log tail and events: `events=all` (default), a comma list of kinds
    (e.g. `validation`, what the gallery needs on a long run) or `none`."""
    return run_summary(state.store, state.job("run", run_id), events=events)


@router.post("/api/runs/{run_id}/stop")
def stop_run(run_id: str, state: StateDep) -> dict[str, Any]:
    return run_summary(state.store, state.stop("run", run_id))


@router.post("/api/runs/{run_id}/resume")
def resume_run(run_id: str, state: StateDep) -> dict[str, Any]:
    job = state.job("run", run_id)
    if state.store.alive(job):
        raise HTTPException(409, f"run {run_id} is still running")
    return start_run(RunBody(resume_from=run_id), state)


@router.get("/api/runs/{run_id}/log")
def run_log(run_id: str, state: StateDep, lines: int = 200) -> dict[str, Any]:
    job = state.job("run", run_id)
    return {"lines": tail_lines(job.log_path, max(1, min(lines, 2000)))}


@router.get("/api/runs/{run_id}/files/{relative:path}")
def run_file(run_id: str, relative: str, state: StateDep) -> FileResponse:
    job = state.job("run", run_id)
    digest = run_digest(find_events_file(job), job)
    # The run folder comes from the events file (anyone who can write it can name any folder): it must
    # itself lie inside the allowed folders before anything in it is served.
    run_dir = security.resolve_inside(run_dir_of(job, digest.events), state.settings.roots, what="run folder")
    file = security.child_path(run_dir, relative, what="run file")
    if not file.is_file():
        raise HTTPException(404, f"{relative} does not exist in run {run_id}")
    return FileResponse(file, media_type=MEDIA_TYPES.get(file.suffix.lower()))


@router.get("/api/runs/{run_id}/start-frame")
def validation_start_frame(run_id: str, video: str, state: StateDep, size: int = 256) -> Response:
    """A thumbnail of the start frame a validation video (`video`, as its event names it) began from."""
    job = state.job("run", run_id)
    file = start_frame_of(run_digest(find_events_file(job), job).events, video)  # every event but `step`
    return Response(thumbnail_png(security.resolve_inside(file, state.settings.roots, what="start frame"), size),
                    media_type="image/png")  # fmt: skip


def start_frame_of(events: list[dict[str, Any]], video: str) -> Path:
    """The start frame of the validation item whose `video` is `video` (404 when it cannot be told).

    An item that names its `start_frame` is taken at its word. Otherwise the run's own files tell:
    validation samples come from the eval split (`eval_dataset_id` of the run's config, in its `start`
    event), its clips are paired with start frames as `check` pairs them (`data.backends.pair_dataset`),
    and the video is written as `<index>-<clip stem>.mp4` with the clip's caption as its prompt.
    """
    item = next(
        (i for e in events if e.get("event") == "validation" for i in e.get("items") or [] if i.get("video") == video), None
    )
    if item is None:
        raise HTTPException(404, f"no validation video {video!r} in this run's events")
    if item.get("start_frame"):
        return Path(item["start_frame"])
    start = next((e for e in reversed(events) if e.get("event") == "start"), {})
    config = start.get("config") or {}
    eval_id, datasets_file = config.get("eval_dataset_id"), config.get("data_backend_config")
    if not eval_id or not datasets_file or not config.get("validation_using_datasets", True):
        raise HTTPException(404, f"{video} is a text-to-video validation (no eval split): it has no start frame")
    try:
        datasets = load_datasets(datasets_file)
        sources = pair_dataset(datasets.by_id(eval_id), datasets)[0]
    except (ConfigError, OSError, KeyError) as err:
        raise HTTPException(404, f"cannot read the eval split {eval_id!r} of this run ({err})") from None
    stem = re.sub(r"^\d+-", "", Path(video).stem)
    candidates = [s for s in sources if s.cond_path is not None and s.key.rsplit("/", 1)[-1] == stem]
    if len(candidates) > 1:
        candidates = [s for s in candidates if s.caption == item.get("prompt")]
    if len(candidates) != 1:
        raise HTTPException(404, f"cannot tell which start frame of eval split {eval_id!r} {video} began from "
                                 f"({len(candidates)} candidates named {stem!r})")  # fmt: skip
    return candidates[0].cond_path


# --- live stream ---------------------------------------------------------------------------------------
@router.get("/api/runs/{run_id}/events")
def run_event_stream(run_id: str, request: Request, state: StateDep) -> StreamingResponse:
    job = state.job("run", run_id)
    return StreamingResponse(
        stream_run(state.store, job, request),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def stream_run(store: JobStore, job: Job, request: Request) -> AsyncIterator[bytes]:
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


def sse(kind: str, data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


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
