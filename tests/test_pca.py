"""PCA: against a reference, determinism, degenerate input, streaming, saved bases, and the
DINO-style recipe (foreground, whitening, outliers, colours) on real models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from featuremaps import PCAAccumulator, ReduceError, pca_basis, pca_rgb
from featuremaps.pca import PCARecipe, load_bases, pca_fit, save_bases


def _structured(c: int = 32, h: int = 12, w: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(4, c, generator=g) * torch.tensor([5.0, 3.0, 2.0, 1.0])[:, None]
    coef = torch.randn(h * w, 4, generator=g)
    x = coef @ basis + 0.05 * torch.randn(h * w, c, generator=g)
    return x.T.reshape(c, h, w).contiguous()


def test_pca_matches_sklearn_subspace_and_projection() -> None:
    fmap = _structured()
    c = fmap.shape[0]
    flat = fmap.reshape(c, -1).T.double().numpy()
    ref = PCA(n_components=3, svd_solver="full").fit(flat)
    basis = pca_basis(fmap, 3)
    cos = np.abs(np.sum(basis.components * ref.components_, axis=1))
    np.testing.assert_allclose(cos, 1.0, atol=1e-6)
    np.testing.assert_allclose(basis.explained, ref.explained_variance_, rtol=1e-6)
    # The picture is the projection, each component min-max scaled.
    rgb = pca_rgb(fmap)
    proj = (flat - flat.mean(0)) @ basis.components.T
    expect = (proj - proj.min(0)) / (proj.max(0) - proj.min(0))
    np.testing.assert_allclose(rgb.reshape(-1, 3), expect, atol=1e-5)
    assert rgb.shape == (12, 10, 3) and rgb.dtype == np.float32
    assert rgb.min() == 0.0 and rgb.max() == 1.0


def test_pca_sign_is_deterministic() -> None:
    fmap = _structured()
    b = pca_basis(fmap)
    idx = np.abs(b.components).argmax(1)
    assert (b.components[np.arange(3), idx] > 0).all()
    # Same colours for float64 input, a numpy array and a (1, C, H, W) batch.
    a = pca_rgb(fmap)
    np.testing.assert_allclose(pca_rgb(fmap.double()), a, atol=1e-6)
    np.testing.assert_allclose(pca_rgb(fmap.numpy()[None]), a, atol=1e-6)


def test_pca_does_not_modify_input() -> None:
    fmap = _structured()
    copy = fmap.clone()
    arr = fmap.numpy().copy()
    pca_rgb(fmap)
    pca_rgb(arr)
    assert torch.equal(fmap, copy)
    np.testing.assert_array_equal(arr, copy.numpy())


def test_pca_one_component_gives_gray_map() -> None:
    out = pca_rgb(_structured(), 1)
    assert out.shape == (12, 10)


def test_pca_degenerate_inputs_are_defined() -> None:
    const = torch.full((8, 5, 5), 3.0)
    np.testing.assert_array_equal(pca_rgb(const), np.zeros((5, 5, 3), np.float32))
    one_pixel = torch.randn(8, 1, 1)
    np.testing.assert_array_equal(pca_rgb(one_pixel), np.zeros((1, 1, 3), np.float32))
    two_channels = _structured(c=2)
    out = pca_rgb(two_channels)
    assert out.shape == (12, 10, 3)
    assert (out[..., 2] == 0).all() and out[..., 0].max() == 1.0
    bad = _structured()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ReduceError, match="NaN"):
        pca_rgb(bad)
    with pytest.raises(ReduceError, match=r"\(C, H, W\)"):
        pca_rgb(torch.randn(5, 5))


def test_pca_large_offsets_keep_the_float64_subspace() -> None:
    """Means far above the spread: the float32 scatter alone would cancel to noise."""
    fmap = _structured() * 1e-3 + torch.linspace(100.0, 400.0, 32)[:, None, None]
    flat = fmap.reshape(32, -1).T.double().numpy()
    ref = PCA(n_components=3, svd_solver="full").fit(flat)
    basis = pca_basis(fmap, 3)
    cos = np.abs(np.sum(basis.components * ref.components_, axis=1))
    np.testing.assert_allclose(cos, 1.0, atol=1e-4)
    np.testing.assert_allclose(basis.explained, ref.explained_variance_, rtol=1e-3)


def test_pca_strided_input_and_bad_values() -> None:
    fmap = _structured()
    strided = fmap.permute(0, 2, 1).contiguous().permute(0, 2, 1)  # same values, not contiguous
    assert not strided.is_contiguous()
    np.testing.assert_allclose(pca_rgb(strided), pca_rgb(fmap), atol=1e-6)
    inf = fmap.clone()
    inf[3, 2, 1] = float("inf")
    with pytest.raises(ReduceError, match="1 NaN/Inf value"):
        pca_rgb(inf)
    huge = fmap.clone()
    huge[0, 0, 0] = 1e30  # finite, but its square overflows float32
    with pytest.raises(ReduceError, match="too large"):
        pca_basis(huge)
    basis = pca_basis(fmap)
    with pytest.raises(ReduceError, match="NaN/Inf"):
        basis.to_rgb(inf)
    with pytest.raises(ReduceError, match="32 channels"):
        basis.to_rgb(fmap[:5])


def test_joint_basis_over_batch_shares_colours() -> None:
    a = _structured(seed=0)
    b = a.clone()
    b[:, :6] = _structured(seed=1)[:, :6]  # differ in the top rows only
    batch = torch.stack([a, b])
    out = pca_rgb(batch)
    assert out.shape == (2, 12, 10, 3)
    # Pixels equal in both images get equal colours under the joint basis.
    np.testing.assert_allclose(out[0, 6:], out[1, 6:], atol=1e-6)
    separate = pca_rgb(b)
    assert not np.allclose(separate[6:], out[1, 6:], atol=1e-3)


def test_streaming_accumulator_equals_one_shot_fit() -> None:
    maps = [_structured(seed=s) for s in range(4)]
    acc = PCAAccumulator(32)
    for m in maps[:2]:
        acc.update(m)
    other = PCAAccumulator(32)
    other.update(torch.stack(maps[2:]))
    acc.merge(other)
    streamed = acc.fit(3)
    direct = pca_basis(torch.stack(maps), 3)
    np.testing.assert_allclose(streamed.mean, direct.mean, atol=1e-9)
    np.testing.assert_allclose(streamed.components, direct.components, atol=1e-6)
    np.testing.assert_allclose(streamed.hi, 3 * np.sqrt(streamed.explained))
    # It sums in float64: large finite float32 values are fine, NaN is named.
    big = PCAAccumulator(8)
    big.update(torch.rand(2, 8, 8, 8) * 1e37 + 1e37)
    assert big.n == 128 and np.isfinite(big.sum.numpy()).all()
    bad = torch.zeros(8, 4, 4)
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ReduceError, match="1 NaN/Inf value"):
        big.update(bad)


def test_bases_roundtrip(tmp_path) -> None:
    b = pca_basis(_structured())
    path = tmp_path / "bases.npz"
    save_bases({"layer1": b, "features.3": b}, path)
    loaded = load_bases(path)
    assert set(loaded) == {"layer1", "features.3"}
    np.testing.assert_array_equal(loaded["layer1"].components, b.components)
    np.testing.assert_array_equal(
        pca_rgb(_structured(seed=3), basis=loaded["features.3"]),
        pca_rgb(_structured(seed=3), basis=b),
    )
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ReduceError, match="atlas"):
        load_bases(tmp_path / "junk.npz")


# -- the DINO recipe --------------------------------------------------------------------------


def _numpy_pca(x: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference PCA of ``(N, C)`` float64 pixels: mean, sign-fixed components, variances."""
    mean = x.mean(0)
    vals, vecs = np.linalg.eigh(np.cov(x, rowvar=False))
    order = np.argsort(vals)[::-1][:k]
    comps = vecs[:, order].T
    comps *= np.sign(comps[np.arange(k), np.abs(comps).argmax(1)])[:, None]
    return mean, comps, vals[order]


def _planted(seed: int = 0) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    fmap = _structured(c=32, h=12, w=10, seed=seed)
    spots = [(1, 2), (5, 7), (10, 0)]
    for r, c in spots:
        fmap[:, r, c] = 60.0 * fmap[:, r, c] / fmap[:, r, c].norm() * fmap.norm(dim=0).median()
    return fmap, spots


def test_planted_outliers_leave_the_fit_and_the_colour_range() -> None:
    fmap, spots = _planted()
    res = pca_fit(fmap, outliers=6)
    # Independent recomputation: norms beyond median + 6 MAD, then PCA and min-max range
    # over the other pixels only.
    flat = fmap.reshape(32, -1).T.double().numpy()
    norms = np.linalg.norm(flat, axis=1)
    med = np.median(norms)
    far = norms > med + 6 * np.median(np.abs(norms - med))
    np.testing.assert_array_equal(res.outliers[0].reshape(-1), far)
    assert {(0, r, c) for r, c in spots} <= set(res.outlier_positions)
    assert res.outlier_count == far.sum() and res.summary()["outliers"] == far.sum()
    clean = ~far.reshape(12, 10)
    mean, comps, _ = _numpy_pca(flat[clean.reshape(-1)])
    np.testing.assert_allclose(np.abs((res.basis.components * comps).sum(1)), 1.0, atol=1e-6)
    proj = (flat - mean) @ comps.T
    lo, hi = proj[clean.reshape(-1)].min(0), proj[clean.reshape(-1)].max(0)
    expect = np.clip((proj - lo) / (hi - lo), 0, 1).reshape(12, 10, 3)
    np.testing.assert_allclose(res.rgb[0], expect, atol=1e-4)
    # The outliers are clipped, the others span the full range; without the option the
    # planted tokens take the extremes and squeeze everything else.
    assert res.rgb[0][clean].min() == 0.0 and res.rgb[0][clean].max() == 1.0
    plain = pca_rgb(fmap)
    assert np.ptp(plain[clean], axis=0).max() < 0.5
    assert np.ptp(res.rgb[0][clean], axis=0).min() == 1.0


def test_whitening_gives_unit_variance_on_the_fitted_pixels() -> None:
    fmap, _ = _planted(seed=2)
    for kw in ({}, {"outliers": 6.0}, {"foreground": "auto"}):
        res = pca_fit(fmap, whiten=True, **kw)
        fitted = res.foreground[0] & ~res.outliers[0]
        y = res.basis.project(fmap)[fitted]
        np.testing.assert_allclose(y.var(0, ddof=1), 1.0, rtol=1e-4)
        np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-4)
    # Whitening does not change min-max colours (each component is scaled to its range).
    np.testing.assert_allclose(pca_rgb(fmap, whiten=True), pca_rgb(fmap), atol=1e-5)


def test_sigmoid_colours_match_the_formula() -> None:
    fmap = _structured()
    flat = fmap.reshape(32, -1).T.double().numpy()
    mean, comps, vals = _numpy_pca(flat)
    z = (flat - mean) @ comps.T
    white = pca_rgb(fmap, whiten=True, colors="sigmoid").reshape(-1, 3)
    np.testing.assert_allclose(white, 1 / (1 + np.exp(-2 * z / np.sqrt(vals))), atol=1e-5)
    plain = pca_rgb(fmap, colors="sigmoid").reshape(-1, 3)
    np.testing.assert_allclose(plain, 1 / (1 + np.exp(-2 * z / np.sqrt(vals[0]))), atol=1e-5)


def test_auto_foreground_on_a_synthetic_object_and_a_user_mask() -> None:
    g = torch.Generator().manual_seed(3)
    bg, fg = torch.randn(24, generator=g) * 2, torch.randn(24, generator=g) * 2
    fmap = bg[:, None, None] + 0.3 * torch.randn(24, 16, 16, generator=g)
    fmap[:, 4:11, 5:13] = fg[:, None, None] + 0.3 * torch.randn(24, 7, 8, generator=g)
    box = np.zeros((16, 16), bool)
    box[4:11, 5:13] = True
    res = pca_fit(fmap, foreground="auto")
    np.testing.assert_array_equal(res.foreground[0], box)
    assert (res.rgb[0][~box] == 0).all() and res.rgb[0][box].max() == 1.0
    # The refit uses the object's pixels only: its basis is the PCA of the box.
    flat = fmap.permute(1, 2, 0).double().numpy()[box]
    mean, comps, _ = _numpy_pca(flat)
    np.testing.assert_allclose(res.basis.mean, mean, atol=1e-5)
    np.testing.assert_allclose(np.abs((res.basis.components * comps).sum(1)), 1.0, atol=1e-5)
    # A user mask at another resolution does the same; a wrong shape is named.
    big = torch.from_numpy(box.repeat(4, 0).repeat(4, 1))
    masked = pca_fit(fmap, foreground=big)
    np.testing.assert_array_equal(masked.foreground[0], box)
    np.testing.assert_allclose(masked.rgb, res.rgb, atol=1e-5)
    with pytest.raises(ReduceError, match="mask has shape"):
        pca_fit(fmap, foreground=np.ones((2, 3, 16, 16)))


def test_edge_ring_follows_the_pixel_inside_it() -> None:
    """An object running into the frame keeps its edge; a strip along the edge over the
    background (zero padding's artifact in CNNs) is not foreground."""
    g = torch.Generator().manual_seed(4)
    bg, fg = torch.randn(24, generator=g) * 2, torch.randn(24, generator=g) * 2
    fmap = bg[:, None, None] + 0.3 * torch.randn(24, 16, 16, generator=g)
    fmap[:, 0:7, 5:13] = fg[:, None, None] + 0.3 * torch.randn(24, 7, 8, generator=g)
    fmap[:, 15, :] = fg[:, None] + 0.3 * torch.randn(24, 16, generator=g)  # a strip
    box = np.zeros((16, 16), bool)
    box[0:7, 5:13] = True
    res = pca_fit(fmap, foreground="auto")
    np.testing.assert_array_equal(res.foreground[0], box)


def test_recipe_options_are_checked() -> None:
    fmap = _structured()
    with pytest.raises(ReduceError, match="foreground 'yes'"):
        pca_rgb(fmap, foreground="yes")  # type: ignore[arg-type]
    with pytest.raises(ReduceError, match="colors 'rainbow'"):
        pca_rgb(fmap, colors="rainbow")  # type: ignore[arg-type]
    with pytest.raises(ReduceError, match="positive number of MADs"):
        pca_rgb(fmap, outliers=0)
    with pytest.raises(ReduceError, match="at least 1"):
        PCARecipe(n_components=0).validate()


def test_one_basis_across_images_saved_and_applied_to_another_model(tmp_path) -> None:
    fmap, _ = _planted(seed=4)
    other = _structured(seed=5)
    basis = pca_basis(torch.stack([fmap, other]), foreground="auto", outliers=6, whiten=True)
    joint = pca_fit(torch.stack([fmap, other]), foreground="auto", outliers=6, whiten=True)
    np.testing.assert_array_equal(joint.rgb[1], basis.to_rgb(other))
    path = tmp_path / "bases.npz"
    save_bases({"blocks.3": basis}, path)
    loaded = load_bases(path)["blocks.3"]
    assert loaded.whiten and loaded.colors == "minmax" and loaded.norm_limit == basis.norm_limit
    assert loaded.fg_axis is not None and basis.fg_axis is not None
    np.testing.assert_array_equal(loaded.fg_axis, basis.fg_axis)
    # A second "checkpoint": another model's map of the same width draws with the basis.
    third = _structured(seed=6)
    np.testing.assert_array_equal(pca_fit(third, basis=loaded).rgb, pca_fit(third, basis=basis).rgb)
    with pytest.raises(ReduceError, match="basis is for 32 channels, the map has 16"):
        pca_fit(third[:16], basis=loaded)


def test_sign_and_basis_are_stable_across_runs_and_orders() -> None:
    fmap, _ = _planted(seed=7)
    a = pca_fit(fmap, foreground="auto", outliers=6, whiten=True, colors="sigmoid")
    b = pca_fit(fmap.clone(), foreground="auto", outliers=6, whiten=True, colors="sigmoid")
    np.testing.assert_array_equal(a.rgb, b.rgb)
    # A joint basis does not depend on the order of the images.
    other = _structured(seed=8)
    ab = pca_basis(torch.stack([fmap, other]), foreground="auto", outliers=6)
    ba = pca_basis(torch.stack([other, fmap]), foreground="auto", outliers=6)
    np.testing.assert_allclose(ab.components, ba.components, atol=1e-6)
    idx = np.abs(ab.components).argmax(1)
    assert (ab.components[np.arange(3), idx] > 0).all()


# -- real models -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pasted_photo_maps() -> tuple[dict[str, torch.Tensor], tuple[int, int, int, int]]:
    """EfficientNet-Lite0's stage maps of the cat photo pasted onto a flat grey canvas."""
    from PIL import Image

    import featuremaps as fm

    m = fm.load_model("efficientnet_lite0")
    photo = fm.load_image(fm.sample_image("cat")).resize((112, 112))
    canvas = Image.new("RGB", (224, 224), (128, 128, 128))
    canvas.paste(photo, (56, 56))
    x = fm.preprocess(canvas, m.preprocess)[None]
    maps = fm.capture(m.module, x, ["_blocks.2", "_blocks.4", "_blocks.10"])
    return dict(maps.items()), (56, 56, 168, 168)


@pytest.mark.slow
def test_auto_foreground_keeps_the_pasted_photo(pasted_photo_maps) -> None:
    maps, (x0, y0, x1, y1) = pasted_photo_maps
    for name, t in maps.items():
        h, w = t.shape[2:]
        box = np.zeros((h, w), bool)
        box[y0 * h // 224 : y1 * h // 224, x0 * w // 224 : x1 * w // 224] = True
        res = pca_fit(t, foreground="auto")
        fg = res.foreground[0]
        iou = (fg & box).sum() / (fg | box).sum()
        assert iou > (0.6 if h >= 28 else 0.4), (name, iou)
        assert (res.rgb[0][~fg] == 0).all()  # the background is black
        # The plain PCA draws the grey background in colour.
        assert pca_rgb(t)[~box].max() > 0.2
        # Stable across runs, and one basis draws the same picture again.
        again = pca_fit(t.clone(), foreground="auto")
        np.testing.assert_array_equal(again.rgb, res.rgb)
        np.testing.assert_array_equal(res.basis.to_rgb(t), res.rgb[0])


@pytest.mark.slow
def test_vit_register_tokens_with_planted_high_norm_tokens() -> None:
    """A timm DINOv2-register ViT (random weights): register tokens are not on the map;
    patch tokens made 30x longer inside the network are found and left out."""
    timm = pytest.importorskip("timm")
    import featuremaps as fm

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_small_patch14_reg4_dinov2", pretrained=False, img_size=98, depth=4, num_classes=0
    ).eval()
    planted = [9, 30]  # patch indices on the 7x7 grid

    def plant(module, args, out):
        out = out.clone()
        prefix = vit.num_prefix_tokens
        for p in planted:
            out[:, prefix + p] *= 30.0
        return out

    x = torch.randn(1, 3, 98, 98)
    handle = vit.blocks[1].register_forward_hook(plant)
    try:
        maps = fm.capture(vit, x, ["blocks.2"])
    finally:
        handle.remove()
    t = maps["blocks.2"]
    assert tuple(t.shape) == (1, 384, 7, 7)  # 4 register tokens and the class token dropped
    res = pca_fit(t, outliers=6, foreground="auto")
    assert {(0, p // 7, p % 7) for p in planted} <= set(res.outlier_positions)
    assert res.outlier_count <= 4
    # The colour range comes from the other tokens: they span it, the planted ones clip.
    inl = ~res.outliers[0] & res.foreground[0]
    assert np.ptp(res.rgb[0][inl], axis=0).min() > 0.999
    # Without the option the two planted tokens take the first two components and the
    # other tokens are squeezed into a sliver of their colour range.
    plain = pca_rgb(t)
    assert np.ptp(plain[~res.outliers[0]][:, :2], axis=0).max() < 0.1


@pytest.mark.slow
def test_run_cli_with_pca_foreground_writes_the_pictures(tmp_path) -> None:
    """`featuremaps run efficientnet_lite0 photo.jpg --layers _blocks.4 --pca-foreground`:
    per layer LAYER.pca.png (map resolution, background black) and LAYER.pca-overlay.png
    (input size), the recipe and the outlier count in the manifest."""
    import json

    from PIL import Image

    import featuremaps as fm
    from featuremaps.cli import main

    canvas = Image.new("RGB", (224, 224), (128, 128, 128))
    canvas.paste(fm.load_image(fm.sample_image("cat")).resize((112, 112)), (56, 56))
    photo = tmp_path / "photo.png"
    canvas.save(photo)
    out = tmp_path / "d"
    main([
        "run", "efficientnet_lite0", str(photo), "--layers", "_blocks.4",
        "--pca-foreground", "--pca-outliers", "6", "--out", str(out),
    ])  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pca_recipe"] == {
        "foreground": "auto", "whiten": False, "colors": "minmax", "outliers": 6.0
    }  # fmt: skip
    rec = manifest["images"][0]["layers"]["_blocks.4"]
    assert rec["pca"]["foreground"] and isinstance(rec["pca"]["outliers"], int)
    alone = np.asarray(Image.open(out / rec["pca_picture"]))
    over = Image.open(out / rec["pca_overlay"])
    assert alone.shape == (28, 28, 3) and over.size == (224, 224)
    # The picture is the recipe's, pixel for pixel (8-bit rounding).
    m = fm.load_model("efficientnet_lite0")
    x = fm.preprocess(fm.load_image(photo), m.preprocess)[None]
    ref = pca_fit(
        fm.capture(m.module, x, ["_blocks.4"])["_blocks.4"], foreground="auto", outliers=6
    )
    np.testing.assert_array_equal(alone, (ref.rgb[0] * 255 + 0.5).astype(np.uint8))
    assert (alone[~ref.foreground[0]] == 0).all() and alone[14, 14].any()
