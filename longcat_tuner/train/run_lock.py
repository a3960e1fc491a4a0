"""One run per `output_dir`: a lock file that names its holder, taken by `train` for the whole run.

`<output_dir>/longcat-tuner.lock` holds JSON: the holder's pid, host, start time (unix seconds and
ISO) and, on Linux, the process start time in clock ticks (so a recycled pid is not taken for the
holder). Mutual exclusion comes from `fcntl.flock` on that file, which the kernel drops when the
holder dies, even by SIGKILL; the file's contents name the holder in the refusal message and decide
what a lock left behind means:

* held by a live process (flock busy, or the recorded pid alive on this host): refused, naming it;
* left by a process of this host that no longer runs (crash, kill -9): stale, taken over with a warning;
* left by another host: that host cannot be asked, so it is refused, saying which file to delete once
  no run is active there (a shared file system may not carry flock between hosts).

A clean exit, also through an exception, deletes the file. `read_lock(output_dir)` answers "is this
folder in use, by whom" without taking anything (for the web server); no torch import here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional, Union

from longcat_tuner.errors import ConfigError
from longcat_tuner.fsutil import is_out_of_space, symlink_loop, write_failure

try:
    import fcntl
except ImportError:  # not POSIX: the recorded pid and host alone decide
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = "longcat-tuner.lock"


class RunLockedError(ConfigError):
    """Another run holds the output_dir."""


@dataclasses.dataclass(frozen=True)
class LockInfo:
    """Who holds (or held) an output_dir's lock."""

    path: Path  # the lock file (resolved)
    pid: int
    host: str
    started: float  # unix seconds
    start_ticks: Optional[int] = None  # process start time in clock ticks since boot (Linux)
    command: str = ""

    @property
    def started_iso(self) -> str:
        return datetime.datetime.fromtimestamp(self.started).astimezone().isoformat(timespec="seconds")

    @property
    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def holder_alive(self) -> Optional[bool]:
        """True/False when this host can tell (same host), None for a lock of another host."""
        if not self.on_this_host:
            return None
        return process_alive(self.pid, self.start_ticks)

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} since {self.started_iso}"

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "host": self.host, "started": self.started, "started_iso": self.started_iso,
                "start_ticks": self.start_ticks, "command": self.command}


def lock_path(output_dir: Union[str, Path]) -> Path:
    return Path(output_dir).resolve() / LOCK_FILE


def process_start_ticks(pid: int) -> Optional[int]:
    """When `pid` started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid: int, start_ticks: Optional[int] = None) -> bool:
    """Whether `pid` runs on this host and, when `start_ticks` is known, is the same process (not a
    recycled pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    except OSError:
        return False
    if start_ticks is not None:
        ticks = process_start_ticks(pid)
        if ticks is not None and ticks != start_ticks:
            return False
    return True


def _parse(path: Path, text: str) -> Optional[LockInfo]:
    try:
        data = json.loads(text)
        ticks = data.get("start_ticks")
        return LockInfo(path=path, pid=int(data["pid"]), host=str(data["host"]), started=float(data["started"]),
                        start_ticks=int(ticks) if ticks is not None else None, command=str(data.get("command", "")))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _read_info(path: Path) -> Optional[LockInfo]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    return _parse(path, text) if text.strip() else None


def read_lock(output_dir: Union[str, Path]) -> Optional[LockInfo]:
    """The holder of `output_dir`'s lock (resolved path, so `a/../a/out` and symlinks name one folder),
    or None when no run holds it (no lock file, or one left by a process of this host that is gone)."""
    info = _read_info(lock_path(output_dir))
    if info is None or info.holder_alive() is False:
        return None
    return info


def _refusal(info: Optional[LockInfo], output_dir: Path) -> RunLockedError:
    holder = info.describe() if info is not None else "another process (it is writing its lock file)"
    message = f"output_dir {output_dir} is in use by {holder}; wait for it or choose another output_dir"
    if info is not None and not info.on_this_host:
        message += f" (if no run is active on {info.host}, delete {info.path})"
    return RunLockedError(message)


def _same_file(fd: int, path: Path) -> bool:
    """Whether `fd` is still the file at `path` (not one its holder deleted after we opened it)."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


class RunLock:
    """The lock of one output_dir, held from `acquire` to `release` (a context manager too)."""

    def __init__(self, output_dir: Union[str, Path]) -> None:
        loop = symlink_loop(output_dir)
        if loop:
            raise ConfigError(f"output_dir {output_dir} cannot be used: {loop}; point it at a real folder")
        self.output_dir = Path(output_dir).resolve()
        self.path = self.output_dir / LOCK_FILE
        self.info: Optional[LockInfo] = None
        self.took_over: Optional[LockInfo] = None  # the stale holder this lock replaced
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise `RunLockedError` naming the holder; a stale lock is taken over."""
        blocker = next((p for p in (self.output_dir, *self.output_dir.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise ConfigError(
                f"output_dir {self.output_dir} cannot be used: {blocker} is a file, not a folder; set output_dir "
                "to a folder path (the file is left as it is)"
            )
        try:
            return self._acquire()
        except OSError as err:
            fix = "free space there or choose another output_dir" if is_out_of_space(err, self.output_dir) else (
                "choose an output_dir you can write to")  # read-only or not ours: no space to free
            raise ConfigError(f"cannot write the lock file {self.path}: {write_failure(err, self.output_dir)}; {fix}") from err

    def _acquire(self) -> "RunLock":
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(20):  # the holder may delete the file between our open and our flock: open again
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._flock(fd):
                    raise _refusal(_read_info(self.path), self.output_dir)
                if not _same_file(fd, self.path):
                    os.close(fd)
                    continue
                previous = _parse(self.path, os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))
                if previous is not None and previous.holder_alive() is not False:
                    # Alive on this host (a file system without flock) or another host's: not ours to take.
                    raise _refusal(previous, self.output_dir)
                self._write(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            self._fd, self.took_over = fd, previous
            if previous is not None:
                print(f"warning: {self.output_dir} had a stale lock of {previous.describe()}, which is no longer "
                      "running; taking it over", file=sys.stderr)
            return self
        raise RunLockedError(f"could not take the lock {self.path}: it keeps being replaced; is another run starting?")

    @staticmethod
    def _flock(fd: int) -> bool:
        """False when another open file holds the flock; True when taken (or flock is unavailable)."""
        if fcntl is None:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:  # a file system without flock (ENOLCK, EINVAL): the recorded holder decides
            return True
        return True

    def _write(self, fd: int) -> None:
        pid = os.getpid()
        self.info = LockInfo(path=self.path, pid=pid, host=socket.gethostname(), started=time.time(),
                             start_ticks=process_start_ticks(pid), command=" ".join(sys.argv)[:500])
        data = (json.dumps(self.info.to_json(), indent=1) + "\n").encode()
        os.ftruncate(fd, 0)
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], written)
        with contextlib.suppress(OSError):
            os.fsync(fd)

    def release(self) -> None:
        """Delete the lock file (still holding the flock, so no one takes a file about to vanish)."""
        if self._fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                    self.path.unlink()
        finally:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def acquire(output_dir: Union[str, Path]) -> RunLock:
    """Take `output_dir`'s lock for this process (see `RunLock`)."""
    return RunLock(output_dir).acquire()
