"""Feature visualization: featuremaps.visualize against torch-lucent's render_vis.

1. Optimization steps per second at equal settings: the same model and weights, image
   size, number of steps, objective and transformations (Lucent's ``standard_transforms``
   with ``fixed_image_size``, so both models see size x size inputs; featuremaps' default
   ``Transforms``, the same distribution: pad 12, jitter 8+4, scale 0.9-1.1, rotation
   ±10°), both with a Fourier-space, decorrelated, sigmoid image and Adam at lr 0.05, on
   the same threads. The two sides alternate, ``--repeats`` times each; the medians count.
2. Wall time and peak memory of 64 channels of resnet18 ``layer3`` at 128 px and 256
   steps, one batch (random weights: the timing does not depend on them), in a fresh
   process so that its peak RSS is its own.

Lucent is optional: ``.venv/bin/pip install --no-deps torch-lucent "kornia==0.4.1"
decorator future tqdm`` (it is not a dependency of featuremaps). Without it the
comparison is skipped. Lucent imports IPython only to show pictures in notebooks; a
stand-in module is provided when IPython is absent.

Usage:
    .venv/bin/python benchmarks/bench_visualize.py            # everything, ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_visualize.py --quick    # fewer steps and repeats
    .venv/bin/python benchmarks/bench_visualize.py --only lucent   # or: batch
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

from bench_core import machine_line as machine

ROOT = Path(__file__).resolve().parents[1]
CLOCK = time.perf_counter
"""What the comparison times: elapsed time, or this process's CPU time (``--clock cpu``)."""


def import_lucent() -> Any:
    """Lucent's render, param, transform and objectives modules, or ``None``."""
    try:
        import IPython.display  # noqa: F401
    except ImportError:  # Lucent imports it at the top, only to show pictures
        ipython = types.ModuleType("IPython")
        display = types.ModuleType("IPython.display")
        ipython.display = display  # type: ignore[attr-defined]
        sys.modules.setdefault("IPython", ipython)
        sys.modules.setdefault("IPython.display", display)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from lucent.optvis import objectives, param, render, transform
    except ImportError as exc:
        print(f"Lucent not installed ({exc}); skipping the comparison.")
        return None
    return types.SimpleNamespace(
        render=render, param=param, transform=transform, objectives=objectives
    )


def lucent_layer(name: str) -> str:
    """Lucent names modules by joining their path with underscores."""
    return name.replace(".", "_")


def time_lucent(lucent: Any, model: torch.nn.Module, layer: str, channels: list[int],
                size: int, steps: int, seed: int) -> float:  # fmt: skip
    """Seconds for ``steps`` steps of Lucent's render_vis, one image per channel."""
    torch.manual_seed(seed)
    batch = len(channels)
    obj = None
    for i, c in enumerate(channels):
        term = lucent.objectives.channel(lucent_layer(layer), c, batch=i if batch > 1 else None)
        obj = term if obj is None else obj + term

    def param_f() -> Any:
        return lucent.param.image(size, batch=batch, fft=True, decorrelate=True)

    start = CLOCK()
    lucent.render.render_vis(
        model,
        obj,
        param_f,
        transforms=lucent.transform.standard_transforms,
        thresholds=(steps,),
        progress=False,
        show_image=False,
        fixed_image_size=size,
    )
    return CLOCK() - start


def time_featuremaps(loaded: Any, layer: str, channels: list[int], size: int, steps: int,
                     seed: int) -> tuple[float, Any]:  # fmt: skip
    from featuremaps import visualize

    objs = [f"channel:{layer}:{c}" for c in channels]
    start = CLOCK()
    vis = visualize(loaded, objs, steps=steps, size=size, seed=seed, device="cpu")
    return CLOCK() - start, vis


def compare(args: argparse.Namespace, report: dict[str, Any]) -> None:
    lucent = import_lucent()
    if lucent is None:
        report["lucent"] = "not installed"
        return
    from featuremaps import load_model

    cases = [
        ("resnet18", "none", "layer3", [0], 128),
        ("resnet18", "none", "layer3", list(range(8)), 128),
        ("efficientnet_lite0", "DEFAULT", "_blocks.10", [0], 224),
    ]
    steps = 12 if args.quick else 40
    repeats = 2 if args.quick else 3
    rows = []
    for spec, weights, layer, channels, size in cases:
        loaded = load_model(spec, weights)
        model = loaded.module.eval()
        # warm-up: allocator, kernels, Lucent's hooks and featuremaps' probe cache
        time_lucent(lucent, model, layer, channels, size, 2, 0)
        time_featuremaps(loaded, layer, channels, size, 2, 0)
        ours, theirs = [], []
        for r in range(repeats):
            pair = [("ours", r), ("lucent", r)]
            for side, _ in pair if r % 2 == 0 else pair[::-1]:
                if side == "ours":
                    took = time_featuremaps(loaded, layer, channels, size, steps, r)[0]
                    ours.append(steps / took)
                else:
                    took = time_lucent(lucent, model, layer, channels, size, steps, r)
                    theirs.append(steps / took)
        row = {
            "model": f"{spec} ({weights})",
            "objective": f"channel:{layer}:{channels[0]}"
            + (f"-{channels[-1]}" if len(channels) > 1 else ""),
            "batch": len(channels),
            "size": size,
            "steps": steps,
            "clock": args.clock,
            "featuremaps_steps_per_s": statistics.median(ours),
            "lucent_steps_per_s": statistics.median(theirs),
        }
        row["ratio"] = row["featuremaps_steps_per_s"] / row["lucent_steps_per_s"]
        rows.append(row)
        print(
            f"{row['model']:<34} {row['objective']:<22} batch {row['batch']:>2} {size:>3} px: "
            f"featuremaps {row['featuremaps_steps_per_s']:6.2f} steps/s, "
            f"Lucent {row['lucent_steps_per_s']:6.2f} steps/s, ratio {row['ratio']:.2f}x"
            f" ({args.clock} clock)",
            flush=True,
        )
    report["lucent"] = rows


def batch_child(steps: int, size: int, channels: int, threads: int) -> None:
    """In a fresh process: 64 channels of resnet18 layer3; prints one JSON line."""
    torch.set_num_threads(threads)
    from featuremaps import load_model, visualize

    loaded = load_model("resnet18", "none")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cpu0 = time.process_time()
    start = time.perf_counter()
    vis = visualize(
        loaded, f"channel:layer3:0-{channels - 1}", steps=steps, size=size, seed=0, device="cpu"
    )
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rises = sum(v.value > v.history[0] for v in vis)
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_rss": peak, "before_rss": base,
                      "rises": rises, "n": len(vis)}))  # fmt: skip


def batch(args: argparse.Namespace, report: dict[str, Any]) -> None:
    steps = 32 if args.quick else 256
    cmd = [sys.executable, __file__, "--child", str(steps), "128", "64", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row.update(steps=steps, size=128, channels=64)
    report["batch"] = row
    print(
        f"resnet18 layer3, 64 channels, 128 px, {steps} steps, one batch: "
        f"{row['wall_s']:.1f} s wall ({steps / row['wall_s']:.2f} steps/s, "
        f"{row['cpu_s'] / row['wall_s']:.2f} cores busy), peak RSS "
        f"{row['peak_rss'] / 2**20:.0f} MiB ({(row['peak_rss'] - row['before_rss']) / 2**20:.0f} "
        f"MiB above the loaded model); objective rose for {row['rises']}/{row['n']}",
        flush=True,
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        batch_child(*(int(v) for v in sys.argv[2:6]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    ap.add_argument("--only", choices=["lucent", "batch"], help="run one part")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--json", type=Path, help="write every figure to this file")
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="time the comparison in elapsed or CPU seconds (steadier on a busy machine)",
    )
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    load0 = os.getloadavg()[0]
    report: dict[str, Any] = {"machine": machine()}
    if args.only in (None, "lucent"):
        compare(args, report)
    if args.only in (None, "batch"):
        batch(args, report)
    load1 = os.getloadavg()[0]
    print(f"load average (1 min) before {load0:.2f}, after {load1:.2f} on {os.cpu_count()} cores")
    report["loadavg"] = [load0, load1]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
