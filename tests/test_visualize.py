"""Feature visualization by optimization: objectives, the model left as found, pictures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import FailingNet, ToyNet, hooks_left
from featuremaps import capture
from featuremaps.visualize import (
    NO_TRANSFORMS,
    Objective,
    ObjectiveError,
    ObjectiveKind,
    Transforms,
    parse_objectives,
    visualize,
)

FAST = {"steps": 6, "size": 32}
"""Tiny settings: what is checked does not need a good picture."""


def tiny_factory() -> nn.Module:
    """For `test_visualize:tiny_factory` model specs in the CLI tests."""
    torch.manual_seed(0)
    return ToyNet()


@pytest.fixture
def toy() -> ToyNet:
    torch.manual_seed(0)
    return ToyNet().eval()


def _normalize(vis_image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(vis_image).permute(2, 0, 1)[None]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


# -- objectives --------------------------------------------------------------------------


def test_parse_expands_ranges_and_keeps_labels() -> None:
    objs = parse_objectives(["channel:layer3:2-4", "neuron:a.b:0", "class:7", "class:espresso"])
    assert [o.text for o in objs] == [
        "channel:layer3:2",
        "channel:layer3:3",
        "channel:layer3:4",
        "neuron:a.b:0",
        "class:7",
        "class:espresso",
    ]
    assert objs[0] == Objective(ObjectiveKind.CHANNEL, "layer3", 2)
    assert objs[4].index == 7 and objs[5].label == "espresso" and objs[5].index is None
    assert parse_objectives("layer:features")[0].kind is ObjectiveKind.LAYER
    assert len(parse_objectives(["channel:x:1", "channel:x:0-1"])) == 2  # duplicates once
    assert parse_objectives("channel:body[out]:3")[0].layer == "body[out]"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("chanel:layer3:1", "Did you mean: channel"),
        ("channel:layer3", "give the layer and the channel"),
        ("channel:layer3:x", "'x' is not a number"),
        ("channel:layer3:-1", "'-1' is not a number >= 0"),
        ("channel:layer3:5-2", "is empty"),
        ("class:", "nothing after 'class'"),
        ("layer", "nothing after 'layer'"),
    ],
)
def test_malformed_objectives_say_what_and_how(spec: str, needle: str) -> None:
    with pytest.raises(ObjectiveError, match="channel:LAYER:C") as info:
        parse_objectives(spec)
    assert needle in str(info.value) and repr(spec) in str(info.value)


@pytest.mark.parametrize(
    ("model", "spec", "needle"),
    [
        ("toy", "channel:feature.3:0", "unknown layer 'feature.3'. Did you mean: features.3"),
        ("toy", "channel:features.3:16", "channel 16 is out of range; layer 'features.3' has 16"),
        ("toy", "neuron:features.0:8", "has 8 channels (0-7)"),
        ("toy", "channel:fc:0", "gives no spatial map"),
        ("toy", "class:10", "class 10 is out of range; the model has 10 classes"),
        ("toy", "class:tabby", "classes have no names"),
        ("convs", "class:0", "this model has no classes"),
    ],
)
def test_objectives_that_do_not_fit_the_model(
    toy: ToyNet, model: str, spec: str, needle: str
) -> None:
    net = toy if model == "toy" else nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ObjectiveError) as info:
        visualize(net, spec, **FAST)
    assert needle in str(info.value)
    assert hooks_left(net) == 0


def test_class_labels_resolve_case_insensitively_with_suggestions(toy: ToyNet) -> None:
    names = [f"class {i}" for i in range(9)] + ["Espresso"]
    vis = visualize(toy, "class:espresso", categories=names, **FAST)
    assert vis[0].objective.index == 9 and vis[0].objective.label == "espresso"
    with pytest.raises(ObjectiveError, match="Did you mean: espresso"):
        visualize(toy, "class:expresso", categories=names, **FAST)


def test_bad_settings_fail_before_any_compute(toy: ToyNet) -> None:
    from featuremaps.errors import FeatureMapsError

    for kwargs in ({"steps": 0}, {"size": 4}, {"lr": 0.0}):
        with pytest.raises(FeatureMapsError, match="need steps >= 1"):
            visualize(toy, "channel:features.0:0", **{**FAST, **kwargs})
    with pytest.raises(FeatureMapsError, match="scale"):
        visualize(toy, "channel:features.0:0", transforms=Transforms(scale=(1.2, 1.1)), **FAST)


# -- the optimization ----------------------------------------------------------------------


def test_same_seed_same_pictures_other_seed_other_pictures(toy: ToyNet) -> None:
    objs = ["channel:features.3:0-2", "class:4"]
    a = visualize(toy, objs, seed=3, **FAST)
    b = visualize(toy, objs, seed=3, **FAST)
    c = visualize(toy, objs, seed=4, **FAST)
    for va, vb, vc in zip(a, b, c, strict=True):
        assert np.array_equal(va.image, vb.image) and va.history == vb.history
        assert not np.allclose(va.image, vc.image)
    assert a[0].image.shape == (32, 32, 3) and a[0].image.dtype == np.float32
    assert a[0].image.min() >= 0.0 and a[0].image.max() <= 1.0
    assert len(a[0].history) == FAST["steps"]


def test_a_picture_does_not_depend_on_the_rest_of_the_batch(toy: ToyNet) -> None:
    alone = visualize(toy, "channel:features.3:5", **FAST)
    batch = visualize(toy, ["class:1", "channel:features.3:4-6"], **FAST)
    assert batch[2].objective.text == "channel:features.3:5"
    assert np.allclose(alone[0].image, batch[2].image, atol=1e-5)
    seen: list[tuple[int, int]] = []
    chunked = visualize(
        toy,
        ["class:1", "channel:features.3:4-6"],
        batch_size=3,
        progress=lambda phase, done, total: seen.append((done, total)),
        **FAST,
    )
    assert [v.objective for v in chunked] == [v.objective for v in batch]
    for a, b in zip(chunked, batch, strict=True):
        assert np.allclose(a.image, b.image, atol=1e-5)
    steps = FAST["steps"]
    assert seen == [(i, 2 * steps) for i in range(1, 2 * steps + 1)]


@pytest.mark.parametrize("spec", ["channel:features.3:2", "layer:features.3", "class:3"])
def test_the_objective_rises_and_the_value_is_the_pictures(toy: ToyNet, spec: str) -> None:
    vis = visualize(toy, spec, steps=40, size=32, transforms=NO_TRANSFORMS, seed=1)[0]
    assert vis.value > 1.5 * vis.history[0] + 1e-3, (vis.history[0], vis.value)
    # the value reported is the objective recomputed independently on the picture
    x = _normalize(vis.image)
    fm = capture(toy, x, ["features.3"], full_forward=True)
    m = fm["features.3"][0]
    expect = {
        "channel:features.3:2": float(m[2].mean()),
        "layer:features.3": float(m.square().mean()),
        "class:3": float(fm.output[0, 3]),
    }[spec]
    assert vis.value == pytest.approx(expect, rel=1e-4, abs=1e-6)


def test_neuron_is_the_centre_position(toy: ToyNet) -> None:
    vis = visualize(toy, "neuron:features.0:1", steps=20, size=33, transforms=NO_TRANSFORMS)[0]
    m = capture(toy, _normalize(vis.image), "features.0")["features.0"][0, 1]
    assert m.shape == (33, 33)
    assert vis.value == pytest.approx(float(m[16, 16]), rel=1e-4)
    assert vis.value > vis.history[0]


def test_model_left_as_found_after_success(toy: ToyNet) -> None:
    toy.train()
    toy.fc.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in toy.state_dict().items()}
    visualize(toy, ["channel:features.3:0", "class:2"], **FAST)
    assert hooks_left(toy) == 0
    assert all(m.training for m in toy.modules())
    assert toy.fc.weight.requires_grad is False
    assert all(p.requires_grad for n, p in toy.named_parameters() if n != "fc.weight")
    assert all(p.grad is None for p in toy.parameters())
    assert all(torch.equal(before[k], v) for k, v in toy.state_dict().items())


def test_model_left_as_found_after_a_failure(toy: ToyNet) -> None:
    toy.features[3].train()

    def stop(phase: str, done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        visualize(toy, "channel:features.3:1", progress=stop, **FAST)
    assert hooks_left(toy) == 0
    assert [m.training for m in toy.modules()] == [m is toy.features[3] for m in toy.modules()]
    assert all(p.requires_grad and p.grad is None for p in toy.parameters())

    broken = FailingNet()
    with pytest.raises(RuntimeError, match="boom"):
        visualize(broken, "channel:conv:0", **FAST)  # the probe runs the whole model
    assert hooks_left(broken) == 0 and broken.training  # as it was built


def test_the_forward_stops_after_the_objectives_layer(toy: ToyNet) -> None:
    ran: list[str] = []
    handle = toy.fc.register_forward_hook(lambda *a: ran.append("fc"))
    try:
        visualize(toy, "channel:features.3:0", **FAST)
        seen_before = len(ran)  # the probe (list_layers) runs the whole model once
        visualize(toy, "channel:features.3:0", steps=3, size=32)
        assert len(ran) - seen_before <= 1
    finally:
        handle.remove()


def test_transforms_keep_the_size_and_the_grey_border() -> None:
    from featuremaps.visualize.image import random_view as _transform

    g = [torch.Generator().manual_seed(0)]
    img = torch.zeros(1, 3, 40, 40)
    out = _transform(img, Transforms(pad=8, jitter=0, scale=(1, 1), rotate=0), g)
    assert out.shape == img.shape
    assert torch.allclose(out[0, :, 0, 0], torch.full((3,), 0.5), atol=1e-6)
    assert torch.allclose(out[0, :, 20, 20], torch.zeros(3), atol=1e-6)
    assert _transform(img, NO_TRANSFORMS, g) is img


# -- every backbone ------------------------------------------------------------------------


class _DictBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 6, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a = torch.relu(self.a(x))
        return {"fine": a, "coarse": torch.relu(self.b(a))}


class _DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _DictBody()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)["coarse"].mean((2, 3))


class _ChannelsLast(nn.Module):
    """A ConvNeXt-like stem: conv, to channels-last, LayerNorm over channels."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import Permute

        self.stem = nn.Conv2d(3, 12, 4, stride=4)
        self.perm = Permute([0, 2, 3, 1])
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.perm(self.stem(x))).mean((1, 2)))


def _tiny_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    return vit.eval()


@pytest.mark.parametrize(
    ("factory", "layer", "channels"),
    [
        (_tiny_vit, "encoder.layers.encoder_layer_0", 16),
        (_ChannelsLast, "norm", 12),
        (_DictNet, "body[coarse]", 6),
    ],
)
def test_token_channels_last_and_dict_outputs(factory: type, layer: str, channels: int) -> None:
    torch.manual_seed(0)
    net = factory().eval()
    spec = f"channel:{layer}:{channels - 1}"
    vis = visualize(net, spec, steps=15, size=32, transforms=NO_TRANSFORMS)[0]
    # independently: capture's (B, C, H, W) map of the same picture
    m = capture(net, _normalize(vis.image), layer)[layer][0]
    assert m.shape[0] == channels
    assert vis.value == pytest.approx(float(m[channels - 1].mean()), rel=1e-4, abs=1e-6)
    assert vis.value > vis.history[0]
    assert hooks_left(net) == 0
    with pytest.raises(ObjectiveError, match=f"has {channels} channels"):
        visualize(net, f"channel:{layer}:{channels}", **FAST)


def test_a_fixed_size_vit_asks_for_its_size() -> None:
    from featuremaps.errors import ModelError

    with pytest.raises(ModelError, match=r"takes only 32x32 inputs.*use --size 32"):
        visualize(_tiny_vit(), "channel:encoder.layers.encoder_layer_0:0", steps=2, size=48)


def test_a_dict_output_needs_its_entry() -> None:
    with pytest.raises(ObjectiveError, match=r"gives several maps .*name one: body\[fine\]"):
        visualize(_DictNet(), "channel:body:0", **FAST)


class _TwiceNet(nn.Module):
    """One activation module called after each of two convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.act(self.conv1(x))))


def test_a_module_called_twice_is_read_at_the_call_named() -> None:
    torch.manual_seed(0)
    net = _TwiceNet().eval()
    with pytest.raises(ObjectiveError, match="name one: act:1, act:2"):
        visualize(net, "channel:act:0", **FAST)
    vis = visualize(net, "channel:act:2:4", steps=10, size=32, transforms=NO_TRANSFORMS)[0]
    assert vis.objective.layer == "act:2" and vis.objective.index == 4
    m = capture(net, _normalize(vis.image), "act:2")["act:2"][0]
    assert m.shape[0] == 5
    assert vis.value == pytest.approx(float(m[4].mean()), rel=1e-4, abs=1e-6)


def test_torchscript_is_refused() -> None:
    from featuremaps.errors import ModelError

    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ModelError, match="TorchScript"):
        visualize(scripted, "channel:0:0", **FAST)


# -- outputs and the command line ----------------------------------------------------------


def test_save_writes_pictures_and_manifest(toy: ToyNet, tmp_path: Path) -> None:
    vis = visualize(toy, ["channel:features.3:0-1", "class:3"], **FAST)
    paths = vis.save(tmp_path / "v")
    assert [p.name for p in paths] == [
        "channel_features.3_0.png",
        "channel_features.3_1.png",
        "class_3.png",
        "manifest.json",
    ]
    manifest = json.loads(paths[-1].read_text())
    assert manifest["steps"] == 6 and manifest["size"] == 32 and manifest["seed"] == 0
    entry = manifest["visualizations"][2]
    assert entry["objective"] == "class:3" and entry["file"] == "class_3.png"
    assert entry["value"] == vis[2].value and len(entry["history"]) == 6
    from PIL import Image

    with Image.open(paths[0]) as img:
        assert img.size == (32, 32) and img.mode == "RGB"
        assert np.array_equal(np.asarray(img), np.asarray(vis[0].to_pil()))
    assert not list(tmp_path.rglob("*.part"))
    page = vis._repr_html_()
    assert page.count("<img") == 3 and "channel:features.3:1 = " in page
    assert vis[0]._repr_png_().startswith(b"\x89PNG")


def test_cli_writes_pngs_and_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from featuremaps.cli import main

    monkeypatch.chdir(Path(__file__).parent)
    out = tmp_path / "v"
    args = ["visualize", "test_visualize:tiny_factory", "--objective", "channel:features.3:0-1"]
    try:  # main() returns on success, or exits 0, depending on how Typer is driven
        main([*args, "--objective", "layer:features.0", "-o", str(out), "--steps", "4",
              "--size", "32", "--seed", "2", "--device", "cpu"])  # fmt: skip
    except SystemExit as exc:
        assert exc.code in (0, None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["file"] for e in manifest["visualizations"]] == [
        "channel_features.3_0.png",
        "channel_features.3_1.png",
        "layer_features.0.png",
    ]
    assert manifest["seed"] == 2 and manifest["model"] == "test_visualize:tiny_factory"
    assert all((out / e["file"]).is_file() for e in manifest["visualizations"])


@pytest.mark.parametrize(
    ("objective", "out_is_file", "needle"),
    [
        ("channel:features.9:0", False, "unknown layer 'features.9'"),
        ("channel:features.3:99", False, "out of range"),
        ("klass:1", False, "unknown kind 'klass'"),
        ("channel:features.3:0", True, "it is a file"),
    ],
)
def test_cli_errors_are_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    objective: str,
    out_is_file: bool,
    needle: str,
) -> None:
    from featuremaps.cli import main

    monkeypatch.chdir(Path(__file__).parent)
    out = tmp_path / "v"
    if out_is_file:
        out.write_text("x")
    with pytest.raises(SystemExit) as info:
        main(["visualize", "test_visualize:tiny_factory", "--objective", objective,
              "--out", str(out), "--steps", "2", "--size", "32"])  # fmt: skip
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (out.is_dir() and (out / "manifest.json").exists())


# -- with the offline pretrained model -------------------------------------------------------


@pytest.fixture(scope="module")
def lite0():  # type: ignore[no-untyped-def]
    from featuremaps import load_model

    return load_model("efficientnet_lite0")


@pytest.mark.slow
def test_a_class_visualization_is_classified_as_its_class(lite0) -> None:  # type: ignore[no-untyped-def]
    vis = visualize(lite0, ["class:espresso", "class:goldfish"], steps=64, size=128, seed=0)
    mean = torch.tensor(lite0.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(lite0.preprocess.std).view(1, 3, 1, 1)
    for v in vis:
        x = torch.from_numpy(v.image).permute(2, 0, 1)[None]
        with torch.no_grad():
            logits = lite0.module((x - mean) / std)
        assert int(logits.argmax()) == v.objective.index, v.objective.text
        assert float(logits[0, v.objective.index]) == pytest.approx(v.value, rel=1e-3)


@pytest.mark.slow
def test_a_channel_visualization_excites_it_more_than_the_photos(lite0) -> None:  # type: ignore[no-untyped-def]
    from featuremaps import load_image, preprocess, sample_image

    layer = "_blocks.10"
    vis = visualize(lite0, f"channel:{layer}:0-2", steps=32, size=112, seed=0)
    photos = torch.stack(
        [preprocess(load_image(sample_image(n)), lite0.preprocess) for n in ("cat", "coffee")]
    )
    maps = capture(lite0.module, photos, layer)[layer]
    for c, v in enumerate(vis):
        best_photo = float(maps[:, c].mean((1, 2)).max())
        assert v.value > best_photo, (v.objective.text, v.value, best_photo)
