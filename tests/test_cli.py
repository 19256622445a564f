"""The command line end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from featuremaps import capture, load_image, load_model, preprocess


def fm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "featuremaps", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def test_demo_writes_pictures_and_predicts_a_cat(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = fm("demo", "--out", str(out))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["images"][0]
    labels = [p["label"] for p in entry["predictions"]]
    assert {"tabby", "tiger cat", "Egyptian cat"} & set(labels)
    assert str(out / "cat" / "pca_panel.png") in r.stdout
    for rec in entry["layers"].values():
        assert (out / rec["grid"]).is_file()
    assert not list(out.rglob("*.part"))


def test_run_writes_grids_manifest_and_activations(tmp_path: Path, photo: Path) -> None:
    out = tmp_path / "o"
    r = fm(
        "run",
        "resnet18",
        str(photo),
        "--weights",
        "none",
        "--layers",
        "layer1,layer3",
        "--out",
        str(out),
        "--max-maps",
        "16",
        "--cols",
        "4",
        "--order",
        "top",
        "--save-activations",
        "--pca",
        "1",
        "--device",
        "cpu",
    )
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "resnet18" and manifest["weights"].startswith("none")
    entry = manifest["images"][0]
    assert list(entry["layers"]) == ["layer1", "layer3"]
    assert entry["predictions"] is None and "random" in entry["predictions_note"]
    rec = entry["layers"]["layer1"]
    assert rec["shape"] == [1, 64, 56, 56] and len(rec["mean"]) == 64
    assert rec["grid_channels"] == sorted(range(64), key=lambda c: (-rec["mean"][c], c))[:16]
    assert Image.open(out / rec["grid"]).size[0] > 4 * 56
    assert (out / "photo" / "input.png").is_file() and (out / "photo" / "pca_panel.png").is_file()
    # Saved activations equal a fresh capture in the library.
    saved = load_file(str(out / "activations.safetensors"))
    m = load_model("resnet18", weights="none")
    x = preprocess(load_image(photo), m.preprocess)[None]
    ref = capture(m.module, x, "layer3")["layer3"]
    np.testing.assert_allclose(saved["photo/layer3"].numpy(), ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(rec["max"][3], float(saved["photo/layer1"][0, 3].max()), rtol=1e-6)


def test_layers_lists_names_shapes_and_preprocessing() -> None:
    r = fm("layers", "resnet18")
    assert r.returncode == 0, r.stderr
    assert "layer4.1.conv2" in r.stdout and "1x512x7x7" in r.stdout
    assert "resize 256" in r.stdout and "center crop 224" in r.stdout


ERROR_CASES = [
    (["run", "resnet18", "PHOTO", "--weights", "none", "--layers", "layer5"], "layer4"),
    (["run", "resnet18", "PHOTO", "--weights", "none", "--layers", "fc"], "no spatial map"),
    (["run", "resnet18", "missing.jpg", "--weights", "none"], "no such file"),
    (["run", "resnet1", "PHOTO", "--weights", "none"], "resnet18"),
    (["run", "resnet18", "PHOTO", "--weights", "none", "--cmap", "viridi"], "viridis"),
    (["run", "resnet18", "PHOTO", "--weights", "nope.pth"], "no such file"),
    (["run", "resnet18", "BAD", "--weights", "none"], "not a readable image"),
    (["run", "resnet18", "PHOTO", "--weights", "none", "--order", "loud"], "variance"),
]
# A choice or number out of range (--norm cubic, --cols -2) is a usage error, exit 2, now
# that Typer takes the typed options: see test_cli_errors.RANGE_CASES.


def _fill(args: list[str], photo: Path, bad: Path) -> list[str]:
    return [str(photo) if a == "PHOTO" else str(bad) if a == "BAD" else a for a in args]


@pytest.mark.parametrize(("args", "needle"), ERROR_CASES)
def test_user_errors_are_one_line_without_traceback(
    tmp_path: Path,
    photo: Path,
    args: list[str],
    needle: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from featuremaps.cli import main

    bad = tmp_path / "bad.png"
    bad.write_text("text, not pixels")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main([*_fill(args, photo, bad), "--out", str(tmp_path / "o")])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert needle in err and "error:" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_errors_in_a_subprocess_exit_1_and_debug_shows_traceback(tmp_path: Path) -> None:
    args = ["run", "resnet18", "missing.jpg", "--weights", "none", "--out", str(tmp_path)]
    r = fm(*args)
    assert r.returncode == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr
    debug = fm("--debug", *args)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ImageError" in debug.stderr


def test_usage_error_exits_2() -> None:
    r = fm("run")
    assert r.returncode == 2
    assert "Missing argument" in r.stderr and "Traceback" not in r.stderr
