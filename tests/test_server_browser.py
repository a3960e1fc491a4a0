"""End to end in a real browser: `longcat-tuner server` driven by Playwright through Debian's Chromium.

Opens the page with the token, fills the schema-generated config form (inline validation included)
for the tiny checkpoint and a tiny synthetic image-to-video dataset, saves, starts a short CPU run,
watches the loss chart and the validation video appear, then previews a video from
`../shared/assets/girl.png` with the trained LoRA. Along the way: the loss chart's y labels differ, Stop
is disabled once a run has ended, start-frame dataset cards hide the keys they do not use, the GPU
indicator reads `nvidia-smi` (a stand-in printing one H100 is put on the server's PATH), each validation
video shows its start frame, the preview's LoRA list offers a run folder trained outside the UI and
takes a typed path, its log reads as words, and "Fast preview" wraps as a paragraph. Screenshots go to
tmp_path and are copied to `test-artifacts/server-browser/` in the repository.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINY = SHARED / "reference" / "longcat-tiny"
GIRL = SHARED / "assets" / "girl.png"
CHROMIUM = Path(os.environ.get("LONGCAT_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = REPO / "test-artifacts" / "server-browser"
TOKEN = "browser-test-token"
# Long enough that Stop lands inside the training loop even at ~20 steps/s, short enough for a slow CPU.
STEPS = 40

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _require() -> None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set LONGCAT_CHROMIUM)")
    if not TINY.is_dir() or not GIRL.is_file():
        pytest.skip(f"needs the shared tiny checkpoint and assets next to the repo ({SHARED})")
    pytest.importorskip("multipart", reason="python-multipart (the server extra) is needed for uploads")


def make_dataset(root: Path) -> None:
    """Two 12-frame 64x64 clips with start frames and captions, for the train and the eval split."""
    from longcat_tuner.data.synthetic import write_image, write_video

    for split in ("train", "val"):
        for index, name in enumerate(("a", "b")):
            write_video(root / split / "clips" / f"{name}.mp4", frames=12, fps=15, height=64, width=64)
            (root / split / "clips" / f"{name}.txt").write_text(f"a grey square {name}")
            write_image(root / split / "start-frames" / f"{name}.png", height=64, width=64, level=40 + 60 * index)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def server(tmp_path: Path):
    _require()
    make_dataset(tmp_path / "videos")
    port = free_port()
    # The GPU indicator's source: an nvidia-smi that answers like one H100 at 40 GiB and 97 % use.
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(f"#!{sys.executable}\nprint('0, NVIDIA H100 80GB HBM3, 40960, 81559, 97')\n")
    smi.chmod(0o755)
    env = {**os.environ, "LONGCAT_TUNER_TOKEN": TOKEN, "PYTHONPATH": str(REPO),
           "PATH": f"{smi.parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    command = [
        sys.executable, "-m", "longcat_tuner.cli", "server", "--port", str(port), "--data-dir", str(tmp_path / "ui"),
        "--allow-dir", str(tmp_path), "--allow-dir", str(TINY), "--allow-dir", str(GIRL.parent),
    ]  # fmt: skip
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while time.time() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        if process.poll() is not None:
            pytest.fail(f"server exited: {(tmp_path / 'server.log').read_text()}")
        time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(10)
    log.close()


def wait_until(predicate, timeout_s: float):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"condition not reached in {timeout_s} s")


def shoot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / "screenshots" / f"{name}.png"
    path.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    try:  # a copy in the repository for CI artifacts; the test does not depend on it
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, ARTIFACTS / path.name)
    except OSError:
        pass


def fill(root, key: str, value: str) -> None:
    """Type into the generated input of schema key `key` inside `root` (a page or a locator)."""
    root.locator(f"[data-key='{key}']").fill(value)


def test_configure_train_watch_and_preview_in_chromium(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # no stale screenshots from an earlier run
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        try:
            # 1. The token opens the page once; afterwards the cookie carries it.
            page.goto(f"{server}/?token={TOKEN}")
            expect(page.locator("body")).to_have_attribute("data-ready", "1", timeout=20_000)
            assert "token" not in page.url

            # 2. Config editor generated from the schema, with inline validation.
            lora_rank = page.locator("#config-form [data-field='lora_rank']")
            expect(lora_rank.locator(".help")).to_contain_text("LoRA rank")
            form = page.locator("#config-form")
            fill(form, "validation_num_video_frames", "6")
            error = page.locator("#config-form [data-error-for='validation_num_video_frames']")
            expect(error).to_contain_text("divisible by 4", timeout=10_000)
            fill(form, "validation_num_video_frames", "5")
            expect(error).to_have_text("", timeout=10_000)
            fill(form, "pretrained_model_name_or_path", str(TINY))
            fill(form, "output_dir", str(tmp_path / "run"))
            for key, value in {
                "lora_rank": "4", "max_train_steps": str(STEPS), "validation_step_interval": str(STEPS),
                "checkpoint_step_interval": str(STEPS), "eval_dataset_id": "val", "validation_resolution": "64x64",
                "validation_num_inference_steps": "2", "validation_max_samples": "1", "lr_warmup_steps": "0",
            }.items():  # fmt: skip
                fill(form, key, value)
            page.locator("#config-form [data-key='gradient_checkpointing']").uncheck()
            shoot(page, tmp_path, "1-config")
            page.click("nav a[data-tab='datasets']")
            for folder in ("train", "val"):
                page.once("dialog", lambda dialog, folder=folder: dialog.accept(str(tmp_path / "videos" / folder)))
                page.click("#dataset-add-i2v")
            cards = page.locator("#datasets-form .dataset")
            expect(cards).to_have_count(4)
            # Start-frame cards (1 and 3) show only what a conditioning dataset uses.
            for index in (1, 3):
                for key in ("resolution", "crop", "crop_style", "repeats", "caption_strategy"):
                    expect(cards.nth(index).locator(f"[data-field='{key}']")).to_be_hidden()
                expect(cards.nth(index).locator("fieldset[data-key='video']")).to_be_hidden()
                expect(cards.nth(index).locator("[data-field='instance_data_dir']")).to_be_visible()
                expect(cards.nth(index).locator("[data-field='cache_dir_vae']")).to_be_visible()
            for index in (0, 2):
                expect(cards.nth(index).locator("fieldset[data-key='video']")).to_be_visible()
                fill(cards.nth(index), "resolution", "64x64")
            fill(cards.nth(0), "num_frames", "6")
            frames_error = cards.nth(0).locator("[data-error-for='num_frames']")
            expect(frames_error).to_contain_text("divisible by 4", timeout=10_000)
            for index in (0, 2):
                fill(cards.nth(index), "num_frames", "5")
            expect(frames_error).to_have_text("", timeout=10_000)
            shoot(page, tmp_path, "2-datasets")
            page.click("#tab-datasets .save-config")
            expect(page.locator("#tab-datasets .save-state")).to_have_text(re.compile(r"^saved \d"), timeout=10_000)
            expect(page.locator(".field.invalid")).to_have_count(0)
            saved = json.loads((tmp_path / "ui" / "config" / "config.json").read_text())
            assert saved["lora_rank"] == 4 and saved["gradient_checkpointing"] is False
            datasets = json.loads((tmp_path / "ui" / "config" / "multidatabackend.json").read_text())
            assert [d["id"] for d in datasets] == ["train", "train-cond", "val", "val-cond"]

            # 3. Dataset check: pairs with start-frame thumbnails, buckets, nothing skipped.
            page.click("#check-run")
            expect(page.locator("#check-summary")).to_contain_text("Ready to train", timeout=60_000)
            train_card = page.locator(".check-dataset[data-dataset='train']")
            expect(train_card).to_contain_text("5x64x64")
            thumbs = train_card.locator(".thumbs img")
            expect(thumbs).to_have_count(2)
            wait_until(lambda: thumbs.first.evaluate("img => img.complete && img.naturalWidth") == 64, 20)
            shoot(page, tmp_path, "3-datasets-checked")

            # 4. Start a short CPU run and watch it over server-sent events; stop it (SIGTERM: the
            #    trainer writes a resumable checkpoint), resume it, and let it finish.
            page.click("nav a[data-tab='runs']")
            page.click("#run-start")
            chart = page.locator("#loss-chart")

            def points() -> int:
                status = page.locator("#run-status").inner_text()
                if status in ("died", "failed"):  # fail fast, with the trainer's own words
                    raise AssertionError(f"run {status}: {page.locator('#run-log').inner_text()[-3000:]}")
                return int(chart.get_attribute("data-points"))

            # The page's CSP forbids eval, so poll from Python instead of page.wait_for_function.
            first = wait_until(points, 150)
            first_run = page.locator("#run-id").inner_text()
            # The run's memory plan (on the CPU the config's own settings), its settings and reason on hover.
            expect(page.locator("#stat-plan")).to_have_text("as configured")
            assert "no CUDA device" in page.locator("#stat-plan").get_attribute("title")
            # While it trains, the GPU indicator shows nvidia-smi's memory and use.
            expect(page.locator("#stat-gpu")).to_have_text("40.0 / 79.6 GiB · 97%", timeout=10_000)
            page.click("#run-stop")  # at once: on a fast machine the tiny model runs ~20 steps/s
            shoot(page, tmp_path, "4-run-stopping")
            expect(page.locator("#run-status")).to_have_text("interrupted", timeout=60_000)
            expect(page.locator("#run-stop")).to_be_disabled()  # by status: an ended run cannot be stopped
            stopped_at = int(page.locator("#stat-step").inner_text().split("/")[0])
            assert first <= stopped_at < STEPS
            expect(page.locator(f"#runs-table tr[data-run='{first_run}'] .status")).to_have_text("interrupted")
            expect(page.locator("#run-resume")).to_be_enabled()
            page.click("#run-resume")
            expect(page.locator("#run-id")).not_to_have_text(first_run)
            expect(page.locator("#run-status")).to_have_text("completed", timeout=150_000)
            expect(page.locator("#stat-step")).to_have_text(f"{STEPS} / {STEPS}")
            assert points() == STEPS - stopped_at  # the resumed run continues after the checkpoint
            # ...and its chart starts with the first run's losses up to that checkpoint, in grey.
            assert 0 < int(chart.get_attribute("data-history")) <= stopped_at
            expect(page.locator("#run-log")).to_contain_text("resumed from")
            expect(page.locator("#run-stop")).to_be_disabled(timeout=30_000)  # the process has exited
            # Every y-axis label of the chart differs, also for a loss that moves only in its 4th digit.
            labels = chart.get_attribute("data-y-labels").split("|")
            assert len(labels) == 5 and len(set(labels)) == 5, labels
            small = page.evaluate("() => yTickLabels(0.12341, 0.12349, 4)")
            assert len(set(small)) == 5 and all(text.startswith("0.1234") for text in small), small
            shoot(page, tmp_path, "5-run-resumed-and-completed")

            # 5. The validation video plays in the gallery with its step, prompt and PSNR.
            page.click("nav a[data-tab='gallery']")
            video = page.locator("#gallery video").first
            expect(video).to_be_visible(timeout=20_000)
            expect(page.locator("#gallery")).to_contain_text("early-frame drift (frames 1-")
            expect(page.locator("#gallery")).to_contain_text(" dB")  # the run's own value, not "-"
            expect(page.locator("#gallery")).to_contain_text("a grey square")
            expect(video).to_have_attribute("data-loaded", "1", timeout=20_000)  # decodable by Chromium
            # Beside it, the start frame it began from (the eval split's frame, found by the server).
            start_frame = page.locator("#gallery .start-frame img").first
            expect(start_frame).to_have_attribute("data-loaded", "1", timeout=20_000)
            assert start_frame.evaluate("img => img.naturalWidth") == 64
            shoot(page, tmp_path, "6-validation")

            # 6. Preview: upload girl.png, pick the trained LoRA, generate, and the video appears.
            page.click("nav a[data-tab='preview']")
            page.set_input_files("#preview-file", str(GIRL))
            expect(page.locator("#preview-thumb")).to_be_visible(timeout=20_000)
            page.fill("#preview-prompt", "a girl turns her head and smiles")
            page.fill("#preview-frames", "5")
            page.fill("#preview-steps", "2")
            page.fill("#preview-resolution", "64x64")
            # "Fast preview" reads as a paragraph beside its box, not one word per line.
            fast = page.locator("#preview-form label.check span").bounding_box()
            assert fast["height"] < 60 and fast["width"] > 200, fast
            lora_option = page.locator("#preview-lora option", has_text="longcat_lora.safetensors").first
            expect(lora_option).to_be_attached(timeout=10_000)
            page.select_option("#preview-lora", lora_option.get_attribute("value"))
            page.click("#preview-run")
            preview = page.locator("#preview-video")
            expect(preview).to_be_visible(timeout=120_000)
            expect(page.locator("#preview-state")).to_contain_text("completed")
            expect(preview).to_have_attribute("data-loaded", "1", timeout=20_000)
            # The log in words: the sampler's JSON progress lines become steps and a "done" line.
            log = page.locator("#preview-log")
            expect(log).to_contain_text("sampling step 2 / 2")
            expect(log).to_contain_text("done: wrote")
            assert '{"event"' not in log.inner_text()
            shoot(page, tmp_path, "7-preview")

            # 7. A run trained outside the UI (a copy of the run folder, as `train` leaves it) is offered
            #    too, and a typed LoRA path wins over the list.
            cli_run = tmp_path / "cli-run"
            shutil.copytree(tmp_path / "run", cli_run)
            page.click("nav a[data-tab='config']")
            page.click("nav a[data-tab='preview']")
            cli_option = page.locator("#preview-lora option", has_text="cli-run")
            expect(cli_option.first).to_be_attached(timeout=10_000)
            page.fill("#preview-lora-path", str(cli_run / "longcat_lora.safetensors"))
            page.click("#preview-run")
            expect(page.locator("#preview-history li").first).to_contain_text("cli-run/longcat_lora.safetensors", timeout=120_000)
            expect(page.locator("#preview-history li").first).to_contain_text("completed")
            shoot(page, tmp_path, "8-preview-typed-lora")
            assert not errors, errors
        except Exception:
            shoot(page, tmp_path, "failure")
            raise
        finally:
            browser.close()
