"""Benchmark of video PCA: throughput against the bare forward, memory against length.

Run with ``.venv/bin/python benchmarks/bench_video.py [--quick]``. Figures and the
machine they were measured on go in ``benchmarks/README.md`` (section "Video PCA").

A synthetic clip (the bundled cat photo sliding over a grey 320x240 canvas, 30 fps,
H.264) goes through the offline EfficientNet-Lite0 at 224x224, layer ``_blocks.10``:

* throughput: ``featuremaps.video_pca`` end to end (decode, preprocess, forward, scratch
  file, PCA fit over all frames, drawing, H.264 encoding, manifest) against the bare
  forward over the same frames, already decoded and preprocessed: ``model(x)`` under
  ``torch.no_grad()`` (the whole network) and the forward up to ``_blocks.10`` only
  (what ``video_pca`` runs), in batches of 8 both; the sides are interleaved (A, B, A,
  B) and the median of the repeats is kept; target: video PCA at least 80 % of the bare
  forward's frames per second;
* memory: the resident memory of a fresh process while ``video_pca`` runs on clips of
  increasing length (sampled at every progress call); target: flat in the length (the
  maps go to a scratch file on disk, deleted at the end).

Other processes on the machine spoil the figures; the script prints how many cores
other work kept busy while it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import featuremaps as fm
from featuremaps.images import preprocess
from featuremaps.video import read_frames, video_pca

LAYER = "_blocks.10"
BATCH = 8


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = "unknown"
    try:
        with open("/proc/meminfo") as fh:
            kb = int(next(ln.split()[1] for ln in fh if ln.startswith("MemTotal")))
            mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    import av

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "pyav": av.__version__,
    }


class OtherLoad:
    """Average cores busy with other processes since construction (Linux /proc/stat)."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as fh:
                f = [int(v) for v in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        mine = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
        return time.perf_counter(), busy, mine

    def cores(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None
        other = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return max(0.0, other / (end[0] - self.start[0]))


def make_clip(path: Path, frames: int, rate: int = 30) -> Path:
    """The cat photo sliding right over a grey 320x240 canvas, H.264."""
    import av

    cat = np.asarray(fm.load_image(fm.sample_image("cat")).resize((160, 160)))
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
        for i in range(frames):
            arr = np.full((240, 320, 3), 128, np.uint8)
            x0 = (i * 2) % 160
            arr[40:200, x0 : x0 + 160] = cat
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def bare_forward(
    model: fm.LoadedModel, batches: list[torch.Tensor], to_layer: bool
) -> tuple[float, float]:
    """Frames per wall second and per CPU second of the bare forward over pre-decoded,
    preprocessed batches."""
    n = sum(len(b) for b in batches)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for x in batches:
            if to_layer:
                fm.capture(model.module, x, [LAYER])
            else:
                model.module(x)
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def video_run(
    model: fm.LoadedModel, clip: Path, out: Path
) -> tuple[float, float, dict[str, float]]:
    """Frames per wall second and per CPU second of ``video_pca``, and its phases' rates."""
    phases: dict[str, float] = {}

    def progress(p: Any) -> None:
        phases[p.phase] = p.frames_per_second

    t0, c0 = time.perf_counter(), time.process_time()
    res = video_pca(model, clip, [LAYER], out, batch_size=BATCH, progress=progress)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return res.frames / wall, res.frames / cpu, phases


def rss_mib() -> float:
    """The current resident memory of this process (Linux /proc/self/status)."""
    with open("/proc/self/status") as fh:
        return int(next(ln.split()[1] for ln in fh if ln.startswith("VmRSS"))) / 1024


def memory_child(frames: int) -> None:
    """In a fresh process: video PCA of a clip of ``frames`` frames; print its memory.

    The resident memory is sampled after every batch and every written frame (the
    progress callback); the growth is its maximum less the memory before the run.
    """
    model = fm.load_model("efficientnet_lite0")
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(Path(tmp) / "clip.mp4", frames)
        warm = make_clip(Path(tmp) / "warm.mp4", 16)
        video_pca(model, warm, [LAYER], Path(tmp) / "warm", batch_size=BATCH)
        before = rss_mib()
        samples = [before]
        t0 = time.perf_counter()
        res = video_pca(
            model,
            clip,
            [LAYER],
            Path(tmp) / "out",
            batch_size=BATCH,
            progress=lambda p: samples.append(rss_mib()),
        )
        secs = time.perf_counter() - t0
        scratch = res.frames * (112 * 14 * 14 * 4 + 224 * 224 * 3) / 2**20
    print(
        json.dumps(
            {
                "frames": res.frames,
                "before_mib": before,
                "max_mib": max(samples),
                "growth_mib": max(samples) - before,
                "seconds": secs,
                "scratch_mib": scratch,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer frames and repeats")
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    frames = 48 if args.quick else 96
    repeats = 2 if args.quick else 3
    lengths = [30, 120] if args.quick else [60, 240, 480]
    print("machine:", json.dumps(machine()))
    load = OtherLoad()
    model = fm.load_model("efficientnet_lite0")
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(Path(tmp) / "clip.mp4", frames)
        xs = [preprocess(img, model.preprocess) for _, img in read_frames(clip)]
        batches = [torch.stack(xs[i : i + BATCH]) for i in range(0, len(xs), BATCH)]
        bare_forward(model, batches[:2], True)  # warm-up
        bare_forward(model, batches[:2], False)
        video_run(model, make_clip(Path(tmp) / "warm.mp4", 16), Path(tmp) / "warm")
        full, early, vid, fwd_phase, write_phase = [], [], [], [], []
        full_cpu, early_cpu, vid_cpu = [], [], []
        for r in range(repeats):
            wall, cpu = bare_forward(model, batches, False)
            full.append(wall)
            full_cpu.append(cpu)
            wall, cpu = bare_forward(model, batches, True)
            early.append(wall)
            early_cpu.append(cpu)
            fps, cpu, phases = video_run(model, clip, Path(tmp) / f"out{r}")
            vid.append(fps)
            vid_cpu.append(cpu)
            fwd_phase.append(phases.get("forward", float("nan")))
            write_phase.append(phases.get("write", float("nan")))
    med = statistics.median
    print(
        f"\nthroughput, {frames} frames 320x240 -> 224x224, EfficientNet-Lite0 {LAYER}, "
        f"batch {BATCH}, median of {repeats}:"
    )
    print(f"  bare forward, whole network      {med(full):7.2f} frames/s")
    print(f"  bare forward, up to {LAYER}    {med(early):7.2f} frames/s")
    print(
        f"  video_pca end to end             {med(vid):7.2f} frames/s  "
        f"({100 * med(vid) / med(early):.0f} % of the forward to the layer, "
        f"{100 * med(vid) / med(full):.0f} % of the whole network)"
    )
    print(
        f"    its forward pass (decode, preprocess, capture, scratch) "
        f"{med(fwd_phase):7.2f} frames/s"
    )
    print(
        f"    its write pass (draw, H.264 encode)                     "
        f"{med(write_phase):7.2f} frames/s"
    )
    print(
        "  per CPU second (all threads; steadier than wall time on a busy machine): "
        f"whole network {med(full_cpu):.2f}, up to {LAYER} {med(early_cpu):.2f}, "
        f"video_pca {med(vid_cpu):.2f} frames "
        f"({100 * med(vid_cpu) / med(early_cpu):.0f} % of the forward to the layer)"
    )
    print(f"  other processes kept {load.cores() or 0:.2f} cores busy meanwhile")
    print("\nmemory: resident memory of a fresh process during video_pca, by clip length")
    for n in lengths:
        out = (
            subprocess.run(
                [sys.executable, __file__, "--memory-child", str(n)],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        rec = json.loads(out)
        print(
            f"  {rec['frames']:5d} frames: {rec['before_mib']:7.1f} MiB before, "
            f"at most {rec['max_mib']:7.1f} MiB during (+{rec['growth_mib']:.1f} MiB); "
            f"scratch file on disk {rec['scratch_mib']:.0f} MiB; {rec['seconds']:.1f} s"
        )


if __name__ == "__main__":
    main()
