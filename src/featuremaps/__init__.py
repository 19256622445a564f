"""featuremaps: see what a vision network sees at every layer.

Example:
    >>> import featuremaps as fm
    >>> m = fm.load_model("efficientnet_lite0")
    >>> x = fm.preprocess(fm.load_image(fm.sample_image("cat")), m.preprocess)[None]
    >>> maps = fm.capture(m.module, x, "stages")
    >>> rgb = fm.pca_rgb(maps["_blocks.15"])
"""

from __future__ import annotations

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
