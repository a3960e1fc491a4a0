"""The run's `events.jsonl`: one JSON object per line, appended as training goes.

Other tools (the web UI, scripts) read this file instead of importing the trainer, so its format is a
contract (docs/CONTRACTS.md "Events"): every event has `event` and `time` (unix seconds); kinds are
`start`, `memory_plan`, `step`, `validation_progress`, `validation`, `checkpoint`, `error` and `end`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

EVENT_KINDS = ("start", "memory_plan", "step", "validation_progress", "validation", "checkpoint", "error", "end")
EVENTS_FILE = "events.jsonl"


def _jsonable(value: Any) -> Any:
    # NaN/inf are not JSON; a non-finite loss is reported as null so readers never choke.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


MAX_PENDING_EVENTS = 100_000  # kept in memory while the file cannot be appended to (disk full)


class EventLog:
    """Appends events to `<run_dir>/events.jsonl` and, when asked, mirrors scalars to TensorBoard.

    A full disk does not stop training here: an event that cannot be appended is kept in memory (with
    the ones after it, in order) and written by the next `emit` that succeeds; a half-written line is
    cut off again, so readers never see a broken event. One warning on stderr per such stretch.
    """

    def __init__(self, run_dir: Path, *, tensorboard_dir: Optional[Path] = None) -> None:
        self.path = Path(run_dir) / EVENTS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tensorboard = None
        self._pending: list[str] = []
        if tensorboard_dir is not None:
            self._tensorboard = open_tensorboard(tensorboard_dir)

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}; expected one of {EVENT_KINDS}")
        record = {"event": kind, "time": time.time(), **_jsonable(fields)}
        self._pending.append(json.dumps(record) + "\n")
        if len(self._pending) > MAX_PENDING_EVENTS:  # the oldest go first (mostly step events)
            del self._pending[: len(self._pending) - MAX_PENDING_EVENTS]
        self.flush()
        try:
            self._mirror(record)
        except OSError as err:  # TensorBoard files on a full disk: events.jsonl is the record that counts
            print(f"warning: TensorBoard could not write ({err})", file=sys.stderr)
        return record

    def flush(self) -> bool:
        """Append the pending events; False (and they stay pending) when the file cannot be written."""
        if not self._pending:
            return True
        data = "".join(self._pending).encode("utf-8")
        try:
            _append(self.path, data)
        except OSError as err:
            if len(self._pending) == 1:  # the first event of a stretch that cannot be written
                print(f"warning: cannot append to {self.path} ({err}); events are kept in memory and written "
                      "once it can be written again (free space on that disk)", file=sys.stderr)
            return False
        self._pending.clear()
        return True

    def _mirror(self, record: dict[str, Any]) -> None:
        if self._tensorboard is None:
            return
        step = record.get("step")
        if record["event"] == "step" and record.get("loss") is not None:
            self._tensorboard.add_scalar("train/loss", record["loss"], step)
            self._tensorboard.add_scalar("train/lr", record["lr"], step)
        elif record["event"] == "validation":
            if record.get("heldout_loss") is not None:
                self._tensorboard.add_scalar("validation/heldout_loss", record["heldout_loss"], step)
            for index, item in enumerate(record.get("items", [])):
                if item.get("early_frame_drift_psnr") is not None:
                    self._tensorboard.add_scalar(f"validation/early_frame_drift_psnr_{index}", item["early_frame_drift_psnr"], step)
                if item.get("psnr_first_frame") is not None:
                    self._tensorboard.add_scalar(f"validation/psnr_first_frame_{index}", item["psnr_first_frame"], step)
        self._tensorboard.flush()

    def close(self) -> None:
        self.flush()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


class SilentEventLog(EventLog):
    """The event log of a rank other than 0 in a multi-GPU run: rank 0 alone writes `events.jsonl`."""

    def __init__(self) -> None:  # no file, no TensorBoard
        self.path = None
        self._tensorboard = None
        self._pending = []

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}; expected one of {EVENT_KINDS}")
        return {"event": kind, "time": time.time(), **_jsonable(fields)}


def _append(path: Path, data: bytes) -> None:
    """Append `data` whole or not at all: a short write (disk full) is truncated away before raising."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def open_tensorboard(log_dir: Path) -> Any:
    """A TensorBoard SummaryWriter, or a clear error when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except (ImportError, ModuleNotFoundError):
        from longcat_tuner.errors import ConfigError

        raise ConfigError(
            "report_to is 'tensorboard' but the tensorboard package is not installed: "
            "run `pip install tensorboard` or set report_to to 'none' (events.jsonl is always written)"
        ) from None
    return SummaryWriter(log_dir=str(log_dir))


def read_events(path: Path) -> list[dict[str, Any]]:
    """All complete events of a run (a partly written last line is ignored)."""
    events = []
    path = Path(path)
    if path.suffix != ".jsonl":  # a run folder (which may not exist yet)
        path = path / EVENTS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return events
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
