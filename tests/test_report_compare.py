"""``featuremaps report --compare``: two checkpoints' PCA pictures in one basis, checked
against an independent joint fit (numpy SVD over the pixels of both maps)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from featuremaps import analyze, load_model
from featuremaps.report import write_report

LAYERS = "layer3,layer4"


def _data(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    m = re.search(r'<script type="application/json" id="fm-data">(.*?)</script>', text, re.S)
    assert m is not None
    return json.loads(m.group(1).replace("<\\/", "</"))


def _png(url: str) -> np.ndarray:
    raw = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), np.float64) / 255.0


def _joint_fit(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent joint PCA of two (C, H, W) maps: (H, W, 3) pictures in [0, 1]."""
    xa = a.reshape(a.shape[0], -1).T
    xb = b.reshape(b.shape[0], -1).T
    x = np.concatenate([xa, xb]).astype(np.float64)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comp = vt[:3]
    comp *= np.sign(comp[np.arange(3), np.abs(comp).argmax(1)])[:, None]
    ya, yb = (xa - mean) @ comp.T, (xb - mean) @ comp.T
    both = np.concatenate([ya, yb])
    lo, hi = both.min(0), both.max(0)
    return (
        ((ya - lo) / (hi - lo)).reshape(*a.shape[1:], 3),
        ((yb - lo) / (hi - lo)).reshape(*b.shape[1:], 3),
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("ckpt") / "b.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def test_two_checkpoints_share_one_basis(tmp_path: Path, photo: Path, checkpoint: Path) -> None:
    torch.manual_seed(0)
    a = load_model("resnet18", "none")
    b = load_model("resnet18", str(checkpoint))
    path = write_report(
        tmp_path / "c.html",
        a,
        [photo],
        LAYERS,
        max_channels=4,
        compare=b,
        weights_b=str(checkpoint),
        device="cpu",
    )
    image = _data(path)["images"][0]
    maps_a = analyze(a, [photo], LAYERS, device="cpu", with_predictions=False)[0].maps
    maps_b = analyze(b, [photo], LAYERS, device="cpu", with_predictions=False)[0].maps
    for name in LAYERS.split(","):
        rec = image["compare"]["layers"][name]
        assert rec["layer_b"] == name and rec["channels"][0] == rec["channels"][1]
        want_a, want_b = _joint_fit(maps_a[name][0].numpy(), maps_b[name][0].numpy())
        got_a, got_b = _png(rec["pca_a"]), _png(rec["pca_b"])
        assert got_a.shape == want_a.shape and got_b.shape == want_b.shape
        np.testing.assert_allclose(got_a, want_a, atol=1.5 / 255)
        np.testing.assert_allclose(got_b, want_b, atol=1.5 / 255)
        # one colour scale: each component reaches 0 and 1 over both pictures together,
        # not in each on its own
        both = np.concatenate([want_a.reshape(-1, 3), want_b.reshape(-1, 3)])
        np.testing.assert_allclose(both.min(0), 0, atol=1e-9)
        np.testing.assert_allclose(both.max(0), 1, atol=1e-9)
    assert image["compare"]["weights"] == str(checkpoint)


def test_cli_report_compare_widths_differ(tmp_path: Path, photo: Path, checkpoint: Path) -> None:
    from featuremaps.cli import main

    out = tmp_path / "w.html"
    args = ["report", "resnet18", str(photo), "--weights", "none", "--layers", "layer1"]
    try:
        main([*args, "--compare", "resnet50", "--weights-b", "none", "--out", str(out)])
    except SystemExit as exc:
        assert not exc.code
    rec = _data(out)["images"][0]["compare"]["layers"]["layer1"]
    assert rec["channels"] == [64, 256]
    assert "one width" in rec["note"] and "pca_a" not in rec


@pytest.mark.browser
def test_side_by_side_in_chromium(tmp_path: Path, photo: Path, checkpoint: Path) -> None:
    import os
    import shutil

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed")
    executable = shutil.which(os.environ.get("FEATUREMAPS_CHROMIUM", "/usr/bin/chromium"))
    if executable is None:
        pytest.skip("no Chromium")
    torch.manual_seed(0)
    a = load_model("resnet18", "none")
    b = load_model("resnet18", str(checkpoint))
    path = write_report(
        tmp_path / "c.html", a, [photo], LAYERS, max_channels=4, compare=b, device="cpu"
    )
    image = _data(path)["images"][0]
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=args, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(path.as_uri())
            page.wait_for_selector("body[data-ready='1'] .compare-panel img")
            srcs = page.eval_on_selector_all(".compare-panel img", "is => is.map(i => i.src)")
            rec = image["compare"]["layers"]["layer3"]
            assert srcs == [rec["pca_a"], rec["pca_b"]]
            page.click("#layer-nav button[data-layer='layer4']")
            page.wait_for_selector(".compare-panel[data-layer='layer4']")
            srcs = page.eval_on_selector_all(".compare-panel img", "is => is.map(i => i.src)")
            rec = image["compare"]["layers"]["layer4"]
            assert srcs == [rec["pca_a"], rec["pca_b"]]
            js = "e => { e.scrollIntoView(); scrollBy(0, -90); }"
            page.eval_on_selector(".compare-panel", js)
            shots = Path(__file__).resolve().parents[1] / "test-output" / "screenshots"
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots / "report-compare.png"))
            assert errors == []
        finally:
            browser.close()
