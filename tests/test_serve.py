"""The local viewer's API: captures, pictures that match the activations, and safety."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from featuremaps import capture, load_image, load_model, preprocess, sample_image
from featuremaps.options import Norm, Order, Scale
from featuremaps.reduce import apply_scaling, compute_scaling, select_channels
from featuremaps.render import colorize, upsample
from featuremaps.serve import LRU, create_app

BASE = "http://127.0.0.1:8000"
LIMIT = 300_000


def png(resp: Any) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(resp.content)).convert("RGB"))


def photo_bytes(size: tuple[int, int] = (64, 48), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def wait_for(client: TestClient, job: dict[str, Any], seconds: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    for _ in range(10_000):
        if job["status"] in ("done", "error") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
        job = client.get(f"/api/jobs/{job['job_id']}").json()
    return job


def start(client: TestClient, model: str, weights: str, image_id: str) -> Any:
    return client.post(
        "/api/captures", json={"model": model, "weights": weights, "image_id": image_id}
    )


def capture_id(client: TestClient, model: str, weights: str, image_id: str) -> str:
    r = start(client, model, weights, image_id)
    assert r.status_code in (200, 202), r.text
    job = wait_for(client, r.json())
    assert job["status"] == "done", job
    return str(job["capture_id"])


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(max_upload_bytes=LIMIT), base_url=BASE) as c:
        yield c


@pytest.fixture(scope="module")
def cat(client: TestClient) -> str:
    r = client.post("/api/samples/cat")
    assert r.status_code == 200
    return str(r.json()["image_id"])


@pytest.fixture(scope="module")
def lite(client: TestClient, cat: str) -> str:
    return capture_id(client, "efficientnet_lite0", "DEFAULT", cat)


@pytest.fixture(scope="module")
def reference() -> Any:
    """The same activations computed without the server."""
    m = load_model("efficientnet_lite0")
    x = preprocess(load_image(sample_image("cat")), m.preprocess)[None]
    return capture(m.module, x, ["_blocks.4", "head_act", "_blocks.5._depthwise_conv"])


# -- the page ---------------------------------------------------------------------------------


def test_page_and_assets_come_from_the_server_only(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "featuremaps viewer" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for url in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        assert url.startswith(("/static/", "data:")), url
    for asset in ("/static/common.js", "/static/viewer.js", "/static/viewer.css"):
        r = client.get(asset)
        assert r.status_code == 200 and len(r.text) > 1000
        assert re.search(r"https?://", r.text) is None, asset


def test_config_lists_models_and_samples(client: TestClient) -> None:
    cfg = client.get("/api/config").json()
    names = {m["name"]: m["pretrained"] for m in cfg["models"]}
    assert names["efficientnet_lite0"] is True and "resnet18" in names
    assert cfg["default_model"] == "efficientnet_lite0"
    assert cfg["samples"] == ["cat", "coffee"]
    assert cfg["allow_code_models"] is False and cfg["max_upload_bytes"] == LIMIT


# -- images -----------------------------------------------------------------------------------


def test_uploads_are_keyed_by_content(client: TestClient) -> None:
    data = photo_bytes()
    raw = client.post("/api/images", content=data, headers={"content-type": "image/png"})
    form = client.post("/api/images", files={"file": ("x/../../etc/passwd", data, "image/png")})
    assert raw.status_code == form.status_code == 201
    assert raw.json() == form.json()
    assert raw.json()["width"] == 64 and raw.json()["height"] == 48
    thumb = client.get(f"/api/images/{raw.json()['image_id']}/thumb.jpg")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


def test_upload_over_the_limit_is_413(client: TestClient) -> None:
    big = b"\xff" * (LIMIT + 1)
    assert client.post("/api/images", content=big).status_code == 413
    form = client.post("/api/images", files={"file": ("a.png", big, "image/png")})
    assert form.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
        for _ in range(10):
            yield b"\0" * (LIMIT // 5)

    r = client.post("/api/images", content=chunks())
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_upload_with_too_many_pixels_is_413() -> None:
    with TestClient(create_app(max_pixels=1000), base_url=BASE) as c:
        r = c.post("/api/images", content=photo_bytes((64, 48)))
    assert r.status_code == 413 and "megapixels" in r.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        b"hello, not an image",
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",  # never handed to Ghostscript
        photo_bytes()[:60],  # truncated
    ],
)
def test_non_images_are_415(client: TestClient, body: bytes) -> None:
    r = client.post("/api/images", content=body)
    assert r.status_code == 415
    assert "not a readable image" in r.json()["detail"]


def test_empty_or_fieldless_uploads_are_400(client: TestClient) -> None:
    assert client.post("/api/images", content=b"").status_code == 400
    r = client.post("/api/images", data={"other": "1"}, files={"nofile": ("a", b"x")})
    assert r.status_code == 400 and "'file'" in r.json()["detail"]


def test_request_values_are_never_paths(client: TestClient) -> None:
    assert client.post("/api/samples/..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert client.post("/api/samples/cat.jpg").status_code == 404
    assert client.get("/api/images/..%2Fdata%2Fcat.jpg/thumb.jpg").status_code == 404
    r = start(client, "resnet18", "/etc/passwd", "0" * 24)
    assert r.status_code == 400 and "weight files" in r.json()["detail"]


# -- model specs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", ["torchvision.models:resnet18", "os:system", "/tmp/model.pt", "model.ts", "a/b"]
)
def test_code_model_specs_are_refused(client: TestClient, cat: str, spec: str) -> None:
    r = start(client, spec, "none", cat)
    assert r.status_code == 403
    assert "--allow-code-models" in r.json()["detail"]


def test_unknown_model_is_400_with_suggestions(client: TestClient, cat: str) -> None:
    r = start(client, "resnet19", "none", cat)
    assert r.status_code == 400 and "Did you mean" in r.json()["detail"]


def test_code_models_run_when_the_server_allows_them(cat: str) -> None:
    with TestClient(create_app(allow_code_models=True), base_url=BASE) as c:
        image_id = c.post("/api/samples/cat").json()["image_id"]
        cid = capture_id(c, "torchvision.models:resnet18", "none", image_id)
        summary = c.get(f"/api/captures/{cid}").json()
    assert summary["model"] == "torchvision.models:resnet18"
    assert summary["stages"] == ["relu", "layer1", "layer2", "layer3", "layer4"]


def test_random_weights_give_no_predictions(client: TestClient, cat: str) -> None:
    cid = capture_id(client, "resnet18", "none", cat)
    summary = client.get(f"/api/captures/{cid}").json()
    assert summary["predictions"] is None
    assert "random weights" in summary["predictions_note"]


# -- captures ---------------------------------------------------------------------------------


def test_capture_lists_layers_and_predicts(client: TestClient, lite: str) -> None:
    s = client.get(f"/api/captures/{lite}").json()
    assert s["stages"] == ["_blocks.0", "_blocks.2", "_blocks.4", "_blocks.10", "head_act"]
    by_name = {layer["name"]: layer for layer in s["layers"]}
    assert by_name["_blocks.4"]["shape"] == [1, 40, 28, 28]
    assert by_name["_blocks.4"]["stage"] and by_name["_blocks.4"]["captured"]
    assert len(s["layers"]) > 100  # every module with a spatial output
    assert s["predictions"][0]["label"] in ("Egyptian cat", "tabby", "tiger cat")
    assert s["input_size"] == [224, 224]
    assert png(client.get(f"/api/captures/{lite}/input.png")).shape == (224, 224, 3)


def test_a_capture_is_computed_once(client: TestClient, cat: str, lite: str) -> None:
    r = start(client, "efficientnet_lite0", "default", cat)
    assert r.status_code == 200
    assert r.json()["status"] == "done" and r.json()["phase"] == "cached"
    assert r.json()["capture_id"] == lite


def test_job_reports_progress_steps(client: TestClient) -> None:
    image_id = client.post("/api/samples/coffee").json()["image_id"]
    r = start(client, "resnet18", "none", image_id)
    assert r.status_code in (200, 202)
    first = r.json()
    assert first["steps"] == 4 and first["status"] in ("queued", "running", "done")
    job = wait_for(client, first)
    assert job["status"] == "done" and job["step"] == 4 and job["elapsed"] >= 0
    assert client.get("/api/jobs/nope").status_code == 404


def test_layer_statistics_match_the_activations(
    client: TestClient, lite: str, reference: Any
) -> None:
    info = client.get(f"/api/captures/{lite}/layer", params={"layer": "_blocks.4"}).json()
    t = reference["_blocks.4"][0].numpy().reshape(40, -1)
    assert info["shape"] == [40, 28, 28] and info["channels"] == 40
    np.testing.assert_allclose(info["min"], t.min(1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(info["mean"], t.mean(1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(info["max"], t.max(1), rtol=1e-4, atol=1e-5)
    assert info["dead_share"] == pytest.approx((t == 0).all(1).mean())


def test_channel_picture_is_the_activation_through_the_colormap(
    client: TestClient, lite: str, reference: Any
) -> None:
    ch = 7
    got = png(
        client.get(
            f"/api/captures/{lite}/channel.png",
            params={"layer": "head_act", "channel": ch, "cmap": "magma", "size": 70},
        )
    )
    m = reference["head_act"][0, ch : ch + 1].numpy()  # (1, 7, 7)
    s = compute_scaling(m, "linear")
    expected = upsample(colorize(apply_scaling(m, s)[0], "magma"), 10)
    assert got.shape == (70, 70, 3)
    assert (np.abs(got.astype(int) - expected.astype(int)) > 0).mean() < 0.01
    info = client.get(
        f"/api/captures/{lite}/channel", params={"layer": "head_act", "channel": ch}
    ).json()
    assert info["vmin"] == pytest.approx(float(m.min()), rel=1e-4, abs=1e-5)
    assert info["vmax"] == pytest.approx(float(m.max()), rel=1e-4, abs=1e-5)
    assert info["ticks"][0] == pytest.approx(info["vmin"], rel=1e-4)
    assert info["ticks"][-1] == pytest.approx(info["vmax"], rel=1e-4)
    log = client.get(
        f"/api/captures/{lite}/channel", params={"layer": "head_act", "channel": ch, "norm": "log"}
    ).json()
    assert log["norm"] == "log" and log["vmin"] > 0


def test_grid_header_maps_clicks_to_channels(client: TestClient, lite: str, reference: Any) -> None:
    r = client.get(
        f"/api/captures/{lite}/grid.png",
        params={"layer": "_blocks.4", "order": "top", "max_maps": 16, "map_size": 56},
    )
    img = png(r)
    meta = json.loads(r.headers["x-featuremaps-grid"])
    t = reference["_blocks.4"][0]
    assert meta["channels"] == select_channels(t, "top", 16)
    assert len(meta["boxes"]) == 16 and img.shape[:2] == (meta["height"], meta["width"])
    x0, y0, x1, y1 = meta["boxes"][0]
    assert (x1 - x0, y1 - y0) == (56, 56)
    m = t[meta["channels"][0]].numpy()[None]
    expected = upsample(colorize(apply_scaling(m, compute_scaling(m))[0], "viridis"), 2)
    cell = img[y0:y1, x0:x1]
    assert (np.abs(cell.astype(int) - expected.astype(int)) > 0).mean() < 0.01


def test_config_offers_every_channel_order_of_the_options_module(client: TestClient) -> None:
    cfg = client.get("/api/config").json()
    assert cfg["orders"] == [o.value for o in Order] and "variance" in cfg["orders"]
    assert cfg["order_labels"]["variance"] == Order.VARIANCE.describe()
    assert cfg["norms"] == [n.value for n in Norm] and cfg["scales"] == [s.value for s in Scale]


def test_variance_order_ranks_channels_by_spatial_variance(
    client: TestClient, lite: str, reference: Any
) -> None:
    r = client.get(
        f"/api/captures/{lite}/grid.png",
        params={"layer": "_blocks.4", "order": "variance", "max_maps": 8},
    )
    png(r)
    meta = json.loads(r.headers["x-featuremaps-grid"])
    flat = reference["_blocks.4"][0].numpy().reshape(40, -1).astype(np.float64)
    var = ((flat - flat.mean(1, keepdims=True)) ** 2).mean(1)
    assert meta["channels"] == np.argsort(-var, kind="stable")[:8].tolist()
    listed = client.get(
        f"/api/captures/{lite}/grid.png", params={"layer": "_blocks.4", "order": "7,3,12"}
    )
    assert json.loads(listed.headers["x-featuremaps-grid"])["channels"] == [7, 3, 12]


def test_overlay_and_pca_pictures(client: TestClient, lite: str) -> None:
    ov = png(
        client.get(
            f"/api/captures/{lite}/overlay.png",
            params={"layer": "_blocks.10", "channel": 3, "alpha": 0.5},
        )
    )
    inp = png(client.get(f"/api/captures/{lite}/input.png"))
    assert ov.shape == inp.shape == (224, 224, 3)
    assert np.abs(ov.astype(int) - inp.astype(int)).mean() > 5
    assert png(
        client.get(f"/api/captures/{lite}/pca.png", params={"layer": "_blocks.10", "size": 112})
    ).shape == (112, 112, 3)
    both = client.get(
        f"/api/captures/{lite}/pca.png", params={"layer": "_blocks.10", "mode": "overlay"}
    )
    assert png(both).shape == (224, 224, 3)
    assert png(client.get("/api/colorbar.png", params={"cmap": "gray"}))[0, 255].tolist() == [
        255,
        255,
        255,
    ]


def test_a_layer_outside_the_stages_is_captured_on_demand(
    client: TestClient, lite: str, reference: Any
) -> None:
    name = "_blocks.5._depthwise_conv"
    before = client.get(f"/api/captures/{lite}").json()
    assert not {lay["name"]: lay for lay in before["layers"]}[name]["captured"]
    info = client.get(f"/api/captures/{lite}/layer", params={"layer": name}).json()
    t = reference[name][0].numpy()
    assert info["shape"] == list(t.shape)
    np.testing.assert_allclose(info["max"], t.reshape(t.shape[0], -1).max(1), rtol=1e-4, atol=1e-5)
    after = client.get(f"/api/captures/{lite}").json()
    assert {lay["name"]: lay for lay in after["layers"]}[name]["captured"]


@pytest.mark.parametrize(
    ("path", "params", "status", "words"),
    [
        ("/layer", {"layer": "_blocks.44"}, 404, "Did you mean"),
        ("/channel.png", {"layer": "_blocks.4", "channel": 40}, 404, "out of range"),
        ("/grid.png", {"layer": "_blocks.4", "norm": "cubic"}, 400, "norm"),
        ("/grid.png", {"layer": "_blocks.4", "cmap": "viridiss"}, 400, "colormap"),
        ("/grid.png", {"layer": "_blocks.4", "order": "random"}, 400, "order"),
        ("/pca.png", {"layer": "_blocks.4", "mode": "3d"}, 400, "mode"),
    ],
)
def test_bad_view_parameters_are_clear_4xx(
    client: TestClient, lite: str, path: str, params: dict[str, Any], status: int, words: str
) -> None:
    r = client.get(f"/api/captures/{lite}{path}", params=params)
    assert r.status_code == status and words in r.json()["detail"]


def test_the_capture_cache_is_bounded() -> None:
    with TestClient(create_app(cache_entries=1), base_url=BASE) as c:
        ids = [c.post(f"/api/samples/{n}").json()["image_id"] for n in ("cat", "coffee")]
        first = capture_id(c, "resnet18", "none", ids[0])
        second = capture_id(c, "resnet18", "none", ids[1])
        assert c.get(f"/api/captures/{second}").status_code == 200
        r = c.get(f"/api/captures/{first}")
        assert r.status_code == 404 and "Capture again" in r.json()["detail"]
        assert len(c.app.state.engine.captures) == 1  # type: ignore[attr-defined]


def test_foreign_hosts_and_origins_are_refused(client: TestClient, cat: str) -> None:
    assert client.get("/api/config", headers={"host": "evil.example"}).status_code == 400
    r = client.post("/api/samples/cat", headers={"origin": "http://evil.example"})
    assert r.status_code == 403
    ok = client.post("/api/samples/cat", headers={"origin": "http://127.0.0.1:8000"})
    assert ok.status_code == 200


def test_lru_evicts_by_count_and_bytes() -> None:
    lru: LRU[bytes] = LRU(3, max_bytes=10, size=len)
    for key in "abc":
        lru.put(key, b"xx")
    assert lru.get("a") == b"xx"  # a is now the most recent
    lru.put("d", b"xx")
    assert "b" not in lru and len(lru) == 3
    lru.put("e", b"x" * 9)
    assert list(lru._items) == ["e"]  # the newest stays even alone over the bound


def test_cli_serve_listens_on_loopback_only() -> None:
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "featuremaps", "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        body = None
        for _ in range(240):  # at most about a minute
            if proc.poll() is not None:
                break
            try:
                body = httpx.get(f"http://127.0.0.1:{port}/api/config", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.25)
        assert body is not None, "the server did not answer"
        assert body["allow_code_models"] is False
        r = httpx.get(f"http://127.0.0.1:{port}/", headers={"host": "attacker.example"})
        assert r.status_code == 400
    finally:
        proc.terminate()
        try:
            output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate(timeout=10)
    assert f"http://127.0.0.1:{port}/" in output
