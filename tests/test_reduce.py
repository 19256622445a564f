"""Reductions: channel statistics, ranking and scaling (PCA: test_pca.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featuremaps import ReduceError, channel_stats
from featuremaps.reduce import (
    apply_scaling,
    compute_scaling,
    select_channels,
)


def test_channel_stats_and_selection() -> None:
    fmap = torch.zeros(4, 3, 3)
    fmap[1] = 2.0
    fmap[2, 0, 0] = -1.0
    fmap[3] = torch.arange(9.0).reshape(3, 3)
    s = channel_stats(fmap)
    np.testing.assert_array_equal(s["dead"], [True, False, False, False])
    np.testing.assert_allclose(s["mean"], [0, 2, -1 / 9, 4])
    np.testing.assert_allclose(s["min"], [0, 2, -1, 0])
    np.testing.assert_allclose(s["max"], [0, 2, 0, 8])
    assert select_channels(fmap, "top") == [3, 1, 0, 2]
    assert select_channels(fmap, "index", 2) == [0, 1]
    assert select_channels(fmap, [3, 0]) == [3, 0]
    with pytest.raises(ReduceError, match="out of range"):
        select_channels(fmap, [4])


def test_scaling_linear_log_symlog() -> None:
    maps = np.array([[[0.0, 1.0], [2.0, 4.0]], [[-2.0, 0.0], [1.0, 2.0]]])
    lin = apply_scaling(maps, compute_scaling(maps, "linear"))
    np.testing.assert_allclose(lin[0], [[0, 0.25], [0.5, 1]])
    np.testing.assert_allclose(lin[1], [[0, 0.5], [0.75, 1]])
    shared = apply_scaling(maps, compute_scaling(maps, "linear", per_channel=False))
    np.testing.assert_allclose(shared[0], (maps[0] + 2) / 6)
    log = apply_scaling(maps, compute_scaling(maps, "log"))
    # channel 0: positive range 1..4; 0 falls to the bottom; 2 sits at log2/log4 = 0.5
    np.testing.assert_allclose(log[0], [[0, 0], [0.5, 1]])
    sym = apply_scaling(maps, compute_scaling(maps, "symlog"))
    assert sym[1, 0, 1] == pytest.approx(0.5)  # zero sits mid-way for a symmetric range
    const = apply_scaling(np.ones((1, 2, 2)), compute_scaling(np.ones((1, 2, 2))))
    np.testing.assert_array_equal(const, np.zeros((1, 2, 2)))
    with pytest.raises(ReduceError):
        compute_scaling(maps, "cubic")  # type: ignore[arg-type]
