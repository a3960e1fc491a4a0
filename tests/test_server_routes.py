"""Each router of the web server mounted alone on a bare FastAPI app, with the shared state
dependency (`server.deps.get_state`) overridden: no guard middleware, no `create_app`, no other router.

Also: the GPU indicator's `nvidia-smi` reading, the LoRA list's run folders found in the allowed
folders, the preview log in words, the start frame of a validation video, and that neither the
server nor `longcat-tuner server --help` imports torch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart", reason="python-multipart (the server extra) is needed for uploads")
from fastapi import FastAPI, HTTPException  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from longcat_tuner.server.deps import ServerState, get_state  # noqa: E402
from longcat_tuner.server.guard import add_error_handlers  # noqa: E402
from longcat_tuner.server.routes import config, datasets, previews, runs, system  # noqa: E402
from longcat_tuner.server.settings import ServerSettings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def mount(router, tmp_path: Path, **overrides) -> tuple[TestClient, ServerState]:
    """One router (or a list of them) on a bare app whose state is made here (the real `create_app` is not
    involved)."""
    work = tmp_path / "work"
    work.mkdir(parents=True, exist_ok=True)
    settings = ServerSettings(**{"token": "unused", "data_dir": tmp_path / "data", "allowed_roots": (work,),
                                 "cwd": work, **overrides})  # fmt: skip
    state = ServerState.create(settings)
    app = FastAPI()
    add_error_handlers(app)  # a GuardError (path outside the allowed folders) answers 403, as in the full app
    for one in router if isinstance(router, (list, tuple)) else [router]:
        app.include_router(one)
    app.dependency_overrides[get_state] = lambda: state
    return TestClient(app), state


def test_the_config_router_alone_saves_and_reads_the_files(tmp_path: Path) -> None:
    client, state = mount(config.router, tmp_path)
    work = tmp_path / "work"
    body = {
        "config": {"pretrained_model_name_or_path": str(work / "model"), "output_dir": "out", "max_train_steps": 2,
                   "validation_using_datasets": False},
        "datasets": [{"id": "clips", "dataset_type": "video", "instance_data_dir": "clips",
                      "cache_dir_vae": str(work / "cache")}],
    }  # fmt: skip
    # No token, no custom header: the guard is not part of this app, only the router is.
    saved = client.put("/api/config", json=body)
    assert saved.status_code == 200, saved.text
    read = client.get("/api/config").json()
    # Relative paths made absolute against the server's folder by the trainer's own rule.
    assert read["config"]["output_dir"] == str(work / "out")
    assert read["datasets"][0]["instance_data_dir"] == str(work / "clips")
    assert state.settings.config_path.is_file()
    outside = {**body, "config": {**body["config"], "output_dir": "/etc/out"}}
    errors = client.post("/api/config/validate", json=outside).json()["errors"]
    assert [e["loc"] for e in errors] == [["config", "output_dir"]] and "outside" in errors[0]["msg"]


def test_the_runs_router_alone_lists_and_refuses(tmp_path: Path) -> None:
    client, _ = mount(runs.router, tmp_path)
    assert client.get("/api/runs").json() == []
    missing = client.get("/api/runs/nope")
    assert missing.status_code == 404 and "no run with id 'nope'" in missing.json()["detail"]
    assert client.post("/api/runs", json={}).status_code == 409  # nothing saved yet
    assert client.post("/api/runs/nope/stop").status_code == 404


def test_a_router_reads_the_state_it_is_given(tmp_path: Path) -> None:
    """The override is what the route sees: two states, two answers."""
    first, _ = mount(config.router, tmp_path / "a", max_jobs=3)
    second, _ = mount(config.router, tmp_path / "b", max_jobs=7)
    assert first.get("/api/info").json()["max_jobs"] == 3
    assert second.get("/api/info").json()["max_jobs"] == 7


# --- GPU indicator ---------------------------------------------------------------------------------------
def fake_smi(tmp_path: Path, body: str) -> str:
    script = tmp_path / "nvidia-smi"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    script.chmod(0o755)
    return str(script)


def test_gpu_route_reads_nvidia_smi(tmp_path: Path) -> None:
    smi = fake_smi(tmp_path, '''
        import sys
        assert "--query-gpu=index,name,memory.used,memory.total,utilization.gpu" in sys.argv, sys.argv
        assert "--format=csv,noheader,nounits" in sys.argv
        print("0, NVIDIA H100 80GB HBM3, 40960, 81559, 97")
        print("1, NVIDIA H100 80GB HBM3, 1, 81559, [N/A]")
    ''')
    client, _ = mount(system.router, tmp_path, nvidia_smi=smi)
    data = client.get("/api/system/gpu").json()
    assert data["available"] is True and data["message"] is None
    assert data["gpus"][0] == {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_used_mib": 40960.0,
                               "memory_total_mib": 81559.0, "utilization_pct": 97.0}  # fmt: skip
    assert data["gpus"][1]["utilization_pct"] is None  # "[N/A]" is unknown, not an error


@pytest.mark.parametrize(
    "body, words",
    [
        (None, "not installed"),
        ('import sys; print("NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver"); sys.exit(9)',
         "failed with code 9 (NVIDIA-SMI has failed"),
        ('print("garbage")', "cannot read the output"),
        ("pass", "lists none"),
    ],
)
def test_gpu_route_without_a_working_nvidia_smi_says_no_gpu(tmp_path: Path, body, words: str) -> None:
    smi = str(tmp_path / "absent" / "nvidia-smi") if body is None else fake_smi(tmp_path, body)
    client, _ = mount(system.router, tmp_path, nvidia_smi=smi)
    data = client.get("/api/system/gpu").json()
    assert data["available"] is False and data["gpus"] == []
    assert data["message"].startswith("no GPU: ") and words in data["message"], data["message"]


# --- LoRAs of runs trained from the command line -----------------------------------------------------------
def cli_run(folder: Path) -> Path:
    """A run folder as `longcat-tuner train` leaves it: events, final LoRA, a checkpoint's LoRA."""
    (folder / "checkpoints" / "checkpoint-000010").mkdir(parents=True)
    (folder / "events.jsonl").write_text(json.dumps({"event": "start", "time": 1.0}) + "\n")
    (folder / "longcat_lora.safetensors").write_bytes(b"{}")
    (folder / "checkpoints" / "checkpoint-000010" / "longcat_lora.safetensors").write_bytes(b"{}")
    (folder / "checkpoints" / "checkpoint-000010" / "trainable.safetensors").write_bytes(b"{}")
    return folder


def test_loras_of_cli_runs_in_the_allowed_folders_are_listed(tmp_path: Path) -> None:
    client, _ = mount(previews.router, tmp_path)
    work = tmp_path / "work"
    run = cli_run(work / "experiments" / "motorbike")
    (work / "loose.safetensors").write_bytes(b"{}")  # not in a run folder: not listed, but can be typed
    too_deep = cli_run(work / "a" / "b" / "c" / "d" / "e" / "run")
    cli_run(tmp_path / "elsewhere")  # outside the allowed folders
    listed = client.get("/api/loras").json()
    assert sorted(item["path"] for item in listed) == [
        str(run / "checkpoints" / "checkpoint-000010" / "longcat_lora.safetensors"), str(run / "longcat_lora.safetensors"),
    ]  # fmt: skip
    assert {item["run"] for item in listed} == {None} and {item["run_dir"] for item in listed} == {str(run)}
    assert {item["name"] for item in listed} == {"longcat_lora.safetensors", "checkpoints/checkpoint-000010/longcat_lora.safetensors"}
    assert previews.find_run_folders([work], depth=6) == [run, too_deep]  # the depth bound is what left it out


def test_a_typed_lora_path_is_checked_against_the_allowed_folders(tmp_path: Path) -> None:
    client, state = mount(previews.router, tmp_path, cli=(sys.executable, "-c", "print('sampled')"))
    work = tmp_path / "work"
    (work / "model").mkdir()
    (work / "loose.safetensors").write_bytes(b"{}")
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"{}")
    image = state.uploads / ("a" * 32 + ".png")
    Image.new("RGB", (32, 32)).save(image)
    body = {"upload": "a" * 32, "prompt": "x", "model": str(work / "model"), "frames": 5, "steps": 1, "resolution": "64x64"}
    refused = client.post("/api/previews", json={**body, "lora": str(outside)})
    assert refused.status_code == 403 and "outside the folders" in refused.json()["detail"]
    assert client.post("/api/previews", json={**body, "lora": str(work / "missing.safetensors")}).status_code == 404
    started = client.post("/api/previews", json={**body, "lora": f" {work / 'loose.safetensors'} "})
    assert started.status_code == 200, started.text
    argv = state.store.get("preview", started.json()["id"]).argv
    assert argv[argv.index("--lora") + 1] == str(work / "loose.safetensors")


# --- preview log in words ---------------------------------------------------------------------------------
def test_the_preview_log_reads_as_words() -> None:
    lines = [
        "loading the model",
        json.dumps({"event": "sample_step", "step": 1, "total": 16}),
        json.dumps({"event": "sample_step", "step": 2, "total": 16}),
        json.dumps({"event": "sample_decode", "step": 3, "total": 7}),
        json.dumps({"event": "error", "message": "CUDA out of memory"}),
        json.dumps({"event": "sample_done", "output": "/x/preview.mp4", "height": 480, "width": 832, "frames": 93}),
        '["--model", "m"]',
    ]
    assert previews.preview_messages(lines) == [
        "loading the model",
        "sampling step 2 / 16",  # a progress bar keeps its latest state
        "decode step 3 / 7",
        "error: CUDA out of memory",
        "done: wrote /x/preview.mp4 (93 frames, 480x832)",
        '["--model", "m"]',
    ]
    assert previews.preview_progress(lines) == {"done": 2, "total": 16}


# --- start frame of a validation video ---------------------------------------------------------------------
def test_the_start_frame_of_a_validation_video_comes_from_the_eval_split(tmp_path: Path) -> None:
    work = tmp_path / "work"
    for key, level in (("a", 30), ("sub/b", 200)):
        (work / "val" / "clips" / key).parent.mkdir(parents=True, exist_ok=True)
        (work / "val" / "clips" / f"{key}.mp4").write_bytes(b"\x00")
        (work / "val" / "clips" / f"{key}.txt").write_text(f"caption {key}")
        (work / "val" / "frames" / key).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 20), (level, level, level)).save(work / "val" / "frames" / f"{key}.png")
    datasets_file = work / "multidatabackend.json"
    datasets_file.write_text(json.dumps([
        {"id": "val", "dataset_type": "video", "is_i2v": True, "instance_data_dir": str(work / "val" / "clips"),
         "cache_dir_vae": str(work / "cache" / "v"), "conditioning_data": ["val-cond"]},
        {"id": "val-cond", "dataset_type": "conditioning", "instance_data_dir": str(work / "val" / "frames"),
         "caption_strategy": None, "cache_dir_vae": str(work / "cache" / "c")},
    ]))  # fmt: skip
    config = {"eval_dataset_id": "val", "data_backend_config": str(datasets_file), "validation_using_datasets": True}
    items = [{"prompt": "caption a", "video": "validation/step-000004/00-a.mp4"},
             {"prompt": "caption sub/b", "video": "validation/step-000004/01-b.mp4"},
             {"prompt": "elsewhere", "video": "validation/step-000004/02-c.mp4", "start_frame": str(work / "c.png")}]
    events = [{"event": "start", "config": config}, {"event": "validation", "step": 4, "items": items}]
    assert runs.start_frame_of(events, items[0]["video"]) == work / "val" / "frames" / "a.png"
    assert runs.start_frame_of(events, items[1]["video"]) == work / "val" / "frames" / "sub" / "b.png"
    assert runs.start_frame_of(events, items[2]["video"]) == work / "c.png"  # named by the event: taken as is
    with pytest.raises(HTTPException, match="no validation video"):
        runs.start_frame_of(events, "validation/step-000004/09-z.mp4")
    text_to_video = [{"event": "start", "config": {**config, "validation_using_datasets": False}}, events[1]]
    with pytest.raises(HTTPException, match="text-to-video"):
        runs.start_frame_of(text_to_video, items[0]["video"])


# --- no torch ----------------------------------------------------------------------------------------------
def test_the_server_and_its_help_import_no_torch(tmp_path: Path) -> None:
    """Creating the app (every router) and `longcat-tuner server --help` leave torch unimported."""
    code = textwrap.dedent(f"""
        import contextlib, io, sys
        from pathlib import Path
        from longcat_tuner.server.app import ServerSettings, create_app
        app = create_app(ServerSettings(token="t", data_dir=Path({str(tmp_path / "data")!r})))
        from longcat_tuner.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
            main(["server", "--help"])
        assert "--allow-dir" in out.getvalue(), out.getvalue()
        bad = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
        assert not bad, bad
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr

