"""The engine contract, the choice of devices and GPUs, and reduced-precision forwards.

Everything here runs on the CPU; what needs a GPU is said in the README.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from featuremaps import FeatureMapsError, LoadedModel, capture
from featuremaps.atlas import (
    BatchResult,
    Engine,
    EngineOptions,
    LoadedBatch,
    build_atlas,
    create_engine,
    process_batch,
)
from featuremaps.atlas import build as build_module
from featuremaps.atlas.batch import AtlasSpec, Precision
from featuremaps.atlas.engines.local import LocalEngine
from featuremaps.models import Preprocess


@pytest.fixture
def tiny_model() -> LoadedModel:
    from conftest import ToyNet

    torch.manual_seed(0)
    return LoadedModel(ToyNet().eval(), Preprocess(resize=32, crop=32), "toy", "random")


def test_both_engines_fulfil_the_protocol_and_declare_what_they_can() -> None:
    local = create_engine("local", EngineOptions(device="cpu"))
    assert isinstance(local, Engine) and isinstance(local, LocalEngine)
    assert local.capabilities.name == "local" and not local.capabilities.multi_node
    pytest.importorskip("ray")
    from featuremaps.atlas.engines.ray import RayEngine

    ray_engine = create_engine("ray", EngineOptions())
    assert isinstance(ray_engine, Engine) and isinstance(ray_engine, RayEngine)
    caps = ray_engine.capabilities
    assert caps.multi_node and caps.remote_reads and caps.gpu_workers and "cuda" in caps.devices
    with pytest.raises(FeatureMapsError, match="--engine 'spark'"):
        create_engine("spark", EngineOptions())


def _imports(path: Path) -> set[str]:
    """The modules ``path`` imports, relative ones written with their dots."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_engines_do_not_import_each_other() -> None:
    root = Path(__file__).parents[1] / "src" / "featuremaps" / "atlas" / "engines"
    local, ray_ = _imports(root / "local.py"), _imports(root / "ray.py")
    assert ".base" in local and ".base" in ray_
    assert not {".ray", "ray", "ray.data"} & local
    assert ".local" not in ray_


def test_local_device_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert LocalEngine(EngineOptions(device="cpu")).device == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert LocalEngine(EngineOptions(device="auto")).device.type in ("cpu", "mps")
    with pytest.raises(FeatureMapsError, match="--device cuda"):
        LocalEngine(EngineOptions(device="cuda"))


def test_ray_gpus_per_worker_default_and_actor_device(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray")
    from featuremaps.atlas.engines.ray import actor_device, default_gpus_per_worker

    assert default_gpus_per_worker({"CPU": 16.0}) == 0
    assert default_gpus_per_worker({"CPU": 16.0, "GPU": 0.0}) == 0
    assert default_gpus_per_worker({"CPU": 16.0, "GPU": 8.0}) == 1
    assert actor_device(0) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FeatureMapsError, match=r"--gpus-per-worker 1: .*no CUDA device"):
        actor_device(1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert actor_device(1) == torch.device("cuda")
    assert actor_device(0.5) == torch.device("cuda")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"precision": "fp8"}, r"--precision 'fp8': use fp32, bf16 or fp16"),
        ({"gpus_per_worker": -1}, "--gpus-per-worker -1"),
        ({"workers": -1}, "--workers -1"),
    ],
)
def test_bad_engine_options_fail_before_any_work(
    kwargs: dict[str, object], match: str, tmp_path: Path
) -> None:
    with pytest.raises(FeatureMapsError, match=match):
        build_atlas("resnet18", tmp_path, "layer1", tmp_path / "out", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def _toy_images(folder: Path, n: int, side: int = 40, seed: int = 2) -> list[str]:
    """``n`` random-noise PNGs of ``side`` pixels in a new ``folder``; their paths."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return sorted(str(p) for p in folder.iterdir())


def _batch(n: int = 3) -> LoadedBatch:
    torch.manual_seed(4)
    return LoadedBatch(0, np.arange(n, dtype=np.int64), torch.randn(n, 3, 32, 32), [])


@pytest.mark.parametrize("precision", [Precision.BF16, Precision.FP16])
def test_reduced_precision_forward_keeps_float32_statistics(
    precision: Precision, tiny_model: LoadedModel
) -> None:
    spec = AtlasSpec(("features.3",), (16,), "max", 2)
    batch = _batch()
    cpu = torch.device("cpu")
    low = process_batch(tiny_model.module, batch, spec, cpu, precision).layers[0]
    full = process_batch(tiny_model.module, batch, spec, cpu, "fp32").layers[0]
    assert low.scores.dtype == np.float32 and low.total.dtype == np.float64
    assert low.pca.cosum.dtype == torch.float64 and low.pca.sum.dtype == torch.float64
    dtype = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}[precision]
    with torch.autocast("cpu", dtype=dtype):  # an independent reduced-precision capture
        maps = capture(tiny_model.module, batch.x, ["features.3"])["features.3"]
    assert maps.dtype == dtype  # the forward really ran in the reduced type
    flat = maps.float().numpy().reshape(3, 16, -1)
    best = flat.max(2)  # (image, channel)
    for c in range(16):
        order = sorted(range(3), key=lambda i: (-best[i, c], i))[:2]
        assert low.ids[c].tolist() == order
        assert low.scores[c].tolist() == [best[i, c] for i in order]
    np.testing.assert_allclose(low.total, flat.sum(2, dtype=np.float64).sum(0), rtol=1e-6)
    assert not np.array_equal(low.scores, full.scores)  # fp32 is not what ran
    np.testing.assert_allclose(low.scores, full.scores, rtol=0.05, atol=0.05)


def test_fp32_is_the_default_and_bitwise_unchanged(tiny_model: LoadedModel) -> None:
    spec = AtlasSpec(("features.3",), (16,), "mean", 2)
    cpu = torch.device("cpu")
    a = process_batch(tiny_model.module, _batch(), spec, cpu).to_bytes()
    b = process_batch(tiny_model.module, _batch(), spec, cpu, Precision.FP32).to_bytes()
    assert a == b


def test_atlas_in_bf16_through_the_local_engine(tiny_model: LoadedModel, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _toy_images(data, 5, side=36, seed=1)
    result = build_atlas(
        tiny_model, data, "features.3", tmp_path / "out", top=2, workers=0, precision="bf16"
    )
    doc = json.loads(result.atlas_json.read_text())
    assert result.images_used == 5 and len(doc["layers"]["features.3"]["channels"]) == 16
    assert next(tiny_model.module.parameters()).device.type == "cpu"


def test_gpus_per_actor_checks_the_cluster() -> None:
    pytest.importorskip("ray")
    from featuremaps.atlas.engines.ray import gpus_per_actor

    assert gpus_per_actor(None, {"CPU": 8.0}) == 0
    assert gpus_per_actor(None, {"CPU": 8.0, "GPU": 4.0}) == 1
    assert gpus_per_actor(0.5, {"GPU": 1.0}) == 0.5
    assert gpus_per_actor(0, {"GPU": 4.0}) == 0
    with pytest.raises(FeatureMapsError, match=r"--gpus-per-worker 1: the Ray cluster has 0 GPUs"):
        gpus_per_actor(1, {"CPU": 8.0})


class _Broken(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:  # the probe (one blank image) passes, real batches fail
            raise RuntimeError("the forward failed on a real batch")
        return self.conv(x)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_an_actor_failure_is_one_line(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.fromarray(np.full((36, 36, 3), 40 * i, dtype=np.uint8)).save(data / f"{i}.png")
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    model = LoadedModel(_Broken().eval(), Preprocess(resize=32, crop=32), "broken", "random")
    ray.init(num_cpus=1, include_dashboard=False, logging_level="error")
    try:
        with pytest.raises(FeatureMapsError) as info:
            build_atlas(model, data, "conv", tmp_path / "out", engine="ray", workers=1)
    finally:
        ray.shutdown()
    message = str(info.value)
    assert message.startswith("the Ray engine failed: RuntimeError: the forward failed")
    assert "\n" not in message


def test_local_engine_overlaps_only_on_a_gpu_and_both_loops_agree(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    from featuremaps.atlas import Plan
    from featuremaps.atlas.data import fixed_size

    engine = LocalEngine(EngineOptions(device="cpu", workers=0))
    assert engine.overlap is False  # on the CPU the forward already uses every core
    loaded = LoadedModel(tiny_model.module, fixed_size(tiny_model.preprocess), "toy", "random")
    spec = AtlasSpec(("features.1", "features.4"), (8, 16), "max", 2)
    plan = Plan(tuple(_toy_images(tmp_path / "data", 7)), 3)  # batches of 3, 3 and 1
    serial = [r.to_bytes() for r in engine.run(plan, range(plan.n_batches), loaded, spec)]
    engine.overlap = True  # the GPU's loop, run here on the CPU
    overlapped = [r.to_bytes() for r in engine.run(plan, range(plan.n_batches), loaded, spec)]
    assert len(serial) == 3 and serial == overlapped
    assert [BatchResult.from_bytes(b).index for b in serial] == [0, 1, 2]


def test_a_batch_reduces_the_same_whatever_the_number_of_threads(
    tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import featuremaps.atlas.batch as batch_mod

    spec = AtlasSpec(("features.1", "features.3", "features.4"), (8, 16, 16), "max", 2)
    cpu = torch.device("cpu")
    results = []
    for threads in (1, 3):
        with ThreadPoolExecutor(threads, initializer=batch_mod._one_thread) as pool:
            monkeypatch.setattr(batch_mod, "_POOL", pool)
            results.append(process_batch(tiny_model.module, _batch(5), spec, cpu).to_bytes())
    assert results[0] == results[1]
    monkeypatch.setattr(batch_mod, "_POOL", None)  # the process's own pool, made on use
    before = torch.get_num_threads()
    assert process_batch(tiny_model.module, _batch(5), spec, cpu).to_bytes() == results[0]
    assert torch.get_num_threads() == before  # the pool's one-thread setting stays its own
    layers = BatchResult.from_bytes(results[0]).layers
    assert [p.scores.shape[0] for p in layers] == [8, 16, 16]  # in the spec's order
    with torch.no_grad():  # independent: each layer's per-channel sums over the batch
        maps = capture(tiny_model.module, _batch(5).x, list(spec.names), copy=True)
    for name, part in zip(spec.names, layers, strict=True):
        expected = maps[name].double().sum((0, 2, 3)).numpy()
        # per-map sums: float64 up to PCA_PIXELS pixels, float32 (then widened) beyond
        exact = maps[name].shape[2] * maps[name].shape[3] <= batch_mod.PCA_PIXELS
        np.testing.assert_allclose(part.total, expected, rtol=1e-9 if exact else 1e-6)


def test_crops_kept_during_the_pass_equal_a_fresh_decoding(
    tiny_model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local engine's crops come from the pixels of the pass (no second decoding);
    the files are the same bytes as those cut from a fresh decoding of each image."""
    import featuremaps.atlas.crops as crops_mod
    import featuremaps.atlas.outputs as outputs_mod

    data = tmp_path / "data"
    _toy_images(data, 11)
    decoded: list[str] = []
    real_read = outputs_mod.read_image

    def counting_read(path: str, *args: object) -> object:
        decoded.append(path)
        return real_read(path, *args)

    monkeypatch.setattr(outputs_mod, "read_image", counting_read)  # workers=0: in-process
    kept: list[crops_mod.CropTiles] = []
    real_tiles = crops_mod.CropTiles

    def recording_tiles(*args: object, **kwargs: object) -> crops_mod.CropTiles:
        kept.append(real_tiles(*args, **kwargs))  # type: ignore[arg-type]
        return kept[-1]

    monkeypatch.setattr(build_module, "CropTiles", recording_tiles)

    def run(out: str) -> dict[str, bytes]:
        build_atlas(
            tiny_model,
            data,
            "features.1,4",
            tmp_path / out,
            top=3,
            batch_size=4,
            workers=0,
            score="relevance",
        )
        root = tmp_path / out
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.jp*g")}

    with_tiles = run("kept")
    assert decoded == [] and kept[-1].enabled
    doc = json.loads((tmp_path / "kept" / "atlas.json").read_text())
    for li, layer in enumerate(doc["layers"].values()):  # only the final entries are held
        for kind, key in enumerate(("top", "top_relevance")):
            held = [len(d) for d in kept[-1].tiles[li][kind]]
            assert held == [len(ch[key]) for ch in layer["channels"]]
    monkeypatch.setattr(crops_mod, "TILE_BUDGET", 0)  # too little memory: decode again
    fresh = run("fresh")
    assert not kept[-1].enabled and len(decoded) > 0
    assert len(with_tiles) == 2 * (8 + 16) and with_tiles == fresh  # 2 sheets a channel
    assert (tmp_path / "kept" / "atlas.json").read_bytes() == (
        tmp_path / "fresh" / "atlas.json"
    ).read_bytes()


def test_a_crop_whose_image_became_unreadable_is_a_grey_cell(
    tiny_model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crops cut at the end (none kept) from an image that cannot be read any more: the
    run completes, the sheet keeps that crop's cell grey and the others' crops."""
    import featuremaps.atlas.crops as crops_mod
    import featuremaps.atlas.outputs as outputs_mod
    from featuremaps.atlas import read_crop
    from featuremaps.errors import ImageError

    data = tmp_path / "data"
    paths = _toy_images(data, 5)
    gone = paths[2]
    real_read = outputs_mod.read_image

    def read(path: str, *args: object) -> object:
        if path == gone:
            raise ImageError(f"{path} was deleted")
        return real_read(path, *args)

    monkeypatch.setattr(outputs_mod, "read_image", read)  # workers=0: in-process
    monkeypatch.setattr(crops_mod, "TILE_BUDGET", 0)  # nothing kept: every crop decoded
    out = tmp_path / "out"
    build_atlas(tiny_model, data, "features.4", out, top=5, batch_size=2, workers=0)
    doc = json.loads((out / "atlas.json").read_text())
    entries = doc["layers"]["features.4"]["channels"][0]["top"]
    assert sorted(e["image"] for e in entries) == paths  # every image is in a top 5
    for e in entries:
        crop = np.asarray(read_crop(out, e).convert("RGB"), dtype=np.int16)
        grey = np.abs(crop - 200).max() <= 3  # JPEG's error on a flat cell
        assert grey == (e["image"] == gone), e["image"]
