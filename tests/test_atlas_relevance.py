"""``atlas --score relevance``: a relevance top-K per channel beside the activation top-K."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from featuremaps.atlas import STATE_FILE, build_atlas, read_crop
from featuremaps.atlas.crops import sheet_cell
from featuremaps.cli import main
from featuremaps.images import load_image, preprocess
from featuremaps.models import LoadedModel, Preprocess
from featuremaps.relevance import TargetError, relevance

LAYERS = ["features.0", "features.3"]
TOP = 3
BATCH = 4


def _toy() -> LoadedModel:
    from conftest import ToyNet

    torch.manual_seed(0)
    return LoadedModel(ToyNet().eval(), Preprocess(resize=32, crop=32), "toy", "random")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:40]
    for i in range(10):
        arr = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        arr[..., i % 3] = ((xx * (i + 1) + yy * 3) % 256).astype(np.uint8)
        Image.fromarray(arr).save(root / f"img{i}.png")
    return root


def _build(out: Path, images: Path, **kwargs: Any) -> Any:
    options: dict[str, Any] = {"top": TOP, "batch_size": BATCH, "workers": 0}
    options.update(kwargs)
    return build_atlas(_toy(), images, LAYERS, out, **options)


@pytest.fixture(scope="module")
def reference(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("relevance")
    _build(out, images, score="relevance")
    return out


def _doc(out: Path) -> dict[str, Any]:
    return json.loads((out / "atlas.json").read_text())


def test_relevance_ranking_equals_relevance_per_image(reference: Path, images: Path) -> None:
    """Each image alone through relevance(): its top-1 class, per-channel relevance, argmax."""
    model = _toy()
    pp = model.preprocess
    per_image: dict[str, Any] = {}
    for path in sorted(str(p) for p in images.iterdir()):
        x = preprocess(load_image(path, draft_size=pp.resize), pp)[None]
        r = relevance(model.module, x, LAYERS)
        assert r.targets[0].index == int(r.output.argmax(1))
        per_image[path] = (r, r.targets[0])
    doc = _doc(reference)
    assert doc["score"] == "relevance" and "top_relevance" in doc["rankings"]
    for layer in LAYERS:
        for ch in doc["layers"][layer]["channels"]:
            c = ch["channel"]
            values = {p: float(r[layer].channels[0, c]) for p, (r, _) in per_image.items()}
            expected = sorted(values, key=lambda p: (-values[p], p))[:TOP]
            got = ch["top_relevance"]
            assert [e["image"] for e in got] == expected
            for e in got:
                r, target = per_image[e["image"]]
                np.testing.assert_allclose(e["relevance"], values[e["image"]], rtol=1e-4, atol=1e-7)
                assert e["class"]["index"] == target.index
                assert e["class"]["prob"] == pytest.approx(target.prob, rel=1e-5)
                # where gradient x activation is largest (near-ties differ in the last
                # bits between a batch of one and the atlas's batch of four)
                gxa = r[layer].grad_x_act[0, c]
                peak = float(gxa.max())
                assert float(gxa[e["y"], e["x"]]) >= peak - 1e-5 * abs(peak)
            mean = float(np.mean(list(values.values())))
            assert ch["mean_relevance"] == pytest.approx(mean, rel=1e-4, abs=1e-7)


def test_activation_ranking_is_kept_unchanged_beside_it(
    reference: Path, images: Path, tmp_path: Path
) -> None:
    _build(tmp_path, images, score="max")
    plain, rel = _doc(tmp_path), _doc(reference)
    for layer in LAYERS:
        a_chs, b_chs = plain["layers"][layer]["channels"], rel["layers"][layer]["channels"]
        pairs = zip(a_chs, b_chs, strict=True)
        for a, b in pairs:
            assert a["top"] == b["top"]  # bitwise: the same maps, the same order
            assert "top_relevance" not in a and len(b["top_relevance"]) == TOP


def test_relevance_crops_and_pages(reference: Path) -> None:
    doc = _doc(reference)
    ch = doc["layers"]["features.3"]["channels"][5]
    for rank, e in enumerate(ch["top_relevance"]):
        assert (reference / e["crop"]["file"]).is_file()
        assert e["crop"]["file"].endswith("c0005_r.jpg")  # the list's sheet
        crop = read_crop(reference, e)
        assert crop.size == tuple(e["crop"]["box"][2:]) and e["crop"]["box"][1] == 0
        stride = tuple(doc["layers"]["features.3"]["stride"])
        assert e["crop"]["box"][0] == rank * sheet_cell(stride, 32)[1]
    page = (reference / doc["layers"]["features.3"]["page"]).read_text()
    assert page.count('class="crops rel"') == 16
    assert f'src="{ch["top_relevance"][0]["crop"]["file"]}"' in page
    assert "relevance to each image&#x27;s own top-1 class" in page


def test_ctrl_c_then_resume_keeps_the_relevance_state(
    reference: Path, images: Path, tmp_path: Path
) -> None:
    calls = 0

    def interrupt(phase: str, done: int, total: int) -> None:
        nonlocal calls
        calls += 1
        if phase == "images" and calls == 3:  # after two of the three batches
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path, images, score="relevance", checkpoint_seconds=0, progress=interrupt)
    with np.load(tmp_path / STATE_FILE) as z:
        assert "1.rel_scores" in z.files and "1.rel_classes" in z.files
    result = _build(tmp_path, images, score="relevance")
    assert result.resumed == 2 * BATCH
    assert (tmp_path / "atlas.json").read_bytes() == (reference / "atlas.json").read_bytes()


def test_a_max_checkpoint_is_not_resumed_as_relevance(images: Path, tmp_path: Path) -> None:
    def stop(phase: str, done: int, total: int) -> None:
        if phase == "images" and done >= BATCH:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path, images, score="max", checkpoint_seconds=0, progress=stop)
    with pytest.raises(Exception, match="differs in: score"):
        _build(tmp_path, images, score="relevance")


class _MapNet(nn.Module):
    """Not a classifier: returns a feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_a_non_classifier_is_refused_before_compute(images: Path, tmp_path: Path) -> None:
    model = LoadedModel(_MapNet().eval(), Preprocess(resize=32, crop=32), "mapnet", "random")
    seen: list[int] = []
    with pytest.raises(TargetError, match=r"--score relevance .* classifier .* --score max"):
        build_atlas(
            model, images, "conv", tmp_path, score="relevance", progress=lambda *a: seen.append(1)
        )
    assert not seen and not (tmp_path / STATE_FILE).exists()
    assert not (tmp_path / "atlas.json").exists()


def test_cli_score_relevance_on_a_non_classifier_exits_1(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "atlas",
                "test_atlas_relevance:_mapnet_factory",
                str(images),
                "--layers",
                "conv",
                "--score",
                "relevance",
                "--weights",
                "none",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "--score relevance" in err and "Traceback" not in err


def _mapnet_factory() -> nn.Module:
    torch.manual_seed(0)
    return _MapNet()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_engine_gives_the_same_relevance_atlas(
    reference: Path, images: Path, tmp_path: Path
) -> None:
    ray = pytest.importorskip("ray")
    pickle = pytest.importorskip("ray.cloudpickle")
    import conftest

    pickle.register_pickle_by_value(conftest)  # workers cannot import conftest
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error")
    try:
        _build(tmp_path, images, score="relevance", engine="ray", workers=2)
    finally:
        ray.shutdown()
        pickle.unregister_pickle_by_value(conftest)
    assert (tmp_path / "atlas.json").read_bytes() == (reference / "atlas.json").read_bytes()
