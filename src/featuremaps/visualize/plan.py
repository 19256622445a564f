"""Reading objectives during the forward: which module outputs, which rows, which maps.

Every objective is checked against the model before the optimization starts (unknown
layers with suggestions, channels and classes out of range), then read from the module's
output as a ``(B, C, H, W)`` map by the :class:`~featuremaps.capture.Layout` record the
probe (:func:`~featuremaps.capture.list_layers`) decided: as it is, channels-last, or
tokens on their patch grid.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..capture import LayerInfo, LayoutKind
from ..errors import suggest
from .objectives import Objective, ObjectiveError, ObjectiveKind


class StopForward(Exception):
    """Raised from a hook once every layer the objectives read has run."""


@dataclass
class Reader:
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
class Plan:
    """Which module outputs to read, for which rows, and whether the forward may stop."""

    readers: dict[str, list[Reader]]
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


def plan_objectives(
    module: nn.Module,
    objectives: Sequence[Objective],
    probe: Callable[[], list[LayerInfo]],
    model_output: Callable[[], Any],
    categories: Sequence[str] | None,
) -> tuple[Plan, list[Objective]]:
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
    readers: dict[str, Reader] = {}
    class_rows: list[int] = []
    class_index: list[int] = []
    resolved: list[Objective] = []
    output: Any = None
    for row, obj in enumerate(objectives):
        if obj.kind is ObjectiveKind.CLASS:
            if output is None:
                output = model_output()  # one forward, for every class objective
            obj = _resolve_class(obj, output, categories)
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
        reader = readers.setdefault(info.name, Reader(info))
        reader.rows.append(row)
        reader.kinds.append(obj.kind)
        reader.channels.append(obj.index or 0)
        resolved.append(obj)
    by_module: dict[str, list[Reader]] = {}
    for reader in readers.values():
        by_module.setdefault(reader.info.key.module, []).append(reader)
    return Plan(by_module, class_rows, class_index, len(objectives)), resolved


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
