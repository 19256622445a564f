"""Writing files atomically: to a temporary name in the same folder, then a rename."""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success only."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (NaN refused), atomically; indented unless ``indent=None``.

    The text is streamed to the file: ``json.dumps`` with an indent first builds a list
    of every token, which for a 200-image manifest costs 80 MB at its peak. Without an
    indent the standard library's C encoder runs, about ten times faster (``atlas.json``
    holds an entry per top image of every channel: thousands).
    """
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, allow_nan=False)
        f.write("\n")


def save_image(img: Any, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """Save a PIL image atomically; the format follows the suffix of ``path``.

    Palette images (the channel grids) are written as they are, one byte per pixel,
    except to JPEG, which has no palette: they are converted to RGB first. A palette
    PNG whose rows rarely repeat (maps drawn at their own size, not upsampled) is
    compressed with zlib's run-length strategy unless ``compress_type`` is given: twice
    as fast as the default strategy for files about 1-7 % larger. Upsampled maps repeat
    their rows, which only the default strategy finds.
    """
    fmt = Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"
    if fmt == "JPEG" and img.mode == "P":
        img = img.convert("RGB")
    if fmt == "PNG" and img.mode == "P" and "compress_type" not in kwargs:
        rows = np.asarray(img)
        if rows.shape[0] > 1 and (rows[1:] == rows[:-1]).all(axis=1).mean() < 0.25:
            kwargs["compress_type"] = zlib.Z_RLE
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt, **kwargs)


def describe_os_error(exc: OSError, path: str | os.PathLike[str] | None = None) -> str:
    """One line naming the path and the cause of ``exc`` (no traceback needed)."""
    import errno

    where = path if path is not None else (exc.filename or "")
    causes = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EROFS: "the file system is read-only",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EISDIR: "it is a folder, not a file",
        errno.ENOENT: "no such file or folder",
        errno.EEXIST: "it already exists",
        errno.ENAMETOOLONG: "the name is too long",
    }
    cause = causes.get(exc.errno or -1, exc.strerror or exc.__class__.__name__)
    return f"{where}: {cause}" if where else cause


def prepare_output_dir(path: str | os.PathLike[str], what: str = "--out") -> Path:
    """Create the output folder and prove it takes a file, before any compute.

    Raises:
        FeatureMapsError: the path is a file or lies under one, the folder cannot be
            created, or a file cannot be written in it; the message names the path.
    """
    from .errors import FeatureMapsError

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise FeatureMapsError(f"{what} {folder}: it is a file; give a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".featuremaps-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise FeatureMapsError(
            f"{what} {describe_os_error(exc, folder)}; choose a folder you can write to"
        )
    return folder


def prepare_output_file(path: str | os.PathLike[str], what: str = "--out") -> Path:
    """Check that ``path`` can be written as a file (its folder made), before any compute."""
    from .errors import FeatureMapsError

    target = Path(path)
    if target.is_dir():
        raise FeatureMapsError(f"{what} {target}: it is a folder; give a file name")
    prepare_output_dir(target.parent, what=f"{what} {target}: its folder")
    return target


LOCK_NAME = ".featuremaps.lock"


@contextmanager
def output_lock(folder: str | os.PathLike[str], command: str) -> Iterator[Path]:
    """Hold an exclusive lock on an output folder for one run.

    The lock is ``fcntl.flock`` on ``FOLDER/.featuremaps.lock``, which records the PID
    and the command. The kernel releases it when the process ends, however it ends, so
    a lock file left by a dead process is simply taken over. The holder removes the
    file when it is done; a process that opened the file just before that sees a
    different file at the path once it holds the lock, and starts over.

    Raises:
        FeatureMapsError: another live process holds the folder; the message names it.
    """
    import fcntl
    import sys

    from .errors import FeatureMapsError

    folder = prepare_output_dir(folder)
    lock_path = folder / LOCK_NAME
    for _ in range(100):  # each retry means a holder just let go: bounded, never spins
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise FeatureMapsError(
                f"{folder} is in use by another featuremaps run ({holder}); wait for it "
                "to finish or choose another --out"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, lock_path):
            break
        os.close(fd)  # the file was removed by its last holder after we opened it
    else:  # pragma: no cover - would take 100 runs ending within one open() each
        raise FeatureMapsError(f"{folder}: cannot take the lock {lock_path}; try again")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {command or ' '.join(sys.argv)}\n".encode(), 0)
        yield lock_path
    finally:
        try:
            lock_path.unlink(missing_ok=True)  # still ours: we hold the lock
        except OSError:
            pass
        os.close(fd)  # closing the descriptor releases the flock


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
