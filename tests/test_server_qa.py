"""Web server fixes from a QA pass: concurrent config saves, a run folder named by an edited events file,
a second Stop, config files the server cannot read, over-long ids and paths, a one-frame preview, and
null where a path goes. Each router is mounted alone, as in `tests/test_server_routes.py`."""
from __future__ import annotations

import io
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart", reason="python-multipart (the server extra) is needed for uploads")
from PIL import Image  # noqa: E402

from longcat_tuner.server import jobs  # noqa: E402
from longcat_tuner.server.configfiles import ConfigBody  # noqa: E402
from longcat_tuner.server.deps import ServerState  # noqa: E402
from longcat_tuner.server.jobs import Job  # noqa: E402
from longcat_tuner.server.routes import config, datasets, previews, runs  # noqa: E402
from test_server_routes import mount  # noqa: E402  (routers on a bare app with its own state)




def config_body(work: Path, marker: int) -> dict:
    """A valid pair whose config and datasets both carry `marker` (to tell which save wrote each file)."""
    return {
        "config": {"pretrained_model_name_or_path": str(work / "model"), "output_dir": "out",
                   "max_train_steps": marker, "validation_using_datasets": False},
        "datasets": [{"id": f"clips{marker}", "dataset_type": "video", "instance_data_dir": "clips",
                      "cache_dir_vae": str(work / "cache")}],
    }  # fmt: skip


def fake_run(state: ServerState, output_dir: Path, *, run_dir: str) -> Job:
    """A run job of this server whose events file (written by "the trainer", here the test) names `run_dir`."""
    job_id, folder = state.store.new_folder("run")
    job = Job(id=job_id, kind="run", folder=folder, argv=["train"], pid=os.getpid(), start_ticks=None,
              started=time.time(), extra={"output_dir": str(output_dir)})  # fmt: skip
    state.store.save(job)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = {"event": "start", "time": time.time(), "pid": os.getpid(), "run_dir": run_dir, "total_steps": 2}
    (output_dir / "events.jsonl").write_text(json.dumps(start) + "\n")
    return job


# --- 1. concurrent saves ------------------------------------------------------------------------------------
def test_concurrent_config_saves_leave_both_files_valid_and_from_one_save(tmp_path: Path) -> None:
    _, state = mount([config.router], tmp_path)
    work = tmp_path / "work"
    errors: list[BaseException] = []
    answers: list[int] = []
    barrier = threading.Barrier(8)

    def saver(thread: int) -> None:
        try:
            barrier.wait()
            for round_ in range(15):
                body = ConfigBody.model_validate(config_body(work, 1 + thread * 100 + round_))
                answers.append(config.save_config(body, state).status_code)
        except BaseException as err:  # noqa: BLE001 - any error of a save fails the test
            errors.append(err)

    threads = [threading.Thread(target=saver, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    assert answers and set(answers) == {200}
    saved = json.loads(state.settings.config_path.read_text())
    saved_datasets = json.loads(state.settings.datasets_path.read_text())
    assert saved_datasets[0]["id"] == f"clips{saved['max_train_steps']}"  # both files from the same save
    leftovers = [p.name for p in state.settings.config_path.parent.iterdir() if ".tmp" in p.name]
    assert leftovers == []


def test_concurrent_saves_through_the_endpoint_answer_200(tmp_path: Path) -> None:
    client, state = mount([config.router], tmp_path)
    work = tmp_path / "work"
    codes: list[int] = []
    barrier = threading.Barrier(6)

    def saver(thread: int) -> None:
        barrier.wait()
        for round_ in range(5):
            codes.append(client.put("/api/config", json=config_body(work, 1 + thread * 10 + round_)).status_code)

    threads = [threading.Thread(target=saver, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes == [200] * 30
    read = client.get("/api/config").json()
    assert read["datasets"][0]["id"] == f"clips{read['config']['max_train_steps']}"


def test_a_write_uses_its_own_temporary_beside_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from longcat_tuner.server import configfiles

    seen: list[str] = []
    real = configfiles.atomic_file

    def spy(path, **kwargs):
        seen.append(Path(path).name + kwargs["suffix"])
        return real(path, **kwargs)

    monkeypatch.setattr(configfiles, "atomic_file", spy)
    configfiles.write_json(tmp_path / "config.json", {"a": 1})
    configfiles.write_json(tmp_path / "config.json", {"a": 2})
    assert len(set(seen)) == 2 and all(name.startswith("config.json.tmp") for name in seen)
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 2}


# --- 2. the run folder of an edited events file ----------------------------------------------------------------
def test_run_files_refuse_a_run_folder_outside_the_allowed_folders(tmp_path: Path) -> None:
    client, state = mount([runs.router], tmp_path)
    work = tmp_path / "work"
    job = fake_run(state, work / "out", run_dir="/")
    answer = client.get(f"/api/runs/{job.id}/files/etc/passwd")
    assert answer.status_code == 403, answer.text
    assert "run folder" in answer.json()["detail"] and "root:" not in answer.text
    # A symlink inside the allowed folders that leads out counts as outside.
    (work / "escape").symlink_to("/")
    job2 = fake_run(state, work / "out2", run_dir=str(work / "escape"))
    assert client.get(f"/api/runs/{job2.id}/files/etc/passwd").status_code == 403
    # The run folder inside the allowed folders: its files are served.
    job3 = fake_run(state, work / "out3", run_dir=str(work / "out3"))
    (work / "out3" / "video.mp4").write_bytes(b"not really a video")
    served = client.get(f"/api/runs/{job3.id}/files/video.mp4")
    assert served.status_code == 200 and served.content == b"not really a video"


# --- 3. Stop pressed twice -----------------------------------------------------------------------------------------
@pytest.fixture
def sleeper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """(state, client, job, signals sent): a live process started as a run, and the signals `stop` sends to it
    (recorded, not delivered; the process is killed at the end)."""
    client, state = mount([runs.router, previews.router], tmp_path)
    state.store.cli = [sys.executable, "-c", "import time; time.sleep(60)"]
    job_id, folder = state.store.new_folder("run")
    job = state.store.start("run", job_id, folder, [], {"output_dir": str(tmp_path / "work" / "out")})
    sent: list[tuple[int, int]] = []
    real_kill = os.kill

    def kill(pid: int, sig: int) -> None:
        if sig == 0:
            return real_kill(pid, sig)
        sent.append((pid, sig))

    monkeypatch.setattr(jobs.os, "kill", kill)
    yield state, client, job, sent
    real_kill(job.pid, signal.SIGKILL)
    state.store.wait(job, 10)


def test_a_second_stop_sends_no_second_sigterm(sleeper) -> None:
    state, _, job, sent = sleeper
    assert state.store.stop(state.store.get("run", job.id)) is True
    assert sent == [(job.pid, signal.SIGTERM)]
    # Pressed again while the trainer writes its checkpoint: a fresh read of the job, or the same object.
    assert state.store.stop(state.store.get("run", job.id)) is True
    assert state.store.stop(job) is True
    assert sent == [(job.pid, signal.SIGTERM)]


def test_the_stop_endpoint_answers_stopping_twice_with_one_signal(sleeper) -> None:
    _, client, job, sent = sleeper
    first = client.post(f"/api/runs/{job.id}/stop")
    second = client.post(f"/api/runs/{job.id}/stop")
    assert first.status_code == second.status_code == 200, second.text
    assert first.json()["status"] == second.json()["status"] == "stopping"
    assert sent == [(job.pid, signal.SIGTERM)]


def test_concurrent_stops_send_one_sigterm(sleeper) -> None:
    state, _, job, sent = sleeper
    barrier = threading.Barrier(6)

    def stop() -> None:
        barrier.wait()
        state.store.stop(state.store.get("run", job.id))

    threads = [threading.Thread(target=stop) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sent == [(job.pid, signal.SIGTERM)]


def test_a_stop_after_the_process_ended_is_still_409(tmp_path: Path) -> None:
    client, state = mount([runs.router], tmp_path)
    state.store.cli = [sys.executable, "-c", "pass"]
    job_id, folder = state.store.new_folder("run")
    job = state.store.start("run", job_id, folder, [], {"output_dir": str(tmp_path / "work" / "out")})
    assert state.store.wait(job, 20)
    assert client.post(f"/api/runs/{job.id}/stop").status_code == 409


# --- 4. config files the server cannot read ----------------------------------------------------------------------
def test_a_config_saved_by_notepad_with_a_bom_is_read(tmp_path: Path) -> None:
    client, state = mount([config.router], tmp_path)
    state.settings.config_path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"max_train_steps": 7}).encode())
    state.settings.datasets_path.write_bytes(b"\xef\xbb\xbf[]")
    answer = client.get("/api/config")
    assert answer.status_code == 200, answer.text
    assert answer.json()["config"] == {"max_train_steps": 7} and answer.json()["datasets"] == []


@pytest.mark.parametrize("content, words", [
    (b'{"max_train_steps": 7, "output_dir": "caf\xe9"}', "not UTF-8"),
    (b'{"max_train_steps": 7,,}', "not valid JSON"),
    (b"", "empty"),
    (b"[1, 2]", "not a JSON object"),
])  # fmt: skip
def test_a_config_file_that_cannot_be_read_is_an_error_naming_it(tmp_path: Path, content: bytes, words: str) -> None:
    client, state = mount([config.router], tmp_path)
    state.settings.config_path.write_bytes(content)
    answer = client.get("/api/config")
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert str(state.settings.config_path) in detail and words in detail
    assert state.settings.config_path.read_bytes() == content  # nothing rewritten


def test_a_broken_datasets_file_is_an_error_too(tmp_path: Path) -> None:
    client, state = mount([config.router], tmp_path)
    state.settings.config_path.write_text("{}")
    state.settings.datasets_path.write_bytes(b"[{\xff}]")
    answer = client.get("/api/config")
    assert answer.status_code == 422 and str(state.settings.datasets_path) in answer.json()["detail"]


# --- 5. over-long ids and paths -------------------------------------------------------------------------------------
def test_over_long_ids_are_404(tmp_path: Path) -> None:
    client, _ = mount([runs.router, datasets.router, previews.router], tmp_path)
    long = "a" * 300
    for method, url in [
        ("GET", "/api/checks/" + "a" * 5000), ("POST", f"/api/checks/{long}/stop"),
        ("GET", f"/api/runs/{long}"), ("POST", f"/api/runs/{long}/stop"), ("POST", f"/api/runs/{long}/resume"),
        ("GET", f"/api/runs/{long}/log"), ("GET", f"/api/previews/{long}"), ("GET", f"/api/previews/{long}/video"),
        ("POST", f"/api/previews/{long}/stop"),
    ]:  # fmt: skip
        answer = client.request(method, url)
        assert answer.status_code == 404, (url[:40], answer.status_code, answer.text[:200])
        assert len(answer.text) < 500  # the id is not echoed whole
    resume = client.post("/api/runs", json={"resume_from": long})
    assert resume.status_code == 404, resume.text


def test_over_long_paths_are_4xx_with_a_message(tmp_path: Path) -> None:
    client, state = mount([runs.router, datasets.router, previews.router, config.router], tmp_path)
    work = tmp_path / "work"
    for url in ["/api/image?path=/" + "a" * 5000, f"/api/image?path={work}/" + "b" * 300,
                "/api/config/import?path=/" + "c" * 300]:  # fmt: skip
        answer = client.get(url)
        assert answer.status_code == 400, (url[:40], answer.text[:200])
        assert "too long" in answer.json()["detail"]
    job = fake_run(state, work / "out", run_dir=str(work / "out"))
    answer = client.get(f"/api/runs/{job.id}/files/" + "d" * 300)
    assert answer.status_code == 400 and "too long" in answer.json()["detail"]
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buffer, format="PNG")
    upload = client.post("/api/uploads", files={"file": ("f.png", buffer.getvalue(), "image/png")}).json()
    body = {"upload": upload["id"], "prompt": "a girl smiles", "model": str(work / "model"), "frames": 5,
            "resolution": "64x64", "lora": "/" + "e" * 5000}  # fmt: skip
    answer = client.post("/api/previews", json=body)
    assert answer.status_code == 400 and "too long" in answer.json()["detail"], answer.text[:300]


# --- 6. a preview of fewer than 5 frames ---------------------------------------------------------------------------
@pytest.mark.parametrize("frames", [1, 2, 4])
def test_a_preview_of_fewer_than_5_frames_is_422_naming_the_field(tmp_path: Path, frames: int) -> None:
    client, state = mount([previews.router], tmp_path)
    state.store.cli = [sys.executable, "-c", "raise SystemExit('must not start')"]
    body = {"upload": "0" * 32, "prompt": "a girl smiles", "model": str(tmp_path / "work" / "model"),
            "frames": frames, "resolution": "64x64"}  # fmt: skip
    answer = client.post("/api/previews", json=body)
    assert answer.status_code == 422, answer.text
    messages = " ".join(item["msg"] for item in answer.json()["detail"])
    assert messages.startswith("frames:") and "at least 5 frames" in messages
    assert state.store.list("preview") == []


# --- 7. null where a path goes -------------------------------------------------------------------------------------
def test_null_output_dir_is_explained_as_the_cli_does(tmp_path: Path) -> None:
    client, _ = mount([config.router], tmp_path)
    body = config_body(tmp_path / "work", 1)
    body["config"]["output_dir"] = None
    for answer in (client.put("/api/config", json=body), client.post("/api/config/validate", json=body)):
        errors = {tuple(e["loc"]): e["msg"] for e in answer.json()["errors"]}
        assert errors[("config", "output_dir")] == "null is not allowed here; give a path", errors
        assert "pathlib" not in json.dumps(list(errors.values()))


def test_a_run_refused_at_start_says_why_and_log_lines_carry_no_terminal_codes(tmp_path):
    """A run the CLI refused before its first event (an output_dir holding another run) showed only "died ...
    without an end event; see the log"; the log endpoint passed tqdm's cursor codes (`\\x1b[A`) to the page."""
    from longcat_tuner.server.routes.runs import run_status

    folder = tmp_path / "job"
    folder.mkdir()
    job = Job(id="r1", kind="run", folder=folder, argv=["train"], pid=0, start_ticks=None, started=0.0,
              extra={"output_dir": str(tmp_path)})
    job.returncode = 2
    job.log_path.write_text("loading\n\x1b[Asteps 0/10\rsteps 1/10\nerror: output_dir /x already holds an earlier run\n")
    status, message = run_status(job, False, [])
    assert status == "died" and message.endswith(": output_dir /x already holds an earlier run")
    assert jobs.tail_lines(job.log_path) == ["loading", "steps 1/10", "error: output_dir /x already holds an earlier run"]
    job.log_path.write_text("a traceback nobody named\n")
    assert run_status(job, False, [])[1].endswith("; see the log below")
