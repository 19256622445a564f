"""Which channels matter: gradient x activation, Grad-CAM and LayerCAM for chosen layers.

For a target (a class, or any scalar per image), one forward and one backward give, for
every requested output ``A`` with gradient ``G = d target / d A``:

* the gradient-times-activation map ``G * A`` ``(B, C, H, W)``;
* the per-channel relevance, its sum over space ``(B, C)``: a first-order estimate of how
  much each channel contributes to the target;
* Grad-CAM ``relu(sum_c mean_hw(G_c) * A_c)`` ``(B, H, W)`` (Selvaraju et al., 2017);
* LayerCAM ``relu(sum_c relu(G_c) * A_c)`` ``(B, H, W)`` (Jiang et al., 2021).

``A`` is exactly what the module returned (laid out as a map the way capture lays it
out: channels-last permuted, prefix tokens dropped), and ``G`` is the gradient with
respect to that very tensor, also where an in-place op follows (see
:class:`~featuremaps.capture.Capture`'s ``keep_graph``). Gradients are taken with
``torch.autograd.grad`` with respect to the captured outputs only: no parameter's
``.grad`` is touched and no graph is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .capture import Capture, LayerInfo, LayoutContext, check_input_size
from .capture.layout import map_tensors, tensors_of
from .errors import FeatureMapsError, LayerError, suggest

__all__ = ["LayerRelevance", "Relevance", "Target", "TargetError", "class_index", "relevance"]


class TargetError(FeatureMapsError):
    """The target cannot be read: unknown label, class out of range, not a classifier."""


TargetSpec = int | str | Sequence[int | str] | Callable[[Any], torch.Tensor] | None


@dataclass(frozen=True)
class Target:
    """The target of one image.

    Attributes:
        index: the class index, ``None`` for a callable target.
        label: the class name (ImageNet names for 1000-class outputs), else ``None``.
        prob: the softmax probability of the class, ``None`` for a callable target.
        score: the value differentiated: the class logit, or the callable's value.
    """

    index: int | None
    label: str | None
    prob: float | None
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "prob": self.prob, "score": self.score}


@dataclass(frozen=True)
class LayerRelevance:
    """Relevance of one captured output (all tensors on the CPU, detached).

    Attributes:
        name: the output's name, as ``--layers`` takes it.
        info: its :class:`~featuremaps.capture.LayerInfo`.
        activation: what the module returned, as a map ``(B, C, H, W)``.
        gradient: d target / d activation ``(B, C, H, W)``.
        channels: per-channel relevance, ``(gradient * activation)`` summed over space
            ``(B, C)``.
        gradcam: Grad-CAM ``(B, H, W)``, not normalized.
        layercam: LayerCAM ``(B, H, W)``, not normalized.
    """

    name: str
    info: LayerInfo
    activation: torch.Tensor
    gradient: torch.Tensor
    channels: torch.Tensor
    gradcam: torch.Tensor
    layercam: torch.Tensor

    @property
    def grad_x_act(self) -> torch.Tensor:
        """The gradient-times-activation map ``(B, C, H, W)``."""
        return self.gradient * self.activation


@dataclass(frozen=True)
class Relevance(Mapping[str, LayerRelevance]):
    """Output name -> :class:`LayerRelevance`, in request order, with the targets.

    Attributes:
        layers: the per-output results.
        targets: one :class:`Target` per image.
        output: the model's output (detached, on the CPU).
    """

    layers: dict[str, LayerRelevance]
    targets: tuple[Target, ...]
    output: Any = None

    def __getitem__(self, key: str) -> LayerRelevance:
        try:
            return self.layers[key]
        except KeyError:
            raise KeyError(f"{key!r} was not computed.{suggest(key, self.layers)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


# -- targets ----------------------------------------------------------------------------------


def class_index(spec: int | str, classes: int, labels: Sequence[str] | None = None) -> int:
    """The class index a target names, checked before any compute.

    Args:
        spec: a class index or a class label (case-insensitive).
        classes: how many classes the model's output has.
        labels: the class names; by default the ImageNet names for 1000 classes.

    Raises:
        TargetError: an index out of range, or a label that is not a class name (with the
            closest names).
    """
    if labels is None:
        labels = _labels_for(classes)
    if isinstance(spec, str):
        if labels is None:
            raise TargetError(
                f"target {spec!r} is a label, but the model has {classes} outputs, not the "
                "1000 ImageNet classes: give a class index"
            )
        folded = {name.lower(): i for i, name in enumerate(labels)}
        found = folded.get(spec.strip().lower())
        if found is None:
            raise TargetError(
                f"unknown ImageNet label {spec!r}.{suggest(spec.lower(), folded)} "
                "See featuremaps.models.imagenet_categories() for the names."
            )
        return found
    if isinstance(spec, bool) or not isinstance(spec, int) or not 0 <= spec < classes:
        raise TargetError(f"target class {spec!r} is not an index in 0..{classes - 1}")
    return spec


def _labels_for(classes: int) -> list[str] | None:
    if classes != 1000:
        return None
    from .models import imagenet_categories

    return imagenet_categories()


def _scores(output: Any, target: TargetSpec, batch: int) -> tuple[torch.Tensor, list[Target]]:
    """The scalar per image to differentiate, and what it is."""
    if callable(target):
        scores = target(output)
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (batch,):
            what = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores)
            raise TargetError(f"a target callable must return a ({batch},) tensor, got {what}")
        return scores, [Target(None, None, None, float(s)) for s in scores.detach().cpu()]
    if not isinstance(output, torch.Tensor) or output.ndim != 2 or output.shape[0] != batch:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise TargetError(
            f"a class target needs a classifier returning (B, classes) logits; this model "
            f"returns {got}. Pass target= a callable from the output to one score per image."
        )
    classes = int(output.shape[1])
    labels = _labels_for(classes)
    if target is None:
        picks = [int(i) for i in output.detach().argmax(1).cpu()]
    elif isinstance(target, (int, str)):
        picks = [class_index(target, classes, labels)] * batch
    else:
        if len(target) != batch:
            raise TargetError(f"{len(target)} targets for a batch of {batch} images")
        picks = [class_index(t, classes, labels) for t in target]
    index = torch.tensor(picks, device=output.device)
    scores = output.gather(1, index[:, None])[:, 0]
    probs = output.detach().float().softmax(1).gather(1, index[:, None])[:, 0].cpu()
    targets = [
        Target(i, labels[i] if labels else None, float(p), float(s))
        for i, p, s in zip(picks, probs, scores.detach().cpu(), strict=True)
    ]
    return scores, targets


# -- the maps ---------------------------------------------------------------------------------


def _layer_result(name: str, info: LayerInfo, a: torch.Tensor, g: torch.Tensor) -> LayerRelevance:
    a = a.detach().float().cpu()
    g = g.detach().float().cpu()
    weights = g.mean(dim=(2, 3), keepdim=True)
    return LayerRelevance(
        name=name,
        info=info,
        activation=a,
        gradient=g,
        channels=(g * a).sum(dim=(2, 3)),
        gradcam=torch.relu((weights * a).sum(dim=1)),
        layercam=torch.relu((torch.relu(g) * a).sum(dim=1)),
    )


def _gradients(scores: torch.Tensor, raw: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """d sum(scores) / d every tensor in ``raw``, shaped like ``raw`` (zeros if unused)."""
    flat = [t for calls in raw.values() for out in calls for _, t in tensors_of(out)]
    wanted = [t for t in flat if t.requires_grad]
    found = torch.autograd.grad(scores.sum(), wanted, allow_unused=True) if wanted else ()
    by_id = {id(t): g for t, g in zip(wanted, found, strict=True)}

    def grad_of(t: torch.Tensor) -> torch.Tensor:
        g = by_id.get(id(t))
        return torch.zeros_like(t) if g is None else g

    return {base: [map_tensors(out, grad_of) for out in calls] for base, calls in raw.items()}


def relevance(
    model: nn.Module,
    x: torch.Tensor,
    layers: str | Sequence[str],
    target: TargetSpec = None,
    *,
    layout: LayoutContext | None = None,
) -> Relevance:
    """Relevance of every channel of ``layers`` to ``target``, with Grad-CAM and LayerCAM.

    One forward and one backward for all layers. The model's mode is restored, its hooks
    removed (after a failure too), no parameter's ``.grad`` is touched and no graph is
    kept.

    Args:
        model: any ``nn.Module``; run in eval mode.
        x: the input batch ``(B, 3, H, W)`` on the model's device.
        layers: as for :func:`featuremaps.capture` (names, ``NAME:k``, ``NAME[key]``,
            globs, presets).
        target: a class index; an ImageNet label (``"tabby"``, for 1000-class models);
            one of these per image; ``None`` for each image's top-1 class; or a callable
            from the model's output to a ``(B,)`` tensor of scores (any model). Class
            targets differentiate the class logit.
        layout: overrides for token layouts, as for capture.

    Returns:
        :class:`Relevance`: output name -> :class:`LayerRelevance`, and the targets.

    Raises:
        LayerError: unknown layers (before any compute), outputs that are not maps.
        TargetError: a target that cannot be read for this model.

    Example:
        >>> import torch, torchvision
        >>> m = torchvision.models.resnet18(num_classes=10)
        >>> r = relevance(m, torch.rand(1, 3, 64, 64), "layer3,layer4", target=3)
        >>> tuple(r["layer4"].channels.shape), tuple(r["layer4"].gradcam.shape)
        ((1, 512), (1, 2, 2))
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise LayerError(f"input must be a (B, C, H, W) tensor, got {shape}")
    if isinstance(target, str) or (target is not None and not callable(target)):
        _check_static_target(target)
    check_input_size(model, x)
    cap = Capture(model, layers, example_input=x, layout=layout, keep_graph=True)
    with torch.inference_mode(False), torch.enable_grad(), cap:
        # a copy made here is an ordinary tensor even if x was made in inference mode, and
        # requiring its gradient gives a graph even when every parameter is frozen
        inp = x.detach().clone().requires_grad_(x.is_floating_point())
        output = model(inp)
        scores, targets = _scores(output, target, int(x.shape[0]))
        grads = cap.collect(_gradients(scores, cap.raw))  # frees the graph
        acts = cap.collect(
            {
                b: [map_tensors(o, torch.Tensor.detach) for o in calls]
                for b, calls in cap.raw.items()
            }
        )
    results = {name: _layer_result(name, acts.info[name], acts[name], grads[name]) for name in acts}
    return Relevance(results, tuple(targets), map_tensors(output, lambda t: t.detach().cpu()))


def _check_static_target(target: TargetSpec) -> None:
    """Refuse a malformed class target before the forward (ranges need the output)."""
    items = [target] if isinstance(target, (int, str)) else target
    if not isinstance(items, Sequence) or not all(isinstance(t, (int, str)) for t in items):
        raise TargetError(
            f"target must be a class index, an ImageNet label, a list of them (one per "
            f"image), None (top-1) or a callable; got {target!r}"
        )
