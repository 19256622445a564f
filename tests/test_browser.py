"""The report and the viewer in a real browser: Debian's Chromium driven by Playwright.

Each view is kept as a screenshot under ``test-output/screenshots/``. Without Chromium the
tests skip locally and fail in CI (``CI`` set), which must exercise them.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from featuremaps import analyze, load_model, sample_image
from featuremaps.reduce import select_channels
from featuremaps.render import LEVEL_LUT, LEVELS, colormap_lut, level_index
from featuremaps.report import quantize, write_report

pytestmark = pytest.mark.browser

SHOTS = Path(__file__).resolve().parents[1] / "test-output" / "screenshots"
TIMEOUT_MS = 60_000
HOSTILE = 'coffee <img src=x onerror="alert(1)">.jpg'


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1440, "height": 1100})
    p = context.new_page()
    p.set_default_timeout(TIMEOUT_MS)
    p.errors = []  # type: ignore[attr-defined]
    p.on("pageerror", lambda e: p.errors.append(str(e)))  # type: ignore[attr-defined]
    p.on("dialog", lambda d: (p.errors.append("dialog: " + d.message), d.dismiss()))  # type: ignore[attr-defined]
    try:
        yield p
    finally:
        context.close()


def shot(page: Any, name: str, full_page: bool = False) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


def canvas_rgb(page: Any, selector: str) -> np.ndarray:
    w, h, data = page.eval_on_selector(
        selector,
        "c => [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width,"
        " c.height).data)]",
    )
    return np.array(data, dtype=np.uint8).reshape(h, w, 4)[..., :3]


# -- the report -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    folder = tmp_path_factory.mktemp("report")
    hostile = folder / HOSTILE
    shutil.copy(sample_image("coffee"), hostile)
    model = load_model("efficientnet_lite0")
    path = write_report(folder / "report.html", model, [sample_image("cat"), hostile], "stages")
    results = analyze(model, [sample_image("cat")], "stages", device="cpu")
    return path, results[0].maps


def test_report_opens_offline_and_enlarges_a_channel(page: Any, report: tuple[Path, Any]) -> None:
    path, maps = report
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']")

    # both sections, the photos at the model's input size, the escaped hostile file name
    assert page.locator(".image-section").count() == 2
    names = page.locator(".image-name").all_inner_texts()
    assert names == ["cat.jpg", HOSTILE]
    sizes = page.eval_on_selector_all(
        ".input-img", "els => els.map(e => [e.naturalWidth, e.naturalHeight])"
    )
    assert sizes == [[224, 224], [224, 224]]
    preds = page.locator(".image-section").first.locator(".pred-label").all_inner_texts()
    assert len(preds) == 5 and preds[0] in ("Egyptian cat", "tabby", "tiger cat")
    assert page.locator("#layer-nav button").count() == 5

    # the shared layer navigation switches every section
    page.click("#layer-nav button[data-layer='_blocks.4']")
    page.wait_for_selector("body[data-layer='_blocks.4']")
    for i in range(2):
        grid = page.locator(f"#img-{i} .grid[data-layer='_blocks.4'] .cell")
        assert grid.count() == 40
    pca = page.eval_on_selector("#img-0 .pca-img", "e => [e.naturalWidth, e.naturalHeight]")
    assert pca == [28, 28]
    shot(page, "report-overview")

    # click a channel: the enlarged map is the activation through the colormap
    ch = 5
    page.click(f"#img-0 .cell[data-channel='{ch}']")
    page.wait_for_selector(f"#channel-dialog[open][data-channel='{ch}']")
    t = maps["_blocks.4"][0].numpy()
    channels = select_channels(t, "index", 64)
    q, vmin, vmax = quantize(t[channels])
    lut = colormap_lut("viridis")
    big = canvas_rgb(page, "#dlg-channel")
    assert big.shape == (28, 28, 3)
    assert (big != lut[q[ch]]).any(axis=-1).mean() < 0.01
    shown = page.eval_on_selector("#dlg-channel", "e => e.getBoundingClientRect().width")
    assert shown > 300  # drawn large
    bar = page.eval_on_selector("#dlg-colorbar", "e => [e.dataset.vmin, e.dataset.vmax]")
    assert float(bar[0]) == pytest.approx(float(vmin[ch]), rel=1e-4)
    assert float(bar[1]) == pytest.approx(float(vmax[ch]), rel=1e-4)
    assert page.inner_text("#cb-min") == f"{float(vmin[ch]):.4g}".rstrip("0").rstrip(".")
    overlay = canvas_rgb(page, "#dlg-overlay")
    assert overlay.shape == (224, 224, 3)
    assert overlay.std() > 10  # the photo shows through
    shot(page, "report-channel")

    # the next channel, then another colormap: the same quantized map, other colours
    page.keyboard.press("ArrowRight")
    page.wait_for_selector(f"#channel-dialog[data-channel='{ch + 1}']")
    assert (canvas_rgb(page, "#dlg-channel") != lut[q[ch + 1]]).any(axis=-1).mean() < 0.01
    page.keyboard.press("Escape")
    page.wait_for_selector("#channel-dialog:not([open])", state="attached")
    page.select_option("#cmap-select", "magma")
    page.click(f"#img-0 .cell[data-channel='{ch}']")
    page.wait_for_selector(f"#channel-dialog[open][data-channel='{ch}']")
    magma = colormap_lut("magma")
    assert (canvas_rgb(page, "#dlg-channel") != magma[q[ch]]).any(axis=-1).mean() < 0.01

    assert page.errors == []  # type: ignore[attr-defined]
    offline = [u for u in requests if not u.startswith(("file:", "data:", "blob:"))]
    assert offline == [], offline


def test_report_levels_are_computed_as_render_does(page: Any, report: tuple[Path, Any]) -> None:
    """The page's level rounding is render.level_index, bit for bit, in float32 and float64;
    the colorbar and the layer-scale colours follow from it and the embedded LEVEL_LUT."""
    path, _ = report
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']")
    rng = np.random.default_rng(0)
    ties = (np.arange(LEVELS - 1) + 0.5) / (LEVELS - 1)  # exactly between two levels
    s64 = np.concatenate(
        [[0.0, 1.0], rng.random(2000), ties, np.nextafter(ties, 0), np.nextafter(ties, 1)]
    )
    s32 = np.concatenate([s64.astype(np.float32), np.nextafter(ties.astype(np.float32), 2)])
    got = page.evaluate(
        "([a, b, n]) => [a.map(s => featuremapsCommon.levelIndex(s, n, true)),"
        " b.map(s => featuremapsCommon.levelIndex(s, n, false))]",
        [s32.astype(np.float64).tolist(), s64.tolist(), LEVELS],
    )
    np.testing.assert_array_equal(got[0], level_index(s32))
    np.testing.assert_array_equal(got[1], level_index(s64))
    assert (level_index(s32) != level_index(s32.astype(np.float64))).any()  # precision matters
    assert page.evaluate("featuremapsCommon.levelIndex(NaN, 250, true)") == LEVELS + 1

    data = page.evaluate("featuremapsReport.page.data")
    assert data["level_lut"] == LEVEL_LUT.tolist() and data["levels"] == LEVELS
    bar = page.evaluate("Array.from(featuremapsReport.page.colorbarTable())")
    np.testing.assert_array_equal(bar, LEVEL_LUT[level_index(np.arange(256) / 255)])

    # the layer's shared range: each stored q of a channel is re-levelled on that range
    page.select_option("#scale-select", "layer")
    page.wait_for_selector("#img-0 .grid .cell canvas")
    name = page.evaluate("featuremapsReport.page.state.layer")
    layer = data["images"][0]["layers"][name]
    lo, hi = min(layer["vmin"]), max(layer["vmax"])
    q = np.arange(256)
    for i in (0, 3, len(layer["channels"]) - 1):
        a, b = layer["vmin"][i], layer["vmax"][i]
        f = np.clip((a + (q / 255) * (b - a) - lo) / (hi - lo), 0.0, 1.0)
        expect = LEVEL_LUT[level_index(f)]
        table = page.evaluate(
            "([n, i]) => { const p = featuremapsReport.page;"
            " return Array.from(p.tableOf(p.data.images[0].layers[n], i)); }",
            [name, i],
        )
        np.testing.assert_array_equal(table, expect)
        cell = canvas_rgb(page, f"#img-0 .cell[data-pos='{i}'] canvas")
        stored = cells_of(layer)[i]
        np.testing.assert_array_equal(cell, colormap_lut("viridis")[expect[stored]])
    assert page.errors == []  # type: ignore[attr-defined]


def cells_of(layer: dict[str, Any]) -> list[np.ndarray]:
    """The stored (quantized) channel maps of a layer's atlas, in shown order."""
    import base64
    import io

    from PIL import Image

    atlas = np.asarray(Image.open(io.BytesIO(base64.b64decode(layer["atlas"].split(",", 1)[1]))))
    h, w, cols = layer["h"], layer["w"], layer["cols"]
    return [
        atlas[(i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w]
        for i in range(len(layer["channels"]))
    ]


# -- the viewer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    pytest.importorskip("fastapi")
    import uvicorn

    from featuremaps.serve import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(
        uvicorn.Config(create_app(max_upload_bytes=2_000_000), log_level="warning")
    )
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


def click_channel(page: Any, ch: int) -> None:
    """Click the centre of channel ``ch``'s cell in the grid picture."""
    meta = page.eval_on_selector(
        "#grid-img",
        "e => { const r = e.getBoundingClientRect(); return [r.x, r.y, r.width / e.naturalWidth,"
        " JSON.parse(e.dataset.channels), JSON.parse(e.dataset.boxes)] }",
    )
    x, y, scale, channels, boxes = meta
    x0, y0, x1, y1 = boxes[channels.index(ch)]
    page.mouse.click(x + (x0 + x1) / 2 * scale, y + (y0 + y1) / 2 * scale)


def test_viewer_captures_and_shows_a_channel(page: Any, server: str) -> None:
    page.goto(server + "/")
    page.wait_for_selector("body[data-ready='1']")
    assert page.input_value("#model-input") == "efficientnet_lite0"
    page.click("button.sample[data-sample='cat']")
    page.wait_for_selector("#capture-button:not([disabled])")
    page.click("#capture-button")
    page.wait_for_selector("#grid-img[data-layer='_blocks.0']")
    assert "Captured efficientnet_lite0" in page.inner_text("#status-text")
    assert page.eval_on_selector("#input-img", "e => e.naturalWidth") == 224
    assert page.locator("#pred-list li").count() == 5
    assert page.locator("#layer-list button.stage").count() == 5

    page.click("#layer-list button[data-layer='_blocks.10']")
    page.wait_for_selector("#grid-img[data-layer='_blocks.10']")
    assert "112×14×14" in page.inner_text("#layer-meta")
    shot(page, "viewer-layer")

    click_channel(page, 3)
    page.wait_for_selector("#channel-pane[data-channel='3']")
    assert page.inner_text("#channel-title") == "_blocks.10 · channel 3"
    big = page.eval_on_selector("#channel-img", "e => [e.naturalWidth, e.naturalHeight]")
    assert big == [448, 448]  # 14x14 map, 32x nearest
    ov = page.eval_on_selector("#overlay-img", "e => [e.naturalWidth, e.naturalHeight]")
    assert ov == [224, 224]
    labels = page.locator("#cb-labels span").all_inner_texts()
    assert len(labels) == 3
    vmin = float(page.get_attribute("#cb-labels", "data-vmin") or "nan")
    assert float(labels[0]) == pytest.approx(vmin, rel=2e-3)
    assert page.is_visible("#grid-selected")
    shot(page, "viewer-channel")

    # colormap, channel order and norm switch the pictures
    page.select_option("#cmap-select", "magma")
    page.wait_for_selector("#grid-img[data-cmap='magma']")
    page.wait_for_function("() => document.getElementById('channel-img').src.includes('magma')")
    page.select_option("#order-select", "top")
    page.wait_for_function(
        "() => JSON.parse(document.getElementById('grid-img').dataset.channels)[0] !== 0"
    )
    page.select_option("#norm-select", "symlog")
    page.wait_for_function("() => document.getElementById('channel-img').src.includes('symlog')")

    # PCA per layer
    page.click(".tab[data-tab='pca']")
    page.wait_for_function(
        "() => { const e = document.getElementById('pca-img');"
        " return e.complete && e.naturalWidth > 0 }"
    )
    assert page.eval_on_selector("#pca-img", "e => e.naturalWidth") == 448
    shot(page, "viewer-pca")
    assert page.errors == []  # type: ignore[attr-defined]


def test_viewer_uploads_and_explains_refusals(page: Any, server: str, tmp_path: Path) -> None:
    page.goto(server + "/")
    page.wait_for_selector("body[data-ready='1']")
    junk = tmp_path / "notes.jpg"
    junk.write_bytes(b"not an image at all")
    page.set_input_files("#file-input", str(junk))
    page.wait_for_selector("#status-bar[data-state='error']")
    assert "not a readable image" in page.inner_text("#status-text")

    page.set_input_files("#file-input", str(sample_image("coffee")))
    page.wait_for_selector("#capture-button:not([disabled])")
    page.fill("#model-input", "torchvision.models:resnet18")
    page.click("#capture-button")
    page.wait_for_selector("#status-bar[data-state='error']")
    assert "--allow-code-models" in page.inner_text("#status-text")

    page.fill("#model-input", "efficientnet_lite0")
    page.click("#capture-button")
    page.wait_for_selector("#grid-img[data-layer='_blocks.0']")
    assert page.locator("#pred-list .pred-label").first.inner_text() == "espresso"
