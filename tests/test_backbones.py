"""Token maps, channels-last maps and multi-output modules become (B, C, H, W) maps."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from conftest import FailingNet, hooks_left
from featuremaps.capture import PRESETS, Capture, LayoutContext, capture, list_layers
from featuremaps.capture.layout import model_tokens
from featuremaps.errors import LayerError, ModelError, WeightsUnavailableError


@pytest.fixture
def timm() -> object:
    """timm, or a skip when the extra is not installed."""
    return pytest.importorskip("timm")


REG = 1000.0
"""Register tokens start at this value, class tokens at minus it: easy to spot in a map."""


# -- toy token models ------------------------------------------------------------------------


class TokenBlock(nn.Module):
    """A per-token residual MLP: each token's output depends on that token only."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * torch.tanh(self.fc(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.patch_size = (patch, patch)
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ToyViT(nn.Module):
    """Class token + ``regs`` register tokens in front of the patch tokens, like DINOv2.

    ``declare`` sets timm's ``num_prefix_tokens``; without it the prefix count has to
    come from the ``cls_token`` / ``reg_token`` parameters.
    """

    def __init__(self, regs: int = 4, dim: int = 16, patch: int = 4, declare: bool = True):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.full((1, 1, dim), -REG))
        self.reg_token = nn.Parameter(torch.full((1, regs, dim), REG))
        if declare:
            self.num_prefix_tokens = 1 + regs
        self.blocks = nn.Sequential(TokenBlock(dim), TokenBlock(dim), TokenBlock(dim))
        self.norm = nn.LayerNorm(dim)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Input tokens of the first block: class, registers, patches."""
        patches = self.patch_embed(x)
        b = patches.shape[0]
        return torch.cat(
            [self.cls_token.expand(b, -1, -1), self.reg_token.expand(b, -1, -1), patches], 1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.tokens(x)))[:, 0]


def _patch_map(tokens: torch.Tensor, prefix: int, h: int, w: int) -> torch.Tensor:
    """Reference: the patch tokens laid out row by row on an ``h x w`` grid."""
    b, _, c = tokens.shape
    return tokens[:, prefix:].reshape(b, h, w, c).permute(0, 3, 1, 2)


def run_cli(args: list[str]) -> None:
    """Run ``featuremaps ARGS`` in this process; fail unless it succeeds."""
    from featuremaps.cli import main

    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None), f"featuremaps {' '.join(args)} exited with {exc.code}"


def _raw_output(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """What ``layer`` returns, with a hook of our own (independent of featuremaps)."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o)
    )
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


def test_register_tokens_never_reach_the_patch_grid() -> None:
    torch.manual_seed(0)
    model = ToyViT(regs=4).eval()
    x = torch.randn(2, 3, 32, 48)  # non-square: a grid of 8 rows and 12 columns
    fm = capture(model, x, "blocks.0,blocks.2,norm")
    raw = _raw_output(model, "blocks.2", x)
    assert raw.shape == (2, 5 + 8 * 12, 16)
    assert raw[:, 1:5].min() > REG / 2 and raw[:, 0].max() < -REG / 2  # the prefix is there
    for name in ("blocks.0", "blocks.2"):
        m = fm[name]
        assert m.shape == (2, 16, 8, 12)
        assert m.abs().max() < 10  # no register or class token leaked in
        assert fm.info[name].layout == "tokens(prefix=5, grid=8x12)->NCHW"
        assert "num_prefix_tokens" in fm.info[name].note
    torch.testing.assert_close(fm["blocks.2"], _patch_map(raw, 5, 8, 12), rtol=0, atol=0)


def test_patch_order_is_row_major_on_a_non_square_grid() -> None:
    torch.manual_seed(0)
    model = ToyViT(regs=0).eval()
    x = torch.randn(1, 3, 24, 40)  # 6 x 10 patches
    fm = capture(model, x, "blocks.0,patch_embed.proj", full_forward=True)
    conv = fm["patch_embed.proj"]  # the patch grid as the convolution laid it out
    expected = model.blocks[0](conv.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(fm["blocks.0"], expected)
    assert fm["blocks.0"].shape == (1, 16, 6, 10)


def test_prefix_count_from_token_parameters_when_not_declared() -> None:
    torch.manual_seed(0)
    model = ToyViT(regs=2, declare=False).eval()
    info = model_tokens(model, (16, 16))
    assert info.prefix == 3 and info.grid == (4, 4)
    assert "cls_token" in info.prefix_source and "reg_token" in info.prefix_source
    x = torch.randn(1, 3, 16, 16)
    fm = capture(model, x, "blocks.1")
    raw = _raw_output(model, "blocks.1", x)
    torch.testing.assert_close(fm["blocks.1"], _patch_map(raw, 3, 4, 4))


class Tokenizer(nn.Module):
    """Tokens with no patch embedding the model could tell about: 2 prefix + 3x5 tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.prefix = nn.Parameter(torch.full((1, 2, 8), REG))
        self.mix = TokenBlock(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.conv(x).flatten(2).transpose(1, 2)
        return self.mix(torch.cat([self.prefix.expand(t.shape[0], -1, -1), t], 1))


def test_unknown_grid_is_a_clear_error_naming_the_options() -> None:
    model = Tokenizer().eval()
    x = torch.randn(1, 3, 12, 20)
    with pytest.raises(LayerError) as info:
        capture(model, x, "mix")
    msg = str(info.value)
    assert "--tokens-grid HxW" in msg and "--prefix-tokens K" in msg and "(1, 17, 8)" in msg
    assert hooks_left(model) == 0
    raw = _raw_output(model, "mix", x)
    expected = _patch_map(raw, 2, 3, 5)
    for ctx in (
        LayoutContext((0, 0), tokens_grid=(3, 5), prefix_tokens=2),
        LayoutContext((0, 0), tokens_grid=(3, 5)),  # prefix = N - h*w
        LayoutContext((0, 0), prefix_tokens=2),  # grid from the input's aspect ratio
    ):
        fm = capture(model, x, "mix", layout=ctx)
        torch.testing.assert_close(fm["mix"], expected, rtol=0, atol=0)
        assert fm["mix"].abs().max() < 10
    with pytest.raises(LayerError, match="--tokens-grid"):
        capture(model, x, "mix", layout=LayoutContext((0, 0), tokens_grid=(4, 4), prefix_tokens=2))


def test_token_count_that_fits_no_grid_names_the_options() -> None:
    model = ToyViT(regs=1).eval()
    with pytest.raises(LayerError) as info:
        ctx = LayoutContext((0, 0), prefix_tokens=3)  # 1 class + 1 register is right
        capture(model, torch.randn(1, 3, 16, 16), "blocks.0", layout=ctx)
    assert "--tokens-grid" in str(info.value) and "4x4" in str(info.value)


# -- channels-last ---------------------------------------------------------------------------


class Permute(nn.Module):
    """Same name and attribute as torchvision's ``ops.misc.Permute``."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class NHWCBlock(nn.Module):
    """A residual MLP over channels-last maps, like a Swin/ConvNeXt block."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(self.norm(x))


class CubeNet(nn.Module):
    """Every map is 7 x 7 x 7: shapes cannot tell NCHW from NHWC, the modules can.

    ``cnn`` and ``res`` stay NCHW; ``perm`` and ``stage`` are channels-last as in Swin;
    ``back`` returns to NCHW, ``act`` follows it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cnn = nn.Sequential(nn.Conv2d(3, 7, 3, stride=4, padding=1), nn.ReLU())
        self.res = Residual()
        self.perm = Permute([0, 2, 3, 1])
        self.stage = nn.Sequential(NHWCBlock(7), NHWCBlock(7))
        self.back = Back()
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.back(self.stage(self.perm(self.res(self.cnn(x))))))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(7, 7, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class Back(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(7, 7)
        self.perm = Permute([0, 3, 1, 2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.perm(self.fc(x))


def test_channels_last_is_decided_by_the_modules_not_the_cube_shape() -> None:
    torch.manual_seed(0)
    net = CubeNet().eval()
    x = torch.randn(1, 3, 28, 28)
    names = ["cnn", "res", "perm", "stage.0", "stage", "back.fc", "back", "act"]
    fm = capture(net, x, names)
    raw = {n: _raw_output(net, n, x) for n in names}
    assert all(t.shape == (1, 7, 7, 7) for t in raw.values())
    nhwc = {"perm", "stage.0", "stage", "back.fc"}
    for n in names:
        expected = raw[n].permute(0, 3, 1, 2) if n in nhwc else raw[n]
        torch.testing.assert_close(fm[n], expected, rtol=0, atol=0, msg=n)
        assert fm.info[n].layout == ("NHWC->NCHW" if n in nhwc else "NCHW"), n
    assert "Permute" in fm.info["perm"].note
    assert "Linear" in fm.info["back.fc"].note


class FunctionalNHWC(nn.Module):
    """Goes channels-last with a functional permute: only the data flow tells."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 2, stride=2)
        self.act = nn.GELU()
        self.weight = nn.Parameter(torch.randn(12, 3, 4, 4))
        self.tail = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv(x).permute(0, 2, 3, 1))  # (B, H/2, W/2, 5)
        b = torch.nn.functional.conv2d(x, self.weight, stride=4).permute(0, 2, 3, 1)
        return a.mean() + self.tail(b)  # tail: (B, H/4, W/4, 12), seen nowhere before


def test_functional_permutes_and_the_last_resort_shape_guess() -> None:
    torch.manual_seed(0)
    net = FunctionalNHWC().eval()
    x = torch.randn(1, 3, 32, 32)
    infos = {i.name: i for i in list_layers(net, x)}
    assert infos["conv"].layout == "NCHW"
    assert infos["act"].layout == "NHWC->NCHW" and infos["act"].shape == (1, 5, 16, 16)
    assert infos["tail"].layout == "NHWC->NCHW" and infos["tail"].shape == (1, 12, 8, 8)
    assert "guessed from the shape" in infos["tail"].note
    fm = capture(net, x, "tail")
    ref = torch.nn.functional.conv2d(x, net.weight, stride=4)
    torch.testing.assert_close(fm["tail"], ref)


def test_hooks_are_removed_after_failures_too(x_small: torch.Tensor) -> None:
    net = FailingNet()
    with pytest.raises(RuntimeError, match="boom"):
        capture(net, x_small, "conv", full_forward=True)
    with pytest.raises(RuntimeError, match="boom"):
        list_layers(net, x_small)
    assert hooks_left(net) == 0
    vit = ToyViT().eval()
    capture(vit, torch.randn(1, 3, 16, 16), "blocks")  # the preset: every block
    assert hooks_left(vit) == 0


def test_channels_last_decisions_are_the_same_when_kept() -> None:
    """The second capture takes the first one's decisions (Linear, LayerNorm, Permute)."""
    torch.manual_seed(0)
    net = CubeNet().eval()
    x = torch.randn(1, 3, 28, 28)
    names = ["perm", "stage.0", "stage.0.norm", "stage.0.fc", "back.fc", "back", "act"]
    first = capture(net, x, names)
    with Capture(net, names, example_input=x) as cap:
        assert hooks_left(net) == 1 + len(names)  # no tracker: its decisions were kept
        net(x)
    assert cap.maps.info == first.info
    for n in names:
        torch.testing.assert_close(cap.maps[n], first[n], rtol=0, atol=0)
    assert [n for n in names if first.info[n].layout == "NHWC->NCHW"] == names[:5]


class MaybePermuted(nn.Module):
    """A 7x7x7 map, channels-last only while ``perm`` is set: a cube shape cannot tell."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 7, 3, stride=4, padding=1)
        self.perm: nn.Module | None = None
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.perm is not None:
            x = self.perm(x)
        return self.act(x)


def test_kept_layouts_are_dropped_when_a_module_is_added_replaced_or_removed() -> None:
    torch.manual_seed(0)
    net = MaybePermuted().eval()
    x = torch.randn(1, 3, 28, 28)

    def check(nhwc: bool) -> None:
        for _ in range(2):  # the second capture may use what the first one kept
            fm = capture(net, x, "act")
            raw = _raw_output(net, "act", x)
            assert raw.shape == (1, 7, 7, 7)
            expected = raw.permute(0, 3, 1, 2) if nhwc else raw
            torch.testing.assert_close(fm["act"], expected, rtol=0, atol=0)
            assert fm.info["act"].layout == ("NHWC->NCHW" if nhwc else "NCHW")

    check(nhwc=False)
    net.perm = Permute([0, 2, 3, 1])  # added
    check(nhwc=True)
    net.perm = Permute([0, 1, 2, 3])  # replaced, same name
    check(nhwc=False)
    net.perm = Permute([0, 2, 3, 1])
    check(nhwc=True)
    net.perm = None  # removed
    check(nhwc=False)


def test_kept_layouts_only_serve_the_input_and_layers_they_were_made_for() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 7, 3, stride=4, padding=1), Permute([0, 2, 3, 1]), nn.GELU())
    net.eval()
    x28, x32 = torch.randn(1, 3, 28, 28), torch.randn(1, 3, 32, 32)
    # an early stop after "0" kept the decisions of "0" only; "2" is tracked again
    assert capture(net, x28, "0").stopped_early
    fm = capture(net, x28, "2")  # a cube map: only the tracker can tell it is NHWC
    assert fm.info["2"].layout == "NHWC->NCHW"
    # kept for 28x28, but the forward runs on 32x32: the tracker follows it after all,
    # deciding each layout before the stop
    with Capture(net, "2", example_input=x28, early_stop=True) as cap:
        net(x32)
    assert hooks_left(net) == 0
    raw = _raw_output(net, "2", x32)
    assert raw.shape == (1, 8, 8, 7)  # read as NCHW, 8 x 7 would fit a 32x32 input too
    torch.testing.assert_close(cap.maps["2"], raw.permute(0, 3, 1, 2), rtol=0, atol=0)
    assert cap.maps.info["2"].layout == "NHWC->NCHW"
    assert capture(net, x32, "2").info["2"] == cap.maps.info["2"]  # kept from that forward


# -- multi-output modules ------------------------------------------------------------------


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b = self.b(x)
        return OrderedDict(fine=self.a(x), coarse=b, logits=self.fc(b.mean((2, 3))))


class Wrap(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> object:
        return self.body(x)


def test_dict_output_gives_one_map_per_entry() -> None:
    torch.manual_seed(0)
    net = Wrap(TwoHeads()).eval()
    x = torch.randn(1, 3, 16, 16)
    fm = capture(net, x, "body")
    assert list(fm) == ["body[fine]", "body[coarse]"]  # the logits are skipped
    torch.testing.assert_close(fm["body[coarse]"], net.body.b(x))
    assert fm.info["body[coarse]"].stride == (2.0, 2.0)
    fm = capture(net, x, "body[coarse]")
    assert list(fm) == ["body[coarse]"]
    with pytest.raises(LayerError, match="no spatial map"):
        capture(net, x, "body[logits]")
    with pytest.raises(LayerError, match=r"body\[fine\], body\[coarse\], body\[logits\]"):
        capture(net, x, "body[corse]")


def test_timm_features_only_channels_last_list(timm: Any) -> None:
    torch.manual_seed(0)
    body = timm.create_model(
        "swin_tiny_patch4_window7_224", features_only=True, pretrained=False, img_size=64
    )
    net = Wrap(body).eval()
    x = torch.randn(1, 3, 64, 64)
    fm = capture(net, x, "body")
    assert list(fm) == ["body[0]", "body[1]", "body[2]", "body[3]"]
    with torch.no_grad():
        ref = body(x)
    for i, r in enumerate(ref):
        torch.testing.assert_close(fm[f"body[{i}]"], r.permute(0, 3, 1, 2))
        assert fm.info[f"body[{i}]"].layout == "NHWC->NCHW"
    assert [tuple(m.shape[1:]) for m in fm.values()] == [
        (96, 16, 16),
        (192, 8, 8),
        (384, 4, 4),
        (768, 2, 2),
    ]


def test_detection_backbone_fpn_levels() -> None:
    from featuremaps.models import load_model

    loaded = load_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights="none")  # no download
    model = loaded.module
    x = torch.rand(1, 3, 160, 160)
    fm = capture(model, x, "backbone")
    with torch.no_grad():
        images, _ = model.transform([x[0]])
        ref = model.backbone(images.tensors)
    assert list(fm) == [f"backbone[{k}]" for k in ref]
    for key, r in ref.items():
        torch.testing.assert_close(fm[f"backbone[{key}]"], r)
    assert "entry [pool]" in fm.info["backbone[pool]"].note


# -- torchvision transformers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_b_16() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.vit_b_16().eval()


def test_torchvision_vit_block_tokens(vit_b_16: nn.Module) -> None:
    x = torch.randn(1, 3, 224, 224)
    layer = "encoder.layers.encoder_layer_11"
    fm = capture(vit_b_16, x, f"{layer},{layer}.self_attention")
    raw = _raw_output(vit_b_16, layer, x)
    assert fm[layer].shape == (1, 768, 14, 14)
    torch.testing.assert_close(fm[layer], _patch_map(raw, 1, 14, 14), rtol=0, atol=0)
    assert fm.info[layer].layout == "tokens(prefix=1, grid=14x14)->NCHW"
    assert fm[f"{layer}.self_attention[0]"].shape == (1, 768, 14, 14)  # (out, None) tuple
    infos = list_layers(vit_b_16, x)
    assert PRESETS["stages"](vit_b_16, infos) == ["encoder"]
    assert PRESETS["blocks"](vit_b_16, infos) == [
        f"encoder.layers.encoder_layer_{i}" for i in range(12)
    ]


def test_torchvision_vit_refuses_other_input_sizes_clearly(vit_b_16: nn.Module) -> None:
    with pytest.raises(ModelError) as info:
        capture(vit_b_16, torch.randn(1, 3, 224, 288), "encoder")
    msg = str(info.value)
    assert "224x224" in msg and "224x288" in msg and "--full" in msg and "timm" in msg
    assert hooks_left(vit_b_16) == 0


def test_random_torchvision_vit_matches_its_preprocessing() -> None:
    from featuremaps.models import Preprocess, _random_build_kwargs

    # ViT-H/14's DEFAULT weights (and so its preprocessing) are for 518x518 inputs
    assert _random_build_kwargs("vit_h_14", Preprocess(518, 518))["image_size"] == 518
    assert "image_size" not in _random_build_kwargs("resnet18", Preprocess())


def test_torchvision_swin_is_permuted_and_matches_the_features() -> None:
    torch.manual_seed(0)
    swin = torchvision.models.swin_t().eval()
    x = torch.randn(1, 3, 224, 224)
    fm = capture(swin, x, "features.7")
    with torch.no_grad():
        ref = swin.features(x).permute(0, 3, 1, 2)
    assert fm["features.7"].shape == (1, 768, 7, 7)
    torch.testing.assert_close(fm["features.7"], ref, rtol=0, atol=0)
    assert fm.info["features.7"].layout == "NHWC->NCHW"
    infos = list_layers(swin, torch.randn(1, 3, 64, 96))  # Swin takes any size
    assert PRESETS["stages"](swin, infos) == ["features.1", "features.3", "features.5", "norm"]
    blocks = PRESETS["blocks"](swin, infos)
    assert blocks[:3] == ["features.1.0", "features.1.1", "features.3.0"] and len(blocks) == 12
    by_name = {i.name: i for i in infos}
    assert by_name["features.7"].shape == (1, 768, 2, 3)
    assert by_name["features.0.0"].layout == "NCHW"  # the conv before the Permute
    assert by_name["permute"].layout == "NCHW" and by_name["norm"].layout == "NHWC->NCHW"


# -- timm ------------------------------------------------------------------------------------


def test_dinov2_registers_are_not_in_the_grid(timm: Any) -> None:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_small_patch14_reg4_dinov2", pretrained=False, dynamic_img_size=True
    ).eval()
    assert model.num_prefix_tokens == 5
    with torch.no_grad():
        model.cls_token.fill_(-REG)
        model.reg_token.fill_(REG)
    x = torch.randn(1, 3, 126, 98)  # 9 x 7 patches of 14
    fm = capture(model, x, "blocks.5,blocks.11")
    raw = _raw_output(model, "blocks.11", x)
    assert raw.shape == (1, 5 + 63, 384) and raw[:, 1:5].min() > REG / 2
    with torch.no_grad():
        ref = model.forward_intermediates(x, indices=[5, 11], intermediates_only=True)
    for name, r in zip(("blocks.5", "blocks.11"), ref, strict=True):
        assert fm[name].shape == (1, 384, 9, 7)
        torch.testing.assert_close(fm[name], r)  # timm's own patch maps
        assert fm[name].abs().max() < 50
        assert fm.info[name].layout == "tokens(prefix=5, grid=9x7)->NCHW"


def test_deit_distillation_token_is_a_prefix(timm: Any) -> None:
    torch.manual_seed(0)
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, dynamic_img_size=True
    ).eval()
    x = torch.randn(1, 3, 64, 96)
    fm = capture(model, x, "blocks.11")
    raw = _raw_output(model, "blocks.11", x)
    torch.testing.assert_close(fm["blocks.11"], _patch_map(raw, 2, 4, 6), rtol=0, atol=0)


def test_timm_swin_and_convnext_layouts(timm: Any) -> None:
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64)
    swin.eval()
    x = torch.randn(1, 3, 64, 64)
    fm = capture(swin, x, "stages")
    assert list(fm) == ["layers.0", "layers.1", "layers.2", "norm"]
    with torch.no_grad():
        ref = swin.forward_features(x)
    torch.testing.assert_close(fm["norm"], ref.permute(0, 3, 1, 2))
    assert all(i.layout == "NHWC->NCHW" for i in fm.info.values())
    convnext = timm.create_model("convnext_atto", pretrained=False, conv_mlp=False).eval()
    infos = {i.name: i for i in list_layers(convnext, x)}
    assert infos["stages.0.blocks.0.mlp.fc1"].layout == "NHWC->NCHW"  # inside the block
    assert infos["stages.0.blocks.0"].layout == "NCHW"  # the block's own output
    names = ["stages.0", "stages.1", "stages.2", "stages.3"]
    fm = capture(convnext, x, names)
    with torch.no_grad():
        ref = convnext.forward_intermediates(x, intermediates_only=True)
    for name, r in zip(names, ref, strict=True):
        torch.testing.assert_close(fm[name], r)


def test_timm_spec_uses_timm_preprocessing_and_any_input_size(timm: Any) -> None:
    from featuremaps.models import load_model

    loaded = load_model("timm:vit_tiny_patch16_224", weights="none")
    pp = loaded.preprocess
    assert (pp.resize, pp.crop, pp.interpolation) == (248, 224, "bicubic")  # crop_pct 0.9
    assert pp.mean == (0.5, 0.5, 0.5) and pp.std == (0.5, 0.5, 0.5)
    assert "timm data config" in pp.describe()
    assert loaded.extra["dynamic_img_size"] is True and loaded.extra["dynamic_img_pad"] is True
    fm = capture(loaded.module, torch.randn(1, 3, 150, 230), "blocks.11")  # padded to 160x240
    assert fm["blocks.11"].shape == (1, 192, 10, 15)
    assert fm.info["blocks.11"].layout == "tokens(prefix=1, grid=10x15)->NCHW"
    # dynamic_img_size changes nothing at the configured size
    torch.manual_seed(0)
    fixed = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    fixed.load_state_dict(loaded.module.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), fixed(x))


def test_timm_pretrained_offline(
    timm: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    from featuremaps import models

    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(models, "_cached_timm_weights", lambda cfg: None)
    with pytest.raises(WeightsUnavailableError) as info:
        models.load_model("timm:vit_tiny_patch16_224")
    msg = str(info.value)
    assert "timm/vit_tiny_patch16_224" in msg and "--weights none" in msg
    # weights found in a cache are used without the network
    torch.manual_seed(3)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    monkeypatch.setattr(models, "_cached_timm_weights", lambda cfg: path)
    loaded = models.load_model("timm:vit_tiny_patch16_224")
    assert loaded.pretrained
    torch.testing.assert_close(loaded.module.pos_embed, src.pos_embed)


def test_cli_layers_shows_preprocessing_and_layouts(
    timm: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    run_cli(["layers", "timm:vit_tiny_patch16_224", "--weights", "none"])
    text = capsys.readouterr().out
    assert "preprocessing: resize 248, center crop 224, bicubic, mean 0.500,0.500,0.500" in text
    assert "timm data config of vit_tiny_patch16_224" in text
    assert "tokens(prefix=1, grid=14x14)->NCHW" in text
    assert "presets: stages, blocks, convs" in text


def test_cli_run_vit_b_16_block(tmp_path: Path, photo: Path) -> None:
    """The issue's first acceptance check: 768 maps of 14x14 and a 14x14 PCA picture."""
    from safetensors.torch import load_file

    from featuremaps.reduce import pca_rgb

    out = tmp_path / "d"
    layer = "encoder.layers.encoder_layer_11"
    run_cli(["run", "vit_b_16", str(photo), "--weights", "none", "--layers", layer,
          "--out", str(out), "--max-maps", "0", "--save-activations"])  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    rec = manifest["images"][0]["layers"][layer]
    assert rec["shape"] == [1, 768, 14, 14] and rec["channels"] == 768
    assert len(rec["grid_channels"]) == 768
    assert rec["layout"] == "tokens(prefix=1, grid=14x14)->NCHW"
    assert (out / rec["grid"]).is_file() and (out / "photo" / "pca_panel.png").is_file()
    saved = load_file(str(out / "activations.safetensors"))[f"photo/{layer}"]
    assert saved.shape == (1, 768, 14, 14)
    assert pca_rgb(saved[0]).shape == (14, 14, 3)


def test_token_root_follows_an_edited_model() -> None:
    """The token root found for a model is looked for again once the model changes."""
    from featuremaps.capture.layout import _token_root

    class PatchModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch_embed = nn.Conv2d(3, 4, 2, 2)

    model = nn.Sequential(nn.Identity(), PatchModel())
    assert _token_root(model) is model[1]
    model[1] = nn.Identity()
    assert _token_root(model) is None
    model.add_module("2", PatchModel())
    assert _token_root(model) is model[2]
    del model[2]
    assert _token_root(model) is None
