"""One PCA basis per layer over all the images of a run (``featuremaps run --pca-joint``).

The run streams (each image is written and dropped before the next is read), so the
joint basis is fitted in a first pass of its own: one forward per image, each layer's
maps appended to a scratch file on disk, then :func:`featuremaps.pca.fit_recipe` reads
them back image by image (exact sums and covariance, exact min/max, every step of the
recipe) in memory that does not grow with the number of images. The scratch files are
deleted when the fit is done.

Example:
    >>> import featuremaps as fm
    >>> from featuremaps.joint import joint_bases
    >>> m = fm.load_model("resnet18", weights="none")
    >>> bases = joint_bases(m, ["a.jpg", "b.jpg"], "layer1")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .capture import LayoutContext
from .models import LoadedModel
from .pca import PCABasis, PCARecipe, PixelBlock, fit_recipe, map_rings


class _MapFile:
    """One layer's maps, image after image, in a scratch file; read back one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh: Any = open(path, "wb")  # noqa: SIM115 (closed by close())
        self.shapes: list[tuple[int, int, int]] = []
        self.offsets: list[int] = []
        self.size = 0

    def append(self, fmap: np.ndarray) -> None:
        data = np.ascontiguousarray(fmap, dtype=np.float32)
        c, h, w = data.shape
        self.fh.write(data.tobytes())
        self.shapes.append((c, h, w))
        self.offsets.append(self.size)
        self.size += data.nbytes

    def blocks(self) -> Iterator[PixelBlock]:
        self.fh.flush()
        for (c, h, w), offset in zip(self.shapes, self.offsets, strict=True):
            x = np.fromfile(self.path, np.float32, count=c * h * w, offset=offset)
            border, edge = map_rings(h, w)
            yield PixelBlock(x.reshape(c, h * w), border, edge)

    def close(self) -> None:
        self.fh.close()


def joint_bases(
    model: LoadedModel,
    images: Sequence[str | os.PathLike[str]],
    layers: str | Sequence[str],
    recipe: PCARecipe | None = None,
    *,
    full: bool = False,
    device: str = "auto",
    layout: LayoutContext | None = None,
    allow_nan: bool = False,
) -> dict[str, PCABasis]:
    """Fit one basis per layer over every pixel of every image (streamed, constant memory).

    Args:
        model: from :func:`featuremaps.load_model`.
        images: files, folders or globs (as :func:`featuremaps.pipeline.analyze`).
        layers: names, globs or presets.
        recipe: the PCA recipe (default: the plain 3-component PCA).
        full, device, layout, allow_nan: as :func:`featuremaps.pipeline.analyze`.

    Returns:
        layer -> the basis; drawing each image with it gives the colours of
        ``pca_basis(all maps stacked)`` (the same mean, components and range).

    Raises:
        FeatureMapsError: bad images or layers, NaN/Inf maps, too few pixels to fit.
    """
    from .pipeline import iter_analyze

    recipe = (recipe or PCARecipe()).validate()
    with tempfile.TemporaryDirectory(prefix="featuremaps-joint-") as tmp:
        files: dict[str, _MapFile] = {}
        try:
            for res in iter_analyze(
                model,
                images,
                layers,
                full=full,
                device=device,
                with_predictions=False,
                layout=layout,
                allow_nan=allow_nan,
            ):
                for name, t in res.maps.items():
                    if name not in files:
                        files[name] = _MapFile(Path(tmp) / f"{len(files)}.bin")
                    files[name].append(t[0].float().numpy())
                del res
            return {name: fit_recipe(f.blocks, recipe) for name, f in files.items()}
        finally:
            for f in files.values():
                f.close()
