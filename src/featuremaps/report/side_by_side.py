"""``featuremaps report --compare MODEL_B``: a second model's PCA pictures beside the first's.

Layers are paired in selection order (the i-th layer of each model's ``--layers``). For a
pair of equal width, one PCA basis and one colour scale are fitted over the pixels of
both maps (:func:`featuremaps.pca.joint_pca`), so a colour means the same direction
of the shared channel space in both pictures; a pair of different widths is listed with
the reason it has no shared picture.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Sequence
from typing import Any

import torch

from ..capture import LayoutContext
from ..errors import ReduceError
from ..models import LoadedModel, load_model
from ..pca import joint_pca
from ..pipeline import ImageResult, iter_analyze
from ..render import pca_picture
from .html import data_url

__all__ = ["compare_json", "second_results"]


def second_results(
    spec: str | LoadedModel,
    weights: str,
    paths: Sequence[str | os.PathLike[str]],
    layers: str | Sequence[str],
    *,
    full: bool,
    device: str,
    layout: LayoutContext | None,
) -> Generator[ImageResult, None, None]:
    """Model B's maps of the same images, one image at a time (no predictions)."""
    loaded = spec if isinstance(spec, LoadedModel) else load_model(spec, weights)
    yield from iter_analyze(
        loaded,
        paths,
        layers,
        full=full,
        device=device,
        with_predictions=False,
        layout=layout,
    )


def compare_json(a: ImageResult, b: ImageResult, model_b: str, weights_b: str) -> dict[str, Any]:
    """Per layer of A: model B's paired layer and both PCA pictures in one basis (PNG at
    map resolution, each component min-max scaled over the pixels of both maps)."""

    names_b = list(b.maps)
    layers: dict[str, Any] = {}
    for i, name in enumerate(a.maps):
        if i >= len(names_b):
            layers[name] = {"layer_b": None, "note": f"{model_b} has fewer layers selected"}
            continue
        nb = names_b[i]
        ta = a.maps[name][:1].detach().to("cpu", torch.float32)
        tb = b.maps[nb][:1].detach().to("cpu", torch.float32)
        rec: dict[str, Any] = {"layer_b": nb, "channels": [int(ta.shape[1]), int(tb.shape[1])]}
        try:
            rgb_a, rgb_b = joint_pca(ta, tb, 3)
        except ReduceError as exc:
            rec["note"] = str(exc)
        else:
            for key, rgb in (("pca_a", rgb_a[0]), ("pca_b", rgb_b[0])):
                rec[key] = data_url(pca_picture(rgb, size=max(rgb.shape[:2])), "PNG")
        layers[name] = rec
    return {"model": model_b, "weights": weights_b, "layers": layers}
