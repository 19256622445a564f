"""Issue 9: every call of a module, modules under several names, and the layer listing
printing names exactly as ``--layers`` takes them (entries, calls, markup characters)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from conftest import hooks_left
from featuremaps import LayerError, capture, list_layers
from featuremaps.capture import Capture, clear_cache
from featuremaps.capture.select import parse_request, runs_once

# -- toy models (also factories for `featuremaps layers test_capture_select:NAME`) ----------


class Twice(nn.Module):
    """One conv called twice, then a tail."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.tail = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.conv(torch.relu(self.conv(x))))


class Shared(nn.Module):
    """``block`` is also registered as ``again`` (one module, two names); it runs twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Conv2d(4, 4, 3, padding=1)
        self.again = self.block
        self.body = nn.Sequential(nn.Conv2d(4, 4, 1))
        self.alias = self.body[0]  # runs once, under either name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.again(torch.relu(self.block(self.stem(x)))))


class Pyramid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.conv(x)
        return {"fine": y, "pool": nn.functional.max_pool2d(y, 2)}


class DictNet(nn.Module):
    """A dict-output ``body`` (run twice) and a layer whose name looks like rich markup."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Pyramid()
        self.add_module("[/x]", nn.Conv2d(4, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.body(x)
        second = self.body(x.flip(-1))
        return getattr(self, "[/x]")(first["pool"] + second["pool"])


def twice_factory() -> nn.Module:
    torch.manual_seed(0)
    return Twice().eval()


def dict_factory() -> nn.Module:
    torch.manual_seed(0)
    return DictNet().eval()


def shared_factory() -> nn.Module:
    torch.manual_seed(0)
    return Shared().eval()


@pytest.fixture
def x8() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(2, 3, 8, 8)


# -- every call --------------------------------------------------------------------------------


def test_a_conv_called_twice_gives_both_calls_and_says_so(x8: torch.Tensor) -> None:
    net = twice_factory()
    fm = capture(net, x8, "conv", full_forward=True)
    first = net.conv(x8)
    second = net.conv(torch.relu(first))
    assert list(fm) == ["conv:1", "conv:2"]
    assert torch.equal(fm["conv:1"], first) and torch.equal(fm["conv:2"], second)
    info = fm.info["conv:2"]
    assert info.calls == 2 and info.key.call == 2 and info.key.module == "conv"
    assert "call 2 of 2" in info.note
    assert info.to_dict()["calls"] == 2 and info.to_dict()["name"] == "conv:2"
    one = capture(net, x8, "conv:2")
    assert list(one) == ["conv:2"] and torch.equal(one["conv:2"], second)
    assert hooks_left(net) == 0


def test_a_call_beyond_the_last_is_a_clear_error(x8: torch.Tensor) -> None:
    net = twice_factory()
    with pytest.raises(LayerError, match=r"conv:3: layer 'conv' ran 2 time\(s\).*conv:1, conv:2"):
        capture(net, x8, "conv:3", full_forward=True)
    with pytest.raises(LayerError, match="count from 1"):
        capture(net, x8, "conv:0")
    assert hooks_left(net) == 0


def test_early_stop_waits_for_the_last_call_once_it_is_known(x8: torch.Tensor) -> None:
    net = twice_factory()
    clear_cache(net)
    ran: list[int] = []
    net.tail.register_forward_hook(lambda m, i, o: ran.append(1))
    fm = capture(net, x8, "conv")  # calls not known yet: the forward runs to its end
    assert not fm.stopped_early and len(ran) == 1
    again = capture(net, x8, "conv")  # 2 calls, known now: stops after the second
    assert again.stopped_early and len(ran) == 1
    assert list(again) == ["conv:1", "conv:2"] and again.info["conv:2"].calls == 2
    for name in fm:
        assert torch.equal(fm[name], again[name])
    clear_cache(net)
    first = capture(net, x8, "conv:1")  # only the first call is needed: stops at once
    assert first.stopped_early and len(ran) == 1
    assert torch.equal(first["conv:1"], net.conv(x8))


def test_sequential_layers_stop_early_from_the_first_capture() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 1)))
    assert runs_once(net, "1.0") and not runs_once(twice_factory(), "conv")
    clear_cache(net)
    assert capture(net, torch.randn(1, 3, 8, 8), "1.0").stopped_early


def test_resnet18_basic_block_relu_runs_twice() -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    fm = capture(net, x, "layer1.0.relu", full_forward=True)
    assert list(fm) == ["layer1.0.relu:1", "layer1.0.relu:2"]
    with torch.no_grad():
        stem = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        b = net.layer1[0]
        r1 = torch.relu(b.bn1(b.conv1(stem)))
        r2 = torch.relu(b.bn2(b.conv2(r1)) + stem)
    torch.testing.assert_close(fm["layer1.0.relu:1"], r1, rtol=0, atol=1e-6)
    torch.testing.assert_close(fm["layer1.0.relu:2"], r2, rtol=0, atol=1e-6)
    assert hooks_left(net) == 0


def test_resnet50_bottleneck_relu_runs_three_times_and_is_listed() -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 32, 32)
    fm = capture(net, x, "layer1.0.relu", full_forward=True)
    assert list(fm) == [f"layer1.0.relu:{j}" for j in (1, 2, 3)]
    with torch.no_grad():
        stem = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        b = net.layer1[0]
        r1 = torch.relu(b.bn1(b.conv1(stem)))
        r2 = torch.relu(b.bn2(b.conv2(r1)))
        r3 = torch.relu(b.bn3(b.conv3(r2)) + b.downsample(stem))
    for j, ref in enumerate((r1, r2, r3), 1):
        torch.testing.assert_close(fm[f"layer1.0.relu:{j}"], ref, rtol=0, atol=1e-5)
        assert fm.info[f"layer1.0.relu:{j}"].calls == 3
    listed = {i.name: i for i in list_layers(net, x)}
    assert listed["layer1.0.relu:2"].shape == (1, 64, 8, 8)
    assert listed["layer1.0.relu:3"].shape == (1, 256, 8, 8)
    assert "layer1.0.relu" not in listed and "layer1.0.conv1" in listed


# -- several names ---------------------------------------------------------------------------


def test_a_shared_module_is_accepted_under_each_name(x8: torch.Tensor) -> None:
    net = shared_factory()
    with torch.no_grad():
        stem = net.stem(x8)
        first = net.block(stem)
        second = net.block(torch.relu(first))
    for name in ("block", "again"):
        fm = capture(net, x8, name, full_forward=True)
        assert list(fm) == [f"{name}:1", f"{name}:2"]
        assert fm.info[f"{name}:1"].key.module == name
        assert torch.equal(fm[f"{name}:1"], first) and torch.equal(fm[f"{name}:2"], second)
    fm = capture(net, x8, "alias,body.0")
    assert list(fm) == ["alias", "body.0"] and torch.equal(fm["alias"], fm["body.0"])
    assert fm.info["alias"].to_dict()["name"] == "alias"
    both = capture(net, x8, "again:2,block:1")
    assert list(both) == ["again:2", "block:1"]
    assert hooks_left(net) == 0


# -- entries, markup, and the listing ----------------------------------------------------------


def test_dict_entries_of_every_call_and_a_markup_like_name(x8: torch.Tensor) -> None:
    net = dict_factory()
    fm = capture(net, x8, "body[pool],[/x]", full_forward=True)
    assert list(fm) == ["body:1[pool]", "body:2[pool]", "[/x]"]
    with torch.no_grad():
        ref = net.body(x8.flip(-1))["pool"]
    assert torch.equal(fm["body:2[pool]"], ref)
    assert list(capture(net, x8, "body:2[fine]")) == ["body:2[fine]"]
    with pytest.raises(LayerError, match=r"no output entry body\[nope\]"):
        capture(net, x8, "body[nope]", full_forward=True)


def test_parse_request_reads_calls_and_entries() -> None:
    names = {"body": None, "a:b": None, "x[1]": None}
    got = {t: parse_request(t, names) for t in ("body", "body:2", "body:3[p][0]", "a:b:4", "x[1]")}
    assert [(s.module, s.call, s.entry) for s in got.values() if s is not None] == [
        ("body", None, None),
        ("body", 2, None),
        ("body", 3, ("p", "0")),
        ("a:b", 4, None),
        ("x[1]", None, None),
    ]
    assert parse_request("nobody:2", names) is None


def _layers_output(spec: str, capsys: pytest.CaptureFixture[str]) -> str:
    from featuremaps.cli import main

    try:
        main(["layers", spec, "--weights", "none"])
    except SystemExit as exc:
        assert exc.code in (0, None), f"featuremaps layers {spec} exited with {exc.code}"
    return capsys.readouterr().out


def test_layers_lists_names_exactly_as_layers_accepts_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = _layers_output("test_capture_select:dict_factory", capsys)
    names = [row.split("│")[1].strip() for row in text.splitlines() if row.startswith("│")]
    assert names[:4] == ["body:1[fine]", "body:1[pool]", "body:2[fine]", "body:2[pool]"]
    assert names[4:] == ["body.conv:1", "body.conv:2", "[/x]"]
    assert "1x4x112x112" in text  # body:1[pool], listed with its shape
    net = dict_factory()
    x = torch.zeros(1, 3, 224, 224)
    fm = capture(net, x, names, full_forward=True)  # every listed name is accepted
    assert list(fm) == names


def test_layers_lists_every_name_of_a_shared_module(capsys: pytest.CaptureFixture[str]) -> None:
    text = _layers_output("test_capture_select:shared_factory", capsys)
    for expected in ("block:1", "block:2", "again:1", "again:2", "alias", "body.0"):
        assert f"│ {expected} " in text, (expected, text)
    assert "same module as block" in text


def test_capture_block_removes_hooks_after_a_failing_forward(x8: torch.Tensor) -> None:
    net = twice_factory()
    with pytest.raises(RuntimeError, match="late"), Capture(net, "conv") as cap:
        net(x8)
        raise RuntimeError("late")
    assert hooks_left(net) == 0
    assert list(cap.maps) == ["conv:1", "conv:2"]
