"""Still images (start frames and image datasets): safe open, size probe, EXIF orientation, resize and crop;
the one start-frame preparation (`prepare_start_frame`) for training, validation, `sample` and the web preview.

Images are read with Pillow; `ImageOps.exif_transpose` applies the camera's orientation tag so a
portrait phone photo stays portrait, as it is displayed, before it is bucketed and cropped.

Every image is opened through `open_image`, which refuses files over `MAX_IMAGE_PIXELS` by name before
a pixel is decoded (a PNG header can claim 30000x30000 in a few hundred bytes: a decompression bomb).
This module does not import torch (`check` and the web UI's thumbnails use it).
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from longcat_tuner.data.video import ResizePlan, plan_resize
from longcat_tuner.errors import DataError

# 80 Mpixel: above any camera start frame (61 Mpixel full-frame sensors), below Pillow's own warning
# threshold (~89 Mpixel), so Pillow never warns on an image this module accepts; decoding one costs ~240 MB.
MAX_IMAGE_PIXELS = 80_000_000

# EXIF orientation values 5-8 rotate by 90 degrees: the displayed width and height swap.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112


def _too_large(path: Path, width: int, height: int, limit: int) -> DataError:
    return DataError(
        f"{path}: image is {width}x{height} = {width * height / 1e6:.0f} Mpixel, over the limit of "
        f"{limit / 1e6:.0f} Mpixel; downscale it (a start frame needs no more than the training size) or remove it"
    )


def _png_size(path: Path):
    """(width, height) from a PNG's IHDR chunk, or None for other files (for the message of a refused bomb)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(24)
    except OSError:
        return None
    if len(head) == 24 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    return None


def open_image(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS):
    """Open an image lazily (header only), refusing unreadable files and images over `max_pixels`.

    Returns a PIL image (use it as a context manager); raises `DataError` naming the file, its size and
    the limit. Pillow's own `DecompressionBombError` / `DecompressionBombWarning` become the same message.
    The one safe opener for start frames, image datasets, sampling and the web UI's thumbnails.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        size = _png_size(path)
        if size is not None:
            raise _too_large(path, size[0], size[1], max_pixels) from None
        raise DataError(f"{path}: image is over the pixel limit of {max_pixels / 1e6:.0f} Mpixel ({err}); downscale it") from None
    except FileNotFoundError:
        raise DataError(f"{path}: image does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error) as err:
        raise DataError(f"{path}: not a readable image ({err.__class__.__name__}: {err}); re-save or remove it") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise _too_large(path, width, height, max_pixels)
    if width <= 0 or height <= 0:
        image.close()
        raise DataError(f"{path}: image reports size {width}x{height}; re-save it")
    return image


def _decode(image, path: Path) -> None:
    """Decode every pixel (catches truncated and corrupt data, as training would meet it)."""
    from PIL import Image

    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large(path, image.size[0], image.size[1], MAX_IMAGE_PIXELS) from None
    except (OSError, ValueError, SyntaxError, struct.error, EOFError) as err:
        raise DataError(f"{path}: image data is corrupt or truncated ({err}); re-save or remove it") from None


def probe_image(path: str | Path, *, decode: bool = True) -> tuple[int, int]:
    """(height, width) as displayed (EXIF orientation applied).

    With `decode` (the default, what `check` and planning use) every pixel is decoded once, so a truncated
    or corrupt file is reported here exactly as training would skip it; start frames are small, so this is cheap.
    """
    path = Path(path)
    with open_image(path) as image:
        width, height = image.size
        if decode:  # first: a PNG's getexif() decodes the pixels itself, and its failure is swallowed below,
            _decode(image, path)  # after which load() returned the half-decoded image as if it were intact
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        except Exception:  # a broken EXIF block must not hide a readable image
            orientation = 1
    return (width, height) if orientation in _SWAPPING_ORIENTATIONS else (height, width)


def to_rgb(image):
    """Any PIL image as 8-bit RGB, the same way for training start frames and for sampling.

    Transparent pixels become white (not whatever colour the alpha hid); 16-bit and float grey images are
    scaled to 8 bits (Pillow's own conversion clips them at 255, turning most of the picture white).
    """
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "P", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        # Integers are taken as 16-bit (0..65535) unless they all fit in 8 bits; floats as 0..1 when they
        # lie there, else stretched between their min and max.
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            low, high = (0.0, 1.0) if values.min() >= 0 and values.max() <= 1 else (values.min(), values.max())
        else:
            low, high = 0.0, (255.0 if values.max() <= 255 else 65535.0)
        grey = np.clip((values - low) / max(high - low, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")  # L, CMYK, YCbCr, 1, ...


def read_image(path: str | Path):
    """An RGB PIL image with its EXIF orientation applied (`to_rgb`), fully decoded; opened by `open_image`
    (unreadable files and decompression bombs are a named `DataError`)."""
    from PIL import ImageOps

    path = Path(path)
    with open_image(path) as image:
        try:
            return to_rgb(ImageOps.exif_transpose(image))
        except (OSError, ValueError, SyntaxError, struct.error, EOFError) as err:  # truncated or corrupt pixel data
            raise DataError(f"{path}: image data is corrupt or truncated ({err}); re-save or remove it") from None


def resize_to_plan(image, plan: ResizePlan) -> np.ndarray:
    """Scale an RGB PIL image to the plan's size with PIL's LANCZOS filter and cut the plan's window
    -> uint8 [H, W, 3]. No `reducing_gap` pre-shrink: the exact pixels of diffusers' image processor."""
    from PIL import Image

    scaled = image.resize((plan.scaled_width, plan.scaled_height), Image.Resampling.LANCZOS)
    array = np.asarray(scaled)
    # A writable copy of the window (torch.from_numpy refuses read-only PIL buffers).
    return np.array(array[plan.top : plan.top + plan.height, plan.left : plan.left + plan.width])


def prepare_start_frame(image, height: int, width: int) -> np.ndarray:
    """The one start-frame preparation (training caches, validation, `sample`, the web preview): an RGB PIL
    image scaled with LANCZOS to cover (height, width), sizes rounded down, then center-cropped -> uint8
    [height, width, 3]. Equal to the official pipeline's diffusers `VideoProcessor.preprocess(image, height,
    width, resize_mode="crop")` before its [-1, 1] scaling (tests/test_start_frame.py checks it)."""
    return resize_to_plan(image, plan_resize(image.height, image.width, height, width))


def load_image(path: str | Path, plan: ResizePlan) -> np.ndarray:
    """Decode, apply EXIF orientation, convert to RGB, scale and crop per `plan` (`resize_to_plan`) -> uint8 [H, W, 3]."""
    path = Path(path)
    image = read_image(path)
    try:
        return resize_to_plan(image, plan)
    except (OSError, ValueError, SyntaxError, struct.error, EOFError) as err:
        raise DataError(f"{path}: image data is corrupt or truncated ({err}); re-save or remove it") from None
