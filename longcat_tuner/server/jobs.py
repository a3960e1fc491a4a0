"""CLI subprocesses started by the web UI (train, check, sample) and what they report.

Each job gets a folder under the server's data folder holding `job.json` (argv, pid, times, exit
code), the process output `process.log` and, for runs, the config snapshot it was started with.
Status is derived, never cached: a job is running while its pid is alive (checked against the
process start time so a recycled pid does not count), and a train run's outcome comes from the
`end` event of its own `events.jsonl`. Without an `end` event a run is `stopped` (stopped from the
UI), `completed` (exit code 0) or `died`. Events files are summarised incrementally (`EVENTS`): a
request reads only the bytes appended since the last one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

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
        self._stop_lock = threading.Lock()  # a stop's check-and-signal, so two requests send one SIGTERM

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
        """Write `job.json`, keeping what another request recorded meanwhile (exit code, stop time, extra).

        Requests run in worker threads: one may hold an older copy of the job (loaded before another
        recorded the exit code), so known values on disk are merged in rather than overwritten.
        """
        path = job.folder / JOB_FILE
        with self._lock:
            try:
                disk = json.loads(path.read_text())
            except (OSError, ValueError):
                disk = {}
            if job.returncode is None and disk.get("returncode") is not None:
                job.returncode = disk["returncode"]
            if job.stop_requested is None and disk.get("stop_requested") is not None:
                job.stop_requested = disk["stop_requested"]
            job.extra = {**(disk.get("extra") or {}), **job.extra}
            tmp = job.folder / f"{JOB_FILE}.{os.getpid()}-{threading.get_ident()}.tmp"
            tmp.write_text(json.dumps(job.to_json(), indent=2))
            tmp.replace(path)

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
        jobs = []
        for child in sorted(folder.iterdir(), reverse=True):
            try:
                job = self.get(kind, child.name)
            except (OSError, ValueError, KeyError, TypeError):  # a job.json torn by a crash: skip that one
                continue
            if job is not None:
                jobs.append(job)
        return jobs

    def running(self, *kinds: str) -> list[Job]:
        """The jobs of `kinds` whose process is alive."""
        return [job for kind in kinds for job in self.list(kind) if self.alive(job)]

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
        """SIGTERM: the trainer then writes a resumable checkpoint and an `end` event. False when the process
        is not running. Sent once: while a stop is already requested (by this or another request) and the
        process is alive, nothing is sent again (a second SIGTERM would interrupt the checkpoint being written)
        and the answer is True, as for the first stop."""
        with self._stop_lock:
            if not self.alive(job):
                return False
            if job.stop_requested is None:  # another request may have stopped it since `job` was read
                try:
                    stored = self.get(job.kind, job.id)
                except (OSError, ValueError, KeyError, TypeError):  # a job.json torn by a crash
                    stored = None
                if stored is not None:
                    job.stop_requested = stored.stop_requested
            if job.stop_requested is not None:
                return True  # already stopping
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
    # tqdm redraws progress bars with carriage returns: keep the last state of each line; its cursor moves
    # (`ESC [ A`) and any colour codes are terminal controls, not text for the page.
    # (split on newlines only: `splitlines` also splits on the carriage returns, leaving every redraw a line)
    lines = [_TERMINAL_CODES.sub("", line.rstrip("\r").rsplit("\r", 1)[-1])
             for line in data.decode("utf-8", "replace").split("\n")]
    return [line for line in lines if line.strip()][-count:]


_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
CLI_ERROR_PREFIX = "error: "  # how the CLI prints an error it names (cli.main), the line a died job left


def last_error_line(path: Path) -> Optional[str]:
    """The CLI's last `error: ...` line in a job's log, without the prefix, or None: why a process that wrote
    no error event stopped (a run refused at start, e.g. an output_dir holding another run)."""
    for line in reversed(tail_lines(path, count=50)):
        if line.startswith(CLI_ERROR_PREFIX):
            return line[len(CLI_ERROR_PREFIX):].strip()
    return None


def read_events(path: Path, offset: int = 0, max_bytes: Optional[int] = None) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines of an events file from byte `offset`; returns them and the next offset.

    A line still being written (no trailing newline yet) is left for the next read. `max_bytes` reads
    about that much (whole lines; more only when one line is longer), so a caller can go through a
    long file in steps.
    """
    if not path.is_file():
        return [], offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        if max_bytes is None:
            data = handle.read()
        else:
            data = handle.read(max_bytes)
            while data and b"\n" not in data:  # one line longer than the budget: read on to its end
                more = handle.read(max_bytes)
                if not more:
                    break
                data += more
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
    (an earlier run into the same output_dir) are skipped, the newest matching one wins. Files are
    read through `EVENTS` (incrementally), and the answer is kept in `job.extra["events_file"]`.
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
    return any(segment.start is not None and is_own_start(segment.start, job) for segment in EVENTS.segments(path))


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


def same_folder(a: str | Path | None, b: str | Path | None) -> bool:
    """Whether two paths name one folder (`..`, `~` and symlinks resolved; the folders need not exist)."""
    if not a or not b:
        return False
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        return str(a) == str(b)


# --- incremental summaries of events files ------------------------------------------------------------
# The trainer writes each event with `json.dumps({"event": kind, "time": ..., ...})`: a step line
# starts with this prefix. Step lines are by far the most (one per step); the summary needs only the
# last one and the peak memory, so they are counted and scanned with a regex instead of parsed.
_STEP_PREFIX = b'{"event": "step",'
_OTHER_LINE = re.compile(rb"^(?!" + re.escape(_STEP_PREFIX) + rb")[^\n]*", re.MULTILINE)
_PEAK_MEM = re.compile(rb'"peak_mem_gib": (-?[0-9][0-9.eE+-]*)')


@dataclasses.dataclass
class RunSegment:
    """One run's stretch of an events file: from its `start` event to the next run's (`start` None:
    lines before any start event). Step events are summarised; every other event is kept."""

    start: Optional[dict[str, Any]]
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # all but `step`, in order
    steps: int = 0
    last_step: Optional[dict[str, Any]] = None
    peak_mem_gib: Optional[float] = None

    def copy(self) -> "RunSegment":
        return dataclasses.replace(self, events=list(self.events))


@dataclasses.dataclass
class _IndexedFile:
    identity: tuple[int, int]  # (st_dev, st_ino): a replaced file is read again from the start
    offset: int = 0
    segments: list[RunSegment] = dataclasses.field(default_factory=lambda: [RunSegment(start=None)])


class EventsIndex:
    """Per-file run summaries of events files, brought up to date by reading only the appended bytes.

    A 300k-step events.jsonl (about 60 MB) is read once; after that a request costs a `stat` and the
    new lines. Thread-safe (requests are answered in worker threads).
    """

    def __init__(self, chunk_bytes: int = 8 << 20) -> None:
        self.chunk_bytes = chunk_bytes
        self._files: dict[str, _IndexedFile] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def segments(self, path: Path) -> list[RunSegment]:
        """The file's run segments (copies), or [] when it does not exist."""
        key = str(path)
        try:
            stat = os.stat(path)
        except OSError:
            return []
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            identity = (stat.st_dev, stat.st_ino)
            state = self._files.get(key)
            if state is None or state.identity != identity or stat.st_size < state.offset:
                state = _IndexedFile(identity)
            if stat.st_size > state.offset:
                self._read(path, state)
            self._files[key] = state
            return [segment.copy() for segment in state.segments if segment.start is not None or segment.events or segment.steps]

    def _read(self, path: Path, state: _IndexedFile) -> None:
        try:
            handle = open(path, "rb")
        except OSError:
            return
        with handle:
            handle.seek(state.offset)
            pending = b""
            while True:
                chunk = handle.read(self.chunk_bytes)
                if not chunk:
                    break
                data = pending + chunk
                end = data.rfind(b"\n") + 1
                if end:
                    self._scan(data, end, state)
                    state.offset += end
                pending = data[end:]

    def _scan(self, data: bytes, end: int, state: _IndexedFile) -> None:
        position = 0
        for match in _OTHER_LINE.finditer(data, 0, end):
            if match.start() > position:
                self._steps(data[position : match.start()], state.segments[-1])
            position = match.end() + 1
            line = match.group().strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a torn line from a crash
            if not isinstance(event, dict):
                continue
            if event.get("event") == "start":
                state.segments.append(RunSegment(start=event, events=[event]))
            elif event.get("event") == "step":  # written by another writer (other spacing)
                self._step_event(event, state.segments[-1])
            else:
                state.segments[-1].events.append(event)
        if position < end:
            self._steps(data[position:end], state.segments[-1])

    @staticmethod
    def _steps(block: bytes, segment: RunSegment) -> None:
        """Step lines (each ending in a newline): counted, peak memory scanned, the last one parsed."""
        lines = block.rstrip(b"\n").split(b"\n")[-8:]  # the last step; the few before if it is torn
        last = None
        for line in reversed(lines):
            try:
                last = json.loads(line)
            except ValueError:
                continue
            if isinstance(last, dict):
                break
            last = None
        segment.steps += block.count(b"\n")
        if last is not None:
            segment.last_step = last
        peaks = []
        for value in _PEAK_MEM.findall(block):
            try:
                peaks.append(float(value))
            except ValueError:
                continue
        if peaks:
            segment.peak_mem_gib = max(peaks + ([segment.peak_mem_gib] if segment.peak_mem_gib is not None else []))

    @staticmethod
    def _step_event(event: dict[str, Any], segment: RunSegment) -> None:
        segment.steps += 1
        segment.last_step = event
        peak = event.get("peak_mem_gib")
        if isinstance(peak, (int, float)):
            segment.peak_mem_gib = peak if segment.peak_mem_gib is None else max(segment.peak_mem_gib, peak)


EVENTS = EventsIndex()


@dataclasses.dataclass
class RunDigest:
    """What the run list needs from a job's events, without holding every step event."""

    events: list[dict[str, Any]]  # this run's events except `step`
    steps: int = 0
    last_step: Optional[dict[str, Any]] = None
    peak_mem_gib: Optional[float] = None


def run_digest(path: Optional[Path], job: Job) -> RunDigest:
    """The digest of `job`'s own segments of the events file at `path` (see `select_run_events`)."""
    digest = RunDigest(events=[])
    if path is None:
        return digest
    for segment in EVENTS.segments(path):
        if segment.start is None or not is_own_start(segment.start, job):
            continue
        digest.events.extend(segment.events)
        digest.steps += segment.steps
        if segment.last_step is not None:
            digest.last_step = segment.last_step
        if segment.peak_mem_gib is not None:
            digest.peak_mem_gib = max(segment.peak_mem_gib, digest.peak_mem_gib or segment.peak_mem_gib)
    return digest
