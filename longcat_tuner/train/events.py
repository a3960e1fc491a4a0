"""The run's `events.jsonl`: one JSON object per line, appended as training goes.

Other tools (the web UI, scripts) read this file instead of importing the trainer, so its format is a
contract (docs/CONTRACTS.md "Events"): every event has `event` and `time` (unix seconds); kinds are
`start`, `step`, `validation`, `checkpoint`, `error` and `end`.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

EVENT_KINDS = ("start", "step", "validation", "checkpoint", "error", "end")
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


class EventLog:
    """Appends events to `<run_dir>/events.jsonl` and, when asked, mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, *, tensorboard_dir: Optional[Path] = None) -> None:
        self.path = Path(run_dir) / EVENTS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tensorboard = None
        if tensorboard_dir is not None:
            self._tensorboard = open_tensorboard(tensorboard_dir)

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}; expected one of {EVENT_KINDS}")
        record = {"event": kind, "time": time.time(), **_jsonable(fields)}
        # One write per line plus flush: a reader tailing the file never sees half an event.
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
        self._mirror(record)
        return record

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
                if item.get("psnr_first_frame") is not None:
                    self._tensorboard.add_scalar(f"validation/psnr_first_frame_{index}", item["psnr_first_frame"], step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


class SilentEventLog(EventLog):
    """The event log of a rank other than 0 in a multi-GPU run: rank 0 alone writes `events.jsonl`."""

    def __init__(self) -> None:  # no file, no TensorBoard
        self.path = None
        self._tensorboard = None

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}; expected one of {EVENT_KINDS}")
        return {"event": kind, "time": time.time(), **_jsonable(fields)}


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
