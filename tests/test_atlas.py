"""Channel atlas: brute-force agreement, resume after a kill, the Ray engine, PCA basis."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from featuremaps import FeatureMapsError, ImageError, LoadedModel, capture, load_model
from featuremaps.atlas import (
    STATE_FILE,
    BatchResult,
    SkippedImageWarning,
    build_atlas,
    crop_box,
    dataset_paths,
    read_crop,
)
from featuremaps.atlas.batch import (
    PCA_PIXELS,
    AtlasSpec,
    BatchMaps,
    _covariance,
    _pca_pixels,
    _top_k,
    input_layout,
    map_sums,
    probe,
    reduce_batch,
)
from featuremaps.atlas.data import LoadedBatch
from featuremaps.cli import main
from featuremaps.images import load_image, preprocess
from featuremaps.reduce import PCAAccumulator, load_bases
from featuremaps.render import pca_panel

N_IMAGES = 256
SIDE = 64  # the tests' preprocessing: resize and crop to 64 so resnet18 runs fast
BATCH = 16
LAYER = "layer3"
CORRUPT = ("broken.jpg", "deep/truncated.png")


def _write_dataset(root: Path, n: int) -> None:
    """``n`` structured 48x48 images in nested folders, two duplicates, two bad files."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48]
    for i in range(n):
        arr = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        arr[..., i % 3] = ((xx * (i % 7 + 1) + yy * (i % 5) * 3) % 256).astype(np.uint8)
        folder = root / f"part{i % 4}" / ("deep" if i % 5 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / f"img{i:04d}.{'png' if i % 2 else 'jpg'}")
    dup = np.zeros((48, 48, 3), dtype=np.uint8)
    dup[::4] = 255
    Image.fromarray(dup).save(root / "dup_a.png")  # identical images: exact score ties
    Image.fromarray(dup).save(root / "dup_b.png")
    (root / "broken.jpg").write_bytes(b"this is not a JPEG")
    (root / "deep").mkdir()
    good = (root / "part1" / "img0001.png").read_bytes()
    (root / "deep" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "notes.txt").write_text("not part of the dataset")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dataset")
    _write_dataset(root, N_IMAGES)
    return root


@pytest.fixture(scope="module")
def small_model() -> LoadedModel:
    """resnet18 with random weights and a 64-pixel input: an atlas of 300 takes seconds."""
    m = load_model("resnet18", weights="none")
    return dataclasses.replace(
        m, preprocess=dataclasses.replace(m.preprocess, resize=SIDE, crop=SIDE)
    )


def _atlas(model: LoadedModel, data: Path, out: Path, **kwargs: Any) -> Any:
    options: dict[str, Any] = {"top": 9, "batch_size": BATCH, "workers": 2}
    options.update(kwargs)
    with pytest.warns(SkippedImageWarning):
        return build_atlas(model, data, LAYER, out, **options)


@pytest.fixture(scope="module")
def reference(
    dataset: Path, small_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An uninterrupted run of the local engine."""
    out = tmp_path_factory.mktemp("reference")
    result = _atlas(small_model, dataset, out)
    assert result.images_total == N_IMAGES + 4
    assert result.images_used == N_IMAGES + 2
    assert sorted(Path(p).relative_to(dataset).as_posix() for p, _ in result.skipped) == sorted(
        CORRUPT
    )
    return out


def brute_force(
    model: LoadedModel, paths: list[str], layer: str, top: int, score: str = "max"
) -> dict[str, Any]:
    """Capture every image and sort, independently of the atlas code.

    Images go through the model in the atlas's batches (consecutive chunks of the sorted
    paths, minus unreadable files): some conv kernels change the last bit of an image's
    activations with the batch size, and the comparison is exact. For the same reason
    they go in channels-last, the layout in which the atlas feeds a CPU forward of a
    convolutional network (``test_channels_last_where_the_model_allows_it``).
    """
    pp = model.preprocess
    candidates: dict[int, list[tuple[float, str, int, int]]] = defaultdict(list)
    dead: dict[int, int] = defaultdict(int)
    pca: PCAAccumulator | None = None
    total: np.ndarray | None = None
    used = 0
    for start in range(0, len(paths), BATCH):
        good, xs = [], []
        for p in paths[start : start + BATCH]:
            try:
                xs.append(preprocess(load_image(p, draft_size=pp.resize), pp))
                good.append(p)
            except ImageError:
                pass
        if not good:
            continue
        x = torch.stack(xs).contiguous(memory_format=torch.channels_last)
        maps = capture(model.module, x, [layer])[layer]
        pca = pca or PCAAccumulator(maps.shape[1])
        pca.update(maps)
        arr = maps.numpy()
        total = arr.sum((0, 2, 3), dtype=np.float64) + (0 if total is None else total)
        used += len(good)
        for path, m in zip(good, arr, strict=True):
            flat = m.reshape(m.shape[0], -1)
            for c in range(flat.shape[0]):
                i = int(np.argmax(flat[c]))
                s = flat[c, i] if score == "max" else np.float32(flat[c].mean(dtype=np.float64))
                candidates[c].append((-float(s), path, i // m.shape[2], i % m.shape[2]))
                dead[c] += int(not flat[c].any())
    tops = {
        c: [(p, np.float32(-s), y, x) for s, p, y, x in sorted(v)[:top]]
        for c, v in candidates.items()
    }
    return {"top": tops, "dead": dead, "pca": pca, "total": total, "used": used}


@pytest.fixture(scope="module")
def expected(dataset: Path, small_model: LoadedModel) -> dict[str, Any]:
    paths = sorted(str(p) for p in dataset.rglob("*") if p.suffix in (".png", ".jpg"))
    return brute_force(small_model, paths, LAYER, top=9)


def _cli(*args: str) -> None:
    """Run the command line in-process; a successful command may end with SystemExit(0)."""
    try:
        main(list(args))
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code


def _as_tuples(channel: dict[str, Any]) -> list[tuple[str, np.float32, int, int]]:
    return [(e["image"], np.float32(e["score"]), e["y"], e["x"]) for e in channel["top"]]


def test_atlas_agrees_with_brute_force(reference: Path, expected: dict[str, Any]) -> None:
    doc = json.loads((reference / "atlas.json").read_text())
    layer = doc["layers"][LAYER]
    assert len(layer["channels"]) == 256 and layer["stride"] == [16.0, 16.0]
    assert doc["images"] == {"total": N_IMAGES + 4, "used": N_IMAGES + 2, "skipped": 2}
    pixels = expected["used"] * 4 * 4
    for ch in layer["channels"]:
        c = ch["channel"]
        assert _as_tuples(ch) == expected["top"][c], f"channel {c}"
        assert ch["dead"] == expected["dead"][c]
        assert ch["dead_share"] == expected["dead"][c] / expected["used"]
        assert ch["mean"] == pytest.approx(expected["total"][c] / pixels, rel=1e-6, abs=1e-7)
    ties = [
        ch
        for ch in layer["channels"]
        if {"dup_a.png", "dup_b.png"} <= {Path(e["image"]).name for e in ch["top"]}
    ]
    for ch in ties:  # equal scores: the path decides
        names = [Path(e["image"]).name for e in ch["top"]]
        assert names.index("dup_a.png") + 1 == names.index("dup_b.png")


def test_dataset_pca_basis_matches_brute_force(reference: Path, expected: dict[str, Any]) -> None:
    want = expected["pca"].fit(3)  # PCAAccumulator.update over every pixel, in float64
    basis = load_bases(reference / "pca_basis.npz")[LAYER]
    np.testing.assert_allclose(basis.mean, want.mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(basis.explained, want.explained, rtol=1e-5)
    np.testing.assert_allclose(np.abs(basis.components @ want.components.T), np.eye(3), atol=1e-6)


def test_outputs_crops_and_pages(reference: Path, small_model: LoadedModel) -> None:
    doc = json.loads((reference / "atlas.json").read_text())
    layer = doc["layers"][LAYER]
    page = (reference / layer["page"]).read_text()
    pp = small_model.preprocess
    mean, std = np.array(pp.mean), np.array(pp.std)
    for ch in layer["channels"][:5]:
        assert len(ch["top"]) == 9
        assert f'id="c{ch["channel"]}"' in page
        for e in ch["top"]:
            assert f'src="{e["crop"]["file"]}"' in page
            left, top, w, h = e["crop"]["box"]  # the page's window on the sheet is the box
            s = 68 / max(w, h)
            assert f'style="width:{w * s:.2f}px;height:{h * s:.2f}px"' in page
            assert f'style="left:{-left * s + 0.0:.2f}px;top:{-top * s + 0.0:.2f}px;' in page
            crop = read_crop(reference, e)
            t, left, b, r = crop_box(e["y"], e["x"], (16.0, 16.0), (SIDE, SIDE))
            assert crop.size == (r - left, b - t)
            got = np.asarray(crop.convert("RGB"), dtype=np.float64)
            # the input region, from the model's input undone independently
            x = preprocess(load_image(e["image"]), pp).permute(1, 2, 0).numpy()
            want = (x * std + mean).clip(0, 1)[t:b, left:r] * 255
            # JPEG keeps the low frequencies of these noisy images: compare 4x4 block means
            g, w = _block_means(got), _block_means(want)
            assert np.abs(g - w).mean() < 6
            assert np.corrcoef(g.ravel(), w.ravel())[0, 1] > 0.9


def _block_means(a: np.ndarray, k: int = 4) -> np.ndarray:
    h, w = a.shape[0] // k * k, a.shape[1] // k * k
    return a[:h, :w].reshape(h // k, k, w // k, k, -1).mean((1, 3))
    assert 'href="layer3.html"' in (reference / "index.html").read_text()


def test_score_mean_agrees_with_brute_force(
    dataset: Path, small_model: LoadedModel, tmp_path: Path
) -> None:
    paths = sorted(str(p) for p in (dataset / "part2").rglob("*.*"))[:40]
    listing = tmp_path / "images.txt"
    listing.write_text("# a list of paths\n" + "\n".join(paths) + "\n\n")
    result = build_atlas(
        small_model,
        listing,
        "layer2",
        tmp_path / "out",
        top=4,
        score="mean",
        batch_size=BATCH,
        workers=0,
    )
    doc = json.loads(result.atlas_json.read_text())
    expected = brute_force(small_model, paths, "layer2", top=4, score="mean")
    for ch in doc["layers"]["layer2"]["channels"]:
        assert _as_tuples(ch) == expected["top"][ch["channel"]]


def test_ctrl_c_then_resume_gives_the_same_atlas(
    reference: Path, dataset: Path, small_model: LoadedModel, tmp_path: Path
) -> None:
    calls = 0

    def interrupt(phase: str, done: int, total: int) -> None:
        nonlocal calls
        calls += 1
        if phase == "images" and calls == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _atlas(small_model, dataset, tmp_path, checkpoint_seconds=0, progress=interrupt)
    assert (tmp_path / STATE_FILE).exists() and not (tmp_path / "atlas.json").exists()
    result = build_atlas(small_model, dataset, LAYER, tmp_path, top=9, batch_size=BATCH, workers=0)
    assert result.resumed == 5 * BATCH
    _assert_same_outputs(reference, tmp_path)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_atlas(
    reference: Path, dataset: Path, small_model: LoadedModel, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(f"""
        import dataclasses, time
        from featuremaps.atlas import build_atlas
        from featuremaps.models import load_model
        m = load_model("resnet18", weights="none")
        pp = dataclasses.replace(m.preprocess, resize={SIDE}, crop={SIDE})
        build_atlas(dataclasses.replace(m, preprocess=pp), {str(dataset)!r}, {LAYER!r},
                    {str(out)!r}, top=9, batch_size={BATCH}, workers=1,
                    checkpoint_seconds=0, progress=lambda *a: time.sleep(0.5))
    """)
    )
    child = subprocess.Popen([sys.executable, "-W", "ignore", str(script)])
    try:
        deadline = time.monotonic() + 120
        while not (out / STATE_FILE).exists() and time.monotonic() < deadline:
            assert child.poll() is None, "the child ended before its first checkpoint"
            time.sleep(0.05)
        assert (out / STATE_FILE).exists(), "no checkpoint within 120 s"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert not (out / "atlas.json").exists()
    with warnings.catch_warnings():  # the bad files may be behind the checkpoint already
        warnings.simplefilter("ignore", SkippedImageWarning)
        result = build_atlas(small_model, dataset, LAYER, out, top=9, batch_size=BATCH)
    assert 0 < result.resumed < N_IMAGES
    _assert_same_outputs(reference, out)


def _assert_same_outputs(a: Path, b: Path) -> None:
    assert (a / "atlas.json").read_bytes() == (b / "atlas.json").read_bytes()
    # the crops too: kept during the pass, or (resumed batches, Ray) cut from a decoding
    crops_a = sorted(p.relative_to(a) for p in (a / "crops").rglob("*.jpg"))
    assert crops_a and crops_a == sorted(p.relative_to(b) for p in (b / "crops").rglob("*.jpg"))
    for rel in crops_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    with np.load(a / "pca_basis.npz") as za, np.load(b / "pca_basis.npz") as zb:
        assert za.files == zb.files
        for key in za.files:
            assert np.array_equal(za[key], zb[key]), key


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_engine_gives_the_same_atlas(
    reference: Path, dataset: Path, small_model: LoadedModel, tmp_path: Path
) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error")
    try:
        result = _atlas(small_model, dataset, tmp_path, engine="ray", workers=2)
    finally:
        ray.shutdown()
    assert result.images_used == N_IMAGES + 2
    _assert_same_outputs(reference, tmp_path)


def test_cli_atlas_and_run_with_the_dataset_basis(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = [dataset / "part1" / "img0001.png", dataset / "part2" / "img0002.jpg"]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([*map(str, images), str(dataset / "broken.jpg")]))
    out = tmp_path / "atlas"
    _cli(
        "atlas",
        "resnet18",
        str(listing),
        "--weights",
        "none",
        "--layers",
        LAYER,
        "--top",
        "2",
        "--out",
        str(out),
        "--workers",
        "0",
        "--batch-size",
        "4",
    )
    said = capsys.readouterr()
    assert "2 of 3 images used" in said.out and "1 skipped" in said.out
    assert "warning: skipped" in said.err and "broken.jpg" in said.err
    doc = json.loads((out / "atlas.json").read_text())
    assert doc["preprocess"]["crop"] == 224 and len(doc["layers"][LAYER]["channels"]) == 256

    run_out = tmp_path / "run"
    _cli(
        "run",
        "resnet18",
        *map(str, images),
        "--weights",
        "none",
        "--layers",
        LAYER,
        "--pca-basis",
        str(out / "pca_basis.npz"),
        "--out",
        str(run_out),
        "--save-activations",
    )
    manifest = json.loads((run_out / "manifest.json").read_text())
    assert manifest["pca_basis"] == str(out / "pca_basis.npz")
    basis = load_bases(out / "pca_basis.npz")[LAYER]
    from safetensors.torch import load_file

    acts = load_file(str(run_out / "activations.safetensors"))
    for entry in manifest["images"]:  # each panel is drawn with the dataset basis
        rgb = basis.to_rgb(acts[f"{entry['key']}/{LAYER}"][0])
        shown = np.asarray(Image.open(run_out / entry["input"]).convert("RGB"))
        expected = np.asarray(pca_panel(shown, {LAYER: rgb}))
        assert np.array_equal(np.asarray(Image.open(run_out / entry["pca_panel"])), expected)


@pytest.mark.slow
def test_cli_atlas_on_a_folder_at_full_size(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "a"
    _cli(
        "atlas",
        "resnet18",
        str(dataset),
        "--weights",
        "none",
        "--layers",
        LAYER,
        "--top",
        "9",
        "--out",
        str(out),
    )
    assert f"{N_IMAGES + 2} of {N_IMAGES + 4} images used" in capsys.readouterr().out
    layer = json.loads((out / "atlas.json").read_text())["layers"][LAYER]
    assert layer["shape"] == [256, 14, 14]
    for ch in layer["channels"]:
        keys = [(-e["score"], e["image"]) for e in ch["top"]]
        assert len(keys) == 9 and keys == sorted(keys)
    assert (out / "layer3.html").exists() and (out / "pca_basis.npz").exists()
    assert len(list((out / "crops" / "layer3").glob("*.jpg"))) == 256  # a sheet each


# -- pieces --------------------------------------------------------------------------------------


def test_top_k_merge_is_associative_with_a_total_order() -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, (5, 40)).astype(np.float32)  # many ties
    ids = np.tile(rng.permutation(40), (5, 1))
    whole = _top_k(6, scores, ids)
    for cut in (7, 20, 33):
        left = _top_k(6, scores[:, :cut], ids[:, :cut])
        right = _top_k(6, scores[:, cut:], ids[:, cut:])
        merged = _top_k(6, *(np.concatenate([a, b], 1) for a, b in zip(right, left, strict=True)))
        for got, want in zip(merged, whole, strict=True):
            assert np.array_equal(got, want)
    best = sorted(zip(-scores[0], ids[0], strict=True))[:6]
    assert [int(i) for _, i in best] == whole[1][0].tolist()


def test_ray_results_are_folded_in_batch_order() -> None:
    from featuremaps.atlas.engines.ray import _in_batch_order

    arrived = [BatchResult(i, 0, [], []) for i in (3, 1, 7, 5)]
    assert [r.index for r in _in_batch_order(iter(arrived), [1, 3, 5, 7])] == [1, 3, 5, 7]


def test_covariance_of_large_maps_uses_a_regular_grid_of_pixels() -> None:
    torch.manual_seed(0)
    maps = torch.relu(torch.randn(3, 8, 100, 90)) + 50.0  # a large offset: no cancellation
    flat = maps.reshape(3, 8, -1).clone()
    acc = _covariance(*_pca_pixels(flat, flat.sum(2, dtype=torch.float64).numpy(), (100, 90)))
    want = PCAAccumulator(8)
    assert PCA_PIXELS == 256  # 9000 pixels: every 6th row and column, 17 x 15 = 255
    want.update(maps[:, :, ::6, ::6])
    assert acc.n == want.n == 3 * 17 * 15
    np.testing.assert_allclose(acc.sum, want.sum, rtol=1e-12)
    np.testing.assert_allclose(acc.cosum, want.cosum, rtol=1e-9)


def test_map_sums_of_large_maps_are_close_to_float64_and_catch_overflow() -> None:
    torch.manual_seed(1)
    small = torch.rand(2, 3, PCA_PIXELS)  # up to PCA_PIXELS pixels: float64, exactly
    np.testing.assert_array_equal(map_sums(small), small.numpy().sum(2, dtype=np.float64))
    big = torch.relu(torch.randn(2, 3, 112 * 112)) * 7.0
    want = big.numpy().astype(np.float64).sum(2)
    got = map_sums(big)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(map_sums(big, exact=True), big.numpy().sum(2, dtype=np.float64))
    huge = torch.full((1, 2, 4 * PCA_PIXELS), 3e37)  # float32 overflows, float64 does not
    np.testing.assert_allclose(map_sums(huge), 3e37 * 4 * PCA_PIXELS, rtol=1e-6)
    bad = big.clone()
    bad[1, 2, 5] = float("nan")
    finite = np.isfinite(map_sums(bad))
    assert not finite[1, 2] and finite.sum() == 5


class _TwoConvs(torch.nn.Module):
    """A convolutional network (two convolutions) that takes any layout."""

    def __init__(self, convs: int = 2) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.head = torch.nn.Conv2d(4, 4, 1) if convs > 1 else torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


class _ViewsItsInput(_TwoConvs):
    """Reads its input with ``view``, which a channels-last tensor cannot give."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.view(x.shape[0], -1).view(x.shape))


class _ReadsMemory(_TwoConvs):
    """Reinterprets its input's memory as contiguous: wrong maps for channels-last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        return super().forward(torch.as_strided(x, x.shape, (c * h * w, h * w, w, 1)))


def test_channels_last_where_the_model_allows_it(small_model: LoadedModel) -> None:
    spec, _ = probe(small_model, LAYER, "max", 9)
    assert spec.channels_last
    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # no GPU needed to name one
    assert input_layout(spec, cpu) == torch.channels_last
    assert input_layout(spec, gpu, "bf16") == input_layout(spec, gpu, "fp16") == torch.channels_last
    assert input_layout(spec, gpu, "fp32") == torch.contiguous_format
    loaded = LoadedModel(_TwoConvs().eval(), small_model.preprocess, "toy", "random")
    assert probe(loaded, "conv", "max", 2)[0].channels_last  # what the others differ from
    no_conv = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    for module, layer in (
        (_ViewsItsInput(), "conv"),
        (_ReadsMemory(), "conv"),
        (_TwoConvs(convs=1), "conv"),  # one convolution: a ViT's patch embedding
        (no_conv, "0"),
    ):
        loaded = LoadedModel(module.eval(), small_model.preprocess, "toy", "random")
        spec, _ = probe(loaded, layer, "max", 2)
        assert not spec.channels_last, type(module).__name__
        assert input_layout(spec, cpu) == torch.contiguous_format
    # the check is what rejects _ReadsMemory: its two layouts really give other maps
    x = torch.rand(1, 3, SIDE, SIDE)
    m = _ReadsMemory().eval()
    a = capture(m, x, "conv")["conv"]
    b = capture(m, x.contiguous(memory_format=torch.channels_last), "conv")["conv"]
    assert (a - b).abs().max() > 0.01


def test_channels_last_maps_reduce_as_contiguous_ones() -> None:
    """Large channels-last maps are reduced as they are, ``(B, H*W, C)``, without a copy."""
    torch.manual_seed(3)
    maps = {"big": torch.relu(torch.randn(5, 6, 24, 20)), "small": torch.randn(5, 7, 9, 9)}
    maps["big"][1, 2] = 0.0  # a dead map
    maps["big"][3, 4, 5, 6] = maps["big"][3, 4, 7, 8] = 99.0  # a tie: the first one wins
    batch = LoadedBatch(0, np.arange(5) * 3, torch.zeros(5, 3, 8, 8), [])
    for score, top in (("max", 3), ("mean", 3), ("max", 7)):  # 7: more slots than images
        spec = AtlasSpec(("big", "small"), (6, 7), score, top)
        plain = reduce_batch(batch, spec, BatchMaps({k: v.clone() for k, v in maps.items()}))
        last = {k: v.contiguous(memory_format=torch.channels_last) for k, v in maps.items()}
        fast = reduce_batch(batch, spec, BatchMaps(last))
        assert fast.n_images == plain.n_images == 5
        for a, b in zip(plain.layers, fast.layers, strict=True):
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_array_equal(a.ys, b.ys)
            np.testing.assert_array_equal(a.xs, b.xs)
            np.testing.assert_array_equal(a.dead, b.dead)
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
            np.testing.assert_allclose(a.total, b.total, rtol=1e-6)
            np.testing.assert_allclose(a.pca.cosum, b.pca.cosum, rtol=1e-6)
        big = fast.layers[0]
        assert big.dead[2] == 1
        if score == "max":
            assert (big.ids[4, 0], big.ys[4, 0], big.xs[4, 0]) == (9, 5, 6)
    assert torch.equal(last["small"], maps["small"])  # only large maps are read in place


def test_crop_box_is_centred_and_clipped() -> None:
    assert crop_box(1, 2, (16.0, 16.0), (64, 64)) == (8, 24, 40, 56)
    assert crop_box(0, 0, (16.0, 16.0), (64, 64)) == (0, 0, 24, 24)
    assert crop_box(3, 3, (16.0, 16.0), (64, 64)) == (40, 40, 64, 64)
    assert crop_box(5, 5, (2.0, 2.0), (64, 64)) == (3, 3, 19, 19)  # at least MIN_CROP


def test_dataset_paths_from_a_list_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    listing = tmp_path / "sub" / "paths.txt"
    listing.write_text(f"# comment\nb.png\n\n  a.jpg  \n{tmp_path / 'abs.png'}\nb.png\n")
    assert dataset_paths(listing) == sorted(
        [
            str(tmp_path / "abs.png"),
            str(tmp_path / "sub" / "a.jpg"),
            str(tmp_path / "sub" / "b.png"),
        ]
    )
    for name in ("x.png", "y.jpg"):
        (tmp_path / name).touch()
    assert dataset_paths(str(tmp_path / "*.png")) == [str(tmp_path / "x.png")]
    with pytest.raises(ImageError):
        dataset_paths(tmp_path / "nothing-here")


def test_checkpoint_of_other_options_is_refused_then_restart(
    dataset: Path, small_model: LoadedModel, tmp_path: Path
) -> None:
    data = dataset / "part3" / "deep"
    build_atlas(small_model, data, LAYER, tmp_path, top=3, workers=0)
    with pytest.raises(FeatureMapsError, match=r"differs in: top.*--restart"):
        build_atlas(small_model, data, LAYER, tmp_path, top=4, workers=0)
    result = build_atlas(small_model, data, LAYER, tmp_path, top=4, workers=0, restart=True)
    assert result.resumed == 0
    doc = json.loads(result.atlas_json.read_text())
    assert len(doc["layers"][LAYER]["channels"][0]["top"]) == 4


def test_page_escapes_names_and_links_to_report(
    dataset: Path, small_model: LoadedModel, tmp_path: Path
) -> None:
    data = tmp_path / "odd"
    data.mkdir()
    for name in ('a<b>&"c.png', "plain.png"):
        (data / name).write_bytes((dataset / "part1" / "img0001.png").read_bytes())
    result = build_atlas(
        small_model,
        data,
        LAYER,
        tmp_path / "out",
        top=2,
        workers=0,
        report_url="../report/{layer}.html#channel-{channel}",
    )
    page = (tmp_path / "out" / "layer3.html").read_text()
    assert "a<b>" not in page and "a&lt;b&gt;&amp;&quot;c.png" in page
    assert 'href="../report/layer3.html#channel-7"' in page
    assert result.images_used == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top": 0}, "--top"),
        ({"score": "median"}, "--score"),
        ({"engine": "spark"}, "--engine"),
        ({"batch_size": 0}, "--batch-size"),
        ({"report_url": "{nope}"}, "--report-url"),
    ],
)
def test_bad_options_fail_before_any_work(
    kwargs: dict[str, Any], match: str, tmp_path: Path
) -> None:
    with pytest.raises(FeatureMapsError, match=match):
        build_atlas("resnet18", tmp_path, LAYER, tmp_path / "out", weights="none", **kwargs)
