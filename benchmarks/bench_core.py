"""Benchmark of featuremaps' core against the usual recipe (a script, not a timed test).

Run with ``make bench`` or ``.venv/bin/python benchmarks/bench_core.py [--quick]``; add
``--profile`` to see where featuremaps spends its time, ``--only grids`` or ``--only
capture`` for one comparison alone. Results and the machine they were measured on are in
``benchmarks/README.md``.

One 224x224 picture (the bundled cat photo) goes through VGG-11 and ResNet-50 with random
weights (nothing is downloaded). The activations of VGG-11 ``features.0,3,6,8,11,13,16,18``
and ResNet-50 ``conv1, layer1..layer4`` are captured once, then:

* grids: for every layer, featuremaps' ``render_grid`` + PNG save (as the pipeline saves:
  ``compress_level=3``) against one matplotlib axes per channel (``imshow`` viridis, axis
  off, ``savefig``, ``close``) with the Agg backend, 64 channels at most on both sides;
* PCA: ``pca_rgb`` / ``pca_basis`` on a seeded low-rank 256x112x112 map against
  ``sklearn.decomposition.PCA(n_components=3).fit_transform`` on the ``(H*W, C)`` matrix,
  checking that both find the same subspace;
* capture: ``capture(..., full_forward=True)`` against a bare ``model(x)`` under
  ``torch.no_grad()``, and the early-stopping capture of VGG-11 ``features.3`` against a
  full forward. capture keeps the layout decisions it made for a model and reuses them
  on same-shaped inputs; the first capture on a model makes them (a hook on every
  module) and is timed too, with what was kept cleared before each run.

Every timing is the median of several repeats after a warm-up; the sides of a comparison
are interleaved (A, B, A, B, ...) so that drift of the machine hits them alike. Other
processes on the machine spoil the figures (PyTorch's threads wait for each other), so
the script reports how busy the CPUs were with other work while it ran.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import math
import os
import platform
import pstats
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import PIL
import scipy.linalg
import sklearn
import torch
import torchvision
from PIL import Image
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA

from featuremaps import _files, render
from featuremaps.capture import capture, clear_cache
from featuremaps.images import load_image, preprocess, sample_image
from featuremaps.models import Preprocess
from featuremaps.reduce import (
    apply_scaling,
    compute_scaling,
    pca_basis,
    pca_rgb,
)

VGG_LAYERS = [f"features.{i}" for i in (0, 3, 6, 8, 11, 13, 16, 18)]
RESNET_LAYERS = ["conv1", "layer1", "layer2", "layer3", "layer4"]
ALL_CHANNELS_LAYER = ("vgg11", "features.11")  # 512 x 28 x 28: the largest 512-channel map
PCA_SHAPE = (256, 112, 112)
MAX_MAPS = 64
DPI = 100
PNG_KW: dict[str, Any] = {"optimize": False, "compress_level": 3}  # as pipeline._save

TARGETS = {
    "grids": 20.0,  # featuremaps at least 20x faster
    "pca": 5.0,  # at least 5x faster than sklearn
    "capture_overhead": 0.05,  # at most +5 % on a bare forward
    "early_stop": 0.5,  # well under half of a full forward
}
SAME_SUBSPACE_COS = 0.9999  # every |cos| between matching components at least this

Key = tuple[str, str]  # (model, layer)


# -- machine and timing ----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": cpu or "unknown",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "matplotlib": matplotlib.__version__,
        "sklearn": sklearn.__version__,
        "pillow": PIL.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }


def machine_line() -> str:
    """:func:`machine` in one line, with the memory: what every benchmark prints first."""
    m = machine()
    try:
        mem = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (OSError, ValueError):
        mem = "unknown memory"
    return (
        f"{m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, {mem}, "
        f"Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads)"
    )


class OtherLoad:
    """CPU time other processes used while the benchmark ran (Linux: ``/proc/stat``)."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as fh:
                fields = [int(v) for v in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz  # all but idle and iowait
        me = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), busy, me.ru_utime + me.ru_stime

    def cores(self) -> float | None:
        """Average number of cores busy with other processes since construction."""
        end = self._sample()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        other = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return max(0.0, other / wall) if wall > 0 else None


def wait_for_idle(limit_s: float, threshold: float = 0.15) -> float | None:
    """Wait (at most ``limit_s``) until other processes use under ``threshold`` cores."""
    start = time.perf_counter()
    said = -math.inf
    while True:
        probe = OtherLoad()
        time.sleep(2.0)
        busy = probe.cores()
        now = time.perf_counter()
        if busy is None or busy < threshold or now - start > limit_s:
            return busy
        if now - said >= 30:
            print(f"  waiting: other processes use {busy:.2f} cores", file=sys.stderr)
            said = now


CLOCK: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def _sources() -> dict[str, str]:
    """Where featuremaps was imported from and a hash of each benchmarked file.

    The package may be edited between runs; the hashes tell which version was measured.
    """
    import hashlib

    import featuremaps

    root = Path(featuremaps.__file__).parent
    out = {"package": str(root)}
    for name in ("capture.py", "layout.py", "reduce.py", "render.py", "_files.py"):
        out[name] = hashlib.sha256((root / name).read_bytes()).hexdigest()[:12]
    return out


def _blas_threads() -> dict[str, int]:
    """Threads of the numpy/scipy/sklearn native pools (BLAS, OpenMP)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {}
    return {
        f"{i['internal_api']} ({Path(i['filepath']).name.split('-')[0]})": i["num_threads"]
        for i in threadpool_info()
    }


def timed(fn: Callable[[], Any]) -> float:
    """Seconds of one call (wall or CPU clock), with the garbage collector off."""
    gc.collect()
    gc.disable()
    try:
        t0 = _clock()
        fn()
        return _clock() - t0
    finally:
        gc.enable()


def interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, alternate: bool = False
) -> dict[str, list[float]]:
    """Seconds of each function over ``repeats`` rounds (A, B, A, B, ...) after warm-up.

    With ``alternate``, every other round runs in reverse order (A B C, C B A, ...), so no
    function always follows the same one.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    items = list(fns.items())
    for i in range(repeats):
        for name, fn in items[::-1] if alternate and i % 2 else items:
            times[name].append(timed(fn))
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_s(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1.0 else f"{s:.2f} s"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


# -- setup -----------------------------------------------------------------------------------


def build_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    vgg = torchvision.models.vgg11(weights=None).eval()
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None).eval()
    return {"vgg11": vgg, "resnet50": resnet}


def input_batch() -> torch.Tensor:
    img = load_image(sample_image("cat"), draft_size=256)
    return preprocess(img, Preprocess())[None]  # (1, 3, 224, 224)


def capture_all(models: dict[str, torch.nn.Module], x: torch.Tensor) -> dict[Key, torch.Tensor]:
    """The activations every grid run uses, captured once: (model, layer) -> (C, H, W)."""
    maps: dict[Key, torch.Tensor] = {}
    for mname, layers in (("vgg11", VGG_LAYERS), ("resnet50", RESNET_LAYERS)):
        fm = capture(models[mname], x, layers)
        for layer in layers:
            maps[(mname, layer)] = fm[layer][0]
    return maps


# -- grids -----------------------------------------------------------------------------------


def grid_shape(k: int) -> tuple[int, int]:
    """Columns and rows, as render_grid lays them out (about square)."""
    ncols = max(1, math.ceil(math.sqrt(k)))
    return ncols, math.ceil(k / ncols)


def mpl_grid(fmap: torch.Tensor, path: Path, max_maps: int | None, figsize: Any) -> None:
    """The usual recipe: one matplotlib axes per channel, imshow, axis off, savefig."""
    arr = fmap.numpy()
    k = arr.shape[0] if max_maps is None else min(max_maps, arr.shape[0])
    ncols, nrows = grid_shape(k)
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < k:
            ax.imshow(arr[i], cmap="viridis")
        ax.axis("off")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def fm_grid(fmap: torch.Tensor, path: Path, max_maps: int | None, **kw: Any) -> None:
    """featuremaps: render the mosaic with numpy, save it as the pipeline does."""
    grid = render.render_grid(fmap, max_maps=max_maps, **kw)
    _files.save_image(grid.image, path, **PNG_KW)


def fm_inches(fmap: torch.Tensor, max_maps: int | None) -> tuple[float, float]:
    """featuremaps' picture size in inches at DPI (for a same-size matplotlib figure)."""
    img = render.render_grid(fmap, max_maps=max_maps).image
    return img.width / DPI, img.height / DPI


def bench_grids(
    maps: dict[Key, torch.Tensor], out: Path, repeats: int, fm_repeats: int
) -> dict[str, Any]:
    """Every layer in turn, per recipe; the total of a run is the sum over the layers."""
    same = {key: fm_inches(t, MAX_MAPS) for key, t in maps.items()}

    def name(prefix: str, key: Key) -> Path:
        return out / f"{prefix}_{key[0]}_{key[1]}.png"

    lay: dict[str, dict[Key, list[float]]] = {
        v: {k: [] for k in maps} for v in ("mpl_same", "mpl_8in", "render", "save", "colorbar")
    }
    # warm-up: matplotlib's first figure loads fonts and backends; numpy/PIL first calls
    small = min(maps, key=lambda k: maps[k].numel())
    mpl_grid(maps[small], name("mpl", small), MAX_MAPS, same[small])
    for key, t in maps.items():
        fm_grid(t, name("fm", key), MAX_MAPS)
    for r in range(max(repeats, fm_repeats)):
        for key, t in maps.items():
            if r < repeats:
                p = name("mpl", key)
                lay["mpl_same"][key].append(
                    timed(lambda t=t, p=p, k=key: mpl_grid(t, p, MAX_MAPS, same[k]))
                )
                p8 = name("mpl8", key)
                lay["mpl_8in"][key].append(
                    timed(lambda t=t, p=p8: mpl_grid(t, p, MAX_MAPS, (8, 8)))
                )
            holder: dict[str, Any] = {}

            def rnd(t: torch.Tensor = t, h: dict[str, Any] = holder) -> None:
                h["grid"] = render.render_grid(t, max_maps=MAX_MAPS)

            def save(p: Path = name("fm", key), h: dict[str, Any] = holder) -> None:
                _files.save_image(h["grid"].image, p, **PNG_KW)

            lay["render"][key].append(timed(rnd))
            lay["save"][key].append(timed(save))
            p = name("fmcb", key)
            lay["colorbar"][key].append(
                timed(lambda t=t, p=p: fm_grid(t, p, MAX_MAPS, colorbar=True))
            )

    def total(*variants: str) -> float:
        runs = len(lay[variants[0]][small])
        return med([sum(lay[v][k][i] for v in variants for k in maps) for i in range(runs)])

    per_layer = []
    for key, t in maps.items():
        img = render.render_grid(t, max_maps=MAX_MAPS).image
        per_layer.append(
            {
                "model": key[0],
                "layer": key[1],
                "shape": list(t.shape),
                "picture": list(img.size),
                "png_bytes": name("fm", key).stat().st_size,
                "mpl_png_bytes": name("mpl", key).stat().st_size,
                "mpl_s": med(lay["mpl_same"][key]),
                "mpl_8in_s": med(lay["mpl_8in"][key]),
                "render_s": med(lay["render"][key]),
                "save_s": med(lay["save"][key]),
            }
        )
    return {
        "mpl_same_size_s": total("mpl_same"),
        "mpl_8in_s": total("mpl_8in"),
        "fm_s": total("render", "save"),
        "fm_render_s": total("render"),
        "fm_save_s": total("save"),
        "fm_colorbar_s": total("colorbar"),
        "per_layer": per_layer,
        "repeats": {"matplotlib": repeats, "featuremaps": fm_repeats},
    }


def bench_all_channels(maps: dict[Key, torch.Tensor], out: Path, fm_repeats: int) -> dict[str, Any]:
    """One 512-channel layer with every channel drawn (matplotlib: 512 axes, one run)."""
    t = maps[ALL_CHANNELS_LAYER]
    size = fm_inches(t, None)
    mpl = timed(lambda: mpl_grid(t, out / "mpl_all.png", None, size))
    fm = interleaved({"fm": lambda: fm_grid(t, out / "fm_all.png", None)}, fm_repeats)
    return {
        "layer": "/".join(ALL_CHANNELS_LAYER),
        "shape": list(t.shape),
        "mpl_s": mpl,
        "fm_s": med(fm["fm"]),
    }


# -- PCA -------------------------------------------------------------------------------------


def synthetic_map(shape: tuple[int, int, int] = PCA_SHAPE, seed: int = 0) -> torch.Tensor:
    """A seeded ``(C, H, W)`` map: 8 smooth spatial patterns mixed into C channels + noise.

    The pattern strengths (8, 5, 3, 1.5, ...) leave clear gaps between the first three
    principal components, so "the same subspace" is well defined.
    """
    c, h, w = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    strengths = np.array([8.0, 5.0, 3.0, 1.5, 1.0, 0.8, 0.6, 0.5])
    patterns = []
    for _ in strengths:
        fx, fy = rng.uniform(0.5, 4.0, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        p = np.sin(2 * np.pi * (fx * xx + fy * yy) + phase).ravel()
        patterns.append((p - p.mean()) / p.std())
    spatial = np.stack(patterns, 1)  # (H*W, r)
    loadings = rng.standard_normal((len(strengths), c)) / np.sqrt(c)
    x = spatial @ (strengths[:, None] * loadings)  # (H*W, C)
    x += 0.05 * rng.standard_normal(x.shape) + rng.uniform(0, 1, size=c)
    return torch.from_numpy(np.ascontiguousarray(x.T.reshape(c, h, w), dtype=np.float32))


def sklearn_rgb(fmap: torch.Tensor, **pca_kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """The usual recipe: (H*W, C) matrix, PCA(3).fit_transform, each component min-max."""
    arr = fmap.numpy()
    c, h, w = arr.shape
    x = arr.reshape(c, -1).T
    pca = PCA(n_components=3, **pca_kw)
    y = pca.fit_transform(x)
    lo, hi = y.min(0), y.max(0)
    rgb = ((y - lo) / np.where(hi > lo, hi - lo, 1.0)).reshape(h, w, 3)
    return rgb, pca.components_


def subspace_check(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Per-component |cos| and the largest principal angle between two (K, C) bases."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    cos = np.abs(np.sum(a * b, axis=1))
    angle = float(np.degrees(subspace_angles(a.T, b.T).max()))
    return {"abs_cos": [float(v) for v in cos], "max_angle_deg": angle}


def rgb_difference(
    rgb_sk: np.ndarray, comps_sk: np.ndarray, rgb: np.ndarray, comps: np.ndarray
) -> float:
    """Largest difference of two PCA pictures once each component's sign is aligned."""
    signs = np.sign(np.sum(comps_sk * comps, axis=1))
    aligned = np.where(signs > 0, rgb_sk, 1.0 - rgb_sk)
    return float(np.abs(aligned - rgb).max())


def bench_pca_one(fmap: torch.Tensor, repeats: int, extra_solvers: bool) -> dict[str, Any]:
    fns: dict[str, Callable[[], Any]] = {
        "sklearn": lambda: sklearn_rgb(fmap),
        "pca_rgb": lambda: pca_rgb(fmap, 3),
        "pca_basis": lambda: pca_basis(fmap, 3),
    }
    solvers: dict[str, dict[str, Any]] = {}
    if extra_solvers:
        solvers = {"full": {"svd_solver": "full"}}
        solvers["randomized"] = {"svd_solver": "randomized", "random_state": 0}
        for s, kw in solvers.items():
            fns[f"sklearn_{s}"] = lambda kw=kw: sklearn_rgb(fmap, **kw)
    times = interleaved(fns, repeats)
    xmat = fmap.numpy().reshape(fmap.shape[0], -1).T
    ref = PCA(n_components=3).fit(xmat)
    basis = pca_basis(fmap, 3)
    check = subspace_check(ref.components_, basis.components)
    rgb_sk, comps_sk = sklearn_rgb(fmap)
    check["max_rgb_diff"] = rgb_difference(rgb_sk, comps_sk, pca_rgb(fmap, 3), basis.components)
    out: dict[str, Any] = {"shape": list(fmap.shape), "check": check}
    out.update({f"{k}_s": med(v) for k, v in times.items()})
    out["sklearn_solver"] = getattr(ref, "_fit_svd_solver", "?")
    for s, kw in solvers.items():
        p = PCA(n_components=3, **kw).fit(xmat)
        out[f"check_{s}"] = subspace_check(p.components_, basis.components)
    return out


def bench_pca(maps: dict[Key, torch.Tensor], repeats: int) -> dict[str, Any]:
    results = {"synthetic": bench_pca_one(synthetic_map(), repeats, extra_solvers=True)}
    for key in (("vgg11", "features.3"), ("resnet50", "layer1")):
        results["/".join(key)] = bench_pca_one(maps[key], repeats, extra_solvers=False)
    return results


# -- capture ---------------------------------------------------------------------------------


def bench_capture(
    models: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mname, layers in (("vgg11", VGG_LAYERS), ("resnet50", RESNET_LAYERS)):
        model = models[mname]

        def bare(model: torch.nn.Module = model) -> None:
            with torch.no_grad():
                model(x)

        def cap(model: torch.nn.Module = model, layers: list[str] = layers) -> None:
            capture(model, x, layers, full_forward=True)

        def first(model: torch.nn.Module = model, layers: list[str] = layers) -> None:
            clear_cache(model)  # as if never captured before
            capture(model, x, layers, full_forward=True)

        fns: dict[str, Callable[[], Any]] = {"bare": bare, "capture": cap, "first": first}
        if mname == "vgg11":
            fns["early_stop"] = lambda model=model: capture(model, x, "features.3")
        t = interleaved(fns, repeats, warmup=2, alternate=True)
        res: dict[str, Any] = {k: med(v) for k, v in t.items()}
        # The median of each round's ratio: a round's two runs share the machine's state.
        res["overhead"] = med([c / b for c, b in zip(t["capture"], t["bare"], strict=True)]) - 1
        res["overhead_medians"] = res["capture"] / res["bare"] - 1.0
        res["overhead_min"] = min(t["capture"]) / min(t["bare"]) - 1.0
        res["overhead_first"] = med([f / b for f, b in zip(t["first"], t["bare"], strict=True)]) - 1
        res["spread"] = {k: [min(v), max(v)] for k, v in t.items()}
        if "early_stop" in res:
            res["early_stop_ratio"] = res["early_stop"] / res["bare"]
            res["early_stop_stopped"] = capture(model, x, "features.3").stopped_early
        out[mname] = res
    return out


# -- profile (--profile) ---------------------------------------------------------------------


def print_profile(title: str, fn: Callable[[], Any], calls: int = 3, top: int = 10) -> None:
    """cProfile of ``fn``: the functions with the most own time, per call."""
    fn()
    prof = cProfile.Profile(timer=_clock)
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    entries = stats.stats  # type: ignore[attr-defined]
    for (file, line, func), (_, ncalls, tt, ct, _) in entries.items():
        where = f"{Path(file).name}:{line}" if line else "~"
        rows.append((tt / calls, ct / calls, ncalls // calls, f"{func} ({where})"))
    rows.sort(reverse=True)
    print_table(
        f"profile: {title} (per call, by own time)",
        ["own", "cumulative", "calls", "function"],
        [[fmt_s(a), fmt_s(b), str(n), f] for a, b, n, f in rows[:top]],
    )


def stage_table(title: str, stages: dict[str, Callable[[], Any]], repeats: int = 5) -> None:
    t = interleaved(stages, repeats)
    print_table(title, ["stage", "median"], [[k, fmt_s(med(v))] for k, v in t.items()])


def profile_render(maps: dict[Key, torch.Tensor], out: Path) -> None:
    key = ("vgg11", "features.0")
    t = maps[key]
    arr = t.numpy()
    print(f"\n=== render_grid + save on {key[0]} {key[1]} {tuple(t.shape)} ===")
    print_profile("render_grid(max_maps=64) + save_image", lambda: fm_grid(t, out / "p.png", 64))
    m = arr[:MAX_MAPS]
    s = compute_scaling(m)
    scaled = apply_scaling(m, s)
    img = render.render_grid(t, max_maps=MAX_MAPS).image
    rgb = img.convert("RGB")

    def png(im: Image.Image, **kw: Any) -> Callable[[], None]:
        return lambda: im.save(io.BytesIO(), format="PNG", **kw)

    stage_table(
        f"stages of render_grid + save ({img.width}x{img.height} {img.mode} picture)",
        {
            "compute_scaling (float32 min/max)": lambda: compute_scaling(m),
            "apply_scaling (float32)": lambda: apply_scaling(m, s),
            "level_index (to uint8 levels)": lambda: render.level_index(scaled),
            "render_grid total": lambda: render.render_grid(t, max_maps=MAX_MAPS),
            "render_grid, labels + colorbar": lambda: render.render_grid(
                t, max_maps=MAX_MAPS, labels=True, colorbar=True
            ),
            "PNG palette compress_level=3 (pipeline)": png(img, **PNG_KW),
            "PNG palette compress_level=1": png(img, optimize=False, compress_level=1),
            "PNG RGB compress_level=3 (before: RGB grids)": png(rgb, **PNG_KW),
        },
    )
    fm = interleaved(
        {"featuremaps": lambda: [fm_grid(v, out / "a.png", 64) for v in maps.values()]}, 3
    )
    print(f"  all 13 layers: featuremaps {fmt_s(med(fm['featuremaps']))}")


def subsampled_rgb(fmap: torch.Tensor, step: int) -> tuple[np.ndarray, np.ndarray]:
    """What fitting on a pixel grid would give: basis from every ``step``-th row and column,
    every pixel projected. Not what ``pca_rgb`` does (it fits on every pixel)."""
    basis = pca_basis(fmap[:, ::step, ::step], 3)
    y = basis.project(fmap)
    lo, hi = y.min((0, 1)), y.max((0, 1))
    return (y - lo) / np.where(hi > lo, hi - lo, 1.0), basis.components


def profile_pca() -> None:
    fmap = synthetic_map()
    c = fmap.shape[0]
    print(f"\n=== pca_rgb on the synthetic map {tuple(fmap.shape)} ===")
    print_profile("pca_rgb(fmap, 3)", lambda: pca_rgb(fmap, 3))
    xn = fmap.numpy().reshape(c, -1)
    n = xn.shape[1]
    mean = xn.sum(1, dtype=np.float64) / n
    cov = (xn @ xn.T - n * np.outer(mean, mean)) / (n - 1)
    basis = pca_basis(fmap, 3)
    w = basis.components.astype(np.float32)
    stage_table(
        "stages of pca_rgb (fit on the (C, H*W) view, top-3 eigh, one projection)",
        {
            "channel sums (float64 accumulation)": lambda: xn.sum(1, dtype=np.float64),
            "scatter x @ x.T (float32, BLAS syrk)": lambda: xn @ xn.T,
            "top-3 eigh of the 256x256 covariance (scipy)": lambda: scipy.linalg.eigh(
                cov, subset_by_index=[c - 3, c - 1]
            ),
            "full eigh of the covariance (numpy)": lambda: np.linalg.eigh(cov),
            "projection w @ x (3 x 256 x 12544)": lambda: w @ xn,
            "pca_basis total": lambda: pca_basis(fmap, 3),
            "pca_rgb total": lambda: pca_rgb(fmap, 3),
            "sklearn recipe (default solver)": lambda: sklearn_rgb(fmap),
            "not featuremaps: fit on every 2nd row/column": lambda: subsampled_rgb(fmap, 2),
            "not featuremaps: fit on every 4th row/column": lambda: subsampled_rgb(fmap, 4),
        },
        repeats=7,
    )
    rgb_sk, comps_sk = sklearn_rgb(fmap)
    for step in (2, 4):
        rgb, comps = subsampled_rgb(fmap, step)
        chk = subspace_check(comps_sk, comps)
        print(
            f"  fit on 1 in {step} rows and columns: |cos| "
            f"{' '.join(f'{v:.6f}' for v in chk['abs_cos'])}, max angle "
            f"{chk['max_angle_deg']:.2g}°, picture differs from sklearn's by at most "
            f"{rgb_difference(rgb_sk, comps_sk, rgb, comps):.2g}"
        )


def hooked_forward(
    model: torch.nn.Module, x: torch.Tensor, layers: list[str], copy: bool, kept: list[Any]
) -> Callable[[], None]:
    """A forward with plain hooks on ``layers`` that keep the output (cloned or not)."""
    modules = dict(model.named_modules())

    def hook(module: Any, inputs: Any, output: Any) -> None:
        kept.append(output.detach().clone() if copy else output)

    def go() -> None:
        kept.clear()
        handles = [modules[n].register_forward_hook(hook) for n in layers]
        try:
            with torch.no_grad():
                model(x)
        finally:
            for h in handles:
                h.remove()

    return go


def profile_capture(models: dict[str, torch.nn.Module], x: torch.Tensor) -> None:
    for mname, layers in (("vgg11", VGG_LAYERS), ("resnet50", RESNET_LAYERS)):
        model = models[mname]
        print(f"\n=== capture on {mname}, {len(layers)} layers, full forward ===")

        def cap(model: torch.nn.Module = model, layers: list[str] = layers) -> None:
            capture(model, x, layers, full_forward=True)

        def bare(model: torch.nn.Module = model) -> None:
            with torch.no_grad():
                model(x)

        print_profile("capture(full_forward=True)", cap, top=8)
        kept: list[torch.Tensor] = []
        hooked_forward(model, x, layers, True, kept)()
        mb = sum(t.numel() * t.element_size() for t in kept) / 2**20
        stage_table(
            f"where capture's overhead goes ({mb:.1f} MiB of maps copied)",
            {
                "bare forward": bare,
                "forward + no-op hooks": hooked_forward(model, x, layers, False, []),
                "forward + hooks that clone": hooked_forward(model, x, layers, True, []),
                "capture(full_forward=True)": cap,
            },
            repeats=9,
        )


# -- report ----------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report_grids(res: dict[str, Any]) -> float:
    """Print the grid tables; the speed-up over matplotlib on all 13 layers."""
    g = res["grids"]
    rows = []
    for r in g["per_layer"]:
        fm = r["render_s"] + r["save_s"]
        rows.append(
            [
                f"{r['model']} {r['layer']}",
                "x".join(map(str, r["shape"])),
                "x".join(map(str, r["picture"])),
                fmt_s(r["mpl_s"]),
                fmt_s(r["render_s"]),
                fmt_s(r["save_s"]),
                f"{r['mpl_s'] / fm:.1f}x",
            ]
        )
    print_table(
        f"Grids per layer ({MAX_MAPS} channels at most; matplotlib figure as large as the "
        "featuremaps picture)",
        ["layer", "map", "picture", "matplotlib", "fm render", "fm save", "speed-up"],
        rows,
    )
    base = g["mpl_same_size_s"]
    rows = [
        ["matplotlib, figure as large as featuremaps' picture", fmt_s(base), "1.0x"],
        ["matplotlib, figsize 8x8 in (800x800 px)", fmt_s(g["mpl_8in_s"]), ""],
        [
            "featuremaps render_grid + save_image",
            fmt_s(g["fm_s"]),
            f"{base / g['fm_s']:.1f}x",
        ],
        ["  of which render_grid", fmt_s(g["fm_render_s"]), ""],
        ["  of which PNG save", fmt_s(g["fm_save_s"]), ""],
        [
            "featuremaps with colorbar=True (pipeline default)",
            fmt_s(g["fm_colorbar_s"]),
            f"{base / g['fm_colorbar_s']:.1f}x",
        ],
    ]
    if "all_channels" in res:
        a = res["all_channels"]
        what = f"all {a['shape'][0]} channels of {a['layer']}"
        rows.append([f"{what}: matplotlib (1 run)", fmt_s(a["mpl_s"]), "1.0x"])
        rows.append([f"{what}: featuremaps", fmt_s(a["fm_s"]), f"{a['mpl_s'] / a['fm_s']:.1f}x"])
    print_table("Grids, all 13 layers rendered and saved", ["recipe", "total", "speed-up"], rows)
    return float(base / g["fm_s"])


def report_capture(c: dict[str, Any]) -> list[list[str]]:
    """Print the capture table; return its rows of the targets table."""
    rows = []
    for name, r in c.items():
        rows.append(
            [
                name,
                fmt_s(r["bare"]),
                fmt_s(r["capture"]),
                f"{100 * r['overhead']:+.1f} %",
                f"{100 * r['overhead_medians']:+.1f} %",
                f"{100 * r['overhead_min']:+.1f} %",
                f"{fmt_s(r['first'])} ({100 * r['overhead_first']:+.1f} %)",
            ]
        )
    print_table(
        "Capture (full_forward=True) vs bare forward, 1x3x224x224",
        [
            "model",
            "bare forward",
            "capture",
            "overhead",
            "(of the medians)",
            "(of the minima)",
            "first capture",
        ],
        rows,
    )
    v = c["vgg11"]
    print(
        f"  VGG-11 features.3 with early stop: {fmt_s(v['early_stop'])} = "
        f"{v['early_stop_ratio']:.2f} of a full forward (stopped early: "
        f"{v['early_stop_stopped']})"
    )
    print(
        "  first capture: the first on a model or input shape, which decides the layouts "
        "with a hook on every module (later ones reuse the decisions)"
    )
    worst = max(r["overhead"] for r in c.values())
    return [
        [
            "capture adds <= 5 % to a bare forward",
            f"worst {100 * worst:+.1f} %",
            verdict(worst <= TARGETS["capture_overhead"]),
        ],
        [
            "VGG-11 features.3 well under 1/2 of a forward",
            f"{v['early_stop_ratio']:.2f}",
            verdict(v["early_stop_ratio"] < TARGETS["early_stop"]),
        ],
    ]


def report(res: dict[str, Any]) -> None:
    print("\nMachine")
    for k, v in res["machine"].items():
        print(f"  {k}: {v}")
    print(f"  clock: {res['clock']}")
    print("  featuremaps: " + ", ".join(f"{k} {v}" for k, v in res["sources"].items()))
    other = res.get("other_load_cores")
    if other is not None:
        print(f"  other processes kept {other:.2f} of {os.cpu_count()} cores busy during the run")
        if other > 0.1 and res["clock"] == "wall":
            print(
                "  WARNING: the machine was not idle; these wall-clock timings are not "
                "reliable (try --threads 1 --clock cpu, or --wait-idle SECONDS)"
            )

    rows = []
    if "grids" in res:
        grid_x = report_grids(res)
        rows.append(
            ["grids rendered + saved >= 20x faster", f"{grid_x:.1f}x", verdict(grid_x >= 20)]
        )
    if "pca" in res:
        rows += report_pca(res["pca"])
    if "capture" in res:
        rows += report_capture(res["capture"])
    print_table("Targets", ["target", "measured", "verdict"], rows)


def report_pca(pca: dict[str, Any]) -> list[list[str]]:
    """Print the PCA table; return its rows of the targets table."""
    rows = []
    for name, p in pca.items():
        c = p["check"]
        rows.append(
            [
                f"{name} {'x'.join(map(str, p['shape']))}",
                fmt_s(p["sklearn_s"]),
                fmt_s(p["pca_rgb_s"]),
                fmt_s(p["pca_basis_s"]),
                f"{p['sklearn_s'] / p['pca_rgb_s']:.2f}x",
                " ".join(f"{v:.6f}" for v in c["abs_cos"]),
                f"{c['max_angle_deg']:.1g}",
            ]
        )
    print_table(
        "PCA, 3 components: sklearn PCA(3).fit_transform + min-max vs pca_rgb",
        ["map", "sklearn", "pca_rgb", "pca_basis", "speed-up", "|cos| per comp", "angle°"],
        rows,
    )
    s = pca["synthetic"]
    print(f"  sklearn {sklearn.__version__} picked svd_solver={s['sklearn_solver']!r} (auto)")
    for solver in ("full", "randomized"):
        t = s[f"sklearn_{solver}_s"]
        print(
            f"  svd_solver={solver!r}: {fmt_s(t)} ({t / s['pca_rgb_s']:.2f}x pca_rgb), "
            f"max angle to pca_basis {s[f'check_{solver}']['max_angle_deg']:.1g}°"
        )
    diff = s["check"]["max_rgb_diff"]
    print(f"  largest difference of the two RGB pictures (signs aligned): {diff:.1g}")
    same = min(s["check"]["abs_cos"]) >= SAME_SUBSPACE_COS
    target = [
        [
            f"PCA 256x112x112 >= 5x faster than sklearn ({s['sklearn_solver']}), same subspace",
            f"{s['sklearn_s'] / s['pca_rgb_s']:.2f}x, min |cos| {min(s['check']['abs_cos']):.6f}",
            verdict(s["sklearn_s"] / s["pca_rgb_s"] >= TARGETS["pca"] and same),
        ]
    ]
    for solver in ("full", "randomized"):
        x = s[f"sklearn_{solver}_s"] / s["pca_rgb_s"]
        target.append(
            [f"  the same against svd_solver={solver!r}", f"{x:.2f}x", verdict(x >= TARGETS["pca"])]
        )
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a rough check)")
    ap.add_argument("--profile", action="store_true", help="only profile featuremaps' parts")
    ap.add_argument(
        "--only",
        choices=["grids", "pca", "capture"],
        help="run this comparison alone (with --profile: profile it)",
    )
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    ap.add_argument("--keep", type=Path, help="keep the pictures in this folder")
    ap.add_argument(
        "--skip-all-channels", action="store_true", help="skip the 512-channel matplotlib run"
    )
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for other processes to leave the CPUs idle",
    )
    ap.add_argument(
        "--clock",
        choices=sorted(CLOCK),
        default="wall",
        help="wall: elapsed time (default); cpu: CPU time of this process, steadier on a "
        "shared machine when used with --threads 1",
    )
    args = ap.parse_args(argv)
    global _clock
    _clock = CLOCK[args.clock]
    if args.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        _limits = threadpool_limits(args.threads)  # numpy/scipy BLAS and OpenMP pools
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)
    rep = (
        {"grid_mpl": 1, "grid_fm": 3, "pca": 3, "capture": 5}
        if args.quick
        else {"grid_mpl": 3, "grid_fm": 7, "pca": 11, "capture": 41}
    )
    load = OtherLoad()
    t_start = time.perf_counter()
    models = build_models()
    x = input_batch()
    parts = {args.only} if args.only else {"grids", "pca", "capture"}
    maps = capture_all(models, x) if parts & {"grids", "pca"} else {}
    res: dict[str, Any] = {"machine": machine(), "quick": args.quick, "repeats": rep}
    res["clock"] = args.clock
    res["machine"]["native_threads"] = _blas_threads()
    res["sources"] = _sources()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        if args.profile:
            if "grids" in parts:
                profile_render(maps, out)
            if "pca" in parts:
                profile_pca()
            if "capture" in parts:
                profile_capture(models, x)
            other = load.cores()
            if other is not None:
                print(f"\n(other processes kept {other:.2f} cores busy during the profile)")
            return 0
        mode = "quick" if args.quick else "full"
        print(f"featuremaps core benchmark ({mode}, a few minutes) ...", file=sys.stderr)
        if "capture" in parts:
            print("  capture ...", file=sys.stderr)
            res["capture"] = bench_capture(models, x, rep["capture"])
        if "pca" in parts:
            print("  PCA ...", file=sys.stderr)
            res["pca"] = bench_pca(maps, rep["pca"])
        if "grids" in parts:
            print("  grids ...", file=sys.stderr)
            res["grids"] = bench_grids(maps, out, rep["grid_mpl"], rep["grid_fm"])
        if "grids" in parts and not args.skip_all_channels:
            print("  grids, all channels ...", file=sys.stderr)
            res["all_channels"] = bench_all_channels(maps, out, rep["grid_fm"])
    res["wall_s"] = time.perf_counter() - t_start
    res["other_load_cores"] = load.cores()
    report(res)
    print(f"\n(benchmark wall time {res['wall_s']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
