"""Peak memory of ``featuremaps run`` over 20 and 200 images: it should not grow.

Each run is a fresh process (``featuremaps run resnet18 DIR --weights none --layers
stages``, random weights, nothing downloaded) that reports its own peak resident set
size (``getrusage(RUSAGE_SELF).ru_maxrss``). The images are synthetic 500x375 JPEGs with
some structure, written to a temporary folder first.

Usage:
    .venv/bin/python benchmarks/bench_run_memory.py               # 20 and 200 images
    .venv/bin/python benchmarks/bench_run_memory.py --counts 20 200 400 --model resnet50

Target (issue 9): the peak for 200 images within 10 % of the peak for 20.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench_core import machine_line as machine

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


def make_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    rng = np.random.default_rng(0)
    for i in range(n):
        f1, f2, f3 = rng.uniform(0.01, 0.08, 3)
        arr = np.stack(
            [
                127 + 120 * np.sin(xx * f1 + i),
                127 + 120 * np.sin(yy * f2 + 2 * i),
                127 + 120 * np.sin((xx + yy) * f3),
            ],
            -1,
        )
        arr += rng.normal(0, 12, arr.shape)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(
            folder / f"{i:04d}.jpg", quality=90
        )


def peak_run(model: str, layers: str, images: Path, out: Path) -> tuple[float, float]:
    """Peak RSS (MiB) and seconds of one ``featuremaps run`` in a fresh process."""
    peak = out.parent / f"{out.name}.peak"
    args = ["run", model, str(images), "--weights", "none", "--layers", layers]
    start = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", PEAK, *args, "--out", str(out), "--device", "cpu"],
        env={**os.environ, "PEAK_FILE": str(peak)},
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"featuremaps run failed:\n{r.stderr}")
    return int(peak.read_text()) / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--layers", default="stages")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"featuremaps run {args.model} --weights none --layers {args.layers}")
    print(f"{'images':>7} {'peak RSS MiB':>13} {'seconds':>8} {'images/s':>9}")
    peaks: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "images", max(args.counts))
        files = sorted((root / "images").iterdir())
        for n in args.counts:
            subset = root / f"set{n}"
            subset.mkdir()
            for f in files[:n]:
                (subset / f.name).symlink_to(f)
            mib, seconds = peak_run(args.model, args.layers, subset, root / f"out{n}")
            peaks.append(mib)
            print(f"{n:>7} {mib:>13.0f} {seconds:>8.1f} {n / seconds:>9.2f}", flush=True)
    growth = (peaks[-1] - peaks[0]) / peaks[0]
    print(
        f"peak for {args.counts[-1]} images vs {args.counts[0]}: {growth:+.1%} "
        f"(target: within 10 %) -> {'met' if abs(growth) <= 0.10 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
