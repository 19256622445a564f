"""``atlas --visualize``: one feature visualization per channel beside its crops."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from featuremaps.atlas import STATE_FILE, build_atlas
from featuremaps.atlas.visuals import VisualizeSpec, plan_jobs
from featuremaps.cli import main
from featuremaps.models import LoadedModel, Preprocess
from featuremaps.options import OptionError
from featuremaps.visualize import visualize

LAYERS = ["features.0", "features.3"]
STEPS, SIZE, PER_JOB = 4, 32, 5


def _toy() -> LoadedModel:
    from conftest import ToyNet

    torch.manual_seed(0)
    return LoadedModel(ToyNet().eval(), Preprocess(resize=32, crop=32), "toy", "random")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _build(out: Path, images: Path, **kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "top": 2,
        "batch_size": 4,
        "workers": 0,
        "visualize": True,
        "visualize_steps": STEPS,
        "visualize_size": SIZE,
        "visualize_batch": PER_JOB,
    }
    options.update(kwargs)
    return build_atlas(_toy(), images, LAYERS, out, **options)


@pytest.fixture(scope="module")
def atlas(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("atlas")
    result = _build(out, images)
    assert result.visualize_workers == 1
    return out


def _doc(out: Path) -> dict[str, Any]:
    return json.loads((out / "atlas.json").read_text())


def _picture(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_every_channel_has_a_picture_and_the_pages_show_it(atlas: Path) -> None:
    doc = _doc(atlas)
    assert doc["visualize"]["steps"] == STEPS and doc["visualize"]["size"] == SIZE
    for name in LAYERS:
        layer = doc["layers"][name]
        page = (atlas / layer["page"]).read_text()
        assert page.count('<figure class="vis">') == layer["shape"][0]
        for ch in layer["channels"]:
            vis = ch["visualization"]
            assert vis["objective"] == f"channel:{name}:{ch['channel']}"
            assert _picture(atlas / vis["file"]).shape == (SIZE, SIZE, 3)
            assert Path(vis["file"]).parent == Path(ch["top"][0]["crop"]["file"]).parent  # beside
            assert f'src="{vis["file"]}"' in page
    assert f"{STEPS} steps, {SIZE} px" in (atlas / doc["layers"]["features.3"]["page"]).read_text()


def test_pictures_equal_visualize_with_the_same_seed(atlas: Path) -> None:
    """A job of the atlas is one visualize() call on the same channels (channels 5-9)."""
    model = _toy()
    channels = range(PER_JOB, 2 * PER_JOB)
    vis = visualize(
        model.module,
        [f"channel:features.3:{c}" for c in channels],
        steps=STEPS,
        size=SIZE,
        seed=0,
        preprocess=model.preprocess,
    )
    doc = _doc(atlas)
    for c, v in zip(channels, vis, strict=True):
        entry = doc["layers"]["features.3"]["channels"][c]["visualization"]
        assert np.array_equal(_picture(atlas / entry["file"]), np.asarray(v.to_pil()))
        assert entry["value"] == v.value
    # and the pictures differ between channels: each is its own optimization
    a = _picture(atlas / doc["layers"]["features.3"]["channels"][5]["visualization"]["file"])
    b = _picture(atlas / doc["layers"]["features.3"]["channels"][6]["visualization"]["file"])
    assert not np.array_equal(a, b)


def test_jobs_cover_every_channel_once() -> None:
    from featuremaps.atlas import AtlasSpec

    spec = AtlasSpec(("a", "b"), (8, 16), "max", 2)
    jobs = plan_jobs(spec, VisualizeSpec(batch=PER_JOB))
    assert [len(j.channels) for j in jobs] == [5, 3, 5, 5, 5, 1]
    seen = [(j.layer, c) for j in jobs for c in j.channels]
    assert seen == [("a", c) for c in range(8)] + [("b", c) for c in range(16)]
    assert jobs[2].objectives[0] == "channel:b:0"


@pytest.mark.parametrize(
    ("option", "value"),
    [("visualize_steps", 0), ("visualize_size", 4), ("visualize_batch", 0)],
)
def test_bad_visualize_options_fail_before_any_work(
    option: str, value: int, images: Path, tmp_path: Path
) -> None:
    with pytest.raises(OptionError, match=option.replace("_", "-")):
        _build(tmp_path / "o", images, **{option: value})
    assert not (tmp_path / "o").exists()


def test_a_resumed_run_can_add_the_visualizations(
    atlas: Path, images: Path, tmp_path: Path
) -> None:
    def stop(phase: str, done: int, total: int) -> None:
        if phase == "images" and done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path, images, visualize=False, checkpoint_seconds=0, progress=stop)
    assert (tmp_path / STATE_FILE).exists()
    phases: list[str] = []
    result = _build(tmp_path, images, progress=lambda p, d, t: phases.append(p))
    assert result.resumed == 4 and "visualize" in phases
    assert (tmp_path / "atlas.json").read_bytes() == (atlas / "atlas.json").read_bytes()


def test_cli_visualize(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    try:  # a successful command may end with SystemExit(0)
        main(
            [
                "atlas",
                "conftest:toy_factory",
                str(images),
                "--layers",
                "features.3",
                "--weights",
                "none",
                "--top",
                "2",
                "--workers",
                "0",
                "--visualize",
                "--visualize-steps",
                "2",
                "--visualize-size",
                "16",
                "--out",
                str(out),
            ]
        )
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code
    doc = _doc(out)
    files = [ch["visualization"]["file"] for ch in doc["layers"]["features.3"]["channels"]]
    assert len(files) == 16 and all(_picture(out / f).shape == (16, 16, 3) for f in files)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_spreads_the_channels_over_its_actors(
    atlas: Path, images: Path, tmp_path: Path
) -> None:
    ray = pytest.importorskip("ray")
    pickle = pytest.importorskip("ray.cloudpickle")
    import conftest

    pickle.register_pickle_by_value(conftest)  # workers cannot import conftest
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error")
    try:
        result = _build(tmp_path, images, engine="ray", workers=2)
    finally:
        ray.shutdown()
        pickle.unregister_pickle_by_value(conftest)
    assert result.visualize_workers == 2  # 5 jobs over a pool of two actors
    local, remote = _doc(atlas), _doc(tmp_path)
    for name in LAYERS:
        for a, b in zip(
            local["layers"][name]["channels"], remote["layers"][name]["channels"], strict=True
        ):
            assert a["top"] == b["top"]
            pa = _picture(atlas / a["visualization"]["file"]).astype(int)
            pb = _picture(tmp_path / b["visualization"]["file"]).astype(int)
            assert np.abs(pa - pb).max() <= 1  # the same job; at most float rounding
            assert b["visualization"]["value"] == pytest.approx(a["visualization"]["value"])
