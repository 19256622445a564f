"""Videos in the HTML report: per layer a PCA video, embedded as a ``data:`` URL.

:func:`video_entry` runs :func:`featuremaps.video.video_pca` into a temporary folder
(one PCA basis over all frames, the input beside the PCA picture), then re-encodes
each layer's MP4 as WebM (VP9, else VP8: Chromium plays H.264 MP4 only in builds with
proprietary codecs, WebM everywhere) and embeds it. Frame count, order and rate are
kept. The embedded videos of one report are capped at :data:`VIDEO_CAP_BYTES` (50 MB
of video, before base64); a longer video is refused with a message saying what to do.
"""

from __future__ import annotations

import base64
import io
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FeatureMapsError
from ..video import _av, video_pca

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..models import LoadedModel

__all__ = ["VIDEO_CAP_BYTES", "ReportVideoError", "embed_webm", "video_entry"]

VIDEO_CAP_BYTES = 50 * 1024 * 1024
"""The most video bytes (all layers, all videos, before base64) one report embeds."""


class ReportVideoError(FeatureMapsError):
    """A video cannot be put into the report (too large, or not encodable)."""


def _webm_codec(av: Any) -> str | None:
    for name in ("libvpx-vp9", "libvpx"):
        try:
            av.codec.Codec(name, "w")
        except Exception:
            continue
        return name
    return None


def embed_webm(path: Path) -> tuple[bytes, str, int]:
    """Re-encode the video at ``path`` as WebM (VP9, else VP8), every frame kept.

    Returns:
        the bytes, their MIME type and the frame count. Without a VPx encoder the MP4's
        own bytes come back as ``video/mp4``.
    """
    av = _av()
    codec = _webm_codec(av)
    if codec is None:
        data = path.read_bytes()
        with av.open(str(path)) as src:
            n = sum(1 for _ in src.decode(video=0))
        return data, "video/mp4", n
    buf = io.BytesIO()
    n = 0
    with av.open(str(path)) as src, av.open(buf, "w", format="webm") as dst:
        sin = src.streams.video[0]
        rate = Fraction(sin.average_rate or 25).limit_denominator(1001)
        out = dst.add_stream(codec, rate=rate)
        out.width, out.height = sin.codec_context.width, sin.codec_context.height
        out.pix_fmt = "yuv420p"
        out.codec_context.time_base = 1 / rate
        # constant quality, fast: the PCA pictures are flat regions and sharp edges
        out.options = {"crf": "12", "b": "0", "deadline": "realtime", "cpu-used": "8"}
        for frame in src.decode(sin):
            frame = frame.reformat(format="yuv420p")
            frame.pts, frame.time_base = n, 1 / rate
            for packet in out.encode(frame):
                dst.mux(packet)
            n += 1
        for packet in out.encode():
            dst.mux(packet)
    return buf.getvalue(), "video/webm", n


def video_entry(
    model: LoadedModel,
    path: str | Path,
    layers: str | Sequence[str],
    *,
    fps: float | None = None,
    full: bool = False,
    budget: int = VIDEO_CAP_BYTES,
) -> dict[str, Any]:
    """The report's data for one video: per layer a playable PCA video as a data URL.

    Args:
        model: the loaded model.
        path: the video file.
        layers: names, globs or presets, as for :func:`featuremaps.capture`.
        fps: frames sampled per second (``None``: every frame).
        full: keep the whole frame (no centre crop).
        budget: the most video bytes this entry may embed.

    Raises:
        ReportVideoError: the embedded videos would exceed ``budget``.
        VideoError: unreadable video, PyAV missing.
    """
    src = Path(path)
    layer_data: dict[str, dict[str, Any]] = {}
    used = 0
    with tempfile.TemporaryDirectory(prefix="featuremaps-report-video-") as tmp:
        res = video_pca(model, src, layers, Path(tmp) / "out", fps=fps, full=full)
        for name, file in res.videos.items():
            data, mime, n = embed_webm(file)
            used += len(data)
            if used > budget:
                raise ReportVideoError(
                    f"video {src.name!r} would embed more than {budget / 2**20:.0f} MB in "
                    f"the report ({len(res.videos)} layer(s), {res.frames} frames); "
                    "choose fewer layers, a shorter clip, or use `featuremaps run` "
                    "to write the PCA videos as files"
                )
            layer_data[name] = {
                "src": f"data:{mime};base64," + base64.b64encode(data).decode("ascii"),
                "mime": mime,
                "frames": n,
                "bytes": len(data),
            }
    return {
        "name": src.name,
        "path": str(src),
        "frames": res.frames,
        "fps": res.fps,
        "source_frames": res.source_frames,
        "layers": layer_data,
    }
