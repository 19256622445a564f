"""Start-up benchmark (issue 16): whole processes, timed from outside (not a test).

Run with ``.venv/bin/python benchmarks/bench_start.py [--repeats N] [--json FILE]``.
Results and the machine they were measured on are in ``benchmarks/README.md``.

Each figure is the wall-clock time of a fresh process, from start to exit:

* ``featuremaps --help`` and ``python -c "import featuremaps"``;
* ``featuremaps run vgg11 PHOTO --weights none --layers features.0,...,features.18
  --max-maps 64 --out DIR`` against ``python benchmarks/article_pipeline.py PHOTO DIR``,
  the article's notebook recipe as a script doing the same work (random VGG-11, eight
  layers captured, one 8x8 grid picture per layer, a PCA panel). PHOTO is the bundled
  cat photo.

The compared commands are interleaved (A, B, A, B, ...) so that drift of the machine hits
them alike; the best and the median of the repeats are printed, with the CPU time the
processes used and how busy the CPUs were with other work meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import OtherLoad, machine_line
from featuremaps.images import sample_image

HERE = Path(__file__).resolve().parent
VGG_LAYERS = ",".join(f"features.{i}" for i in (0, 3, 6, 8, 11, 13, 16, 18))
TARGETS = {"help_s": 1.0, "run_speedup": 3.0}  # --help well under 1 s; run at least 3x


class ChildrenLoad(OtherLoad):
    """:class:`OtherLoad` that counts the benchmarked child processes as this benchmark."""

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        sample = OtherLoad._sample()
        if sample is None:
            return None
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return sample[0], sample[1], sample[2] + kids.ru_utime + kids.ru_stime


def featuremaps_command() -> list[str]:
    """The installed ``featuremaps`` script beside this Python, else ``python -m``."""
    script = Path(sys.executable).parent / "featuremaps"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "featuremaps"]


def timed(argv: list[str], out_dir: Path | None = None) -> tuple[float, float]:
    """Run ``argv`` once: (wall seconds, CPU seconds of the process and its children)."""
    if out_dir is not None:
        shutil.rmtree(out_dir, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def summary(runs: list[tuple[float, float]]) -> dict[str, float]:
    walls = [w for w, _ in runs]
    return {
        "best_s": min(walls),
        "median_s": statistics.median(walls),
        "cpu_median_s": statistics.median(c for _, c in runs),
        "n": len(runs),
    }


def compare(cases: dict[str, tuple[list[str], Path | None]], repeats: int) -> dict[str, Any]:
    """Interleaved runs of each case (one warm-up round first, not counted)."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for round_ in range(repeats + 1):
        order = list(cases) if round_ % 2 == 0 else list(reversed(cases))
        for name in order:
            argv, out_dir = cases[name]
            result = timed(argv, out_dir)
            if round_ > 0:
                runs[name].append(result)
    return {name: summary(r) for name, r in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each command")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    fm = featuremaps_command()
    photo = sample_image("cat")
    work = Path(tempfile.mkdtemp(prefix="bench-start-"))
    print(machine_line())
    load = ChildrenLoad()
    try:
        small = compare(
            {
                "featuremaps --help": ([*fm, "--help"], None),
                "featuremaps run --help": ([*fm, "run", "--help"], None),
                "import featuremaps": ([sys.executable, "-c", "import featuremaps"], None),
            },
            args.repeats,
        )
        run_dir, article_dir = work / "featuremaps", work / "article"
        big = compare(
            {
                "featuremaps run": (
                    [
                        *fm,
                        "run",
                        "vgg11",
                        str(photo),
                        "--weights",
                        "none",
                        "--layers",
                        VGG_LAYERS,
                        "--max-maps",
                        "64",
                        "--out",
                        str(run_dir),
                    ],
                    run_dir,
                ),
                "article pipeline": (
                    [
                        sys.executable,
                        str(HERE / "article_pipeline.py"),
                        str(photo),
                        str(article_dir),
                    ],
                    article_dir,
                ),
            },
            args.repeats,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    other = load.cores()

    figures = {**small, **big}
    width = max(map(len, figures))
    print(f"{'':<{width}}  {'best':>7}  {'median':>7}  {'CPU (median)':>12}")
    for name, f in figures.items():
        print(
            f"{name:<{width}}  {f['best_s']:6.2f}s  {f['median_s']:6.2f}s  "
            f"{f['cpu_median_s']:11.2f}s"
        )
    fm_run, article = big["featuremaps run"], big["article pipeline"]
    speedup = {
        "median": article["median_s"] / fm_run["median_s"],
        "best": article["best_s"] / fm_run["best_s"],
        "cpu": article["cpu_median_s"] / fm_run["cpu_median_s"],
    }
    help_ok = small["featuremaps --help"]["median_s"] < TARGETS["help_s"]
    run_ok = speedup["median"] >= TARGETS["run_speedup"]
    print(
        f"run vs article: {speedup['median']:.2f}x faster (medians), {speedup['best']:.2f}x "
        f"(best), {speedup['cpu']:.2f}x less CPU; target >= {TARGETS['run_speedup']:g}x: "
        f"{'met' if run_ok else 'NOT met'}"
    )
    print(
        f"--help median {small['featuremaps --help']['median_s']:.2f} s; target well under "
        f"{TARGETS['help_s']:g} s: {'met' if help_ok else 'NOT met'}"
    )
    if other is not None:
        warn = "  (busy machine: figures are noisy)" if other > 0.1 else ""
        print(f"other processes used {other:.2f} cores on average meanwhile{warn}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine_line(),
                    "figures": figures,
                    "speedup": speedup,
                    "targets": TARGETS,
                    "other_load_cores": other,
                    "cpu_count": os.cpu_count(),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
