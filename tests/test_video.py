"""Video in, video out: frame count and order, one basis (still frames keep their colours),
faithful frames, reusing a basis, clear errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featuremaps import capture
from featuremaps.images import display_image, preprocess
from featuremaps.models import Preprocess
from featuremaps.pca import load_bases
from featuremaps.video import VideoError, compose_frame, read_frames, video_pca

av = pytest.importorskip("av")

PP = Preprocess(resize=32, crop=32)


def _write(path: Path, frames: list[np.ndarray], rate: int = 8) -> Path:
    """Encode ``(H, W, 3)`` uint8 frames: H.264 MP4, VP9 WebM or an animated GIF."""
    if path.suffix == ".gif":
        imgs = [Image.fromarray(f) for f in frames]
        imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=1000 // rate, loop=0)
        return path
    codec = {".mp4": "libx264", ".webm": "libvpx-vp9", ".mov": "libx264"}[path.suffix]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = "yuv420p"
        if codec == "libx264":
            s.options = {"qp": "0"}  # lossless: the pixel values are the test's data
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _levels(n: int) -> list[np.ndarray]:
    """Frame i is a flat gray of level 20 + 12 i: the order is readable back."""
    return [np.full((48, 64, 3), 20 + 12 * i, np.uint8) for i in range(n)]


def _textured(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((64, 48), Image.BILINEAR))


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".gif"])
def test_frame_count_and_order_are_kept(tmp_path, toy, suffix) -> None:
    src = _write(tmp_path / f"levels{suffix}", _levels(12))
    assert [i for i, _ in read_frames(src)] == list(range(12))
    res = video_pca(toy, src, ["features.3"], tmp_path / "out", preprocess=PP, batch_size=5)
    frames = _decode(res.videos["features.3"])
    assert res.frames == len(frames) == 12 and res.source_frames == list(range(12))
    left = [float(f[:, :32].mean()) for f in frames]  # the input tile, as shown
    np.testing.assert_allclose(left, [20 + 12 * i for i in range(12)], atol=3)
    manifest = json.loads(res.manifest.read_text())
    assert (
        manifest["frames"] == 12
        and len(manifest["layers"]["features.3"]["outliers_per_frame"]) == 12
    )


def test_sampling_at_fps_keeps_every_other_frame_in_order(tmp_path, toy) -> None:
    src = _write(tmp_path / "levels.mp4", _levels(12), rate=8)
    assert [i for i, _ in read_frames(src, fps=4)] == [0, 2, 4, 6, 8, 10]
    res = video_pca(toy, src, "features.3", tmp_path / "out", fps=4, preprocess=PP)
    assert res.source_frames == [0, 2, 4, 6, 8, 10] and res.fps == 4
    frames = _decode(res.videos["features.3"])
    left = [float(f[:, :32].mean()) for f in frames]
    np.testing.assert_allclose(left, [20 + 24 * i for i in range(6)], atol=3)
    with av.open(str(res.videos["features.3"])) as c:
        assert float(c.streams.video[0].average_rate) == 4


def test_still_video_gives_frames_of_the_same_colours(tmp_path, toy) -> None:
    still = _textured()
    src = _write(tmp_path / "still.mp4", [still] * 10)
    res = video_pca(
        toy,
        src,
        ["features.0", "features.3"],
        tmp_path / "out",
        preprocess=PP,
        foreground="auto",
        outliers=6,
        whiten=True,
        colors="sigmoid",
        channels=[1, 5],
        batch_size=4,
    )
    for layer in ("features.0", "features.3"):
        frames = np.stack(_decode(res.videos[layer])).astype(int)
        assert frames.shape == (10, 32, 32 * 4, 3)
        assert np.abs(frames - frames[0]).max() <= 2  # the same colours in every frame
    # Faithful: each frame is the saved basis applied to the model's map of that frame
    # (exact pixels with lossless output; the default H.264 rounds colours a little).
    exact = video_pca(
        toy,
        src,
        ["features.3"],
        tmp_path / "exact",
        preprocess=PP,
        foreground="auto",
        outliers=6,
        whiten=True,
        colors="sigmoid",
        channels=[1, 5],
        lossless=True,
    )
    x = preprocess(Image.fromarray(_decode(src)[0]), PP)[None]
    fmap = capture(toy, x, ["features.3"])["features.3"][0]
    basis = load_bases(exact.basis_file)["features.3"]
    assert basis.whiten and basis.colors == "sigmoid"
    c = fmap.numpy()
    chans = [(c[ch] - c[ch].min()) / (c[ch].max() - c[ch].min()) for ch in (1, 5)]
    expect = compose_frame(display_image(x[0], PP), basis.apply(fmap).rgb[0], chans)
    got = np.stack(_decode(exact.videos["features.3"]))
    assert got.shape == (10, *expect.shape)
    assert np.abs(got.astype(int) - expect).max() <= 1  # float32 vs recomputed rounding
    lossy = np.stack(_decode(res.videos["features.3"])).astype(int)
    assert np.abs(lossy - expect).mean() < 6.0


def test_a_basis_from_one_run_draws_another(tmp_path, toy) -> None:
    a = _write(tmp_path / "a.mp4", [_textured(1), _textured(2), _textured(3)])
    first = video_pca(toy, a, "features.3", tmp_path / "one", preprocess=PP)
    again = video_pca(toy, a, "features.3", tmp_path / "two", preprocess=PP, bases=first.bases)
    np.testing.assert_array_equal(
        first.bases["features.3"].components, again.bases["features.3"].components
    )
    np.testing.assert_array_equal(
        np.stack(_decode(first.videos["features.3"])), np.stack(_decode(again.videos["features.3"]))
    )
    wrong = {"features.0": first.bases["features.3"]}
    with pytest.raises(VideoError, match="16 channels, the layer has 8"):
        video_pca(toy, a, "features.0", tmp_path / "three", preprocess=PP, bases=wrong)


def test_corrupt_missing_and_unsupported_videos_get_clear_errors(tmp_path, toy) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 50)
    with pytest.raises(VideoError, match=r"cannot read .*junk\.mp4 as a video"):
        video_pca(toy, junk, "features.3", tmp_path / "out", preprocess=PP)
    assert not (tmp_path / "out").exists()  # failed before any output or compute
    with pytest.raises(VideoError, match="no such file"):
        list(read_frames(tmp_path / "missing.webm"))
    good = _write(tmp_path / "good.mp4", [_textured(i) for i in range(30)])
    data = good.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match=r"cut\.mp4"):
        video_pca(toy, cut, "features.3", tmp_path / "out2", preprocess=PP)
    text = tmp_path / "notes.webm"
    text.write_text("not a video either\n")
    with pytest.raises(VideoError, match=r"notes\.webm"):
        list(read_frames(text))
    with pytest.raises(VideoError, match="fps must be a positive number"):
        list(read_frames(good, fps=0))
    seen: list[str] = []
    with pytest.raises(VideoError, match=r"features.3 has 16 channels; channel\(s\) \[99\]"):
        video_pca(
            toy,
            good,
            "features.3",
            tmp_path / "out3",
            preprocess=PP,
            channels=[99],
            batch_size=4,
            progress=lambda p: seen.append(p.phase),
        )
    assert seen == []  # raised at the first batch, before any progress
