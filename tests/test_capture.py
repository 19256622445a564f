"""Capture: values as returned, hooks removed, modes restored, early stop, clear errors."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torchvision
from torch import nn

from conftest import FailingNet, ToyNet, hooks_left
from featuremaps import Capture, LayerError, capture, list_layers
from featuremaps.capture.select import resolve_layers


def test_values_equal_module_output_despite_inplace_relu(
    toy: ToyNet, x_small: torch.Tensor
) -> None:
    fm = capture(toy, x_small, ["features.0", "features.3"])
    conv0 = toy.features[0](x_small)
    assert (conv0 < 0).any(), "the check needs negative conv outputs"
    # The in-place ReLU right after features.0 must not have changed the capture.
    assert torch.equal(fm["features.0"], conv0)
    manual = toy.features[3](toy.features[2](torch.relu(conv0)))
    torch.testing.assert_close(fm["features.3"], manual, rtol=0, atol=1e-6)
    assert (fm["features.3"] < 0).any()


def test_vgg_inplace_relu_layer_is_preconv_value() -> None:
    torch.manual_seed(0)
    vgg = torchvision.models.vgg11().eval()
    x = torch.randn(1, 3, 64, 64)
    fm = capture(vgg, x, "features.0,features.1")
    ref = vgg.features[0](x)
    assert torch.equal(fm["features.0"], ref)
    assert torch.equal(fm["features.1"], torch.relu(ref))


def _count_forwards(model: nn.Module) -> list[int]:
    calls = [0]

    def pre(module: nn.Module, args: object) -> None:
        calls[0] += 1

    model.register_forward_pre_hook(pre)
    return calls


def test_copy_false_keeps_outputs_without_copies_where_nothing_changes_them() -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    kept: dict[str, torch.Tensor] = {}
    for name in ("layer1", "layer3"):  # what the modules returned, held by our own hooks
        net.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: kept.__setitem__(name, o)
        )
    calls = _count_forwards(net)
    fm = capture(net, x, "layer1,layer3", copy=False)
    assert calls[0] == 1  # one forward: nothing changed the outputs in place
    for name in ("layer1", "layer3"):
        assert fm[name].data_ptr() == kept[name].data_ptr()  # the output itself, no copy
    want = capture(net, x, "layer1,layer3")
    for name in ("layer1", "layer3"):
        assert torch.equal(fm[name], want[name])
        assert fm[name].data_ptr() != want[name].data_ptr()  # copy=True copies


def test_copy_false_sees_an_inplace_change_and_copies_from_then_on() -> None:
    torch.manual_seed(0)
    vgg = torchvision.models.vgg11().eval()
    x = torch.randn(1, 3, 64, 64)
    ref = vgg.features[0](x)
    assert (ref < 0).any(), "the check needs negative conv outputs"
    calls = _count_forwards(vgg)
    fm = capture(vgg, x, "features.0,features.3", copy=False)
    # ReLU(inplace=True) changed features.0's output after the hook: the version counter
    # told, and the forward ran again with copies.
    assert calls[0] == 2
    assert torch.equal(fm["features.0"], ref)
    again = capture(vgg, x, "features.0,features.3", copy=False)
    assert calls[0] == 3  # remembered: features.0 is copied at once, one forward
    assert torch.equal(again["features.0"], ref)
    assert torch.equal(again["features.3"], capture(vgg, x, "features.3")["features.3"])


def test_no_hooks_left_after_success_early_stop_and_failure(
    toy: ToyNet, x_small: torch.Tensor
) -> None:
    capture(toy, x_small, "features.3", full_forward=True)
    assert hooks_left(toy) == 0
    capture(toy, x_small, "features.0")  # early stop path
    assert hooks_left(toy) == 0
    failing = FailingNet()
    with pytest.raises(RuntimeError, match="boom"):
        capture(failing, torch.randn(1, 3, 8, 8), "conv", full_forward=True)
    assert hooks_left(failing) == 0
    with pytest.raises(LayerError):
        capture(toy, x_small, "nope")
    assert hooks_left(toy) == 0


def test_context_manager_removes_hooks_and_reraises(toy: ToyNet, x_small: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="inside"), Capture(toy, "features.0") as cap:
        toy(x_small)
        assert hooks_left(toy) > 0
        raise ValueError("inside")
    assert hooks_left(toy) == 0
    assert torch.equal(cap.maps["features.0"], toy.features[0](x_small))


def test_modes_and_requires_grad_restored(toy: ToyNet, x_small: torch.Tensor) -> None:
    toy.train()
    toy.features[0].eval()
    toy.fc.weight.requires_grad_(False)
    before = {n: m.training for n, m in toy.named_modules()}
    grads = {n: p.requires_grad for n, p in toy.named_parameters()}
    fm = capture(toy, x_small, "features.3", full_forward=True)
    assert {n: m.training for n, m in toy.named_modules()} == before
    assert {n: p.requires_grad for n, p in toy.named_parameters()} == grads
    assert not fm["features.3"].requires_grad
    assert fm["features.3"].grad_fn is None


def test_capture_runs_in_eval_mode() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.9)).train()
    net[1].running_mean.fill_(0.5)
    x = torch.randn(1, 3, 10, 10)
    fm = capture(net, x, "2", full_forward=True)
    ref = copy.deepcopy(net).eval()(x)
    assert torch.equal(fm["2"], ref)
    assert net.training  # restored


class _Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def test_forward_stops_after_last_requested_layer() -> None:
    tail = _Counting()
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), tail)
    fm = capture(net, torch.randn(1, 3, 8, 8), "0")
    assert tail.calls == 0
    assert fm.stopped_early and fm.output is None
    fm = capture(net, torch.randn(1, 3, 8, 8), "0", full_forward=True)
    assert tail.calls == 1
    assert not fm.stopped_early
    assert fm.output.shape == (1, 4, 6, 6)


def test_full_forward_output_matches_model(toy: ToyNet, x_small: torch.Tensor) -> None:
    fm = capture(toy, x_small, "features.0", full_forward=True)
    assert torch.equal(fm.output, toy(x_small))


def test_unknown_layer_suggests_close_names(toy: ToyNet, x_small: torch.Tensor) -> None:
    with pytest.raises(LayerError) as info:
        capture(toy, x_small, "featurs.0")
    msg = str(info.value)
    assert "featurs.0" in msg and "features.0" in msg and "featuremaps layers" in msg


def test_globs_and_presets() -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    fm = capture(net, x, "stages")
    assert list(fm) == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert [tuple(t.shape[-2:]) for t in fm.values()] == [
        (32, 32),
        (16, 16),
        (8, 8),
        (4, 4),
        (2, 2),
    ]
    assert fm.info["layer2"].stride == (8.0, 8.0)
    fm = capture(net, x, "layer*")
    assert list(fm) == ["layer1", "layer2", "layer3", "layer4"]
    fm = capture(net, x, "convs")
    assert len(fm) == sum(isinstance(m, nn.Conv2d) for m in net.modules())
    assert all(fm.info[n].module_type == "Conv2d" for n in fm)
    with pytest.raises(LayerError, match="matches no layer"):
        capture(net, x, "block*")


def test_bare_indices_after_a_numbered_child_name_its_siblings() -> None:
    torch.manual_seed(0)
    vgg = torchvision.models.vgg11().eval()
    x = torch.randn(1, 3, 32, 32)
    fm = capture(vgg, x, "features.0,3,6,8")
    assert list(fm) == ["features.0", "features.3", "features.6", "features.8"]
    full = capture(vgg, x, "features.0,features.3,features.6,features.8")
    assert all(torch.equal(fm[n], full[n]) for n in full)
    names = resolve_layers(vgg, "features.0,classifier.0,3")  # the latest name counts
    assert names == ["features.0", "classifier.0", "classifier.3"]
    with pytest.raises(LayerError, match="unknown layer '99'"):
        capture(vgg, x, "features.0,99")
    with pytest.raises(LayerError, match="unknown layer '3'"):
        capture(vgg, x, "features,3")  # only after a numbered child
    # a top-level nn.Sequential: a bare index that is a module stays that module
    seq = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Sequential(nn.ReLU(), nn.ReLU()))
    assert list(capture(seq, x, "2.0,1")) == ["2.0", "1"]
    assert list(capture(seq, x, "1,2.1")) == ["1", "2.1"]


def test_vgg_stages_end_with_features_not_head_pooling() -> None:
    vgg = torchvision.models.vgg11().eval()
    fm = capture(vgg, torch.randn(1, 3, 64, 64), "stages")
    assert list(fm)[-1] == "features"
    assert "avgpool" not in fm


def test_layer_that_never_ran(x_small: torch.Tensor) -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Conv2d(3, 2, 1)
            self.unused = nn.Conv2d(3, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    net = Unused()
    with pytest.raises(LayerError, match="never ran"):
        capture(net, x_small, "unused", full_forward=True)
    assert hooks_left(net) == 0


def test_non_spatial_output_is_a_clear_error(toy: ToyNet, x_small: torch.Tensor) -> None:
    with pytest.raises(LayerError, match="no spatial map"):
        capture(toy, x_small, "fc", full_forward=True)


def test_module_called_twice_gives_every_call() -> None:
    """Issue 9: a module that runs twice was captured once, silently; now every call."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.conv(x))

    net = Twice()
    x = torch.randn(1, 3, 5, 5)
    fm = capture(net, x, "conv", full_forward=True)
    assert list(fm) == ["conv:1", "conv:2"]
    assert torch.equal(fm["conv:1"], net.conv(x))
    assert torch.equal(fm["conv:2"], net.conv(net.conv(x)))


def test_bad_input_shape(toy: ToyNet) -> None:
    with pytest.raises(LayerError, match=r"\(B, C, H, W\)"):
        capture(toy, torch.randn(3, 32, 32), "features.0")


def test_list_layers_reports_shapes_in_execution_order(toy: ToyNet) -> None:
    infos = list_layers(toy, torch.randn(1, 3, 32, 32))
    names = [i.name for i in infos]
    assert names.index("features.0") < names.index("features.3") < names.index("fc")
    by_name = {i.name: i for i in infos}
    assert by_name["features.3"].shape == (1, 16, 16, 16)
    assert by_name["fc"].shape is None and by_name["fc"].raw_shape == (1, 10)
    assert hooks_left(toy) == 0


def test_torchscript_model_is_a_clear_error(toy: ToyNet, x_small: torch.Tensor) -> None:
    scripted = torch.jit.script(toy)
    with pytest.raises(LayerError, match="TorchScript"):
        capture(scripted, x_small, "features.0")


def test_torchscript_layers_listing_is_a_clear_error(toy: ToyNet, x_small: torch.Tensor) -> None:
    scripted = torch.jit.script(toy)
    with pytest.raises(LayerError, match="TorchScript"):
        list_layers(scripted, x_small)


def test_repeated_captures_hook_only_the_requested_layers(x_small: torch.Tensor) -> None:
    """The layout decisions of the first forward are kept; later ones skip the tracker."""
    torch.manual_seed(0)
    net = ToyNet().eval()
    names = ["features.0", "features.3"]
    counts = []
    for _ in range(2):
        with Capture(net, names, example_input=x_small) as cap:
            counts.append(hooks_left(net))
            net(x_small)
        assert hooks_left(net) == 0
        assert torch.equal(cap.maps["features.0"], net.features[0](x_small))
    assert counts[0] > 20  # the layout tracker on every module
    assert counts[1] == 1 + len(names)  # the model's pre-hook and the two layers
    first = capture(net, x_small, names, full_forward=True)
    with Capture(net, names, example_input=torch.randn(1, 3, 32, 32)) as cap:
        assert hooks_left(net) > 20  # another batch size: nothing kept for it yet
        net(x_small)
    assert cap.maps.info == first.info


def test_kept_layouts_do_not_keep_the_model_alive(x_small: torch.Tensor) -> None:
    net = ToyNet().eval()
    capture(net, x_small, "features.3")
    list_layers(net, x_small)
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None


def test_modes_restored_when_the_forward_runs_in_train_mode(x_small: torch.Tensor) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    capture(net, x_small, "1")
    net[1].train()
    with Capture(net, "1", example_input=x_small, eval_mode=False) as cap:
        net(x_small)
    assert net[1].training and not net[0].training and not net.training
    assert torch.equal(cap.maps["1"], net(x_small))  # batch statistics: train mode ran
