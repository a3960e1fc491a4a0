"""Still images (start frames and image datasets): size probe, EXIF orientation, resize and crop.

Images are read with Pillow; `ImageOps.exif_transpose` applies the camera's orientation tag so a
portrait phone photo stays portrait, as it is displayed, before it is bucketed and cropped.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from longcat_tuner.data.video import ResizePlan
from longcat_tuner.media import to_rgb
from longcat_tuner.errors import DataError

# EXIF orientation values 5-8 rotate by 90 degrees: the displayed width and height swap.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable image ({err.__class__.__name__}: {err}); re-save or remove it") from None


def probe_image(path: str | Path) -> tuple[int, int]:
    """(height, width) as displayed (EXIF orientation applied), read from the header only."""
    path = Path(path)
    with _open(path) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        except Exception:  # a broken EXIF block must not hide a readable image
            orientation = 1
    if width <= 0 or height <= 0:
        raise DataError(f"{path}: image reports size {width}x{height}; re-save it")
    return (width, height) if orientation in _SWAPPING_ORIENTATIONS else (height, width)


def load_image(path: str | Path, plan: ResizePlan) -> np.ndarray:
    """Decode, apply EXIF orientation, convert to RGB, scale and crop per `plan` -> uint8 [H, W, 3]."""
    from PIL import Image, ImageOps

    path = Path(path)
    with _open(path) as image:
        try:
            image = to_rgb(ImageOps.exif_transpose(image))  # the same conversion as sampling (media.py)
            # reducing_gap: a fast box pre-shrink for large downscales (2048 -> 640) keeps quality.
            image = image.resize((plan.scaled_width, plan.scaled_height), Image.Resampling.LANCZOS, reducing_gap=3.0)
        except (OSError, ValueError, SyntaxError) as err:
            raise DataError(f"{path}: image data is corrupt or truncated ({err}); re-save or remove it") from None
        array = np.asarray(image)
    # A writable copy of the window (torch.from_numpy refuses read-only PIL buffers).
    return np.array(array[plan.top : plan.top + plan.height, plan.left : plan.left + plan.width])
