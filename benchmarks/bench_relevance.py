"""Benchmark of featuremaps.relevance against a bare forward (a script, not a timed test).

Run with ``.venv/bin/python benchmarks/bench_relevance.py [--repeats N] [--size S]``.
Results and the machine they were measured on are in ``benchmarks/README.md``.

ResNet-50 with random weights (nothing is downloaded) on the bundled cat photo, one image.
Timed, interleaved (A, B, C, A, B, C, ...) so that drift of the machine hits every side
alike, median of ``--repeats`` rounds after a warm-up:

* ``bare``: ``model(x)`` under ``torch.no_grad()``;
* ``relevance``: ``relevance(model, x, "stages")`` (top-1 target): one forward with the
  graph, one backward to the five stage outputs, gradient x activation, channel
  relevance, Grad-CAM and LayerCAM, everything copied to the CPU;
* ``first``: the same on a copy of the model, with what capture keeps for it cleared
  first (the ``stages`` preset then takes a probing forward, and the layout tracker
  hooks every module);
* ``first-names``: the same first call with the five layers named instead of the preset
  (no probing forward; the tracker still hooks every module once);
* ``fwd+bwd``: a plain forward with the graph and ``torch.autograd.grad`` of the top-1
  logit with respect to the input, for scale.

Peak memory (``ru_maxrss``) is measured in a fresh process per side, after loading the
model and the image, so both carry the same baseline.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import featuremaps as fm
from bench_core import machine_line as machine
from featuremaps.capture import clear_cache

LAYERS = "stages"
NAMES = "relu,layer1,layer2,layer3,layer4"
"""What ``stages`` gives for ResNet-50, named: no probing forward is needed."""


def setup(size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    loaded = fm.load_model("resnet50", "none")  # random weights
    model = loaded.module.eval()
    x = fm.preprocess(fm.load_image(fm.sample_image("cat")), loaded.preprocess)[None]
    if size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear")
    return model, x


def sides(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    cold = copy.deepcopy(model)  # the first-call sides clear what is kept for this copy only

    def bare() -> object:
        with torch.no_grad():
            return model(x)

    def rel() -> object:
        return fm.relevance(model, x, LAYERS)

    def first() -> object:
        clear_cache(cold)
        return fm.relevance(cold, x, LAYERS)

    def first_names() -> object:
        clear_cache(cold)
        return fm.relevance(cold, x, NAMES)

    def fwd_bwd() -> object:
        inp = x.detach().requires_grad_(True)
        out = model(inp)
        return torch.autograd.grad(out.max(1).values.sum(), inp)

    return {
        "bare": bare,
        "relevance": rel,
        "first": first,
        "first-names": first_names,
        "fwd+bwd": fwd_bwd,
    }


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def child(side: str, size: int) -> None:
    """Print the resident size after loading and the peak while ``side`` runs (MiB).

    Building the model peaks higher than running it, so the high-water mark is reset
    (``/proc/self/clear_refs``) after loading; where that fails, ``ru_maxrss``.
    """
    model, x = setup(size)
    run = sides(model, x)[side]  # (the copy for the first-call sides is made here)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base, field = _status_mib("VmRSS"), "VmHWM"
    except OSError:
        base, field = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, ""
    run()
    if field:
        peak = _status_mib(field)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{base:.1f} {peak:.1f}")


def peak_memory(side: str, size: int) -> tuple[float, float]:
    args = [sys.executable, __file__, "--child", side, "--size", str(size)]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    base, peak = (float(v) for v in done.stdout.split())
    return base, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--child", choices=["bare", "relevance", "first", "first-names", "fwd+bwd"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # steadier figures on a busy machine
    if args.child:
        child(args.child, args.size)
        return
    print(f"machine: {machine()}")
    model, x = setup(args.size)
    fns = sides(model, x)
    r = fm.relevance(model, x, LAYERS)
    print(f"layers: {', '.join(r)}; target: {r.targets[0]}")
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    load_after = os.getloadavg()[0]
    print(f"input {tuple(x.shape)}, median of {args.repeats} interleaved rounds")
    print(f"load average (1 min) before/after: {load_before:.2f} / {load_after:.2f}")
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = statistics.median(t / b for t, b in zip(ts, times["bare"], strict=True))
        low = min(ts) * 1e3
        print(f"{name:>10}: {med * 1e3:8.1f} ms  ({ratio:.2f}x bare, paired; min {low:.1f} ms)")
    for side in ("bare", "relevance", "first", "first-names", "fwd+bwd"):
        base, peak = peak_memory(side, args.size)
        grow = peak - base
        print(f"peak RSS {side:>10}: {peak:7.1f} MiB (after loading {base:.1f} MiB: +{grow:.1f})")


if __name__ == "__main__":
    main()
