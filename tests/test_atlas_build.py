"""The atlas driver's guards: one run per output folder, unusable data, output errors."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from featuremaps import FeatureMapsError, LoadedModel
from featuremaps.atlas import STATE_FILE, CheckpointError, SkippedImageWarning, build_atlas
from featuremaps.atlas import build as build_module
from featuremaps.atlas import outputs as outputs_module
from featuremaps.cli import main
from featuremaps.errors import Interrupted
from featuremaps.models import Preprocess

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


@pytest.fixture
def tiny_model() -> LoadedModel:
    from conftest import ToyNet

    torch.manual_seed(0)
    return LoadedModel(ToyNet().eval(), Preprocess(resize=32, crop=32), "toy", "random")


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        arr = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"img{i}.png")
    return root


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def _cli(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.mark.slow
def test_two_atlas_runs_into_one_folder_the_second_fails_at_once(
    images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = tmp_path / "first.py"
    first.write_text(
        textwrap.dedent(f"""
        import time
        from featuremaps.atlas import build_atlas
        build_atlas("conftest:toy_factory", {str(images)!r}, "features.3", {str(out)!r},
                    top=2, batch_size=1, workers=0,
                    progress=lambda *a: time.sleep(0.5))
    """)
    )
    holder = subprocess.Popen([sys.executable, str(first)], env=_env())
    try:
        lock = out / ".featuremaps.lock"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and f"pid {holder.pid}" not in (
            lock.read_text() if lock.exists() else ""
        ):
            assert holder.poll() is None, "the first run ended before taking the lock"
            time.sleep(0.05)
        second = subprocess.run(
            [
                *(sys.executable, "-m", "featuremaps", "atlas", "conftest:toy_factory"),
                *(str(images), "--layers", "features.3", "--out", str(out), "--workers", "0"),
            ],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert holder.poll() is None, "the first run must still hold the folder"
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 1
    assert "is in use by another featuremaps run" in second.stderr
    assert f"pid {holder.pid}: featuremaps atlas conftest:toy_factory" in second.stderr
    assert "Traceback" not in second.stderr
    assert not (out / "atlas.json").exists()


def test_lock_left_by_a_dead_run_is_taken_over(
    images: Path, tiny_model: LoadedModel, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".featuremaps.lock").write_text("pid 999999: featuremaps atlas (killed)\n")
    result = build_atlas(tiny_model, images, "features.3", out, top=2, workers=0)
    assert result.images_used == 6 and (out / "atlas.json").exists()
    assert not (out / ".featuremaps.lock").exists()  # released at the end


def test_every_listed_path_missing_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'gone1.jpg'}\n{tmp_path / 'gone2.png'}\n")
    code = _cli(
        "atlas",
        "resnet18",
        str(listing),
        "--weights",
        "none",
        "--layers",
        "layer1",
        "--out",
        str(tmp_path / "out"),
        "--workers",
        "0",
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "none of the 2 images of the dataset could be used" in err
    assert "gone1.jpg" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "atlas.json").exists()


def test_zero_usable_images_is_an_error(tiny_model: LoadedModel, tmp_path: Path) -> None:
    data = tmp_path / "bad"
    data.mkdir()
    (data / "a.jpg").write_bytes(b"not a jpeg")
    (data / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with (
        pytest.warns(SkippedImageWarning),
        pytest.raises(FeatureMapsError, match="none of the 2 images"),
    ):
        build_atlas(tiny_model, data, "features.3", tmp_path / "out", workers=0)


def _no_model(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the model was loaded before the output folder was checked")


def test_output_is_checked_before_the_model_loads(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build_module, "load_model", _no_model)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(FeatureMapsError, match=r"it is a file; give a folder path"):
        build_atlas("resnet18", images, "layer1", afile, weights="none")
    with pytest.raises(FeatureMapsError, match=r"afile.*a part of the path is a file") as info:
        build_atlas("resnet18", images, "layer1", afile / "sub", weights="none")
    assert "\n" not in str(info.value)


def test_a_full_disk_while_writing_is_one_line(
    images: Path, tiny_model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(path: Any, obj: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(outputs_module, "write_json", full)
    out = tmp_path / "out"
    with pytest.raises(FeatureMapsError) as info:
        build_atlas(tiny_model, images, "features.3", out, workers=0)
    assert str(info.value) == f"the atlas in {out}: {out / 'atlas.json'}: the disk is full"


def test_a_crop_that_cannot_be_written_is_one_line(
    images: Path, tiny_model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    import featuremaps.atlas.outputs as outputs

    def full(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file).endswith(".jpg"):  # the crops: the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(outputs, "open", full, raising=False)  # the module's own open()
    out = tmp_path / "out"
    with pytest.raises(FeatureMapsError) as info:
        build_atlas(tiny_model, images, "features.3", out, top=2, workers=0)
    message = str(info.value)
    assert message.startswith(f"cannot write a crop: {out / 'crops'}")
    assert message.endswith(".jpg: the disk is full") and "\n" not in message
    assert list((out / "crops").iterdir()) == [] and not (out / "atlas.json").exists()


def test_crop_folders_left_by_a_killed_run_are_replaced(
    images: Path, tiny_model: LoadedModel, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    build_atlas(tiny_model, images, "features.3", out, top=2, workers=0)
    crops = out / "crops"
    for stale in (".features.3.new", ".features.3.x1y2.new", ".features.3.k9.old"):
        (crops / stale).mkdir()
        (crops / stale / "c0000_0.jpg").write_bytes(b"stale")
    (crops / "features.3" / "c9999_0.jpg").write_bytes(b"from an older run")
    result = build_atlas(tiny_model, images, "features.3", out, top=2, workers=0, restart=True)
    assert sorted(p.name for p in crops.iterdir()) == ["features.3"]
    written = sorted(p.name for p in (crops / "features.3").iterdir())
    assert written == [f"c{c:04d}.jpg" for c in range(16)]  # one sheet per channel
    assert result.images_used == 6


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated by a full disk or a copy
        lambda b: b"\x00" * len(b),  # zeroed
        lambda b: b"PK\x03\x04" + b[4:40],  # a zip header and nothing else
    ],
    ids=["truncated", "zeroed", "header-only"],
)
def test_corrupt_checkpoint_says_restart(
    damage: Any,
    images: Path,
    tiny_model: LoadedModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    build_atlas(tiny_model, images, "features.3", out, top=2, workers=0)
    state = out / STATE_FILE
    state.write_bytes(damage(state.read_bytes()))
    with pytest.raises(CheckpointError, match=r"truncated or corrupt.*--restart") as info:
        build_atlas(tiny_model, images, "features.3", out, top=2, workers=0)
    assert str(state) in str(info.value)
    result = build_atlas(tiny_model, images, "features.3", out, top=2, workers=0, restart=True)
    assert result.resumed == 0 and result.images_used == 6


def test_corrupt_checkpoint_through_the_cli_exits_1(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / STATE_FILE).write_bytes(b"PK\x03\x04 not really a zip")
    args = ["atlas", "resnet18", str(images), "--weights", "none", "--layers", "layer1"]
    code = _cli(*args, "--out", str(out), "--workers", "0")
    err = capsys.readouterr().err
    assert code == 1
    assert "is truncated or corrupt" in err and "--restart" in err and "Traceback" not in err


def test_checkpoint_of_other_layers_shape_is_refused(
    images: Path, tiny_model: LoadedModel, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    build_atlas(tiny_model, images, "features.3", out, top=2, workers=0)
    other = dataclasses.replace(tiny_model, module=_WiderToy().eval())
    with pytest.raises(CheckpointError, match=r"does not fit the layers.*--restart"):
        build_atlas(other, images, "features.3", out, top=2, workers=0)


class _WiderToy(torch.nn.Module):
    """The same names as ToyNet, 24 channels at ``features.3`` instead of 16."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 24, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def test_ctrl_c_says_how_far_it_got_and_keeps_the_checkpoint(
    images: Path, tiny_model: LoadedModel, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    calls = 0

    def interrupt(phase: str, done: int, total: int) -> None:
        nonlocal calls
        calls += 1
        if phase == "images" and calls == 3:  # after the second batch of two
            raise KeyboardInterrupt

    with pytest.raises(Interrupted) as info:
        build_atlas(
            tiny_model, images, "features.3", out, batch_size=2, workers=0, progress=interrupt
        )
    assert str(info.value) == (
        f"interrupted: 4 of 6 images written to the checkpoint {out / STATE_FILE}; "
        "run the same command to resume"
    )
    assert not (out / "atlas.json").exists()
    result = build_atlas(tiny_model, images, "features.3", out, batch_size=2, workers=0)
    assert result.resumed == 4 and result.images_used == 6
