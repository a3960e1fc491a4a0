"""Video and image ingestion: timestamp resampling, decode + resize + crop, buckets, EXIF and rotation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from longcat_tuner.data.buckets import bucket_candidates, bucket_size, native_size
from longcat_tuner.data.images import load_image, probe_image
from longcat_tuner.data.synthetic import frame_level, write_image, write_video
from longcat_tuner.data.video import (
    available_frames,
    clip_frame_count,
    decode_frames,
    plan_resize,
    probe_video,
    select_frame_indices,
)
from longcat_tuner.errors import DataError

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


def asset(name: str) -> Path:
    path = ASSETS / name
    if not path.is_file():
        pytest.skip(f"{path} is missing (the real-media tests need ../shared/assets next to the repo)")
    return path


def test_4k_30fps_clip_is_resampled_to_15fps_by_timestamp():
    path = asset("motorcycle.mp4")
    info = probe_video(path)
    assert (info.width, info.height, len(info.frame_pts)) == (3840, 2160, 120)
    assert info.source_fps == pytest.approx(30.0)
    # 4 s at 15 fps: 60 frames fit; output frame i is source frame 2i.
    assert available_frames(info.frame_times, 15.0) == 60
    assert select_frame_indices(info.frame_times, 15.0, 57) == list(range(0, 114, 2))
    with pytest.raises(DataError, match="clip has 60 frames at 15 fps but 93 are needed"):
        select_frame_indices(info.frame_times, 15.0, 93)
    # Decode 3 output frames to a small bucket and compare with a plain sequential decode of frames 0..4.
    plan = plan_resize(info.height, info.width, 64, 96)
    assert (plan.scaled_height, plan.scaled_width, plan.top, plan.left) == (64, 113, 0, 8)  # 3840*64//2160, official center
    frames = decode_frames(path, info, [0, 2, 4], plan)
    assert frames.shape == (3, 64, 96, 3) and frames.dtype == np.uint8
    import av

    with av.open(str(path)) as container:
        sequential = []
        for k, frame in enumerate(container.decode(video=0)):
            rgb = frame.reformat(width=113, height=64, format="rgb24", interpolation="AREA").to_ndarray()
            sequential.append(rgb[:, 8:104])
            if k == 4:
                break
    for out, source in zip(frames, [0, 2, 4]):
        np.testing.assert_array_equal(out, sequential[source])
    assert not np.array_equal(frames[0], frames[2])  # the clip moves: frames really differ


def test_decoded_frames_are_the_selected_source_frames(tmp_path):
    path = write_video(tmp_path / "c.mp4", frames=30, fps=30, height=48, width=64)
    info = probe_video(path)
    indices = select_frame_indices(info.frame_times, 15.0, 9)
    assert indices == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    frames = decode_frames(path, info, indices, plan_resize(48, 64, 32, 48))
    levels = frames[:, 24, 24, 1].astype(int)
    np.testing.assert_allclose(levels, [frame_level(k, 30) for k in indices], atol=3)


def test_variable_frame_rate_picks_the_frame_on_screen(tmp_path):
    times = [0.0, 0.03, 0.05, 0.1, 0.2, 0.21, 0.3, 0.4]
    path = write_video(tmp_path / "vfr.mp4", frames=8, fps=30, height=32, width=48, timestamps=times)
    info = probe_video(path)
    np.testing.assert_allclose(info.frame_times, times, atol=1e-6)
    indices = select_frame_indices(info.frame_times, 10.0, 5)  # t = 0, .1, .2, .3, .4
    assert indices == [0, 3, 4, 6, 7]
    frames = decode_frames(path, info, indices, plan_resize(32, 48, 32, 48))
    np.testing.assert_allclose(frames[:, 20, 30, 1].astype(int), [frame_level(k, 8) for k in indices], atol=3)
    # Slower source than target: a frame is repeated rather than invented.
    assert select_frame_indices([0.0, 0.5, 1.0], 4.0, 5) == [0, 0, 1, 1, 2]


def test_display_rotation_is_applied(tmp_path):
    path = write_video(tmp_path / "phone.mp4", frames=3, fps=30, height=32, width=64, rotation=90)
    info = probe_video(path)
    assert (info.height, info.width, info.rotation) == (64, 32, 90)
    frame = decode_frames(path, info, [0], plan_resize(64, 32, 64, 32))[0]
    # The red top-left marker of the stored frame is bottom-left after a 90 degree counterclockwise turn.
    assert frame[-2, 1, 0] > 200 and frame[-2, 1, 1] < 60 and frame[1, 1, 0] < 60


@pytest.mark.parametrize(
    "src, resolution, alignment, expected",
    [
        ((1080, 1920), 480, 64, (480, 832)),
        ((2160, 3840), 480, 64, (480, 832)),
        ((1920, 1080), 480, 64, (832, 480)),
        ((2048, 2048), 480, 64, (608, 640)),  # the official 480p square bucket
        ((768, 1024), 480, 64, (544, 704)),
        ((1080, 1920), 720, 64, (720, 1280)),
        ((1080, 1920), 704, 64, (704, 1280)),  # 64-aligned: block-sparse friendly
        ((2048, 2048), 480, 16, (624, 640)),
        ((1080, 1920), (512, 512), 64, (512, 512)),  # fixed HEIGHTxWIDTH
    ],
)
def test_bucket_assignment(src, resolution, alignment, expected):
    assert bucket_size(resolution, *src, alignment) == expected


def test_bucket_grid_properties():
    assert native_size(480) == (480, 832) and native_size(720) == (720, 1280)
    for resolution, alignment in ((480, 64), (720, 64), (704, 64), (480, 32)):
        for height, width in bucket_candidates(resolution, alignment):
            assert height % 16 == 0 and width % 16 == 0
            assert abs(height * width / (native_size(resolution)[0] * native_size(resolution)[1]) - 1) < 0.2
    for height, width in bucket_candidates(704, 64):
        assert height % 64 == 0 and width % 64 == 0


def test_crop_plans():
    center = plan_resize(1080, 1920, 480, 832)
    assert (center.scaled_height, center.scaled_width, center.top, center.left) == (480, 853, 0, 10)  # floor, 853//2 - 416
    corner = plan_resize(1080, 1920, 480, 832, crop_fraction=(0.0, 1.0))
    assert (corner.top, corner.left) == (0, 21)
    tall = plan_resize(2048, 2048, 480, 832)
    assert (tall.scaled_height, tall.scaled_width, tall.top, tall.left) == (832, 832, 176, 0)
    stretch = plan_resize(1080, 1920, 608, 640, crop=False)
    assert (stretch.scaled_height, stretch.scaled_width, stretch.top, stretch.left) == (608, 640, 0, 0)


def test_clip_frame_count_rules():
    assert clip_frame_count(120, 93, None, None) == 93
    assert clip_frame_count(60, 93, None, None) is None  # too short: skipped
    assert clip_frame_count(60, 93, 33, None) == 57  # shortened to 1 + 4k
    assert clip_frame_count(60, 93, 61, None) is None
    assert clip_frame_count(200, 93, None, 49) is None  # max_frames caps what is considered


def test_real_start_frame_bucket_and_crop():
    path = asset("girl.png")
    assert probe_image(path) == (2048, 2048)
    height, width = bucket_size(480, 2048, 2048, 64)
    image = load_image(path, plan_resize(2048, 2048, height, width))
    assert image.shape == (608, 640, 3) and image.dtype == np.uint8 and image.flags.writeable


def test_exif_orientation_is_applied(tmp_path):
    path = write_image(tmp_path / "portrait.jpg", height=40, width=80, exif_orientation=6)
    assert probe_image(path) == (80, 40)  # orientation 6: displayed rotated 90 degrees clockwise
    image = load_image(path, plan_resize(80, 40, 80, 40))
    assert image.shape == (80, 40, 3)
    # The red top-left marker is top-right once rotated clockwise.
    assert image[2, -3, 0] > 200 and image[2, -3, 1] < 80 and image[2, 2, 0] < 200


def test_unreadable_media_errors_name_the_file(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(DataError, match=r"notes.mp4: not a readable video.*re-encode or remove it"):
        probe_video(text)
    good = write_video(tmp_path / "good.mp4", frames=30, fps=30, height=48, width=64)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match=r"truncated.mp4: "):
        probe_video(truncated)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match=r"broken.png: not a readable image"):
        probe_image(broken)


@pytest.mark.parametrize("kind", ["gray16", "rgba", "float", "cmyk"])
def test_image_modes_convert_alike_for_training_and_sampling(tmp_path, kind):
    """A start frame looks the same to the cache (data.images) and to `sample` (media): no white-out, no hidden colour."""
    from PIL import Image

    from longcat_tuner.data.images import read_image as sample_image

    ramp = np.linspace(0, 1, 48 * 80).reshape(48, 80)
    if kind == "gray16":
        image, path, want = Image.fromarray((ramp * 65535).astype(np.uint16)), tmp_path / "a.png", ramp * 255
    elif kind == "rgba":
        rgba = np.zeros((48, 80, 4), np.uint8)
        rgba[..., 0] = 255  # red, but fully transparent on the left half
        rgba[:, 40:, 3] = 255
        image, path, want = Image.fromarray(rgba, mode="RGBA"), tmp_path / "a.png", None
    elif kind == "float":
        image, path, want = Image.fromarray(ramp.astype(np.float32), mode="F"), tmp_path / "a.tif", ramp * 255
    else:
        image, path, want = Image.new("CMYK", (80, 48), (0, 255, 255, 0)), tmp_path / "a.jpg", None
    image.save(path)
    trained = load_image(path, plan_resize(48, 80, 48, 80)).astype(float)
    sampled = np.asarray(sample_image(path), dtype=float)
    assert trained.shape == sampled.shape == (48, 80, 3)
    assert np.abs(trained - sampled).max() <= 2  # one conversion (resampling is the identity here)
    if want is not None:
        assert np.abs(trained[..., 0] - want).max() <= 2  # scaled, not clipped at 255
    if kind == "rgba":
        assert trained[:, :40].min() == 255 and trained[:, 45:, 1].max() < 5  # transparent -> white; red stays red
    if kind == "cmyk":
        assert trained[..., 0].mean() > 200 and trained[..., 1].mean() < 60  # CMYK (0, 255, 255, 0) is red


def test_empty_video_file_says_so(tmp_path):
    empty = tmp_path / "copying.mp4"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"copying.mp4: empty file \(0 bytes\)"):
        probe_video(empty)


def _trim_without_reencoding(source: Path, target: Path, cut_frames: int) -> None:
    """What `ffmpeg -ss ... -c copy` (or LosslessCut, QuickTime's trim) writes: the same packets, shifted so the
    first `cut_frames` frames fall before time 0; the MP4 muxer keeps them behind an edit list (discard flag)."""
    import av

    with av.open(str(source)) as src, av.open(str(target), "w") as dst:
        stream = src.streams.video[0]
        out = dst.add_stream_from_template(stream)
        step = int(round(1 / (float(stream.time_base) * float(stream.average_rate))))
        for packet in src.demux(stream):
            if packet.dts is None:
                continue
            packet.pts -= cut_frames * step
            packet.dts -= cut_frames * step
            packet.stream = out
            dst.mux(packet)


def test_a_clip_trimmed_without_reencoding_starts_at_its_first_shown_frame(tmp_path):
    """The frames before the cut used to count as the clip's first frames: time 0 mapped to a frame the decoder
    never outputs, and every such clip was skipped as "truncated or corrupt"."""
    import av

    full = write_video(tmp_path / "full.mp4", frames=40, fps=15, height=32, width=48)
    trimmed = tmp_path / "trimmed.mp4"
    _trim_without_reencoding(full, trimmed, 10)
    with av.open(str(trimmed)) as container:
        hidden = sum(packet.is_discard for packet in container.demux(video=0) if packet.size)
    assert hidden == 10  # the edit list is there: this is the case being tested
    info = probe_video(trimmed)
    assert len(info.frame_pts) == 30 and info.frame_times[0] == 0.0
    indices = select_frame_indices(info.frame_times, 15.0, 9)
    frames = decode_frames(trimmed, info, indices, plan_resize(32, 48, 32, 48))
    # The first frame of the trimmed clip is source frame 10, as a player shows it.
    np.testing.assert_allclose(frames[:, 16, 24, 1].astype(int), [frame_level(10 + k, 40) for k in indices], atol=3)
