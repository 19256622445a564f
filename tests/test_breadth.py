"""Every torchvision classifier and a set of timm backbones, through the command line.

For each model, with random weights and a small input, ``featuremaps layers`` and
``featuremaps run --layers stages`` must succeed and every captured map must be
``(B, C, H, W)`` with ``H, W > 1``. A few cheap models run by default; the rest are
marked ``slow`` (CI runs them all: ``make test``).

The input is made small by shrinking each model's preprocessing after
:func:`featuremaps.load_model` built the model (torchvision ViTs, which take one input
size, get their position embedding resized too). The model is built once per test and
shared by the two commands.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import featuremaps.models
import featuremaps.pipeline
from featuremaps.models import LoadedModel

TORCHVISION = torchvision.models.list_models(module=torchvision.models)
TORCHVISION_FAST = {"resnet18", "mobilenet_v3_small", "squeezenet1_1", "swin_t", "vit_b_32"}
TIMM = [
    "vit_tiny_patch16_224",  # ViT, class token
    "deit_tiny_distilled_patch16_224",  # class + distillation token
    "vit_small_patch14_reg4_dinov2",  # class + 4 register tokens
    "convnext_atto",
    "swin_tiny_patch4_window7_224",  # channels-last stages
    "efficientnet_b0",
    "regnetx_002",
]
TIMM_SLOW = {"vit_small_patch14_reg4_dinov2", "swin_tiny_patch4_window7_224"}


def input_side(name: str) -> int:
    """A small input the model accepts (patch multiples, MaxViT's 7x7 partitions)."""
    if name.startswith("maxvit"):
        return 224
    if name.startswith(("vit_", "timm:vit_", "timm:deit_")):
        return 128 if "32" in name.split("_")[2] else 112
    if name == "inception_v3":
        return 96
    return 64


def _resize_vit(vit: nn.Module, side: int) -> None:
    """Let a torchvision ViT take ``side x side`` inputs (position embedding resized)."""
    pos = vit.encoder.pos_embedding.detach()
    old = round((pos.shape[1] - 1) ** 0.5)
    new = side // vit.patch_size
    grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(new, new), mode="bilinear")
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)
    vit.encoder.pos_embedding = nn.Parameter(torch.cat([pos[:, :1], grid], 1))
    vit.image_size = side
    vit.seq_length = 1 + new * new


@pytest.fixture
def small_models(monkeypatch: pytest.MonkeyPatch) -> dict[str, LoadedModel]:
    """Make the CLI load each model once, with a small input size."""
    real: Callable[..., LoadedModel] = featuremaps.models.load_model
    cache: dict[str, LoadedModel] = {}

    def load(spec: str, weights: str = "DEFAULT") -> LoadedModel:
        assert str(weights).lower() == "none", "the breadth tests never download weights"
        if spec not in cache:
            loaded = real(spec, weights)
            side = input_side(spec)
            module = loaded.module
            if isinstance(module, torchvision.models.VisionTransformer):
                # a random ViT is built for the size its preprocessing gives
                assert module.image_size == loaded.preprocess.crop
                _resize_vit(module, side)
            loaded.preprocess = dataclasses.replace(loaded.preprocess, resize=side, crop=side)
            cache[spec] = loaded
        return cache[spec]

    monkeypatch.setattr(featuremaps.models, "load_model", load)
    monkeypatch.setattr(featuremaps.pipeline, "load_model", load)
    return cache


def run_cli(args: list[str]) -> None:
    """Run ``featuremaps ARGS`` in this process; fail unless it succeeds."""
    from featuremaps.cli import main

    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None), f"featuremaps {' '.join(args)} exited with {exc.code}"


def check_model(
    spec: str,
    photo: Path,
    out: Path,
    capsys: pytest.CaptureFixture[str],
    cache: dict[str, LoadedModel],
) -> None:
    """``layers`` and ``run --layers stages`` succeed and give proper maps."""
    capsys.readouterr()
    run_cli(["layers", spec, "--weights", "none"])
    listing = capsys.readouterr().out
    side = input_side(spec)
    assert f"input (1, 3, {side}, {side})" in listing
    assert f"preprocessing: resize {side}, center crop {side}" in listing
    run_cli(["run", spec, str(photo), "--weights", "none", "--layers", "stages", "--out", str(out)])
    manifest = json.loads((out / "manifest.json").read_text())
    layers = manifest["images"][0]["layers"]
    assert layers, f"{spec}: the stages preset captured nothing"
    for name, rec in layers.items():
        b, c, h, w = rec["shape"]
        assert b == 1 and c >= 1 and h > 1 and w > 1, f"{spec} {name}: {rec['shape']}"
        assert (out / rec["grid"]).is_file()
    assert manifest["images"][0]["input_size"] == [side, side]
    assert cache[spec].module.training is False


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=() if n in TORCHVISION_FAST else pytest.mark.slow) for n in TORCHVISION],
)
def test_torchvision_classifier(
    name: str,
    photo: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    small_models: dict[str, LoadedModel],
) -> None:
    check_model(name, photo, tmp_path / "out", capsys, small_models)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow if n in TIMM_SLOW else ()) for n in TIMM]
)
def test_timm_backbone(
    name: str,
    photo: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    small_models: dict[str, LoadedModel],
) -> None:
    pytest.importorskip("timm")
    check_model(f"timm:{name}", photo, tmp_path / "out", capsys, small_models)


def test_the_list_is_the_full_classification_set() -> None:
    """Guards the parametrization: a torchvision upgrade adds models, none go missing."""
    assert len(TORCHVISION) >= 80
    assert {"vit_h_14", "swin_v2_b", "maxvit_t", "regnet_y_128gf"} <= set(TORCHVISION)
