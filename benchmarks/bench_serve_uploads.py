"""Peak memory of the viewer under parallel uploads of large JPEGs (a script, not a test).

Run with ``.venv/bin/python benchmarks/bench_serve_uploads.py``; results and the machine
are recorded in ``benchmarks/README.md``.

The script makes ``--images`` distinct JPEGs of ``--megapixels`` each (smooth gradients
at low quality, so each file stays under 1 MB while it decodes to a full-size picture),
starts ``featuremaps serve`` on 127.0.0.1 in a subprocess, and sends all uploads at once
from as many threads. A client that gets 503 waits the ``Retry-After`` it is told and
sends again (at most 60 tries), as a browser user would. The server's resident memory is
read from ``/proc/PID/status``: ``VmRSS`` when idle before the uploads and after them,
``VmHWM`` (the kernel's record of the peak) at the end.

Pass ``--max-decodes N`` to change the server's bound on concurrent decodes. The
subprocess inherits ``PYTHONPATH``, so another source tree can be measured the same way.
"""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import numpy as np
from PIL import Image

from bench_core import machine_line as machine


def jpeg(index: int, megapixels: float, quality: int = 20) -> bytes:
    """A smooth colour gradient of about ``megapixels`` (3:2), distinct per ``index``."""
    h = round((megapixels * 1e6 / 1.5) ** 0.5)
    w = round(h * 1.5)
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    phase = index / 7.0
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[..., 0] = (255 * (0.5 + 0.5 * np.sin(6.28 * (x + phase)))).astype(np.uint8)
    rgb[..., 1] = (255 * y).astype(np.uint8)
    rgb[..., 2] = (255 * (0.5 + 0.5 * np.cos(6.28 * (x * y + phase)))).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def upload(base: str, data: bytes, out: dict[str, Any]) -> None:
    retries = 0
    t0 = time.perf_counter()
    with httpx.Client(base_url=base, timeout=300) as c:
        for _ in range(60):
            r = c.post("/api/images", content=data, headers={"content-type": "image/jpeg"})
            if r.status_code != 503:
                break
            retries += 1
            time.sleep(float(r.headers.get("retry-after", "1")))
    out.update(status=r.status_code, retries=retries, seconds=time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--megapixels", type=float, default=36.0)
    ap.add_argument("--max-decodes", type=int, default=None)
    args = ap.parse_args()

    print("machine:", machine())
    t0 = time.perf_counter()
    files = [jpeg(i, args.megapixels) for i in range(args.images)]
    with Image.open(io.BytesIO(files[0])) as im:
        size = im.size
    print(
        f"{len(files)} JPEGs of {size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.1f} MP), "
        f"{min(map(len, files)) / 1e6:.2f}-{max(map(len, files)) / 1e6:.2f} MB each "
        f"(made in {time.perf_counter() - t0:.1f} s)"
    )

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "featuremaps", "serve", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--max-upload-mb", "5"]
    if args.max_decodes is not None:
        cmd += ["--max-decodes", str(args.max_decodes)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(480):  # two minutes at most
            if server.poll() is not None:
                raise SystemExit(f"the server exited: {server.stderr.read().decode()}")  # type: ignore[union-attr]
            try:
                httpx.get(base + "/api/config", timeout=5)
                break
            except httpx.HTTPError:
                time.sleep(0.25)
        else:
            raise SystemExit("the server did not answer within two minutes")
        idle = status_kib(server.pid, "VmRSS")
        results: list[dict[str, Any]] = [{} for _ in files]
        threads = [
            threading.Thread(target=upload, args=(base, data, res))
            for data, res in zip(files, results, strict=True)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        wall = time.perf_counter() - t0
        time.sleep(1.0)
        after = status_kib(server.pid, "VmRSS")
        peak = status_kib(server.pid, "VmHWM")
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()

    codes: dict[int, int] = {}
    for r in results:
        codes[r.get("status", -1)] = codes.get(r.get("status", -1), 0) + 1
    print(
        f"uploads: {len(files)} in parallel, statuses {codes}, 503 retries "
        f"{sum(r.get('retries', 0) for r in results)}, all done in {wall:.1f} s"
    )
    print(
        f"server RSS: idle {idle / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB "
        f"(+{(peak - idle) / 1024:.0f}), after {after / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
