"""Finding, decoding and preprocessing images; undoing the normalization for display."""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ._files import describe_os_error
from ._torchvision import import_torchvision
from .errors import ImageError
from .models import Preprocess

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
SAMPLES = {"cat": "cat.jpg", "coffee": "coffee.jpg"}
"""Bundled sample photos (CC0, from scikit-image's data set; see data/ATTRIBUTION.md)."""


class FirstFrameWarning(UserWarning):
    """An image holds several frames (animated GIF, multi-page TIFF); the first is used."""


def sample_image(name: str = "cat") -> Path:
    """Path of a bundled sample photo: ``"cat"`` (Chelsea) or ``"coffee"`` (espresso)."""
    if name not in SAMPLES:
        raise ImageError(f"no sample {name!r}; samples: {', '.join(SAMPLES)}")
    return Path(str(resources.files("featuremaps") / "data" / SAMPLES[name]))


def expand_inputs(
    items: Iterable[str | os.PathLike[str]], also: tuple[str, ...] = ()
) -> list[Path]:
    """Expand files, folders (recursively) and glob patterns into image paths, in order.

    A folder gives the files with an image suffix, and those with a suffix in ``also``
    (``featuremaps run`` adds the video suffixes); a file named directly is always kept.

    Raises:
        ImageError: an item matches nothing, or nothing at all is found.
    """
    found: list[Path] = []
    for item in items:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            hits = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in (*IMAGE_SUFFIXES, *also)
            )
            if not hits:
                kinds = ", ".join(dict.fromkeys((*IMAGE_SUFFIXES, *also)))
                raise ImageError(f"folder {text!r} holds no images ({kinds})")
            found.extend(hits)
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(text):
            hits = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not hits:
                raise ImageError(f"pattern {text!r} matches no file")
            found.extend(hits)
        else:
            raise ImageError(f"image {text!r}: no such file or folder")
    if not found:
        raise ImageError("no images given")
    return found


def load_image(path: str | os.PathLike[str], *, draft_size: int | None = None) -> Image.Image:
    """Open an image as 8-bit RGB, honouring EXIF orientation.

    Grayscale, 16-bit, float, palette, CMYK and images with alpha (composited on white)
    all become RGB. ``draft_size`` lets JPEG decoding skip detail that a later resize to
    that short side would discard.

    Raises:
        ImageError: the file is missing, not an image, truncated or too large.
    """
    path = Path(path)
    img = _decode(path, draft_size)
    try:
        frames = int(getattr(img, "n_frames", 1) or 1)
        if frames > 1:
            warnings.warn(
                f"image {str(path)!r} holds {frames} frames; only the first is used",
                FirstFrameWarning,
                stacklevel=2,
            )
        try:
            shown = ImageOps.exif_transpose(img)  # a new image either way
        except Exception:  # broken EXIF must not stop us; orientation is then as stored
            shown = img.copy()
        return to_rgb(shown)
    finally:
        img.close()  # a multi-frame file stays open until closed


def _decode(path: Path, draft_size: int | None) -> Image.Image:
    """Open and decode the (first frame of the) image; errors become :class:`ImageError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            try:
                if draft_size and img.format == "JPEG":
                    w, h = img.size
                    scale = draft_size / min(w, h)
                    if scale < 1:
                        img.draft("RGB", (int(w * scale) + 1, int(h * scale) + 1))
                img.load()
            except BaseException:
                img.close()
                raise
    except FileNotFoundError as exc:
        raise ImageError(f"image {str(path)!r}: no such file") from exc
    except (PermissionError, IsADirectoryError) as exc:
        raise ImageError(f"image {describe_os_error(exc, path)}") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"image {str(path)!r} is too large to decode safely ({exc}). Downscale it first."
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"image {str(path)!r} is not a readable image (JPEG, PNG, WebP, BMP, TIFF)"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"image {str(path)!r} cannot be decoded: {exc}") from exc
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on white)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":
            top = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
        else:
            top = 65535.0 if arr.size and float(arr.max()) > 255 else 255.0
        arr = np.nan_to_num(np.clip(arr / top, 0.0, 1.0) * 255.0 + 0.5)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def preprocess(
    img: Image.Image, pp: Preprocess, *, full: bool = False, size: int | None = None
) -> torch.Tensor:
    """Turn an RGB image into a normalized ``(3, H, W)`` float tensor.

    Args:
        img: an RGB image.
        pp: the model's preprocessing.
        full: keep the whole image: resize the short side only, no crop.
        size: override the short side after resizing (and the crop size).
    """
    return normalized(resized_pixels(img, pp, full=full, size=size), pp)


def normalized(pixels: torch.Tensor, pp: Preprocess) -> torch.Tensor:
    """The model input of :func:`resized_pixels`' uint8 pixels: scaled to [0, 1], normalized."""
    import_torchvision()
    from torchvision.transforms.v2 import functional as F

    x = F.to_dtype(pixels, torch.float32, scale=True)
    return F.normalize(x, list(pp.mean), list(pp.std))


def resized_pixels(
    img: Image.Image, pp: Preprocess, *, full: bool = False, size: int | None = None
) -> torch.Tensor:
    """The ``(3, H, W)`` uint8 pixels :func:`preprocess` normalizes (resized, cropped).

    What the model sees before the normalization: crops of it show an input region
    exactly, with no round trip through floats.
    """
    import_torchvision()
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    interp = InterpolationMode(pp.interpolation)
    resize = size or pp.resize or pp.crop
    crop = None if full else (size or pp.crop)
    t = F.pil_to_tensor(img)
    if resize:
        t = F.resize(t, [resize], interpolation=interp, antialias=True)
    if crop:
        t = F.center_crop(t, [crop, crop])
    return t


def display_image(x: torch.Tensor, pp: Preprocess) -> np.ndarray:
    """Undo the normalization of a ``(3, H, W)`` input: ``(H, W, 3)`` uint8 for display."""
    if x.ndim == 4:
        x = x[0]
    mean = torch.tensor(pp.mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(pp.std, dtype=x.dtype).view(-1, 1, 1)
    rgb = (x.detach().cpu() * std + mean).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
