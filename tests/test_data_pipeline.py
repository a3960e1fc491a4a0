"""Scan, pairing and problems; `check`; cache build, invalidation and resume; the cache-reading dataset."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longcat_tuner.cli import main as cli_main
from longcat_tuner.config.datasets import load_datasets
from longcat_tuner.data.backends import plan_data
from longcat_tuner.data.buckets import BucketBatchSampler
from longcat_tuner.data.cache import build_caches, read_fingerprint
from longcat_tuner.data.dataset import CachedVideoDataset, collate_samples, sample_posterior
from longcat_tuner.data.synthetic import write_image, write_video
from longcat_tuner.errors import DataError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO.parent / "shared" / "reference" / "longcat-tiny"


def write_config(root: Path, *, resolution: int = 32, num_frames: int = 5, eval_split: bool = True) -> Path:
    datasets = [
        {"id": "train", "dataset_type": "video", "is_i2v": True, "instance_data_dir": "clips", "resolution": resolution,
         "cache_dir_vae": "cache/clips", "conditioning_data": ["train-cond"], "video": {"num_frames": num_frames}},
        {"id": "train-cond", "dataset_type": "conditioning", "instance_data_dir": "starts", "caption_strategy": None,
         "resolution": resolution, "cache_dir_vae": "cache/starts"},
    ]
    if eval_split:
        datasets += [
            {"id": "val", "dataset_type": "video", "is_i2v": True, "instance_data_dir": "val-clips", "resolution": 32,
             "cache_dir_vae": "cache/val", "conditioning_data": ["val-cond"], "video": {"num_frames": 5}},
            {"id": "val-cond", "dataset_type": "conditioning", "instance_data_dir": "val-starts", "caption_strategy": None,
             "resolution": 32, "cache_dir_vae": "cache/val-starts"},
        ]
    path = root / "multidatabackend.json"
    path.write_text(json.dumps(datasets))
    return path


def add_pair(root: Path, clips: str, starts: str, key: str, caption: str = "a red bar slides", frames: int = 18) -> None:
    write_video(root / clips / f"{key}.mp4", frames=frames, fps=30, height=48, width=80)
    write_image(root / starts / f"{key}.png", height=48, width=80)
    (root / clips / f"{key}.txt").write_text(caption)


def test_pairing_and_bad_media_are_reported_by_name(tmp_path):
    add_pair(tmp_path, "clips", "starts", "good")
    add_pair(tmp_path, "clips", "starts", "nested/deep/also_good", caption="second")
    add_pair(tmp_path, "clips", "starts", "short", frames=6)  # 3 frames at 15 fps, 5 needed
    write_video(tmp_path / "clips/no_start.mp4", frames=12, fps=30, height=48, width=80)
    (tmp_path / "clips/no_start.txt").write_text("x")
    write_image(tmp_path / "starts/orphan.png", height=48, width=80)
    (tmp_path / "clips/notes.mp4").write_text("this is not a video")
    (tmp_path / "clips/notes.txt").write_text("x")
    write_image(tmp_path / "starts/notes.png", height=48, width=80)
    good = (tmp_path / "clips/good.mp4").read_bytes()
    (tmp_path / "clips/cut.mp4").write_bytes(good[: len(good) // 2])
    (tmp_path / "clips/cut.txt").write_text("x")
    write_image(tmp_path / "starts/cut.png", height=48, width=80)
    add_pair(tmp_path, "clips", "starts", "empty_caption", caption="  ")
    add_pair(tmp_path, "clips", "starts", "no_caption")
    (tmp_path / "clips/no_caption.txt").unlink()
    config = write_config(tmp_path, eval_split=False)

    plan = plan_data(load_datasets(config), eval_dataset_id=None, alignment=16)
    (train,) = plan.train
    assert sorted(s.source.key for s in train.samples) == ["empty_caption", "good", "nested/deep/also_good"]
    assert {s.bucket.frames for s in train.samples} == {5}
    reasons = {Path(p.path).name: p.reason for p in train.skipped}
    assert set(reasons) == {"short.mp4", "no_start.mp4", "notes.mp4", "cut.mp4", "no_caption.mp4"}
    assert reasons["short.mp4"].startswith("too short: 3 frames at 15 fps")
    assert "no start frame: expected" in reasons["no_start.mp4"] and "starts/no_start.png" in reasons["no_start.mp4"]
    assert reasons["notes.mp4"].startswith("not a readable video")
    assert "caption file no_caption.txt is missing" in reasons["no_caption.mp4"]
    warnings = {Path(p.path).name: p.reason for p in train.warnings}
    assert "caption file empty_caption.txt is empty" in warnings["empty_caption.mp4"]
    (orphan,) = plan.conditioning_problems
    assert orphan.path.endswith("orphan.png") and "orphan start frame" in orphan.reason

    # `check` prints the same, exits 0 while something is usable and 1 when nothing is.
    assert cli_main(["check", "--data_backend_config", str(config), "--data-only"]) == 0
    broken = tmp_path / "broken"
    (broken / "clips").mkdir(parents=True)
    (broken / "clips/x.mp4").write_text("nope")
    (broken / "clips/x.txt").write_text("x")
    write_image(broken / "starts/x.png", height=48, width=80)
    assert cli_main(["check", "--data_backend_config", str(write_config(broken, eval_split=False)), "--data-only"]) == 1


def test_check_reads_config_json_and_reports_json(tmp_path, capsys):
    add_pair(tmp_path, "clips", "starts", "a")
    add_pair(tmp_path, "val-clips", "val-starts", "v")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "pretrained_model_name_or_path": str(tmp_path / "no-model"), "output_dir": "runs/x",
        "data_backend_config": str(write_config(tmp_path)), "eval_dataset_id": "val", "aspect_bucket_alignment": 16,
    }))
    assert cli_main(["check", "--config", str(config), "--json"]) == 1  # the model folder is missing
    summary = json.loads(capsys.readouterr().out)
    assert summary["train_items"] == 1 and summary["eval_items"] == 1
    assert summary["datasets"][0]["buckets"] == {"5x32x64": 1} and "does not exist" in summary["blocking"][0]
    assert cli_main(["check", "--config", str(config), "--data-only"]) == 0
    assert "bucket 5x32x64 (frames x height x width): 1" in capsys.readouterr().out
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "train_batch_size": 2}))
    assert cli_main(["check", "--config", str(config), "--data-only"]) == 1
    assert "train_batch_size 2 is larger than the biggest bucket (1 items" in capsys.readouterr().err


# --- caches ---------------------------------------------------------------------------------------
class CountingVAE:
    """The real tiny VAE, counting what it encodes (each call is one cache entry)."""

    def __init__(self, vae, delay: float = 0.0) -> None:
        self.vae, self.delay, self.calls = vae, delay, []
        self.identity, self.dtype = vae.identity, vae.dtype

    def encode_posterior(self, pixels: torch.Tensor):
        self.calls.append(tuple(pixels.shape[2:]))
        out = self.vae.encode_posterior(pixels)
        time.sleep(self.delay)
        return out


@pytest.fixture(scope="module")
def encoders():
    if not TINY.is_dir():
        pytest.skip(f"tiny checkpoint {TINY} missing (needs ../shared next to the repo)")
    from longcat_tuner.encoders import TextEncoder, VideoVAE

    return VideoVAE.from_pretrained(TINY), TextEncoder.from_pretrained(TINY)


def build(config: Path, encoders, **kwargs):
    vae = CountingVAE(encoders[0])
    index = build_caches(config, vae=vae, text_encoder=encoders[1], eval_dataset_id="val", alignment=16,
                         progress=False, decode_workers=1, **kwargs)
    return index, vae


def entry_times(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in (root / "cache").rglob("*.safetensors")}


def test_cache_rebuilds_exactly_what_changed(tmp_path, encoders):
    add_pair(tmp_path, "clips", "starts", "a", caption="first clip")
    add_pair(tmp_path, "clips", "starts", "b", caption="second clip")
    add_pair(tmp_path, "val-clips", "val-starts", "v", caption="eval clip")
    config = write_config(tmp_path)

    index, vae = build(config, encoders)
    assert index.report.built == {"clip": 3, "start_frame": 3, "text": 4}  # 3 captions + the empty prompt
    assert sorted(vae.calls) == [(1, 32, 64)] * 3 + [(5, 32, 64)] * 3
    assert [s.sample_id for s in index.eval] == ["val/v"] and len(index.train) == 2
    header = read_fingerprint(tmp_path / "cache/clips/a.safetensors")
    assert header["frames"] == "5" and header["height"] == "32" and header["fps"] == "15"
    assert header["model"] == f"{encoders[0].identity}@float32" and header["dtype"] == "float32" and header["source"] == str((tmp_path / "clips/a.mp4").resolve())
    before = entry_times(tmp_path)

    index, vae = build(config, encoders)  # nothing changed: nothing encoded
    assert vae.calls == [] and index.report.reused == {"clip": 3, "start_frame": 3, "text": 4}
    assert entry_times(tmp_path) == before

    write_config(tmp_path, num_frames=9)  # train clips only; start frames and the eval split are unaffected
    index, vae = build(config, encoders)
    assert sorted(vae.calls) == [(9, 32, 64)] * 2
    after = entry_times(tmp_path)
    changed = {k for k in after if after[k] != before[k]}
    assert changed == {"cache/clips/a.safetensors", "cache/clips/b.safetensors"}

    write_config(tmp_path, resolution=48, num_frames=9)  # new bucket: train clips and their start frames
    index, vae = build(config, encoders)
    assert sorted(vae.calls) == [(1, 48, 64)] * 2 + [(9, 48, 64)] * 2
    assert index.report.built == {"clip": 2, "start_frame": 2, "text": 0}
    assert {s.bucket for s in index.train} == {(9, 48, 64)}

    os.utime(tmp_path / "starts/b.png", ns=(time.time_ns(), time.time_ns()))  # an edited source file
    index, vae = build(config, encoders)
    assert vae.calls == [(1, 48, 64)]


def test_killed_build_resumes_without_redoing_finished_entries(tmp_path, encoders):
    for key in ("a", "b", "c"):
        add_pair(tmp_path, "clips", "starts", key, caption=f"clip {key}")
    add_pair(tmp_path, "val-clips", "val-starts", "v")
    config = write_config(tmp_path)
    script = (
        "import sys\n"
        "sys.path.insert(0, sys.argv[3])\n"
        "from test_data_pipeline import CountingVAE\n"
        "from longcat_tuner.encoders import TextEncoder, VideoVAE\n"
        "from longcat_tuner.data.cache import build_caches\n"
        "vae = CountingVAE(VideoVAE.from_pretrained(sys.argv[2]), delay=0.7)\n"
        "build_caches(sys.argv[1], vae=vae, text_encoder=TextEncoder.from_pretrained(sys.argv[2]),\n"
        "             eval_dataset_id='val', alignment=16, progress=False, decode_workers=0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", script, str(config), str(TINY), str(Path(__file__).parent)], env=env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list((tmp_path / "cache").rglob("*.safetensors"))) < 7:  # 5 text + 2 VAE
            assert process.poll() is None, "the build finished before it could be killed"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.safetensors")
            if "text" not in p.parts}
    assert 2 <= len(done) < 8, "kill the build midway (4 clips + 4 start frames)"

    index, vae = build(config, encoders)
    assert len(vae.calls) == 8 - len(done)  # only the unfinished entries are encoded
    assert index.report.built["text"] == 0
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in done.items())
    assert len(index.train) == 3 and len(index.eval) == 1


def test_dataset_reads_caches_and_sampler_batches_by_bucket(tmp_path, encoders):
    add_pair(tmp_path, "clips", "starts", "a", caption="first clip")
    add_pair(tmp_path, "clips", "starts", "b", caption="second clip")
    write_video(tmp_path / "clips/tall.mp4", frames=12, fps=30, height=80, width=48)
    write_image(tmp_path / "starts/tall.png", height=80, width=48)
    (tmp_path / "clips/tall.txt").write_text("a tall clip")
    add_pair(tmp_path, "val-clips", "val-starts", "v")
    config = write_config(tmp_path)
    index, _ = build(config, encoders)

    dataset = CachedVideoDataset.from_manifests([tmp_path / "cache/clips/manifest.json"])
    assert len(dataset) == 3 and "val/v" not in {s.sample_id for s in dataset.samples}  # eval never trained on
    item = dataset[[s.sample_id for s in dataset.samples].index("train/a")]
    assert item["latents_mean"].shape == (16, 2, 4, 8) and item["cond_mean"].shape == (16, 1, 4, 8)
    assert item["text_embeds"].shape == (512, 64) and item["text_mask"].shape == (512,)
    assert item["caption"] == "first clip" and item["media_path"].endswith("clips/a.mp4")
    assert (item["latents_std"].float() > 0).all()
    embeds, mask = dataset.empty_text()
    assert embeds.shape == (512, 64) and int(mask.sum()) == 1  # just the end-of-sequence token

    sampler = BucketBatchSampler(dataset.group_keys(), batch_size=2, seed=3, repeats=dataset.repeats())
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_samples)
    batches = list(loader)
    assert sorted(len(b["sample_id"]) for b in batches) == [1, 2]
    for batch in batches:
        assert len(set(batch["bucket"])) == 1 and batch["cond_mean"].shape[0] == len(batch["sample_id"])
    latents = sample_posterior(batches[0]["latents_mean"], batches[0]["latents_std"], torch.Generator().manual_seed(0))
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()

    (tmp_path / "cache/clips/a.safetensors").write_bytes(b"broken")
    with pytest.raises(DataError, match="sample 'train/a': cache entry .*a.safetensors is missing or corrupt"):
        dataset[[s.sample_id for s in dataset.samples].index("train/a")]


def test_nothing_usable_stops_with_the_reasons(tmp_path, encoders):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips/x.mp4").write_text("nope")
    (tmp_path / "clips/x.txt").write_text("x")
    write_image(tmp_path / "starts/x.png", height=48, width=80)
    config = write_config(tmp_path, eval_split=False)
    with pytest.raises(DataError, match=r"no usable training sample .*x.mp4: not a readable video"):
        build_caches(config, vae=encoders[0], text_encoder=encoders[1], progress=False)


def test_media_that_breaks_while_caching_is_named_skipped_and_counted(tmp_path, encoders):
    from longcat_tuner.data.cache import LazyEncoder, cache_plan

    add_pair(tmp_path, "clips", "starts", "fine")
    add_pair(tmp_path, "clips", "starts", "breaks")
    config = write_config(tmp_path, eval_split=False)
    datasets = load_datasets(config)
    plan = plan_data(datasets, eval_dataset_id=None, alignment=16)
    assert len(plan.train_samples) == 2
    # Corrupted after the scan (a sync still writing it, a disk error): the decode fails mid-build.
    (tmp_path / "clips/breaks.mp4").write_bytes(b"\x00" * 4096)
    index = cache_plan(plan, datasets, vae=LazyEncoder.of(encoders[0]), text_encoder=LazyEncoder.of(encoders[1]), progress=False)
    (failure,) = index.report.failed
    assert failure.path.endswith("breaks.mp4") and "re-encode or remove it" in failure.reason
    assert [s.sample_id for s in index.train] == ["train/fine"]
    assert not (tmp_path / "cache/clips/breaks.safetensors").exists()


def test_cache_command_builds_then_reuses_without_loading_models(tmp_path, monkeypatch, capsys):
    if not TINY.is_dir():
        pytest.skip(f"tiny checkpoint {TINY} missing (needs ../shared next to the repo)")
    add_pair(tmp_path, "clips", "starts", "a")
    config = write_config(tmp_path, eval_split=False)
    args = ["cache", "--data_backend_config", str(config), "--model", str(TINY), "--eval_dataset_id", "none",
            "--aspect_bucket_alignment", "16", "--no-progress"]
    assert cli_main(args) == 0
    assert "built 1 clips, 1 start frames, 2 captions" in capsys.readouterr().out

    from longcat_tuner.encoders import TextEncoder, VideoVAE

    def refuse(*_args, **_kwargs):
        raise AssertionError("an up-to-date cache must not load the encoders")

    monkeypatch.setattr(VideoVAE, "from_pretrained", refuse)
    monkeypatch.setattr(TextEncoder, "from_pretrained", refuse)
    assert cli_main(args) == 0
    assert "built 0 clips, 0 start frames, 0 captions; reused 1 / 1 / 2" in capsys.readouterr().out


def test_sigterm_stops_the_cache_command_like_ctrl_c_and_keeps_finished_entries(tmp_path, encoders):
    # SIGTERM used to end `cache` silently (exit 143); now it prints `interrupted` and exits 130, as SIGINT does.
    for key in ("a", "b", "c"):
        add_pair(tmp_path, "clips", "starts", key, caption=f"clip {key}")
    config = write_config(tmp_path, eval_split=False)
    script = (
        "import sys, time\n"
        "from longcat_tuner.encoders import VideoVAE\n"
        "encode = VideoVAE.encode_posterior\n"
        "def slow(self, pixels):\n"
        "    out = encode(self, pixels)\n"
        "    time.sleep(0.7)\n"
        "    return out\n"
        "VideoVAE.encode_posterior = slow\n"
        "from longcat_tuner.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["cache", "--data_backend_config", str(config), "--model", str(TINY), "--eval_dataset_id", "none",
            "--aspect_bucket_alignment", "16", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len([p for p in (tmp_path / "cache").rglob("*.safetensors")
                                              if "text" not in p.parts]) < 2:
            assert process.poll() is None, f"the build ended before it could be stopped: {process.communicate()}"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted"
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.safetensors") if "text" not in p.parts}
    assert 2 <= len(done) < 6, "stop the build midway (3 clips + 3 start frames)"

    vae = CountingVAE(encoders[0])
    build_caches(config, vae=vae, text_encoder=encoders[1], eval_dataset_id=None, alignment=16, progress=False,
                 decode_workers=1)
    assert len(vae.calls) == 6 - len(done)  # the finished entries are kept, not redone
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in done.items())


def test_image_dataset_and_caption_strategies(tmp_path):
    write_image(tmp_path / "photos/a_red_bar.jpg", height=40, width=80, exif_orientation=6)  # displayed 80x40
    write_video(tmp_path / "clips/some_clip.mp4", frames=12, fps=30, height=48, width=80)
    config = tmp_path / "multidatabackend.json"
    config.write_text(json.dumps([
        {"id": "photos", "dataset_type": "image", "instance_data_dir": "photos", "caption_strategy": "filename",
         "resolution": 32, "cache_dir_vae": "cache/photos", "repeats": 2},
        {"id": "clips", "dataset_type": "video", "instance_data_dir": "clips", "caption_strategy": "instanceprompt",
         "instance_prompt": "a bar slides", "resolution": 32, "cache_dir_vae": "cache/clips", "video": {"num_frames": 5}},
    ]))
    plan = plan_data(load_datasets(config), eval_dataset_id=None, alignment=16)
    (photo,), (clip,) = (p.samples for p in plan.train)
    assert photo.source.caption == "a red bar" and photo.bucket.frames == 1 and photo.bucket.height > photo.bucket.width
    assert clip.source.caption == "a bar slides" and clip.source.cond_path is None and clip.bucket.frames == 5


def plan_clips_folder(root: Path):
    """The plan of one T2V dataset over `root/clips` (sidecar captions, 5 frames at 32 px)."""
    config = root / "multidatabackend.json"
    config.write_text(json.dumps([
        {"id": "clips", "dataset_type": "video", "instance_data_dir": "clips", "resolution": 32,
         "cache_dir_vae": "cache/clips", "video": {"num_frames": 5}},
    ]))
    return plan_data(load_datasets(config), eval_dataset_id=None, alignment=16)


def test_sidecar_caption_with_bom_and_crlf(tmp_path):
    write_video(tmp_path / "clips/Clip One.MP4", frames=12, fps=15, height=48, width=80)
    (tmp_path / "clips/Clip One.txt").write_bytes("\ufeffa  red car\r\ndrives\r\n".encode("utf-8"))
    plan = plan_clips_folder(tmp_path)
    (clip,) = plan.train[0].samples
    assert clip.source.caption == "a red car drives"


def test_sidecar_caption_with_an_upper_case_extension(tmp_path):
    write_video(tmp_path / "clips/DSC_0001.MOV", frames=12, fps=15, height=48, width=80)
    (tmp_path / "clips/DSC_0001.TXT").write_text("a dog [runs] on the beach")
    write_video(tmp_path / "clips/other.mp4", frames=12, fps=15, height=48, width=80)
    (tmp_path / "clips/other.txt.bak").write_text("not a caption")
    plan = plan_clips_folder(tmp_path)
    (clip,) = plan.train[0].samples
    assert clip.source.caption == "a dog [runs] on the beach"
    (problem,) = plan.train[0].problems
    assert problem.path.endswith("other.mp4") and "other.txt is missing" in problem.reason


def test_captions_longer_than_the_text_encoder_reads_are_named(tmp_path, encoders):
    long_caption = " ".join(["a red bar slides slowly to the left across a grey floor"] * 60)
    assert encoders[1].token_counts([long_caption])[0] > encoders[1].max_length
    add_pair(tmp_path, "clips", "starts", "long", caption=long_caption)
    add_pair(tmp_path, "clips", "starts", "short", caption="a red bar")
    add_pair(tmp_path, "val-clips", "val-starts", "v", caption="eval clip")
    index, _ = build(write_config(tmp_path), encoders)
    (warning,) = index.report.warnings
    assert warning.path.endswith("long.mp4") and not warning.skipped
    assert f"reads the first {encoders[1].max_length}" in warning.reason
    assert len(index.train) == 2  # still trained on (the first 512 tokens)


# --- start frames shared by clip datasets of other sizes ---------------------------------------------------
def write_shared_start_frames(root: Path, clip_sets: list[tuple[str, str, dict]], cache: dict[str, str] | None = None) -> Path:
    """Clip datasets (id, clips folder, keys) whose start frames all come from one conditioning dataset `cond`
    (`root/starts`, cached in `cache/cond`); each clip dataset caches in `cache/<id>` unless `cache` says."""
    cache = cache or {}
    datasets = [
        {"id": dataset_id, "dataset_type": "video", "is_i2v": True, "instance_data_dir": clips,
         "cache_dir_vae": cache.get(dataset_id, f"cache/{dataset_id}"), "cache_dir_text": "cache/text",
         "conditioning_data": ["cond"], "video": {"num_frames": 5}, **keys}
        for dataset_id, clips, keys in clip_sets
    ]
    datasets.append({"id": "cond", "dataset_type": "conditioning", "instance_data_dir": "starts", "caption_strategy": None,
                     "cache_dir_vae": cache.get("cond", "cache/cond")})
    path = root / "multidatabackend.json"
    path.write_text(json.dumps(datasets))
    return path


def build_shared(config: Path, encoders):
    vae = CountingVAE(encoders[0])
    index = build_caches(config, vae=vae, text_encoder=encoders[1], alignment=16, progress=False, decode_workers=1)
    return index, vae


def assert_start_frames_fit(index) -> None:
    """What the training step needs: every item's start-frame latent has its clip latents' size."""
    dataset = CachedVideoDataset(index.train, index.empty_text_path)
    for position, sample in enumerate(dataset.samples):
        item = dataset[position]
        assert item["cond_mean"].shape[2:] == item["latents_mean"].shape[2:], sample.sample_id


def test_datasets_of_two_sizes_sharing_start_frames_keep_one_entry_per_size(tmp_path, encoders):
    # Before: both wrote cache/cond/x.safetensors, the last size won; every `cache` rebuilt the start frames and
    # training stopped with "start-frame latents (1, 16, 1, 4, 4) do not match clip latents (1, 16, 2, 4, 8)".
    add_pair(tmp_path, "clips", "starts", "x")
    config = write_shared_start_frames(tmp_path, [("a", "clips", {"resolution": "32x32"}),
                                                  ("b", "clips", {"resolution": "32x64"})])
    assert cli_main(["check", "--data_backend_config", str(config), "--data-only"]) == 0
    index, vae = build_shared(config, encoders)
    assert index.report.built == {"clip": 2, "start_frame": 2, "text": 2}
    assert sorted(vae.calls) == [(1, 32, 32), (1, 32, 64), (5, 32, 32), (5, 32, 64)]
    by_size = {tmp_path / "cache/cond/32x32/x.safetensors": "32", tmp_path / "cache/cond/32x64/x.safetensors": "64"}
    for entry, width in by_size.items():
        assert read_fingerprint(entry)["width"] == width and read_fingerprint(entry)["kind"] == "start_frame"
    assert {Path(s.cond_path) for s in index.train} == set(by_size)
    assert_start_frames_fit(index)
    before = entry_times(tmp_path)

    index, vae = build_shared(config, encoders)  # the next run reuses both sizes
    assert vae.calls == [] and index.report.built == {"clip": 0, "start_frame": 0, "text": 0}
    assert index.report.reused == {"clip": 2, "start_frame": 2, "text": 2}
    assert entry_times(tmp_path) == before
    dataset = CachedVideoDataset.from_manifests([tmp_path / "cache/a/manifest.json", tmp_path / "cache/b/manifest.json"])
    assert {(s.bucket, Path(s.cond_path).parent.name) for s in dataset.samples} == {((5, 32, 32), "32x32"), ((5, 32, 64), "32x64")}

    # A start frame of another size (the collision's leftover) is named by the dataset, not by the training step.
    (tmp_path / "cache/cond/32x64/x.safetensors").write_bytes((tmp_path / "cache/cond/32x32/x.safetensors").read_bytes())
    wide = [s.sample_id for s in dataset.samples].index("b/x")
    with pytest.raises(DataError, match=r"sample 'b/x': cached start frame .*32x64/x.safetensors \(16, 1, 4, 4\) does "
                                        r"not match bucket 5x32x64; rerun `longcat-tuner cache`"):
        dataset[wide]
    index, vae = build_shared(config, encoders)  # and `cache` rebuilds it
    assert vae.calls == [(1, 32, 64)]


def test_clip_folders_with_the_same_names_and_one_start_frame_folder(tmp_path, encoders):
    # data/a/x.mp4 (wide), data/b/x.mp4 (tall) and data/c/x.mp4 (wide) all start from starts/x.png: the tall
    # bucket needs its own start-frame entry, the two wide ones share one (built once).
    write_image(tmp_path / "starts/x.png", height=48, width=80)
    for folder, (height, width) in (("a", (48, 80)), ("b", (80, 48)), ("c", (48, 80))):
        write_video(tmp_path / f"data/{folder}/x.mp4", frames=18, fps=30, height=height, width=width)
        (tmp_path / f"data/{folder}/x.txt").write_text(f"clip {folder}")
    config = write_shared_start_frames(tmp_path, [(name, f"data/{name}", {"resolution": 32}) for name in "abc"])
    assert cli_main(["check", "--data_backend_config", str(config), "--data-only"]) == 0
    index, vae = build_shared(config, encoders)
    assert {s.sample_id: s.bucket for s in index.train} == {"a/x": (5, 32, 64), "b/x": (5, 64, 32), "c/x": (5, 32, 64)}
    assert index.report.built == {"clip": 3, "start_frame": 2, "text": 4}
    assert sorted(call for call in vae.calls if call[0] == 1) == [(1, 32, 64), (1, 64, 32)]
    assert {s.sample_id: Path(s.cond_path).relative_to(tmp_path).as_posix() for s in index.train} == {
        "a/x": "cache/cond/32x64/x.safetensors", "b/x": "cache/cond/64x32/x.safetensors", "c/x": "cache/cond/32x64/x.safetensors"}
    assert_start_frames_fit(index)

    index, vae = build_shared(config, encoders)
    assert vae.calls == [] and index.report.reused == {"clip": 3, "start_frame": 3, "text": 4}


def test_start_frame_entries_are_named_by_size_and_crop(tmp_path):
    from longcat_tuner.data.cache_layout import cache_entry_conflicts, start_frame_entry_path

    add_pair(tmp_path, "clips", "starts", "x")
    config = write_shared_start_frames(tmp_path, [
        ("plain", "clips", {"resolution": "32x32"}), ("same", "clips", {"resolution": "32x32"}),
        ("stretched", "clips", {"resolution": "32x32", "crop": False}),
        ("random", "clips", {"resolution": "32x32", "crop_style": "random"}),
        ("odd id/2", "clips", {"resolution": "32x32", "crop_style": "random"}),
    ])
    datasets = load_datasets(config)
    plan = plan_data(datasets, eval_dataset_id=None, alignment=16)
    paths = {p.dataset.id: start_frame_entry_path(p.dataset, p.samples[0], datasets).relative_to(tmp_path / "cache/cond").as_posix()
             for p in plan.train}
    digest = hashlib.sha256(b"odd id/2").hexdigest()[:12]
    assert paths == {"plain": "32x32/x.safetensors", "same": "32x32/x.safetensors", "stretched": "32x32-stretch/x.safetensors",
                     "random": "32x32-random-random/x.safetensors", "odd id/2": f"32x32-random-+{digest}/x.safetensors"}
    assert cache_entry_conflicts(plan, datasets) == []  # "plain" and "same" share one entry of one content


def test_start_frames_cached_before_the_size_folders_are_moved_not_rebuilt(tmp_path, encoders):
    add_pair(tmp_path, "clips", "starts", "x")
    add_pair(tmp_path, "clips", "starts", "y", caption="another")
    config = write_shared_start_frames(tmp_path, [("a", "clips", {"resolution": "32x32"})])
    build_shared(config, encoders)
    cond = tmp_path / "cache/cond"
    # The old layout: x's entry as the earlier version wrote it; y's old entry holds another image (a stale one).
    (cond / "32x32/x.safetensors").replace(cond / "x.safetensors")
    (cond / "y.safetensors").write_bytes((cond / "x.safetensors").read_bytes())
    (cond / "32x32/y.safetensors").unlink()

    index, vae = build_shared(config, encoders)
    assert vae.calls == [(1, 32, 32)]  # y's start frame only: x's entry was its own, moved into 32x32/
    assert index.report.built["start_frame"] == 1 and index.report.reused["start_frame"] == 1
    assert not (cond / "x.safetensors").exists() and (cond / "32x32/x.safetensors").is_file()
    assert (cond / "y.safetensors").is_file()  # not this run's entry: left alone
    assert read_fingerprint(cond / "32x32/y.safetensors")["source"] == str((tmp_path / "starts/y.png").resolve())
    assert_start_frames_fit(index)


def test_a_cache_folder_inside_another_is_refused_before_any_encoder_loads(tmp_path, capsys):
    # Clip b/x of dataset "a" (cache/vae) and clip x of dataset "b" (cache/vae/b) are one file: cache/vae/b/x.safetensors.
    class Untouchable:  # any use (encode, identity, device) fails the test with an AttributeError
        pass

    add_pair(tmp_path, "data/a", "starts", "b/x")
    add_pair(tmp_path, "data/b", "starts", "x", caption="another clip")
    write_video(tmp_path / "data/b/x.mp4", frames=18, fps=30, height=80, width=48)  # another size, too
    config = write_shared_start_frames(tmp_path, [("a", "data/a", {"resolution": 32}), ("b", "data/b", {"resolution": 32})],
                                       cache={"a": "cache/vae", "b": "cache/vae/b"})
    assert cli_main(["check", "--data_backend_config", str(config), "--data-only"]) == 1
    error = capsys.readouterr().err
    assert f"cache entry {(tmp_path / 'cache/vae/b/x.safetensors').resolve()} would hold both the clip" in error
    assert "of dataset 'a' (5x32x64)" in error and "of dataset 'b' (5x64x32)" in error
    assert "cache_dir_vae of dataset 'b'" in error and "lies inside that of dataset 'a'" in error
    assert f"not inside another's, in {config}" in error
    with pytest.raises(DataError, match=r"would hold both .* lies inside that of dataset 'a'"):
        build_caches(config, vae=Untouchable(), text_encoder=Untouchable(), alignment=16, progress=False)
    assert not list(tmp_path.rglob("*.safetensors"))
