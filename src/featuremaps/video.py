"""Video in, video out: PCA pictures of every sampled frame, one basis over the video.

MP4, WebM, MOV, MKV, AVI and animated GIF are read with PyAV (``pip install
'featuremaps[video]'``). Frames are sampled at ``fps``, batched through the model, and
each layer gets a video of the input beside its PCA picture (and chosen channels), one
output frame per sampled frame, in order.

Streaming, in two passes over the frames, with memory constant in the video's length:

1. decode, preprocess and run the model once per frame; each layer's maps and the input
   as shown go to a scratch file on disk (deleted afterwards);
2. fit one PCA basis per layer over all the frames (:func:`featuremaps.pca.fit_recipe`
   reads the scratch file: sums and covariance exact, constant memory), then draw every
   frame with it and encode the videos.

One basis for the whole video, so the same colour means the same direction in every
frame (no flicker); it is saved (``pca_basis.npz``) and can be given back to draw
another video or another checkpoint of the same layer widths with the same colours.

Example:
    >>> import featuremaps as fm
    >>> m = fm.load_model("efficientnet_lite0")
    >>> res = fm.video_pca(m, "clip.mp4", ["_blocks.10"], "out", fps=5)  # doctest: +SKIP
    >>> res.videos["_blocks.10"]  # doctest: +SKIP
    PosixPath('out/_blocks.10.pca.mp4')
"""

from __future__ import annotations

import contextlib
import math
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from ._files import atomic_path, prepare_output_dir, write_json
from ._torchvision import import_torchvision
from .errors import FeatureMapsError
from .pca import (
    Colors,
    Foreground,
    PCABasis,
    PCARecipe,
    PixelBlock,
    fit_recipe,
    map_rings,
    save_bases,
)

if TYPE_CHECKING:
    from torch import nn

    from .models import LoadedModel, Preprocess

VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".gif")
"""File suffixes read as videos (``featuremaps run`` sends these here)."""

_FORMATS = "MP4, WebM, MOV, MKV, AVI or animated GIF"


class VideoError(FeatureMapsError):
    """A video cannot be found, opened, decoded or written."""


@dataclass(frozen=True)
class VideoProgress:
    """Where a :func:`video_pca` run stands, passed to its ``progress`` callback.

    Attributes:
        phase: ``"forward"`` (decode and run the model) or ``"write"`` (draw, encode).
        done: frames finished in this phase.
        total: frames in the video when known (always known in ``"write"``).
        frames_per_second: the phase's rate so far.
    """

    phase: str
    done: int
    total: int | None
    frames_per_second: float


@dataclass(frozen=True)
class VideoResult:
    """What :func:`video_pca` wrote.

    Attributes:
        out_dir: the output folder.
        videos: layer -> ``LAYER.pca.mp4``.
        bases: layer -> the basis every frame was drawn with (also in ``basis_file``).
        basis_file: ``pca_basis.npz`` (load with :func:`featuremaps.pca.load_bases`).
        manifest: ``video.json``: source, frames, rate, per-layer outliers.
        frames: output frames per video (one per sampled input frame).
        fps: the output frame rate.
        source_frames: index of each sampled frame in the decoded source, in order.
        seconds: wall time of the whole run.
    """

    out_dir: Path
    videos: dict[str, Path]
    bases: dict[str, PCABasis] = field(repr=False)
    basis_file: Path
    manifest: Path
    frames: int
    fps: float
    source_frames: list[int] = field(repr=False)
    seconds: float


def is_video(path: str | Path) -> bool:
    """Whether ``path`` has a video suffix (see :data:`VIDEO_SUFFIXES`)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise VideoError(
            "reading and writing videos needs PyAV: pip install 'featuremaps[video]'"
        ) from None
    return av


def _open_error(path: Path, exc: BaseException) -> VideoError:
    return VideoError(f"cannot read {path} as a video ({exc}); featuremaps reads {_FORMATS}")


@contextlib.contextmanager
def _opened(path: str | Path) -> Iterator[tuple[Any, Any]]:
    """The container and its first video stream, with errors that name the file."""
    av = _av()
    p = Path(path)
    if not p.is_file():
        raise VideoError(
            f"{p}: no such file" if not p.exists() else f"{p}: not a file; give a video file"
        )
    try:
        container = av.open(str(p), "r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise _open_error(p, exc) from None
    try:
        streams = [s for s in container.streams if s.type == "video"]
        if not streams:
            raise VideoError(f"{p} holds no video stream; featuremaps reads {_FORMATS}")
        yield container, streams[0]
    finally:
        container.close()


def video_rate(path: str | Path) -> float | None:
    """The average frame rate of a video's first video stream, when the file says."""
    with _opened(path) as (_, stream):
        rate = stream.average_rate or stream.guessed_rate
        return float(rate) if rate else None


def read_frames(path: str | Path, fps: float | None = None) -> Iterator[tuple[int, Image.Image]]:
    """Decode a video's frames in order, sampled at ``fps`` (``None``: every frame).

    Sampling keeps the first frame of each ``1/fps`` slot of presentation time, so a
    30 fps clip read at ``fps=10`` gives every third frame.

    Yields:
        ``(index, frame)``: the index among all decoded frames and the frame as an RGB
        PIL image.

    Raises:
        VideoError: a missing or unreadable file, no video stream, a decoding error
            (named with the frame it happened at), or no frame at all.
    """
    for index, arr in _decoded(path, fps):
        yield index, Image.fromarray(arr)


def _decoded(path: str | Path, fps: float | None) -> Iterator[tuple[int, np.ndarray]]:
    """:func:`read_frames` as ``(H, W, 3)`` uint8 arrays."""
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise VideoError(f"fps must be a positive number, got {fps}")
    av = _av()
    p = Path(path)
    with _opened(p) as (container, stream):
        rate = stream.average_rate or stream.guessed_rate
        src_rate = float(rate) if rate else None
        last_slot = -1
        t0: float | None = None
        index = -1
        try:
            for frame in container.decode(stream):
                index += 1
                if fps is not None:
                    t = frame.time
                    if t is None:
                        t = index / (src_rate or fps)
                    t0 = t if t0 is None else t0
                    slot = math.floor((t - t0) * fps + 1e-6)
                    if slot <= last_slot:
                        continue
                    last_slot = slot
                yield index, frame.to_ndarray(format="rgb24")
        except (av.FFmpegError, OSError, ValueError) as exc:
            where = f"after frame {index}" if index >= 0 else "before the first frame"
            raise VideoError(
                f"cannot decode {p} {where} ({exc}); the file may be truncated or corrupt"
            ) from None
        if index < 0:
            raise VideoError(f"{p} holds no decodable frame; featuremaps reads {_FORMATS}")


def _safe_name(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", layer) or "layer"


class _Scratch:
    """Per-layer maps and the shown frames, appended to files, read back row by row."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.frames = 0
        self.files: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}

    def append(self, name: str, arr: np.ndarray) -> None:
        """Add ``(B, ...)`` rows; every row of a name has the same shape."""
        shape = tuple(arr.shape[1:])
        if name not in self.files:
            self.files[name] = open(self.folder / f"{len(self.files)}.bin", "wb")  # noqa: SIM115
            self.shapes[name] = shape
        elif self.shapes[name] != shape:
            raise VideoError(
                f"{name}: the frames give maps of different shapes ({self.shapes[name]} and "
                f"{shape}); the video must keep one frame size"
            )
        self.files[name].write(np.ascontiguousarray(arr).tobytes())

    def read(self, name: str, dtype: Any) -> _Rows:
        fh = self.files[name]
        fh.flush()
        return _Rows(Path(fh.name), np.dtype(dtype), (self.frames, *self.shapes[name]))

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()


class _Rows:
    """Rows of a scratch file, each read when asked (explicit reads: unlike a memory map,
    the pages read do not stay in the process's resident memory)."""

    def __init__(self, path: Path, dtype: np.dtype[Any], shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.shape = path, dtype, shape
        self.row_items = int(np.prod(shape[1:]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.shape[0]:
            raise IndexError(i)
        offset = i * self.row_items * self.dtype.itemsize
        row = np.fromfile(self.path, self.dtype, count=self.row_items, offset=offset)
        return row.reshape(self.shape[1:])


def _frame_source(maps: _Rows) -> Callable[[], Iterator[PixelBlock]]:
    """The ``(T, C, h, w)`` maps of a video's frames as pixel blocks, one per frame."""
    t, c, h, w = maps.shape
    border, edge = map_rings(h, w)

    def source() -> Iterator[PixelBlock]:
        for i in range(t):
            yield PixelBlock(maps[i].reshape(c, h * w), border, edge)

    return source


def _resize_nearest(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(h, w, 3)`` uint8 -> ``(H, W, 3)`` by nearest neighbour (blocks, no blending)."""
    h, w = rgb.shape[:2]
    rows = (np.arange(size[0]) * h // size[0]).clip(0, h - 1)
    cols = (np.arange(size[1]) * w // size[1]).clip(0, w - 1)
    return rgb[rows][:, cols]


def _to_u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def compose_frame(
    shown: np.ndarray, pca: np.ndarray, channels: Sequence[np.ndarray] = ()
) -> np.ndarray:
    """One output frame: the input, the PCA picture and channel maps side by side.

    Args:
        shown: ``(H, W, 3)`` uint8, the input as the model saw it.
        pca: ``(h, w, 3)`` or ``(h, w)`` in [0, 1] at map resolution; upsampled to
            ``(H, W)`` by nearest neighbour, so each map pixel is a block.
        channels: ``(h, w)`` maps in [0, 1], drawn gray beside it.

    Returns:
        ``(H', W', 3)`` uint8 with even sides (H.264 wants them), padded black.
    """
    size = shown.shape[:2]
    tiles = [shown]
    for pic in (pca, *channels):
        u8 = _to_u8(pic)
        if u8.ndim == 2:
            u8 = np.repeat(u8[..., None], 3, axis=2)
        tiles.append(_resize_nearest(u8, size))
    out = np.concatenate(tiles, axis=1)
    ph, pw = out.shape[0] % 2, out.shape[1] % 2
    if ph or pw:
        out = np.pad(out, ((0, ph), (0, pw), (0, 0)))
    return out


class _Writer:
    """One H.264 MP4 written to a temporary name, renamed into place when finished.

    Lossy by default (YUV 4:2:0, CRF 16: plays everywhere); ``lossless`` writes RGB
    H.264 at QP 0, the exact pixels, for players that take ``libx264rgb`` (ffmpeg, VLC).
    """

    def __init__(
        self, path: Path, fps: float, stack: contextlib.ExitStack, lossless: bool = False
    ) -> None:
        av = _av()
        self.path = path
        tmp = stack.enter_context(atomic_path(path))
        self.container = av.open(str(tmp), "w", format="mp4")
        stack.callback(self.container.close)
        rate = Fraction(fps).limit_denominator(1001)
        if lossless:
            if "libx264rgb" not in av.codecs_available:
                raise VideoError("lossless video needs PyAV built with libx264rgb")
            self.stream = self.container.add_stream("libx264rgb", rate=rate)
            self.stream.pix_fmt = "rgb24"
            self.stream.options = {"qp": "0", "preset": "veryfast"}
        else:
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            self.stream = self.container.add_stream(codec, rate=rate)
            self.stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                self.stream.options = {"crf": "16", "preset": "veryfast"}
        self.av = av
        self.started = False

    def write(self, rgb: np.ndarray) -> None:
        if not self.started:
            self.stream.height, self.stream.width = rgb.shape[:2]
            self.started = True
        frame = self.av.VideoFrame.from_ndarray(rgb, format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def finish(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def _unpack_model(
    model: LoadedModel | nn.Module, preprocess: Preprocess | None
) -> tuple[nn.Module, Preprocess]:
    from torch import nn

    from .models import Preprocess

    if isinstance(model, nn.Module):
        return model, preprocess or Preprocess()
    return model.module, preprocess or model.preprocess


def video_pca(
    model: LoadedModel | nn.Module,
    path: str | Path,
    layers: str | Sequence[str],
    out_dir: str | Path,
    *,
    fps: float | None = None,
    batch_size: int = 8,
    n_components: int = 3,
    foreground: Foreground = "none",
    whiten: bool = False,
    colors: Colors = "minmax",
    outliers: float | None = None,
    channels: Sequence[int] = (),
    bases: Mapping[str, PCABasis] | None = None,
    preprocess: Preprocess | None = None,
    full: bool = False,
    lossless: bool = False,
    progress: Callable[[VideoProgress], None] | None = None,
) -> VideoResult:
    """Per layer, a video of the input beside its PCA picture, one basis for all frames.

    Args:
        model: a :class:`~featuremaps.models.LoadedModel` or an ``nn.Module`` (then give
            ``preprocess``; the ImageNet recipe otherwise).
        path: the video (see :data:`VIDEO_SUFFIXES`).
        layers: names, globs or presets, as for :func:`featuremaps.capture`.
        out_dir: where ``LAYER.pca.mp4``, ``pca_basis.npz`` and ``video.json`` go.
        fps: frames sampled per second of video (``None``: every frame); the output
            plays at this rate (at most the source's).
        batch_size: frames per forward pass.
        n_components, foreground, whiten, colors, outliers: the PCA recipe
            (:class:`featuremaps.pca.PCARecipe`), fitted over every frame at once.
        channels: channel indices drawn beside the PCA picture (gray, one scale over the
            whole video).
        bases: layer -> a basis to draw with instead of fitting (from ``pca_basis.npz``
            of another run or checkpoint); the recipe then comes from the basis.
        preprocess: override the model's preprocessing.
        full: keep the whole frame (resize the short side, no centre crop).
        lossless: exact pixels (RGB H.264, QP 0; not every player takes it) instead of
            the default YUV 4:2:0 at CRF 16.
        progress: called after every batch with a :class:`VideoProgress`.

    Returns:
        a :class:`VideoResult`.

    Raises:
        VideoError: unreadable or unsupported video, PyAV missing.
        FeatureMapsError: an output folder that cannot be written (checked first), bad
            layers (before any compute), a channel out of range, a basis of another width.
    """
    t_start = time.perf_counter()
    recipe = PCARecipe(n_components, foreground, whiten, colors, outliers).validate()
    if batch_size < 1:
        raise VideoError(f"batch_size must be at least 1, got {batch_size}")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in channels):
        raise VideoError(f"channels must be non-negative integers, got {list(channels)}")
    module, pp = _unpack_model(model, preprocess)
    src = Path(path)
    src_rate = video_rate(src)  # opens the file: a bad video fails before any compute
    out = prepare_output_dir(out_dir)
    out_rate = fps if fps is not None else (src_rate or 25.0)
    if fps is not None and src_rate:
        out_rate = min(fps, src_rate)
    total: int | None = None
    with contextlib.suppress(Exception), _opened(src) as (_, stream):
        total = int(stream.frames) or None
    if total is not None and fps is not None and src_rate:
        total = max(1, math.ceil(total * min(fps, src_rate) / src_rate))

    with tempfile.TemporaryDirectory(prefix="featuremaps-video-") as tmpdir:
        scratch = _Scratch(Path(tmpdir))
        try:
            indices = _forward_pass(
                module, pp, src, fps, layers, batch_size, full, scratch, progress, total, channels
            )
            return _write_pass(
                scratch,
                indices,
                src,
                out,
                recipe,
                channels,
                bases,
                out_rate,
                progress,
                t_start,
                lossless,
            )
        finally:
            scratch.close()


def _forward_pass(
    module: nn.Module,
    pp: Preprocess,
    src: Path,
    fps: float | None,
    layers: str | Sequence[str],
    batch_size: int,
    full: bool,
    scratch: _Scratch,
    progress: Callable[[VideoProgress], None] | None,
    total: int | None,
    channels: Sequence[int],
) -> list[int]:
    """Decode, preprocess and run the model; maps and shown frames go to ``scratch``."""
    from .capture import capture

    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    indices: list[int] = []
    batch: list[np.ndarray] = []
    t0 = time.perf_counter()

    def flush() -> None:
        x, shown = _prepare(batch, pp, full)
        maps = capture(module, x.to(device), layers)
        if not scratch.frames:
            _check_channels(maps, channels)
        for name, t in maps.items():
            scratch.append(f"map:{name}", t.numpy().astype(np.float32, copy=False))
        scratch.append("shown", shown)
        scratch.frames += len(batch)
        batch.clear()
        if progress is not None:
            rate = scratch.frames / max(time.perf_counter() - t0, 1e-9)
            progress(VideoProgress("forward", scratch.frames, total, rate))

    for index, arr in _decoded(src, fps):
        indices.append(index)
        batch.append(arr)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return indices


def _prepare(
    frames: Sequence[np.ndarray], pp: Preprocess, full: bool
) -> tuple[torch.Tensor, np.ndarray]:
    """Frames as the model's input batch and as shown: ``(B, 3, h, w)``, ``(B, h, w, 3)``.

    The steps of :func:`featuremaps.images.preprocess` (resize of the short side with
    antialiasing, centre crop, scale, normalize) on the whole batch at once; the frames
    shown are the resized, cropped pixels before normalization.
    """
    import_torchvision()
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    sizes = sorted({f.shape for f in frames})
    if len(sizes) > 1:
        raise VideoError(
            f"the video changes its frame size ({sizes[0][1]}x{sizes[0][0]} and "
            f"{sizes[1][1]}x{sizes[1][0]}); re-encode it at one size"
        )
    t = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
    resize = pp.resize or pp.crop
    crop = None if full else pp.crop
    if resize:
        interp = InterpolationMode(pp.interpolation)
        t = F.resize(t, [resize], interpolation=interp, antialias=True)
    if crop:
        t = F.center_crop(t, [crop, crop])
    x = F.normalize(F.to_dtype(t, torch.float32, scale=True), list(pp.mean), list(pp.std))
    return x, t.permute(0, 2, 3, 1).contiguous().numpy()


def _check_channels(maps: Mapping[str, torch.Tensor], channels: Sequence[int]) -> None:
    for name, t in maps.items():
        c = int(t.shape[1])
        bad = [ch for ch in channels if ch >= c]
        if bad:
            raise VideoError(
                f"{name} has {c} channels; channel(s) {bad} do not exist (use 0..{c - 1})"
            )


def _write_pass(
    scratch: _Scratch,
    indices: list[int],
    src: Path,
    out: Path,
    recipe: PCARecipe,
    channels: Sequence[int],
    given: Mapping[str, PCABasis] | None,
    out_rate: float,
    progress: Callable[[VideoProgress], None] | None,
    t_start: float,
    lossless: bool,
) -> VideoResult:
    """Fit one basis per layer over every frame, then draw and encode each frame."""
    n = scratch.frames
    shown = scratch.read("shown", np.uint8)
    layers = [k.removeprefix("map:") for k in scratch.shapes if k.startswith("map:")]
    maps = {name: scratch.read(f"map:{name}", np.float32) for name in layers}
    hw = {name: (int(maps[name].shape[2]), int(maps[name].shape[3])) for name in layers}
    bases: dict[str, PCABasis] = {}
    ranges: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in layers:
        c = maps[name].shape[1]
        if given is not None and name in given:
            if given[name].channels != c:
                raise VideoError(
                    f"the PCA basis for {name} is for {given[name].channels} channels, the "
                    f"layer has {c}; use a basis from a layer of the same width"
                )
            bases[name] = given[name]
        else:
            bases[name] = fit_recipe(_frame_source(maps[name]), recipe)
        if channels:
            sel = list(channels)
            lo = np.min([maps[name][i][sel].min((1, 2)) for i in range(n)], 0)
            hi = np.max([maps[name][i][sel].max((1, 2)) for i in range(n)], 0)
            ranges[name] = (lo, hi)

    videos = {name: out / f"{_safe_name(name)}.pca.mp4" for name in layers}
    outlier_counts: dict[str, list[int]] = {name: [] for name in layers}
    fg_share: dict[str, float] = dict.fromkeys(layers, 0.0)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        writers = {name: _Writer(videos[name], out_rate, stack, lossless) for name in layers}
        for i in range(n):
            for name in layers:
                fmap = maps[name][i]
                res = bases[name].apply(fmap)
                outlier_counts[name].append(res.outlier_count)
                fg_share[name] += float(res.foreground.mean()) / n
                extra: list[np.ndarray] = []
                if channels:
                    lo, hi = ranges[name]
                    span = np.where(hi > lo, hi - lo, 1.0)
                    for j, ch in enumerate(channels):
                        extra.append((fmap[ch] - lo[j]) / span[j] * (hi[j] > lo[j]))
                writers[name].write(compose_frame(shown[i], res.rgb[0], extra))
            if progress is not None:
                rate = (i + 1) / max(time.perf_counter() - t0, 1e-9)
                progress(VideoProgress("write", i + 1, n, rate))
        for wr in writers.values():
            wr.finish()
    basis_file = out / "pca_basis.npz"
    save_bases(bases, basis_file)
    seconds = time.perf_counter() - t_start
    manifest = out / "video.json"
    write_json(
        manifest,
        {
            "source": str(src),
            "frames": n,
            "fps": out_rate,
            "source_frames": indices,
            "seconds": round(seconds, 3),
            "pca_basis": basis_file.name,
            "recipe": {
                "components": recipe.n_components,
                "foreground": recipe.foreground,
                "whiten": recipe.whiten,
                "colors": recipe.colors,
                "outliers": recipe.outliers,
            },
            "channels": list(channels),
            "layers": {
                name: {
                    "video": videos[name].name,
                    "map": [int(maps[name].shape[1]), *hw[name]],
                    "foreground_fraction": round(fg_share[name], 4),
                    "norm_limit": (
                        None
                        if math.isinf(bases[name].norm_limit)
                        else float(bases[name].norm_limit)
                    ),
                    "outliers": int(sum(outlier_counts[name])),
                    "outliers_per_frame": outlier_counts[name],
                }
                for name in layers
            },
        },
    )
    return VideoResult(out, videos, bases, basis_file, manifest, n, out_rate, indices, seconds)
