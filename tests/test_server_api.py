"""API tests of the web UI server (FastAPI TestClient): guards on every endpoint, config save,
uploads, path containment, and the run / check / preview lifecycles.

The subprocesses are a small fake `longcat-tuner` script written by the test (it writes the events
file, check report and preview video exactly as docs/CONTRACTS.md describes), so these tests take
seconds; the real CLI is driven end to end by tests/test_server_browser.py.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart", reason="python-multipart (the server extra) is needed for uploads")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from longcat_tuner.server.app import ServerSettings, create_app, log_tail_offset, read_new_lines  # noqa: E402
from longcat_tuner.server.app import api_routes as server_api_routes  # noqa: E402

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WRITE = {**AUTH, "X-Longcat-Tuner": "1"}
REPO = Path(__file__).resolve().parents[1]

# A stand-in for `longcat-tuner` with the same arguments and outputs; FAKE_MODE picks the behaviour.
FAKE_CLI = textwrap.dedent(
    r'''
    import json, os, signal, sys, time
    from pathlib import Path

    def emit(events_file, kind, **fields):
        with open(events_file, "a") as handle:
            handle.write(json.dumps({"event": kind, "time": time.time(), **fields}) + "\n")

    command, args = sys.argv[1], sys.argv[2:]
    opts = {a: (b if not b.startswith("--") else True) for a, b in zip(args, args[1:] + ["--"]) if a.startswith("--")}
    mode = os.environ.get("FAKE_MODE", "complete")
    if command == "train":
        config = json.loads(Path(opts["--config"]).read_text())
        run_dir = Path(config["output_dir"]); run_dir.mkdir(parents=True, exist_ok=True)
        events = run_dir / "events.jsonl"
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        first = 3 if config.get("resume_from_checkpoint") else 1  # a resumed fake continues after step 2
        emit(events, "start", run_dir=str(run_dir), config=config, total_steps=3, pid=os.getpid(),
             resumed=config.get("resume_from_checkpoint"), start_step=first - 1)
        print("training", flush=True)
        if mode == "crash":
            print("Traceback: boom", flush=True); sys.exit(1)
        for step in range(first, 4):
            emit(events, "step", step=step, total_steps=3, loss=1.0 / step, lr=1e-4, s_per_step=0.1,
                 eta_s=0.1 * (3 - step), peak_mem_gib=1.5)
            print(f"step {step}/3", flush=True)
        if mode == "wait":
            while not stop:
                time.sleep(0.05)
            (run_dir / "checkpoints" / "checkpoint-000003").mkdir(parents=True, exist_ok=True)
            emit(events, "checkpoint", step=3, path=str(run_dir / "checkpoints" / "checkpoint-000003"))
            emit(events, "end", status="interrupted", step=3, lora_path=None)
            sys.exit(130)
        (run_dir / "validation" / "step-3").mkdir(parents=True, exist_ok=True)
        (run_dir / "validation" / "step-3" / "0.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
        emit(events, "validation", step=3, heldout_loss=0.5, items=[{"prompt": "a girl", "video": "validation/step-3/0.mp4",
             "contact_sheet": "validation/step-3/0.png", "psnr_first_frame": 31.5}])
        (run_dir / "longcat_lora.safetensors").write_bytes(b"{}")
        emit(events, "end", status="completed", step=3, lora_path=str(run_dir / "longcat_lora.safetensors"))
    elif command == "check":
        assert opts["--json"] is True and Path(opts["--config"]).is_file()
        if mode == "crash":
            print("error: config.json: output_dir: required", file=sys.stderr); sys.exit(2)
        report = {"ok": False, "blocking": ["eval split 'val' has no usable item"], "datasets": [{"id": "clips",
                  "samples": [{"media": "a.mp4", "start_frame": "a.png"}], "skipped": [{"path": "b.mp4",
                  "reason": "no start frame"}], "buckets": {"5x64x64": 1}}]}
        print(json.dumps(report, indent=1))
        print("note: a warning on stderr", file=sys.stderr)
        sys.exit(1)  # like `check`: a report, but training could not start
    elif command == "sample":
        for step in range(1, 3):
            print(json.dumps({"event": "sample_step", "step": step, "total": 2}), flush=True)
        Path(opts["--output"]).write_bytes(b"\x00\x00\x00\x18ftypmp42")
        print(json.dumps(sys.argv[2:]))
    '''
)


def make_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, cli_source: str = FAKE_CLI, **overrides):
    """(client, settings, work folder, monkeypatch) of a server whose CLI is the fake script `cli_source`."""
    fake = tmp_path / "fake_cli.py"
    fake.write_text(cli_source)
    work = tmp_path / "work"
    (work / "model").mkdir(parents=True)
    settings = ServerSettings(**{
        "token": TOKEN, "data_dir": tmp_path / "data", "allowed_roots": (work,), "cwd": work,
        "max_upload_bytes": 200_000, "cli": (sys.executable, str(fake)), **overrides,
    })
    client = TestClient(create_app(settings), base_url="http://127.0.0.1:8765")
    return client, settings, work, monkeypatch


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    return make_server(tmp_path, monkeypatch)


def png_bytes(size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def valid_body(work: Path) -> dict:
    return {
        "config": {
            "pretrained_model_name_or_path": str(work / "model"),
            "output_dir": "out",  # relative: resolved against the server's folder
            "max_train_steps": 3,
            "eval_dataset_id": None,
            "validation_using_datasets": False,
        },
        "datasets": [
            {"id": "clips", "dataset_type": "video", "is_i2v": True, "instance_data_dir": str(work / "clips"),
             "cache_dir_vae": str(work / "cache" / "video"), "conditioning_data": ["frames"]},
            {"id": "frames", "dataset_type": "conditioning", "instance_data_dir": str(work / "frames"),
             "caption_strategy": None, "cache_dir_vae": str(work / "cache" / "cond")},
        ],
    }


def save_config(client: TestClient, work: Path) -> None:
    response = client.put("/api/config", json=valid_body(work), headers=WRITE)
    assert response.status_code == 200, response.text


def wait_for(predicate, timeout: float = 20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


# --- guards ------------------------------------------------------------------------------------------
def test_server_does_not_import_torch() -> None:
    code = (
        "import sys, longcat_tuner.server.app, longcat_tuner.commands.server, longcat_tuner.cli;"
        "longcat_tuner.cli.build_parser('server');"
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules];"
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def api_routes(client: TestClient) -> list[tuple[str, str]]:
    routes = []
    for route in server_api_routes():  # what create_app includes, router by router
        path = getattr(route, "path", "")
        for method in sorted(getattr(route, "methods", None) or []):
            if path.startswith("/api/") and method != "HEAD":
                routes.append((method, path.replace("{relative:path}", "x").replace("{", "").replace("}", "")))
    return routes


def test_every_endpoint_needs_the_token(env) -> None:
    client, *_ = env
    routes = api_routes(client)
    assert len(routes) >= 20
    for method, path in routes:
        response = client.request(method, path, headers={"X-Longcat-Tuner": "1"})
        assert response.status_code == 401, (method, path, response.status_code)
        assert "token" in response.json()["detail"]
        wrong = client.request(method, path, headers={"Authorization": "Bearer nope", "X-Longcat-Tuner": "1"})
        assert wrong.status_code == 401, (method, path)
    assert client.get("/").status_code == 401
    assert client.get("/static/app.js").status_code == 401


def test_every_write_needs_the_custom_header(env) -> None:
    client, *_ = env
    writes = [(m, p) for m, p in api_routes(client) if m in ("POST", "PUT", "DELETE", "PATCH")]
    assert len(writes) >= 7
    for method, path in writes:
        response = client.request(method, path, headers=AUTH, json={})
        assert response.status_code == 403, (method, path)
        assert "x-longcat-tuner" in response.json()["detail"]


def test_host_header_is_checked(env) -> None:
    client, *_ = env
    for host in ("evil.example", "127.0.0.1.evil.example:8765", "192.168.1.5:8765"):
        response = client.get("/api/runs", headers={**AUTH, "Host": host})
        assert response.status_code == 400, host
        assert "Host header" in response.json()["detail"]
    for host in ("localhost:8765", "127.0.0.1", "[::1]:8765"):
        assert client.get("/api/runs", headers={**AUTH, "Host": host}).status_code == 200, host


def test_first_page_load_sets_a_strict_httponly_cookie(env) -> None:
    client, *_ = env
    assert client.get("/?token=wrong", follow_redirects=False).status_code == 401
    response = client.get(f"/?token={TOKEN}", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    page = client.get("/")  # the client now sends the cookie
    assert page.status_code == 200 and "longcat-tuner" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/api/info").status_code == 200  # the page's own API calls work with the cookie
    assert client.post("/api/config/validate", json={"config": {}}).status_code == 403  # header still needed


# --- config ------------------------------------------------------------------------------------------
def test_schema_drives_the_form(env) -> None:
    client, *_ = env
    schema = client.get("/api/schema", headers=AUTH).json()
    props = schema["config"]["properties"]
    assert props["lora_rank"]["default"] == 8 and props["lora_rank"]["description"]
    assert "pretrained_model_name_or_path" in schema["config"]["required"]
    assert "instance_data_dir" in schema["dataset"]["properties"]


def test_config_validation_errors_name_the_key(env) -> None:
    client, _, work, _ = env
    body = valid_body(work)
    body["config"]["lora_rank"] = 0
    body["config"]["validation_num_video_frames"] = 10
    body["config"]["lora_rnak"] = 4
    body["datasets"][0]["video"] = {"num_frames": 8}
    result = client.post("/api/config/validate", json=body, headers=WRITE).json()
    locs = {tuple(error["loc"]): error["msg"] for error in result["errors"]}
    assert not result["valid"]
    assert ("config", "lora_rank") in locs
    assert "divisible by 4" in locs[("config", "validation_num_video_frames")]
    assert "unknown key" in locs[("config", "lora_rnak")]
    assert "divisible by 4" in locs[("datasets", "0", "video", "num_frames")]
    response = client.put("/api/config", json=body, headers=WRITE)
    assert response.status_code == 422
    assert not (env[1].config_path).exists()


def test_config_save_writes_both_files(env) -> None:
    client, settings, work, _ = env
    save_config(client, work)
    config = json.loads(settings.config_path.read_text())
    datasets = json.loads(settings.datasets_path.read_text())
    assert config["data_backend_config"] == str(settings.datasets_path.resolve())
    assert config["output_dir"] == str(work / "out")
    assert [d["id"] for d in datasets] == ["clips", "frames"]
    loaded = client.get("/api/config", headers=AUTH).json()
    assert loaded["saved"] and loaded["config"]["max_train_steps"] == 3


def test_cross_dataset_errors_are_reported(env) -> None:
    client, _, work, _ = env
    body = valid_body(work)
    body["datasets"][0]["conditioning_data"] = ["missing"]
    result = client.post("/api/config/validate", json=body, headers=WRITE).json()
    assert any("missing" in error["msg"] for error in result["errors"])


@pytest.mark.parametrize(
    "where, key, value",
    [
        ("config", "output_dir", "/etc/longcat"),
        ("config", "output_dir", "../../../../outside"),
        ("config", "pretrained_model_name_or_path", "/"),
        ("dataset", "instance_data_dir", "/etc"),
        ("dataset", "cache_dir_vae", "cache/../../../escape"),
    ],
)
def test_config_paths_must_stay_inside_allowed_folders(env, where: str, key: str, value: str) -> None:
    client, settings, work, _ = env
    body = valid_body(work)
    target = body["config"] if where == "config" else body["datasets"][0]
    target[key] = value
    response = client.put("/api/config", json=body, headers=WRITE)
    assert response.status_code == 422
    errors = [e for e in response.json()["errors"] if e["loc"][-1] == key]
    assert errors and "outside the folders" in errors[0]["msg"]
    assert not settings.config_path.exists()


# --- files ---------------------------------------------------------------------------------------------
def test_upload_accepts_images_under_a_random_name(env) -> None:
    client, settings, *_ = env
    response = client.post("/api/uploads", files={"file": ("../../evil.png", png_bytes(), "image/png")}, headers=WRITE)
    assert response.status_code == 200, response.text
    data = response.json()
    assert (data["width"], data["height"]) == (32, 24)
    stored = list((settings.data_dir / "uploads").iterdir())
    assert [p.name for p in stored] == [f"{data['id']}.png"]
    image = client.get(f"/api/uploads/{data['id']}", headers=AUTH)
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert client.get("/api/uploads/..%2F..%2Fconfig", headers=AUTH).status_code in (400, 404)


@pytest.mark.parametrize(
    "payload, status, words",
    [
        (b"this is not an image", 415, "not a readable image"),
        (b"", 400, "empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, 415, "not a readable image"),
        (None, 413, "limit"),  # larger than max_upload_bytes
    ],
)
def test_upload_rejects_bad_files_clearly(env, payload: bytes | None, status: int, words: str) -> None:
    client, settings, *_ = env
    if payload is None:
        payload = b"\x89PNG" + b"\x00" * (settings.max_upload_bytes + 10)
    response = client.post("/api/uploads", files={"file": ("x.png", payload, "image/png")}, headers=WRITE)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert not list((settings.data_dir / "uploads").iterdir())


def test_image_thumbnails_only_inside_allowed_folders(env, tmp_path: Path) -> None:
    client, _, work, _ = env
    Image.new("RGB", (400, 300), (0, 128, 0)).save(work / "frame.png")
    Image.new("RGB", (40, 30)).save(tmp_path / "outside.png")
    ok = client.get("/api/image", params={"path": str(work / "frame.png"), "size": 100}, headers=AUTH)
    assert ok.status_code == 200
    assert Image.open(io.BytesIO(ok.content)).size == (100, 75)
    for path in (str(tmp_path / "outside.png"), str(work / ".." / "outside.png"), "/etc/passwd"):
        response = client.get("/api/image", params={"path": path}, headers=AUTH)
        assert response.status_code == 403, path
    (work / "notes.txt").write_text("secret")
    assert client.get("/api/image", params={"path": str(work / "notes.txt")}, headers=AUTH).status_code == 404
    (work / "link.png").symlink_to(tmp_path / "outside.png")
    assert client.get("/api/image", params={"path": str(work / "link.png")}, headers=AUTH).status_code == 403


# --- runs ------------------------------------------------------------------------------------------------
def read_sse(client: TestClient, run_id: str) -> list[tuple[str, dict]]:
    messages = []
    with client.stream("GET", f"/api/runs/{run_id}/events", headers=AUTH) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                messages.append((kind, json.loads(line[6:])))
    return messages


def test_run_lifecycle_streams_events_and_serves_videos(env) -> None:
    client, _, work, _ = env
    assert client.post("/api/runs", json={}, headers=WRITE).status_code == 409  # nothing saved yet
    save_config(client, work)
    run = client.post("/api/runs", json={}, headers=WRITE).json()
    assert run["status"] in ("starting", "running", "completed")
    messages = read_sse(client, run["id"])  # ends when the run ends
    kinds = [m[1].get("event") for m in messages if m[0] == "train"]
    assert kinds == ["start", "step", "step", "step", "validation", "end"]
    assert messages[-1] == ("done", {"status": "completed"})
    assert any(kind == "log" and "step 3/3" in data["lines"] for kind, data in messages)
    detail = client.get(f"/api/runs/{run['id']}", headers=AUTH).json()
    assert detail["status"] == "completed" and detail["step"] == 3 and detail["peak_mem_gib"] == 1.5
    only = client.get(f"/api/runs/{run['id']}", params={"events": "validation"}, headers=AUTH).json()
    assert [e["event"] for e in only["events"]] == ["validation"] and only["step"] == 3
    assert client.get(f"/api/runs/{run['id']}", params={"events": "none"}, headers=AUTH).json()["events"] == []
    bad = client.get(f"/api/runs/{run['id']}", params={"events": "steps"}, headers=AUTH)
    assert bad.status_code == 422 and "step" in bad.json()["detail"]
    assert detail["lora_path"].endswith("longcat_lora.safetensors")
    video = client.get(f"/api/runs/{run['id']}/files/validation/step-3/0.mp4", headers=AUTH)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    for bad in ("..%2F..%2Fdata%2Fconfig%2Fconfig.json", "%2Fetc%2Fpasswd", "validation/../../model"):
        assert client.get(f"/api/runs/{run['id']}/files/{bad}", headers=AUTH).status_code in (403, 404), bad
    assert client.get(f"/api/runs/{run['id']}/files/missing.mp4", headers=AUTH).status_code == 404
    loras = client.get("/api/loras", headers=AUTH).json()
    assert [lora["name"] for lora in loras] == ["longcat_lora.safetensors"]
    assert client.get("/api/runs/..%2F..%2Fconfig", headers=AUTH).status_code == 404
    assert client.post(f"/api/runs/{run['id']}/stop", headers=WRITE).status_code == 409


def test_stop_sends_sigterm_and_resume_continues(env) -> None:
    client, settings, work, monkeypatch = env
    save_config(client, work)
    monkeypatch.setenv("FAKE_MODE", "wait")
    run = client.post("/api/runs", json={}, headers=WRITE).json()
    wait_for(lambda: client.get(f"/api/runs/{run['id']}", headers=AUTH).json()["step"] == 3)
    assert client.get(f"/api/runs/{run['id']}", headers=AUTH).json()["status"] == "running"
    assert client.post("/api/runs", json={}, headers=WRITE).status_code == 409  # same output_dir busy
    assert client.post(f"/api/runs/{run['id']}/resume", headers=WRITE).status_code == 409
    stopped = client.post(f"/api/runs/{run['id']}/stop", headers=WRITE)
    assert stopped.status_code == 200 and stopped.json()["status"] in ("stopping", "interrupted")
    wait_for(lambda: (d := client.get(f"/api/runs/{run['id']}", headers=AUTH).json())["status"] == "interrupted" and not d["alive"])
    monkeypatch.setenv("FAKE_MODE", "complete")
    resumed = client.post(f"/api/runs/{run['id']}/resume", headers=WRITE).json()
    assert resumed["id"] != run["id"] and resumed["resumed_from"] == run["id"]
    snapshot = json.loads((settings.data_dir / "jobs" / "run" / resumed["id"] / "config.json").read_text())
    assert snapshot["resume_from_checkpoint"] == "latest"
    wait_for(lambda: client.get(f"/api/runs/{resumed['id']}", headers=AUTH).json()["status"] == "completed")
    # Both runs append to one events file; each run shows only its own events.
    first = client.get(f"/api/runs/{run['id']}", headers=AUTH).json()
    assert first["status"] == "interrupted" and [e["event"] for e in first["events"]][-1] == "end"
    assert len(client.get("/api/runs", headers=AUTH).json()) == 2
    # The resumed run's stream starts with the earlier run's losses up to its checkpoint (step 2).
    messages = read_sse(client, resumed["id"])
    assert messages[0] == ("history", {"points": [[1, 1.0], [2, 0.5]], "start_step": 2})
    assert [m[1]["step"] for m in messages if m[0] == "train" and m[1].get("event") == "step"] == [3]
    assert not any(kind == "history" for kind, _ in read_sse(client, run["id"]))  # the first run has none


def test_a_run_that_dies_without_an_end_event_is_reported(env) -> None:
    client, _, work, monkeypatch = env
    save_config(client, work)
    monkeypatch.setenv("FAKE_MODE", "crash")
    run = client.post("/api/runs", json={}, headers=WRITE).json()
    detail = wait_for(lambda: (d := client.get(f"/api/runs/{run['id']}", headers=AUTH).json())["status"] == "died" and d)
    assert "code 1" in detail["message"] and "without an end event" in detail["message"]
    assert any("boom" in line for line in detail["log"])


def test_status_survives_a_server_restart(env) -> None:
    client, settings, work, _ = env
    save_config(client, work)
    run = client.post("/api/runs", json={}, headers=WRITE).json()
    wait_for(lambda: client.get(f"/api/runs/{run['id']}", headers=AUTH).json()["status"] == "completed")
    fresh = TestClient(create_app(settings), base_url="http://127.0.0.1:8765")  # no Popen handles now
    assert fresh.get(f"/api/runs/{run['id']}", headers=AUTH).json()["status"] == "completed"


# --- check and preview -----------------------------------------------------------------------------------
def test_check_job_returns_the_report(env) -> None:
    client, _, work, _ = env
    save_config(client, work)
    job = client.post("/api/checks", headers=WRITE).json()
    done = wait_for(lambda: (d := client.get(f"/api/checks/{job['id']}", headers=AUTH).json())["status"] != "running" and d)
    assert done["status"] == "completed" and done["returncode"] == 1
    assert done["report"]["datasets"][0]["skipped"][0]["reason"] == "no start frame"
    assert done["report"]["blocking"] and done["log"] == ["note: a warning on stderr"]
    assert client.get("/api/checks/nope", headers=AUTH).status_code == 404


def test_preview_runs_sample_and_serves_the_video(env) -> None:
    client, _, work, _ = env
    save_config(client, work)
    upload = client.post("/api/uploads", files={"file": ("g.png", png_bytes(), "image/png")}, headers=WRITE).json()
    body = {"upload": upload["id"], "prompt": "a girl smiles", "frames": 5, "steps": 2, "guidance": 4.0, "resolution": "64x64"}
    job = client.post("/api/previews", json=body, headers=WRITE).json()
    done = wait_for(lambda: (d := client.get(f"/api/previews/{job['id']}", headers=AUTH).json())["status"] != "running" and d)
    assert done["status"] == "completed" and done["progress"] == {"done": 2, "total": 2}
    argv = json.loads(done["log"][-1])
    assert argv[argv.index("--model") + 1] == str(work / "model")
    assert argv[argv.index("--frames") + 1] == "5" and "--lora" not in argv and "--progress-json" in argv
    video = client.get(done["video"], headers=AUTH)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert [p["id"] for p in client.get("/api/previews", headers=AUTH).json()] == [job["id"]]


@pytest.mark.parametrize(
    "change, status",
    [
        ({"upload": "0" * 32}, 404),
        ({"upload": "../../etc/passwd"}, 400),
        ({"model": "/etc"}, 403),
        ({"lora": "/etc/passwd"}, 403),
        ({"resolution": "big"}, 422),
        ({"frames": 0}, 422),
    ],
)
def test_preview_rejects_bad_requests(env, change: dict, status: int) -> None:
    client, _, work, _ = env
    save_config(client, work)
    upload = client.post("/api/uploads", files={"file": ("g.png", png_bytes(), "image/png")}, headers=WRITE).json()
    body = {"upload": upload["id"], "prompt": "x", **change}
    response = client.post("/api/previews", json=body, headers=WRITE)
    assert response.status_code == status, response.text


def test_a_failed_check_shows_its_error(env) -> None:
    client, _, work, monkeypatch = env
    save_config(client, work)
    monkeypatch.setenv("FAKE_MODE", "crash")
    job = client.post("/api/checks", headers=WRITE).json()
    done = wait_for(lambda: (d := client.get(f"/api/checks/{job['id']}", headers=AUTH).json())["status"] != "running" and d)
    assert done["status"] == "failed" and done["returncode"] == 2 and done["report"] is None
    assert "output_dir: required" in done["log"][-1]


def test_log_reader_keeps_the_last_state_of_progress_bars(tmp_path: Path) -> None:
    log = tmp_path / "process.log"
    log.write_bytes(b"loading\ntrain 1/3\rtrain 2/3\rtrain 3/3\ndone\ntrain 1/9\rtrain 2/9\r")
    offset, lines, partial = read_new_lines(log, 0)
    assert lines == ["loading", "train 3/3", "done"] and partial == "train 2/9"
    with open(log, "ab") as handle:
        handle.write(b"train 9/9\n")
    offset, lines, partial = read_new_lines(log, offset)
    assert lines == ["train 9/9"] and partial is None
    assert read_new_lines(log, offset) == (offset, [], None)


def test_import_reads_an_existing_config_relative_to_its_folder(env) -> None:
    client, _, work, _ = env
    project = work / "project"
    project.mkdir()
    body = valid_body(work)
    config = {**body["config"], "output_dir": "runs/a", "data_backend_config": "multidatabackend.json"}
    (project / "config.json").write_text("// my run\n" + json.dumps(config))
    datasets = [{**body["datasets"][0], "instance_data_dir": "clips"}, body["datasets"][1]]
    (project / "multidatabackend.json").write_text(json.dumps(datasets))
    data = client.get("/api/config/import", params={"path": str(project / "config.json")}, headers=AUTH).json()
    assert data["config"]["output_dir"] == str(project / "runs" / "a")
    assert data["datasets"][0]["instance_data_dir"] == str(project / "clips")
    assert client.put("/api/config", json={"config": data["config"], "datasets": data["datasets"]}, headers=WRITE).status_code == 200
    assert client.get("/api/config/import", params={"path": "/etc/passwd"}, headers=AUTH).status_code == 403
    (project / "bad.json").write_text("[1, 2]")
    assert client.get("/api/config/import", params={"path": str(project / "bad.json")}, headers=AUTH).status_code == 422
    (project / "broken.json").write_text("{not json")
    answer = client.get("/api/config/import", params={"path": str(project / "broken.json")}, headers=AUTH)
    assert answer.status_code == 422 and answer.json()["detail"].count(str(project / "broken.json")) == 1  # named once


def test_log_stream_starts_near_the_end_of_a_long_log(tmp_path: Path) -> None:
    log = tmp_path / "process.log"
    log.write_text("".join(f"line {i}\n" for i in range(20000)))
    offset = log_tail_offset(log, keep=1000)
    _, lines, _ = read_new_lines(log, offset)
    assert lines[-1] == "line 19999" and 80 < len(lines) <= 100 and lines[0] == f"line {20000 - len(lines)}"
    assert log_tail_offset(tmp_path / "missing.log") == 0


def test_fast_preview_uses_the_official_distilled_lora(env) -> None:
    client, _, work, _ = env
    save_config(client, work)
    upload = client.post("/api/uploads", files={"file": ("g.png", png_bytes(), "image/png")}, headers=WRITE).json()
    body = {"upload": upload["id"], "prompt": "a girl smiles", "frames": 5, "resolution": "64x64", "fast": True}
    missing = client.post("/api/previews", json=body, headers=WRITE)
    assert missing.status_code == 404 and "cfg_step_lora" in missing.text
    distill = work / "model" / "lora" / "cfg_step_lora.safetensors"
    distill.parent.mkdir(parents=True, exist_ok=True)
    distill.write_bytes(b"{}")
    job = client.post("/api/previews", json=body, headers=WRITE).json()
    done = wait_for(lambda: (d := client.get(f"/api/previews/{job['id']}", headers=AUTH).json())["status"] != "running" and d)
    argv = json.loads(done["log"][-1])
    assert "--distilled" in argv and argv[argv.index("--lora") + 1] == str(distill)
    assert argv[argv.index("--steps") + 1] == "16" and argv[argv.index("--guidance") + 1] == "1.0"
