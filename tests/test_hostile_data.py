"""Hostile data a user may hand the product: each case gets a message naming the file and the fix (no
traceback), a skipped sample instead of a stopped run, and nothing of the user's overwritten.

Cases found by an audit of `check`, `cache` and `train` on messy folders (the others already behaved):
timestamps rounded by coarse container time bases, file names in other Unicode forms or encodings,
multidatabackend.json in another encoding, caches in the media folder or in a folder that cannot be created,
cache entries whose header matches but whose tensors do not.
"""
from __future__ import annotations

import json
import os
import unicodedata
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from longcat_tuner.cli import main as cli_main
from longcat_tuner.config.datasets import load_datasets
from longcat_tuner.data.backends import plan_data
from longcat_tuner.data.synthetic import write_image, write_video
from longcat_tuner.data.video import VideoInfo, available_frames, probe_video, select_frame_indices

REPO = Path(__file__).resolve().parents[1]
TINY = REPO.parent / "shared" / "reference" / "longcat-tiny"


def write_backend(root: Path, *, num_frames: int = 5, **clip_keys) -> Path:
    datasets = [
        {"id": "train", "dataset_type": "video", "is_i2v": True, "instance_data_dir": "clips", "resolution": "32x32",
         "cache_dir_vae": "cache/clips", "conditioning_data": ["train-cond"], "video": {"num_frames": num_frames},
         **clip_keys},
        {"id": "train-cond", "dataset_type": "conditioning", "instance_data_dir": "starts", "caption_strategy": None,
         "resolution": "32x32", "cache_dir_vae": "cache/starts"},
    ]
    path = root / "multidatabackend.json"
    path.write_text(json.dumps(datasets))
    return path


def add_pair(root: Path, key: str, *, frames: int = 6) -> None:
    write_video(root / "clips" / f"{key}.mp4", frames=frames, fps=15, height=32, width=32)
    write_image(root / "starts" / f"{key}.png", height=32, width=32)
    (root / "clips" / f"{key}.txt").write_text("a grey clip")


def check(capsys, backend: Path, *extra: str) -> tuple[int, str, str]:
    code = cli_main(["check", "--data_backend_config", str(backend), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_mkv(path: Path, *, frames: int, fps: int = 15, height: int = 53, width: int = 97) -> Path:
    """A lossless Matroska clip (1 ms time base) of any size, odd ones included (H.264 needs even sizes)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 8 * k % 256, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


# --- frame timestamps ------------------------------------------------------------------------------
def test_a_clip_in_a_millisecond_time_base_keeps_its_last_frame(tmp_path):
    # 9 frames at 15 fps: the last is due at 533.33 ms, Matroska stores 533 ms. It was counted as 8 frames,
    # so every .mkv / .webm clip of exactly num_frames frames was skipped as too short.
    info = probe_video(write_mkv(tmp_path / "odd.mkv", frames=9))
    assert (info.width, info.height) == (97, 53) and info.time_base == pytest.approx(0.001)
    assert available_frames(info.frame_times, 15, slack=info.time_slack) == 9
    assert select_frame_indices(info.frame_times, 15, 9, slack=info.time_slack) == list(range(9))
    assert available_frames(info.frame_times, 15) == 8  # without the slack: the old count


def test_a_30fps_mkv_clip_gives_every_second_frame_not_an_uneven_pick(tmp_path):
    # Frame 2 of 30 fps is due at 66.67 ms and stored at 67 ms: without the slack t = 1/15 picked frame 1, so
    # a 30 fps .mkv / .webm source trained on frames 0, 1, 4, 6, 7, 10, ... (jerky motion).
    info = probe_video(write_mkv(tmp_path / "thirty.mkv", frames=30, fps=30, height=16, width=16))
    assert select_frame_indices(info.frame_times, 15, 9, slack=info.time_slack) == list(range(0, 18, 2))
    assert select_frame_indices(info.frame_times, 15, 9) != list(range(0, 18, 2))  # the old pick


def test_the_slack_is_one_tick_capped_so_a_coarse_time_base_picks_no_later_frame(tmp_path):
    # A 24 fps .avi has time base 1/24: its timestamps are exact. Frame 2 (83.3 ms) must not stand in for
    # t = 66.7 ms at 15 fps: the slack is capped at 2 ms.
    info = VideoInfo(tmp_path / "x.avi", 32, 32, 0, tuple(range(30)), 1 / 24)
    assert info.time_slack == pytest.approx(0.002)
    assert select_frame_indices(info.frame_times, 15, 3, slack=info.time_slack) == [0, 1, 3]


def test_an_odd_sized_mkv_clip_of_exactly_num_frames_is_usable_in_check(tmp_path, capsys):
    write_mkv(tmp_path / "clips" / "odd.mkv", frames=9)
    write_image(tmp_path / "starts" / "odd.png", height=53, width=97)
    (tmp_path / "clips" / "odd.txt").write_text("odd size")
    code, out, _ = check(capsys, write_backend(tmp_path, num_frames=9))
    assert code == 0 and "1 usable of 1 files, 0 skipped" in out and "bucket 9x32x32" in out


def test_a_still_image_named_like_a_video_is_called_a_still_image(tmp_path, capsys):
    add_pair(tmp_path, "a")
    write_image(tmp_path / "clips" / "photo.png", height=32, width=32)
    (tmp_path / "clips" / "photo.png").rename(tmp_path / "clips" / "photo.mp4")  # FFmpeg opens it as 1 frame
    write_image(tmp_path / "starts" / "photo.png", height=32, width=32)
    (tmp_path / "clips" / "photo.txt").write_text("a photo")
    code, out, _ = check(capsys, write_backend(tmp_path))
    assert code == 0 and "photo.mp4: a single frame (a still image, not a video), 5 frames needed" in out


def test_a_raw_h264_stream_is_named_as_one_not_as_an_empty_file(tmp_path):
    import av

    from longcat_tuner.errors import DataError

    path = tmp_path / "camera.mp4"
    with av.open(str(path), "w", format="h264") as container:  # an elementary stream: no container, no timestamps
        stream = container.add_stream("libx264", rate=15)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for k in range(6):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * k, np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(DataError, match="carry no timestamps.*raw H.264.*ffmpeg -framerate 30"):
        probe_video(path)


def test_a_clip_whose_header_names_no_codec_is_skipped_by_name(tmp_path, capsys):
    """Before: an mp4 with a damaged `minf` box (a video stream without a codec) was an AttributeError traceback
    in `check`, `cache` and `train`, for one bad clip among good ones."""
    add_pair(tmp_path, "good")
    add_pair(tmp_path, "bad")
    clip = tmp_path / "clips" / "bad.mp4"
    clip.write_bytes(clip.read_bytes().replace(b"minf", b"mixf"))
    code, out, _ = check(capsys, write_backend(tmp_path))
    assert code == 0 and "1 usable" in out and f"{clip}: the video stream names no codec" in out


def test_a_clip_of_absurd_aspect_is_refused_in_check_not_failed_in_the_scaler(tmp_path, capsys):
    # A 4000x2 strip would be scaled to 640000 pixels wide to cover a 480p bucket: the scaler refused it
    # ("Invalid argument") only in the cache stage. A 16:1 panorama still trains.
    write_mkv(tmp_path / "clips" / "strip.mkv", frames=6, height=2, width=4000)
    write_image(tmp_path / "starts" / "strip.png", height=2, width=4000)
    write_mkv(tmp_path / "clips" / "pano.mkv", frames=6, height=16, width=256)
    write_image(tmp_path / "starts" / "pano.png", height=16, width=256)
    for key in ("strip", "pano"):
        (tmp_path / "clips" / f"{key}.txt").write_text("wide")
    code, out, _ = check(capsys, write_backend(tmp_path, resolution=480))
    assert code == 0 and "1 usable of 2 files, 1 skipped" in out
    assert "strip.mkv: 4000 wide and 2 high, too far from any bucket's aspect" in out and "keep 0.2% of the picture" in out


# --- file names ------------------------------------------------------------------------------------
@pytest.mark.parametrize("caption_form", ["NFD", "NFC"])
def test_a_decomposed_unicode_name_pairs_with_its_composed_start_frame_and_caption(tmp_path, capsys, caption_form):
    # macOS writes "café" as "cafe" + combining accent; the same name typed on Linux or Windows is composed. The
    # start frame paired in either form; a caption in the other form than its clip was reported missing.
    decomposed, composed = unicodedata.normalize("NFD", "café"), unicodedata.normalize("NFC", "café")
    write_video(tmp_path / "clips" / f"{decomposed}.mp4", frames=6, fps=15, height=32, width=32)
    (tmp_path / "clips" / f"{unicodedata.normalize(caption_form, 'café')}.txt").write_text("a cup")
    write_image(tmp_path / "starts" / f"{composed}.png", height=32, width=32)
    plan = plan_data(load_datasets(write_backend(tmp_path)), eval_dataset_id=None, alignment=16)
    assert [s.source.key for s in plan.train_samples] == [composed]
    assert not plan.train[0].problems, [str(p) for p in plan.train[0].problems]
    assert [s.source.caption for s in plan.train_samples] == ["a cup"] and not plan.conditioning_problems


def test_a_name_too_long_for_its_cache_entry_is_skipped_by_name_in_check(tmp_path, capsys):
    # 245 bytes + ".mp4" is a valid name; "<name>.safetensors.tmp<pid>" is not (255 bytes at most): the cache
    # stage stopped with an OSError traceback ("File name too long").
    add_pair(tmp_path, "a")
    add_pair(tmp_path, "x" * 245)
    code, out, _ = check(capsys, write_backend(tmp_path))
    assert code == 0 and "1 usable of 2 files, 1 skipped" in out
    assert "file name is 245 bytes long without its extension" in out and "at most 232 bytes" in out
    assert "orphan" not in out  # its start frame is paired, not reported a second time


@pytest.mark.skipif(os.uname().sysname == "Darwin", reason="macOS refuses file names that are not UTF-8")
def test_a_file_name_that_is_not_utf8_is_skipped_by_name_and_the_rest_trains(tmp_path, capsys):
    add_pair(tmp_path, "good")
    add_pair(tmp_path, "plain")
    clips, starts = os.fsencode(tmp_path / "clips"), os.fsencode(tmp_path / "starts")
    os.rename(clips + b"/plain.mp4", clips + b"/bad\xff.mp4")  # a Latin-1 name from an old archive
    os.rename(clips + b"/plain.txt", clips + b"/bad\xff.txt")
    os.rename(starts + b"/plain.png", starts + b"/bad\xff.png")
    code, out, _ = check(capsys, write_backend(tmp_path))
    assert code == 0 and "1 usable" in out
    assert "bad\ufffd.mp4: file name is not valid UTF-8" in out and "rename the file" in out
    # The cache stage (what crashed with a UnicodeEncodeError in the safetensors header) never sees it.
    plan = plan_data(load_datasets(tmp_path / "multidatabackend.json"), eval_dataset_id=None, alignment=16)
    assert [s.source.key for s in plan.train_samples] == ["good"]
    # Every report line can be encoded, also a broken link whose name and target are not UTF-8.
    os.symlink(b"/nowhere\xfe", clips + b"/gone\xff.mp4")
    plan = plan_data(load_datasets(tmp_path / "multidatabackend.json"), eval_dataset_id=None, alignment=16)
    problems = [str(p) for p in plan.train[0].problems]
    assert any("gone\ufffd.mp4: broken symbolic link to /nowhere\ufffd" in p for p in problems)
    for problem in problems:
        problem.encode("utf-8")


def test_a_file_name_with_a_newline_or_terminal_escape_cannot_forge_report_lines(tmp_path, capsys):
    """Before: `check` printed such names raw: a clip named "x\nok: 999 training items..." added a forged line
    to the report, and ESC sequences recoloured or retitled the user's terminal."""
    add_pair(tmp_path, "good")
    for name in ("evil\nok: 999 training items, 0 eval items\n", "ctl\x1b]0;pwned\x07"):
        add_pair(tmp_path, name)
    code, out, _ = check(capsys, write_backend(tmp_path))
    assert code == 0 and "1 usable" in out and "\x1b" not in out and "\nok: 999" not in out
    assert "evil\\nok: 999 training items, 0 eval items\\n.mp4: file name holds control characters" in out
    assert "ctl\\x1b]0;pwned\\x07.mp4: file name holds control characters" in out


# --- captions --------------------------------------------------------------------------------------
def test_a_caption_that_is_a_broken_link_or_a_folder_is_not_called_missing(tmp_path, capsys):
    """Before: both were "caption file x.txt is missing; add it", next to the file the user can see."""
    for key in ("good", "gone", "folder"):
        add_pair(tmp_path, key)
    (tmp_path / "clips" / "gone.txt").unlink()
    (tmp_path / "clips" / "gone.txt").symlink_to(tmp_path / "elsewhere.txt")
    (tmp_path / "clips" / "folder.txt").unlink()
    (tmp_path / "clips" / "folder.txt").mkdir()
    code, out, _ = check(capsys, write_backend(tmp_path))
    assert code == 0 and "1 usable" in out
    assert f"caption file gone.txt is a broken symbolic link to {tmp_path / 'elsewhere.txt'}; fix or remove it" in out
    assert "caption file folder.txt is a folder; replace it with the caption text file" in out


def test_captions_in_utf16_are_read_and_latin1_is_named_with_the_byte(tmp_path, capsys):
    add_pair(tmp_path, "notepad")
    (tmp_path / "clips" / "notepad.txt").write_bytes("a caf\u00e9 at dusk".encode("utf-16"))  # BOM + UTF-16 LE
    add_pair(tmp_path, "latin")
    (tmp_path / "clips" / "latin.txt").write_bytes("a caf\u00e9 at dawn".encode("latin-1"))
    plan = plan_data(load_datasets(write_backend(tmp_path)), eval_dataset_id=None, alignment=16)
    assert [(s.source.key, s.source.caption) for s in plan.train_samples] == [("notepad", "a caf\u00e9 at dusk")]
    [problem] = plan.train[0].problems
    assert problem.path.endswith("latin.mp4")
    assert "latin.txt is not UTF-8 text (byte 0xe9 at offset 5, e.g. Latin-1" in problem.reason and "save it as UTF-8" in problem.reason


# --- multidatabackend.json ----------------------------------------------------------------------------
def test_a_backend_file_in_latin1_is_named_without_a_traceback(tmp_path, capsys):
    backend = write_backend(tmp_path, caption_strategy="instanceprompt", instance_prompt="café")
    backend.write_bytes(backend.read_text().replace("\\u00e9", "é").encode("latin-1"))
    code, _, err = check(capsys, backend)
    assert code == 2 and str(backend) in err and "not UTF-8 text (byte 0xe9" in err and "save the file as UTF-8" in err


def test_a_backend_file_with_a_byte_order_mark_is_read(tmp_path, capsys):
    add_pair(tmp_path, "a")
    backend = write_backend(tmp_path)
    backend.write_bytes(b"\xef\xbb\xbf" + backend.read_bytes())  # Windows Notepad's UTF-8
    code, out, _ = check(capsys, backend)
    assert code == 0 and "1 usable of 1 files" in out


@pytest.mark.parametrize("change, said, not_said", [
    # A rule across keys: its own words, not a dump of the whole entry.
    ({"conditioning_data": []}, "'train' (entry 0): is_i2v is true but conditioning_data is empty", "'instance_data_dir'"),
    # `resolution` is a number or a string: one line, not pydantic's one per member type.
    ({"resolution": 480.5}, "key 'resolution': should be a whole number (480) or a string", "resolution.int"),
])
def test_dataset_errors_read_as_one_sentence_per_key(tmp_path, capsys, change, said, not_said):
    code, _, err = check(capsys, write_backend(tmp_path, **change))
    assert code == 2 and said in err and not_said not in err


def test_every_bad_dataset_entry_is_named_at_once(tmp_path, capsys):
    """Before: only the first bad entry was named; fixing it revealed the next one, one `check` at a time."""
    backend = write_backend(tmp_path, repeats=-1)
    datasets = json.loads(backend.read_text())
    datasets[1]["crop_stlye"] = "center"
    backend.write_text(json.dumps(datasets + ["not an object"]))
    code, _, err = check(capsys, backend)
    assert code == 2
    for said in ("dataset 'train' (entry 0): key 'repeats'", "dataset 'train-cond' (entry 1): unknown key 'crop_stlye'",
                 "entry 2 is a str, expected an object"):
        assert said in err


def test_a_backend_file_nested_absurdly_deep_is_named_without_a_traceback(tmp_path, capsys):
    backend = tmp_path / "multidatabackend.json"
    backend.write_text("[" * 200_000 + "]" * 200_000)
    code, _, err = check(capsys, backend)
    assert code == 2 and str(backend) in err and "nested too deeply" in err


def test_a_backend_path_that_is_a_folder_says_so(tmp_path, capsys):
    (tmp_path / "multidatabackend.json").mkdir()
    code, _, err = check(capsys, tmp_path / "multidatabackend.json")
    assert code == 2 and "is a folder; point data_backend_config at the multidatabackend.json file" in err


@pytest.mark.parametrize("key", ["cache_dir_vae", "cache_dir_text"])
def test_a_cache_folder_that_is_a_media_folder_is_refused(tmp_path, capsys, key):
    # The cache would write <clip>.safetensors and manifest.json among the user's clips (overwriting theirs).
    add_pair(tmp_path, "a")
    (tmp_path / "clips" / "manifest.json").write_text('{"mine": true}')
    code, _, err = check(capsys, write_backend(tmp_path, **{key: "clips"}))
    assert code == 2 and f"dataset 'train' key '{key}'" in err and "media folder (instance_data_dir) of dataset 'train'" in err
    assert json.loads((tmp_path / "clips" / "manifest.json").read_text()) == {"mine": True}


@pytest.mark.parametrize("key", ["instance_data_dir", "cache_dir_vae"])
def test_a_blank_dataset_folder_is_refused_not_the_backend_files_folder(tmp_path, capsys, key):
    """Before: "" (or spaces) became the folder of multidatabackend.json: the cache was written among the config
    files, or the config folder was scanned for clips."""
    add_pair(tmp_path, "a")
    code, _, err = check(capsys, write_backend(tmp_path, **{key: " "}))
    assert code == 2 and f"dataset 'train' (entry 0): key '{key}': empty; give a folder path" in err


def test_a_blank_text_cache_folder_is_the_default_one(tmp_path):
    """The web UI says an empty cache_dir_text defaults to <cache_dir_vae>/../text; the trainer took it for the
    folder of multidatabackend.json."""
    datasets = load_datasets(write_backend(tmp_path, cache_dir_text=""))
    assert datasets.by_id("train").text_cache_dir == tmp_path / "cache" / "text"


@pytest.mark.parametrize("key", ["instance_data_dir", "cache_dir_vae", "cache_dir_text"])
def test_a_dataset_folder_that_is_a_symlink_loop_is_named(tmp_path, capsys, key):
    """Before: RuntimeError('Symlink loop from ...') traceback from `check`, `cache` and `train`."""
    add_pair(tmp_path, "a")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    code, _, err = check(capsys, write_backend(tmp_path, **{key: "loop"}))
    assert code == 2 and f"dataset 'train' key '{key}' {tmp_path / 'loop'} cannot be used: it is a symbolic link loop" in err


def test_an_output_dir_that_is_a_symlink_loop_is_named_by_check_and_train(tmp_path, capsys):
    from longcat_tuner.errors import ConfigError
    from longcat_tuner.train import run_lock

    add_pair(tmp_path, "a")
    os.symlink(tmp_path / "run", tmp_path / "run")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"pretrained_model_name_or_path": str(TINY), "output_dir": str(tmp_path / "run"),
                                  "data_backend_config": str(write_backend(tmp_path)), "eval_dataset_id": None,
                                  "validation_using_datasets": False}))
    assert cli_main(["check", "--config", str(config), "--data-only"]) == 1
    assert f"output_dir {tmp_path / 'run'} cannot be used: it is a symbolic link loop" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="symbolic link loop"):  # train's first step (it was a RuntimeError)
        run_lock.acquire(tmp_path / "run")


def test_an_output_dir_inside_a_media_folder_is_refused_by_check_and_train(tmp_path, capsys):
    """Before: output_dir under instance_data_dir was accepted, and the run's validation videos were scanned as the
    dataset's clips by the next run (trained on with caption_strategy filename)."""
    from longcat_tuner.config.training import TrainConfig
    from longcat_tuner.errors import ConfigError
    from longcat_tuner.train.feed import prepare_data

    add_pair(tmp_path, "a")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"pretrained_model_name_or_path": str(TINY), "output_dir": "clips/run",
                                  "data_backend_config": str(write_backend(tmp_path)), "eval_dataset_id": None,
                                  "validation_using_datasets": False}))
    assert cli_main(["check", "--config", str(config), "--data-only"]) == 1
    said = f"output_dir {tmp_path / 'clips' / 'run'} is inside the media folder (instance_data_dir) {tmp_path / 'clips'}"
    assert said in capsys.readouterr().err
    with pytest.raises(ConfigError, match="is inside the media folder"):  # before the caches are built
        prepare_data(TrainConfig.from_file(config), device="cpu")
    assert not (tmp_path / "cache").exists()


def test_check_names_a_cache_folder_that_cannot_be_created(tmp_path, capsys):
    add_pair(tmp_path, "a")
    (tmp_path / "taken").write_text("a file where the cache folder belongs")
    code, out, err = check(capsys, write_backend(tmp_path, cache_dir_vae="taken/vae"), "--json")
    summary = json.loads(out)
    assert code == 1 and not summary["ok"]
    assert any("dataset 'train' cache_dir_vae" in line and "taken is a file, not a folder" in line
               and "multidatabackend.json" in line for line in summary["blocking"])


# --- caches ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoders():
    if not TINY.is_dir():
        pytest.skip(f"tiny checkpoint {TINY} missing (needs ../shared next to the repo)")
    from longcat_tuner.encoders import TextEncoder, VideoVAE

    return VideoVAE.from_pretrained(TINY), TextEncoder.from_pretrained(TINY)


def _cache_builder(tmp_path, encoders):
    """One clip pair under tmp_path and `build_caches` bound to its backend (run once here)."""
    from longcat_tuner.data.cache import build_caches

    add_pair(tmp_path, "a")
    build = partial(build_caches, write_backend(tmp_path), vae=encoders[0], text_encoder=encoders[1], alignment=16,
                    progress=False, decode_workers=1)
    build()
    return build


def test_an_entry_whose_header_matches_but_whose_tensors_do_not_is_rebuilt(tmp_path, encoders):
    # Before: reused (the fingerprint matched), then training stopped when a batch reached it, telling the
    # user to rerun `cache`, which reused it again.
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from longcat_tuner.data.dataset import CachedVideoDataset

    build = _cache_builder(tmp_path, encoders)
    entry = tmp_path / "cache/clips/a.safetensors"
    with safe_open(str(entry), framework="pt") as handle:
        header = handle.metadata()
    save_file({"mean": torch.zeros(16, 1, 2, 2), "std": torch.ones(16, 1, 2, 2)}, str(entry), metadata=header)
    index = build()
    assert index.report.built["clip"] == 1 and index.report.reused["start_frame"] == 1
    item = CachedVideoDataset(index.train, index.empty_text_path)[0]
    assert tuple(item["latents_mean"].shape[1:]) == (2, 4, 4)


def test_a_cache_folder_blocked_by_a_file_stops_before_any_encoder_runs(tmp_path):
    # Before: the text encoder was loaded and run, then the first VAE entry failed with "free space on that disk".
    from longcat_tuner.data.cache import CacheWriteError, build_caches

    class Untouchable:  # any use (encode, identity, device) fails the test with an AttributeError
        pass

    add_pair(tmp_path, "a")
    (tmp_path / "taken").write_text("x")
    backend = write_backend(tmp_path, cache_dir_vae="taken/vae")
    with pytest.raises(CacheWriteError) as caught:
        build_caches(backend, vae=Untouchable(), text_encoder=Untouchable(), alignment=16, progress=False)
    message = str(caught.value)
    assert "dataset 'train' cache_dir_vae" in message and "taken is a file, not a folder" in message
    assert "multidatabackend.json" in message and "free space" not in message
    assert (tmp_path / "taken").read_text() == "x"


def test_a_write_blocked_by_a_file_names_it_and_not_the_disk(tmp_path):
    from longcat_tuner.fsutil import write_failure

    (tmp_path / "taken").write_text("x")
    try:
        (tmp_path / "taken" / "vae").mkdir(parents=True)
    except OSError as err:
        message = write_failure(err, tmp_path / "taken" / "vae")
    assert message.startswith("a file is in the way") and "must be a folder" in message


def test_files_of_the_user_in_a_cache_folder_are_never_overwritten(tmp_path, encoders):
    import torch
    from safetensors.torch import load_file, save_file

    from longcat_tuner.data.cache import CacheWriteError

    build = _cache_builder(tmp_path, encoders)
    manifest = tmp_path / "cache/clips/manifest.json"
    ours = manifest.read_text()
    manifest.write_text('{"my": "list of shots"}')  # a file of the user's with the manifest's name
    with pytest.raises(CacheWriteError, match="not a cache manifest.*not overwritten"):
        build()
    assert manifest.read_text() == '{"my": "list of shots"}'
    manifest.write_text(ours[: len(ours) // 2])  # damaged: kept aside, the build goes on
    build()
    [kept] = manifest.parent.glob("manifest.json.damaged-*")
    assert kept.read_text() == ours[: len(ours) // 2] and json.loads(manifest.read_text())["dataset_id"] == "train"

    entry = tmp_path / "cache/clips/a.safetensors"  # a LoRA of the user's with a clip's name
    save_file({"lora_down": torch.ones(2)}, str(entry), metadata={"ss_network_module": "networks.lora"})
    with pytest.raises(CacheWriteError, match="not a cache entry.*not overwritten"):
        build()
    assert torch.equal(load_file(str(entry))["lora_down"], torch.ones(2))
    entry.write_bytes(entry.read_bytes()[:20])  # a damaged file is a stale entry: rebuilt
    assert build().report.built["clip"] == 1


def test_pipes_links_to_devices_and_near_miss_start_frames_are_named_for_what_they_are(tmp_path, capsys):
    """A pipe or a link to /dev/zero named like a clip was reported as a broken link or left out silently, a
    pipe caption as missing, a start frame in .tiff or another letter case as just "no start frame", and the
    start frames of clips the scan skipped as orphans "with no clip"."""
    add_pair(tmp_path, "good")
    clips, starts = tmp_path / "clips", tmp_path / "starts"
    os.mkfifo(clips / "pipe.mp4")
    write_image(starts / "pipe.png", height=32, width=32)
    os.symlink("/dev/zero", clips / "zero.mp4")
    write_image(starts / "zero.png", height=32, width=32)
    add_pair(tmp_path, "pipecap")
    (clips / "pipecap.txt").unlink()
    os.mkfifo(clips / "pipecap.txt")
    add_pair(tmp_path, "tiffed")
    (starts / "tiffed.png").rename(starts / "tiffed.tiff")
    add_pair(tmp_path, "Cased")
    (starts / "Cased.png").rename(starts / "cased.png")
    code, out, _ = check(capsys, write_backend(tmp_path))
    assert code == 0 and "1 usable" in out
    assert f"{clips / 'pipe.mp4'}: not a regular file (a pipe, socket or device)" in out
    assert f"{clips / 'zero.mp4'}: symbolic link to /dev/zero, not a regular file" in out
    assert "caption file pipecap.txt is not a regular file" in out
    assert "tiffed.tiff is there, but .tiff is not a start-frame format: convert it to .png or .jpg" in out
    assert "cased.png differs only in letter case: rename it to Cased.png" in out
    assert f"{starts / 'pipe.png'}: start frame unused: its clip {clips / 'pipe.mp4'} is skipped" in out
    assert f"{starts / 'zero.png'}: start frame unused: its clip {clips / 'zero.mp4'} is skipped" in out
    assert "orphan start frame: no clip 'pipe.*'" not in out


def test_a_right_to_left_override_in_a_name_is_shown_escaped():
    """U+202E printed raw makes the terminal show the rest of a name reversed: a false name in the report."""
    from longcat_tuner.data.backends import Problem

    problem = Problem("train", "clips/clip\u202egnp.mp4", "caption file clip\u202egnp.txt is missing")
    assert problem.path == "clips/clip\\u202egnp.mp4" and "clip\\u202egnp.txt" in problem.reason
    assert Problem("train", "clips/café\u0301.mp4", "ok").path == "clips/café\u0301.mp4"  # letters stay as they are


def test_names_that_differ_only_in_unicode_form_are_told_apart_in_the_report(tmp_path, capsys):
    """Two files `café.mp4` (composed, decomposed) in one folder were reported as "same name as café.mp4": two
    names that look identical, with no hint why."""
    decomposed, composed = unicodedata.normalize("NFD", "café"), unicodedata.normalize("NFC", "café")
    add_pair(tmp_path, composed)
    write_video(tmp_path / "clips" / f"{decomposed}.mp4", frames=6, fps=15, height=32, width=32)
    code, out, _ = check(capsys, write_backend(tmp_path))
    assert code == 0 and "1 usable" in out
    assert "the two names differ only in Unicode form" in out
