"""Throughput of ``compare`` (CKA of two models) against the two bare forwards.

Both sides read the same images through the same DataLoader (same batch size, worker
processes, decoding and preprocessing). The bare loop runs ``model_a(x)`` and
``model_b(x)`` under ``torch.no_grad()``; the compare figure is
:func:`featuremaps.compare.compare_models`'s pass over the data (both captures, the
features, the Gram matrices, the HSIC sums). Models: resnet18 with random weights
against resnet18 with other random weights from a weight file, layers ``stages`` (five
maps, up to 64x112x112 = 802,816 features per image) unless told otherwise. The two sides
alternate and the best of ``--repeat`` rounds is kept (other processes only slow a round
down); the script says how busy the CPUs were with other work meanwhile.

``--memory`` runs compare in fresh processes (decoding in-process) over N and 4N images
and prints their peak resident memory, which should not grow with the number of images.

Usage:
    python benchmarks/bench_compare.py [--images 64] [--batch-size 32] [--workers 2] [--memory]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torchvision

from bench_atlas import make_images
from bench_core import OtherLoad, machine, wait_for_idle
from featuremaps.atlas import dataset_paths, fixed_size
from featuremaps.compare import compare_models
from featuremaps.compare.batches import n_batches
from featuremaps.compare.local import decoded_batches
from featuremaps.models import LoadedModel, load_model


def bare_forwards(
    a: LoadedModel, b: LoadedModel, data: Path, batch_size: int, workers: int
) -> float:
    """Images per second of both models' plain forwards, loaded as compare loads them."""
    pa, pb = fixed_size(a.preprocess), fixed_size(b.preprocess)
    paths = dataset_paths(data)
    pending = range(n_batches(paths, batch_size))
    loader = decoded_batches(paths, batch_size, pending, (pa, pb), workers)  # as compare's
    n = 0
    start = time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            a.module(batch.xa)
            b.module(batch.xa if batch.xb is None else batch.xb)
            n += len(batch.ids)
    return n / (time.perf_counter() - start)


def compare_run(
    a: LoadedModel, b: LoadedModel, data: Path, layers: str, batch_size: int, workers: int
) -> tuple[float, float]:
    """Images per second of compare's pass over the data, and of the whole call."""
    start = time.perf_counter()
    r = compare_models(
        a, b, data, layers=layers, batch_size=batch_size, workers=workers, device="cpu"
    )
    return r.images_per_second, r.images_used / (time.perf_counter() - start)


def peak_memory(data: Path, weights_b: Path, layers: str, batch_size: int) -> float:
    """Peak resident memory (MiB) of a fresh process that compares over ``data``."""
    code = (
        "import resource, warnings; warnings.simplefilter('ignore');"
        "from featuremaps.compare import compare_models;"
        f"compare_models('resnet18', 'resnet18', {str(data)!r}, weights_a='none',"
        f" weights_b={str(weights_b)!r}, layers={layers!r}, batch_size={batch_size},"
        " workers=0, device='cpu');"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(res.stdout.split()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--layers", default="stages;layer1,layer4", help="';'-separated sets")
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
        f"resnet18 (random) vs resnet18 (other random weights), {args.images} JPEGs "
        f"320x320 -> resize 256, crop 224, batch {args.batch_size}, {args.workers} "
        f"DataLoader workers, best of {args.repeat}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(1)
        weights_b = Path(tmp) / "b.pth"
        torch.save(torchvision.models.resnet18().state_dict(), weights_b)
        a = load_model("resnet18", "none")
        b = load_model("resnet18", str(weights_b))
        a = replace(a, preprocess=fixed_size(a.preprocess))
        data = Path(tmp) / "images"
        make_images(data, args.images)
        if args.wait_idle:
            wait_for_idle(args.wait_idle)
        load = OtherLoad()
        bare_forwards(a, b, data, args.batch_size, args.workers)  # warm up
        for layers in args.layers.split(";"):
            bare, loop, whole = [], [], []
            for _ in range(args.repeat):
                bare.append(bare_forwards(a, b, data, args.batch_size, args.workers))
                x, y = compare_run(a, b, data, layers, args.batch_size, args.workers)
                loop.append(x)
                whole.append(y)
            b_, l_, w_ = max(bare), max(loop), max(whole)
            print(
                f"--layers {layers:<13} two bare forwards {b_:6.2f} img/s | compare pass "
                f"{l_:6.2f} img/s ({l_ / b_:5.1%}) | whole call {w_:6.2f} img/s "
                f"({w_ / b_:5.1%})"
            )
        other = load.cores()
        if other is not None:
            print(f"(other processes kept {other:.2f} cores busy meanwhile)")
        if args.memory:
            big = Path(tmp) / "big"
            make_images(big, 4 * args.images, seed=1)
            for n, folder in ((args.images, data), (4 * args.images, big)):
                mib = peak_memory(folder, weights_b, "stages", args.batch_size)
                print(f"peak memory of compare (stages), {n:5d} images: {mib:7.1f} MiB")


if __name__ == "__main__":
    main()
