"""The channel order ``variance`` through every command that takes an order.

The order was added in two places only (``options.Order`` and ``reduce._RANKINGS``); these
tests show that ``run``, ``report`` and ``serve`` take it from there, each checked against
an independent numpy ranking of the captured maps.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from featuremaps import analyze, load_model, sample_image
from featuremaps.cli import main

LAYERS = "layer1,layer2"


def variance_order(t: np.ndarray, k: int | None = None) -> list[int]:
    """Channels of a (C, H, W) map by population variance, highest first, ties by index."""
    v = t.reshape(t.shape[0], -1).astype(np.float64).var(axis=1)
    return np.argsort(-v, kind="stable")[:k].tolist()


@pytest.fixture(scope="module")
def maps() -> Any:
    model = load_model("resnet18", "none")
    return analyze(model, [sample_image("cat")], LAYERS.split(","), device="cpu")[0].maps


def cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_run_draws_the_most_varied_channels(tmp_path: Path, maps: Any) -> None:
    out = tmp_path / "run"
    args = ["run", "resnet18", str(sample_image("cat")), "--weights", "none", "--layers"]
    code = cli([*args, LAYERS, "--order", "variance", "--max-maps", "9", "--out", str(out)])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["render"]["order"] == "variance"
    for name, rec in manifest["images"][0]["layers"].items():
        assert rec["grid_channels"] == variance_order(maps[name][0].numpy(), 9)


def test_report_embeds_the_most_varied_channels(tmp_path: Path, maps: Any) -> None:
    out = tmp_path / "r.html"
    args = ["report", "resnet18", str(sample_image("cat")), "--weights", "none", "--layers"]
    code = cli([*args, LAYERS, "--order", "variance", "--max-maps", "9", "--out", str(out)])
    assert code == 0
    text = out.read_text(encoding="utf-8")
    data = json.loads(re.search(r'id="fm-data">(.*?)</script>', text, re.S).group(1))  # type: ignore[union-attr]
    assert data["order"] == "variance"
    assert data["order_text"] == "highest spatial variance first"
    assert "channels highest spatial variance first" in text
    for name, layer in data["images"][0]["layers"].items():
        assert layer["channels"] == variance_order(maps[name][0].numpy(), 9)


def test_serve_grid_takes_the_variance_order() -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from featuremaps import capture, load_image, preprocess
    from featuremaps.serve import create_app

    m = load_model("efficientnet_lite0")
    x = preprocess(load_image(sample_image("cat")), m.preprocess)[None]
    t = capture(m.module, x, ["_blocks.4"])["_blocks.4"][0].numpy()
    with TestClient(create_app(), base_url="http://127.0.0.1:8000") as c:
        assert "variance" in c.get("/api/config").json()["orders"]
        image_id = c.post("/api/samples/cat").json()["image_id"]
        body = {"model": "efficientnet_lite0", "weights": "DEFAULT", "image_id": image_id}
        job = c.post("/api/captures", json=body).json()
        deadline = time.monotonic() + 300
        for _ in range(6000):
            if job["status"] in ("done", "error") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
            job = c.get(f"/api/jobs/{job['job_id']}").json()
        assert job["status"] == "done", job
        r = c.get(
            f"/api/captures/{job['capture_id']}/grid.png",
            params={"layer": "_blocks.4", "order": "variance", "max_maps": 12},
        )
        assert r.status_code == 200, r.text
        meta = json.loads(r.headers["X-Featuremaps-Grid"])
        assert meta["channels"] == variance_order(t, 12)
