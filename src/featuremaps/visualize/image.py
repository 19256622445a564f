"""The picture's parameterization and the random view each step sees it through.

Olah et al., "Feature Visualization" (Distill, 2017): a Fourier-space image with 1/f
scaling, in a decorrelated colour space, squashed to [0, 1] by a sigmoid; transformation
robustness (padding, jitter, scale, small rotation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import FeatureMapsError

# The square root of ImageNet's colour correlation matrix, as published with "Feature
# Visualization" (Olah et al., 2017): it maps decorrelated colour channels to RGB.
_COLOR_SQRT = torch.tensor(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=torch.float64
)
_COLOR = (_COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()).float()
"""Scaled so that no decorrelated channel has a norm above 1."""

_INIT_STD = 0.01
"""Standard deviation of the initial spectrum: a faint grey start."""

_SPECTRUM_GAIN = 0.25
"""Scales the image made from the spectrum so that Adam's steps of ``lr`` change the
picture gradually (about 1/255 of the sigmoid's range per step at lr 0.05)."""


@dataclass(frozen=True)
class Transforms:
    """The random transformation each step sees the image through.

    The model looks at a ``size`` x ``size`` window of the image padded by ``pad`` pixels
    of grey (``fill``) on each side, shifted by up to ``jitter`` pixels, zoomed by a
    factor drawn from ``scale`` and rotated by up to ``rotate`` degrees, all in one
    bilinear resampling. The defaults are the distribution of Lucid's standard
    transforms (pad 12, jitter 8, scale 0.9-1.1, rotation ±10°, jitter 4) at a fixed
    input size.

    Attributes:
        pad: grey pixels around the image, on each side of the window.
        jitter: largest shift in pixels, along each axis.
        scale: the range of zoom factors.
        rotate: largest rotation in degrees, either way.
        fill: the grey of the padding, in [0, 1].
    """

    pad: float = 6.0
    jitter: float = 6.0
    scale: tuple[float, float] = (0.9, 1.1)
    rotate: float = 10.0
    fill: float = 0.5

    def validate(self) -> None:
        """Raise :class:`FeatureMapsError` on values that make no transformation."""
        lo, hi = self.scale
        if self.pad < 0 or self.jitter < 0 or self.rotate < 0:
            raise FeatureMapsError("transforms: pad, jitter and rotate must be >= 0")
        if not 0 < lo <= hi:
            raise FeatureMapsError(f"transforms: scale {self.scale} must be 0 < low <= high")
        if not 0 <= self.fill <= 1:
            raise FeatureMapsError(f"transforms: fill {self.fill} must lie in [0, 1]")

    @property
    def identity(self) -> bool:
        return self.pad == self.jitter == self.rotate == 0 and self.scale == (1.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pad": self.pad,
            "jitter": self.jitter,
            "scale": list(self.scale),
            "rotate": self.rotate,
            "fill": self.fill,
        }


NO_TRANSFORMS = Transforms(pad=0.0, jitter=0.0, scale=(1.0, 1.0), rotate=0.0)
"""No transformation: the model sees the image as it is."""


class FourierImage:
    """A batch of images as Fourier spectra in a decorrelated colour space."""

    def __init__(self, generators: Sequence[torch.Generator], size: int, device: torch.device):
        self.size = size
        fy = torch.fft.fftfreq(size, dtype=torch.float64)[:, None]
        fx = torch.fft.rfftfreq(size, dtype=torch.float64)[None, :]
        freq = torch.sqrt(fx * fx + fy * fy).clamp(min=1.0 / size)
        # 1/f scaling, with the inverse transform's ortho norm: a flat spectrum of
        # unit variance gives pixels of unit variance summed over 1/f^2
        self.scale = (_SPECTRUM_GAIN / freq).float().to(device)
        shape = (3, size, size // 2 + 1, 2)
        init = [torch.randn(shape, generator=g) * _INIT_STD for g in generators]
        self.spectrum = torch.stack(init).to(device).requires_grad_(True)
        self.color = _COLOR.to(device)

    def rgb(self) -> torch.Tensor:
        """The images ``(B, 3, size, size)`` in [0, 1]."""
        spec = torch.view_as_complex(self.spectrum) * self.scale
        decorrelated = torch.fft.irfft2(spec, s=(self.size, self.size), norm="ortho")
        rgb = torch.einsum("ij,bjhw->bihw", self.color, decorrelated)
        return torch.sigmoid(rgb)


def random_view(
    img: torch.Tensor, tf: Transforms, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Each image through its own random window (see :class:`Transforms`)."""
    if tf.identity:
        return img
    b, _, h, w = img.shape
    side = float(max(h, w))
    thetas = []
    for g in generators:
        u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        zoom = tf.scale[0] + (tf.scale[1] - tf.scale[0]) * u[0]
        angle = math.radians(tf.rotate * (2 * u[1] - 1))
        shift_x = tf.jitter * (2 * u[2] - 1) * 2 / side
        shift_y = tf.jitter * (2 * u[3] - 1) * 2 / side
        extent = (1 + 2 * tf.pad / side) / zoom  # of the window, in image widths
        cos, sin = extent * math.cos(angle), extent * math.sin(angle)
        thetas.append([[cos, -sin, shift_x], [sin, cos, shift_y]])
    theta = torch.tensor(thetas, dtype=img.dtype, device=img.device)
    grid = F.affine_grid(theta, [b, 3, h, w], align_corners=False)
    moved = F.grid_sample(
        img - tf.fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return moved + tf.fill
