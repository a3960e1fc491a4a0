"""The request guard every request passes (Host header, token, custom header on writes; the rules are
in `security.py`) and the app's error answers."""
from __future__ import annotations

import html
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from longcat_tuner.server import security
from longcat_tuner.server.security import GuardError
from longcat_tuner.server.settings import ServerSettings


def check_request(request: Request, settings: ServerSettings, allowed_hosts: frozenset[str]) -> Response | None:
    """None when the request may go on; a redirect on the first page load (token moves into a cookie).
    Raises `GuardError` otherwise."""
    security.check_host(request.headers.get("host"), allowed_hosts)
    query_token = request.query_params.get("token") if request.url.path == "/" else None
    if query_token is not None:
        if not security.token_matches(query_token, settings.token):
            raise GuardError(401, "wrong token; open the URL the server printed at start")
        # First page load: move the token into an HttpOnly cookie and drop it from the URL.
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(security.COOKIE_NAME, settings.token, httponly=True, samesite="strict", path="/")
        return response
    given = security.bearer_token(request.headers.get("authorization")) or request.cookies.get(security.COOKIE_NAME)
    if not security.token_matches(given, settings.token):
        raise GuardError(
            401,
            "missing or wrong token: send `Authorization: Bearer <token>` "
            "(API) or open the URL with ?token=<token> printed by `longcat-tuner server`",
        )
    if request.method in security.WRITE_METHODS and request.headers.get(security.WRITE_HEADER) != "1":
        raise GuardError(403, f"state-changing requests need the header `{security.WRITE_HEADER}: 1`")
    return None


def install_guard(app: FastAPI, settings: ServerSettings) -> None:
    """Add the guard middleware and the error handlers to `app`."""
    allowed_hosts = security.allowed_host_names(settings.host, settings.extra_hosts)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        try:
            early = check_request(request, settings, allowed_hosts)
        except GuardError as err:
            if request.url.path.startswith("/api/"):
                return JSONResponse({"detail": str(err)}, status_code=err.status)
            return HTMLResponse(f"<h1>{err.status}</h1><p>{html.escape(str(err), quote=False)}</p>", status_code=err.status)
        if early is not None:
            return early
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    add_error_handlers(app)


def add_error_handlers(app: FastAPI) -> None:
    """The answers to a `GuardError` raised in a route and to an invalid request body (a router mounted
    alone in a test needs these too)."""
    app.add_exception_handler(GuardError, guard_error)
    app.add_exception_handler(RequestValidationError, invalid_request)


async def guard_error(_: Request, err: GuardError) -> JSONResponse:
    """A `GuardError` raised inside a route (a path outside the allowed folders, a bad upload)."""
    return JSONResponse({"detail": str(err)}, status_code=err.status)


async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
    """Each problem as its location and message only: FastAPI's own answer echoes the input, which fails
    to serialise for `1e400` (inf) and gave a 500."""
    detail = []
    for problem in err.errors():
        loc = [str(part) for part in problem.get("loc", ())]
        where = ".".join(loc[1:] if loc[:1] == ["body"] else loc) or "request body"
        detail.append({"loc": loc, "msg": f"{where}: {str(problem.get('msg', 'invalid value')).removeprefix('Value error, ')}"})
    return JSONResponse({"detail": detail}, status_code=422)
