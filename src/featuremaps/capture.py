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
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
from torch import nn

from .errors import LayerError, suggest
from .layout import (
    LayerInfo,
    LayoutContext,
    _LayoutRecord,
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
    for parent_name, parent in model.named_modules():
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


@dataclass
class _ModelMemo:
    """What earlier captures learned about one model, kept while its modules stay the same.

    ``probes`` holds :func:`list_layers` results, ``layouts`` the layout tracker's
    decisions; both are keyed by the input (see :func:`_signature`).
    """

    modules: list[tuple[str, weakref.ref[nn.Module]]]
    probes: dict[Any, list[LayerInfo]] = field(default_factory=dict)
    layouts: dict[Any, _LayoutRecord] = field(default_factory=dict)

    def matches(self, named: list[tuple[str, nn.Module]]) -> bool:
        return len(named) == len(self.modules) and all(
            name == known and ref() is module
            for (name, module), (known, ref) in zip(named, self.modules, strict=True)
        )

    def record(self, sig: Any) -> _LayoutRecord:
        """The layout record for inputs with this signature (the oldest goes beyond 16)."""
        found = self.layouts.get(sig)
        if found is None:
            found = _keep(self.layouts, sig, _LayoutRecord())
        return found

    def keep_probe(self, key: Any, order: list[LayerInfo]) -> None:
        _keep(self.probes, key, order)


_V = TypeVar("_V")


def _keep(kept: dict[Any, _V], key: Any, value: _V) -> _V:
    """``kept[key] = value``, first dropping the oldest entry once there are _MEMO_SIZE."""
    if len(kept) >= _MEMO_SIZE:
        del kept[next(iter(kept))]
    kept[key] = value
    return value


_MEMO_SIZE = 16
"""Input signatures remembered per model (a server sees pictures of many sizes)."""


_MEMOS: weakref.WeakKeyDictionary[nn.Module, _ModelMemo] = weakref.WeakKeyDictionary()


def _memo_for(model: nn.Module, named: list[tuple[str, nn.Module]]) -> _ModelMemo:
    """The model's memo, started afresh when a module was added, removed or replaced.

    Args:
        model: the model.
        named: ``list(model.named_modules())``, walked just now.
    """
    memo = _MEMOS.get(model)
    if memo is None or not memo.matches(named):
        memo = _ModelMemo([(name, weakref.ref(module)) for name, module in named])
        _MEMOS[model] = memo
    return memo


def _signature(x: torch.Tensor, training: bool) -> tuple[Any, ...]:
    """What a forward's path may depend on, besides the modules and the data.

    Args:
        x: the model's input.
        training: the model's mode during the forward.
    """
    return (tuple(x.shape), x.dtype, x.device, training)


def _enter_eval(
    model: nn.Module, named: list[tuple[str, nn.Module]], eval_mode: bool
) -> list[tuple[nn.Module, bool]]:
    """Put ``model`` in eval mode (when asked and not there yet); return every module's mode."""
    modes = [(module, module.training) for _, module in named]
    if eval_mode and any(mode for _, mode in modes):
        model.eval()
    return modes


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, mode in modes:
        if module.training != mode:
            module.training = mode


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

    Deciding which outputs are channels-last takes a hook on every module for one
    forward. The decisions are kept per model and input (shape, dtype, device, mode)
    while the model's modules stay the same; with ``example_input`` given and decisions
    kept for it, only the requested layers are hooked. Should the forward then run on
    another kind of input, every module is hooked from its start after all.
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
        self._expected = (
            _signature(example_input, model.training and not eval_mode)
            if isinstance(example_input, torch.Tensor)
            else None
        )
        self._bases = list(dict.fromkeys(_base(n) for n in self.names))
        self._raw: dict[str, Any] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._modes: list[tuple[nn.Module, bool]] = []
        self._maps: FeatureMaps | None = None
        self._modules: dict[str, nn.Module] = {}
        self._named: list[tuple[str, nn.Module]] = []
        self._memo: _ModelMemo | None = None
        self._record: _LayoutRecord | None = None
        self._tracker: _LayoutTracker | None = None
        self._root_calls = 0
        self._signature: tuple[Any, ...] | None = None  # of the input the forward ran on

    def _hook_for(self, name: str) -> Callable[..., None]:
        targets = set(self._bases)

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if name in self._raw:
                return  # a module called twice: keep its first output
            self._raw[name] = _copy_output(output)
            if self.early_stop and targets.issubset(self._raw):
                raise _StopForward

        return hook

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        """The model's own forward starts: note the input, check the kept layouts fit it."""
        self._root_calls += 1
        if self._root_calls > 1:
            return  # the maps are those of the first forward: keep its input size
        for a in args if isinstance(args, tuple) else (args,):
            if isinstance(a, torch.Tensor) and a.ndim == 4:
                self._signature = _signature(a, module.training)
                break
        if self._record is not None and self._signature != self._expected:
            self._record = None  # kept for another input: follow this forward instead
            self._attach_tracker(late=True).start(module, args)

    def _attach_tracker(self, *, late: bool = False) -> _LayoutTracker:
        """Hook every module; ``late``: from the model's pre-hook, ahead of our hooks."""
        self._tracker = _LayoutTracker()
        self._tracker.attach(self.model, self._named, prepend=late)
        return self._tracker

    def __enter__(self) -> Capture:
        _refuse_torchscript(self.model)
        self._named = list(self.model.named_modules())
        self._modules = {name: module for name, module in self._named if name}
        self._memo = _memo_for(self.model, self._named)
        self._modes = []
        self._record = self._tracker = None
        self._root_calls = 0
        try:
            self._modes = _enter_eval(self.model, self._named, self.eval_mode)
            self._handles.append(self.model.register_forward_pre_hook(self._pre_hook))
            record = self._memo.layouts.get(self._expected)
            if record is not None and record.covers(self._bases):
                self._record = record
            else:
                self._attach_tracker()  # before the hooks that may stop the forward
            for base in self._bases:
                handle = self._modules[base].register_forward_hook(self._hook_for(base))
                self._handles.append(handle)
        except BaseException:
            self._release()
            raise
        return self

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._tracker is not None:
            self._tracker.detach()
        _restore_modes(self._modes)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self._release()
        if exc_type is None or exc_type is _StopForward:
            self._keep_layouts()
        return exc_type is _StopForward

    def _keep_layouts(self) -> None:
        """Keep the tracker's decisions for later captures on the same kind of input."""
        tracker, memo, sig = self._tracker, self._memo, self._signature
        if tracker is None or memo is None or sig is None or self._root_calls != 1:
            return
        memo.record(sig).add(tracker)

    @property
    def maps(self) -> FeatureMaps:
        """The captured maps (after the forward has run)."""
        if self._maps is None:
            self._maps = self._collect()
        return self._maps

    def _layouts(self) -> dict[str, tuple[str, str]]:
        """The layout decisions for the captured outputs: tracked now, or kept from before."""
        if self._tracker is not None:
            return self._tracker.layouts
        if self._record is None:
            return {}
        outputs = {b: self._raw[b] for b in self._bases if b in self._raw}
        found = self._record.layouts_for(outputs)
        if found is None:  # this forward went another way: track the next one again
            if self._memo is not None and self._expected is not None:
                self._memo.layouts.pop(self._expected, None)
            return {}
        return found

    def _collect(self) -> FeatureMaps:
        bases = self._bases
        missing = [b for b in bases if b not in self._raw]
        if missing:
            raise LayerError(
                f"layer(s) {', '.join(missing)} never ran during the forward pass "
                "(not used by forward(), or the forward stopped before them)"
            )
        modules = self._modules  # filled on entering: every base ran, so we were entered
        shape = self._signature[0] if self._signature is not None else None  # the input's
        ctx = self.layout or LayoutContext(input_hw=(0, 0))
        ctx = replace(
            ctx,
            input_hw=(int(shape[-2]), int(shape[-1])) if shape is not None else ctx.input_hw,
            model=ctx.model if ctx.model is not None else self.model,
            batch=ctx.batch if ctx.batch is not None or shape is None else int(shape[0]),
            layouts=self._layouts(),
        )
        maps: dict[str, torch.Tensor] = {}
        info: dict[str, LayerInfo] = {}
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


def list_layers(
    model: nn.Module, x: torch.Tensor, *, layout: LayoutContext | None = None
) -> list[LayerInfo]:
    """Every module's output, in the order modules returned (one forward, no copies).

    Modules that did not run are appended at the end with ``raw_shape=None``. The result
    is cached per model and input shape, until a module of the model is added, removed
    or replaced.
    """
    _refuse_torchscript(model)
    check_input_size(model, x)
    named = list(model.named_modules())
    memo = _memo_for(model, named)
    key = (_signature(x, False), layout is not None and repr(layout))
    cached = memo.probes.get(key)
    if cached is not None:
        return cached
    modules = {name: module for name, module in named if name}
    tracker = _LayoutTracker()
    hw = (int(x.shape[-2]), int(x.shape[-1]))
    ctx = layout or LayoutContext(input_hw=hw, model=model)
    ctx = replace(
        ctx,
        input_hw=hw,
        model=ctx.model if ctx.model is not None else model,
        batch=int(x.shape[0]),
        layouts=tracker.layouts,
    )
    order: list[LayerInfo] = []
    seen: set[str] = set()
    handles = []
    modes: list[tuple[nn.Module, bool]] = []

    def make(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if name in seen:
                return
            seen.add(name)
            for _, _, li in normalize_output(name, module, output, ctx):
                order.append(li)

        return hook

    try:
        modes = _enter_eval(model, named, True)
        tracker.attach(model, named)  # first, so each layout is decided before `make` reads it
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make(name)))
        with torch.no_grad():
            model(x)
    finally:
        tracker.detach()
        for h in handles:
            h.remove()
        _restore_modes(modes)
    memo.record(key[0]).add(tracker)
    for name, module in modules.items():
        if name not in seen:
            order.append(LayerInfo(name, type(module).__name__, None, note="did not run"))
    memo.keep_probe(key, order)
    return order
