"""Relevance, Grad-CAM and LayerCAM against an independent functional re-run.

Each reference splits the model by hand at the layer, makes the layer's output a leaf,
runs the rest and takes ``torch.autograd.grad`` of the target with respect to that leaf.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn

from conftest import FailingNet, hooks_left
from featuremaps import LayerError, relevance
from featuremaps.relevance import LayerRelevance, TargetError


def reference(
    head: Callable[[], torch.Tensor], tail: Callable[[torch.Tensor], torch.Tensor], cls: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(activation, d logit[cls] / d activation) with the model split by hand."""
    with torch.no_grad():
        a = head()
    leaf = a.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(tail(leaf)[:, cls].sum(), leaf)
    return a, g


def check(r: LayerRelevance, a: torch.Tensor, g: torch.Tensor, atol: float = 1e-5) -> None:
    """The layer's maps match the reference, and the summaries follow their formulas."""
    torch.testing.assert_close(r.activation, a, rtol=0, atol=atol)
    scale = g.abs().max().item()
    torch.testing.assert_close(r.gradient, g, rtol=1e-4, atol=1e-5 * scale)
    assert scale > 0, "the reference gradient is all zero: the check would be empty"
    gxa = g * a
    torch.testing.assert_close(r.grad_x_act, gxa, rtol=1e-4, atol=1e-4 * gxa.abs().max().item())
    torch.testing.assert_close(r.channels, gxa.sum((2, 3)), rtol=1e-4, atol=1e-4)
    gradcam = torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1))
    layercam = torch.relu((torch.relu(g) * a).sum(1))
    torch.testing.assert_close(r.gradcam, gradcam, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r.layercam, layercam, rtol=1e-4, atol=1e-5)


def test_resnet18_three_layers_from_one_backward() -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 48, 48)
    r = relevance(net, x, "layer2,layer3,layer4", target=3)
    assert list(r) == ["layer2", "layer3", "layer4"]
    assert [t.index for t in r.targets] == [3, 3] and r.targets[0].label is None

    def stem(upto: int) -> torch.Tensor:
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4)[:upto]:
            h = layer(h)
        return h

    def rest(start: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(h: torch.Tensor) -> torch.Tensor:
            for layer in (net.layer1, net.layer2, net.layer3, net.layer4)[start:]:
                h = layer(h)
            return net.fc(torch.flatten(net.avgpool(h), 1))

        return run

    for name, k in (("layer2", 2), ("layer3", 3), ("layer4", 4)):
        a, g = reference(lambda k=k: stem(k), rest(k), 3)
        check(r[name], a, g)
    with torch.no_grad():
        logits = net(x)
    assert r.targets[1].score == pytest.approx(logits[1, 3].item(), abs=1e-5)
    assert r.targets[1].prob == pytest.approx(logits.softmax(1)[1, 3].item(), abs=1e-6)


def test_vgg_conv_before_an_inplace_relu_is_the_conv_and_its_gradient() -> None:
    torch.manual_seed(0)
    vgg = torchvision.models.vgg11(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    r = relevance(vgg, x, "features.0,features.1,features.3")  # top-1 target
    with torch.no_grad():
        top = int(vgg(x).argmax(1))
    assert r.targets[0].index == top

    def tail(start: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(h: torch.Tensor) -> torch.Tensor:
            for module in vgg.features[start:]:
                h = torch.relu(h) if isinstance(module, nn.ReLU) else module(h)
            return vgg.classifier(torch.flatten(vgg.avgpool(h), 1))

        return run

    a0, g0 = reference(lambda: vgg.features[0](x), tail(1), top)
    assert (a0 < 0).any(), "the check needs negative conv outputs"
    check(r["features.0"], a0, g0)  # the conv's own values, not the ReLU's
    a1, g1 = reference(lambda: torch.relu(vgg.features[0](x)), tail(2), top)
    check(r["features.1"], a1, g1)
    a3, g3 = reference(lambda: vgg.features[:4](x), tail(4), top)
    check(r["features.3"], a3, g3)


def test_model_left_as_found_after_success_and_failure() -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=5).train()
    net.fc.weight.grad = torch.ones_like(net.fc.weight)
    net.layer1[0].conv1.weight.requires_grad_(False)
    grads = {n: p.requires_grad for n, p in net.named_parameters()}
    x = torch.randn(1, 3, 32, 32)
    r = relevance(net, x, "layer3", target=1)
    assert net.training and all(m.training for m in net.modules())
    assert hooks_left(net) == 0
    assert torch.equal(net.fc.weight.grad, torch.ones_like(net.fc.weight))
    assert all(p.grad is None for n, p in net.named_parameters() if n != "fc.weight")
    assert {n: p.requires_grad for n, p in net.named_parameters()} == grads
    for t in (r["layer3"].activation, r["layer3"].gradient, r["layer3"].gradcam):
        assert not t.requires_grad and t.grad_fn is None  # no graph kept
    with pytest.raises(TargetError, match=r"not an index in 0\.\.4"):
        relevance(net, x, "layer3", target=7)  # found out after the forward
    with pytest.raises(TargetError, match="Did you mean: tabby"):
        relevance(torchvision.models.resnet18().eval(), x, "layer3", target="tabbby")
    with pytest.raises(LayerError, match="unknown layer"):
        relevance(net, x, "layer9", target=1)
    assert hooks_left(net) == 0 and net.training
    failing = FailingNet()
    with pytest.raises(RuntimeError, match="boom"):
        relevance(failing, torch.randn(1, 3, 8, 8), "conv", target=0)
    assert hooks_left(failing) == 0


class Pyramid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.mix = nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.mix(torch.relu(self.conv(x)))
        return {"fine": y, "pool": nn.functional.avg_pool2d(y, 2)}


class Detector(nn.Module):
    """A dict-output backbone and a head that returns a dict too (not a classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Pyramid()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        levels = self.body(x)
        return {"fine": levels["fine"] * 2, "pool": levels["pool"].tanh()}


def test_a_frozen_model_and_a_callable_target_on_a_dict_output() -> None:
    torch.manual_seed(0)
    net = Detector().eval().requires_grad_(False)
    x = torch.randn(2, 3, 8, 8)

    def score(out: dict[str, torch.Tensor]) -> torch.Tensor:
        return out["pool"][:, 2].pow(2).sum((1, 2)) - out["fine"][:, 0].mean((1, 2))

    r = relevance(net, x, "body.conv,body[pool]", target=score)
    assert list(r) == ["body.conv", "body[pool]"] and r.targets[0].index is None
    assert r.targets[1].score == pytest.approx(score(net(x))[1].item(), abs=1e-6)

    def from_pool(p: torch.Tensor) -> torch.Tensor:  # only the pool term depends on it
        return p.tanh()[:, 2].pow(2).sum((1, 2))[:, None]

    a, g = reference(lambda: net.body(x)["pool"], from_pool, 0)
    check(r["body[pool]"], a, g)

    def from_conv(c: torch.Tensor) -> torch.Tensor:
        y = net.body.mix(torch.relu(c))
        return score({"fine": y * 2, "pool": nn.functional.avg_pool2d(y, 2).tanh()})[:, None]

    a, g = reference(lambda: net.body.conv(x), from_conv, 0)
    check(r["body.conv"], a, g)
    with pytest.raises(TargetError, match="a callable"):
        relevance(net, x, "body.conv", target=None)  # not a classifier
    with pytest.raises(TargetError, match=r"\(2,\) tensor"):
        relevance(net, x, "body.conv", target=lambda out: out["fine"].sum())
    assert hooks_left(net) == 0


def test_every_call_of_a_module_gets_its_own_gradient() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.fc = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(torch.relu(self.conv(x)))
            return self.fc(h.mean((2, 3)))

    torch.manual_seed(0)
    net = Twice().eval()
    x = torch.randn(1, 3, 6, 6)
    r = relevance(net, x, "conv", target=2)
    assert list(r) == ["conv:1", "conv:2"] and r["conv:2"].info.calls == 2

    def after_first(c: torch.Tensor) -> torch.Tensor:
        return net.fc(net.conv(torch.relu(c)).mean((2, 3)))

    a, g = reference(lambda: net.conv(x), after_first, 2)
    check(r["conv:1"], a, g)
    with torch.inference_mode():  # a caller's inference mode does not get in the way
        again = relevance(net, x.clone(), "conv:1", target=2)
    check(again["conv:1"], a, g)
    a, g = reference(lambda: net.conv(torch.relu(net.conv(x))), lambda h: net.fc(h.mean((2, 3))), 2)
    check(r["conv:2"], a, g)


def test_torchvision_vit_tokens_without_the_class_token() -> None:
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        num_classes=10,
    ).eval()
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts it at zero: no gradient
    x = torch.randn(2, 3, 32, 32)
    layer = "encoder.layers.encoder_layer_0"
    r = relevance(vit, x, layer, target=4)
    assert r[layer].info.layout == "tokens(prefix=1, grid=4x4)->NCHW"
    enc = vit.encoder

    def tokens() -> torch.Tensor:
        t = vit._process_input(x)
        t = torch.cat([vit.class_token.expand(x.shape[0], -1, -1), t], 1)
        return enc.layers[0](enc.dropout(t + enc.pos_embedding))

    def tail(t: torch.Tensor) -> torch.Tensor:
        return vit.heads(enc.ln(enc.layers[1](t))[:, 0])

    a, g = reference(tokens, tail, 4)

    def grid(t: torch.Tensor) -> torch.Tensor:  # drop the class token, patches row-major
        return t[:, 1:].reshape(2, 4, 4, 16).permute(0, 3, 1, 2)

    check(r[layer], grid(a), grid(g))


@pytest.mark.slow
def test_torchvision_swin_channels_last_stage() -> None:
    torch.manual_seed(0)
    swin = torchvision.models.swin_t(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    r = relevance(swin, x, "features.3", target=6)
    assert r["features.3"].info.layout == "NHWC->NCHW"

    def tail(h: torch.Tensor) -> torch.Tensor:
        h = swin.norm(swin.features[4:](h))
        return swin.head(swin.flatten(swin.avgpool(swin.permute(h))))

    a, g = reference(lambda: swin.features[:4](x), tail, 6)
    assert a.shape == (1, 8, 8, 192)  # channels-last, as the stage returns it
    check(r["features.3"], a.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2))


@pytest.mark.slow
def test_efficientnet_lite0_tabby_cam_peaks_on_the_cat() -> None:
    """The cat photo beside the coffee photo: each class's CAM falls on its own half."""
    import featuremaps as fm

    model = fm.load_model("efficientnet_lite0")
    cat, coffee = (
        fm.preprocess(fm.load_image(fm.sample_image(name)), model.preprocess)
        for name in ("cat", "coffee")
    )
    x = torch.cat([cat, coffee], -1)[None]  # 224 x 448: cat left, coffee right
    layer = "head_act"  # the last conv map, 7 x 14
    tabby = relevance(model.module, x, layer, target="tabby")
    assert tabby.targets[0].label == "tabby" and tabby.targets[0].index == 281
    cam = tabby[layer].gradcam[0]
    row_col = divmod(int(cam.argmax()), cam.shape[1])
    assert row_col[1] < cam.shape[1] // 2, f"tabby's Grad-CAM peaks at {row_col}, off the cat"
    assert cam[:, : cam.shape[1] // 2].sum() > 0.75 * cam.sum()
    espresso = relevance(model.module, x, layer, target="espresso")[layer].gradcam[0]
    assert int(espresso.argmax()) % espresso.shape[1] >= espresso.shape[1] // 2
    assert espresso[:, espresso.shape[1] // 2 :].sum() > 0.75 * espresso.sum()


def test_class_index_checks_a_target_before_any_compute() -> None:
    from featuremaps.relevance import class_index

    assert class_index("Tabby", 1000) == 281 and class_index(5, 10) == 5
    assert class_index("b", 3, ["a", "b", "c"]) == 1
    with pytest.raises(TargetError, match="not the 1000 ImageNet classes"):
        class_index("tabby", 10)
    with pytest.raises(TargetError, match=r"not an index in 0\.\.9"):
        class_index(10, 10)
