"""The report's relevance: the embedded numbers against :func:`featuremaps.relevance`, the
grid order, and in Chromium the bars, the CAM, the class picker and the one-click order."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from featuremaps import load_model, relevance, sample_image
from featuremaps.images import load_image, preprocess
from featuremaps.models import LoadedModel
from featuremaps.relevance_outputs import RelevanceRequest
from featuremaps.report import write_report

LAYERS = "layer3,layer4"
CHROMIUM = os.environ.get("FEATUREMAPS_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SHOTS = Path(__file__).resolve().parents[1] / "test-output" / "screenshots"
TIMEOUT_MS = 60_000


def _data(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    m = re.search(r'<script type="application/json" id="fm-data">(.*?)</script>', text, re.S)
    assert m is not None
    return json.loads(m.group(1).replace("<\\/", "</"))


def _input(model: LoadedModel, path: Path) -> torch.Tensor:
    img = load_image(path, draft_size=model.preprocess.resize)
    return preprocess(img, model.preprocess)[None]


@pytest.fixture(scope="module")
def resnet() -> LoadedModel:
    torch.manual_seed(0)
    return load_model("resnet18", "none")


def test_report_embeds_relevance_of_target_and_top5(
    tmp_path: Path, resnet: LoadedModel, photo: Path
) -> None:
    req = RelevanceRequest(target="tabby", order=True, top_classes=5)
    path = write_report(
        tmp_path / "r.html", resnet, [photo], LAYERS, max_channels=12, relevance=req, device="cpu"
    )
    data = _data(path)
    image = data["images"][0]
    classes = image["relevance"]["classes"]
    x = _input(resnet, photo)
    logits = resnet.module(x)[0]
    top5 = logits.topk(5).indices.tolist()
    assert classes[0]["target"]["label"] == "tabby"
    assert [c["target"]["index"] for c in classes[1:]] == [i for i in top5 if i != 281]
    assert len(data["class_labels"]) == 1000
    for c in classes:
        expect = relevance(resnet.module, x, LAYERS, c["target"]["index"])
        for name in LAYERS.split(","):
            got = np.asarray(c["layers"][name]["relevance"], np.float64)
            want = expect[name].channels[0].double().numpy()
            # the target: 6 significant digits of the same computation; the other classes
            # run as one batch, whose float32 sums differ from a lone image's by rounding
            atol = 1e-9 if c is classes[0] else 1e-5 * np.abs(want).max()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)
            assert c["layers"][name]["cam"].startswith("data:image/jpeg;base64,")
    for name in LAYERS.split(","):  # the grid: the 12 most relevant to the target
        rel = np.asarray(classes[0]["layers"][name]["relevance"])
        ranked = np.argsort(-rel, kind="stable")[:12].tolist()
        assert image["layers"][name]["channels"] == ranked
    assert data["order_text"].startswith("most relevant")


def test_plain_report_has_no_relevance(tmp_path: Path, resnet: LoadedModel, photo: Path) -> None:
    path = write_report(tmp_path / "p.html", resnet, [photo], "layer4", max_channels=4)
    data = _data(path)
    assert "relevance" not in data["images"][0]
    assert data["class_labels"] is None


# -- in Chromium ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed")
    executable = shutil.which(CHROMIUM)
    if executable is None:
        pytest.skip(f"no Chromium at {CHROMIUM}")
    folder = tmp_path_factory.mktemp("rr")
    req = RelevanceRequest(target="tabby", order=False, top_classes=5)
    model = load_model("efficientnet_lite0")
    path = write_report(
        folder / "r.html", model, [sample_image("cat")], "stages", max_channels=16, relevance=req
    )
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, args=ARGS, timeout=TIMEOUT_MS)
        try:
            p = b.new_page(viewport={"width": 1440, "height": 1100})
            p.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            p.on("pageerror", lambda e: errors.append(str(e)))
            p.goto(path.as_uri())
            p.wait_for_selector("body[data-ready='1'] .relevance-panel")
            p.errors = errors  # type: ignore[attr-defined]
            p.data = _data(path)  # type: ignore[attr-defined]
            yield p
        finally:
            b.close()


def _grid(page: Any) -> list[int]:
    js = "cs => cs.map(c => c.dataset.channel)"
    return [int(c) for c in page.eval_on_selector_all(".image-section .grid .cell", js)]


@pytest.mark.browser
@pytest.mark.slow
def test_picker_bars_cam_and_order_in_chromium(page: Any) -> None:
    data = page.data
    classes = data["images"][0]["relevance"]["classes"]
    layer = page.evaluate("document.body.dataset.layer")
    options = page.eval_on_selector_all(".class-picker option", "os => os.map(o => o.textContent)")
    assert len(options) == len(classes) == 5  # tabby is one of the top-5 on the cat
    assert options[0].startswith("tabby")
    embedded = data["images"][0]["layers"][layer]["channels"]
    assert _grid(page) == embedded  # the index order until asked
    page.click(".order-relevance")
    rel = classes[0]["layers"][layer]["relevance"]
    assert _grid(page) == sorted(embedded, key=lambda c: (-rel[c], embedded.index(c)))
    # another class: its CAM and its ranking
    page.select_option(".class-picker", "1")
    assert page.get_attribute(".cam-img", "src") == classes[1]["layers"][layer]["cam"]
    rel1 = classes[1]["layers"][layer]["relevance"]
    assert _grid(page) == sorted(embedded, key=lambda c: (-rel1[c], embedded.index(c)))
    # the bars: red above the line for the most relevant channel, blue below for the least
    px = page.eval_on_selector(
        ".relevance-bars",
        "c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let red = 0, blue = 0; for (let i = 0; i < d.length; i += 4) {"
        " if (d[i] > 150 && d[i + 2] < 100) red++; if (d[i + 2] > 150 && d[i] < 100) blue++; }"
        " return [red, blue]; }",
    )
    assert px[0] > 0 and px[1] > 0, px
    # a label that is not embedded: the command that embeds it
    page.fill(".class-search", "goldfish")
    page.dispatch_event(".class-search", "change")
    assert "--target 'goldfish'" in page.text_content(".class-note")
    page.fill(".class-search", "tiger cat")
    page.dispatch_event(".class-search", "change")
    chosen = next(k for k, c in enumerate(classes) if c["target"]["label"] == "tiger cat")
    assert page.eval_on_selector(".class-picker", "s => s.value") == str(chosen)
    page.select_option(".class-picker", "0")
    page.eval_on_selector(".relevance-panel", "e => { e.scrollIntoView(); scrollBy(0, -70); }")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "report-relevance.png"))
    assert page.errors == []


def test_cli_report_target(tmp_path: Path, photo: Path) -> None:
    from featuremaps.cli import main

    out = tmp_path / "c.html"
    args = ["report", "resnet18", str(photo), "--weights", "none", "--layers", "layer4"]
    try:
        main([*args, "--target", "5", "--max-maps", "4", "--out", str(out)])
    except SystemExit as exc:
        assert not exc.code
    classes = _data(out)["images"][0]["relevance"]["classes"]
    assert classes[0]["target"]["index"] == 5
    assert len(classes[0]["layers"]["layer4"]["relevance"]) == 512


def test_report_class_target_needs_a_classifier(
    tmp_path: Path, toy: torch.nn.Module, photo: Path
) -> None:
    from featuremaps.models import Preprocess
    from featuremaps.relevance import TargetError

    loaded = LoadedModel(toy, Preprocess(), "toy", "random")
    req = RelevanceRequest(target=3, order=True, top_classes=5)
    with pytest.raises(TargetError, match="needs an ImageNet classifier"):
        write_report(tmp_path / "t.html", loaded, [photo], "features.0", relevance=req)
    assert not (tmp_path / "t.html").exists()
