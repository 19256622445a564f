"""``compare --engine ray``: the same groups, folded in the same order, as the local engine.

One local Ray instance (2 CPUs) serves the whole module; the models are tiny and the
images a few dozen pixels wide, so each run costs about the start of two actors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from featuremaps.compare import build_compare, compare_models
from featuremaps.compare.batches import Counted, Grouper, merge_counted
from featuremaps.compare.ray import _rows
from featuremaps.errors import FeatureMapsError, Interrupted
from featuremaps.models import LoadedModel, Preprocess

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act1(self.conv1(x)))


class Broken(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:  # the layer probe (one blank image) passes, real batches fail
            raise RuntimeError("the forward failed on a real batch")
        return super().forward(x)


LAYERS = ["conv1", "act1", "conv2"]


def _model(seed: int, net: type[Net] = Net, mean: float = 0.5) -> LoadedModel:
    torch.manual_seed(seed)
    pp = Preprocess(resize=20, crop=20, mean=(mean,) * 3, std=(0.25,) * 3)
    return LoadedModel(net().eval(), pp, spec=f"net{seed}", weights="random")


def _images(folder: Path, n: int, broken: tuple[str, ...] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for i in range(n):
        arr = rng.integers(0, 256, (24, 28, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:02d}.png")
    for name in broken:
        (folder / name).write_bytes(b"not an image")
    return folder


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors lack this file
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error")
    try:
        yield ray
    finally:
        ray.shutdown()


def _same(ray_out: Path, local_out: Path) -> None:
    assert (ray_out / "cka.json").read_bytes() == (local_out / "cka.json").read_bytes()


def test_ray_equals_local_bit_for_bit(ray_instance: Any, tmp_path: Path) -> None:
    """Bad files move group boundaries (a second pass), B decodes with its own
    normalization, and the 17th image joins the last batch."""
    # sorted: a_bad.png, img00..img15, z_bad.png -> [a,0,1,2] [3..6] [7..10] [11..14] [15,z]
    data = _images(tmp_path / "d", 16, broken=("a_bad.png", "z_bad.png"))
    a, b = _model(0), _model(1, mean=0.4)
    kw: dict[str, Any] = {"layers": LAYERS, "batch_size": 4, "workers": 2}
    with pytest.warns(UserWarning, match="a_bad.png"):
        local = build_compare(a, b, data, tmp_path / "local", device="cpu", **kw)
    with pytest.warns(UserWarning, match="z_bad.png"):
        remote = build_compare(a, b, data, tmp_path / "ray", engine="ray", **kw)
    r, lo = remote.result, local.result
    assert r.batches == lo.batches == 3 and r.images_used == lo.images_used == 16
    assert r.skipped == lo.skipped and len(r.skipped) == 2 and r.left_out == lo.left_out == 0
    assert np.array_equal(r.matrix, lo.matrix)  # bit for bit, not approximately
    _same(tmp_path / "ray", tmp_path / "local")
    assert len(r.examples) == 4
    np.testing.assert_array_equal(np.stack(r.examples), np.stack(lo.examples))
    for name in LAYERS:
        assert torch.equal(r.example_maps_a[name], lo.example_maps_a[name])
        assert torch.equal(r.example_maps_b[name], lo.example_maps_b[name])
    again = build_compare(a, b, data, tmp_path / "ray", engine="ray", **kw)  # lock released
    assert again.result.resumed == 18 and np.array_equal(again.result.matrix, r.matrix)


def test_ray_equals_local_with_a_short_tail_and_one_model(
    ray_instance: Any, tmp_path: Path
) -> None:
    """A model against itself (one copy in the object store), channel means, and a tail
    of one image that the first pass already groups with the batch before it."""
    data = _images(tmp_path / "d", 9)
    a = _model(3)
    kw: dict[str, Any] = {"layers": LAYERS, "batch_size": 4, "pool": "mean", "workers": 2}
    lo = compare_models(a, a, data, device="cpu", **kw)
    r = compare_models(a, a, data, engine="ray", **kw)
    assert r.batches == lo.batches == 2 and r.images_used == 9
    assert np.array_equal(r.matrix, lo.matrix)
    np.testing.assert_allclose(np.diag(r.matrix), 1.0, atol=1e-12)


def test_an_interrupted_ray_run_resumes_to_the_local_result(
    ray_instance: Any, tmp_path: Path
) -> None:
    data = _images(tmp_path / "d", 16)
    a, b = _model(0), _model(1)
    kw: dict[str, Any] = {"layers": LAYERS, "batch_size": 4, "workers": 2}
    ref = compare_models(a, b, data, device="cpu", **kw)
    state = tmp_path / "compare_state.npz"

    def stop(phase: str, done: int, total: int) -> None:
        if done >= 8:  # batch 0 folded, batch 1 arrived
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="4 of 16 images"):
        compare_models(
            a, b, data, engine="ray", state_path=state, checkpoint_seconds=3600,
            progress=stop, **kw,
        )  # fmt: skip
    again = compare_models(a, b, data, engine="ray", state_path=state, **kw)
    assert again.resumed == 4 and again.batches == ref.batches == 4
    assert np.array_equal(again.matrix, ref.matrix)
    for name in LAYERS:
        assert torch.equal(again.example_maps_a[name], ref.example_maps_a[name])


def test_ray_errors_are_clear(ray_instance: Any, tmp_path: Path) -> None:
    data = _images(tmp_path / "d", 4)
    with pytest.raises(FeatureMapsError, match=r"--gpus-per-worker 1: the Ray cluster has 0 GPUs"):
        compare_models(_model(0), _model(1), data, layers=LAYERS, engine="ray", gpus_per_worker=1)
    with pytest.raises(FeatureMapsError) as info:
        compare_models(_model(0, Broken), _model(1), data, layers=LAYERS, engine="ray")
    message = str(info.value)
    assert message.startswith("the Ray engine failed: RuntimeError: the forward failed")
    assert "\n" not in message


def test_grouping_rule_and_first_pass_rows() -> None:
    """The first pass's rows are the local groups when every file is readable."""
    paths = [f"{i}.png" for i in range(13)]  # batches of 4: 4, 4, 4, 1
    assert _rows(paths, 4, [0, 1, 2, 3], want=4) == [((0,), 4), ((1,), 0), ((2, 3), 0)]
    assert _rows(paths, 4, [1, 3], want=0) == [((1, 3), 0)]
    # readable counts 3, 4, 4, 1: the first joins the second, the last the third
    g: Grouper[Counted] = Grouper(lambda c: len(c.ids), merge_counted)
    counts = [Counted((i,), np.arange(n), []) for i, n in enumerate([3, 4, 4, 1])]
    closed = [c.indices for b in counts if (c := g.push(b)) is not None]
    last = g.finish()
    assert closed == [(0, 1)] and last is not None and last.indices == (2, 3)


def test_cli_engine_ray_joins_a_cluster(ray_instance: Any, tmp_path: Path) -> None:
    """``--engine ray --ray-address``: a second process joins this module's instance."""
    data = _images(tmp_path / "d", 8)
    address = ray_instance.get_runtime_context().gcs_address
    out = tmp_path / "out"
    args = ["compare", "resnet18", "resnet18", str(data), "--weights-a", "none",
            "--weights-b", "none", "--layers", "layer1,layer3", "--batch-size", "4",
            "--pool", "mean", "--engine", "ray", "--ray-address", address,
            "--workers", "2", "--out", str(out)]  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-m", "featuremaps", *args], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "cka.json").read_text())
    assert doc["images_used"] == 8 and doc["batches"] == 2
    local = compare_models(
        "resnet18", "resnet18", data, weights_a="none", weights_b="none",
        layers="layer1,layer3", batch_size=4, pool="mean", workers=0, device="cpu",
    )  # fmt: skip
    np.testing.assert_array_equal(np.array(doc["matrix"], dtype=float), local.matrix)


def test_bad_files_cost_one_short_second_pass() -> None:
    """Readable counts 3, 4, 4, 4, 1: the first pass's rows (0) (1) (2) (3, 4); the local
    groups (0, 1) (2) (3, 4). Only (0, 1), which also gives the examples, runs again."""
    from featuremaps.compare.cka import HSICParts
    from featuremaps.compare.ray import RowResult, _fold_order
    from featuremaps.compare.step import GroupResult

    paths = [f"{i}.png" for i in range(18)]
    readable = {0: [1, 2, 3], **{i: list(range(4 * i, 4 * i + 4)) for i in (1, 2, 3)}, 4: [16]}
    calls: list[list[tuple[tuple[int, ...], int]]] = []

    def run_pass(rows: Any) -> Iterator[RowResult]:
        calls.append(list(rows))
        for k, (indices, want) in enumerate(rows):
            batches = [
                Counted((i,), np.array(readable[i]), [(0, "bad")] if i == 0 else [])
                for i in indices
            ]
            ids = np.concatenate([b.ids for b in batches])
            zero = np.zeros(1)
            parts = HSICParts(np.zeros((1, 1)), zero, zero, len(ids))
            kept = [np.zeros((1, 1, 3), np.uint8)] * min(want, len(ids))
            group = GroupResult(indices, ids, [], np.zeros(0, np.int64), parts, want, kept)
            yield RowResult(k, batches, group if len(ids) >= 4 else None)

    kept: list[np.ndarray] = []
    out = []
    for r in _fold_order(run_pass, paths, 4, range(5), lambda: 4 - len(kept), lambda b: None):
        out.append((r.indices, r.want))
        kept.extend(r.kept[: 4 - len(kept)])  # as the driver's fold keeps examples
    assert calls == [[((0,), 4), ((1,), 0), ((2,), 0), ((3, 4), 0)], [((0, 1), 4)]]
    assert out == [((0, 1), 4), ((2,), 0), ((3, 4), 0)]
