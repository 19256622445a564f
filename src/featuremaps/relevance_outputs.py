"""Relevance in ``featuremaps run`` and ``report``: what is computed and written.

Asked for with ``--target CLASS``, ``--order relevance`` or ``--relevance`` (never on a
plain run, which costs nothing extra). Per image, :func:`featuremaps.relevance.relevance`
runs once for the target class (``None``: the top-1 prediction); the report also asks for
the other top-5 classes in one more forward and backward (the image repeated, one class
per copy), so its class picker can switch between them without the model.

Written per layer: the manifest's ``relevance`` (the per-channel numbers exactly as
``relevance()`` returned them, in channel order), the grid ranked by them (highest first)
under ``--order relevance``, and ``KEY/LAYER.cam.png``: Grad-CAM, divided by its maximum,
upsampled bilinearly onto the input, with a colour bar saying so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .capture import LayoutContext
from .models import LoadedModel
from .relevance import Target, TargetError, class_index, relevance
from .render import _font, colorize, data_url, overlay
from .summaries import json_float, json_floats

__all__ = [
    "RELEVANCE_ORDER",
    "ClassRelevance",
    "ImageRelevance",
    "RelevanceRequest",
    "cam_picture",
    "check_request",
    "explain_image",
    "parse_target",
    "relevance_order",
    "report_json",
    "report_order",
    "request_from_options",
]

RELEVANCE_ORDER = "relevance"
"""The ``--order`` value that ranks each grid by relevance (highest first)."""


def parse_target(text: str | int | None) -> int | str | None:
    """``--target`` as typed: digits are a class index, anything else an ImageNet label."""
    if text is None or isinstance(text, int):
        return text
    s = text.strip()
    return int(s) if s.isdigit() else s


@dataclass(frozen=True)
class RelevanceRequest:
    """What relevance a run or report computes.

    Attributes:
        target: a class index, an ImageNet label, or ``None`` for each image's top-1.
        order: rank every grid by relevance (``--order relevance``).
        top_classes: also compute the relevance of this many top classes (the report's
            class picker); 0 for the target only.
    """

    target: int | str | None = None
    order: bool = False
    top_classes: int = 0


def check_request(loaded: LoadedModel, request: RelevanceRequest) -> None:
    """Refuse, before any compute, a class target the model cannot take.

    Raises:
        TargetError: the model is not an ImageNet classifier, or the label/index is unknown.
    """
    if not loaded.is_imagenet_classifier:
        raise TargetError(
            f"--target / --order relevance: a class target needs an ImageNet classifier "
            f"(1000 class outputs), and {loaded.spec!r} is not one. For another model, call "
            "featuremaps.relevance(model, x, layers, target=fn) in Python with fn mapping "
            "the model's output to one score per image."
        )
    if request.target is not None:
        class_index(request.target, 1000, loaded.categories)


@dataclass(frozen=True)
class ClassRelevance:
    """One class's relevance for one image, layer by layer (float32, as computed).

    Attributes:
        target: the class, its label and probability.
        channels: layer -> per-channel relevance ``(C,)``.
        gradcam: layer -> Grad-CAM ``(H, W)``, not normalized.
    """

    target: Target
    channels: dict[str, np.ndarray]
    gradcam: dict[str, np.ndarray]

    def order(self, layer: str) -> tuple[int, ...]:
        """The channels of ``layer`` from the most to the least relevant (ties by index,
        NaN last)."""
        return relevance_order(self.channels[layer])

    def layer_json(self, layer: str) -> list[float | None]:
        """The relevance of ``layer``'s channels for JSON (exact; NaN/Inf as null)."""
        return json_floats(self.channels[layer])

    def to_json(self, digits: int | None = None) -> dict[str, Any]:
        """``{target: {index, label, prob}, layers: {name: [relevance per channel]}}``."""
        return {
            "target": target_json(self.target),
            "layers": {n: json_floats(c, digits) for n, c in self.channels.items()},
        }


@dataclass(frozen=True)
class ImageRelevance:
    """The relevance computed for one image: the target first, then other top classes."""

    classes: list[ClassRelevance] = field(default_factory=list)

    @property
    def main(self) -> ClassRelevance:
        """The target's relevance (``--target``, or the top-1 prediction)."""
        return self.classes[0]


def target_json(t: Target) -> dict[str, Any]:
    """The manifest's ``target``: ``{index, label, prob}``."""
    prob = json_float(t.prob, 6) if t.prob is not None else None
    return {"index": t.index, "label": t.label, "prob": prob}


def relevance_order(channels: np.ndarray) -> tuple[int, ...]:
    """Channel indices from the most to the least relevant (ties by index, NaN last)."""
    key = np.nan_to_num(np.asarray(channels, np.float64), nan=-np.inf)
    return tuple(int(i) for i in np.argsort(-key, kind="stable"))


def _classes_of(rel: Any, i: int) -> ClassRelevance:
    return ClassRelevance(
        rel.targets[i],
        {n: lr.channels[i].numpy() for n, lr in rel.items()},
        {n: lr.gradcam[i].numpy() for n, lr in rel.items()},
    )


def explain_image(
    module: torch.nn.Module,
    x: torch.Tensor,
    layers: str | Sequence[str],
    request: RelevanceRequest,
    *,
    layout: LayoutContext | None = None,
) -> ImageRelevance:
    """The relevance of one image ``x`` ``(1, 3, H, W)`` to the request's classes.

    One forward and backward for the target; with ``top_classes``, one more for the other
    top classes together.
    """
    first = relevance(module, x, layers, request.target, layout=layout)
    out = [_classes_of(first, 0)]
    if request.top_classes > 0 and isinstance(first.output, torch.Tensor):
        top = [int(i) for i in first.output[0].float().topk(request.top_classes).indices]
        rest = [c for c in top if c != out[0].target.index]
        if rest:
            batch = x.expand(len(rest), *x.shape[1:])
            more = relevance(module, batch, layers, rest, layout=layout)
            out.extend(_classes_of(more, i) for i in range(len(rest)))
    return ImageRelevance(out)


def cam_picture(display: np.ndarray, gradcam: np.ndarray, title: str) -> Image.Image:
    """Grad-CAM over the input: the map divided by its maximum (0 stays 0), upsampled
    bilinearly to the input and blended at half weight in ``jet``; a colour bar below
    gives the scale (0 .. the maximum) and ``title``."""
    cam = np.asarray(gradcam, np.float64)
    finite = cam[np.isfinite(cam)]
    peak = float(finite.max()) if finite.size else 0.0
    scaled = (cam / peak if peak > 0 else np.zeros_like(cam)).astype(np.float32)
    pic = overlay(display, scaled, alpha=0.5, cmap="jet")
    w, h = pic.size
    bar_h, text_h = 10, 30
    canvas = Image.new("RGB", (w, h + bar_h + text_h + 4), (255, 255, 255))
    canvas.paste(pic, (0, 0))
    ramp = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :].repeat(bar_h, 0)
    canvas.paste(Image.fromarray(colorize(ramp, "jet").astype(np.uint8)), (0, h + 2))
    draw = ImageDraw.Draw(canvas)
    font = _font(11)
    draw.text((2, h + bar_h + 3), "0", fill=(0, 0, 0), font=font)
    top = f"{peak:.3g}"
    draw.text((w - 7 * len(top) - 2, h + bar_h + 3), top, fill=(0, 0, 0), font=font)
    draw.text((2, h + bar_h + 16), title[:60], fill=(0, 0, 0), font=font)
    return canvas


def request_from_options(
    order: str, target: str | int | None, flag: bool = False, top_classes: int = 0
) -> tuple[str, RelevanceRequest | None]:
    """The CLI's ``--order``/``--target``/``--relevance`` as the render order to use and the
    relevance to compute (``None``: no relevance, the plain run).

    ``--order relevance`` becomes the index order for :class:`RenderOptions` (each grid
    is then given its explicit relevance order per layer).
    """
    ranked = order.strip().lower() == RELEVANCE_ORDER
    if not (ranked or target is not None or flag):
        return order, None
    request = RelevanceRequest(parse_target(target), ranked, top_classes)
    return ("index" if ranked else order), request


def report_order(
    rel: ImageRelevance | None, request: RelevanceRequest | None, layer: str, default: Any
) -> Any:
    """The channel order of ``layer``'s embedded grid: by relevance under ``--order
    relevance``, else ``default``."""
    if rel is not None and request is not None and request.order:
        return rel.main.order(layer)
    return default


CAM_JPEG_QUALITY = 85


def report_json(rel: ImageRelevance, display: np.ndarray, digits: int = 6) -> dict[str, Any]:
    """What the report embeds of one image's relevance: per class (the target first,
    then the other top classes) its target, each layer's per-channel relevance (all
    channels, ``digits`` significant digits) and Grad-CAM over the input as a JPEG."""
    classes = []
    for c in rel.classes:
        label = c.target.label or str(c.target.index)
        layers = {
            name: {
                "relevance": json_floats(c.channels[name], digits),
                "cam": data_url(
                    cam_picture(display, c.gradcam[name], f"Grad-CAM {name}: {label}"),
                    "JPEG",
                    quality=CAM_JPEG_QUALITY,
                ),
            }
            for name in c.channels
        }
        classes.append({"target": target_json(c.target), "layers": layers})
    return {"classes": classes}
