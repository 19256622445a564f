"""Writing files atomically: to a temporary name in the same folder, then a rename."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def save_image(img: Any, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """Save a PIL image atomically; the format follows the suffix of ``path``."""
    fmt = Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt, **kwargs)
