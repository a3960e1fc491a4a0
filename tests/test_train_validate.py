"""Validation outputs: sizes, mp4 at 15 fps, contact sheet, first-frame PSNR."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from longcat_tuner.data.buckets import resolution_size as validation_size
from longcat_tuner.data.images import prepare_start_frame, read_image
from longcat_tuner.media import image_to_tensor, psnr, write_contact_sheet, write_mp4
from longcat_tuner.media import video_to_uint8 as to_uint8_frames


def test_validation_size_follows_the_start_frame_for_bucket_names():
    assert validation_size("480x832", (1080, 1920), 64) == (480, 832)
    assert validation_size("480p", (1080, 1920), 64) == (480, 832)
    assert validation_size("480p", (1920, 1080), 64) == (832, 480)
    assert validation_size("480p", (512, 512), 64) == (608, 640)
    assert validation_size("720p", (1080, 1920), 64) == (720, 1280)


def test_mp4_contact_sheet_and_psnr(tmp_path):
    import av

    video = torch.linspace(-1, 1, 3 * 9 * 32 * 48).reshape(3, 9, 32, 48)
    frames = to_uint8_frames(video)
    assert frames.shape == (9, 32, 48, 3) and frames.dtype == np.uint8
    path = write_mp4(tmp_path / "v.mp4", frames)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.average_rate == 15
    assert len(decoded) == 9 and decoded[0].shape == (32, 48, 3)
    sheet = Image.open(write_contact_sheet(frames, tmp_path / "s.png"))
    assert sheet.size == (48 * 8, 32)
    a = torch.zeros(3, 8, 8)
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 0.2) == pytest.approx(10 * np.log10(1 / 0.01))  # 0.2 in [-1,1] is 0.1 in [0,1]


def test_start_frame_is_covered_and_center_cropped(tmp_path):
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    image[:, 50:150] = 255  # a white center band, black sides
    Image.fromarray(image).save(tmp_path / "s.png")
    frame = image_to_tensor(prepare_start_frame(read_image(tmp_path / "s.png"), 64, 64))
    assert frame.shape == (3, 64, 64)
    assert float(frame.min()) >= -1 and float(frame.max()) <= 1
    assert float(frame[:, :, 32].mean()) > 0.9  # the crop keeps the center
