"""What a channel wants to see: feature visualization by optimization.

An image is optimized to maximize an objective (a channel's mean, a neuron, a class
logit, a layer's energy), with the parameterization of Olah et al., "Feature
Visualization" (Distill, 2017), that keeps the pictures readable:

* the image lives in Fourier space, each frequency scaled by ``1/f`` so that the
  optimizer moves low frequencies as easily as high ones;
* its three channels live in a decorrelated colour space, mapped to RGB by the square
  root of ImageNet's colour correlation matrix, then squashed to [0, 1] by a sigmoid;
* every step sees it through a random transformation (padding, jitter, scale, small
  rotation), so that what survives is robust structure, not adversarial noise;
* then the model's own preprocessing (its mean and standard deviation).

The forward stops after the deepest layer an objective reads, no parameter gradient is
computed or kept, and the model leaves as it came: hooks removed, train/eval modes and
``requires_grad`` restored, on success and on failure. On the CPU a seed gives the same
pictures every time. Each image's initial spectrum and transformations come from its own
generator, seeded by the seed and the objective, so a picture does not depend on what
else is in the batch.

Example:
    >>> import featuremaps as fm
    >>> m = fm.load_model("resnet18", weights="none")
    >>> vis = fm.visualize(m, ["channel:layer2:0-1"], steps=4, size=64)
    >>> [v.image.shape for v in vis]
    [(64, 64, 3), (64, 64, 3)]
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .capture import LayerInfo, LayoutKind, hooked, list_layers
from .errors import FeatureMapsError, LayerError, ModelError, suggest
from .models import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, Preprocess

__all__ = [
    "NO_TRANSFORMS",
    "Objective",
    "ObjectiveError",
    "ObjectiveKind",
    "Transforms",
    "Visualization",
    "Visualizations",
    "parse_objectives",
    "visualize",
]


class ObjectiveError(FeatureMapsError):
    """An objective is malformed or does not fit the model."""


# -- objectives ------------------------------------------------------------------------------


class ObjectiveKind(StrEnum):
    """What is maximized."""

    CHANNEL = "channel"
    """The mean of one channel over the map."""
    NEURON = "neuron"
    """One channel at the centre position of the map."""
    CLASS = "class"
    """One logit of the model's output."""
    LAYER = "layer"
    """The mean square of a whole layer (DeepDream)."""


_SYNTAX = (
    "write channel:LAYER:C, neuron:LAYER:C (C a channel or a range A-B), class:K, "
    "class:LABEL or layer:LAYER"
)


@dataclass(frozen=True)
class Objective:
    """One objective, one image.

    Attributes:
        kind: what is maximized.
        layer: the layer read (``None`` for a class).
        index: the channel (``channel``, ``neuron``) or the class index (``class``; once
            a label is resolved); ``None`` for ``layer``.
        label: the class name when given by name, else ``None``.
    """

    kind: ObjectiveKind
    layer: str | None = None
    index: int | None = None
    label: str | None = None

    @property
    def text(self) -> str:
        """The objective as typed: ``channel:layer3:5``, ``class:espresso``, ..."""
        if self.kind is ObjectiveKind.CLASS:
            return f"class:{self.label if self.label is not None else self.index}"
        if self.kind is ObjectiveKind.LAYER:
            return f"layer:{self.layer}"
        return f"{self.kind.value}:{self.layer}:{self.index}"

    @property
    def file_stem(self) -> str:
        """A file name for its picture: ``channel_layer3_5``."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.text).strip("._") or "objective"

    def __str__(self) -> str:
        return self.text


def _parse_one(spec: str) -> list[Objective]:
    kind_text, sep, rest = spec.strip().partition(":")
    try:
        kind = ObjectiveKind(kind_text.strip().lower())
    except ValueError:
        kinds = [k.value for k in ObjectiveKind]
        raise ObjectiveError(
            f"objective {spec!r}: unknown kind {kind_text!r}.{suggest(kind_text, kinds)} {_SYNTAX}"
        ) from None
    rest = rest.strip()
    if not sep or not rest:
        raise ObjectiveError(f"objective {spec!r}: nothing after {kind.value!r}; {_SYNTAX}")
    if kind is ObjectiveKind.CLASS:
        if re.fullmatch(r"\d+", rest):
            return [Objective(kind, index=int(rest))]
        return [Objective(kind, label=rest)]
    if kind is ObjectiveKind.LAYER:
        return [Objective(kind, layer=rest)]
    layer, sep, chans = rest.rpartition(":")
    if not sep or not layer.strip():
        raise ObjectiveError(f"objective {spec!r}: give the layer and the channel; {_SYNTAX}")
    found = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", chans)
    if found is None:
        raise ObjectiveError(
            f"objective {spec!r}: channel {chans!r} is not a number >= 0 or a range A-B; {_SYNTAX}"
        )
    lo = int(found.group(1))
    hi = int(found.group(2)) if found.group(2) is not None else lo
    if hi < lo:
        raise ObjectiveError(f"objective {spec!r}: the range {chans} is empty; {_SYNTAX}")
    return [Objective(kind, layer=layer.strip(), index=c) for c in range(lo, hi + 1)]


def parse_objectives(specs: str | Objective | Sequence[str | Objective]) -> list[Objective]:
    """Parse objective texts, expanding channel ranges; duplicates are kept once.

    Args:
        specs: ``channel:LAYER:C``, ``channel:LAYER:A-B``, ``neuron:LAYER:C``,
            ``class:K``, ``class:LABEL``, ``layer:LAYER``, or :class:`Objective` records.

    Raises:
        ObjectiveError: a text is malformed; the message shows the syntax.

    Example:
        >>> [o.text for o in parse_objectives(["channel:layer3:0-2", "class:espresso"])]
        ['channel:layer3:0', 'channel:layer3:1', 'channel:layer3:2', 'class:espresso']
    """
    items = [specs] if isinstance(specs, (str, Objective)) else list(specs)
    found: list[Objective] = []
    for item in items:
        found.extend([item] if isinstance(item, Objective) else _parse_one(str(item)))
    if not found:
        raise ObjectiveError(f"no objective given; {_SYNTAX}")
    return list(dict.fromkeys(found))


# -- the parameterization --------------------------------------------------------------------

# The square root of ImageNet's colour correlation matrix, as published with "Feature
# Visualization" (Olah et al., 2017): it maps decorrelated colour channels to RGB.
_COLOR_SQRT = torch.tensor(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=torch.float64
)
_COLOR = (_COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()).float()
"""Scaled so that no decorrelated channel has a norm above 1."""

_INIT_STD = 0.01
"""Standard deviation of the initial spectrum: a faint grey start."""

_SPECTRUM_GAIN = 0.25
"""Scales the image made from the spectrum so that Adam's steps of ``lr`` change the
picture gradually (about 1/255 of the sigmoid's range per step at lr 0.05)."""


@dataclass(frozen=True)
class Transforms:
    """The random transformation each step sees the image through.

    The model looks at a ``size`` x ``size`` window of the image padded by ``pad`` pixels
    of grey (``fill``) on each side, shifted by up to ``jitter`` pixels, zoomed by a
    factor drawn from ``scale`` and rotated by up to ``rotate`` degrees, all in one
    bilinear resampling. The defaults are the distribution of Lucid's standard
    transforms (pad 12, jitter 8, scale 0.9-1.1, rotation ±10°, jitter 4) at a fixed
    input size.

    Attributes:
        pad: grey pixels around the image, on each side of the window.
        jitter: largest shift in pixels, along each axis.
        scale: the range of zoom factors.
        rotate: largest rotation in degrees, either way.
        fill: the grey of the padding, in [0, 1].
    """

    pad: float = 6.0
    jitter: float = 6.0
    scale: tuple[float, float] = (0.9, 1.1)
    rotate: float = 10.0
    fill: float = 0.5

    def validate(self) -> None:
        """Raise :class:`FeatureMapsError` on values that make no transformation."""
        lo, hi = self.scale
        if self.pad < 0 or self.jitter < 0 or self.rotate < 0:
            raise FeatureMapsError("transforms: pad, jitter and rotate must be >= 0")
        if not 0 < lo <= hi:
            raise FeatureMapsError(f"transforms: scale {self.scale} must be 0 < low <= high")
        if not 0 <= self.fill <= 1:
            raise FeatureMapsError(f"transforms: fill {self.fill} must lie in [0, 1]")

    @property
    def identity(self) -> bool:
        return self.pad == self.jitter == self.rotate == 0 and self.scale == (1.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pad": self.pad,
            "jitter": self.jitter,
            "scale": list(self.scale),
            "rotate": self.rotate,
            "fill": self.fill,
        }


NO_TRANSFORMS = Transforms(pad=0.0, jitter=0.0, scale=(1.0, 1.0), rotate=0.0)
"""No transformation: the model sees the image as it is."""


class _Image:
    """A batch of images as Fourier spectra in a decorrelated colour space."""

    def __init__(self, generators: Sequence[torch.Generator], size: int, device: torch.device):
        self.size = size
        fy = torch.fft.fftfreq(size, dtype=torch.float64)[:, None]
        fx = torch.fft.rfftfreq(size, dtype=torch.float64)[None, :]
        freq = torch.sqrt(fx * fx + fy * fy).clamp(min=1.0 / size)
        # 1/f scaling, with the inverse transform's ortho norm: a flat spectrum of
        # unit variance gives pixels of unit variance summed over 1/f^2
        self.scale = (_SPECTRUM_GAIN / freq).float().to(device)
        shape = (3, size, size // 2 + 1, 2)
        init = [torch.randn(shape, generator=g) * _INIT_STD for g in generators]
        self.spectrum = torch.stack(init).to(device).requires_grad_(True)
        self.color = _COLOR.to(device)

    def rgb(self) -> torch.Tensor:
        """The images ``(B, 3, size, size)`` in [0, 1]."""
        spec = torch.view_as_complex(self.spectrum) * self.scale
        decorrelated = torch.fft.irfft2(spec, s=(self.size, self.size), norm="ortho")
        rgb = torch.einsum("ij,bjhw->bihw", self.color, decorrelated)
        return torch.sigmoid(rgb)


def _transform(
    img: torch.Tensor, tf: Transforms, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Each image through its own random window (see :class:`Transforms`)."""
    if tf.identity:
        return img
    b, _, h, w = img.shape
    side = float(max(h, w))
    thetas = []
    for g in generators:
        u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        zoom = tf.scale[0] + (tf.scale[1] - tf.scale[0]) * u[0]
        angle = math.radians(tf.rotate * (2 * u[1] - 1))
        shift_x = tf.jitter * (2 * u[2] - 1) * 2 / side
        shift_y = tf.jitter * (2 * u[3] - 1) * 2 / side
        extent = (1 + 2 * tf.pad / side) / zoom  # of the window, in image widths
        cos, sin = extent * math.cos(angle), extent * math.sin(angle)
        thetas.append([[cos, -sin, shift_x], [sin, cos, shift_y]])
    theta = torch.tensor(thetas, dtype=img.dtype, device=img.device)
    grid = F.affine_grid(theta, [b, 3, h, w], align_corners=False)
    moved = F.grid_sample(
        img - tf.fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return moved + tf.fill


# -- reading the objectives during the forward -----------------------------------------------


class _StopForward(Exception):
    """Raised from a hook once every layer the objectives read has run."""


@dataclass
class _Reader:
    """Reads the objectives of some batch rows from one output of one call of a module.

    ``info`` comes from the probe (:func:`list_layers`): its :class:`Layout` record says
    how the output becomes ``(B, C, H, W)``: as it is, channels-last, or tokens on a grid.
    """

    info: LayerInfo
    rows: list[int] = field(default_factory=list)
    kinds: list[ObjectiveKind] = field(default_factory=list)
    channels: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def call(self) -> int:
        return self.info.key.call or 1

    def to_map(self, t: torch.Tensor) -> torch.Tensor:
        form = self.info.form
        if form.kind is LayoutKind.NHWC:
            return t.permute(0, 3, 1, 2)
        if form.kind is LayoutKind.TOKENS:
            assert form.grid is not None
            gh, gw = form.grid
            patches = t[:, form.prefix or 0 :, :]
            return patches.reshape(t.shape[0], gh, gw, t.shape[-1]).permute(0, 3, 1, 2)
        return t

    def values(self, output: Any) -> tuple[list[int], torch.Tensor]:
        t = output
        for part in self.info.key.entry:
            if isinstance(t, Mapping):
                t = next(v for k, v in t.items() if str(k) == part)
            else:
                t = t[int(part)]
        m = self.to_map(t).float()
        rows: list[int] = []
        parts: list[torch.Tensor] = []
        for kind in ObjectiveKind:
            sel = [i for i, k in enumerate(self.kinds) if k is kind]
            if not sel:
                continue
            r = torch.tensor([self.rows[i] for i in sel], device=m.device)
            ch = torch.tensor([self.channels[i] for i in sel], device=m.device)
            # advanced indexing copies: a later in-place op on the output cannot reach it
            if kind is ObjectiveKind.CHANNEL:
                parts.append(m[r, ch].mean(dim=(1, 2)))
            elif kind is ObjectiveKind.NEURON:
                parts.append(m[r, ch, m.shape[2] // 2, m.shape[3] // 2])
            else:
                parts.append(m[r].square().mean(dim=(1, 2, 3)))
            rows.extend(self.rows[i] for i in sel)
        return rows, torch.cat(parts)


@dataclass
class _Plan:
    """Which module outputs to read, for which rows, and whether the forward may stop."""

    readers: dict[str, list[_Reader]]
    """Module name -> the readers of its outputs (calls and entries)."""
    class_rows: list[int]
    class_index: list[int]
    batch: int


def _module_of(layer: str, modules: set[str]) -> str:
    """The module a layer text names: ``body[pool]``, ``blocks.0.act:2`` -> the module."""
    base = layer.split("[", 1)[0]
    if base not in modules:
        called = re.fullmatch(r"(.+):(\d+)", base)
        if called and called.group(1) in modules:
            return called.group(1)
    return base


def _plan(
    module: nn.Module,
    objectives: Sequence[Objective],
    probe: Callable[[], list[LayerInfo]],
    output_shape: Callable[[], Any],
    categories: Sequence[str] | None,
) -> tuple[_Plan, list[Objective]]:
    """Check every objective against the model and plan how to read it.

    Raises:
        ObjectiveError: unknown layer (with suggestions), no spatial map, channel out of
            range, class on a model without classes or out of range.
    """
    modules = {n for n, _ in module.named_modules() if n}
    for obj in objectives:  # names first: before any forward
        if obj.layer is not None and _module_of(obj.layer, modules) not in modules:
            raise ObjectiveError(
                f"objective {obj.text!r}: unknown layer {obj.layer!r}."
                f"{suggest(obj.layer, modules)} List every layer with: featuremaps layers MODEL"
            )
    infos = {i.name: i for i in probe()} if any(o.layer for o in objectives) else {}
    readers: dict[str, _Reader] = {}
    class_rows: list[int] = []
    class_index: list[int] = []
    resolved: list[Objective] = []
    for row, obj in enumerate(objectives):
        if obj.kind is ObjectiveKind.CLASS:
            obj = _resolve_class(obj, output_shape(), categories)
            class_rows.append(row)
            class_index.append(int(obj.index or 0))
            resolved.append(obj)
            continue
        info = _layer_info(obj, infos)
        assert info.shape is not None
        channels = int(info.shape[1])
        if obj.index is not None and obj.index >= channels:
            raise ObjectiveError(
                f"objective {obj.text!r}: channel {obj.index} is out of range; layer "
                f"{obj.layer!r} has {channels} channels (0-{channels - 1})"
            )
        reader = readers.setdefault(info.name, _Reader(info))
        reader.rows.append(row)
        reader.kinds.append(obj.kind)
        reader.channels.append(obj.index or 0)
        resolved.append(obj)
    by_module: dict[str, list[_Reader]] = {}
    for reader in readers.values():
        by_module.setdefault(reader.info.key.module, []).append(reader)
    return _Plan(by_module, class_rows, class_index, len(objectives)), resolved


def _layer_info(obj: Objective, infos: Mapping[str, LayerInfo]) -> LayerInfo:
    assert obj.layer is not None
    info = infos.get(obj.layer)
    if info is None:
        entries = [i.name for i in infos.values() if i.key.module == obj.layer and i.shape]
        if entries:
            raise ObjectiveError(
                f"objective {obj.text!r}: layer {obj.layer!r} gives several maps (calls "
                f"or entries of its output); name one: {', '.join(entries[:8])}"
            )
        raise ObjectiveError(
            f"objective {obj.text!r}: layer {obj.layer!r} did not run in the forward pass "
            f"(or has no such entry).{suggest(obj.layer, infos)} List every layer with: "
            "featuremaps layers MODEL"
        )
    if info.raw_shape is None or info.shape is None:
        raise ObjectiveError(
            f"objective {obj.text!r}: layer {obj.layer!r} ({info.module_type}) gives no "
            f"spatial map ({info.note or info.layout}); pick a layer before pooling. "
            "`featuremaps layers MODEL` shows every layer's shape."
        )
    return info


def _resolve_class(obj: Objective, output: Any, categories: Sequence[str] | None) -> Objective:
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        what = (
            f"a tensor of shape {tuple(output.shape)}"
            if isinstance(output, torch.Tensor)
            else type(output).__name__
        )
        raise ObjectiveError(
            f"objective {obj.text!r}: this model has no classes (its output is {what}, "
            "not (batch, classes) logits); use channel:, neuron: or layer: objectives"
        )
    n = int(output.shape[1])
    if obj.label is not None:
        if not categories:
            raise ObjectiveError(
                f"objective {obj.text!r}: this model's classes have no names; give the "
                f"class index instead (class:K, 0-{n - 1})"
            )
        lowered = [c.lower() for c in categories]
        if obj.label.lower() not in lowered:
            raise ObjectiveError(
                f"objective {obj.text!r}: no class named {obj.label!r}."
                f"{suggest(obj.label.lower(), lowered)} Give a class name as in the "
                "model's categories, or an index class:K"
            )
        return Objective(obj.kind, index=lowered.index(obj.label.lower()), label=obj.label)
    assert obj.index is not None
    if obj.index >= n:
        raise ObjectiveError(
            f"objective {obj.text!r}: class {obj.index} is out of range; the model has "
            f"{n} classes (0-{n - 1})"
        )
    return obj


# -- the optimization ------------------------------------------------------------------------


@dataclass(frozen=True)
class Visualization:
    """One optimized picture.

    Attributes:
        objective: what was maximized (for a class given by name, with its index).
        image: the picture, ``(H, W, 3)`` float32 in [0, 1].
        value: the objective on the final picture, seen as it is (no transformation).
        history: the objective at each step, on that step's transformed picture.
    """

    objective: Objective
    image: np.ndarray
    value: float
    history: tuple[float, ...]

    def to_pil(self) -> Image.Image:
        """The picture as an 8-bit RGB image."""
        return Image.fromarray(np.round(self.image * 255).clip(0, 255).astype(np.uint8))

    def _repr_png_(self) -> bytes:
        import io

        buf = io.BytesIO()
        self.to_pil().save(buf, format="PNG")
        return buf.getvalue()

    def to_dict(self, file: str | None = None) -> dict[str, Any]:
        obj = self.objective
        entry: dict[str, Any] = {
            "objective": obj.text,
            "kind": obj.kind.value,
            "layer": obj.layer,
            "index": obj.index,
            "label": obj.label,
            "value": self.value,
            "history": list(self.history),
        }
        if file is not None:
            entry["file"] = file
        return entry


@dataclass
class Visualizations(Sequence[Visualization]):
    """The pictures of one :func:`visualize` call, in objective order, and its settings."""

    items: list[Visualization]
    steps: int
    size: int
    seed: int
    lr: float
    transforms: Transforms
    model: str = ""
    weights: str = ""

    def __getitem__(self, i: Any) -> Any:
        return self.items[i]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Visualization]:
        return iter(self.items)

    def file_names(self) -> list[str]:
        """A distinct PNG name per picture, from its objective."""
        names: list[str] = []
        for i, v in enumerate(self.items):
            name = f"{v.objective.file_stem}.png"
            if name in names:
                name = f"{v.objective.file_stem}-{i}.png"
            names.append(name)
        return names

    def manifest(self) -> dict[str, Any]:
        """What was made and how: settings and one entry per picture."""
        return {
            "model": self.model,
            "weights": self.weights,
            "steps": self.steps,
            "size": self.size,
            "seed": self.seed,
            "lr": self.lr,
            "transforms": self.transforms.to_dict(),
            "parameterization": "fourier 1/f, decorrelated colour, sigmoid",
            "visualizations": [
                v.to_dict(name) for v, name in zip(self.items, self.file_names(), strict=True)
            ],
        }

    def save(self, folder: str | os.PathLike[str]) -> list[Path]:
        """Write one PNG per picture and ``manifest.json`` into ``folder`` (atomically).

        Returns:
            The paths written, manifest last.
        """
        from ._files import prepare_output_dir, save_image, write_json

        target = prepare_output_dir(folder)
        paths = []
        for v, name in zip(self.items, self.file_names(), strict=True):
            save_image(v.to_pil(), target / name)
            paths.append(target / name)
        write_json(target / "manifest.json", self.manifest())
        paths.append(target / "manifest.json")
        return paths


def _device_of(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _dtype_of(module: nn.Module) -> torch.dtype:
    first = next(module.parameters(), None)
    return first.dtype if first is not None and first.is_floating_point() else torch.float32


def _generators(seed: int, objectives: Sequence[Objective]) -> list[torch.Generator]:
    """One generator per image, from the seed and its objective (not its position)."""
    gens = []
    for obj in objectives:
        g = torch.Generator()
        g.manual_seed((seed * 1_000_003 + zlib.crc32(obj.text.encode())) % (1 << 63))
        gens.append(g)
    return gens


class _Forward:
    """Runs the model and reads each row's objective; hooked by :func:`_session`."""

    def __init__(self, module: nn.Module, plan: _Plan):
        self.module = module
        self.plan = plan
        self.stop_early = not plan.class_rows
        self.n_readers = sum(len(r) for r in plan.readers.values())
        self._found: dict[str, tuple[list[int], torch.Tensor]] = {}
        self._calls: dict[str, int] = {}

    def hook_for(self, base: str) -> Callable[..., None]:
        readers = self.plan.readers[base]

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            call = self._calls[base] = self._calls.get(base, 0) + 1
            for reader in readers:
                if reader.call == call:
                    self._found[reader.name] = reader.values(output)
            if self.stop_early and len(self._found) == self.n_readers:
                raise _StopForward

        return hook

    def objectives(self, x: torch.Tensor) -> torch.Tensor:
        """One forward; each row's objective value, ``(B,)``."""
        self._found, self._calls = {}, {}
        output = None
        try:
            output = self.module(x)
        except _StopForward:
            pass
        missing = [
            r.name for rs in self.plan.readers.values() for r in rs if r.name not in self._found
        ]
        if missing:
            raise LayerError(
                f"layer(s) {', '.join(missing)} did not run during this forward pass "
                "(the model takes another path for this input)"
            )
        rows = [r for found_rows, _ in self._found.values() for r in found_rows]
        parts = [vals for _, vals in self._found.values()]
        if self.plan.class_rows:
            assert isinstance(output, torch.Tensor)
            r = torch.tensor(self.plan.class_rows, device=output.device)
            k = torch.tensor(self.plan.class_index, device=output.device)
            rows.extend(self.plan.class_rows)
            parts.append(output[r, k].float())
        order = torch.tensor(rows).argsort().to(parts[0].device)
        return torch.cat(parts)[order]


@contextmanager
def _session(module: nn.Module, plan: _Plan) -> Iterator[_Forward]:
    """The model ready for the optimization, and left as found whatever happens.

    Inside: eval mode, no ``requires_grad`` on any parameter, a hook on each module an
    objective reads. On leaving: hooks removed, modes and ``requires_grad`` restored.
    """
    forward = _Forward(module, plan)
    grads = [(p, p.requires_grad) for p in module.parameters()]
    try:
        with hooked(module, eval_mode=True) as hooks:
            for p, _ in grads:
                p.requires_grad_(False)
            for base in plan.readers:
                hooks.after(module.get_submodule(base), forward.hook_for(base))
            yield forward
    finally:
        for p, flag in grads:
            if p.requires_grad != flag:
                p.requires_grad_(flag)


def visualize(
    model: LoadedModel | nn.Module,
    objectives: str | Objective | Sequence[str | Objective],
    *,
    steps: int = 512,
    size: int = 224,
    seed: int = 0,
    device: str | torch.device | None = None,
    lr: float = 0.05,
    transforms: Transforms | None = Transforms(),
    preprocess: Preprocess | None = None,
    categories: Sequence[str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Visualizations:
    """Optimize one picture per objective, all in one batch.

    Args:
        model: a :class:`LoadedModel` (its preprocessing and class names are used) or
            any ``nn.Module`` taking ``(B, 3, H, W)``.
        objectives: ``channel:LAYER:C`` (a channel's mean), ``neuron:LAYER:C`` (the
            centre position), ``class:K`` / ``class:LABEL`` (a logit), ``layer:LAYER``
            (DeepDream: the layer's mean square); ``C`` may be a range ``A-B``.
        steps: optimization steps (Adam).
        size: side of the square pictures, in pixels.
        seed: the same seed gives the same pictures (on the CPU).
        device: ``auto``, ``cpu``, ``cuda``, ``mps`` or a ``torch.device``; ``None``:
            where the model is. The model is moved there and back.
        lr: Adam's learning rate on the spectrum.
        transforms: the random transformation of each step; ``None`` or
            :data:`NO_TRANSFORMS` for none.
        preprocess: normalization, for a bare module (default: ImageNet mean and std).
        categories: class names, for a bare module (``class:LABEL``).
        progress: called as ``progress("visualize", step, steps)``.

    Returns:
        :class:`Visualizations`: one :class:`Visualization` per objective, in order.

    Raises:
        ObjectiveError: a malformed objective, an unknown layer (with suggestions), a
            channel or class out of range, a class on a model without classes.
        FeatureMapsError: bad settings; raised before any hook or heavy compute.

    Example:
        >>> import featuremaps as fm
        >>> m = fm.load_model("efficientnet_lite0")
        >>> vis = fm.visualize(m, "class:espresso", steps=256)  # doctest: +SKIP
        >>> vis[0].to_pil().save("espresso.png")  # doctest: +SKIP
    """
    if isinstance(model, LoadedModel):
        module = model.module
        pp = preprocess or model.preprocess
        categories = categories if categories is not None else model.categories
        spec, weights = model.spec, model.weights
    else:
        module = model
        pp = preprocess or Preprocess(mean=IMAGENET_MEAN, std=IMAGENET_STD)
        spec, weights = type(model).__name__, ""
    if isinstance(module, torch.jit.ScriptModule):
        raise ModelError(
            "this is a TorchScript model: forward hooks cannot see its layers. Load the "
            "Python model instead (a torchvision name with --weights FILE, or "
            "package.module:factory)."
        )
    if steps < 1 or size < 8 or lr <= 0:
        raise FeatureMapsError(
            f"steps {steps}, size {size}, lr {lr}: need steps >= 1, size >= 8 and lr > 0"
        )
    tf = transforms if transforms is not None else NO_TRANSFORMS
    tf.validate()
    objs = parse_objectives(objectives)
    dev = _resolve(device)
    where = dev or _device_of(module)
    dtype = _dtype_of(module)

    def probe_input() -> torch.Tensor:
        return torch.zeros(1, 3, size, size, dtype=dtype, device=where)

    with _moved(module, dev):
        plan, objs = _plan(
            module,
            objs,
            lambda: list_layers(module, probe_input()),
            lambda: _output_of(module, probe_input()),
            categories,
        )
        gens = _generators(seed, objs)
        final_rgb, final, trace = _optimize(
            module, plan, gens, size, pp, tf, steps, lr, where, dtype, progress
        )
    pictures = final_rgb.permute(0, 2, 3, 1).to("cpu", torch.float32).numpy()
    items = [
        Visualization(
            objective=obj,
            image=np.ascontiguousarray(pictures[i]),
            value=float(final[i]),
            history=tuple(float(v) for v in trace[:, i]),
        )
        for i, obj in enumerate(objs)
    ]
    return Visualizations(items, steps, size, seed, lr, tf, spec, weights)


def _optimize(
    module: nn.Module,
    plan: _Plan,
    gens: Sequence[torch.Generator],
    size: int,
    pp: Preprocess,
    tf: Transforms,
    steps: int,
    lr: float,
    where: torch.device,
    dtype: torch.dtype,
    progress: Callable[[str, int, int], None] | None,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The loop: final pictures ``(B, 3, S, S)``, final values ``(B,)``, trace ``(steps, B)``."""
    mean = torch.tensor(pp.mean, dtype=torch.float32, device=where).view(1, 3, 1, 1)
    std = torch.tensor(pp.std, dtype=torch.float32, device=where).view(1, 3, 1, 1)
    history: list[torch.Tensor] = []
    with _session(module, plan) as session, torch.enable_grad():
        image = _Image(gens, size, where)
        optimizer = torch.optim.Adam([image.spectrum], lr=lr)
        for step in range(steps):
            x = (_transform(image.rgb(), tf, gens) - mean) / std
            values = session.objectives(x.to(dtype))
            (grad,) = torch.autograd.grad(-values.sum(), [image.spectrum])
            image.spectrum.grad = grad
            optimizer.step()
            history.append(values.detach().to("cpu", torch.float64))
            if progress is not None:
                progress("visualize", step + 1, steps)
        with torch.no_grad():
            final_rgb = image.rgb()
            final = session.objectives(((final_rgb - mean) / std).to(dtype)).float().cpu()
    return final_rgb.detach(), final, torch.stack(history).numpy()


def _resolve(device: str | torch.device | None) -> torch.device | None:
    if device is None or isinstance(device, torch.device):
        return device
    from .pipeline import resolve_device

    return resolve_device(device)


class _moved:
    """The module on ``device`` inside the block, back where it was after."""

    def __init__(self, module: nn.Module, device: torch.device | None):
        self.module, self.device, self.home = module, device, _device_of(module)

    def __enter__(self) -> None:
        if self.device is not None and self.device != self.home:
            self.module.to(self.device)

    def __exit__(self, *exc: Any) -> None:
        if self.device is not None and self.device != self.home:
            self.module.to(self.home)


def _output_of(module: nn.Module, x: torch.Tensor) -> Any:
    """The model's output on ``x`` (eval mode, no gradient), modes restored."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            return module(x)
    finally:
        for m, mode in modes:
            m.training = mode
