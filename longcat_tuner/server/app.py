"""The web UI's HTTP server: a thin FastAPI app over config files, CLI subprocesses and event files.

It never imports torch: it writes `config.json` / `multidatabackend.json`, starts `longcat-tuner
check | train | sample` as subprocesses (see `jobs.py`) and reads their output and the run's
`events.jsonl`. Every request passes the guard (`guard.py`: Host header, token, custom header on
writes, see `security.py`); every path a client names, or that a saved config implies (such as the
default text cache `<cache_dir_vae>/../text`), is resolved and kept inside the allowed folders.

This module only assembles the app: the shared state (`deps.ServerState`), the guard, the page and
one router per resource (`routes/`: config, datasets, runs, previews, system). Routes that touch
files are plain `def` functions, which FastAPI runs in its worker threads, so a slow disk, a large
upload or a long events file never stalls the other requests.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from longcat_tuner.server.deps import ServerState
from longcat_tuner.server.guard import install_guard
from longcat_tuner.server.routes import config, datasets, previews, runs, system
from longcat_tuner.server.routes.runs import log_tail_offset, read_new_lines
from longcat_tuner.server.settings import ServerSettings

__all__ = ["ROUTERS", "STATIC_DIR", "ServerSettings", "api_routes", "create_app", "log_tail_offset", "read_new_lines"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
ROUTERS = (config.router, datasets.router, runs.router, previews.router, system.router)
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'"
)


def api_routes() -> list[APIRoute]:
    """Every route of the JSON API, as the routers declare them (newer FastAPI versions keep an included
    router as one entry of `app.routes`, so that list does not show them one by one)."""
    return [route for router in ROUTERS for route in router.routes if isinstance(route, APIRoute)]


async def index() -> Response:
    response = FileResponse(STATIC_DIR / "index.html", media_type="text/html")
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response


def create_app(settings: ServerSettings) -> FastAPI:
    """Build the app; state lives in `settings.data_dir` (config files, job folders, uploads)."""
    state = ServerState.create(settings)
    app = FastAPI(title="longcat-tuner", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.state.settings = settings
    app.state.store = state.store
    install_guard(app, settings)
    app.add_api_route("/", index, include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for router in ROUTERS:
        app.include_router(router)
    return app
