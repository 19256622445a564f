"""The viewer's second model: both PCA pictures of a layer in one basis fitted over both.

The API's pictures are compared with an independent recomputation (the models loaded and
captured here, :func:`featuremaps.pca.joint_basis` over both maps, then ``pca_rgb``).
The server reads no weight files from requests, so A and B are two torchvision names of
one family with random (seeded) weights: resnet18 and resnet34, whose stage widths match.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from featuremaps import load_image, load_model, preprocess, sample_image
from featuremaps.capture import capture
from featuremaps.pca import joint_basis, pca_rgb
from featuremaps.render import pca_picture
from featuremaps.serve import create_app

BASE = "http://127.0.0.1:8000"
SHOTS = Path(__file__).resolve().parents[1] / "test-output" / "screenshots"


def wait(client: TestClient, job: dict[str, Any], seconds: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    for _ in range(20_000):
        if job["status"] in ("done", "error") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
        job = client.get(f"/api/jobs/{job['job_id']}").json()
    return job


def png(resp: Any) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(resp.content)).convert("RGB")).astype(int)


def reference_map(name: str, layer: str) -> Any:
    """The ``(C, H, W)`` map of ``layer`` of ``name`` (random seeded weights) on the cat."""
    m = load_model(name, "none")
    x = preprocess(load_image(sample_image("cat")), m.preprocess)[None]
    return capture(m.module, x, [layer])[layer][0]


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(), base_url=BASE) as c:
        yield c


@pytest.fixture(scope="module")
def image_id(client: TestClient) -> str:
    return str(client.post("/api/samples/cat").json()["image_id"])


def start_pair(client: TestClient, image_id: str, a: str, b: str) -> dict[str, Any]:
    body = {
        "model": a,
        "weights": "none",
        "image_id": image_id,
        "compare_model": b,
        "compare_weights": "none",
    }
    job = wait(client, client.post("/api/captures", json=body).json())
    assert job["status"] == "done", job
    assert job["compare_id"] and job["compare_id"] != job["capture_id"]
    return job


@pytest.fixture(scope="module")
def pair(client: TestClient, image_id: str) -> dict[str, Any]:
    return start_pair(client, image_id, "resnet18", "resnet34")


def test_both_captures_exist(client: TestClient, pair: dict[str, Any]) -> None:
    a = client.get(f"/api/captures/{pair['capture_id']}").json()
    b = client.get(f"/api/captures/{pair['compare_id']}").json()
    assert (a["model"], b["model"]) == ("resnet18", "resnet34")
    assert "layer1.2" in {r["name"] for r in b["layers"]}


def test_pictures_equal_an_independent_joint_fit(client: TestClient, pair: dict[str, Any]) -> None:
    layer = "layer2"
    url = f"/api/captures/{pair['capture_id']}/compare/{pair['compare_id']}"
    info = client.get(url, params={"layer": layer}).json()
    assert info["joint"] is True and info["note"] is None
    assert (info["channels_a"], info["channels_b"]) == (128, 128)

    map_a, map_b = reference_map("resnet18", layer), reference_map("resnet34", layer)
    basis = joint_basis(map_a[None], map_b[None], 3)
    got = np.zeros(0)
    for side, m in (("a", map_a), ("b", map_b)):
        resp = client.get(url + "/pca.png", params={"layer": layer, "side": side, "size": 224})
        assert resp.headers["X-Featuremaps-Joint"] == "1"
        got = png(resp)
        want = np.asarray(pca_picture(pca_rgb(m, 3, basis=basis), 224)).astype(int)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1
    # the joint basis is not B's own basis: the colours differ from B's single picture
    own = np.asarray(pca_picture(pca_rgb(map_b, 3), 224)).astype(int)
    assert np.abs(got - own).max() > 8  # got: B's picture from the server


def test_different_widths_give_the_note(client: TestClient, image_id: str) -> None:
    job = start_pair(client, image_id, "resnet18", "resnet50")
    url = f"/api/captures/{job['capture_id']}/compare/{job['compare_id']}"
    info = client.get(url, params={"layer": "layer1"}).json()
    assert (info["channels_a"], info["channels_b"], info["joint"]) == (64, 256, False)
    assert "64 channels" in info["note"] and "256" in info["note"]
    resp = client.get(url + "/pca.png", params={"layer": "layer1", "side": "b", "size": 224})
    assert resp.headers["X-Featuremaps-Joint"] == "0"
    own = np.asarray(pca_picture(pca_rgb(reference_map("resnet50", "layer1"), 3), 224))
    assert np.abs(png(resp) - own.astype(int)).max() <= 1


def test_layer_missing_in_b(client: TestClient, image_id: str) -> None:
    job = start_pair(client, image_id, "resnet34", "resnet18")
    url = f"/api/captures/{job['capture_id']}/compare/{job['compare_id']}"
    info = client.get(url, params={"layer": "layer1.2"}).json()
    assert info["channels_b"] is None and "no layer named" in info["note"]
    resp = client.get(url + "/pca.png", params={"layer": "layer1.2", "side": "b"})
    assert resp.status_code == 404 and "no layer named" in resp.json()["detail"]


@pytest.mark.parametrize(
    ("spec", "weights", "code"),
    [("os:system", "none", 403), ("resnet18", "/etc/passwd", 400), ("resnet9000", "none", 400)],
)
def test_second_spec_policy(
    client: TestClient, image_id: str, spec: str, weights: str, code: int
) -> None:
    body = {"model": "resnet18", "weights": "none", "image_id": image_id}
    body |= {"compare_model": spec, "compare_weights": weights}
    resp = client.post("/api/captures", json=body)
    assert resp.status_code == code, resp.text


# -- in a real browser ------------------------------------------------------------------------

TIMEOUT_MS = 120_000


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


@pytest.mark.browser
@pytest.mark.slow
def test_viewer_shows_both_pictures(browser: Any, server: str) -> None:
    page = browser.new_page(viewport={"width": 1500, "height": 1250})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(server + "/")
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#model-input", "resnet18")
        page.select_option("#weights-select", "none")
        page.fill("#compare-input", "resnet34")
        page.select_option("#compare-weights", "none")
        page.click("button[data-sample='cat']")
        page.wait_for_selector("body[data-image]")
        page.click("#capture-button")
        page.wait_for_selector("body[data-capture]")
        page.click("#layer-list button[data-layer='layer2']")
        page.click("button.tab[data-tab='pca']")
        page.wait_for_selector("#pca-joint-b[data-joint='1']")
        loaded = (
            "() => ['pca-joint-a', 'pca-joint-b'].every(id => { const i = "
            "document.getElementById(id); return i.complete && i.naturalWidth > 0 && "
            "i.src.includes('layer2'); })"
        )
        deadline = time.monotonic() + 120
        while not page.evaluate(loaded) and time.monotonic() < deadline:
            page.wait_for_timeout(100)
        assert page.evaluate(loaded), "the two PCA pictures did not load"
        assert page.is_visible("#pca-joint-a") and page.is_visible("#pca-joint-b")
        assert "one PCA basis" in page.inner_text("#pca-compare-note")
        assert "resnet34" in page.inner_text("#pca-joint-b-cap")
        # the picture the page shows is the API's joint-basis picture of B
        src_b = page.get_attribute("#pca-joint-b", "src")
        assert src_b is not None and "side=b" in src_b
        shown = page.evaluate(
            "async (u) => Array.from(new Uint8Array(await (await fetch(u)).arrayBuffer()))", src_b
        )
        got = np.asarray(Image.open(io.BytesIO(bytes(shown))).convert("RGB")).astype(int)
        map_a, map_b = reference_map("resnet18", "layer2"), reference_map("resnet34", "layer2")
        basis = joint_basis(map_a[None], map_b[None], 3)
        want = np.asarray(pca_picture(pca_rgb(map_b, 3, basis=basis), 448)).astype(int)
        assert got.shape == want.shape and np.abs(got - want).max() <= 1
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.locator("#pca-pane").screenshot(path=str(SHOTS / "viewer-compare.png"))
        assert errors == []
    finally:
        page.close()
