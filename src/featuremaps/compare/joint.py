"""Two models' maps of one width drawn in one PCA basis, so a colour means one direction.

Two checkpoints of one architecture (a fine-tuned model and its start, two epochs) have
layers whose channels correspond: channel ``c`` of model A and channel ``c`` of model B
are the same unit, trained further. One PCA basis fitted over the pixels of both layers'
maps, with one colour scale, draws both: the same colour is the same direction of the
shared channel space in both pictures, so a change of colour is a change of
representation. (For unrelated architectures of equal width the channels do not
correspond and a joint basis has no such meaning; pictures then use a basis each.)

Example:
    >>> a, b = torch.rand(4, 64, 14, 14), torch.rand(4, 64, 7, 7)
    >>> rgb_a, rgb_b = joint_pca(a, b)
    >>> rgb_a.shape, rgb_b.shape
    ((4, 14, 14, 3), (4, 7, 7, 3))
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ReduceError
from ..pca import PCABasis, pca_basis, pca_rgb


def _pixels_as_map(maps: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(C, N*H*W)``: every pixel as one column."""
    return maps.permute(1, 0, 2, 3).reshape(maps.shape[1], -1)


def joint_basis(maps_a: torch.Tensor, maps_b: torch.Tensor, n_components: int = 3) -> PCABasis:
    """One PCA basis (and colour scale) over every pixel of both ``(N, C, H, W)`` batches.

    The two batches may differ in size and in map size, not in channels.

    Raises:
        ReduceError: the channel counts differ, or a map is not finite.
    """
    if maps_a.ndim != 4 or maps_b.ndim != 4:
        raise ReduceError(
            f"joint PCA takes two (N, C, H, W) batches, got {tuple(maps_a.shape)} and "
            f"{tuple(maps_b.shape)}"
        )
    ca, cb = int(maps_a.shape[1]), int(maps_b.shape[1])
    if ca != cb:
        raise ReduceError(
            f"one PCA basis needs layers of one width; these have {ca} and {cb} channels"
        )
    pixels = torch.cat([_pixels_as_map(maps_a.float()), _pixels_as_map(maps_b.float())], dim=1)
    return pca_basis(pixels[None, :, None, :], n_components)  # (1, C, 1, P): P pixels


def joint_pca(
    maps_a: torch.Tensor, maps_b: torch.Tensor, n_components: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Both batches drawn with :func:`joint_basis`: ``(N_a, H_a, W_a, K)`` and ``(N_b, ...)``.

    Values in [0, 1]: each component min-max scaled over the pixels of both batches.
    """
    basis = joint_basis(maps_a, maps_b, n_components)
    out = []
    for maps in (maps_a, maps_b):
        rgb = pca_rgb(maps.float(), n_components, basis=basis)
        out.append(rgb[None] if maps.shape[0] == 1 else rgb)
    return out[0], out[1]
