"""Comparing two models with CKA: the estimator, the dataset pass, the outputs, the CLI."""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from featuremaps import capture, load_image, preprocess
from featuremaps.compare import CKAAccumulator, build_compare, compare_models, debiased_cka
from featuremaps.compare.joint import joint_pca
from featuremaps.compare.outputs import PICTURE_SIZE, page_data
from featuremaps.errors import FeatureMapsError, Interrupted, LayerError, ReduceError
from featuremaps.models import LoadedModel, Preprocess
from featuremaps.pca import pca_rgb
from featuremaps.render import pca_picture

# -- an independent reference: the formulas written out in numpy ------------------------------


def _hsic1_numpy(k: np.ndarray, l_: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC, written from the paper's formula."""
    n = k.shape[0]
    k = k.copy()
    l_ = l_.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l_, 0.0)
    one = np.ones(n)
    return float(
        (
            np.trace(k @ l_)
            + (one @ k @ one) * (one @ l_ @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ k @ l_ @ one)
        )
        / (n * (n - 3))
    )


def _k(t: torch.Tensor) -> np.ndarray:
    x = t.reshape(len(t), -1).double().numpy()
    return x @ x.T


def _cka_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """Full-batch debiased linear CKA on the raw (uncentered) features."""
    x = x.reshape(len(x), -1).astype(np.float64)
    y = y.reshape(len(y), -1).astype(np.float64)
    k, l_ = x @ x.T, y @ y.T
    return _hsic1_numpy(k, l_) / np.sqrt(_hsic1_numpy(k, k) * _hsic1_numpy(l_, l_))


def _hsic1_bruteforce(k: np.ndarray, l_: np.ndarray) -> float:
    """The U-statistic itself: the mean of its kernel over every ordered 4-tuple."""
    n = k.shape[0]
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i, j] * l_[i, j] + k[i, j] * l_[q, r] - 2.0 * k[i, j] * l_[i, q]
        count += 1
    return total / count


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# -- the estimator ---------------------------------------------------------------------------


def test_formula_is_the_u_statistic(rng: np.random.Generator) -> None:
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(7, 3))
    k, l_ = x @ x.T, y @ y.T
    assert _hsic1_numpy(k, l_) == pytest.approx(_hsic1_bruteforce(k, l_), rel=1e-10)
    acc = CKAAccumulator(1, 1)
    acc.update([x], [y])
    assert acc.cross[0, 0] == pytest.approx(_hsic1_bruteforce(k, l_), rel=1e-10)


def test_full_batch_matches_numpy(rng: np.random.Generator) -> None:
    x = rng.normal(size=(20, 6, 3, 3)) + 5.0  # a large common offset, like a ReLU's mean
    y = np.tanh(x.reshape(20, -1) @ rng.normal(size=(54, 9))) + rng.normal(size=(20, 9)) * 0.3
    got = debiased_cka(torch.from_numpy(x).float(), y)
    assert got == pytest.approx(_cka_numpy(x.astype(np.float32), y), abs=1e-6)
    assert 0.05 < got < 0.99  # related, not identical: the check can fail both ways


def test_minibatch_is_mean_hsic_over_batches(rng: np.random.Generator) -> None:
    xs = [rng.normal(size=(8, 5)) for _ in range(3)]
    ys = [x @ rng.normal(size=(5, 4)) + rng.normal(size=(8, 4)) for x in xs]
    acc = CKAAccumulator(2, 1)
    for x, y in zip(xs, ys, strict=True):
        acc.update([x, x**2], [y])
    for row, f in enumerate((lambda a: a, lambda a: a**2)):
        kk = [f(x) @ f(x).T for x in xs]
        ll = [y @ y.T for y in ys]
        cross = np.mean([_hsic1_numpy(k, l_) for k, l_ in zip(kk, ll, strict=True)])
        sa = np.mean([_hsic1_numpy(k, k) for k in kk])
        sb = np.mean([_hsic1_numpy(l_, l_) for l_ in ll])
        assert acc.matrix()[row, 0] == pytest.approx(cross / np.sqrt(sa * sb), rel=1e-9)
    assert acc.batches == 3 and acc.examples == 24


def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(
    rng: np.random.Generator,
) -> None:
    x = rng.normal(size=(16, 12))
    y = np.maximum(x @ rng.normal(size=(12, 8)), 0) + rng.normal(size=(16, 8))
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    r, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    base = debiased_cka(x, y)
    assert debiased_cka(x @ q, y) == pytest.approx(base, rel=1e-9)
    assert debiased_cka(x, y @ r) == pytest.approx(base, rel=1e-9)
    assert debiased_cka(7.5 * x, 0.01 * y) == pytest.approx(base, rel=1e-9)
    assert debiased_cka(x, y + 100.0) == pytest.approx(base, rel=1e-7)  # and to offsets
    # but not to a non-isotropic scaling: the check can tell transforms apart
    assert debiased_cka(x * np.linspace(0.1, 10, 12), y) != pytest.approx(base, rel=1e-3)


def test_self_comparison_is_one_and_inputs_untouched(rng: np.random.Generator) -> None:
    feats = [torch.randn(10, 4, 3, 3), torch.randn(10, 20)]
    before = [f.clone() for f in feats]
    acc = CKAAccumulator(2, 2)
    acc.update(feats, feats)
    m = acc.matrix()
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-12)
    assert abs(m[0, 1]) < 0.9
    for f, b in zip(feats, before, strict=True):
        assert torch.equal(f, b)


def test_estimator_refuses_bad_batches() -> None:
    acc = CKAAccumulator(1, 1)
    with pytest.raises(ReduceError, match="at least 4"):
        acc.update([np.ones((3, 2))], [np.ones((3, 2))])
    with pytest.raises(ReduceError, match="same examples"):
        acc.update([np.ones((5, 2))], [np.ones((6, 2))])
    with pytest.raises(ReduceError, match="NaN"):
        acc.update([np.full((5, 2), np.nan)], [np.ones((5, 2))])
    with pytest.raises(ReduceError, match="no batch"):
        acc.matrix()
    acc.update([np.ones((5, 2))], [np.random.default_rng(1).normal(size=(5, 2))])
    assert np.isnan(acc.matrix()[0, 0])  # a constant layer: undefined, not a number


# -- the dataset pass -------------------------------------------------------------------------


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(self.pool(h).flatten(1))


def _tiny(seed: int, side: int = 24) -> LoadedModel:
    torch.manual_seed(seed)
    pp = Preprocess(resize=side, crop=side)
    return LoadedModel(TinyNet().eval(), pp, spec=f"tiny{seed}", weights="random")


def _images(folder: Path, n: int, size: tuple[int, int] = (40, 32)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    gen = np.random.default_rng(42)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    for i in range(n):
        base = np.stack([(xx * (i + 1)) % 256, (yy * (7 - i % 5)) % 256, (xx + yy * i) % 256], -1)
        noise = gen.integers(0, 60, size=base.shape)
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:02d}.png")
    return folder


def _inputs(folder: Path, pp: Preprocess) -> torch.Tensor:
    paths = sorted(p for p in folder.iterdir() if p.name.startswith("img"))
    return torch.stack([preprocess(load_image(p), pp) for p in paths])


LAYERS = ["conv1", "act1", "conv2", "act2"]


def test_one_batch_equals_full_batch_cka(tmp_path: Path) -> None:
    data = _images(tmp_path / "d", 9)
    a, b = _tiny(0), _tiny(1)
    r = compare_models(a, b, data, layers=LAYERS, batch_size=9, workers=0, device="cpu")
    x = _inputs(data, a.preprocess)
    fa, fb = capture(a.module, x, LAYERS), capture(b.module, x, LAYERS)
    expected = np.array(
        [[_cka_numpy(fa[p].numpy(), fb[q].numpy()) for q in LAYERS] for p in LAYERS]
    )
    np.testing.assert_allclose(r.matrix, expected, atol=1e-6)
    assert r.images_used == 9 and r.batches == 1 and r.left_out == 0
    # channel means: the same estimator on (B, C) features
    rm = compare_models(
        a, b, data, layers=LAYERS, batch_size=9, pool="mean", workers=0, device="cpu"
    )
    exp_m = _cka_numpy(fa["act2"].mean(dim=(2, 3)).numpy(), fb["conv1"].mean(dim=(2, 3)).numpy())
    assert rm.matrix[3, 0] == pytest.approx(exp_m, abs=1e-6)


def test_minibatches_skip_bad_files_and_merge_small_batches(tmp_path: Path) -> None:
    data = _images(tmp_path / "d", 13)
    (data / "broken.png").write_bytes(b"not an image")
    a = _tiny(0)
    with pytest.warns(UserWarning, match="broken.png"):
        r = compare_models(
            a, _tiny(3), data, layers_a="conv1,act2", layers_b="act1", batch_size=4, workers=0,
            device="cpu",
        )  # fmt: skip
    # sorted: broken.png, img00..img12 -> batches [broken,0,1,2] [3..6] [7..10] [11,12]:
    # the 3 readable images of the first join the second, the last 2 join the third
    assert r.images_total == 14 and [p for p, _ in r.skipped] == [str(data / "broken.png")]
    assert r.batches == 2 and r.images_used == 13 and r.left_out == 0
    x = _inputs(data, a.preprocess)
    fa, fb = capture(a.module, x, ["conv1", "act2"]), capture(r.b.model.module, x, ["act1"])
    expected = []
    for p in ("conv1", "act2"):
        parts = [
            (_hsic1_numpy(ka, lb), _hsic1_numpy(ka, ka), _hsic1_numpy(lb, lb))
            for sl in (slice(0, 7), slice(7, 13))
            for ka, lb in [(_k(fa[p][sl]), _k(fb["act1"][sl]))]
        ]
        cross, sa, sb = np.mean(parts, axis=0)
        expected.append(cross / np.sqrt(sa * sb))
    np.testing.assert_allclose(r.matrix[:, 0], expected, atol=1e-6)
    assert r.matrix.shape == (2, 1) and r.a.layers == ["conv1", "act2"] and r.b.layers == ["act1"]
    assert len(r.examples) == 4 and r.example_maps_a["conv1"].shape == (4, 6, 24, 24)


class NaNNet(TinyNet):
    """TinyNet whose act2 is NaN for images with a white top-left pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.conv1(x))
        white = x[:, 0, 0, 0] > 2.0
        h2 = self.conv2(h)
        h2 = torch.where(white[:, None, None, None], torch.full_like(h2, float("nan")), h2)
        return self.fc(self.pool(self.act2(h2)).flatten(1))


def test_images_with_non_finite_activations_are_skipped(tmp_path: Path) -> None:
    data = _images(tmp_path / "d", 8)
    Image.new("RGB", (40, 32), "white").save(data / "img03w.png")
    torch.manual_seed(0)
    bad = LoadedModel(NaNNet().eval(), Preprocess(resize=24, crop=24), "nan", "random")
    with pytest.warns(UserWarning, match="img03w.png: non-finite"):
        r = compare_models(bad, _tiny(1), data, layers=LAYERS, batch_size=9, workers=0)
    assert [p for p, _ in r.skipped] == [str(data / "img03w.png")]
    assert r.images_used == 8 and np.all(np.isfinite(r.matrix))
    x = _inputs(data, bad.preprocess)
    keep = [i for i, p in enumerate(sorted(data.iterdir())) if p.name != "img03w.png"]
    fa = capture(bad.module, x[keep], ["conv1"])["conv1"]
    fb = capture(r.b.model.module, x[keep], ["act2"])["act2"]
    assert r.matrix[0, 3] == pytest.approx(_cka_numpy(fa.numpy(), fb.numpy()), abs=1e-6)


def test_self_comparison_gives_one_on_the_diagonal(tmp_path: Path) -> None:
    data = _images(tmp_path / "d", 8)
    a = _tiny(0)
    r = compare_models(a, a, data, layers=LAYERS, batch_size=4, workers=0, device="cpu")
    np.testing.assert_allclose(np.diag(r.matrix), 1.0, atol=1e-9)
    assert np.all(r.matrix[~np.eye(4, dtype=bool)] < 1.0 - 1e-6)


@pytest.mark.slow
def test_two_random_initializations_differ_off_the_first_layers(tmp_path: Path) -> None:
    from featuremaps import load_model

    data = _images(tmp_path / "d", 8, size=(64, 64))
    import torchvision

    torch.manual_seed(1)
    other = tmp_path / "seed1.pth"
    torch.save(torchvision.models.resnet18().state_dict(), other)
    a = load_model("resnet18", "none")  # seeded with 0 by load_model
    b = load_model("resnet18", str(other))
    kw: dict[str, Any] = {"layers": "stages", "batch_size": 8, "workers": 0, "device": "cpu"}
    same = compare_models(a, a, data, **kw).matrix
    cross = compare_models(a, b, data, **kw).matrix
    np.testing.assert_allclose(np.diag(same), 1.0, atol=1e-9)
    d = np.diag(cross)
    assert np.all(d < 1.0 - 1e-3)
    assert d[-1] < d[0]  # deeper stages drift further apart than the first


def test_bad_input_is_clear(tmp_path: Path) -> None:
    data = _images(tmp_path / "d", 4)
    with pytest.raises(FeatureMapsError, match=r"24x24 inputs but model B \(tiny1\) takes 32x32"):
        compare_models(_tiny(0), _tiny(1, side=32), data, layers="conv1", workers=0)
    with pytest.raises(LayerError, match=r"model A \(tiny0\).*'fc'.*no spatial map"):
        compare_models(_tiny(0), _tiny(1), data, layers="conv1,fc", workers=0)
    with pytest.raises(LayerError, match=r"model B \(tiny1\).*unknown layer 'conv9'.*conv1"):
        compare_models(_tiny(0), _tiny(1), data, layers_a="conv1", layers_b="conv9", workers=0)
    with pytest.raises(FeatureMapsError, match="at least 4 images per batch"):
        compare_models(_tiny(0), _tiny(1), data, batch_size=3)
    with pytest.raises(FeatureMapsError, match="--pool 'max'"):
        compare_models(_tiny(0), _tiny(1), data, pool="max")
    with pytest.raises(FeatureMapsError, match=r"--engine 'spark': use local .* or ray"):
        compare_models(_tiny(0), _tiny(1), data, engine="spark")
    with pytest.raises(FeatureMapsError, match="--gpus-per-worker -1: use 0 or more"):
        compare_models(_tiny(0), _tiny(1), data, engine="ray", gpus_per_worker=-1)


def test_interrupted_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    data = _images(tmp_path / "d", 17)  # batches of 4: the 17th image joins the 4th batch
    a, b = _tiny(0), _tiny(1)
    kw: dict[str, Any] = {"layers": LAYERS, "batch_size": 4, "workers": 0, "device": "cpu"}
    ref = compare_models(a, b, data, **kw)
    state = tmp_path / "out" / "compare_state.npz"

    def stop_after_two(phase: str, done: int, total: int) -> None:
        if done >= 8:  # batch 0 folded and saved, batch 1 read but not folded
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="4 of 17 images") as stopped:  # Ctrl-C saves
        compare_models(
            a, b, data, state_path=state, checkpoint_seconds=3600, progress=stop_after_two, **kw
        )
    assert isinstance(stopped.value, KeyboardInterrupt)
    assert state.is_file()
    again = compare_models(a, b, data, state_path=state, **kw)
    assert again.resumed == 4 and again.images_used == ref.images_used == 17
    assert again.batches == ref.batches == 4
    np.testing.assert_allclose(again.matrix, ref.matrix, rtol=1e-12, atol=1e-15)
    for name in LAYERS:
        assert torch.equal(again.example_maps_a[name], ref.example_maps_a[name])
    np.testing.assert_array_equal(np.stack(again.examples), np.stack(ref.examples))
    # a checkpoint of another comparison is refused, unless told to start over
    with pytest.raises(FeatureMapsError, match=r"another comparison.*--restart"):
        compare_models(a, b, data, state_path=state, pool="mean", **kw)
    fresh = compare_models(a, b, data, state_path=state, pool="mean", restart=True, **kw)
    assert fresh.resumed == 0 and fresh.images_used == 17


def test_output_folder_checked_before_compute(tmp_path: Path) -> None:
    data = _images(tmp_path / "d", 4)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FeatureMapsError, match="it is a file"):
        build_compare("no-such-model-ever", "x", data, blocker)


# -- the outputs ------------------------------------------------------------------------------


def _decode(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def test_page_pictures_are_the_pca_of_the_first_images(tmp_path: Path) -> None:
    data = _images(tmp_path / "d", 6)
    a, b = _tiny(0), _tiny(1)
    r = compare_models(a, b, data, layers=LAYERS, batch_size=6, workers=0, device="cpu")
    page = page_data(r)
    x = _inputs(data, a.preprocess)[:4]
    for side, model in (("layers_a", a), ("layers_b", b)):
        for entry in page[side]:
            maps = capture(model.module, x, [entry["name"]])[entry["name"]]
            rgb = pca_rgb(maps, 3)  # one basis over the four images
            want = [np.asarray(pca_picture(rgb[k], size=PICTURE_SIZE)) for k in range(4)]
            got = [_decode(u) for u in entry["pictures"]]
            assert len(got) == 4
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g, w)
    assert len(page["images"]) == 4
    assert page["matrix"][2][1] == pytest.approx(float(r.matrix[2, 1]), abs=1e-6)


def _pca_numpy(pixels: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Principal axes of (P, C) pixels (largest loading positive) and their projections."""
    x = pixels.astype(np.float64)
    mean = x.mean(axis=0)
    _, vecs = np.linalg.eigh(np.cov(x - mean, rowvar=False, bias=True))
    comps = vecs[:, ::-1][:, :k].T
    comps *= np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])[:, None]
    return comps, (x - mean) @ comps.T


def test_joint_pca_is_one_basis_over_both_batches() -> None:
    torch.manual_seed(0)
    mix = torch.randn(3, 16)
    a = (torch.randn(2, 3, 6, 5).permute(0, 2, 3, 1) @ mix).permute(0, 3, 1, 2)
    b = (torch.randn(3, 3, 4, 4).permute(0, 2, 3, 1) @ mix * 2.0).permute(0, 3, 1, 2)
    rgb_a, rgb_b = joint_pca(a, b)
    pix = lambda t: t.permute(0, 2, 3, 1).reshape(-1, 16).numpy()  # noqa: E731
    _, y = _pca_numpy(np.concatenate([pix(a), pix(b)]))
    lo, hi = y.min(axis=0), y.max(axis=0)
    want = (y - lo) / (hi - lo)
    got = np.concatenate([rgb_a.reshape(-1, 3), rgb_b.reshape(-1, 3)])
    np.testing.assert_allclose(got, want, atol=2e-4)
    assert rgb_a.shape == (2, 6, 5, 3) and rgb_b.shape == (3, 4, 4, 3)
    # a colour is a direction: the same pixel in both batches gets the same colour
    b2 = b.clone()
    b2[0, :, 0, 0] = a[1, :, 2, 3]
    ra, rb = joint_pca(a, b2)
    np.testing.assert_allclose(rb[0, 0, 0], ra[1, 2, 3], atol=1e-6)
    with pytest.raises(ReduceError, match="16 and 8 channels"):
        joint_pca(a, b[:, :8])


def test_page_draws_the_same_layer_of_two_checkpoints_in_one_basis(tmp_path: Path) -> None:
    data = _images(tmp_path / "d", 6)
    a = _tiny(0)
    b = replace(_tiny(1), spec=a.spec)  # two checkpoints of one architecture
    r = compare_models(a, b, data, layers="conv1,act2", batch_size=6, workers=0)
    page = page_data(r)
    assert sorted(page["joint"]) == ["0,0", "1,1"]
    x = _inputs(data, a.preprocess)[:4]
    ma = capture(a.module, x, ["act2"])["act2"]
    mb = capture(b.module, x, ["act2"])["act2"]
    rgb_a, rgb_b = joint_pca(ma, mb)
    for key, rgb in (("a", rgb_a), ("b", rgb_b)):
        got = [_decode(u) for u in page["joint"]["1,1"][key]]
        want = [np.asarray(pca_picture(p, size=PICTURE_SIZE)) for p in rgb]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
    other = compare_models(a, _tiny(1), data, layers="conv1", batch_size=6, workers=0)
    assert page_data(other)["joint"] == {}  # other specs: channels need not correspond


def fm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "featuremaps", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def cli_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """``featuremaps compare resnet18 resnet18`` on 8 images: random vs a saved weight file."""
    import torchvision

    root = tmp_path_factory.mktemp("cmp")
    data = _images(root / "images <b>", 8, size=(48, 40))
    torch.manual_seed(5)
    weights = root / "b.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    out = root / "out"
    r = fm(
        "compare", "resnet18", "resnet18", str(data), "--weights-a", "none",
        "--weights-b", str(weights), "--layers", "layer1,layer2,layer4", "--batch-size", "4",
        "--out", str(out), "--workers", "0", "--device", "cpu",
    )  # fmt: skip
    return out, r


@pytest.mark.slow
def test_cli_writes_matrix_heatmap_and_page(
    cli_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, r = cli_run
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "cka.json").read_text())
    assert doc["layers_a"] == doc["layers_b"] == ["layer1", "layer2", "layer4"]
    m = np.array(doc["matrix"], dtype=float)
    assert m.shape == (3, 3) and np.all(np.isfinite(m)) and np.all(m < 1.0 - 1e-4)
    assert doc["images_used"] == 8 and doc["batches"] == 2 and doc["batch_size"] == 4
    assert doc["pool"] == "none" and "debiased" in doc["estimator"] and doc["skipped"] == []
    assert doc["model_b"]["weights"].endswith("b.pth")
    png = Image.open(out / "cka.png")
    assert png.size[0] > 300 and png.size[1] > 200
    text = (out / "compare.html").read_text()
    assert "Content-Security-Policy" in text and "default-src 'none'" in html.unescape(text)
    assert "<b>" not in text  # the folder name is data, escaped everywhere
    assert not list(out.glob("*.part")) and not list(out.glob(".*.part"))
    assert str(out / "compare.html") in r.stdout


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    data = _images(tmp_path / "d", 4)
    r = fm("compare", "resnet18", "resnet18", str(data), "--weights-a", "none", "--weights-b",
           "none", "--layers", "fc", "--pool", "none", "--out", str(tmp_path / "o"))  # fmt: skip
    assert r.returncode == 1
    assert "no spatial map" in r.stderr and "Traceback" not in r.stderr
    r = fm("compare", "resnet18", "resnet18", str(data), "--engine", "spark", "--out",
           str(tmp_path / "o"))  # fmt: skip
    assert r.returncode == 2 and "'spark' is not one of" in r.stderr  # refused by the parser


# -- the page in a browser --------------------------------------------------------------------

SHOTS = Path(__file__).resolve().parents[1] / "test-output" / "screenshots"


@pytest.mark.browser
@pytest.mark.slow
def test_page_click_shows_both_layers_maps(
    browser: Any, cli_run: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    out, r = cli_run
    assert r.returncode == 0, r.stderr
    data = page_data_from(out / "compare.html")
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        page.goto((out / "compare.html").as_uri())
        assert page.locator("#heatmap tbody button").count() == 9
        assert page.locator("#pair").is_hidden()
        page.click('#heatmap button[data-i="2"][data-j="0"]')
        assert page.locator("#pair").is_visible()
        title = page.text_content("#pair-title") or ""
        assert "A layer4" in title and "B layer1" in title
        assert f"{data['matrix'][2][0]:.2f}" in title
        srcs_a = page.eval_on_selector_all("img.map-a", "els => els.map(e => e.src)")
        srcs_b = page.eval_on_selector_all("img.map-b", "els => els.map(e => e.src)")
        assert srcs_a == data["layers_a"][2]["pictures"] and len(srcs_a) == 4
        assert srcs_b == data["layers_b"][0]["pictures"] and len(srcs_b) == 4
        loaded = page.eval_on_selector_all(
            "#pair-grid img", "els => els.every(e => e.complete && e.naturalWidth > 0)"
        )
        assert loaded
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "compare_pair.png"), full_page=True)
        assert page.locator("#shared-field").is_hidden()  # layer4 vs layer1: own bases
        page.click('#heatmap button[data-i="0"][data-j="1"]')
        assert "A layer1" in (page.text_content("#pair-title") or "")
        assert page.locator("#heatmap button.selected").count() == 1
        page.click('#heatmap button[data-i="1"][data-j="1"]')  # layer2 of both checkpoints
        assert page.locator("#shared-field").is_visible()
        srcs_a = page.eval_on_selector_all("img.map-a", "els => els.map(e => e.src)")
        srcs_b = page.eval_on_selector_all("img.map-b", "els => els.map(e => e.src)")
        assert srcs_a == data["joint"]["1,1"]["a"] and srcs_b == data["joint"]["1,1"]["b"]
        page.screenshot(path=str(SHOTS / "compare_shared_basis.png"), full_page=True)
        page.uncheck("#shared-basis")
        srcs_a = page.eval_on_selector_all("img.map-a", "els => els.map(e => e.src)")
        assert srcs_a == data["layers_a"][1]["pictures"]
    finally:
        context.close()
    assert errors == []


def page_data_from(path: Path) -> dict[str, Any]:
    text = path.read_text()
    start = text.index('<script type="application/json" id="fm-data">') + len(
        '<script type="application/json" id="fm-data">'
    )
    return json.loads(text[start : text.index("</script>", start)])
