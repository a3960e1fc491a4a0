"""The state every router shares, handed to routes as a FastAPI dependency.

`create_app` builds one `ServerState` and stores it on `app.state.server`; a route asks for it with
`state: ServerState = Depends(get_state)` (or the `StateDep` shorthand). A test mounts a single router
on a bare FastAPI app and sets `app.dependency_overrides[get_state]` to a state of its own: no
middleware, no other router and no `create_app` needed.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request

from longcat_tuner.server.configfiles import config_files_lock, launch_files, read_json_file
from longcat_tuner.server.jobs import Job, JobStore
from longcat_tuner.server.settings import ServerSettings

MAX_JOB_ID = 64


@dataclass
class ServerState:
    """Settings, the job store, the uploads folder and the lock that serialises job starts."""

    settings: ServerSettings
    store: JobStore
    # Starting a job (check, run, preview) holds this lock from the "is it busy" test to the start.
    launching: threading.Lock = field(default_factory=threading.Lock)
    # The saved config pair is written (and read) as one unit under this lock (`config_files`).
    config_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, settings: ServerSettings) -> "ServerState":
        """The state of a server on `settings.data_dir`, its folders created."""
        data_dir = settings.data_dir.resolve()
        for sub in ("config", "uploads", "jobs"):
            (data_dir / sub).mkdir(parents=True, exist_ok=True)
        store = JobStore(data_dir / "jobs", cwd=settings.cwd, cli=list(settings.cli) or None)
        return cls(settings=settings, store=store)

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir.resolve()

    @property
    def uploads(self) -> Path:
        return self.data_dir / "uploads"

    def config_files(self):  # type: ignore[no-untyped-def]
        """A context that holds the config pair's lock (this server's threads and, through a lock file beside
        the files, another server process on the same data folder)."""
        return config_files_lock(self.config_lock, self.settings.config_path.parent)

    def job(self, kind: str, job_id: str) -> Job:
        """The job, or 404 naming the id (ids are checked before they touch the file system: at most
        MAX_JOB_ID characters of letters, digits, `-` and `_`; the server's own ids are 22)."""
        valid = len(job_id) <= MAX_JOB_ID and re.fullmatch(r"[0-9A-Za-z_-]+", job_id)
        try:
            job = self.store.get(kind, job_id) if valid else None
        except (OSError, ValueError, KeyError, TypeError):  # a job.json torn by a crash or unreadable
            job = None
        if job is None:
            shown = job_id if len(job_id) <= 80 else job_id[:40] + "..."
            raise HTTPException(404, f"no {kind} with id {shown!r}")
        return job

    def stop(self, kind: str, job_id: str) -> Job:
        """Send SIGTERM to a job's process; 409 when it is not running. A second stop while the first is being
        handled (stop requested, process alive) sends nothing and answers the same `stopping` status."""
        job = self.job(kind, job_id)
        if not self.store.stop(job):
            raise HTTPException(409, f"{kind} {job_id} is not running")
        return job

    @staticmethod
    def job_status(job: Job, *, alive: bool, produced: bool) -> str:
        """A check's or preview's status: running / stopping while its process is `alive`, then
        completed when it `produced` its output, stopped when it was stopped from the UI, else failed."""
        if alive:
            return "stopping" if job.stop_requested else "running"
        return "completed" if produced else "stopped" if job.stop_requested else "failed"

    def saved_config(self) -> dict[str, Any]:
        """The config saved from the Config page (409 before the first save)."""
        with self.config_files():
            return self._read_saved_config()

    def _read_saved_config(self) -> dict[str, Any]:
        path = self.settings.config_path
        if not path.is_file():
            raise HTTPException(409, "no saved config yet: fill the Config page and press Save")
        config = read_json_file(path, None)
        if not isinstance(config, dict):
            raise HTTPException(422, f"{path} is not a JSON object of settings; save the Config page again")
        return config

    def saved_files(self) -> tuple[dict[str, Any], list[Any]]:
        """The saved config and datasets, paths absolute and every implied path checked (403 otherwise)."""
        settings = self.settings
        with self.config_files():  # both files from one save
            config, datasets = self._read_saved_config(), read_json_file(settings.datasets_path, [])
        return launch_files(
            settings, config, datasets,
            config_dir=settings.config_path.parent, datasets_dir=settings.datasets_path.parent,
        )  # fmt: skip

    def check_job_room(self) -> None:
        """429 when `max_jobs` check/preview jobs already run (each loads a model; a preview holds a GPU)."""
        running = self.store.running("check", "preview")
        limit = self.settings.max_jobs
        if len(running) >= limit:
            names = ", ".join(f"{job.kind} {job.id}" for job in running)
            raise HTTPException(
                429, f"{len(running)} job{'s' if len(running) != 1 else ''} already running ({names}); wait or stop one "
                f"(at most {limit} check/preview jobs run at a time)",
            )  # fmt: skip


def get_state(request: Request) -> ServerState:
    """The app's shared state (a dependency; tests override it)."""
    return request.app.state.server


StateDep = Annotated[ServerState, Depends(get_state)]
