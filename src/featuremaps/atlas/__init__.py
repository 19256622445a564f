"""Channel atlas over a dataset: the images that excite each channel most.

For every channel of every selected layer, :func:`build_atlas` keeps the ``top`` images
with the highest score (the spatial max of the channel, or its mean; with ``relevance``,
also the top images by the channel's relevance to their own top-1 class), with the location
of the max and a crop of the input region that feeds it. It also gathers, per channel,
the mean activation and the share of images where the channel is dead (all zero), and
fits a per-layer PCA basis over the pixels of the whole dataset (streaming).

The modules, in the order data flows:

* :mod:`~featuremaps.atlas.data`: the dataset (folders, globs, list files), its
  canonical order, the fixed batches and how a batch is decoded;
* :mod:`~featuremaps.atlas.batch`: the engine-neutral step, one batch to partials;
* :mod:`~featuremaps.atlas.engines`: where batches run, behind one ``Engine`` protocol
  (``local``: DataLoader workers and this process; ``ray``: a Ray Data actor pool);
* :mod:`~featuremaps.atlas.state`: the running state and its checkpoint;
* :mod:`~featuremaps.atlas.visuals`: the feature visualizations of ``--visualize``;
* :mod:`~featuremaps.atlas.outputs`: ``atlas.json``, the basis, the crops, the pages;
* :mod:`~featuremaps.atlas.build`: :func:`build_atlas`, which drives them.
"""

from __future__ import annotations

from .batch import AtlasSpec, BatchResult, LayerPartial, process_batch
from .build import AtlasResult, Progress, SkippedImageWarning, build_atlas
from .crops import crop_box
from .data import LoadedBatch, Plan, batch_loader, dataset_paths, fixed_size, load_images
from .engines import Engine, EngineCapabilities, EngineOptions, create_engine
from .outputs import read_crop
from .state import STATE_FILE, CheckpointError
from .visuals import VisualizeSpec

__all__ = [
    "STATE_FILE",
    "AtlasResult",
    "AtlasSpec",
    "BatchResult",
    "CheckpointError",
    "Engine",
    "EngineCapabilities",
    "EngineOptions",
    "LayerPartial",
    "LoadedBatch",
    "Plan",
    "Progress",
    "SkippedImageWarning",
    "VisualizeSpec",
    "batch_loader",
    "build_atlas",
    "create_engine",
    "crop_box",
    "dataset_paths",
    "fixed_size",
    "load_images",
    "process_batch",
    "read_crop",
]
