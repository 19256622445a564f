"""Rendering is faithful: each drawn pixel is the colour of the scaled value's level."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featuremaps import FeatureMapsError, channel_grid, overlay, pca_panel, render_grid
from featuremaps._files import save_image
from featuremaps.reduce import apply_scaling, compute_scaling
from featuremaps.render import (
    LEVEL_LUT,
    LEVELS,
    NAN_RGB,
    colorize,
    colormap_levels,
    colormap_lut,
    level_index,
    pca_picture,
)

TIE = 1e-3  # within float32 rounding of a tie between two levels, either level is right


def _scaled64(values: np.ndarray, lo: float, hi: float, norm: str) -> np.ndarray:
    """The legend's scaling, written out in float64: the value's place in lo..hi."""
    x = values.astype(np.float64)
    if norm == "log":
        x, lo, hi = np.log10(np.maximum(x, lo)), np.log10(lo), np.log10(hi)
    elif norm == "symlog":
        lin = 0.01 * max(abs(lo), abs(hi))

        def f(v: np.ndarray | float) -> np.ndarray:
            return np.sign(v) * np.log10(1.0 + np.abs(v) / lin)

        x, lo, hi = f(x), float(f(lo)), float(f(hi))
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _expected_levels(values: np.ndarray, lo: float, hi: float, norm: str = "linear"):
    """The level of each value, and where it sits so close to a tie that both are right."""
    t = _scaled64(values, lo, hi, norm) * (LEVELS - 1)
    return np.floor(t + 0.5).astype(int), np.abs(t - np.floor(t) - 0.5) < TIE


@pytest.mark.parametrize(
    ("scale", "norm"),
    [("channel", "linear"), ("layer", "linear"), ("channel", "log"), ("layer", "symlog")],
)
def test_grid_pixels_are_the_activations(scale: str, norm: str) -> None:
    torch.manual_seed(0)
    fmap = torch.randn(10, 7, 5) * torch.arange(1, 11.0)[:, None, None]
    if norm == "log":
        fmap = fmap.abs() + 1e-3
    grid = render_grid(fmap, map_size=21, cols=4, scale=scale, cmap="magma", norm=norm)
    assert grid.image.mode == "P"
    index = np.asarray(grid.image)
    rgb = np.asarray(grid.image.convert("RGB"))
    colours = colormap_levels("magma")
    np.testing.assert_array_equal(colours, colormap_lut("magma")[LEVEL_LUT])
    assert grid.factor == 3 and grid.channels == list(range(10))
    ties = 0
    for ch, (x0, y0, x1, y1) in zip(grid.channels, grid.boxes, strict=True):
        assert (x1 - x0, y1 - y0) == (15, 21)
        values = fmap[ch].numpy()
        if scale == "channel":
            lo, hi = float(values.min()), float(values.max())
        else:
            lo, hi = float(fmap.min()), float(fmap.max())
        expect, tie = _expected_levels(values, lo, hi, norm)
        drawn = index[y0:y1:3, x0:x1:3].astype(int)  # one pixel per activation
        assert ((drawn == expect) | (tie & (np.abs(drawn - expect) <= 1))).all()
        ties += int(tie.sum())
        # what is seen: the colour of the level, everywhere but at a float32 tie
        seen = rgb[y0:y1:3, x0:x1:3]
        np.testing.assert_array_equal(seen[~tie], colours[expect[~tie]])
        # Each activation fills a 3x3 block.
        block = rgb[y0 : y0 + 3, x0 : x0 + 3].reshape(-1, 3)
        assert (block == block[0]).all()
    assert ties <= 3  # ties are rare: the comparison above is exact nearly everywhere


def test_levels_colorize_and_the_grid_agree() -> None:
    """The grid, colorize (the viewer's channel view) and level_index: the same pixels."""
    assert LEVELS <= 252 and LEVEL_LUT[0] == 0 and LEVEL_LUT[-1] == 255
    s = np.array([0.0, 0.5 / (LEVELS - 1) - 1e-6, 0.5 / (LEVELS - 1) + 1e-6, 1.0, np.nan])
    np.testing.assert_array_equal(level_index(s)[:4], [0, 0, 1, LEVELS - 1])
    rgb = colorize(s, "viridis")
    np.testing.assert_array_equal(rgb[:4], colormap_levels("viridis")[[0, 0, 1, LEVELS - 1]])
    assert tuple(rgb[4]) == NAN_RGB
    maps = np.random.default_rng(2).gamma(1.0, size=(3, 9, 6)).astype(np.float32)
    grid = render_grid(maps, map_size=1, cols=3, norm="symlog")
    canvas = np.asarray(grid.image.convert("RGB"))
    scaled = apply_scaling(maps, compute_scaling(maps, "symlog"))
    for i, (x0, y0, x1, y1) in enumerate(grid.boxes):
        np.testing.assert_array_equal(canvas[y0:y1, x0:x1], colorize(scaled[i], "viridis"))


def test_grid_order_top_and_explicit_list() -> None:
    fmap = torch.zeros(5, 4, 4)
    for c, m in enumerate([0.1, 5.0, 0.3, 2.0, -1.0]):
        fmap[c] = m
        fmap[c, 0, 0] = m + 1  # not constant
    assert render_grid(fmap, order="top", max_maps=3).channels == [1, 3, 2]
    assert render_grid(fmap, order=[4, 0]).channels == [4, 0]
    assert render_grid(fmap, order="4,0").channels == [4, 0]


def test_grid_order_variance_draws_the_most_varied_channels_first() -> None:
    rng = np.random.default_rng(5)
    spread = np.array([0.5, 4.0, 1.0, 0.1, 2.0, 3.0])
    fmap = rng.normal(size=(6, 4, 5)) * spread[:, None, None] + 10 - spread[:, None, None]
    fmap = fmap.astype(np.float32)
    var = fmap.reshape(6, -1).astype(np.float64).var(axis=1)
    expected = np.argsort(-var, kind="stable")[:4].tolist()
    grid = render_grid(fmap, order="variance", max_maps=4, map_size=4, cols=2)
    assert grid.channels == expected
    index = np.asarray(grid.image)
    for ch, (x0, y0, x1, y1) in zip(grid.channels, grid.boxes, strict=True):
        values = fmap[ch]
        expect, tie = _expected_levels(values, float(values.min()), float(values.max()))
        drawn = index[y0:y1, x0:x1].astype(int)
        assert ((drawn == expect) | (tie & (np.abs(drawn - expect) <= 1))).all()


def test_grid_nan_is_magenta_and_layout_options() -> None:
    fmap = np.random.default_rng(0).normal(size=(3, 4, 4)).astype(np.float32)
    fmap[1, 2, 3] = np.nan
    fmap[2, 0, 1] = np.inf
    grid = render_grid(fmap, map_size=4, labels=True, colorbar=True, cols=3)
    rgb = np.asarray(grid.image.convert("RGB"))
    x0, y0, _, _ = grid.boxes[1]
    assert tuple(rgb[y0 + 2, x0 + 3]) == NAN_RGB
    x0, y0, _, _ = grid.boxes[2]
    assert tuple(rgb[y0, x0 + 1]) == NAN_RGB
    assert (rgb == NAN_RGB).all(-1).sum() == 2  # nothing else is magenta
    # the finite values keep their scaling: NaN and Inf are left out of the bounds
    finite = fmap[2][np.isfinite(fmap[2])]
    assert grid.scaling.vmax[2] == finite.max() and grid.scaling.vmin[2] == finite.min()
    assert grid.boxes[0][1] >= 12  # room for the label
    assert grid.image.height > grid.boxes[0][3] + 20  # colour bar below


def test_labels_and_colorbar_are_drawn_with_the_levels_and_legible_text() -> None:
    fmap = np.random.default_rng(0).normal(size=(6, 5, 5)).astype(np.float32)
    grid = render_grid(fmap, map_size=20, labels=True, colorbar=True, cols=3, cmap="gray")
    index = np.asarray(grid.image)
    rgb = np.asarray(grid.image.convert("RGB"))
    bottom = max(b[3] for b in grid.boxes)
    # the colour bar: each column is the level of its place in 0..1, as the maps are drawn
    bar_y = next(y for y in range(bottom, index.shape[0]) if (index[y, 2:12] < LEVELS).all())
    width = min(index.shape[1] - 4, 256)
    np.testing.assert_array_equal(
        index[bar_y, 2 : 2 + width], level_index(np.linspace(0, 1, width))
    )
    assert (index[bar_y : bar_y + 10, 2 : 2 + width] == index[bar_y, 2 : 2 + width]).all()
    # text: dark, antialiased shades of grey over the white background, and only there
    label = rgb[grid.boxes[4][1] - 12 : grid.boxes[4][1], grid.boxes[4][0] : grid.boxes[4][2]]
    greys = label[(label != 255).any(-1)]
    assert len(greys) > 10 and (greys[:, 0] == greys[:, 1]).all() and greys.min() == 0
    legend = rgb[bar_y + 10 :]
    assert (legend == 0).all(-1).sum() > 20
    for x0, y0, x1, y1 in grid.boxes:  # no text on a map
        assert (index[y0:y1, x0:x1] < LEVELS).all()


@pytest.mark.parametrize("side", [56, 28])  # drawn as they are (run-length zlib), upsampled
def test_grid_saves_as_a_small_palette_png(tmp_path: Path, side: int) -> None:
    fmap = torch.randn(64, side, side)
    grid = render_grid(fmap, colorbar=True, labels=True)
    assert grid.factor == 64 // side
    save_image(grid.image, tmp_path / "g.png", optimize=False, compress_level=3)
    back = Image.open(tmp_path / "g.png")
    assert back.mode == "P"
    np.testing.assert_array_equal(np.asarray(back), np.asarray(grid.image))
    np.testing.assert_array_equal(np.asarray(back.convert("RGB")), grid.image.convert("RGB"))
    rgb_png = io.BytesIO()
    grid.image.convert("RGB").save(rgb_png, format="PNG", compress_level=3)
    assert (tmp_path / "g.png").stat().st_size < rgb_png.tell()
    save_image(grid.image, tmp_path / "g.jpg")  # JPEG has no palette: converted
    assert Image.open(tmp_path / "g.jpg").mode == "RGB"
    assert not list(tmp_path.glob("*.part"))


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
