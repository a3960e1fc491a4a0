"""`/api/checks` (`longcat-tuner check --json` on the saved files) and `/api/image` (start-frame
thumbnails): what the Datasets page shows."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

from longcat_tuner.data.images import open_image
from longcat_tuner.errors import DataError
from longcat_tuner.server import security
from longcat_tuner.server.configfiles import read_report
from longcat_tuner.server.deps import ServerState, StateDep
from longcat_tuner.server.jobs import Job, tail_lines

router = APIRouter()
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@router.post("/api/checks")
def start_check(state: StateDep) -> dict[str, Any]:
    state.saved_files()
    with state.launching:
        state.check_job_room()
        job_id, folder = state.store.new_folder("check")
        report = folder / "report.json"
        # `check --json` prints the summary on stdout; messages and warnings go to the log.
        job = state.store.start(
            "check", job_id, folder, ["check", "--config", str(state.settings.config_path), "--json"],
            {"report": str(report)}, stdout=report,
        )  # fmt: skip
    return check_summary(state, job)


def check_summary(state: ServerState, job: Job) -> dict[str, Any]:
    alive = state.store.alive(job)
    report = read_report(Path(job.extra["report"]), None) if not alive else None
    # Exit code 1 with a report means "checked, training could not start" (report.blocking says why).
    status = state.job_status(job, alive=alive, produced=isinstance(report, dict) and "datasets" in report)
    return {"id": job.id, "status": status, "returncode": job.returncode, "report": report, "log": tail_lines(job.log_path, 200)}


@router.get("/api/checks/{job_id}")
def get_check(job_id: str, state: StateDep) -> dict[str, Any]:
    return check_summary(state, state.job("check", job_id))


@router.post("/api/checks/{job_id}/stop")
def stop_check(job_id: str, state: StateDep) -> dict[str, Any]:
    return check_summary(state, state.stop("check", job_id))


def thumbnail_png(file: Path, size: int) -> bytes:
    """A PNG thumbnail of `file`, opened as training opens it (`data.images.open_image`): the header is
    read first, and an image over the trainer's pixel limit (a decompression bomb) is refused with 422
    naming the file and its size, before anything is decoded."""
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
    return buffer.getvalue()


@router.get("/api/image")
def image_thumbnail(path: str, state: StateDep, size: int = 256) -> Response:
    """A thumbnail of an image inside the allowed folders (dataset start frames)."""
    file = security.resolve_inside(path, state.settings.roots, what="image")
    return Response(thumbnail_png(file, size), media_type="image/png")
