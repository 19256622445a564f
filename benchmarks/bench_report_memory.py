"""Peak memory of ``featuremaps report`` against the number of images.

The report keeps one image's maps at a time and only the small embedded data of the others
(issue 9, item 5), and writes the page in pieces. Each measurement runs in a fresh process
and reads its peak resident set size (``ru_maxrss``); the same images are also built the
old way, holding every image's maps until the end and the page as one string, for
comparison.

    .venv/bin/python benchmarks/bench_report_memory.py            # 10 and 60 images
    .venv/bin/python benchmarks/bench_report_memory.py --counts 20 200 --modes stream

Model: torchvision ResNet-18 with random weights (nothing downloaded), layers ``stages``,
64 channels per layer, the two bundled photos alternating.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_core import machine_line as machine

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from featuremaps import load_model
from featuremaps.pipeline import analyze
from featuremaps.report import ReportBuilder, ReportOptions, write_report

mode, folder, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
paths = sorted(folder.iterdir())
model = load_model("resnet18", "none")
start = time.perf_counter()
if mode == "stream":  # what `featuremaps report` does
    write_report(out, model, paths, "stages", max_channels=64, device="cpu")
else:  # every image's maps held until the end, and the page built as one string, as before
    results = analyze(model, paths, "stages", device="cpu")
    builder = ReportBuilder(model, ReportOptions(max_channels=64))
    for res in results:
        builder.add(res)
    out.write_text(builder.html(), encoding="utf-8")
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
print(json.dumps({"peak_bytes": peak, "html_bytes": out.stat().st_size, "seconds": seconds}))
"""


def measure(mode: str, n: int, work: Path) -> dict[str, float]:
    from featuremaps import sample_image

    folder = work / f"images-{n}"
    if not folder.exists():
        folder.mkdir()
        photos = [sample_image("cat"), sample_image("coffee")]
        for i in range(n):
            shutil.copy(photos[i % 2], folder / f"img{i:04d}.jpg")
    out = work / f"{mode}-{n}.html"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(folder), str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[10, 60])
    ap.add_argument("--modes", nargs="+", default=["stream", "held"])
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'mode':8s} {'images':>6s} {'peak RSS':>10s} {'HTML':>9s} {'time':>8s}")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            for n in args.counts:
                r = measure(mode, n, Path(tmp))
                print(
                    f"{mode:8s} {n:6d} {r['peak_bytes'] / 2**20:8.0f} MB "
                    f"{r['html_bytes'] / 2**20:6.1f} MB {r['seconds']:7.1f} s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
