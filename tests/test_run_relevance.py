"""``featuremaps run --target / --order relevance``: the manifest's relevance, the grid
order and the CAM overlays, against :func:`featuremaps.relevance` run independently."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from featuremaps import load_model, relevance, sample_image
from featuremaps.cli import main
from featuremaps.images import load_image, preprocess
from featuremaps.models import LoadedModel, Preprocess
from featuremaps.options import RenderOptions
from featuremaps.pipeline import run
from featuremaps.relevance import TargetError
from featuremaps.relevance_outputs import RelevanceRequest, cam_picture

LAYERS = "layer3,layer4"


def cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture(scope="module")
def resnet() -> LoadedModel:
    torch.manual_seed(0)
    return load_model("resnet18", "none")


def _input(model: LoadedModel, path: Path) -> torch.Tensor:
    img = load_image(path, draft_size=model.preprocess.resize)
    return preprocess(img, model.preprocess)[None]


def _manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text())


def test_manifest_relevance_is_relevance_per_channel(
    tmp_path: Path, resnet: LoadedModel, photo: Path
) -> None:
    out = tmp_path / "d"
    req = RelevanceRequest(target=7, order=True)
    opts = RenderOptions(max_maps=None, map_size=8, pca=0)
    run("resnet18", [photo], LAYERS, out, options=opts, model=resnet, relevance=req, device="cpu")
    entry = _manifest(out)["images"][0]
    expect = relevance(resnet.module, _input(resnet, photo), LAYERS, 7)
    assert entry["target"]["index"] == 7
    assert entry["target"]["label"] == resnet.categories[7]  # type: ignore[index]
    assert entry["target"]["prob"] == pytest.approx(expect.targets[0].prob, rel=1e-5)
    for name in LAYERS.split(","):
        rec = entry["layers"][name]
        want = expect[name].channels[0].numpy()
        got = np.asarray(rec["relevance"], np.float32)
        assert got.shape == want.shape  # one float per channel, in channel order
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        # the grid shows every channel, most relevant first
        ranked = np.argsort(-np.asarray(rec["relevance"]), kind="stable").tolist()
        assert rec["grid_channels"] == ranked
        assert got[rec["grid_channels"][0]] == got.max()
        assert (out / rec["cam"]).is_file()
    assert _manifest(out)["render"]["order"] == "relevance"


def test_cam_picture_is_gradcam_over_the_input(resnet: LoadedModel, photo: Path) -> None:
    x = _input(resnet, photo)
    r = relevance(resnet.module, x, "layer3", 1)
    cam = r["layer3"].gradcam[0].numpy()
    display = np.full((224, 224, 3), 128, np.uint8)
    pic = np.asarray(cam_picture(display, cam, "t").convert("RGB"), np.int32)
    # the peak of the map is drawn in jet's top colour (dark red) at half weight over grey
    h, w = cam.shape
    i, j = np.unravel_index(int(np.argmax(cam)), cam.shape)
    y, x0 = int((i + 0.5) * 224 / h), int((j + 0.5) * 224 / w)
    red = pic[y, x0]
    assert red[0] > red[2] + 30, red
    assert pic.shape[0] > 224  # the colour bar below the picture


def test_plain_run_computes_no_relevance(tmp_path: Path, resnet: LoadedModel, photo: Path) -> None:
    out = tmp_path / "p"
    run("resnet18", [photo], "layer4", out, model=resnet, device="cpu")
    entry = _manifest(out)["images"][0]
    assert "target" not in entry
    assert "relevance" not in entry["layers"]["layer4"]
    assert not list(out.rglob("*.cam.png"))


def test_cli_top1_relevance_order(tmp_path: Path, photo: Path) -> None:
    out = tmp_path / "c"
    args = ["run", "resnet18", str(photo), "--weights", "none", "--layers", "layer4"]
    assert cli([*args, "--order", "relevance", "--max-maps", "8", "--out", str(out)]) == 0
    entry = _manifest(out)["images"][0]
    rec = entry["layers"]["layer4"]
    assert len(rec["relevance"]) == 512
    assert (
        rec["grid_channels"]
        == np.argsort(-np.asarray(rec["relevance"]), kind="stable")[:8].tolist()
    )
    assert isinstance(entry["target"]["index"], int)  # the top-1 class
    Image.open(out / rec["cam"]).verify()


def test_unknown_label_is_refused(tmp_path: Path, photo: Path, capsys: Any) -> None:
    out = tmp_path / "u"
    code = cli(["run", "resnet18", str(photo), "--weights", "none", "--target", "tabbby"])
    err = capsys.readouterr().err
    assert code == 1
    assert "tabbby" in err and "tabby" in err and "Traceback" not in err
    assert not out.exists()


def test_non_classifier_class_target_is_refused(
    toy: torch.nn.Module, photo: Path, tmp_path: Path
) -> None:
    loaded = LoadedModel(toy, Preprocess(), "toy", "random")  # 10 outputs, no labels
    out = tmp_path / "never"
    with pytest.raises(TargetError, match="needs an ImageNet classifier"):
        run("toy", [photo], "features.0", out, model=loaded, relevance=RelevanceRequest())
    assert not out.exists()


@pytest.mark.slow
def test_done_when_efficientnet_tabby(tmp_path: Path) -> None:
    out = tmp_path / "d"
    cat = str(sample_image("cat"))
    args = ["run", "efficientnet_lite0", cat, "--layers", "stages", "--order", "relevance"]
    assert cli([*args, "--target", "tabby", "--out", str(out)]) == 0
    entry = _manifest(out)["images"][0]
    assert entry["target"]["label"] == "tabby"
    tabby = next(p for p in entry["predictions"] if p["label"] == "tabby")
    assert entry["target"]["prob"] == pytest.approx(tabby["probability"], rel=1e-4)
    for rec in entry["layers"].values():
        rel = np.asarray(rec["relevance"])
        assert rec["grid_channels"] == np.argsort(-rel, kind="stable")[:64].tolist()
        assert (out / rec["cam"]).is_file()
