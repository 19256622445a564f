"""Throughput of the atlas against a bare batched forward of the same model.

Both read the same images through the same DataLoader (same batch size, same worker
processes, same decoding and preprocessing); the bare loop only runs ``model(x)`` under
``torch.no_grad()``. It runs twice: as a user writes it (``x`` contiguous, the
issue's baseline) and with ``x`` made channels-last, the layout in which the atlas feeds
a CPU forward of a convolutional network (``featuremaps.atlas.batch.input_layout``):
the second is the baseline that measures the atlas's own overhead. The atlas figure is
its inference loop (capture, scores, top-K, statistics, PCA covariance, checkpoints); the
end-to-end figure adds the start-up and the crops, pages and basis written at the end.
The sides alternate (A, B, C, A, B, C, ...)
and the best of ``--repeat`` rounds is kept: other processes only ever slow a round down
(PyTorch's threads wait for each other on a busy machine), so the best round is the most
reproducible figure. The script says how busy the CPUs were with other work meanwhile;
``--wait-idle`` waits for a quiet machine first.

``--memory`` also builds the atlas in fresh processes over N and 4N images and prints
their peak resident memory, which should not grow with the number of images.

Usage:
    python benchmarks/bench_atlas.py [--images 256] [--batch-size 32] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_core import OtherLoad, machine, wait_for_idle
from featuremaps.atlas import Plan, batch_loader, build_atlas, dataset_paths, fixed_size
from featuremaps.models import LoadedModel, load_model


def make_images(root: Path, n: int, side: int = 320, seed: int = 0) -> None:
    """``n`` photo-like JPEGs (smooth waves plus noise) of ``side`` pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a, b, c = rng.uniform(0.5, 6.0, 3)
        base = np.stack([np.sin(a * xx * 6), np.cos(b * yy * 6), np.sin(c * (xx + yy) * 4)], -1)
        arr = (base * 90 + 128 + rng.normal(0, 20, (side, side, 3))).clip(0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(root / f"img{i:05d}.jpg", quality=90)


def bare_forward(
    model: LoadedModel, data: Path, batch_size: int, workers: int, channels_last: bool = False
) -> float:
    """Images per second of ``model(x)`` over the dataset, loaded as the atlas loads it."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    pp = fixed_size(model.preprocess)
    plan = Plan(tuple(dataset_paths(data)), batch_size)
    module = model.module.eval()
    n = 0
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batch_loader(plan, range(plan.n_batches), pp, workers):
            module(batch.x.contiguous(memory_format=layout))
            n += len(batch.ids)
    return n / (time.perf_counter() - start)


@contextmanager
def cpu_seconds() -> Iterator[list[float]]:
    """CPU time (user + system) of this process and its finished children meanwhile.

    DataLoader workers are children that end with their loader, so their decoding is
    counted. On a busy machine CPU time is a steadier measure of the work than wall time:
    other processes make wall time longer, not the work larger.
    """

    def now() -> float:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    spent = [0.0]
    start = now()
    try:
        yield spent
    finally:
        spent[0] = now() - start


def atlas_run(
    model: LoadedModel, data: Path, layers: str, out: Path, batch_size: int, workers: int
) -> tuple[float, float]:
    """Images per second of the atlas's inference loop, and end to end.

    Each run writes into a fresh folder, as a first run does; the folder is deleted
    afterwards, outside the timed part (re-running into the same folder adds the time
    to delete the previous run's crops, which the atlas does in a background thread),
    and the deletion is flushed to the disk before the next round: on this VM's ext4
    (mounted with ``discard``) an unflushed deletion of thousands of files made the
    files created in the next seconds take 10x longer.
    """
    out = Path(tempfile.mkdtemp(prefix="run", dir=out))
    start = time.perf_counter()
    r = build_atlas(model, data, layers, out, batch_size=batch_size, workers=workers)
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    os.sync()
    return r.images_per_second, r.images_total / seconds


def peak_memory(data: Path, layers: str, out: Path, batch_size: int, workers: int) -> float:
    """Peak resident memory (MiB) of a fresh process that builds the atlas."""
    code = (
        "import resource, warnings; warnings.simplefilter('ignore');"
        "from featuremaps.atlas import build_atlas;"
        f"build_atlas('resnet18', {str(data)!r}, {layers!r}, {str(out)!r}, weights='none',"
        f" batch_size={batch_size}, workers={workers}, restart=True);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(res.stdout.split()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--layers", default="layer3;layer4;stages", help="';'-separated layer sets")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--memory", action="store_true", help="also measure peak memory")
    ap.add_argument("--wait-idle", type=float, default=0.0, help="wait up to S seconds")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    info = machine()
    print(
        f"machine: {info['platform']}, {info['processor']}, {info['cpu_count']} CPUs, "
        f"Python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads)"
    )
    print(
        f"resnet18 (random weights), {args.images} JPEGs 320x320 -> resize 256, crop 224, "
        f"batch {args.batch_size}, {args.workers} DataLoader workers, best of {args.repeat}"
    )
    model = load_model("resnet18", weights="none")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images"
        make_images(data, args.images)
        if args.wait_idle:
            wait_for_idle(args.wait_idle)
        load = OtherLoad()
        bare_forward(model, data, args.batch_size, args.workers)  # warm up
        for layers in args.layers.split(";"):
            bare, fast, loop, e2e, cpu_bare, cpu_fast, cpu_atlas = [], [], [], [], [], [], []
            for _ in range(args.repeat):
                with cpu_seconds() as spent:
                    bare.append(bare_forward(model, data, args.batch_size, args.workers))
                cpu_bare.append(spent[0])
                with cpu_seconds() as spent:
                    fast.append(bare_forward(model, data, args.batch_size, args.workers, True))
                cpu_fast.append(spent[0])
                with cpu_seconds() as spent:
                    a, b = atlas_run(model, data, layers, Path(tmp), args.batch_size, args.workers)
                cpu_atlas.append(spent[0])
                loop.append(a)
                e2e.append(b)
            b_, f_, l_, e_ = max(bare), max(fast), max(loop), max(e2e)
            cb, cf, ca = min(cpu_bare), min(cpu_fast), min(cpu_atlas)
            print(
                f"--layers {layers:<8} bare forward {b_:6.1f} img/s, channels-last {f_:6.1f} "
                f"img/s | atlas loop {l_:6.1f} img/s ({l_ / b_:5.1%} of bare, {l_ / f_:5.1%} "
                f"of channels-last) | atlas end to end {e_:6.1f} img/s ({e_ / b_:5.1%}, "
                f"{e_ / f_:5.1%}) | CPU seconds: bare {cb:6.1f}, channels-last {cf:6.1f}, "
                f"atlas end to end {ca:6.1f}"
            )
        other = load.cores()
        if other is not None:
            print(f"(other processes kept {other:.2f} cores busy meanwhile)")
        if args.memory:
            big = Path(tmp) / "big"
            make_images(big, 4 * args.images, seed=1)
            for n, folder in ((args.images, data), (4 * args.images, big)):
                mib = peak_memory(
                    folder, "layer3", Path(tmp) / "mem", args.batch_size, args.workers
                )
                print(f"peak memory of the atlas, {n:5d} images: {mib:7.1f} MiB")


if __name__ == "__main__":
    main()
