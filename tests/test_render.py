"""Rendering is faithful: each drawn pixel is the colormap entry of the scaled value."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from featuremaps import FeatureMapsError, channel_grid, overlay, pca_panel, render_grid
from featuremaps.render import NAN_RGB, colormap_lut, pca_picture


def _expected_rgb(values: np.ndarray, lo: float, hi: float, cmap: str) -> np.ndarray:
    lut = colormap_lut(cmap)
    idx = np.rint((values.astype(np.float64) - lo) / (hi - lo) * 255).astype(int)
    return lut[idx]


@pytest.mark.parametrize("scale", ["channel", "layer"])
def test_grid_pixels_are_the_activations(scale: str) -> None:
    torch.manual_seed(0)
    fmap = torch.randn(10, 7, 5) * torch.arange(1, 11.0)[:, None, None]
    grid = render_grid(fmap, map_size=21, cols=4, scale=scale, cmap="magma")
    arr = np.asarray(grid.image)
    assert grid.factor == 3 and grid.channels == list(range(10))
    for ch, (x0, y0, x1, y1) in zip(grid.channels, grid.boxes, strict=True):
        assert (x1 - x0, y1 - y0) == (15, 21)
        values = fmap[ch].numpy()
        if scale == "channel":
            lo, hi = float(values.min()), float(values.max())
        else:
            lo, hi = float(fmap.min()), float(fmap.max())
        expect = _expected_rgb(values, lo, hi, "magma")
        drawn = arr[y0:y1:3, x0:x1:3]  # one pixel per activation
        np.testing.assert_array_equal(drawn, expect)
        # Each activation fills a 3x3 block.
        block = arr[y0 : y0 + 3, x0 : x0 + 3].reshape(-1, 3)
        assert (block == block[0]).all()


def test_grid_order_top_and_explicit_list() -> None:
    fmap = torch.zeros(5, 4, 4)
    for c, m in enumerate([0.1, 5.0, 0.3, 2.0, -1.0]):
        fmap[c] = m
        fmap[c, 0, 0] = m + 1  # not constant
    assert render_grid(fmap, order="top", max_maps=3).channels == [1, 3, 2]
    assert render_grid(fmap, order=[4, 0]).channels == [4, 0]


def test_grid_nan_is_magenta_and_layout_options() -> None:
    fmap = np.random.default_rng(0).normal(size=(3, 4, 4)).astype(np.float32)
    fmap[1, 2, 3] = np.nan
    grid = render_grid(fmap, map_size=4, labels=True, colorbar=True, cols=3)
    x0, y0, _, _ = grid.boxes[1]
    assert tuple(np.asarray(grid.image)[y0 + 2, x0 + 3]) == NAN_RGB
    assert grid.boxes[0][1] >= 12  # room for the label
    assert grid.image.height > grid.boxes[0][3] + 20  # colour bar below


def test_big_layer_is_one_image() -> None:
    img = channel_grid(torch.rand(512, 7, 7), max_maps=None, map_size=7, pad=1)
    assert isinstance(img, Image.Image)
    assert img.size == (23 * 8 + 1, 23 * 8 + 1)


def test_grid_does_not_modify_input_and_rejects_bad_args() -> None:
    arr = np.random.default_rng(1).normal(size=(4, 3, 3)).astype(np.float32)
    before = arr.copy()
    render_grid(arr, norm="symlog")
    np.testing.assert_array_equal(arr, before)
    with pytest.raises(FeatureMapsError, match="viridis"):
        render_grid(arr, cmap="viridiss")
    with pytest.raises(FeatureMapsError, match="scale"):
        render_grid(arr, scale="global")


def test_overlay_blends_upsampled_map() -> None:
    image = np.full((40, 60, 3), 100, np.uint8)
    heat = np.zeros((4, 6), np.float32)
    same = overlay(image, heat, alpha=0.0)
    np.testing.assert_array_equal(np.asarray(same), image)
    full = np.asarray(overlay(image, np.ones((4, 6), np.float32), alpha=1.0, cmap="gray"))
    assert full.shape == (40, 60, 3) and (full == 255).all()
    rgb = np.zeros((4, 6, 3), np.float32)
    rgb[..., 0] = 1.0
    half = np.asarray(overlay(image, rgb, alpha=0.5))
    np.testing.assert_array_equal(half[20, 30], [178, 50, 50])


def test_pca_picture_and_panel() -> None:
    rgb = np.random.default_rng(0).random((7, 7, 3)).astype(np.float32)
    pic = pca_picture(rgb, 224)
    assert pic.size == (224, 224)
    arr = np.asarray(pic)
    np.testing.assert_array_equal(arr[0, 0], np.rint(rgb[0, 0] * 255).astype(np.uint8))
    panel = pca_panel(np.zeros((224, 224, 3), np.uint8), {"layer1": rgb, "layer2": rgb[..., 0]})
    assert panel.width > 3 * 224 and panel.height > 224
