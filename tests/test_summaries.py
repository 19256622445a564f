"""Layer summaries: the numbers against numpy, and the JSON form every view shares."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from featuremaps import capture
from featuremaps.summaries import (
    ChannelStats,
    LayerSummary,
    json_float,
    json_floats,
    summarize,
)


def test_json_float_cleans_non_finite_and_rounds() -> None:
    assert json_float(float("nan")) is None
    assert json_float(float("inf")) is None and json_float(-np.inf) is None
    assert json_float(np.float32(0.5)) == 0.5
    assert json_float(1.23456789, 3) == 1.23
    assert json_floats([1.0, np.nan, 2.0]) == [1.0, None, 2.0]
    json.dumps(json_floats([np.nan, np.inf]), allow_nan=False)


def test_layer_summary_numbers_match_numpy(toy, x_small) -> None:
    fm = capture(toy, x_small, ["features.1", "features.4"])
    for index in (0, 1):
        summaries = summarize(fm, index)
        assert list(summaries) == ["features.1", "features.4"]
        for name, s in summaries.items():
            a = fm[name][index].numpy().astype(np.float64)
            flat = a.reshape(a.shape[0], -1)
            assert (s.channels, s.height, s.width) == a.shape
            np.testing.assert_allclose(s.stats.min, flat.min(1), rtol=1e-6)
            np.testing.assert_allclose(s.stats.max, flat.max(1), rtol=1e-6)
            np.testing.assert_allclose(s.stats.mean, flat.mean(1), rtol=1e-5, atol=1e-6)
            dead = (flat == 0).all(1)
            np.testing.assert_array_equal(s.stats.dead, dead)
            assert s.dead_count == int(dead.sum())
            assert s.dead_share == dead.mean()
            assert s.layer_min == flat.min() and s.layer_max == flat.max()
            assert math.isclose(s.layer_mean, a.mean(), rel_tol=1e-5, abs_tol=1e-7)
            assert s.module_type == "ReLU"


def test_to_json_is_the_manifest_entry(toy, x_small) -> None:
    fm = capture(toy, x_small[:1], ["features.3"])
    s = LayerSummary.from_maps("features.3", fm)
    rec = s.to_json()
    info = fm.info["features.3"].to_dict()
    for key, value in info.items():
        assert rec[key] == value
    assert rec["channels"] == 16 and rec["type"] == "Conv2d"
    assert rec["min"] == [float(v) for v in s.stats.min]
    assert rec["mean"] == [float(v) for v in s.stats.mean]
    assert rec["max"] == [float(v) for v in s.stats.max]
    assert rec["dead_share"] == s.dead_share
    json.dumps(rec, allow_nan=False)
    short = s.to_json(digits=3)
    assert short["max"][0] == float(f"{s.stats.max[0]:.3g}")


def test_non_finite_values_become_null_and_layer_bounds_skip_them() -> None:
    m = np.zeros((3, 2, 2), np.float32)
    m[0] = [[1, 2], [3, 4]]
    m[1, 0, 0] = np.nan
    m[2, 1, 1] = np.inf
    stats = ChannelStats.from_map(m)
    js = stats.to_json()
    assert js["min"] == [1.0, None, 0.0] and js["max"] == [4.0, None, None]
    assert js["mean"] == [2.5, None, None] and js["dead"] == [False, False, False]
    s = LayerSummary("x", {"type": "T"}, 3, 2, 2, stats)
    assert s.layer_min == 0.0 and s.layer_max == 4.0 and s.layer_mean == 2.5
    json.dumps(s.to_json(), allow_nan=False)
    sub = stats.take([2, 0])
    assert sub.to_json()["max"] == [None, 4.0]


def test_summaries_do_not_modify_the_maps(toy, x_small) -> None:
    fm = capture(toy, x_small[:1], ["features.0"])
    before = fm["features.0"].clone()
    LayerSummary.from_maps("features.0", fm).to_json()
    torch.testing.assert_close(fm["features.0"], before, rtol=0, atol=0)
