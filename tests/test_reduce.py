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


def _variance_order(maps: np.ndarray) -> list[int]:
    """Channels by population variance over H*W, highest first, ties by index (numpy)."""
    v = maps.reshape(maps.shape[0], -1).astype(np.float64).var(axis=1)
    v = np.where(np.isnan(v), -np.inf, v)
    return np.argsort(-v, kind="stable").tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_variance_order_matches_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # offsets make "top" (by mean) and "variance" disagree; spreads vary per channel
    maps = (rng.normal(size=(12, 5, 7)) * rng.uniform(0.1, 3, (12, 1, 1))).astype(np.float32)
    maps += rng.uniform(-5, 5, (12, 1, 1)).astype(np.float32)
    expected = _variance_order(maps)
    assert select_channels(maps, "variance") == expected
    assert select_channels(torch.from_numpy(maps), "variance", 4) == expected[:4]
    assert select_channels(maps[None], "variance") == expected  # a batch of one
    top = np.argsort(-maps.reshape(12, -1).mean(1), kind="stable").tolist()
    assert select_channels(maps, "top") == top != expected


def test_variance_order_ties_constants_and_nan() -> None:
    maps = np.zeros((5, 2, 2), np.float32)
    maps[1] = [[0, 2], [0, 2]]  # variance 1
    maps[2] = 7.0  # constant: variance 0, ties with channel 0 and keeps index order
    maps[3] = [[0, 2], [2, 0]]  # variance 1 (tie with channel 1)
    maps[4] = [[np.nan, 1], [1, 1]]
    assert select_channels(maps, "variance") == [1, 3, 0, 2, 4] == _variance_order(maps)


def test_select_channels_does_not_modify_input_and_names_bad_orders() -> None:
    maps = np.random.default_rng(3).normal(size=(4, 3, 3)).astype(np.float32)
    before = maps.copy()
    select_channels(maps, "variance")
    np.testing.assert_array_equal(maps, before)
    assert select_channels(maps, "2,0") == [2, 0]
    with pytest.raises(ReduceError, match="channel order 'spread': use index"):
        select_channels(maps, "spread")
