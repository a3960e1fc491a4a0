"""Writing files so that a full disk or a crash never leaves a half-written one, and naming the cause.

`atomic_file(path)` yields a temporary path beside `path`; the caller writes it with any writer
(safetensors, torch.save, json), and it is renamed over `path` only when the writer returned. On any
error the temporary file is removed and the error goes on. `write_failure(err, folder)` turns what the
writers raise when space runs out into words: Python's `OSError(ENOSPC)`, safetensors'
`SafetensorError("... No space left on device (os error 28)")` and torch.save's short-write
`RuntimeError("... unexpected pos N vs M")`, which never mentions the disk. Files written through
`atomic_file` get the permissions a plain `open` gives (`shareable`), whatever the writer chose.

No torch import here: the web server uses the package without it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

# ENOSPC: no space left; EDQUOT: over a disk quota.
OUT_OF_SPACE_ERRNOS = frozenset(filter(None, (errno.ENOSPC, getattr(errno, "EDQUOT", None))))
_OUT_OF_SPACE_TEXT = ("no space left", "os error 28", "os error 122", "disk quota", "storagefull")
# torch.save (PyTorchStreamWriter) reports a short write by position or a failed write, not by errno.
_SHORT_WRITE_TEXT = ("unexpected pos", "file write failed", "failed writing", "pytorchstreamwriter failed")
LOW_SPACE_BYTES = 64 * 2**20  # less than this left after a failed write: call it a full disk


def is_write_error(err: BaseException) -> bool:
    """What a file writer raises when the file cannot be written (space, permissions, I/O)."""
    if isinstance(err, OSError):
        return True
    if type(err).__name__ == "SafetensorError":  # safetensors' own type, matched by name (no import needed)
        return True
    return isinstance(err, RuntimeError) and any(text in str(err).lower() for text in _SHORT_WRITE_TEXT + _OUT_OF_SPACE_TEXT)


def free_bytes(folder: Union[str, Path]) -> Optional[int]:
    """Free space on the file system holding `folder` (its nearest existing parent), None if unknown."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_out_of_space(err: BaseException, folder: Optional[Union[str, Path]] = None) -> bool:
    """True when `err` says the disk (or quota) is full, or is a short write on a nearly full disk."""
    if isinstance(err, OSError) and err.errno in OUT_OF_SPACE_ERRNOS:
        return True
    text = str(err).lower()
    if any(part in text for part in _OUT_OF_SPACE_TEXT):
        return True
    if folder is not None and any(part in text for part in _SHORT_WRITE_TEXT):
        free = free_bytes(folder)
        return free is not None and free < LOW_SPACE_BYTES
    return False


def write_failure(err: BaseException, folder: Union[str, Path]) -> str:
    """Why a write into `folder` failed, in words that name the fix."""
    if is_out_of_space(err, folder):
        return f"the disk is full (no space left on the device holding {folder}; {err})"
    if isinstance(err, PermissionError):
        return f"{folder} is not writable ({err})"
    if isinstance(err, OSError) and err.errno == errno.EROFS:
        return f"{folder} is on a read-only file system ({err})"
    if isinstance(err, (FileExistsError, NotADirectoryError)):  # mkdir met a file where a folder belongs
        return f"a file is in the way: {err.filename or folder} must be a folder ({err.strerror or err})"
    text = str(err).lower()
    if any(part in text for part in _SHORT_WRITE_TEXT):
        return f"the write was cut short (is the disk full or failing? {err})"
    return f"cannot write in {folder} ({type(err).__name__}: {err})"


def symlink_loop(path: Union[str, Path]) -> Optional[str]:
    """Words for a `path` that runs into a symbolic link loop (a link that points back at itself, directly or
    through others), or None. Such a path does not "exist", so it passed the checks and failed in `resolve`."""
    try:
        Path(path).resolve()
    except (RuntimeError, OSError) as err:  # RuntimeError before Python 3.13, OSError(ELOOP) from it on
        return f"it is a symbolic link loop ({err})"
    return None


def folder_problem(folder: Path, name: str, where: str) -> Optional[str]:
    """Why `folder` (the setting `name` of file `where`) could not be created or written, or None. Probes with
    a temporary file in the nearest existing folder (permission bits alone say nothing for root or read-only
    file systems); creates nothing."""
    loop = symlink_loop(folder)
    if loop:
        return f"{name} {folder} cannot be used: {loop}; point it at a real folder (fix {where})"
    if folder.exists() and not folder.is_dir():
        return f"{name} {folder} is a file, not a folder; set {name} to a folder path (fix {where})"
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return (f"{name} {folder} cannot be created: {existing} is a file, not a folder; set {name} to a "
                f"path under a folder (fix {where})")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".longcat-check-"):
            pass
    except OSError as err:
        return (f"{name} {folder} is not writable ({existing}: {err.strerror or err}); choose a folder you can "
                f"write to, or fix its permissions (fix {where})")
    return None


# Longest path and file name Linux file systems take (PATH_MAX 4096 with the NUL, NAME_MAX 255 bytes).
MAX_PATH_BYTES = 4095
MAX_NAME_BYTES = 255


def path_too_long(text: Union[str, Path]) -> Optional[str]:
    """Why a path is longer than the file system takes (opening it would fail with ENAMETOOLONG), or None.
    Judged from its bytes alone, without touching the file system (the web UI asks this of untrusted input)."""
    text = os.fspath(text)
    data = text.encode("utf-8", "surrogateescape")
    if len(data) > MAX_PATH_BYTES:
        return f"path too long ({len(data)} bytes; at most {MAX_PATH_BYTES})"
    longest = max((len(part.encode("utf-8", "surrogateescape")) for part in text.split(os.sep)), default=0)
    if longest > MAX_NAME_BYTES:
        return f"a file or folder name in the path is too long ({longest} bytes; at most {MAX_NAME_BYTES})"
    return None


def _umask() -> int:
    """This process's umask, read without changing it (os.umask sets it too, which races with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def shareable(path: Union[str, Path]) -> None:
    """Give a file we wrote the permissions a plain `open` would (0666 less the umask): safetensors' writer
    creates its files 0600, so a LoRA or checkpoint would be unreadable to another user (a ComfyUI service, a
    shared group) where every other output is readable."""
    path = Path(path)
    if path.is_file() and not path.is_symlink():
        os.chmod(path, 0o666 & ~_umask())


class NotRegularFileError(OSError):
    """`atomic_file` was given a path that exists and is not a regular file (a device, pipe, socket or folder)."""


@contextlib.contextmanager
def atomic_file(path: Union[str, Path], *, suffix: Optional[str] = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` if the block succeeds, else delete it.

    The temporary name is `<name>.tmp<pid>` unless `suffix` is given (`<name><suffix>`): readers that
    list a folder can tell it apart, and a leftover of a killed process can be found and removed.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        # The rename would replace the node itself: run as root with `/dev/null` (or a pipe) as the output, it
        # turned the system's /dev/null into a plain file.
        what = "a folder" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise NotRegularFileError(f"{path} is {what}, so it is not replaced by a written file; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + (suffix if suffix is not None else f".tmp{os.getpid()}"))
    try:
        yield temporary
        shareable(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
