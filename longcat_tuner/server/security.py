"""Request guards of the web UI: token, Host header, custom header on writes, paths and uploads.

The server binds loopback by default, but a browser on the same machine can still be tricked into
calling it (DNS rebinding, cross-site forms). So every request needs the token (a Bearer header for
the JSON API, or the HttpOnly cookie set on the first page load), the Host header must name this
server, and state-changing requests need a custom header that a cross-site form cannot send.
"""
from __future__ import annotations

import hmac
import io
import ipaddress
import secrets
from pathlib import Path
from typing import BinaryIO, Iterable, Union

from PIL import Image, UnidentifiedImageError

from longcat_tuner.fsutil import path_too_long

TOKEN_ENV = "LONGCAT_TUNER_TOKEN"
COOKIE_NAME = "longcat_tuner_token"
# Header a page of ours adds to every POST/PUT/DELETE; a cross-site <form> cannot set it and a
# cross-site fetch with it needs a CORS preflight, which this server never grants.
WRITE_HEADER = "x-longcat-tuner"
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Start frames larger than this are refused before decoding (4096 x 4096 RGB is already 48 MiB raw).
MAX_IMAGE_PIXELS = 4096 * 4096


class GuardError(Exception):
    """A request that must be refused; `status` is the HTTP status, the message says why and how to fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ImageTooLargeError(GuardError):
    """An image whose header claims more pixels than the server decodes (a decompression bomb)."""


def new_token() -> str:
    return secrets.token_urlsafe(24)


def token_matches(given: str | None, expected: str) -> bool:
    # Constant-time comparison so the token cannot be guessed byte by byte from response timing.
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def host_name(host_header: str) -> str:
    """`127.0.0.1:8765` -> `127.0.0.1`; `[::1]:8765` -> `::1`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def allowed_host_names(bound_host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """Loopback names plus the bound host (unless it is a wildcard such as 0.0.0.0)."""
    names = set(LOOPBACK_NAMES) | {name.lower() for name in extra}
    try:
        if not ipaddress.ip_address(bound_host).is_unspecified:
            names.add(bound_host.lower())
    except ValueError:  # a host name, not an address
        names.add(bound_host.lower())
    return frozenset(names)


def check_host(host_header: str | None, allowed: frozenset[str]) -> None:
    if not host_header or host_name(host_header) not in allowed:
        raise GuardError(
            400,
            f"Host header {host_header!r} is not this server; open the UI through "
            f"one of {sorted(allowed)} (protects against DNS rebinding)",
        )


def resolve_inside(path: str | Path, roots: Iterable[Path], *, what: str = "path") -> Path:
    """Resolve `path` (symlinks and `..` included) and require it to lie inside one of `roots`."""
    text = str(path)
    if not text or "\x00" in text:
        raise GuardError(400, f"{what}: empty or invalid path")
    too_long = path_too_long(text)
    if too_long:
        raise GuardError(400, f"{what}: {too_long}")
    try:
        resolved = Path(text).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as err:  # a symlink loop, a name the file system refuses
        raise GuardError(400, f"{what} {text[:200]!r} cannot be resolved ({err})") from None
    too_long = path_too_long(str(resolved))  # `..` or a symlink may lengthen it
    if too_long:
        raise GuardError(400, f"{what}: {too_long}")
    root_list = [Path(root).resolve() for root in roots]
    for root in root_list:
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    raise GuardError(
        403,
        f"{what} {text!r} resolves to {resolved}, outside the folders this server may use "
        f"({', '.join(map(str, root_list))}); restart the server with --allow-dir for that folder",
    )


def child_path(base: Path, relative: str, *, what: str = "file") -> Path:
    """`base / relative`, refused when `relative` is absolute or escapes `base`."""
    if Path(relative).is_absolute():
        raise GuardError(403, f"{what} {relative!r}: absolute paths are not allowed here")
    return resolve_inside(base / relative, [base], what=what)


def open_image_checked(source: Union[str, Path, BinaryIO], *, max_pixels: int, name: str) -> Image.Image:
    """Open an image reading only its header, refusing more than `max_pixels` before any pixel is decoded.

    A small file can claim a huge size (a "decompression bomb": a 30000x30000 PNG of a few KiB would
    need 2.7 GB to decode); Pillow's own guard raises a bare `DecompressionBombError` for the worst of
    them. Both become an `ImageTooLargeError` (422) naming `name`, the size and the fix; a file that is
    not an image a `GuardError` (422). The caller closes the returned image.
    """
    try:
        image = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # Pillow refuses sizes over twice its own limit at open (and warns above it: an error under -W error).
        raise ImageTooLargeError(
            422, f"{name}: refused to decode, the image header claims too many pixels ({err}); "
            "it is a decompression bomb or far larger than any start frame: downscale or remove it",
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise GuardError(422, f"{name} is not a readable image ({err}); re-save it as PNG, JPEG or WebP") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageTooLargeError(
            422, f"{name}: refused to decode, the image header says {width}x{height} ({width * height} pixels), "
            f"more than the {max_pixels}-pixel limit (a decompression bomb, or a frame far larger than training "
            "uses): downscale or remove it",
        )
    return image


def decode_upload_image(data: bytes, *, max_bytes: int) -> Image.Image:
    """Decode an uploaded start frame, refusing oversize data and anything that is not an image."""
    if len(data) > max_bytes:
        raise GuardError(413, f"upload is {len(data)} bytes; the limit is {max_bytes} bytes")
    if not data:
        raise GuardError(400, "upload is empty; choose a PNG, JPEG or WebP start frame")
    try:
        probe = open_image_checked(io.BytesIO(data), max_pixels=MAX_IMAGE_PIXELS, name="upload")
    except ImageTooLargeError as err:
        raise GuardError(413, str(err)) from None
    except GuardError as err:
        raise GuardError(415, str(err)) from None
    try:
        with probe:
            probe.verify()  # checks the file structure without decoding all pixels
        image = Image.open(io.BytesIO(data))
        image.load()  # verify() leaves the image unusable; decode it for real
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise GuardError(415, f"upload is not a readable image ({err}); use PNG, JPEG or WebP") from None
    return image.convert("RGB")
