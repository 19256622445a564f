"""Uploads: read with a byte bound, decoded with a pixel, memory and concurrency bound.

An upload is read in chunks and refused (413) as soon as it passes the byte limit. The
header is read before any pixel is: an image over the pixel limit, or whose decoded size
(width x height x bytes per pixel) would not fit the image store, is refused (413) before
it is decoded. At most ``max_decodes`` uploads are decoded at once; the next one gets 503
with ``Retry-After`` instead of queueing more memory.

Example:
    >>> decoder = Decoder(max_decodes=2, max_pixels=40_000_000, max_bytes=256 << 20)
    >>> img = decoder.decode(open(sample_image("cat"), "rb").read())  # doctest: +SKIP
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from ..images import to_rgb
from .config import DEFAULT_IMAGE_BYTES, DEFAULT_MAX_PIXELS, ServerConfig
from .errors import ApiError

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
"""Formats an upload may have; others (EPS, PDF, ...) are never opened."""
MULTIPART_SLACK = 64 * 1024
"""Bytes a multipart form may add around the file."""
RETRY_AFTER_S = 2
_SMALL_MODES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2}


def decoded_bytes(img: Image.Image) -> int:
    """Memory of ``img`` once decoded and converted to RGB, from its header alone.

    Pillow keeps RGB in four bytes a pixel; a mode that is not RGB needs its own buffer
    beside the RGB one while converting.
    """
    pixels = img.width * img.height
    rgb = pixels * 4
    return rgb if img.mode == "RGB" else rgb + pixels * _SMALL_MODES.get(img.mode, 4)


def open_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_IMAGE_BYTES
) -> Image.Image:
    """Open uploaded bytes and check the header; no pixel is decoded yet.

    Raises:
        ApiError: 413 when too many pixels or too much decoded memory, 415 when the bytes
            are not an image of an accepted format.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ApiError(413, f"image too large to decode safely ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _not_an_image() from exc
    if img.width * img.height > max_pixels:
        raise ApiError(
            413,
            f"image is {img.width}×{img.height} pixels; the limit is "
            f"{max_pixels / 1e6:.0f} megapixels. Downscale it first.",
        )
    need = decoded_bytes(img)
    if need > max_bytes:
        raise ApiError(
            413,
            f"image is {img.width}×{img.height} pixels ({img.mode}): decoded it needs "
            f"{need / 2**20:.0f} MiB, more than the {max_bytes / 2**20:.0f} MiB this "
            "server keeps for images. Downscale it first.",
        )
    return img


def _not_an_image() -> ApiError:
    return ApiError(
        415, "the upload is not a readable image (accepted: JPEG, PNG, WebP, BMP, TIFF, GIF)"
    )


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_IMAGE_BYTES
) -> Image.Image:
    """Decode uploaded bytes as an RGB image, refusing other formats and huge pictures.

    Raises:
        ApiError: 413 when too many pixels or too much decoded memory (checked on the
            header, before decoding), 415 when the bytes are not an image of an accepted
            format.
    """
    img = open_image(data, max_pixels, max_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _not_an_image() from exc
    try:
        # in place: without an orientation tag nothing is copied (a 36-MP copy is 144 MB)
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # broken EXIF must not stop us; orientation is then as stored
        pass
    return to_rgb(img)


class Decoder:
    """Decodes uploads, at most ``max_decodes`` at a time (the rest get 503).

    The decodes run on ``max_decodes`` threads of their own: the memory the allocator
    keeps after a decode is then reused by the next one instead of piling up in the
    arenas of every thread of the server's pool.
    """

    def __init__(self, max_decodes: int, max_pixels: int, max_bytes: int) -> None:
        self.max_decodes = max_decodes
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self._slots = threading.BoundedSemaphore(max_decodes)
        self._threads = ThreadPoolExecutor(max_decodes, thread_name_prefix="featuremaps-decode")

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    def measure(self, data: bytes) -> int:
        """Bytes ``data`` will take once decoded, read from its header (413/415 as
        :func:`open_image`)."""
        return decoded_bytes(open_image(data, self.max_pixels, self.max_bytes))

    def decode(self, data: bytes) -> Image.Image:
        """Decode ``data`` now, or refuse with 503 when every slot is busy.

        Raises:
            ApiError: 503 with ``Retry-After`` when ``max_decodes`` run already; 413/415
                as :func:`decode_image`.
        """
        if not self._slots.acquire(blocking=False):
            raise ApiError(
                503,
                f"the server is decoding {self.max_decodes} images already; "
                f"try again in {RETRY_AFTER_S} s",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        try:
            return self._threads.submit(
                decode_image, data, self.max_pixels, self.max_bytes
            ).result()
        finally:
            self._slots.release()


async def read_upload(request: Any, config: ServerConfig) -> bytes:
    """The uploaded file: the raw body, or the ``file`` field of a multipart form.

    The body is read in chunks and refused (413) as soon as it passes the limit, so a
    huge upload never sits in memory.

    Raises:
        ApiError: 413 over the limit, 400 for a malformed form or one without ``file``.
    """
    from starlette.formparsers import MultiPartException, MultiPartParser

    limit = config.max_upload_bytes
    ctype = request.headers.get("content-type", "")
    multipart = ctype.startswith("multipart/form-data")
    budget = limit + (MULTIPART_SLACK if multipart else 0)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > budget:
        raise ApiError(413, config.too_large())
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > budget:
            raise ApiError(413, config.too_large())
        chunks.append(chunk)
    body = b"".join(chunks)
    if not multipart:
        return body

    async def replay() -> AsyncGenerator[bytes, None]:
        yield body
        yield b""

    try:
        form = await MultiPartParser(request.headers, replay(), max_files=1, max_fields=8).parse()
    except MultiPartException as exc:
        raise ApiError(400, f"malformed multipart upload: {exc.message}") from exc
    file = form.get("file")
    if file is None or isinstance(file, str):
        raise ApiError(400, "send the image as the form field 'file' (or as the raw body)")
    data: bytes = await file.read()
    await file.close()
    if len(data) > limit:
        raise ApiError(413, config.too_large())
    return data
