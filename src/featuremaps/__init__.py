"""featuremaps: see what a vision network sees at every layer.

Example:
    >>> import featuremaps as fm
    >>> m = fm.load_model("efficientnet_lite0")
    >>> x = fm.preprocess(fm.load_image(fm.sample_image("cat")), m.preprocess)[None]
    >>> maps = fm.capture(m.module, x, "stages")
    >>> rgb = fm.pca_rgb(maps["_blocks.15"])

The public names are imported on first use (PEP 562), so ``import featuremaps`` and the
command line's ``--help`` do not pay for PyTorch, NumPy stacks or matplotlib; the first
``fm.load_model`` (or any other name) imports the module that defines it.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what mypy and IDEs see; at run time __getattr__ imports on demand
    from .atlas import AtlasResult, SkippedImageWarning, build_atlas
    from .capture import Capture, FeatureMaps, LayerInfo, LayoutContext, capture, list_layers
    from .compare import CKAAccumulator, CompareResult, build_compare, compare_models, debiased_cka
    from .errors import FeatureMapsError, ImageError, LayerError, ModelError, ReduceError
    from .images import display_image, expand_inputs, load_image, preprocess, sample_image
    from .models import LoadedModel, Preprocess, available_models, load_model
    from .notebook import Explorer, explore
    from .options import RenderOptions
    from .pca import PCARecipe, PCAResult, pca_fit
    from .pipeline import analyze, run
    from .reduce import PCAAccumulator, PCABasis, channel_stats, pca_basis, pca_rgb
    from .relevance import Relevance, relevance
    from .render import channel_grid, overlay, pca_panel, render_grid, show
    from .video import VideoError, VideoResult, video_pca
    from .visualize import Objective, Transforms, Visualization, Visualizations, visualize

__version__ = "0.1.0"

# Where each public name is defined: its submodule, relative to this package.
_SOURCES: dict[str, tuple[str, ...]] = {
    ".atlas": ("AtlasResult", "SkippedImageWarning", "build_atlas"),
    ".capture": ("Capture", "FeatureMaps", "LayerInfo", "LayoutContext", "capture", "list_layers"),
    ".compare": (
        "CKAAccumulator",
        "CompareResult",
        "build_compare",
        "compare_models",
        "debiased_cka",
    ),
    ".errors": ("FeatureMapsError", "ImageError", "LayerError", "ModelError", "ReduceError"),
    ".images": ("display_image", "expand_inputs", "load_image", "preprocess", "sample_image"),
    ".models": ("LoadedModel", "Preprocess", "available_models", "load_model"),
    ".notebook": ("Explorer", "explore"),
    ".options": ("RenderOptions",),
    ".pca": ("PCARecipe", "PCAResult", "pca_fit"),
    ".pipeline": ("analyze", "run"),
    ".reduce": ("PCAAccumulator", "PCABasis", "channel_stats", "pca_basis", "pca_rgb"),
    ".relevance": ("Relevance", "relevance"),
    ".render": ("channel_grid", "overlay", "pca_panel", "render_grid", "show"),
    ".video": ("VideoError", "VideoResult", "video_pca"),
    ".visualize": ("Objective", "Transforms", "Visualization", "Visualizations", "visualize"),
}
_MODULE_OF: dict[str, str] = {name: mod for mod, names in _SOURCES.items() for name in names}


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use, and keep the value.

    A submodule (``featuremaps.capture``) shadows its own public function of the same
    name once imported, so the value is written into the package's namespace here: every
    later look-up, and ``from featuremaps import capture``, finds the function.
    """
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# Public functions that share their name with the submodule defining them.
_SHADOWED = frozenset(name for name, mod in _MODULE_OF.items() if mod == f".{name}")


class _Package(types.ModuleType):
    """This package's module type: a public function keeps its name over its submodule.

    Importing ``featuremaps.capture`` makes Python write the submodule into the package
    as ``featuremaps.capture``; ``fm.capture`` must stay the function (as it was when
    every name was imported eagerly), so the function is written instead.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "AtlasResult",
    "CKAAccumulator",
    "Capture",
    "CompareResult",
    "Explorer",
    "FeatureMaps",
    "FeatureMapsError",
    "ImageError",
    "LayerError",
    "LayerInfo",
    "LayoutContext",
    "LoadedModel",
    "ModelError",
    "Objective",
    "PCAAccumulator",
    "PCABasis",
    "PCARecipe",
    "PCAResult",
    "Preprocess",
    "ReduceError",
    "Relevance",
    "RenderOptions",
    "SkippedImageWarning",
    "Transforms",
    "VideoError",
    "VideoResult",
    "Visualization",
    "Visualizations",
    "analyze",
    "available_models",
    "build_atlas",
    "build_compare",
    "capture",
    "channel_grid",
    "channel_stats",
    "compare_models",
    "debiased_cka",
    "display_image",
    "expand_inputs",
    "explore",
    "list_layers",
    "load_image",
    "load_model",
    "overlay",
    "pca_basis",
    "pca_fit",
    "pca_panel",
    "pca_rgb",
    "preprocess",
    "relevance",
    "render_grid",
    "run",
    "sample_image",
    "show",
    "video_pca",
    "visualize",
]
