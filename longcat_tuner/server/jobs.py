"""CLI subprocesses started by the web UI (train, check, sample) and what they report.

Each job gets a folder under the server's data folder holding `job.json` (argv, pid, times, exit
code), the process output `process.log` and, for runs, the config snapshot it was started with.
Status is derived, never cached: a job is running while its pid is alive (checked against the
process start time so a recycled pid does not count), and a train run's outcome comes from the
`end` event of its own `events.jsonl`. A run whose process died without an `end` event is `died`.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import longcat_tuner

JOB_FILE = "job.json"
LOG_FILE = "process.log"
EVENTS_FILE = "events.jsonl"


def cli_command() -> list[str]:
    """How to call `longcat-tuner` with the same interpreter and package as this server."""
    return [sys.executable, "-m", "longcat_tuner.cli"]


def child_env() -> dict[str, str]:
    # The package may run from a checkout that is not pip-installed: make it importable in the child.
    env = dict(os.environ)
    package_parent = str(Path(longcat_tuner.__file__).resolve().parent.parent)
    parts = [package_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env["PYTHONUNBUFFERED"] = "1"  # log tail shows lines as they are printed
    return env


def process_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (Linux), or None where /proc is unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces; the fields after the closing parenthesis are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie has finished
        return None
    return int(fields[19])


def pid_alive(pid: int, start_ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists but belongs to someone else; the start-time check below decides
    if Path("/proc").is_dir():
        ticks = process_start_ticks(pid)
        return ticks is not None and (start_ticks is None or ticks == start_ticks)
    return True


@dataclass
class Job:
    """One subprocess record, as stored in `job.json`."""

    id: str
    kind: str
    folder: Path
    argv: list[str]
    pid: int
    start_ticks: int | None
    started: float
    extra: dict[str, Any]
    returncode: int | None = None
    stop_requested: float | None = None

    @property
    def log_path(self) -> Path:
        return self.folder / LOG_FILE

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "argv": self.argv,
            "pid": self.pid,
            "start_ticks": self.start_ticks,
            "started": self.started,
            "extra": self.extra,
            "returncode": self.returncode,
            "stop_requested": self.stop_requested,
        }

    @classmethod
    def from_json(cls, folder: Path, data: dict[str, Any]) -> "Job":
        return cls(
            id=data["id"],
            kind=data["kind"],
            folder=folder,
            argv=list(data["argv"]),
            pid=int(data["pid"]),
            start_ticks=data.get("start_ticks"),
            started=float(data["started"]),
            extra=dict(data.get("extra") or {}),
            returncode=data.get("returncode"),
            stop_requested=data.get("stop_requested"),
        )


class JobStore:
    """Starts, stops and lists the subprocesses of one kind-folder tree (`<data>/runs`, ...)."""

    def __init__(self, root: Path, *, cwd: Path, cli: list[str] | None = None) -> None:
        self.root = root
        self.cwd = cwd
        self.cli = list(cli) if cli else cli_command()
        self._processes: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def new_folder(self, kind: str) -> tuple[str, Path]:
        job_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        folder = self.root / kind / job_id
        folder.mkdir(parents=True)
        return job_id, folder

    def start(
        self, kind: str, job_id: str, folder: Path, args: list[str], extra: dict[str, Any], *, stdout: Path | None = None
    ) -> Job:
        """Start `longcat-tuner <args>`; output goes to `process.log` (stdout to `stdout` when given)."""
        argv = self.cli + args
        with open(folder / LOG_FILE, "ab") as log, open(stdout or os.devnull, "wb") as out:
            process = subprocess.Popen(
                argv,
                cwd=self.cwd,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=out if stdout else log,
                stderr=log if stdout else subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C on the server does not kill runs it started
            )
        job = Job(
            id=job_id,
            kind=kind,
            folder=folder,
            argv=argv,
            pid=process.pid,
            start_ticks=process_start_ticks(process.pid),
            started=time.time(),
            extra=extra,
        )
        with self._lock:
            self._processes[job_id] = process
        self.save(job)
        return job

    def save(self, job: Job) -> None:
        tmp = job.folder / (JOB_FILE + ".tmp")
        tmp.write_text(json.dumps(job.to_json(), indent=2))
        tmp.replace(job.folder / JOB_FILE)

    def get(self, kind: str, job_id: str) -> Job | None:
        if not job_id or "/" in job_id or job_id.startswith("."):
            return None
        path = self.root / kind / job_id / JOB_FILE
        if not path.is_file():
            return None
        return Job.from_json(path.parent, json.loads(path.read_text()))

    def list(self, kind: str) -> list[Job]:
        folder = self.root / kind
        if not folder.is_dir():
            return []
        jobs = [self.get(kind, child.name) for child in sorted(folder.iterdir(), reverse=True)]
        return [job for job in jobs if job is not None]

    def alive(self, job: Job) -> bool:
        """True while the process runs; records the exit code of our own children once they end."""
        with self._lock:
            process = self._processes.get(job.id)
        if process is not None:
            code = process.poll()  # also reaps the child, so it does not linger as a zombie
            if code is None:
                return True
            if job.returncode is None:
                job.returncode = code
                self.save(job)
            return False
        return pid_alive(job.pid, job.start_ticks)

    def stop(self, job: Job) -> bool:
        """SIGTERM: the trainer then writes a resumable checkpoint and an `end` event."""
        if not self.alive(job):
            return False
        os.kill(job.pid, signal.SIGTERM)
        job.stop_requested = time.time()
        self.save(job)
        return True

    def wait(self, job: Job, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.alive(job):
                return True
            time.sleep(0.1)
        return False


def tail_lines(path: Path, count: int = 200, max_bytes: int = 256 * 1024) -> list[str]:
    """The last `count` lines of a text file, reading at most `max_bytes` from its end."""
    if not path.is_file():
        return []
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - max_bytes))
        data = handle.read()
    # tqdm redraws progress bars with carriage returns: keep the last state of each line.
    lines = [line.rsplit("\r", 1)[-1] for line in data.decode("utf-8", "replace").splitlines()]
    return [line for line in lines if line.strip()][-count:]


def read_events(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines of an events file from byte `offset`; returns them and the next offset.

    A line still being written (no trailing newline yet) is left for the next read.
    """
    if not path.is_file():
        return [], offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line from a crash; the rest of the file is still useful
        if isinstance(event, dict):
            events.append(event)
    return events, offset + end


def find_events_file(job: Job) -> Path | None:
    """The events file of a train run: `<output_dir>/events.jsonl` or one in a run folder below it.

    The trainer's `start` event names its `pid`; files whose start event belongs to another process
    (an earlier run into the same output_dir) are skipped, the newest matching one wins.
    """
    known = job.extra.get("events_file")
    if known and Path(known).is_file():
        return Path(known)
    output_dir = Path(job.extra.get("output_dir", ""))
    if not output_dir.is_dir():
        return None
    candidates = [output_dir / EVENTS_FILE] + sorted(output_dir.glob(f"*/{EVENTS_FILE}"))
    best: tuple[float, Path] | None = None
    for candidate in candidates:
        if not candidate.is_file() or candidate.stat().st_mtime < job.started - 5:
            continue
        if _started_by(candidate, job):
            mtime = candidate.stat().st_mtime
            if best is None or mtime > best[0]:
                best = (mtime, candidate)
    if best is None:
        return None
    # Remember it: later polls skip the folder scan (a resume into the same folder appends to it).
    job.extra["events_file"] = str(best[1])
    return best[1]


def _started_by(path: Path, job: Job) -> bool:
    # A file may hold several runs (a resume appends): any start event of this job counts.
    events, _ = read_events(path)
    return any(e.get("event") == "start" and is_own_start(e, job) for e in events)


def is_own_start(event: dict[str, Any], job: Job) -> bool:
    """Whether a `start` event was written by `job`'s process (the trainer records its pid)."""
    if "pid" in event:
        return event.get("pid") == job.pid
    return float(event.get("time", 0)) >= job.started - 2  # a trainer that does not record its pid


def select_run_events(events: list[dict[str, Any]], job: Job) -> list[dict[str, Any]]:
    """The events of `job` in a file that may also hold earlier (resumed-from) runs' events."""
    mine, out = False, []
    for event in events:
        if event.get("event") == "start":
            mine = is_own_start(event, job)
        if mine:
            out.append(event)
    return out
