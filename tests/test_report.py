"""The HTML report: self-contained, faithful to the activations, escaped, lean."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from featuremaps import analyze, load_model, sample_image
from featuremaps.cli import main
from featuremaps.errors import FeatureMapsError
from featuremaps.models import LoadedModel, Preprocess
from featuremaps.reduce import select_channels
from featuremaps.render import LEVEL_LUT, LEVELS, colormap_lut, render_grid
from featuremaps.report import (
    REPORT_CMAPS,
    build_report,
    fill_template,
    quantize,
    script_json,
    write_report,
)

HOSTILE_LAYER = '<img src=x onerror="alert(1)">'


class Weird(nn.Module):
    """Two conv stages; the second one's name is an HTML injection attempt."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.add_module(HOSTILE_LAYER, nn.Conv2d(6, 10, 3, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._modules[HOSTILE_LAYER](self.act(self.conv(x)))  # type: ignore[misc]


@pytest.fixture
def weird() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel(Weird().eval(), Preprocess(resize=48, crop=48), "weird", "none (random)")


def report_data(text: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="fm-data">(.*?)</script>', text, re.S)
    assert match, "no embedded data"
    return json.loads(match.group(1))  # type: ignore[no-any-return]


def decode(url: str) -> np.ndarray:
    assert url.startswith("data:image/")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def cells(layer: dict[str, Any]) -> list[np.ndarray]:
    """The channel maps of an atlas, in shown order."""
    atlas = decode(layer["atlas"])
    h, w, cols = layer["h"], layer["w"], layer["cols"]
    out = []
    for i in range(len(layer["channels"])):
        r, c = divmod(i, cols)
        out.append(atlas[r * h : (r + 1) * h, c * w : (c + 1) * w])
    return out


def test_report_is_one_file_that_asks_for_nothing(weird: LoadedModel, photo: Path) -> None:
    text = build_report(weird, [photo, sample_image("coffee")], ["conv", "act"])
    assert text.startswith("<!doctype html>")
    assert re.search(r"https?://", text) is None, "a URL in a self-contained report"
    for attr in re.findall(r'(?:src|href)="([^"]*)"', text):
        assert attr.startswith(("data:", "#")), attr
    assert "@import" not in text and "url(" not in text
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', text)
    assert csp and "default-src &#x27;none&#x27;" in csp.group(1)
    data = report_data(text)
    assert [i["name"] for i in data["images"]] == ["photo.jpg", "coffee.jpg"]
    assert [layer["name"] for layer in data["layers"]] == ["conv", "act"]
    assert set(data["luts"]) == set(REPORT_CMAPS)
    lut = np.frombuffer(base64.b64decode(data["luts"]["viridis"]), np.uint8).reshape(256, 3)
    np.testing.assert_array_equal(lut, colormap_lut("viridis"))
    assert data["levels"] == LEVELS


def test_embedded_channels_are_the_activations(weird: LoadedModel, photo: Path) -> None:
    data = report_data(build_report(weird, [photo], ["conv", "act"], order="top"))
    fm = analyze(weird, [photo], ["conv", "act"], device="cpu")[0].maps
    for name in ("conv", "act"):
        layer = data["images"][0]["layers"][name]
        t = fm[name][0].numpy()
        assert layer["channels"] == select_channels(t, "top")
        assert layer["shape"] == [1, 6, 24, 24]
        maps = t[layer["channels"]]
        q, vmin, vmax = quantize(maps)
        for i, cell in enumerate(cells(layer)):
            np.testing.assert_array_equal(cell, q[i])
            assert np.isin(cell, LEVEL_LUT).all()  # only the grid's levels
            # value = vmin + q / 255 * (vmax - vmin), within half a level (the grid's
            # quantization) plus half a step of the 256-entry table (where q sits)
            span = vmax[i] - vmin[i]
            back = layer["vmin"][i] + cell / 255.0 * (layer["vmax"][i] - layer["vmin"][i])
            step = span / (2 * (LEVELS - 1)) + span / 510
            assert np.abs(back - maps[i]).max() <= step + 1e-4 * max(1.0, abs(span))
        np.testing.assert_allclose(layer["vmin"], maps.reshape(6, -1).min(1), rtol=1e-5)
        np.testing.assert_allclose(layer["vmax"], maps.reshape(6, -1).max(1), rtol=1e-5)
        dead = (maps.reshape(6, -1) == 0).all(1)
        assert layer["dead"] == dead.tolist()
        assert layer["dead_share"] == pytest.approx(dead.mean())


def test_quantized_maps_coloured_by_the_lut_are_the_renderers_pixels() -> None:
    torch.manual_seed(3)
    maps = torch.randn(5, 9, 7).numpy()
    grid = render_grid(maps, max_maps=None, map_size=1, cols=5)
    q, _, _ = quantize(maps)
    lut = colormap_lut("viridis")
    canvas = np.asarray(grid.image.convert("RGB"))
    levels = np.asarray(grid.image)
    for i, (x0, y0, x1, y1) in enumerate(grid.boxes):
        np.testing.assert_array_equal(canvas[y0:y1, x0:x1], lut[q[i]])
        np.testing.assert_array_equal(LEVEL_LUT[levels[y0:y1, x0:x1]], q[i])


def test_user_strings_are_escaped(weird: LoadedModel, tmp_path: Path) -> None:
    name = 'cat <img src=x onerror="alert(2)"> & co.jpg'
    hostile = tmp_path / name
    shutil.copy(sample_image("cat"), hostile)
    title = "</title><script>alert(3)</script>"
    text = build_report(weird, [hostile], ["conv", HOSTILE_LAYER], title=title)
    for raw in ("<img src=x", "<script>alert", "</title><script>", 'onerror="'):
        assert raw not in text, raw
    assert "&lt;/title&gt;&lt;script&gt;alert(3)" in text
    data = report_data(text)
    assert data["images"][0]["name"] == name
    assert HOSTILE_LAYER in data["images"][0]["layers"]
    assert data["title"] == title


def test_script_json_cannot_close_the_script() -> None:
    obj = {"a": "</script><!-- & \u2028", "b": [1.5, None]}
    text = script_json(obj)
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == obj


def test_script_json_in_chunks_is_the_same_text() -> None:
    from featuremaps.report.html import script_json_chunks

    obj = {"a": ["</script>" * 50, 1.5, None], "b": {"c": "\u2028&" * 100}, "d": list(range(300))}
    chunks = list(script_json_chunks(obj, size=64))
    assert len(chunks) > 5 and "".join(chunks) == script_json(obj)


def test_written_report_is_the_built_page(weird: LoadedModel, photo: Path, tmp_path: Path) -> None:
    out = write_report(tmp_path / "r.html", weird, [photo], ["conv"], title="x")
    text = out.read_text(encoding="utf-8")
    built = build_report(weird, [photo], ["conv"], title="x")
    strip = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC")  # the minute it was generated
    assert strip.sub("", text) == strip.sub("", built)
    assert "\x00" not in text


def test_template_values_are_not_rescanned() -> None:
    assert fill_template("{{a}} {{b}}", {"a": "{{b}}", "b": "x"}) == "{{b}} x"
    with pytest.raises(FeatureMapsError, match="missing"):
        fill_template("{{nope}}", {})


def test_imagenet_classifier_gets_predictions_and_pca() -> None:
    model = load_model("efficientnet_lite0")
    data = report_data(build_report(model, [sample_image("cat")], "stages"))
    image = data["images"][0]
    labels = [p["label"] for p in image["predictions"]]
    assert len(labels) == 5 and {"Egyptian cat", "tabby", "tiger cat"} & set(labels[:2])
    assert image["predictions_note"] is None
    assert decode(image["input"]).shape == (224, 224, 3)
    assert len(data["layers"]) == 5
    for layer in image["layers"].values():
        c, h, w = layer["shape"][1:]
        assert len(layer["channels"]) == min(c, 64)
        assert decode(layer["pca"]).shape == (h, w, 3)
        assert decode(layer["atlas"]).ndim == 2
    assert "DEFAULT" in data["weights"] and "resize 256" in data["preprocess"]


def test_no_predictions_for_other_models(weird: LoadedModel, photo: Path) -> None:
    data = report_data(build_report(weird, [photo], "conv"))
    assert data["images"][0]["predictions"] is None


@pytest.mark.slow
def test_resnet50_report_of_five_stages_stays_lean(tmp_path: Path) -> None:
    out = write_report(
        tmp_path / "r50.html", "resnet50", [sample_image("cat")], "stages", weights="none"
    )
    size = out.stat().st_size
    assert size < 10 * 1024 * 1024, f"{size / 1e6:.1f} MB"
    data = report_data(out.read_text(encoding="utf-8"))
    assert [layer["name"] for layer in data["layers"]] == [
        "relu",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    ]
    for layer in data["images"][0]["layers"].values():
        assert len(layer["channels"]) == 64
    assert data["images"][0]["predictions"] is None
    assert "random weights" in data["images"][0]["predictions_note"]


def test_bad_options_fail_before_any_work(weird: LoadedModel, photo: Path) -> None:
    with pytest.raises(FeatureMapsError, match="order"):
        build_report(weird, [photo], "conv", order="random")
    with pytest.raises(FeatureMapsError, match="colormap"):
        build_report(weird, [photo], "conv", cmap="nope")
    with pytest.raises(FeatureMapsError, match="max_channels"):
        build_report(weird, [photo], "conv", max_channels=0)


def cli(args: list[str]) -> int:
    """Run the command in-process; its exit code (0 when it returns normally)."""
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_cli_report_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "r.html"
    code = cli(
        [
            "report",
            "resnet18",
            str(sample_image("cat")),
            str(sample_image("coffee")),
            "--weights",
            "none",
            "--layers",
            "layer1,layer2",
            "--max-maps",
            "16",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    data = report_data(out.read_text(encoding="utf-8"))
    assert len(data["images"]) == 2
    assert [len(v["channels"]) for v in data["images"][1]["layers"].values()] == [16, 16]
    assert not list(out.parent.glob("*.part")), "temporary file left behind"


def test_cli_report_unknown_layer_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli(
        [
            "report",
            "resnet18",
            str(sample_image("cat")),
            "--weights",
            "none",
            "--layers",
            "layer9",
            "--out",
            str(tmp_path / "r.html"),
        ]
    )
    assert code == 1
    assert "unknown layer 'layer9'" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_out_must_be_a_file(weird: LoadedModel, photo: Path, tmp_path: Path) -> None:
    with pytest.raises(FeatureMapsError, match="is a folder"):
        write_report(tmp_path, weird, [photo], "conv")


def test_report_orders_by_variance_or_an_explicit_list(weird: LoadedModel, photo: Path) -> None:
    fm = analyze(weird, [photo], ["conv"], device="cpu")[0].maps
    t = fm["conv"][0].numpy()
    by_var = np.argsort(-t.reshape(6, -1).astype(np.float64).var(1), kind="stable").tolist()
    data = report_data(build_report(weird, [photo], "conv", order="variance", max_channels=4))
    assert data["images"][0]["layers"]["conv"]["channels"] == by_var[:4]
    assert data["order"] == "variance"
    listed = report_data(build_report(weird, [photo], "conv", order="5,0"))
    assert listed["images"][0]["layers"]["conv"]["channels"] == [5, 0]
    assert listed["order"] == [5, 0] and listed["order_text"] == "as listed: 5, 0"


def test_report_holds_one_image_at_a_time(
    weird: LoadedModel, photo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report over many images keeps only the embedded data, never earlier images' maps."""
    import gc
    import weakref

    from featuremaps.report import build as report_build

    real = report_build.iter_analyze
    earlier: list[weakref.ref[Any]] = []
    checked = []

    def watched(*args: Any, **kwargs: Any) -> Any:
        for res in real(*args, **kwargs):
            gc.collect()
            checked.append(sum(ref() is not None for ref in earlier))
            earlier.extend(weakref.ref(t) for t in res.maps.maps.values())
            earlier.append(weakref.ref(res.maps))
            yield res

    monkeypatch.setattr(report_build, "iter_analyze", watched)
    images = [photo, sample_image("cat"), sample_image("coffee"), photo]
    data = report_data(build_report(weird, images, ["conv", "act"]))
    assert len(data["images"]) == 4
    assert checked == [0, 0, 0, 0]  # when each image arrives, no earlier maps are alive
