"""Relevance and feature visualization in the viewer, in a real browser.

Debian's Chromium, driven by Playwright, opens a viewer served by uvicorn on 127.0.0.1,
captures the offline EfficientNet-Lite0 on the bundled cat photo, picks ``tabby`` in the
class picker, sees the relevance bars and both CAM overlays, orders the grid by
relevance with one click, and runs a (short) visualize job in the channel view. The page
is kept as ``test-output/screenshots/viewer-relevance.png``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")

from featuremaps import load_image, load_model, preprocess, sample_image
from featuremaps.relevance import relevance
from featuremaps.serve import create_app

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TIMEOUT_MS = 120_000
SHOTS = Path(__file__).resolve().parents[1] / "test-output" / "screenshots"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start within 10 s"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=15)
        sock.close()


def test_class_picker_relevance_cam_order_and_visualize(browser: Any, server: str) -> None:
    page = browser.new_page(viewport={"width": 1500, "height": 1250})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(server + "/")
        page.wait_for_selector("body[data-ready='1']")
        page.click("button[data-sample='cat']")
        page.wait_for_selector("body[data-image]")
        page.click("#capture-button")
        page.wait_for_selector("body[data-capture]")
        page.wait_for_selector("#grid-img[data-layer='_blocks.0']")
        page.click("#layer-list button[data-layer='_blocks.10']")
        page.wait_for_selector("#grid-img[data-layer='_blocks.10']")

        # the class picker: search, then pick tabby
        assert page.is_visible("#class-card")
        page.fill("#class-search", "tabb")
        page.wait_for_selector("#class-results button[data-index='281']")
        page.click("#class-results button[data-index='281']")
        page.wait_for_selector("#relevance-view[data-target='281'][data-layer='_blocks.10']")
        assert "tabby" in page.inner_text("#relevance-title")

        # the bars are the API's numbers, most relevant first
        pos = page.eval_on_selector_all(
            "#relevance-pos li", "els => els.map(e => [+e.dataset.channel, +e.dataset.value])"
        )
        neg = page.eval_on_selector_all(
            "#relevance-neg li", "els => els.map(e => [+e.dataset.channel, +e.dataset.value])"
        )
        assert len(pos) == 10 and len(neg) == 6
        assert all(v > 0 for _, v in pos) and all(v < 0 for _, v in neg)
        m = load_model("efficientnet_lite0")
        x = preprocess(load_image(sample_image("cat")), m.preprocess)[None]
        ref = relevance(m.module, x, "_blocks.10", target=281)["_blocks.10"].channels[0].numpy()
        ranked = np.argsort(-ref.astype(np.float64), kind="stable")
        assert [c for c, _ in pos] == ranked[:10].tolist()
        np.testing.assert_allclose([v for _, v in pos], ref[ranked[:10]], rtol=1e-5)
        assert [c for c, _ in neg] == ranked[::-1][:6].tolist()

        # both CAM overlays are drawn
        for cam in ("#cam-gradcam", "#cam-layercam"):
            page.wait_for_function(
                f"() => document.querySelector('{cam}').complete && "
                f"document.querySelector('{cam}').naturalWidth === 224"
            )
        assert page.inner_text("#cam-gradcam-range").startswith("(0 …")

        # one click orders the grid by relevance
        page.click("#order-relevance")
        page.wait_for_selector("#grid-img[data-order='relevance']")
        shown = json.loads(page.get_attribute("#grid-img", "data-channels") or "[]")
        assert shown[:10] == ranked[:10].tolist()
        assert "most relevant to tabby" in page.inner_text("#grid-note")

        # a bar opens its channel; visualize it (few steps: a test, not a picture to keep)
        page.click(f"#relevance-pos li[data-channel='{ranked[0]}']")
        page.wait_for_selector(f"#channel-pane[data-channel='{ranked[0]}']")
        assert "relevance to tabby" in page.inner_text("#channel-stats").lower()
        page.select_option("#vis-steps", "32")
        page.select_option("#vis-size", "64")
        page.click("#vis-button")
        page.wait_for_selector("#vis-result:not([hidden])")
        page.wait_for_function("() => document.querySelector('#vis-img').naturalWidth === 64")
        assert page.get_attribute("#vis-img", "data-objective") == f"channel:_blocks.10:{ranked[0]}"
        assert "32 steps at 64 px" in page.inner_text("#vis-caption")
        assert "Done in" in page.inner_text("#vis-status")
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(SHOTS / "viewer-relevance.png"), full_page=True)
        assert errors == []
    finally:
        page.close()


def test_a_model_without_imagenet_classes_says_so(browser: Any, server: str) -> None:
    """Random weights: the picker still works and says the numbers mean little."""
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(server + "/")
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#model-input", "resnet18")
        page.select_option("#weights-select", "none")
        page.click("button[data-sample='coffee']")
        page.wait_for_selector("body[data-image]")
        page.click("#capture-button")
        page.wait_for_function("() => (document.body.dataset.capture || '') !== ''")
        page.wait_for_selector("#class-card[data-classifier='1']")
        assert "Random weights" in page.inner_text("#class-note")
        assert page.is_enabled("#class-search")
    finally:
        page.close()
