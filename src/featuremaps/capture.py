"""Capturing what chosen layers return, as ``(B, C, H, W)`` maps.

Hooks live inside a context manager and are removed whatever happens. Each captured
value is copied the moment the module returns it, so a later in-place operation (VGG's
``ReLU(inplace=True)``) cannot change what is shown. The forward stops once the last
requested layer has run, unless the full output is asked for.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .errors import LayerError, suggest
from .layout import (
    LayerInfo,
    LayoutContext,
    _LayoutTracker,
    check_input_size,
    normalize_output,
    to_bchw,
)

__all__ = [
    "PRESETS",
    "Capture",
    "FeatureMaps",
    "LayerInfo",
    "LayoutContext",
    "capture",
    "list_layers",
    "resolve_layers",
    "to_bchw",
]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class FeatureMaps(Mapping[str, torch.Tensor]):
    """Captured maps, layer name -> ``(B, C, H, W)`` tensor on the CPU, in request order.

    Attributes:
        maps: the tensors.
        info: per-layer :class:`LayerInfo`.
        output: the model's own output when the full forward ran, else ``None``.
        input_shape: shape of the input batch.
    """

    maps: dict[str, torch.Tensor]
    info: dict[str, LayerInfo]
    output: Any = None
    input_shape: tuple[int, ...] = ()
    stopped_early: bool = False

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            return self.maps[key]
        except KeyError:
            raise KeyError(f"{key!r} was not captured.{suggest(key, self.maps)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.maps)

    def __len__(self) -> int:
        return len(self.maps)

    def __repr__(self) -> str:
        rows = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.maps.items())
        return f"FeatureMaps({rows})"


# -- layer selection -------------------------------------------------------------------------

Preset = Callable[[nn.Module, list[LayerInfo]], list[str]]


def _spine(model: nn.Module) -> set[str]:
    """Modules whose parent is the model itself or a plain container."""
    names: set[str] = set()

    def walk(prefix: str, mod: nn.Module) -> None:
        for child_name, child in mod.named_children():
            full = f"{prefix}.{child_name}" if prefix else child_name
            names.add(full)
            if isinstance(child, _CONTAINERS):
                walk(full, child)

    walk("", model)
    return names


def _base(name: str) -> str:
    return name.split("[", 1)[0]


_PASS_THROUGH = frozenset(
    {"Identity", "Dropout", "Permute", "Flatten", "StochasticDepth", "DropPath"}
)
"""Module types that only pass their input on (in eval mode) or change its layout."""


def preset_stages(model: nn.Module, order: list[LayerInfo]) -> list[str]:
    """The last output at each spatial resolution along the model's spine.

    ``order`` holds every module's output in the order modules returned. For a ResNet
    this gives ``relu, layer1, layer2, layer3, layer4``; for a torchvision ViT the
    encoder's output (one resolution); for Swin the last block of each stage and the
    final norm. Maps with a side of 1 and pass-through modules (``Identity``,
    ``Dropout``, ``Permute``) are never picked.
    """
    spine = _spine(model)
    picked: list[str] = []
    current: tuple[int, ...] | None = None
    last: str | None = None
    for info in order:
        if _base(info.name) not in spine or info.shape is None:
            continue
        if info.module_type.startswith("Adaptive") or info.module_type in _PASS_THROUGH:
            continue  # a classifier head's pooling, or the same data as the layer before
        hw = tuple(info.shape[-2:])
        if min(hw) <= 1:
            continue
        if current is not None and hw != current and last is not None:
            picked.append(last)
        current, last = hw, info.name
    if last is not None:
        picked.append(last)
    return list(dict.fromkeys(picked))


def _block_names(model: nn.Module) -> set[str]:
    """Modules that are repeated blocks: the innermost level of repetition.

    A candidate is a module with submodules that is not a plain container and sits in a
    container (or directly in the model). Its type counts as a block type when, in some
    container, two candidates of that type follow each other (ResNet's ``BasicBlock``,
    ViT's ``EncoderBlock``, Swin's ``SwinTransformerBlock``; not Swin's ``PatchMerging``,
    which sits between stages). A candidate that holds other blocks (a timm stage
    holding ``ConvNeXtBlock``) gives way to them.
    """
    candidates: dict[str, nn.Module] = {}
    block_types: set[type[nn.Module]] = set()
    for parent_name, parent in [("", model), *model.named_modules()]:
        if parent is not model and not isinstance(parent, _CONTAINERS):
            continue
        previous: type[nn.Module] | None = None
        for child_name, child in parent.named_children():
            if isinstance(child, _CONTAINERS) or next(child.children(), None) is None:
                previous = None
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            candidates[full] = child
            if type(child) is previous:
                block_types.add(type(child))
            previous = type(child)
    blocks = {n for n, m in candidates.items() if type(m) in block_types}
    return {n for n in blocks if not any(o.startswith(n + ".") for o in blocks)}


def preset_blocks(model: nn.Module, order: list[LayerInfo]) -> list[str]:
    """Each repeated block's output in execution order (see :func:`_block_names`).

    For a ViT the token output of every encoder block (``encoder.layers.encoder_layer_0``
    ... or timm's ``blocks.0`` ...), for Swin every ``SwinTransformerBlock``, for a ResNet
    every residual block.
    """
    blocks = _block_names(model)
    return [
        i.name
        for i in order
        if _base(i.name) in blocks and i.shape is not None and min(i.shape[-2:]) > 1
    ]


def preset_convs(model: nn.Module, order: list[LayerInfo]) -> list[str]:
    """Every ``Conv2d``, in execution order."""
    return [i.name for i in order if i.module_type == "Conv2d" and i.shape is not None]


PRESETS: dict[str, Preset] = {
    "stages": preset_stages,
    "blocks": preset_blocks,
    "convs": preset_convs,
}
"""Named layer sets. Each takes the model and every layer's info in execution order."""


def _named_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n}


def _request_list(layers: str | Sequence[str]) -> list[str]:
    items = layers.split(",") if isinstance(layers, str) else list(layers)
    return [s.strip() for s in items if s and s.strip()]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob over dotted names: ``*`` and ``?`` stay within one name part, ``**`` crosses.

    So ``layer*`` gives ``layer1``..``layer4`` but not ``layer1.0.conv1``, and
    ``features.*`` gives the children of ``features``.
    """
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if ch == "*":
            out.append("[^.]*")
        elif ch == "?":
            out.append("[^.]")
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(ch))
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
                i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out))


def needs_probe(layers: str | Sequence[str]) -> bool:
    """Whether the request names a preset (which needs one forward to resolve)."""
    return any(r in PRESETS for r in _request_list(layers))


def resolve_layers(
    model: nn.Module,
    layers: str | Sequence[str],
    probe: list[LayerInfo] | None = None,
) -> list[str]:
    """Turn names, glob patterns and presets into module names, in request order.

    Args:
        model: the model.
        layers: a comma-separated string or a list of names, globs (``layer*``,
            ``features.*``) and presets (``stages``, ``blocks``, ``convs``). A preset
            wins over a module of the same name (timm's ``blocks``: the preset gives
            each block, whose last one is what the module returns).
        probe: every layer's info in execution order (see :func:`list_layers`); needed
            for presets.

    Raises:
        LayerError: a name matches nothing; the message lists the closest valid names.
    """
    modules = _named_modules(model)
    requests = _request_list(layers)
    if not requests:
        raise LayerError("no layers requested. List them with: featuremaps layers MODEL")
    out: list[str] = []
    for req in requests:
        if req in PRESETS:
            if probe is None:
                raise LayerError(f"preset {req!r} needs an example input to resolve")
            hits = PRESETS[req](model, probe)
            if not hits:
                raise LayerError(f"preset {req!r} matches no layer of this model")
        elif req in modules or _base(req) in modules:
            hits = [req]
        elif any(ch in req for ch in "*?["):
            pattern = _glob_regex(req)
            hits = [n for n in modules if pattern.fullmatch(n)]
            if not hits:
                raise LayerError(
                    f"pattern {req!r} matches no layer.{suggest(req, modules)} "
                    "List the layers with: featuremaps layers MODEL"
                )
        else:
            valid = list(modules) + list(PRESETS)
            raise LayerError(
                f"unknown layer {req!r}.{suggest(req, valid)} Presets: "
                f"{', '.join(PRESETS)}. List every layer with: featuremaps layers MODEL"
            )
        out.extend(h for h in hits if h not in out)
    return out


# -- hooks -----------------------------------------------------------------------------------


def _refuse_torchscript(model: nn.Module) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise LayerError(
            "this is a TorchScript model: its layers run inside TorchScript, where "
            "forward hooks cannot see them, so no layer can be captured. Load the Python "
            "model instead (`package.module:factory`, or a torchvision name with "
            "--weights FILE for a state dict)."
        )


class _StopForward(Exception):
    """Raised from a hook once every requested layer has run."""


def _copy_output(output: Any) -> Any:
    """Detach and copy every tensor of an output to the CPU, keeping its structure."""
    if isinstance(output, torch.Tensor):
        return output.detach().to("cpu", copy=True)
    if isinstance(output, Mapping):
        return {k: _copy_output(v) for k, v in output.items()}
    if isinstance(output, list):
        return [_copy_output(v) for v in output]
    if isinstance(output, tuple):
        return tuple(_copy_output(v) for v in output)
    return output


class Capture:
    """Context manager that records chosen layers while you run the forward yourself.

    Example:
        >>> import torch, torchvision
        >>> model = torchvision.models.resnet18().eval()
        >>> with Capture(model, ["layer1", "layer2"]) as cap:
        ...     _ = model(torch.rand(1, 3, 64, 64))
        >>> tuple(cap.maps["layer1"].shape)
        (1, 64, 16, 16)

    Presets (``stages``) need ``example_input`` to resolve. Hooks are removed and every
    module's train/eval mode is restored on exit, also when the forward raises.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str],
        *,
        example_input: torch.Tensor | None = None,
        early_stop: bool = False,
        eval_mode: bool = True,
        layout: LayoutContext | None = None,
    ) -> None:
        self.model = model
        probe = None
        if needs_probe(layers):
            if example_input is None:
                raise LayerError("presets need example_input= to find the layers")
            probe = list_layers(model, example_input, layout=layout)
        self.names = resolve_layers(model, layers, probe)
        self.early_stop = early_stop
        self.eval_mode = eval_mode
        self.layout = layout
        self._raw: dict[str, Any] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._modes: dict[nn.Module, bool] = {}
        self._maps: FeatureMaps | None = None
        self._input_hw: tuple[int, int] | None = None
        self._tracker = _LayoutTracker()

    def _hook_for(self, name: str) -> Callable[..., None]:
        targets = {_base(n) for n in self.names}

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if name in self._raw:
                return  # a module called twice: keep its first output
            self._raw[name] = _copy_output(output)
            if self.early_stop and targets.issubset(self._raw):
                raise _StopForward

        return hook

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        for a in args if isinstance(args, tuple) else (args,):
            if isinstance(a, torch.Tensor) and a.ndim == 4:
                self._input_hw = (int(a.shape[-2]), int(a.shape[-1]))
                return

    def __enter__(self) -> Capture:
        _refuse_torchscript(self.model)
        modules = _named_modules(self.model)
        self._modes = {m: m.training for m in self.model.modules()}
        try:
            if self.eval_mode:
                self.model.eval()
            self._handles.append(self.model.register_forward_pre_hook(self._pre_hook))
            self._tracker = _LayoutTracker()
            self._tracker.attach(self.model)  # before the hooks that may stop the forward
            for base in dict.fromkeys(_base(n) for n in self.names):
                handle = modules[base].register_forward_hook(self._hook_for(base))
                self._handles.append(handle)
        except BaseException:
            self._release()
            raise
        return self

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._tracker.detach()
        for module, mode in self._modes.items():
            module.training = mode

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self._release()
        return exc_type is _StopForward

    @property
    def maps(self) -> FeatureMaps:
        """The captured maps (after the forward has run)."""
        if self._maps is None:
            self._maps = self._collect()
        return self._maps

    def _collect(self) -> FeatureMaps:
        modules = _named_modules(self.model)
        hw = self._input_hw or (0, 0)
        ctx = self.layout or LayoutContext(input_hw=hw, model=self.model)
        if self.layout is not None and self._input_hw is not None:
            ctx = replace(self.layout, input_hw=self._input_hw)
        ctx = replace(
            ctx,
            model=ctx.model if ctx.model is not None else self.model,
            batch=self._tracker.batch if ctx.batch is None else ctx.batch,
            layouts=self._tracker.layouts,
        )
        maps: dict[str, torch.Tensor] = {}
        info: dict[str, LayerInfo] = {}
        bases = list(dict.fromkeys(_base(n) for n in self.names))
        missing = [b for b in bases if b not in self._raw]
        if missing:
            raise LayerError(
                f"layer(s) {', '.join(missing)} never ran during the forward pass "
                "(not used by forward(), or the forward stopped before them)"
            )
        for base in bases:
            entries = normalize_output(base, modules[base], self._raw[base], ctx)
            keys = [key for key, _, _ in entries]
            asked = [n for n in self.names if _base(n) == base and n != base]
            unknown = [n for n in asked if n not in keys]
            if unknown:
                raise LayerError(
                    f"layer {base!r} has no output entry {', '.join(unknown)}; its entries "
                    f"are {', '.join(keys)}.{suggest(unknown[0], keys)}"
                )
            whole = base in self.names
            spatial = [e for e in entries if e[1] is not None]
            for key, m, li in entries:
                if not whole and key not in asked:
                    continue
                if m is None:
                    if whole and spatial:
                        continue  # e.g. the logits beside the maps of a tuple output
                    hint = (
                        ""
                        if "tokens" in li.note
                        else " Pick a layer before pooling/flatten;"
                        " `featuremaps layers MODEL` shows every layer's shape."
                    )
                    raise LayerError(
                        f"layer {key!r} ({li.module_type}) gives no spatial map: "
                        f"{li.note or li.layout}.{hint}"
                    )
                maps[key] = m.contiguous()
                info[key] = li
        return FeatureMaps(maps=maps, info=info)


def capture(
    model: nn.Module,
    x: torch.Tensor,
    layers: str | Sequence[str],
    *,
    full_forward: bool = False,
    layout: LayoutContext | None = None,
) -> FeatureMaps:
    """Run ``model`` on ``x`` and return the maps of ``layers``.

    Args:
        model: any ``nn.Module``; its train/eval mode is restored afterwards.
        x: the input batch ``(B, 3, H, W)`` on the model's device.
        layers: names, glob patterns or presets (``stages``, ``blocks``, ``convs``), as
            a list or a comma-separated string.
        full_forward: run the whole model and keep its output in ``.output``; otherwise
            the forward stops after the last requested layer.
        layout: overrides for token layouts (grid, prefix tokens).

    Returns:
        :class:`FeatureMaps` with ``(B, C, H, W)`` CPU tensors.

    Raises:
        LayerError: unknown names (with suggestions), layers that never ran, or outputs
            that are not spatial maps. Raised before any hook is registered for names.

    Example:
        >>> import torch, torchvision
        >>> m = torchvision.models.vgg11()
        >>> fm = capture(m, torch.rand(1, 3, 64, 64), "features.3")
        >>> tuple(fm["features.3"].shape)
        (1, 128, 32, 32)
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise LayerError(f"input must be a (B, C, H, W) tensor, got {shape}")
    check_input_size(model, x)
    cap = Capture(model, layers, example_input=x, early_stop=not full_forward, layout=layout)
    output = None
    stopped = False
    with torch.no_grad(), cap:
        try:
            output = model(x)
        except _StopForward:
            stopped = True
    result = cap.maps
    result.input_shape = tuple(x.shape)
    result.stopped_early = stopped
    if output is not None:
        result.output = _copy_output(output)
    return result


_PROBES: weakref.WeakKeyDictionary[nn.Module, dict[Any, list[LayerInfo]]] = (
    weakref.WeakKeyDictionary()
)


def list_layers(
    model: nn.Module, x: torch.Tensor, *, layout: LayoutContext | None = None
) -> list[LayerInfo]:
    """Every module's output, in the order modules returned (one forward, no copies).

    Modules that did not run are appended at the end with ``raw_shape=None``. The result
    is cached per model and input shape.
    """
    _refuse_torchscript(model)
    check_input_size(model, x)
    key = (tuple(x.shape), x.dtype, str(x.device), layout is not None and repr(layout))
    cached = _PROBES.get(model, {}).get(key)
    if cached is not None:
        return cached
    modules = _named_modules(model)
    tracker = _LayoutTracker((int(x.shape[-2]), int(x.shape[-1])))
    ctx = layout or LayoutContext(input_hw=(int(x.shape[-2]), int(x.shape[-1])), model=model)
    ctx = replace(
        ctx,
        input_hw=(int(x.shape[-2]), int(x.shape[-1])),
        model=ctx.model if ctx.model is not None else model,
        batch=int(x.shape[0]),
        layouts=tracker.layouts,
    )
    order: list[LayerInfo] = []
    seen: set[str] = set()
    handles = []
    modes = {m: m.training for m in model.modules()}

    def make(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if name in seen:
                return
            seen.add(name)
            for _, _, li in normalize_output(name, module, output, ctx):
                order.append(li)

        return hook

    try:
        model.eval()
        tracker.attach(model)  # first, so each layout is decided before `make` reads it
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make(name)))
        with torch.no_grad():
            model(x)
    finally:
        tracker.detach()
        for h in handles:
            h.remove()
        for module, mode in modes.items():
            module.training = mode
    for name, module in modules.items():
        if name not in seen:
            order.append(LayerInfo(name, type(module).__name__, None, note="did not run"))
    _PROBES.setdefault(model, {})[key] = order
    return order
