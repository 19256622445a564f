"""The viewer's relevance to a class and its feature visualizations, against the libraries.

The numbers the API answers are compared with independent calls of
:func:`featuremaps.relevance.relevance` and :func:`featuremaps.visualize.visualize`; the
CAM pictures with the map scaled from 0 to its maximum as the legend says.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from featuremaps import load_image, load_model, preprocess, sample_image
from featuremaps.images import display_image
from featuremaps.relevance import relevance
from featuremaps.render import colorize, overlay, upsample
from featuremaps.serve import create_app
from featuremaps.visualize import visualize

BASE = "http://127.0.0.1:8000"
LAYERS = ["_blocks.10", "head_act", "_blocks.5._depthwise_conv"]  # stage, stage, on demand


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
    return np.asarray(Image.open(io.BytesIO(resp.content)).convert("RGB"))


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(), base_url=BASE) as c:
        yield c


@pytest.fixture(scope="module")
def lite(client: TestClient) -> str:
    image_id = client.post("/api/samples/cat").json()["image_id"]
    body = {"model": "efficientnet_lite0", "weights": "DEFAULT", "image_id": image_id}
    job = wait(client, client.post("/api/captures", json=body).json())
    assert job["status"] == "done", job
    return str(job["capture_id"])


@pytest.fixture(scope="module")
def model() -> Any:
    return load_model("efficientnet_lite0")


@pytest.fixture(scope="module")
def x(model: Any) -> Any:
    return preprocess(load_image(sample_image("cat")), model.preprocess)[None]


@pytest.fixture(scope="module")
def reference(model: Any, x: Any) -> Any:
    """Relevance to tabby computed without the server, for the three layers at once."""
    return relevance(model.module, x, LAYERS, target="tabby")


def ask(client: TestClient, cid: str, target: Any, layer: str | None = None) -> Any:
    return client.post(f"/api/captures/{cid}/relevance", json={"target": target, "layer": layer})


@pytest.fixture(scope="module")
def tabby(client: TestClient, lite: str) -> int:
    r = ask(client, lite, "tabby", "_blocks.10")
    assert r.status_code in (200, 202), r.text
    job = wait(client, r.json())
    assert job["status"] == "done", job
    return int(job["result_id"])


# -- relevance ---------------------------------------------------------------------------------


def test_labels_are_the_imagenet_names(client: TestClient) -> None:
    labels = client.get("/api/labels").json()["labels"]
    assert len(labels) == 1000 and labels[281] == "tabby" and labels[967] == "espresso"


def test_relevance_numbers_equal_the_library(
    client: TestClient, lite: str, tabby: int, reference: Any
) -> None:
    assert tabby == 281
    for layer in LAYERS:
        r = client.get(f"/api/captures/{lite}/relevance/{tabby}", params={"layer": layer})
        assert r.status_code == 200, r.text
        got = r.json()
        want = reference[layer]
        channels = np.array(got["channels"], dtype=np.float64)
        expected = want.channels[0].double().numpy()
        np.testing.assert_allclose(channels, expected, rtol=1e-5, atol=1e-7)
        ranked = np.argsort(-want.channels[0].double().numpy(), kind="stable")
        assert got["order"][:10] == ranked[:10].tolist()
        assert got["cam_shape"] == list(want.gradcam.shape[1:])
        assert got["gradcam_max"] == pytest.approx(float(want.gradcam.max()), rel=1e-5)
        assert got["layercam_max"] == pytest.approx(float(want.layercam.max()), rel=1e-5)
        assert got["positive"] == pytest.approx(float(want.channels[want.channels > 0].sum()), 1e-5)
        assert got["negative"] == pytest.approx(float(want.channels[want.channels < 0].sum()), 1e-5)
        t = reference.targets[0]
        assert got["target"]["index"] == 281 and got["target"]["label"] == "tabby"
        assert got["target"]["prob"] == pytest.approx(t.prob, rel=1e-6)
        assert got["target"]["score"] == pytest.approx(t.score, rel=1e-6)


def test_cam_pictures_are_the_map_from_zero_to_its_maximum(
    client: TestClient, lite: str, tabby: int, reference: Any, model: Any, x: Any
) -> None:
    layer = "_blocks.10"
    for kind in ("gradcam", "layercam"):
        cam = getattr(reference[layer], kind)[0].numpy()
        top = float(cam.max())
        assert top > 0
        scaled = (cam / np.float32(top)).clip(0, 1)
        url = f"/api/captures/{lite}/relevance/{tabby}/cam.png"
        r = client.get(url, params={"layer": layer, "kind": kind, "mode": "map", "size": 140})
        got = png(r)
        assert json.loads(r.headers["x-featuremaps-range"])["vmax"] == pytest.approx(top, 1e-5)
        want = upsample(colorize(scaled, "jet"), 10)  # 14 x 14 map, size 140
        assert got.shape == want.shape
        assert (np.abs(got.astype(int) - want.astype(int)) > 0).mean() < 0.01
        ov = png(client.get(url, params={"layer": layer, "kind": kind, "alpha": 0.5}))
        shown = display_image(x[0], model.preprocess)
        expected = np.asarray(overlay(shown, scaled, alpha=0.5, cmap="jet"))
        assert ov.shape == expected.shape == (224, 224, 3)
        assert np.abs(ov.astype(int) - expected.astype(int)).max() <= 2


def test_tabby_gradcam_peaks_on_the_cat(client: TestClient, lite: str, tabby: int) -> None:
    r = client.get(
        f"/api/captures/{lite}/relevance/{tabby}/cam.png",
        params={"layer": "head_act", "mode": "map", "size": 70, "cmap": "gray"},
    )
    cam = png(r)[..., 0].astype(float)
    assert cam.max() == 255  # the maximum is drawn at the top of the scale
    # the cat fills the middle of the bundled photo; its borders are background
    h, w = cam.shape
    centre = cam[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].mean()
    assert centre > cam.mean()


def test_grid_ordered_by_relevance(
    client: TestClient, lite: str, tabby: int, reference: Any
) -> None:
    url = f"/api/captures/{lite}/grid.png"
    params: dict[str, Any] = {"layer": "_blocks.10", "order": "relevance", "max_maps": 8}
    r = client.get(url, params={**params, "target": tabby})
    png(r)
    shown = json.loads(r.headers["x-featuremaps-grid"])["channels"]
    ranked = np.argsort(-reference["_blocks.10"].channels[0].double().numpy(), kind="stable")
    assert shown == ranked[:8].tolist()
    missing = client.get(url, params=params)
    assert missing.status_code == 400 and "target" in missing.json()["detail"]
    never = client.get(url, params={**params, "target": 7})
    assert never.status_code == 404 and "class 7" in never.json()["detail"]


def test_class_picker_labels_are_validated(client: TestClient, lite: str, tabby: int) -> None:
    typo = ask(client, lite, "tabbby")
    assert typo.status_code == 400
    assert "unknown ImageNet label 'tabbby'" in typo.json()["detail"]
    assert "tabby" in typo.json()["detail"].split("Did you mean")[1]
    two = ask(client, lite, "cardigan")
    assert two.status_code == 400 and "264" in two.json()["detail"]
    assert "474" in two.json()["detail"]
    assert ask(client, lite, 1000).status_code == 400
    for wrong in (True, 2.5, [281]):
        r = ask(client, lite, wrong)
        assert r.status_code == 400 and "give a class index" in r.json()["detail"], wrong
    assert ask(client, lite, "x" * 500).status_code == 400
    assert ask(client, lite, "tabby", "no.such.layer").status_code == 404
    # any case, and the finished job is served from the cache
    again = ask(client, lite, " TABBY ", "_blocks.10")
    assert again.status_code == 200 and again.json()["phase"] == "cached"
    assert again.json()["result_id"] == str(tabby)


def test_no_target_means_the_top_prediction(client: TestClient, lite: str) -> None:
    top = client.get(f"/api/captures/{lite}").json()["predictions"][0]["index"]
    job = wait(client, ask(client, lite, None).json())
    assert job["status"] == "done" and job["result_id"] == str(top)


def test_a_class_target_needs_an_imagenet_classifier() -> None:
    with TestClient(create_app(allow_code_models=True), base_url=BASE) as c:
        image_id = c.post("/api/samples/cat").json()["image_id"]
        body = {"model": "torchvision.models:resnet18", "weights": "none", "image_id": image_id}
        job = wait(c, c.post("/api/captures", json=body).json())
        assert job["status"] == "done", job
        cid = job["capture_id"]
        assert c.get(f"/api/captures/{cid}").json()["classifier"] is False
        r = ask(c, cid, "tabby")
    assert r.status_code == 400
    assert "needs an ImageNet classifier" in r.json()["detail"]
    assert "callable" in r.json()["detail"]


# -- feature visualization --------------------------------------------------------------------


def test_visualize_job_matches_the_library(client: TestClient, lite: str, model: Any) -> None:
    body = {"capture_id": lite, "layer": "_blocks.2", "channel": 5, "steps": 3, "size": 32}
    r = client.post("/api/visualize", json=body)
    assert r.status_code == 202, r.text
    job = wait(client, r.json())
    assert job["status"] == "done" and job["step"] == job["steps"] == 4, job
    vid = job["result_id"]
    meta = client.get(f"/api/visualizations/{vid}").json()
    assert meta["objective"] == "channel:_blocks.2:5" and meta["steps"] == 3
    assert meta["size"] == 32 and meta["seed"] == 0 and len(meta["history"]) == 3
    got = png(client.get(f"/api/visualizations/{vid}/image.png"))
    want = visualize(model, "channel:_blocks.2:5", steps=3, size=32, seed=0)[0]
    assert got.shape == (32, 32, 3)
    assert np.abs(got.astype(int) - np.asarray(want.to_pil()).astype(int)).max() <= 1
    assert meta["value"] == pytest.approx(want.value, rel=1e-4, abs=1e-5)
    cached = client.post("/api/visualize", json=body)
    assert cached.status_code == 200 and cached.json()["result_id"] == vid


def test_visualize_runs_one_at_a_time_and_checks_its_input(client: TestClient, lite: str) -> None:
    body = {"capture_id": lite, "layer": "_blocks.0", "channel": 1, "steps": 40, "size": 32}
    first = client.post("/api/visualize", json=body)
    assert first.status_code == 202
    busy = client.post("/api/visualize", json={**body, "channel": 2})
    assert busy.status_code == 503 and busy.headers["retry-after"]
    assert "one visualization at a time" in busy.json()["detail"]
    assert wait(client, first.json())["status"] == "done"
    out = client.post("/api/visualize", json={**body, "channel": 10_000})
    assert out.status_code == 404 and "out of range" in out.json()["detail"]
    unknown = client.post("/api/visualize", json={**body, "layer": "_blocks.99"})
    assert unknown.status_code == 404 and "unknown layer" in unknown.json()["detail"]
    assert client.post("/api/visualize", json={**body, "steps": 5000}).status_code == 400
    assert client.get("/api/visualizations/..%2Fetc").status_code in (400, 404)
    assert client.get("/api/visualizations/abc123").status_code == 404
