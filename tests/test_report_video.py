"""A video input in the HTML report: one embedded PCA video per layer, a working player."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

av = pytest.importorskip("av")

from featuremaps import load_model  # noqa: E402
from featuremaps.errors import FeatureMapsError  # noqa: E402
from featuremaps.report import write_report  # noqa: E402
from featuremaps.report.video import video_entry  # noqa: E402

CHROMIUM = os.environ.get("FEATUREMAPS_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
FRAMES = 6
LAYERS = ["layer1", "layer2"]


def _clip(path: Path, frames: int = FRAMES) -> Path:
    """A 64x64 clip, 10 fps: a white bar moving right, the green level rising."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            a = np.zeros((64, 64, 3), np.uint8)
            x = (i * 8) % 48
            a[:, x : x + 16] = 255
            a[..., 1] = (40 * i) % 256
            for pk in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    return path


def _decode(url: str) -> list[np.ndarray]:
    head, payload = url.split(",", 1)
    assert head == "data:video/webm;base64"
    with av.open(io.BytesIO(base64.b64decode(payload))) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def model() -> Any:
    return load_model("resnet18", "none")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, model: Any) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("rv")
    out = write_report(d / "r.html", model, [_clip(d / "clip.mp4")], LAYERS, max_channels=8)
    return out, out.read_text(encoding="utf-8")


def _data(text: str) -> dict[str, Any]:
    import json

    m = re.search(r'<script type="application/json" id="fm-data">(.*?)</script>', text, re.S)
    assert m is not None
    return json.loads(m.group(1))  # type: ignore[no-any-return]


def test_report_embeds_one_video_per_layer_with_every_frame(report: tuple[Path, str]) -> None:
    _, text = report
    data = _data(text)
    assert data["images"] == []
    (video,) = data["videos"]
    assert video["name"] == "clip.mp4"
    assert video["frames"] == FRAMES
    assert video["source_frames"] == list(range(FRAMES))
    assert list(video["layers"]) == LAYERS
    firsts = []
    for name in LAYERS:
        frames = _decode(video["layers"][name]["src"])
        assert len(frames) == video["layers"][name]["frames"] == FRAMES
        # the input (224 px after resize and crop) beside the PCA picture of the same size
        assert frames[0].shape == (224, 448, 3)
        firsts.append(frames[0])
        # the input half follows the clip: the bar moves right frame to frame
        col = [int(np.argmax(f[:, :224, 0].mean(axis=0) > 128)) for f in frames]
        assert col == sorted(col) and col[-1] > col[0]
    # the layers' PCA halves differ; the input halves agree up to compression
    assert np.abs(firsts[0][:, 224:].astype(int) - firsts[1][:, 224:]).mean() > 5
    assert np.abs(firsts[0][:, :224].astype(int) - firsts[1][:, :224]).mean() < 3
    assert "media-src data:" in text


def test_video_over_the_cap_is_refused(tmp_path: Path, model: Any) -> None:
    clip = _clip(tmp_path / "clip.mp4", 2)
    with pytest.raises(FeatureMapsError, match=r"would embed more than .*fewer layers"):
        video_entry(model, clip, LAYERS, budget=1000)


def _wait(locator: Any, predicate: str, seconds: float = 30.0) -> None:
    """Poll ``predicate`` on the element from Python: the report's CSP forbids the eval
    that page.wait_for_function would use in the page."""
    deadline = time.monotonic() + seconds
    while not locator.evaluate(predicate):
        assert time.monotonic() < deadline, f"timed out waiting for {predicate}"
        time.sleep(0.05)


@pytest.mark.browser
def test_player_loads_and_layer_switch_swaps_source(report: tuple[Path, str]) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    exe = shutil.which(CHROMIUM)
    if exe is None:
        pytest.skip(f"no Chromium at {CHROMIUM}")
    path, _ = report
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=ARGS, timeout=60_000)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(path.as_uri())
            video = page.locator("#videos video.video-player")
            assert video.count() == 1
            ready = "v => v.readyState >= 1 && v.duration > 0 && !v.error"
            _wait(video, ready)
            first = video.evaluate("v => [v.currentSrc, v.dataset.layer, v.duration]")
            assert first[1] == LAYERS[0]
            assert abs(first[2] - FRAMES / 10) < 0.15
            page.select_option("#videos select.video-layer", LAYERS[1])
            _wait(video, ready)
            second = video.evaluate("v => [v.currentSrc, v.dataset.layer]")
            assert second[1] == LAYERS[1]
            assert second[0] != first[0] and second[0].startswith("data:video/webm")
            assert errors == []
        finally:
            browser.close()
