"""``featuremaps run`` over many images holds one image at a time (issue 9, item 5).

Each run is a fresh process that reports its own peak resident memory; 40 images may
not need more than 4 do, give or take allocator noise. The precise figures (resnet18,
20 vs 200 images) are in benchmarks/bench_run_memory.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PEAK = textwrap.dedent(
    """
    import os, resource, sys
    from featuremaps.cli import main
    try:
        main(sys.argv[1:])
    finally:
        with open(os.environ["PEAK_FILE"], "w") as f:
            f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))  # KiB
    """
)

WIDE = textwrap.dedent(
    """
    import torch


    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 64, 1))
    """
)
"""64 maps of 224x224 per image: 12.8 MB of float32 that a run must not keep."""


def _peak_mib(work: Path, n: int) -> float:
    folder = work / f"images{n}"
    folder.mkdir()
    rng = np.random.default_rng(n)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
            folder / f"{i:03d}.png"
        )
    peak = work / f"peak{n}"
    args = ["wide:make", str(folder), "--layers", "0", "--out", str(work / f"out{n}")]
    r = subprocess.run(
        [sys.executable, "-c", PEAK, "run", *args, "--max-maps", "4", "--pca", "0"],
        cwd=work,
        env={**os.environ, "PEAK_FILE": str(peak)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert len(list((work / f"out{n}").glob("*/input.png"))) == n
    return int(peak.read_text()) / 1024


@pytest.mark.slow
def test_run_memory_does_not_grow_with_the_image_count(tmp_path: Path) -> None:
    (tmp_path / "wide.py").write_text(WIDE)
    few, many = _peak_mib(tmp_path, 4), _peak_mib(tmp_path, 40)
    # Holding every image's maps would add 36 x 12.8 MB = 460 MB; allow 64 MB of noise.
    assert many < few + 64, f"peak RSS {few:.0f} MiB for 4 images, {many:.0f} MiB for 40"
