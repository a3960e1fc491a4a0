"""Faults and hostile input at the web UI server (issue 10, server items): decompression bombs,
writes outside the allowed folders through defaults, "already running" on resolved paths and the
trainer's lock file, run/check/preview status after stops and clean exits, chunked oversize uploads,
routes that must not stall the server, long events files, job limits and preview arguments.

Subprocesses are the fake `longcat-tuner` of tests/test_server_api.py, extended below with the
modes these tests need; everything runs in a few seconds on CPU.
"""
from __future__ import annotations

import inspect
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart", reason="python-multipart (the server extra) is needed for uploads")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from test_server_api import AUTH, FAKE_CLI, REPO, WRITE, make_server, png_bytes, save_config, valid_body, wait_for  # noqa: E402

from longcat_tuner.server.routes import datasets as datasets_routes  # noqa: E402
from longcat_tuner.server.routes import previews as previews_routes  # noqa: E402
from longcat_tuner.server.routes import runs as runs_routes  # noqa: E402
from longcat_tuner.server import jobs, security  # noqa: E402
from longcat_tuner.server.app import ServerSettings, api_routes  # noqa: E402
from longcat_tuner.server.jobs import EventsIndex, Job, read_events, run_digest, select_run_events  # noqa: E402
from longcat_tuner.train import run_lock  # noqa: E402

# Modes of the fake CLI beyond test_server_api's: `noend` exits 0 without an end event, `caching`
# waits (no SIGTERM handler, as the trainer while caching) until killed, `slowcheck` is a check that
# waits to be stopped. Any other mode falls through to the shared fake.
FAKE_PREFIX = r'''
import json as _json, os as _os, sys as _sys, time as _time
from pathlib import Path as _Path
_mode = _os.environ.get("FAKE_MODE", "complete")
if _sys.argv[1] == "train" and _mode in ("noend", "caching"):
    _config = _json.loads(_Path(_sys.argv[_sys.argv.index("--config") + 1]).read_text())
    _run = _Path(_config["output_dir"]); _run.mkdir(parents=True, exist_ok=True)
    if _mode == "caching":
        print("caching latents", flush=True)
        while True:
            _time.sleep(0.05)
    with open(_run / "events.jsonl", "a") as _f:
        _f.write(_json.dumps({"event": "start", "time": _time.time(), "pid": _os.getpid(), "run_dir": str(_run),
                              "total_steps": 1}) + "\n")
        _f.write(_json.dumps({"event": "step", "time": _time.time(), "step": 1, "total_steps": 1, "loss": 0.5}) + "\n")
    _sys.exit(0)
if _sys.argv[1] == "check" and _mode == "slowcheck":
    while True:
        _time.sleep(0.05)
'''


@pytest.fixture()
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    return make_server(tmp_path, monkeypatch, cli_source=FAKE_PREFIX + FAKE_CLI, max_jobs=1)


def job_folders(settings: ServerSettings, kind: str) -> list[Path]:
    folder = settings.data_dir / "jobs" / kind
    return sorted(folder.iterdir()) if folder.is_dir() else []


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming `width` x `height`, with only a sliver of pixel data:
    a decompression bomb's header (the real thing compresses gigabytes of zeros into a few KiB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 4096)) + chunk(b"IEND", b"")


# --- item 4: decompression bombs ----------------------------------------------------------------------
@pytest.mark.parametrize("size", [(30000, 30000), (9000, 9000)])  # over Pillow's own error size; just over the limit
def test_thumbnail_of_a_decompression_bomb_is_a_clean_422(server, size: tuple[int, int]) -> None:
    client, _, work, _ = server
    bomb = work / "frames" / "bomb.png"
    bomb.parent.mkdir(parents=True)
    bomb.write_bytes(png_header(*size))
    response = client.get("/api/image", params={"path": str(bomb), "size": 200}, headers=AUTH)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    # The trainer's own message (data.images.open_image): the file, its claimed size and the fix.
    assert str(bomb) in detail and f"{size[0]}x{size[1]}" in detail and "over the limit" in detail and "downscale" in detail
    # The server goes on answering, and an ordinary frame still gets its thumbnail.
    Image.new("RGB", (64, 48), (10, 200, 10)).save(work / "frames" / "ok.png")
    ok = client.get("/api/image", params={"path": str(work / "frames" / "ok.png"), "size": 32}, headers=AUTH)
    assert ok.status_code == 200 and Image.open(io.BytesIO(ok.content)).size == (32, 24)


def test_uploaded_decompression_bomb_is_refused_as_too_large(server) -> None:
    client, settings, *_ = server
    response = client.post("/api/uploads", files={"file": ("bomb.png", png_header(30000, 30000), "image/png")}, headers=WRITE)
    assert response.status_code == 413, response.text
    assert "decompression bomb" in response.json()["detail"]
    assert not list((settings.data_dir / "uploads").iterdir())


def test_server_and_its_guards_load_without_torch(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(30000, 30000))
    code = (
        "import sys; from pathlib import Path;"
        "from longcat_tuner.server import app, security; from longcat_tuner.train import run_lock;"
        f"app.create_app(app.ServerSettings(token='t', data_dir=Path({str(tmp_path / 'data')!r})));"
        "run_lock.read_lock(Path('.'));"
        f"\ntry:\n    security.open_image_checked({str(bomb)!r}, max_pixels=10**6, name='x')\n"
        "except security.ImageTooLargeError:\n    pass\n"
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_server_flags_that_cannot_work_are_named_before_binding(tmp_path: Path, capsys, monkeypatch) -> None:
    """Before: --port 99999 was an OverflowError traceback, a --data-dir that is a file, a link loop or read-only
    a NotADirectoryError/RuntimeError/OSError traceback, and --max-upload-mb -5 was accepted."""
    import uvicorn

    from longcat_tuner.cli import main

    def bound(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn, "run", bound)

    for flags, said in ((["--port", "99999"], "99999 is outside 0..65535"),
                        (["--max-upload-mb", "-5"], "expected a number > 0, got -5")):
        with pytest.raises(SystemExit):
            main(["server", *flags])
        assert said in capsys.readouterr().err
    (tmp_path / "file").write_text("mine")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for folder, said in ((tmp_path / "file", "is a file, not a folder"), (tmp_path / "loop", "symbolic link loop"),
                         (Path("/proc/longcat-tuner-ui"), "is not writable")):
        assert main(["server", "--data-dir", str(folder)]) == 2
        assert f"--data-dir {folder} " in (err := capsys.readouterr().err) and said in err
    assert (tmp_path / "file").read_text() == "mine"


# --- item 6: no write outside the allowed folders, defaults included -------------------------------------
def test_default_text_cache_outside_the_allowed_folders_is_refused(server) -> None:
    client, settings, work, _ = server
    body = valid_body(work)
    body["datasets"][1]["cache_dir_vae"] = str(work)  # the allowed folder itself: its ../text is outside
    response = client.put("/api/config", json=body, headers=WRITE)
    assert response.status_code == 422, response.text
    errors = {tuple(e["loc"]): e["msg"] for e in response.json()["errors"]}
    message = errors[("datasets", "1", "cache_dir_text")]
    assert "<cache_dir_vae>/../text" in message and str(work.parent / "text") in message
    assert "outside the folders" in message
    assert not settings.config_path.exists()
    # An explicit cache_dir_text inside the allowed folders (or a cache_dir_vae one level down) is fine.
    body["datasets"][1]["cache_dir_text"] = str(work / "cache" / "text")
    assert client.put("/api/config", json=body, headers=WRITE).status_code == 200


@pytest.mark.parametrize(
    "change",
    [
        {"cache_dir_vae": "WORK"},  # default text cache one level above the allowed folder
        {"cache_dir_vae": "../../escape/video"},  # relative: resolves against the datasets file's folder
        {"cache_dir_text": "/tmp/elsewhere/text"},
    ],
)
def test_runs_and_checks_check_the_saved_files_again(server, change: dict) -> None:
    """A saved file edited by hand (or saved while other folders were allowed) cannot start a job that
    writes outside the allowed folders."""
    client, settings, work, _ = server
    save_config(client, work)
    datasets = json.loads(settings.datasets_path.read_text())
    datasets[1].update({key: str(work) if value == "WORK" else value for key, value in change.items()})
    settings.datasets_path.write_text(json.dumps(datasets))
    for path in ("/api/runs", "/api/checks"):
        response = client.post(path, json={}, headers=WRITE)
        assert response.status_code == 403, (path, response.text)
        assert response.json()["detail"].startswith("datasets.1.cache_dir_") and "outside the folders" in response.json()["detail"]
    assert not job_folders(settings, "run") and not job_folders(settings, "check")


def test_a_resume_checks_its_snapshot_again(server) -> None:
    client, settings, work, _ = server
    save_config(client, work)
    run = client.post("/api/runs", json={}, headers=WRITE).json()
    wait_for(lambda: client.get(f"/api/runs/{run['id']}", headers=AUTH).json()["status"] == "completed")
    snapshot = settings.data_dir / "jobs" / "run" / run["id"] / "multidatabackend.json"
    datasets = json.loads(snapshot.read_text())
    datasets[0]["cache_dir_vae"] = str(work)  # its default text cache is outside
    snapshot.write_text(json.dumps(datasets))
    response = client.post(f"/api/runs/{run['id']}/resume", headers=WRITE)
    assert response.status_code == 403 and "cache_dir_text" in response.json()["detail"]
    assert len(job_folders(settings, "run")) == 1


# --- item 7: one run per output_dir; honest statuses -----------------------------------------------------
def test_already_running_compares_resolved_paths(server) -> None:
    client, _, work, monkeypatch = server
    body = valid_body(work)
    body["config"]["output_dir"] = str(work / "a" / "out")
    assert client.put("/api/config", json=body, headers=WRITE).status_code == 200
    monkeypatch.setenv("FAKE_MODE", "wait")
    run = client.post("/api/runs", json={}, headers=WRITE).json()
    wait_for(lambda: client.get(f"/api/runs/{run['id']}", headers=AUTH).json()["status"] == "running")
    (work / "link").symlink_to(work / "a", target_is_directory=True)
    for spelling in ("a/../a/out", "link/out", str(work / "a" / "." / "out")):
        body["config"]["output_dir"] = spelling
        assert client.put("/api/config", json=body, headers=WRITE).status_code == 200
        response = client.post("/api/runs", json={}, headers=WRITE)
        assert response.status_code == 409, spelling
        assert f"run {run['id']} is still writing" in response.json()["detail"]
    client.post(f"/api/runs/{run['id']}/stop", headers=WRITE)
    wait_for(lambda: not client.get(f"/api/runs/{run['id']}", headers=AUTH).json()["alive"])


def test_the_output_dir_lock_of_another_process_is_honoured(server) -> None:
    client, settings, work, _ = server
    save_config(client, work)
    out = work / "out"
    lock = run_lock.acquire(out)  # as a `train` started from a shell would hold it
    try:
        response = client.post("/api/runs", json={}, headers=WRITE)
        assert response.status_code == 409, response.text
        detail = response.json()["detail"]
        assert f"pid {os.getpid()}" in detail and str(lock.path) in detail and "in use" in detail
        assert not job_folders(settings, "run")
    finally:
        lock.release()
    # A lock left by a process of this host that is gone is stale: the run starts.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / run_lock.LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": time.time()}))
    run = client.post("/api/runs", json={}, headers=WRITE)
    assert run.status_code == 200, run.text
    wait_for(lambda: client.get(f"/api/runs/{run.json()['id']}", headers=AUTH).json()["status"] == "completed")


def test_a_run_that_exits_0_shows_completed_not_died(server) -> None:
    client, _, work, monkeypatch = server
    save_config(client, work)
    monkeypatch.setenv("FAKE_MODE", "noend")
    run = client.post("/api/runs", json={}, headers=WRITE).json()
    detail = wait_for(lambda: (d := client.get(f"/api/runs/{run['id']}", headers=AUTH).json())["returncode"] is not None and d)
    assert detail["returncode"] == 0 and detail["status"] == "completed", detail
    assert "died" not in (detail["message"] or "")


def test_stop_during_caching_shows_stopped(server) -> None:
    client, _, work, monkeypatch = server
    save_config(client, work)
    monkeypatch.setenv("FAKE_MODE", "caching")
    run = client.post("/api/runs", json={}, headers=WRITE).json()
    wait_for(lambda: "caching latents" in client.get(f"/api/runs/{run['id']}/log", headers=AUTH).json()["lines"])
    assert client.post(f"/api/runs/{run['id']}/stop", headers=WRITE).status_code == 200
    detail = wait_for(lambda: (d := client.get(f"/api/runs/{run['id']}", headers=AUTH).json())["returncode"] is not None and d)
    assert detail["returncode"] == -15 and detail["status"] == "stopped", detail
    assert "stopped on request" in detail["message"] and "died" not in detail["message"]
    stream = client.get(f"/api/runs/{run['id']}/events", headers=AUTH).text
    assert 'event: done\ndata: {"status": "stopped"}' in stream


# --- item 8: uploads, blocking, long events files, job limits ------------------------------------------
def multipart_stream(total: int, chunk: int, sent: list[int], image: bytes = b""):
    """A multipart body sent chunked (a generator: no Content-Length), counting what was read from it."""
    boundary = "longcatboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()  # fmt: skip
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body():
        sent[0] += len(head)
        yield head
        if image:
            sent[0] += len(image)
            yield image
        block = b"\x00" * chunk
        for _ in range(total // chunk):
            sent[0] += len(block)
            yield block
        sent[0] += len(tail)
        yield tail

    return body(), {**WRITE, "Content-Type": f"multipart/form-data; boundary={boundary}"}


def asgi_request(app, method: str, path: str, headers: dict[str, str], chunks) -> tuple[int, bytes]:
    """Drive the ASGI app as uvicorn does: the body arrives one `http.request` message per chunk, read
    only when the app asks for it (TestClient reads a generator body whole before sending it)."""
    import anyio

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in {"host": "127.0.0.1:8765", **headers}.items()],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8765),
    }  # fmt: skip
    iterator = iter(chunks)
    status, body = [0], []

    async def receive():
        chunk = next(iterator, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        if message["type"] == "http.response.start":
            status[0] = message["status"]
        elif message["type"] == "http.response.body":
            body.append(message.get("body", b""))

    anyio.run(app, scope, receive, send)
    return status[0], b"".join(body)


def test_chunked_upload_over_the_limit_stops_reading_early(server) -> None:
    client, settings, *_ = server
    sent = [0]
    body, headers = multipart_stream(100 * 1024 * 1024, 64 * 1024, sent)  # 100 MiB, no Content-Length
    headers = {**headers, "Transfer-Encoding": "chunked"}
    status, answer = asgi_request(client.app, "POST", "/api/uploads", headers, body)
    assert status == 413, answer
    assert f"{settings.max_upload_bytes}-byte limit" in json.loads(answer)["detail"]
    # The server stopped reading right after the limit, not at the end of the body.
    assert sent[0] <= settings.max_upload_bytes + previews_routes.MULTIPART_OVERHEAD + 2 * 64 * 1024, sent[0]
    assert not list((settings.data_dir / "uploads").iterdir())  # no partial file left behind


def test_chunked_upload_under_the_limit_is_stored(server) -> None:
    client, settings, *_ = server
    sent = [0]
    body, headers = multipart_stream(0, 1, sent, image=png_bytes((40, 30)))
    response = client.post("/api/uploads", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert (response.json()["width"], response.json()["height"]) == (40, 30)
    assert [p.name for p in (settings.data_dir / "uploads").iterdir()] == [f"{response.json()['id']}.png"]


FILE_ROUTES = [
    ("GET", "/api/image"), ("GET", "/api/runs"), ("POST", "/api/runs"), ("GET", "/api/runs/{run_id}"),
    ("GET", "/api/runs/{run_id}/log"), ("GET", "/api/runs/{run_id}/files/{relative:path}"), ("GET", "/api/loras"),
    ("GET", "/api/config"), ("PUT", "/api/config"), ("GET", "/api/config/import"), ("POST", "/api/checks"),
    ("GET", "/api/checks/{job_id}"), ("GET", "/api/uploads/{upload_id}"), ("POST", "/api/previews"),
    ("GET", "/api/previews"), ("GET", "/api/previews/{job_id}"), ("GET", "/api/previews/{job_id}/video"),
    ("GET", "/api/runs/{run_id}/start-frame"), ("GET", "/api/system/gpu"),
]  # fmt: skip


def test_routes_that_touch_files_run_in_worker_threads(server) -> None:
    client, *_ = server
    endpoints = {(m, r.path): r.endpoint for r in api_routes() for m in r.methods}
    for method, path in FILE_ROUTES:
        assert not inspect.iscoroutinefunction(endpoints[(method, path)]), f"{method} {path} runs on the event loop"


@pytest.mark.parametrize("what", ["thumbnail", "runs", "upload"])
def test_a_slow_request_does_not_stall_the_server(server, what: str) -> None:
    """While one request is stuck in slow file work, another request is answered."""
    client, _, work, monkeypatch = server
    entered, release = threading.Event(), threading.Event()

    def slow(original):
        def wrapper(*args, **kwargs):
            entered.set()
            release.wait(10)  # on the event loop this would hold every other request for 10 s
            return original(*args, **kwargs)

        return wrapper

    Image.new("RGB", (40, 30)).save(work / "f.png")
    if what == "thumbnail":
        monkeypatch.setattr(datasets_routes, "open_image", slow(datasets_routes.open_image))
        request = ("GET", "/api/image", {"params": {"path": str(work / "f.png")}, "headers": AUTH})
    elif what == "runs":
        save_config(client, work)
        run = client.post("/api/runs", json={}, headers=WRITE).json()
        wait_for(lambda: client.get(f"/api/runs/{run['id']}", headers=AUTH).json()["status"] == "completed")
        monkeypatch.setattr(runs_routes, "find_events_file", slow(runs_routes.find_events_file))
        request = ("GET", "/api/runs", {"headers": AUTH})
    else:
        monkeypatch.setattr(security, "decode_upload_image", slow(security.decode_upload_image))
        request = ("POST", "/api/uploads", {"files": {"file": ("f.png", png_bytes(), "image/png")}, "headers": WRITE})
    results: list[int] = []
    with TestClient(client.app, base_url="http://127.0.0.1:8765") as shared:  # one event loop for all requests
        method, path, kwargs = request
        worker = threading.Thread(target=lambda: results.append(shared.request(method, path, **kwargs).status_code))
        worker.start()
        try:
            assert entered.wait(10), "the slow request did not start"
            started = time.monotonic()
            assert shared.get("/api/info", headers=AUTH).status_code == 200
            assert not release.is_set() and time.monotonic() - started < 5  # answered while the other waits
        finally:
            release.set()
            worker.join(20)
    assert results == [200]


def write_long_run(store: jobs.JobStore, out: Path, steps: int) -> Job:
    """A finished run's record and an events file of `steps` step events (written quickly, as text)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    job_id, folder = store.new_folder("run")
    job = Job(id=job_id, kind="run", folder=folder, argv=["train"], pid=dead.pid, start_ticks=None,
              started=time.time() - 60, extra={"output_dir": str(out)}, returncode=None)  # fmt: skip
    store.save(job)
    out.mkdir(parents=True)
    now = time.time()
    lines = [json.dumps({"event": "start", "time": now, "pid": dead.pid, "run_dir": str(out), "total_steps": steps})]
    peak_at = steps // 3
    lines += [
        f'{{"event": "step", "time": {now}, "step": {s}, "total_steps": {steps}, "loss": {1.0 / s:.6f}, '
        f'"lr": 0.0001, "s_per_step": 0.5, "eta_s": {steps - s}, "peak_mem_gib": {9.5 if s == peak_at else 1.25}}}'
        for s in range(1, steps + 1)
    ]  # fmt: skip
    lines.append(json.dumps({"event": "validation", "time": now, "step": steps, "items": []}))
    (out / "events.jsonl").write_text("\n".join(lines) + "\n")
    return job


def test_runs_list_stays_fast_over_a_300k_step_events_file(server) -> None:
    client, settings, work, _ = server
    store = client.app.state.store
    job = write_long_run(store, work / "long", 300_000)
    first = client.get("/api/runs", headers=AUTH).json()  # reads the file once
    assert [r["id"] for r in first] == [job.id]
    assert first[0]["step"] == 300_000 and first[0]["peak_mem_gib"] == 9.5 and first[0]["status"] == "died"
    started = time.perf_counter()
    for _ in range(3):
        again = client.get("/api/runs", headers=AUTH).json()
        gallery = client.get(f"/api/runs/{job.id}", params={"events": "validation"}, headers=AUTH).json()
    took = (time.perf_counter() - started) / 3
    assert took < 0.5, f"{took:.2f} s per poll of a 300k-step run"
    assert again == first and [e["event"] for e in gallery["events"]] == ["validation"]
    with open(work / "long" / "events.jsonl", "a") as handle:  # the run goes on: only the new bytes are read
        handle.write(json.dumps({"event": "step", "time": 1.0, "step": 300_001, "total_steps": 300_001, "loss": 0.1,
                                 "peak_mem_gib": 12.0}) + "\n")
        handle.write(json.dumps({"event": "end", "time": 1.0, "status": "completed", "step": 300_001}) + "\n")
    latest = client.get("/api/runs", headers=AUTH).json()[0]
    assert (latest["step"], latest["peak_mem_gib"], latest["status"]) == (300_001, 12.0, "completed")


def test_the_event_stream_of_a_long_run_arrives_in_steps(server, monkeypatch: pytest.MonkeyPatch) -> None:
    client, _, work, _ = server
    job = write_long_run(client.app.state.store, work / "long", 20_000)
    monkeypatch.setattr(runs_routes, "STREAM_CHUNK_BYTES", 64 * 1024)  # ~30 polls for this file
    polls = []
    original = runs_routes.read_events
    monkeypatch.setattr(runs_routes, "read_events", lambda *a, **k: polls.append(k.get("max_bytes")) or original(*a, **k))
    started = time.monotonic()
    text = client.get(f"/api/runs/{job.id}/events", headers=AUTH).text
    steps = [json.loads(line[6:])["step"] for line in text.splitlines() if line.startswith('data: {"event": "step"')]
    assert steps == list(range(1, 20_001))
    assert len(polls) > 20 and set(polls) == {64 * 1024}  # bounded reads, one after another without waiting
    assert text.rstrip().endswith('data: {"status": "died"}') and time.monotonic() - started < 10


def test_the_events_index_agrees_with_a_full_read(tmp_path: Path) -> None:
    """Incremental reads (a torn last line, appends, a resumed run in the same file, a replaced file)
    give the same run summary as parsing every line."""
    path = tmp_path / "events.jsonl"
    job_a = Job(id="a", kind="run", folder=tmp_path, argv=[], pid=101, start_ticks=None, started=0.0, extra={})
    job_b = Job(id="b", kind="run", folder=tmp_path, argv=[], pid=202, start_ticks=None, started=0.0, extra={})

    def step(s: int, peak) -> str:
        return json.dumps({"event": "step", "time": 1.0, "step": s, "loss": 1.0 / s, "peak_mem_gib": peak}) + "\n"

    text = json.dumps({"event": "start", "time": 1.0, "pid": 101}) + "\n" + "".join(step(s, 2.0 + s % 3) for s in range(1, 50))
    text += json.dumps({"event": "validation", "time": 1.0, "step": 49, "items": []}) + "\n" + "\n"
    text += '{"event": "step", "time": 1.0, "st\n'  # torn by a crash, then a resume appended
    text += json.dumps({"event": "start", "time": 2.0, "pid": 202}) + "\n" + step(50, None) + step(51, 1.5)
    index = EventsIndex(chunk_bytes=97)  # tiny chunks: lines are cut at every possible place
    written = 0
    for cut in (len(text) // 3, len(text) // 3 + 5, len(text)):  # appended in three pieces, cut mid-line
        with open(path, "a") as handle:
            handle.write(text[written:cut])
        written = cut
        events, _ = read_events(path)
        for job in (job_a, job_b):
            mine = select_run_events(events, job)
            steps = [e for e in mine if e["event"] == "step"]
            jobs_index, jobs.EVENTS = jobs.EVENTS, index
            try:
                digest = run_digest(path, job)
            finally:
                jobs.EVENTS = jobs_index
            assert digest.events == [e for e in mine if e["event"] != "step"]
            assert digest.last_step == (steps[-1] if steps else None)
            peaks = [e["peak_mem_gib"] for e in steps if e.get("peak_mem_gib") is not None]
            assert digest.peak_mem_gib == (max(peaks) if peaks else None)
    path.unlink()
    path.write_text(json.dumps({"event": "start", "time": 3.0, "pid": 101}) + "\n")  # replaced: read again
    jobs_index, jobs.EVENTS = jobs.EVENTS, index
    try:
        assert run_digest(path, job_a).last_step is None and len(run_digest(path, job_a).events) == 1
    finally:
        jobs.EVENTS = jobs_index


def test_check_and_preview_jobs_are_limited(server) -> None:
    client, settings, work, monkeypatch = server  # max_jobs=1
    save_config(client, work)
    monkeypatch.setenv("FAKE_MODE", "slowcheck")
    check = client.post("/api/checks", headers=WRITE).json()
    assert check["status"] == "running"
    again = client.post("/api/checks", headers=WRITE)
    assert again.status_code == 429 and again.json()["detail"].startswith(f"1 job already running (check {check['id']}); wait or stop one")
    upload = client.post("/api/uploads", files={"file": ("g.png", png_bytes(), "image/png")}, headers=WRITE).json()
    preview = client.post("/api/previews", json={"upload": upload["id"], "prompt": "x", "frames": 5, "resolution": "64x64"}, headers=WRITE)
    assert preview.status_code == 429 and "already running" in preview.json()["detail"]
    assert len(job_folders(settings, "check")) == 1 and not job_folders(settings, "preview")
    assert client.post(f"/api/checks/{check['id']}/stop", headers=WRITE).status_code == 200
    stopped = wait_for(lambda: (d := client.get(f"/api/checks/{check['id']}", headers=AUTH).json())["status"] not in ("running", "stopping") and d)
    assert stopped["status"] == "stopped"
    monkeypatch.setenv("FAKE_MODE", "complete")
    assert client.post("/api/previews", json={"upload": upload["id"], "prompt": "x", "frames": 5, "resolution": "64x64"},
                       headers=WRITE).status_code == 200  # fmt: skip


# --- item 10 (server part): preview arguments ----------------------------------------------------------
@pytest.mark.parametrize("prompt", ["-dramatic", "--help", "--frames=9", "-a girl --frames 9 smiles, -- slowly"])
def test_a_preview_prompt_starting_with_a_dash_reaches_the_sampler(server, prompt: str) -> None:
    from longcat_tuner.cli import build_parser

    client, _, work, _ = server
    save_config(client, work)
    upload = client.post("/api/uploads", files={"file": ("g.png", png_bytes(), "image/png")}, headers=WRITE).json()
    body = {"upload": upload["id"], "prompt": prompt, "frames": 5, "steps": 2, "resolution": "64x64", "seed": 7}
    job = client.post("/api/previews", json=body, headers=WRITE).json()
    done = wait_for(lambda: (d := client.get(f"/api/previews/{job['id']}", headers=AUTH).json())["status"] != "running" and d)
    assert done["status"] == "completed"
    argv = json.loads(done["log"][-1])  # the fake prints the arguments it was given
    args = build_parser("sample").parse_args(["sample", *argv])  # the real CLI's parser
    assert args.prompt == prompt and args.frames == 5 and args.seed == 7 and args.resolution == "64x64"


@pytest.mark.parametrize(
    "raw, key",
    [
        ('"seed": 1e400', "seed"),
        ('"seed": 1.5', "seed"),
        ('"seed": -1', "seed"),
        ('"seed": 1180591620717411303424', "seed"),  # 2**70
        ('"seed": true', "seed"),
        ('"seed": "42"', "seed"),
        ('"guidance": NaN', "guidance"),
        ('"frames": 10', "frames"),
        ('"frames": 100001', "frames"),
        ('"steps": 1000', "steps"),
        ('"resolution": "100000x100000"', "resolution"),
        ('"resolution": "1024x2048"', "resolution"),
        ('"resolution": "480x830"', "resolution"),
        ('"prompt": "a\\u0000b"', "prompt"),
        ('"prompt": "   "', "prompt"),
    ],
)
def test_preview_rejects_out_of_range_values_with_a_message(server, raw: str, key: str) -> None:
    client, settings, work, _ = server
    save_config(client, work)
    upload = client.post("/api/uploads", files={"file": ("g.png", png_bytes(), "image/png")}, headers=WRITE).json()
    base = {"upload": upload["id"], "prompt": "x", "frames": 5, "resolution": "64x64"}
    base.pop(raw.split('"')[1], None)
    text = json.dumps(base)[:-1] + ", " + raw + "}"
    response = client.post("/api/previews", content=text, headers={**WRITE, "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    message = detail if isinstance(detail, str) else " ".join(item["msg"] for item in detail)
    assert key in message, message
    assert not job_folders(settings, "preview")


def test_config_api_refuses_non_finite_numbers(server) -> None:
    """Infinity / NaN (Python's JSON reader accepts them) are refused with one message per key, not
    saved and read back as null."""
    client, settings, work, _ = server
    body = json.dumps(valid_body(work))
    text = body.replace('"max_train_steps": 3', '"max_train_steps": 3, "learning_rate": Infinity', 1)
    text = text.replace('"is_i2v": true', '"is_i2v": true, "repeats": NaN', 1)
    response = client.put("/api/config", content=text, headers={**WRITE, "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    locs = [tuple(e["loc"]) for e in response.json()["errors"]]
    errors = {tuple(e["loc"]): e["msg"] for e in response.json()["errors"]}
    assert "finite" in errors[("config", "learning_rate")] and "finite" in errors[("datasets", "0", "repeats")]
    assert len(locs) == len(set(locs))
    assert not settings.config_path.exists()


def test_server_command_takes_max_jobs_and_refuses_nonsense(capsys):
    from longcat_tuner.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["server", "--max-jobs", "3"]).max_jobs == 3
    assert parser.parse_args(["server"]).max_jobs == 2
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["server", "--max-jobs", bad])
    assert "--max-jobs" in capsys.readouterr().err
