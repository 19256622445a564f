"""What a channel wants to see: feature visualization by optimization.

An image is optimized to maximize an objective (a channel's mean, a neuron, a class
logit, a layer's energy), with the parameterization of Olah et al., "Feature
Visualization" (Distill, 2017), that keeps the pictures readable:

* the image lives in Fourier space, each frequency scaled by ``1/f`` so that the
  optimizer moves low frequencies as easily as high ones;
* its three channels live in a decorrelated colour space, mapped to RGB by the square
  root of ImageNet's colour correlation matrix, then squashed to [0, 1] by a sigmoid;
* every step sees it through a random transformation (padding, jitter, scale, small
  rotation), so that what survives is robust structure, not adversarial noise;
* then the model's own preprocessing (its mean and standard deviation).

The forward stops after the deepest layer an objective reads, no parameter gradient is
computed or kept, and the model leaves as it came: hooks removed, train/eval modes and
``requires_grad`` restored, on success and on failure. On the CPU a seed gives the same
pictures every time. Each image's initial spectrum and transformations come from its own
generator, seeded by the seed and the objective, so a picture does not depend on what
else is in the batch.

``objectives`` parses what to maximize, ``image`` holds the parameterization and the
random view, ``plan`` checks objectives against the model and reads them from module
outputs, ``optimize`` runs the loop, ``results`` holds the pictures and writes them.

Example:
    >>> import featuremaps as fm
    >>> m = fm.load_model("resnet18", weights="none")
    >>> vis = fm.visualize(m, ["channel:layer2:0-1"], steps=4, size=64)
    >>> [v.image.shape for v in vis]
    [(64, 64, 3), (64, 64, 3)]
"""

from __future__ import annotations

from .image import NO_TRANSFORMS, Transforms
from .objectives import Objective, ObjectiveError, ObjectiveKind, parse_objectives
from .optimize import visualize
from .results import Visualization, Visualizations

__all__ = [
    "NO_TRANSFORMS",
    "Objective",
    "ObjectiveError",
    "ObjectiveKind",
    "Transforms",
    "Visualization",
    "Visualizations",
    "parse_objectives",
    "visualize",
]
