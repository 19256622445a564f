"""The run pipeline as a library call: files, manifest, NaN handling, PCA bases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from featuremaps import FeatureMapsError, RenderOptions, run
from featuremaps.models import LoadedModel, Preprocess
from featuremaps.reduce import pca_basis, save_bases


def nan_net() -> nn.Module:
    """A conv whose channel 1 is NaN everywhere (as broken weights would give)."""
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.bias[1] = float("nan")
    return conv


def _loaded(module: nn.Module) -> LoadedModel:
    return LoadedModel(module=module.eval(), preprocess=Preprocess(32, 32), spec="toy", weights="x")


def test_nan_activations_stop_the_run_unless_allowed(tmp_path: Path, photo: Path) -> None:
    model = _loaded(nn.Sequential(nan_net()))
    with pytest.raises(FeatureMapsError, match="NaN"):
        run("toy", [photo], "0", tmp_path / "a", model=model)
    assert not (tmp_path / "a").exists()
    r = run(
        "toy",
        [photo],
        "0",
        tmp_path / "b",
        model=model,
        allow_nan=True,
        options=RenderOptions(map_size=30, colorbar=False),
    )
    rec = r.manifest_data["images"][0]["layers"]["0"]
    assert "NaN" in rec["pca_error"]
    grid = np.asarray(Image.open(tmp_path / "b" / rec["grid"]).convert("RGB"))
    assert (grid == [255, 0, 255]).all(-1).any()


def test_duplicate_image_names_get_distinct_folders(tmp_path: Path, photo: Path) -> None:
    other = tmp_path / "sub" / photo.name
    other.parent.mkdir()
    other.write_bytes(photo.read_bytes())
    model = _loaded(nn.Sequential(nn.Conv2d(3, 2, 3)))
    r = run("toy", [photo, other], "0", tmp_path / "o", model=model)
    keys = [e["key"] for e in r.manifest_data["images"]]
    assert keys == ["photo", "photo-2"]
    assert (tmp_path / "o" / "photo-2" / "0.png").is_file()


def test_pca_basis_file_colours_every_image_alike(tmp_path: Path, photo: Path) -> None:
    torch.manual_seed(0)
    model = _loaded(nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU()))
    fake = torch.rand(1, 6, 10, 10)
    save_bases({"0": pca_basis(fake)}, tmp_path / "b.npz")
    r = run("toy", [photo], "0", tmp_path / "o", model=model, pca_basis=tmp_path / "b.npz")
    assert r.manifest_data["pca_basis"].endswith("b.npz")
    with pytest.raises(FeatureMapsError, match="no basis"):
        run("toy", [photo], "1", tmp_path / "p", model=model, pca_basis=tmp_path / "b.npz")


def test_manifest_is_valid_json_with_stats(tmp_path: Path, photo: Path) -> None:
    model = _loaded(nn.Sequential(nn.Conv2d(3, 3, 1)))
    r = run("toy", [photo], "0", tmp_path / "o", model=model)
    data = json.loads(r.manifest.read_text())
    rec = data["images"][0]["layers"]["0"]
    assert rec["shape"] == [1, 3, 32, 32] and rec["stride"] == [1.0, 1.0]
    assert rec["min"][0] <= rec["mean"][0] <= rec["max"][0]


def test_outputs_get_ordinary_permissions(tmp_path: Path) -> None:
    import os

    from featuremaps._files import write_bytes

    write_bytes(tmp_path / "f.txt", b"x")
    mode = (tmp_path / "f.txt").stat().st_mode & 0o777
    mask = os.umask(0)
    os.umask(mask)
    assert mode == 0o666 & ~mask
    assert not list(tmp_path.glob("*.part"))


def test_render_options_are_the_typed_options() -> None:
    import featuremaps.pipeline
    from featuremaps import options

    assert featuremaps.pipeline.RenderOptions is options.RenderOptions


def test_grid_over_the_pixel_bound_is_refused_before_any_file(tmp_path: Path, photo: Path) -> None:
    from featuremaps.pipeline import MAX_GRID_PIXELS

    model = _loaded(nn.Sequential(nn.Conv2d(3, 64, 1)))  # 64 maps of 32x32
    opts = RenderOptions(map_size=1024, max_maps=None)  # 64 maps of 1024x1024
    with pytest.raises(FeatureMapsError, match=r"megapixels; the limit is 64\). Lower"):
        run("toy", [photo], "0", tmp_path / "o", model=model, options=opts)
    assert not (tmp_path / "o").exists()
    assert 64 * 1024 * 1024 > MAX_GRID_PIXELS > 64 * 512 * 512
    r = run("toy", [photo], "0", tmp_path / "o", model=model, options=opts.replace(max_maps=16))
    assert (
        Image.open(tmp_path / "o" / r.manifest_data["images"][0]["layers"]["0"]["grid"]).size[0]
        > 4 * 1024
    )


def test_activations_file_is_streamed_and_matches_the_maps(tmp_path: Path, photo: Path) -> None:
    from safetensors import safe_open

    from featuremaps import capture, load_image, preprocess

    torch.manual_seed(0)
    model = _loaded(nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 2, 1)))
    other = tmp_path / "other.png"
    Image.open(photo).rotate(90).save(other)
    r = run("toy", [photo, other], "0,2", tmp_path / "o", model=model, save_activations=True)
    assert r.manifest_data["activations"] == "activations.safetensors"
    with safe_open(str(tmp_path / "o" / "activations.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["keys"]) == [
            "photo/0",
            "photo/2",
            "other/0",
            "other/2",
        ]
        for key, path in (("photo", photo), ("other", other)):
            x = preprocess(load_image(path, draft_size=32), model.preprocess)[None]
            ref = capture(model.module, x, ["0", "2"])
            for name in ("0", "2"):
                torch.testing.assert_close(f.get_tensor(f"{key}/{name}"), ref[name])
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.startswith(".")]


def test_failed_image_leaves_no_part_of_itself(tmp_path: Path, photo: Path) -> None:
    bad = tmp_path / "z_bad.png"
    bad.write_text("not pixels")
    model = _loaded(nn.Sequential(nn.Conv2d(3, 2, 3)))
    with pytest.raises(FeatureMapsError, match="not a readable image"):
        run("toy", [photo, bad], "0", tmp_path / "o", model=model)
    written = sorted(p.name for p in (tmp_path / "o").rglob("*"))
    assert written == ["0.png", "input.png", "pca_panel.png", "photo"]  # no manifest, no lock
