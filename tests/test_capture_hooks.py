"""The one hook lifecycle, the per-model cache and the Layout record."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import FailingNet, ToyNet, hooks_left
from featuremaps.capture import (
    Capture,
    LayerInfo,
    LayerKey,
    Layout,
    LayoutKind,
    capture,
    clear_cache,
    hooked,
    list_layers,
)


def test_hooked_removes_every_hook_restores_modes_and_reraises(toy: ToyNet) -> None:
    toy.train()
    toy.fc.eval()
    seen: list[int] = []
    with pytest.raises(ValueError, match="inside"), hooked(toy) as hooks:
        hooks.before(toy, lambda m, a: None)
        for m in toy.modules():
            hooks.after(m, lambda m, i, o: seen.append(1))
        assert len(hooks) == 1 + len(list(toy.modules())) and hooks_left(toy) == len(hooks)
        assert not any(m.training for m in toy.modules())  # eval inside
        toy(torch.randn(1, 3, 8, 8))
        raise ValueError("inside")
    assert seen and hooks_left(toy) == 0
    assert toy.training and not toy.fc.training and toy.features.training


def test_hooked_keeps_the_mode_when_asked_and_refuses_torchscript(toy: ToyNet) -> None:
    toy.train()
    with hooked(toy, eval_mode=False):
        assert toy.training
    with pytest.raises(Exception, match="TorchScript"), hooked(torch.jit.script(toy.eval())):
        pass


def test_listing_and_late_tracking_leave_no_hook_after_failures() -> None:
    failing = FailingNet().train()
    with pytest.raises(RuntimeError, match="boom"):
        list_layers(failing, torch.randn(1, 3, 8, 8))
    assert hooks_left(failing) == 0 and failing.training
    net = ToyNet().eval()
    x = torch.randn(1, 3, 16, 16)
    capture(net, x, "features.3")  # keeps the layouts for 16x16 inputs
    with (
        pytest.raises(RuntimeError, match="after"),
        Capture(net, "features.3", example_input=x) as cap,
    ):
        assert hooks_left(net) == 2  # the root's pre-hook and the layer
        net(torch.randn(1, 3, 24, 24))  # another input: the tracker joins, late
        assert hooks_left(net) > 20
        raise RuntimeError("after")
    assert hooks_left(net) == 0
    assert cap.maps["features.3"].shape == (1, 16, 12, 12)  # after a 2x2 max-pool


def test_clear_cache_makes_the_next_capture_track_again(x_small: torch.Tensor) -> None:
    net = ToyNet().eval()
    counts = []
    for clear in (False, False, True):
        if clear:
            clear_cache(net)
        with Capture(net, "features.0", example_input=x_small):
            counts.append(hooks_left(net))
            net(x_small)
    assert counts[0] > 20 and counts[1] == 2 and counts[2] == counts[0]
    clear_cache()  # every model


def test_layout_record_and_the_manifest_fields() -> None:
    tokens = Layout(LayoutKind.TOKENS, "prefix from cls_token", prefix=1, grid=(14, 14))
    assert tokens.label == "tokens(prefix=1, grid=14x14)->NCHW" and tokens.spatial
    assert Layout(LayoutKind.NHWC, "Permute").label == "NHWC->NCHW"
    assert not Layout(LayoutKind.NOT_SPATIAL).spatial
    info = LayerInfo(
        LayerKey("body", 2, ("pool",)),
        "Pyramid",
        (1, 8, 8, 4),
        (1, 4, 8, 8),
        (4.0, 4.0),
        form=Layout(LayoutKind.NHWC, "a Linear output"),
        container="dict",
        calls=3,
    )
    assert info.name == "body:2[pool]"
    assert info.to_dict() == {
        "name": "body:2[pool]",
        "type": "Pyramid",
        "raw_shape": [1, 8, 8, 4],
        "shape": [1, 4, 8, 8],
        "stride": [4.0, 4.0],
        "layout": "NHWC->NCHW",
        "note": "call 2 of 3; entry [pool] of a dict output; a Linear output",
        "module": "body",
        "call": 2,
        "calls": 3,
    }
    once = LayerInfo(LayerKey("conv"), "Conv2d", (1, 2, 3, 3), (1, 2, 3, 3), (1.0, 1.0))
    assert set(once.to_dict()) == {"name", "type", "raw_shape", "shape", "stride", "layout", "note"}


def test_a_module_output_that_is_not_a_tensor_is_listed_not_spatial() -> None:
    class Nothing(nn.Module):
        def forward(self, x: torch.Tensor) -> None:
            return None

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)
            self.side = Nothing()
            self.unused = nn.Conv2d(2, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.side(x)
            return self.conv(x)

    by_name = {i.name: i for i in list_layers(Net(), torch.randn(1, 3, 4, 4))}
    assert by_name["side"].form.kind is LayoutKind.NOT_SPATIAL
    assert by_name["side"].note == "output is NoneType"
    assert by_name["unused"].note == "did not run" and by_name["unused"].raw_shape is None
