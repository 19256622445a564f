"""PCA: against a reference, determinism, degenerate input, streaming, saved bases, and the
DINO-style recipe (foreground, whitening, outliers, colours) on real models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from featuremaps import PCAAccumulator, ReduceError, pca_basis, pca_rgb
from featuremaps.pca import load_bases, save_bases


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
