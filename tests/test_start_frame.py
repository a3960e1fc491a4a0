"""The one start-frame preparation (training caches, validation, `sample`, the web preview) against the official
pipeline's: diffusers' `VideoProcessor.preprocess(..., resize_mode="crop")` (LANCZOS cover, center crop)."""
import numpy as np
import pytest
import torch
from PIL import Image

from longcat_tuner.data.images import load_image, prepare_start_frame, read_image
from longcat_tuner.data.video import plan_resize
from longcat_tuner.media import image_to_tensor

# (source height, source width, target height, target width): odd sizes, every aspect relation, up- and downscale.
CASES = [
    (487, 731, 64, 96),    # a little wider than the target
    (1001, 333, 96, 48),   # portrait, odd both ways
    (333, 333, 64, 96),    # square into landscape
    (97, 211, 112, 64),    # upscale into portrait
    (719, 1283, 480, 832), # almost 16:9, odd
    (480, 832, 480, 832),  # exact size
    (961, 1663, 480, 832), # same aspect within a pixel, 2x
    (50, 1000, 48, 96),    # very wide strip
]


def noise_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth structure plus noise, so resampling filters and offsets both show in the pixels.
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], axis=-1)
    pixels = np.clip(base + rng.integers(-40, 40, size=(height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


@pytest.mark.parametrize("src_h, src_w, height, width", CASES)
def test_start_frame_equals_diffusers_video_processor(src_h, src_w, height, width):
    from diffusers.video_processor import VideoProcessor

    image = noise_image(src_h, src_w, seed=src_h * 7 + src_w)
    official = VideoProcessor(vae_scale_factor=8).preprocess(image, height=height, width=width, resize_mode="crop")
    ours = image_to_tensor(prepare_start_frame(image, height, width))
    assert official.shape == (1, 3, height, width)
    assert ours.shape == (3, height, width)
    # Same pixels: the [-1, 1] scalings differ only in float rounding (x/127.5 - 1 vs 2x/255 - 1).
    assert torch.allclose(ours, official[0].float(), atol=1e-6, rtol=0)
    # And as 8-bit pixels, exactly.
    official_u8 = ((official[0].float() + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(prepare_start_frame(image, height, width), official_u8)


def test_bicubic_or_rounded_geometry_would_differ():
    """The comparison above can fail: the old sampling preparation (BICUBIC, rounded sizes) is not equal."""
    from diffusers.video_processor import VideoProcessor

    image = noise_image(487, 731, seed=3)
    official = VideoProcessor(vae_scale_factor=8).preprocess(image, height=64, width=96, resize_mode="crop")[0]
    bicubic = image.resize((96, round(487 * 96 / 731)), Image.BICUBIC).crop((0, 0, 96, 64))
    assert not torch.allclose(image_to_tensor(bicubic), official.float(), atol=1e-3)


def test_training_cache_and_sampling_read_the_same_start_frame(tmp_path):
    """The cache builder reads a start frame through its planned crop (`load_image(path, plan)`); sampling
    and validation through `prepare_start_frame`: for a center crop both give the same pixels, EXIF applied."""
    image = noise_image(301, 517, seed=5)
    path = tmp_path / "start.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees for display: the displayed image is 517 high, 301 wide
    image.save(path, exif=exif)
    shown = read_image(path)
    assert (shown.height, shown.width) == (517, 301)
    plan = plan_resize(shown.height, shown.width, 96, 64)
    cached = load_image(path, plan)
    assert np.array_equal(cached, prepare_start_frame(shown, 96, 64))


def test_center_crop_geometry_is_the_official_one():
    plan = plan_resize(487, 731, 64, 96)
    # the source is wider (731/487 = 1.501 > 96/64): the height binds, width 731*64//487 = 96 (rounded down)
    assert (plan.scaled_height, plan.scaled_width) == (64, 96)
    plan = plan_resize(333, 333, 64, 96)
    assert (plan.scaled_height, plan.scaled_width, plan.top, plan.left) == (96, 96, 16, 0)
    plan = plan_resize(100, 203, 64, 96)  # height binds: width 203*64//100 = 129 (floor), crop 64 - 48 = 16
    assert (plan.scaled_height, plan.scaled_width, plan.top, plan.left) == (64, 129, 0, 16)
