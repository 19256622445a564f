"""Images: formats, colour modes, orientation, bad files, preprocessing round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featuremaps import ImageError, Preprocess, display_image, expand_inputs, load_image
from featuremaps import preprocess as prep
from featuremaps.images import sample_image


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF"])
def test_formats_decode_to_rgb(tmp_path: Path, fmt: str) -> None:
    arr = np.zeros((20, 30, 3), np.uint8)
    arr[:, :15] = (200, 30, 40)
    path = tmp_path / f"img.{fmt.lower()}"
    Image.fromarray(arr).save(path, format=fmt, **({"quality": 100} if fmt != "BMP" else {}))
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (30, 20)
    assert np.abs(np.asarray(img)[10, 5].astype(int) - [200, 30, 40]).max() <= 6


def test_modes_become_rgb(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png"))
    assert tuple(out[1, 1]) == (255, 255, 255)  # transparent -> white
    assert tuple(out[0, 0]) == (0, 0, 255)

    Image.new("L", (4, 4), 77).save(tmp_path / "g.png")
    assert tuple(np.asarray(load_image(tmp_path / "g.png"))[0, 0]) == (77, 77, 77)

    pal = Image.new("P", (4, 4), 3)
    pal.putpalette([0, 0, 0, 10, 10, 10, 20, 20, 20, 0, 128, 255] + [0] * 756)
    pal.save(tmp_path / "p.png")
    assert tuple(np.asarray(load_image(tmp_path / "p.png"))[0, 0]) == (0, 128, 255)

    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    c = np.asarray(load_image(tmp_path / "c.jpg"))[0, 0].astype(int)
    assert c[0] > 200 and c[1] < 60 and c[2] < 60  # red

    sixteen = Image.fromarray(np.full((4, 4), 65535 // 2, np.uint16))
    sixteen.save(tmp_path / "s.png")
    assert abs(int(np.asarray(load_image(tmp_path / "s.png"))[0, 0, 0]) - 128) <= 1

    f = Image.fromarray(np.full((4, 4), 0.25, np.float32), "F")
    f.save(tmp_path / "f.tiff")
    assert abs(int(np.asarray(load_image(tmp_path / "f.tiff"))[0, 0, 0]) - 64) <= 1


def test_exif_orientation_is_honoured(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    img.save(tmp_path / "o.jpg", exif=exif)
    assert load_image(tmp_path / "o.jpg").size == (20, 40)


def test_bad_files_give_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "junk.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(tmp_path / "junk.jpg")
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    good = tmp_path / "t.png"
    Image.new("RGB", (64, 64)).save(good)
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError):
        load_image(tmp_path / "trunc.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="too large"):
        load_image(good)


def test_expand_inputs(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ["b.png", "a.jpg", "sub/c.webp", "notes.txt"]:
        p = tmp_path / name
        if p.suffix == ".txt":
            p.write_text("x")
        else:
            Image.new("RGB", (8, 8)).save(p)
    found = expand_inputs([tmp_path])
    assert [p.name for p in found] == ["a.jpg", "b.png", "c.webp"]
    assert [p.name for p in expand_inputs([str(tmp_path / "*.png")])] == ["b.png"]
    with pytest.raises(ImageError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.gif")])
    with pytest.raises(ImageError, match="no such file"):
        expand_inputs([tmp_path / "nope.jpg"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="holds no images"):
        expand_inputs([tmp_path / "empty"])


def test_preprocess_and_display_round_trip() -> None:
    img = load_image(sample_image("coffee"))
    pp = Preprocess()
    x = prep(img, pp)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 2.0  # normalized
    shown = display_image(x, pp)
    from torchvision.transforms.v2 import functional as F

    ref = F.center_crop(F.resize(F.pil_to_tensor(img), [256], antialias=True), [224, 224])
    diff = np.abs(shown.astype(int) - ref.permute(1, 2, 0).numpy().astype(int))
    assert diff.max() <= 1
    full = prep(img, pp, full=True)
    assert full.shape == (3, 256, 384)  # 400x600 photo, short side 256, no crop


def test_multi_frame_images_warn_that_only_the_first_frame_is_used(tmp_path: Path) -> None:
    from featuremaps.images import FirstFrameWarning

    frames = [Image.new("RGB", (8, 6), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    frames[0].save(tmp_path / "pages.tiff", save_all=True, append_images=frames[1:2])
    for name, n in (("anim.gif", 3), ("pages.tiff", 2)):
        with pytest.warns(FirstFrameWarning, match=f"holds {n} frames; only the first is used"):
            img = load_image(tmp_path / name)
        assert np.asarray(img)[0, 0, 0] > 200 and np.asarray(img)[0, 0, 1] < 50  # frame 0
    import warnings

    frames[0].save(tmp_path / "still.gif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(tmp_path / "still.gif")


def test_multi_frame_warning_is_one_plain_line_in_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from featuremaps.cli import main

    frames = [Image.new("RGB", (8, 6), c) for c in ((250, 0, 0), (0, 250, 0))]
    folder = tmp_path / "[b]gifs"
    folder.mkdir()
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    (tmp_path / "m.py").write_text(
        "import torch\ndef f():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    main(["run", "m:f", str(folder / "anim.gif"), "--layers", "0", "--out", "o"])
    err = capsys.readouterr().err
    gif = str(folder / "anim.gif")
    assert err == f"warning: image {gif!r} holds 2 frames; only the first is used\n"
