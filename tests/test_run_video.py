"""`featuremaps run` with videos among the inputs, and `--pca-joint` over the images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import featuremaps as fm
from featuremaps.cli import main
from featuremaps.pca import pca_basis, pca_fit

av = pytest.importorskip("av")

TOY = "conftest:toy_factory"
LAYER = "features.3"  # ToyNet's second conv: 16 channels


def _clip(path: Path, frames: int, rate: int = 20, size: int = 64) -> Path:
    """A small H.264 (or MPEG-4) clip: a bright square moving over a gradient."""
    container = av.open(str(path), "w")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    stream = container.add_stream(codec, rate=rate)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    for i in range(frames):
        a = np.zeros((size, size, 3), np.uint8)
        a[..., 0] = np.linspace(0, 255, size, dtype=np.uint8)[None]
        a[8 + 2 * i : 28 + 2 * i, 20:40] = (0, 200, 255)
        for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def _frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code: int = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_writes_a_pca_video_per_layer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """10 frames at 20 fps sampled at --fps 10 give 5 output frames, in one video per layer,
    the input beside the PCA picture and the two --channels; listed in manifest["videos"]."""
    clip = _clip(tmp_path / "clip.mp4", frames=10, rate=20)
    out = tmp_path / "d"
    code, stdout, err = _run_main(
        ["run", TOY, str(clip), "--layers", LAYER, "--fps", "10", "--channels", "3,7",
         "--out", str(out)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"] == []
    (video,) = manifest["videos"]
    assert video["path"] == str(clip) and video["key"] == "clip"
    assert video["frames"] == 5 and video["fps"] == 10
    assert set(video["videos"]) == {LAYER}
    frames = _frames(out / video["videos"][LAYER])
    assert len(frames) == 5
    assert frames[0].shape == (224, 4 * 224, 3)  # input | PCA | channel 3 | channel 7
    detail = json.loads((out / video["manifest"]).read_text())
    assert detail["source_frames"] == [0, 2, 4, 6, 8]  # order kept, every second frame
    assert detail["channels"] == [3, 7]
    bases = fm.pca.load_bases(out / video["pca_basis"])
    assert set(bases) == {LAYER} and bases[LAYER].channels == 16
    assert "5 frames at 10 fps" in stdout


def test_run_default_fps_keeps_a_slow_clip_whole(tmp_path: Path) -> None:
    """Without --fps a clip at or under the default rate keeps every frame."""
    from featuremaps.pipeline import DEFAULT_VIDEO_FPS, run

    clip = _clip(tmp_path / "slow.mp4", frames=4, rate=int(DEFAULT_VIDEO_FPS // 2))
    calls: list[tuple[str, int, int]] = []
    res = run(TOY, [clip], LAYER, tmp_path / "d", progress=lambda *a: calls.append(a))
    (video,) = res.manifest_data["videos"]
    assert video["frames"] == 4 and video["fps"] == DEFAULT_VIDEO_FPS // 2
    # progress counts frames (the CLI's bar shows them per second), per phase, to the end
    assert [c for c in calls if c[0] == "slow forward"][-1] == ("slow forward", 4, 4)
    assert [c for c in calls if c[0] == "slow write"][-1] == ("slow write", 4, 4)
    assert len(_frames(tmp_path / "d" / video["videos"][LAYER])) == 4
    assert all(p.exists() for p in res.files)


def test_run_corrupt_video_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a movie" * 3)
    out = tmp_path / "d"
    code, _, err = _run_main(["run", TOY, str(bad), "--layers", LAYER, "--out", str(out)], capsys)
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1, repr(err)
    assert "broken.mp4" in err and "Traceback" not in err
    assert not out.exists()  # checked before the model is loaded or anything written


def test_run_bad_channels_is_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clip = _clip(tmp_path / "c.mp4", frames=2)
    code, _, err = _run_main(
        ["run", TOY, str(clip), "--channels", "3,x", "--out", str(tmp_path / "d")], capsys
    )
    assert code == 2 and "--channels" in err and "3,x" in err


def _images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    a = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(a)
    b = tmp_path / "bars.png"
    bars = np.zeros((96, 96, 3), np.uint8)
    bars[:, ::12] = (255, 40, 0)
    bars[40:60] = (0, 90, 200)
    Image.fromarray(bars).save(b)
    return [a, b]


def _maps(paths: list[Path]) -> torch.Tensor:
    m = fm.load_model(TOY)
    x = torch.stack([fm.preprocess(fm.load_image(p), m.preprocess) for p in paths])
    return fm.capture(m.module, x, [LAYER])[LAYER]


def test_pca_joint_draws_every_image_in_one_basis(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--pca-joint: each LAYER.pca.png is the picture of one basis fitted over both
    images' maps together (pca_basis of the stacked maps), not of its own fit."""
    paths = _images(tmp_path)
    out = tmp_path / "d"
    code, _, err = _run_main(
        ["run", TOY, *map(str, paths), "--layers", LAYER, "--pca-joint", "--pca-whiten",
         "--out", str(out)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pca_joint"] is True
    maps = _maps(paths)
    joint = pca_basis(maps, whiten=True)
    for i, entry in enumerate(manifest["images"]):
        got = np.asarray(Image.open(out / entry["layers"][LAYER]["pca_picture"]))
        want = (joint.apply(maps[i : i + 1]).rgb[0] * 255 + 0.5).astype(np.uint8)
        # the same picture up to 8-bit rounding of float sums taken in another order
        assert np.abs(got.astype(int) - want).max() <= 1
        assert (got.astype(int) != want).mean() < 0.01
        alone = (pca_fit(maps[i], whiten=True).rgb[0] * 255 + 0.5).astype(np.uint8)
        assert np.abs(got.astype(int) - alone).max() > 20  # its own fit draws otherwise


def test_pca_joint_refuses_a_given_basis(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = _images(tmp_path)
    code, _, err = _run_main(
        ["run", TOY, str(paths[0]), "--pca-joint", "--pca-basis", str(tmp_path / "b.npz"),
         "--out", str(tmp_path / "d")],
        capsys,
    )  # fmt: skip
    assert code == 1 and "--pca-joint" in err and "--pca-basis" in err


def test_run_folder_gives_images_and_videos_with_distinct_keys(tmp_path: Path) -> None:
    """A folder's videos are found beside its images; a.png and a.mp4 get keys a, a-2."""
    from featuremaps.pipeline import run

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(folder / "a.png")
    _clip(folder / "a.mp4", frames=3, rate=5)
    res = run(TOY, [folder], LAYER, tmp_path / "d")
    (image,) = res.manifest_data["images"]
    (video,) = res.manifest_data["videos"]
    assert (image["key"], video["key"]) == ("a", "a-2")
    assert video["frames"] == 3
    assert (tmp_path / "d" / video["videos"][LAYER]).is_file()
    assert (tmp_path / "d" / image["input"]).is_file()
