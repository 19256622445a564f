"""Tiny seeded models and images shared by the tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn


class ToyNet(nn.Module):
    """Two conv stages with an in-place ReLU after each conv, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class Exploding(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


class FailingNet(nn.Module):
    """Runs a conv, then raises: for hook-leak tests."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bad = Exploding()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bad(self.conv(x))


def toy_factory() -> nn.Module:
    """Factory used by `package.module:factory` specs in the tests."""
    torch.manual_seed(0)
    return ToyNet()


@pytest.fixture
def toy() -> ToyNet:
    torch.manual_seed(0)
    return ToyNet().eval()


@pytest.fixture
def x_small() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


def hooks_left(model: nn.Module) -> int:
    """Number of forward (pre-)hooks on any module of ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    """A 96x80 RGB JPEG with some structure."""
    yy, xx = np.mgrid[0:80, 0:96]
    arr = np.stack([(xx * 2) % 256, (yy * 3) % 256, ((xx + yy) * 2) % 256], -1).astype(np.uint8)
    path = tmp_path / "photo.jpg"
    Image.fromarray(arr).save(path, quality=95)
    return path


BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def browser_unavailable(reason: str) -> None:
    """Skip a browser test locally; in CI (``CI`` set) a missing browser is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"browser tests must run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright (``FEATUREMAPS_CHROMIUM`` overrides the path)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        browser_unavailable("playwright is not installed (pip install 'featuremaps[test]')")
    chromium = os.environ.get("FEATUREMAPS_CHROMIUM", "/usr/bin/chromium")
    executable = shutil.which(chromium)
    if executable is None:
        browser_unavailable(
            f"no Chromium at {chromium} (apt-get install chromium, or FEATUREMAPS_CHROMIUM)"
        )
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, args=BROWSER_ARGS, timeout=120_000)
        try:
            yield b
        finally:
            b.close()
