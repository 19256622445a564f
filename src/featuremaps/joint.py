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
    >>> runs = fm.pipeline.iter_analyze(m, ["a.jpg", "b.jpg"], "layer1")  # doctest: +SKIP
    >>> bases = joint_bases(r.maps for r in runs)  # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    maps_per_image: Iterable[Mapping[str, torch.Tensor]],
    recipe: PCARecipe | None = None,
) -> dict[str, PCABasis]:
    """Fit one basis per layer over every pixel of every image (streamed, constant memory).

    Args:
        maps_per_image: one ``{layer: (1, C, H, W)}`` mapping per image, consumed one at a
            time (``run`` passes the maps of :func:`featuremaps.pipeline.iter_analyze`).
        recipe: the PCA recipe (default: the plain 3-component PCA).

    Returns:
        layer -> the basis; drawing each image with it gives the colours of
        ``pca_basis(all maps stacked)`` (the same mean, components and range).

    Raises:
        FeatureMapsError: NaN/Inf maps, too few pixels to fit.
    """
    recipe = (recipe or PCARecipe()).validate()
    with tempfile.TemporaryDirectory(prefix="featuremaps-joint-") as tmp:
        files: dict[str, _MapFile] = {}
        try:
            for maps in maps_per_image:
                for name, t in maps.items():
                    if name not in files:
                        files[name] = _MapFile(Path(tmp) / f"{len(files)}.bin")
                    files[name].append(t[0].float().numpy())
                del maps
            return {name: fit_recipe(f.blocks, recipe) for name, f in files.items()}
        finally:
            for f in files.values():
                f.close()
