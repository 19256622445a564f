"""Bringing any module output into ``(B, C, H, W)``: tokens, channels-last, multi-output.

Vision Transformers return tokens ``(B, N, C)``; Swin and timm NHWC stages return
``(B, H, W, C)``; detection backbones return dicts of pyramid levels. The functions here
turn each into maps, reading the patch grid and the prefix tokens (class, distillation,
registers) from the model and deciding channels-last from the modules that ran, and say
what they did in :attr:`LayerInfo.form`, a :class:`Layout` record.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from .hooks import Hooks
from .keys import Entry, LayerKey, OutputKey, entry_text


class LayoutKind(StrEnum):
    """How a module's output is laid out before it becomes ``(B, C, H, W)``."""

    NCHW = "NCHW"
    NHWC = "NHWC"
    TOKENS = "tokens"
    NOT_SPATIAL = "not spatial"


@dataclass(frozen=True)
class Layout:
    """What was done to one output to reach ``(B, C, H, W)``, and why.

    Attributes:
        kind: the output's layout.
        reason: why that layout (channels-last, token sources), or why there is no map.
        prefix: tokens dropped in front of the patches (``TOKENS`` only).
        grid: the patch grid ``(h, w)`` (``TOKENS`` only).
        hint: what a user can do about an output that is not a map.
    """

    kind: LayoutKind
    reason: str = ""
    prefix: int | None = None
    grid: tuple[int, int] | None = None
    hint: str = ""

    @property
    def spatial(self) -> bool:
        return self.kind is not LayoutKind.NOT_SPATIAL

    @property
    def label(self) -> str:
        """``NCHW``, ``NHWC->NCHW``, ``tokens(prefix=1, grid=14x14)->NCHW`` or ``not spatial``."""
        if self.kind is LayoutKind.NHWC:
            return "NHWC->NCHW"
        if self.kind is LayoutKind.TOKENS:
            gh, gw = self.grid or (0, 0)
            return f"tokens(prefix={self.prefix}, grid={gh}x{gw})->NCHW"
        return str(self.kind.value)


_PLAIN = Layout(LayoutKind.NCHW)


@dataclass(frozen=True)
class LayerInfo:
    """What one output of one layer produced.

    Attributes:
        key: module name (as the user gave it), call and entry; ``name`` is its text.
        module_type: class name of the module.
        raw_shape: shape of the tensor the module returned.
        shape: shape after layout normalization, ``(B, C, H, W)``; ``None`` if the output
            is not a spatial map.
        stride: input height / map height and input width / map width.
        form: the :class:`Layout` record: what was done to reach ``(B, C, H, W)``.
        container: type name of a dict/tuple/list output this entry comes from.
        calls: how many times the module ran in the forward (``None``: not known, the
            forward stopped before its end).
        remark: anything else: why nothing was captured (``did not run``).
    """

    key: LayerKey
    module_type: str
    raw_shape: tuple[int, ...] | None
    shape: tuple[int, ...] | None = None
    stride: tuple[float, float] | None = None
    form: Layout = _PLAIN
    container: str = ""
    calls: int | None = 1
    remark: str = ""

    @property
    def name(self) -> str:
        """The name as ``--layers`` takes it: ``layer``, ``layer:2``, ``layer[key]``."""
        return str(self.key)

    @property
    def layout(self) -> str:
        """The layout in words: ``NCHW``, ``NHWC->NCHW``, ``tokens(...)->NCHW``, ``not spatial``."""
        return self.form.label

    @property
    def note(self) -> str:
        """Which call and entry this is, why this layout, or why there is no map."""
        parts = []
        if self.key.call is not None:
            parts.append(f"call {self.key.call} of {self.calls if self.calls else '?'}")
        elif self.calls is not None and self.calls > 1:
            parts.append(f"ran {self.calls} times")
        if self.key.entry:
            parts.append(f"entry {entry_text(self.key.entry)} of a {self.container} output")
        parts.extend(p for p in (self.form.reason, self.remark) if p)
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.module_type,
            "raw_shape": list(self.raw_shape) if self.raw_shape else None,
            "shape": list(self.shape) if self.shape else None,
            "stride": list(self.stride) if self.stride else None,
            "layout": self.layout,
            "note": self.note,
        }
        if self.key.call is not None or (self.calls or 1) > 1:
            out["module"] = self.key.module
            out["call"] = self.key.call
            out["calls"] = self.calls
        return out


# -- layout normalization ------------------------------------------------------------------

NCHW = LayoutKind.NCHW
NHWC = LayoutKind.NHWC


@dataclass
class LayoutContext:
    """What is known about the input, used to turn odd outputs into ``(B, C, H, W)``.

    ``tokens_grid`` and ``prefix_tokens`` override what is inferred for token outputs
    ``(B, N, C)``: the patch grid ``(h, w)`` and the number of class/distillation/register
    tokens in front of the patches (CLI: ``--tokens-grid HxW --prefix-tokens K``).

    Attributes:
        input_hw: height and width of the model's input.
        model: the model (its patch size and prefix tokens are read from it).
        tokens_grid: the patch grid of token outputs, overriding the model's.
        prefix_tokens: tokens before the patches, overriding the model's.
        batch: the batch size; a token output whose first dimension differs is not a
            map (e.g. attention over windows).
        layouts: channels-last decisions made while the forward ran, (module, call,
            entry) -> :class:`Layout`; filled by capture and :func:`list_layers`.
    """

    input_hw: tuple[int, int]
    model: nn.Module | None = None
    tokens_grid: tuple[int, int] | None = None
    prefix_tokens: int | None = None
    batch: int | None = None
    layouts: dict[OutputKey, Layout] = field(default_factory=dict, repr=False, compare=False)


def tensors_of(output: Any, depth: int = 0) -> list[tuple[Entry, torch.Tensor]]:
    """Entries of a (possibly nested) output that are tensors, with their keys.

    A tensor has the entry ``()``; entries of dicts, tuples and lists get ``(key,)``
    (the dict key or the position, as text), nested ones ``(a, b)``.
    """
    if isinstance(output, torch.Tensor):
        return [((), output)]
    if depth > 3:
        return []
    items: list[tuple[Any, Any]] = []
    if isinstance(output, Mapping):
        items = list(output.items())
    elif isinstance(output, (tuple, list)):
        items = list(enumerate(output))
    found: list[tuple[Entry, torch.Tensor]] = []
    for key, value in items:
        for sub, t in tensors_of(value, depth + 1):
            found.append(((str(key), *sub), t))
    return found


def map_tensors(output: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``output`` with every tensor ``t`` replaced by ``fn(t)``, its structure kept.

    Dicts, lists and tuples (named tuples too) are rebuilt as their own type; anything
    else is returned as it is.
    """
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, Mapping):
        items = [(k, map_tensors(v, fn)) for k, v in output.items()]
        kind: Any = type(output)
        try:
            return kind(items)
        except TypeError:
            return dict(items)
    if isinstance(output, tuple) and hasattr(output, "_fields"):
        return type(output)(*(map_tensors(v, fn) for v in output))
    if isinstance(output, (tuple, list)):
        return type(output)(map_tensors(v, fn) for v in output)
    return output


# Channels-last detection. A 4-D output is read as NCHW unless the model says otherwise.
# The evidence, strongest first: what the module itself is (torchvision's Permute, a
# Linear or a LayerNorm over the last dimension, timm's ``output_fmt``; any ``*2d``
# module is NCHW); the tensor it returned being one already placed; a shape-preserving
# module keeping its input's layout; a container returning what its last submodule
# returned; the layout of the last tensor of the same shape seen in the forward (this
# follows functional ops such as reshapes and residual additions). Only when none of
# these applies is the shape consulted, and only to pick NHWC when reading it as NCHW
# would give a grid with a different aspect ratio than the input while NHWC would not.
# A (B, 7, 7, 7) tensor with no evidence is therefore NCHW: the shape cannot tell. The
# one case left ambiguous: a module with no evidence of its own that permutes with a
# functional op and keeps a cube shape (C == H == W) is read in its input's layout.


def _flip(shape: tuple[int, ...], layout: LayoutKind) -> tuple[int, ...]:
    """The shape the same data would have in the other layout."""
    b, d1, d2, d3 = shape
    return (b, d3, d1, d2) if layout == NHWC else (b, d2, d3, d1)


def _other(layout: LayoutKind) -> LayoutKind:
    return NCHW if layout == NHWC else NHWC


def _fmt_name(value: Any) -> LayoutKind | None:
    text = str(getattr(value, "value", value)).upper()
    return LayoutKind(text) if text in (NCHW, NHWC) else None


_LAST_DIM_NORMS: tuple[type[nn.Module], ...] = tuple(
    getattr(nn, n) for n in ("LayerNorm", "RMSNorm") if hasattr(nn, n)
)


def _declared_layout(module: nn.Module, shape: tuple[int, ...]) -> Layout | None:
    """The layout a module's own type says its 4-D output has, with the reason."""
    tname = type(module).__name__
    dims = getattr(module, "dims", None)
    if tname == "Permute" and isinstance(dims, (list, tuple)) and len(dims) == 4:
        if list(dims) == [0, 2, 3, 1]:
            return Layout(NHWC, f"{tname}({list(dims)}) makes it channels-last")
        if list(dims) == [0, 3, 1, 2]:
            return Layout(NCHW, f"{tname}({list(dims)}) makes it channels-first")
    fmt = _fmt_name(getattr(module, "output_fmt", None))
    if fmt is not None and getattr(module, "flatten", False) is not True:
        return Layout(fmt, f"timm {tname}.output_fmt is {fmt.value}")
    if isinstance(module, nn.Linear):
        return Layout(NHWC, "a Linear output (it acts on the last dim, the channels)")
    if isinstance(module, _LAST_DIM_NORMS) and "2d" not in tname.lower():
        normalized = tuple(getattr(module, "normalized_shape", ()) or ())
        if len(normalized) == 1 and normalized[0] == shape[-1]:
            return Layout(NHWC, f"{tname} over the last dim (the channels)")
    if "2d" in tname:
        return _PLAIN
    return None


def _shape_guess(shape: tuple[int, ...], input_hw: tuple[int, int]) -> Layout | None:
    """Last resort: NHWC when only that reading matches the input's aspect ratio."""
    h0, w0 = input_hw
    if h0 <= 0 or w0 <= 0:
        return None

    def fits(h: int, w: int) -> bool:
        if h < 1 or w < 1 or h > h0 or w > w0:
            return False
        sh, sw = h0 / h, w0 / w
        return max(sh, sw) / min(sh, sw) <= 1.25

    if fits(shape[2], shape[3]) or not fits(shape[1], shape[2]):
        return None
    return Layout(
        NHWC,
        "guessed from the shape (nothing in the model said; only the channels-last "
        "reading matches the input's aspect ratio)",
    )


@dataclass
class _Frame:
    """One running module: its input and the last 4-D output among its submodules."""

    module: nn.Module | None
    in_shape: tuple[int, ...] | None
    in_layout: LayoutKind | None
    last: tuple[tuple[int, ...], LayoutKind] | None = None


class LayoutTracker:
    """Follows one forward pass and decides the layout of every 4-D module output.

    Each call of a module gets its own decision, kept under (module name, call, entry).
    Its hooks must run before any hook that may stop the forward, so that a module's
    layout is decided before the stop: attach it first, or attach it late (from the
    model's own forward pre-hook, see :meth:`start`) with ``prepend=True``.
    """

    def __init__(self) -> None:
        self.layouts: dict[OutputKey, Layout] = {}
        self.shapes: dict[OutputKey, tuple[int, ...]] = {}
        self.calls: dict[str, int] = {}
        """How many times each module (by its name in ``named_modules()``) returned."""
        self.input_hw = (0, 0)  # set by the model's pre-hook
        self._stack: list[_Frame] = []
        self._known: dict[int, tuple[weakref.ref[torch.Tensor], LayoutKind]] = {}
        self._recent: dict[tuple[int, ...], tuple[LayoutKind, int]] = {}
        self._step = 0

    def attach(
        self,
        hooks: Hooks,
        model: nn.Module,
        named: Sequence[tuple[str, nn.Module]] | None = None,
        *,
        prepend: bool = False,
    ) -> None:
        """Hook every module of ``model`` (TorchScript modules are skipped).

        Args:
            hooks: where to register (see :func:`featuremaps.capture.hooks.hooked`).
            model: the model.
            named: ``model.named_modules()``, when the caller has walked it already.
            prepend: run these hooks before the hooks already on each module.
        """
        if isinstance(model, torch.jit.ScriptModule):
            return
        hooks.before(model, self._root_pre, prepend=prepend)
        for name, module in model.named_modules() if named is None else named:
            if isinstance(module, torch.jit.ScriptModule):
                continue
            hooks.before(module, self._pre, prepend=prepend)
            hooks.after(module, self._post_for(name), prepend=prepend)

    def start(self, model: nn.Module, args: Any) -> None:
        """What the model's pre-hooks do, for a tracker attached inside them.

        A pre-hook added while the model's own pre-hooks run does not run for that call.
        """
        self._root_pre(model, args)
        self._pre(model, args)

    def _remember(self, t: torch.Tensor, layout: LayoutKind) -> None:
        self._step += 1
        self._known[id(t)] = (weakref.ref(t), layout)
        self._recent[tuple(t.shape)] = (layout, self._step)

    def _lookup(self, t: torch.Tensor) -> LayoutKind | None:
        entry = self._known.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        return None

    def _by_shape(self, shape: tuple[int, ...]) -> LayoutKind | None:
        """The layout of the latest tensor of this shape or of its transpose."""
        options: list[tuple[LayoutKind, int]] = []
        same = self._recent.get(shape)
        if same is not None:
            options.append(same)
        for layout in (NCHW, NHWC):
            # read as `layout`, the same data in the other layout has shape _flip(...)
            seen = self._recent.get(_flip(shape, layout))
            if seen is not None and seen[0] == _other(layout):
                options.append((layout, seen[1]))
        return max(options, key=lambda o: o[1])[0] if options else None

    def _root_pre(self, module: nn.Module, args: Any) -> None:
        for a in args if isinstance(args, tuple) else (args,):
            if isinstance(a, torch.Tensor) and a.ndim == 4:
                self.input_hw = (int(a.shape[-2]), int(a.shape[-1]))
                self._remember(a, NCHW)
                return

    def _pre(self, module: nn.Module, args: Any) -> None:
        first = None
        for a in args if isinstance(args, tuple) else (args,):
            if isinstance(a, torch.Tensor):
                first = a
                break
        if first is None or first.ndim != 4:
            self._stack.append(_Frame(module, None, None))
            return
        layout = self._lookup(first) or self._by_shape(tuple(first.shape))
        self._stack.append(_Frame(module, tuple(first.shape), layout))

    def _pop(self, module: nn.Module) -> _Frame:
        """This module's frame (frames of submodules that raised are dropped on the way)."""
        if not any(f.module is module for f in self._stack):
            return _Frame(module, None, None)
        while True:
            frame = self._stack.pop()
            if frame.module is module:
                return frame

    def _post_for(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            frame = self._pop(module)
            call = self.calls[name] = self.calls.get(name, 0) + 1
            for entry, t in tensors_of(output):
                if t.ndim != 4:
                    continue
                decided = self._decide(module, t, frame)
                self.layouts[(name, call, entry)] = decided
                self.shapes[(name, call, entry)] = tuple(t.shape)
                self._remember(t, decided.kind)
                if self._stack:
                    self._stack[-1].last = (tuple(t.shape), decided.kind)

        return hook

    def _decide(self, module: nn.Module, t: torch.Tensor, frame: _Frame) -> Layout:
        shape = tuple(t.shape)
        own = _declared_layout(module, shape)
        if own is not None:
            return own
        known = self._lookup(t)
        if known is not None:
            return Layout(known, f"returns a tensor already seen as {known.value}")
        if frame.in_layout is not None and frame.in_shape == shape:
            return Layout(frame.in_layout, f"same shape as its {frame.in_layout.value} input")
        if frame.last is not None:
            last_shape, last = frame.last
            if last_shape == shape:
                return Layout(last, f"as its last submodule ({last.value})")
            if _flip(last_shape, last) == shape:
                return Layout(_other(last), f"its last submodule's {last.value} output, permuted")
        recent = self._by_shape(shape)
        if recent is not None:
            return Layout(recent, f"same shape as the latest {recent.value} tensor of the forward")
        return _shape_guess(shape, self.input_hw) or _PLAIN


@dataclass
class LayoutRecord:
    """Trackers' decisions, kept to be reused by later forwards of the same model.

    Valid while the model has the same modules and the input the same shape, dtype and
    device: the forward then takes the same path and a tracker would decide the same way,
    so a capture can take these decisions instead of hooking every module. Each decision
    keeps the shape it was made for, and :meth:`layouts_for` refuses outputs of another
    shape (a forward whose path depends on the data).
    """

    layouts: dict[OutputKey, Layout] = field(default_factory=dict)
    shapes: dict[OutputKey, tuple[int, ...]] = field(default_factory=dict)
    ran: set[str] = field(default_factory=set)
    """Modules whose output the trackers saw (a forward that stopped early saw fewer)."""
    calls: dict[str, int] | None = None
    """Calls of every module in a forward that ran to its end (absent: did not run)."""

    def add(self, tracker: LayoutTracker, *, complete: bool) -> None:
        """Keep a tracker's decisions; ``complete``: its forward ran to the end."""
        for key, decided in tracker.layouts.items():
            if key not in self.layouts:
                self.layouts[key] = decided
                self.shapes[key] = tracker.shapes[key]
        self.ran |= set(tracker.calls)
        if complete:
            self.calls = dict(tracker.calls)

    def covers(self, modules: Iterable[str]) -> bool:
        """Whether every one of these modules ran in a recorded forward."""
        return self.ran.issuperset(modules)

    def calls_of(self, module: str) -> int | None:
        """How many times ``module`` ran in a whole forward; ``None``: not known."""
        return None if self.calls is None else self.calls.get(module, 0)

    def layouts_for(self, outputs: Mapping[tuple[str, int], Any]) -> dict[OutputKey, Layout] | None:
        """The kept decisions for the 4-D tensors of these outputs.

        Args:
            outputs: (module name, call) -> what the module returned.

        Returns:
            (module, call, entry) -> layout, or ``None`` when a 4-D tensor was not
            recorded with its shape (the forward went another way).
        """
        found: dict[OutputKey, Layout] = {}
        for (name, call), output in outputs.items():
            for entry, t in tensors_of(output):
                if t.ndim != 4:
                    continue
                key = (name, call, entry)
                if self.shapes.get(key) != tuple(t.shape):
                    return None
                found[key] = self.layouts[key]
        return found


# -- tokens ------------------------------------------------------------------------------------

_TOKEN_ROOTS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def _is_token_root(m: nn.Module) -> bool:
    if hasattr(m, "num_prefix_tokens") or isinstance(getattr(m, "patch_embed", None), nn.Module):
        return True
    return isinstance(getattr(m, "conv_proj", None), nn.Module) and hasattr(m, "patch_size")


def _token_root(model: nn.Module) -> nn.Module | None:
    """The (sub)module that turns patches into tokens: a timm or torchvision ViT.

    The name found is kept per model and looked for again when that submodule is gone or
    no longer qualifies (the model was edited). Only token outputs ask, so a model without
    a token root is searched each time.
    """
    name = _TOKEN_ROOTS.get(model)
    if name is not None:
        try:
            kept = model.get_submodule(name)
        except AttributeError:
            kept = None
        if kept is not None and _is_token_root(kept):
            return kept
    found = next((n for n, m in model.named_modules() if _is_token_root(m)), None)
    if found is None:
        _TOKEN_ROOTS.pop(model, None)
        return None
    _TOKEN_ROOTS[model] = found
    return model.get_submodule(found)


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return int(value[0]), int(value[1])
    return None


@dataclass(frozen=True)
class TokenInfo:
    """What a model says about its token outputs for one input size.

    Attributes:
        grid: the patch grid ``(h, w)``, ``None`` when the model has no patch size.
        prefix: tokens in front of the patches (class, distillation, registers).
        grid_source: where the grid came from, for the manifest.
        prefix_source: where the prefix count came from.
    """

    grid: tuple[int, int] | None
    prefix: int | None
    grid_source: str
    prefix_source: str


def model_tokens(model: nn.Module | None, input_hw: tuple[int, int]) -> TokenInfo:
    """Patch grid and prefix-token count of a ViT-like model for an input size.

    The grid comes from timm's ``patch_embed`` (``dynamic_feat_size``, which honours
    dynamic padding, else ``patch_size``) or torchvision's ``patch_size``; the prefix
    count from timm's ``num_prefix_tokens`` (class + distillation + registers) or from
    the model's class/distillation/register token parameters.
    """
    root = _token_root(model) if model is not None else None
    if root is None:
        return TokenInfo(None, None, "no patch embedding found in the model", "")
    grid: tuple[int, int] | None = None
    grid_source = "the model has no patch size"
    h, w = input_hw
    pe = getattr(root, "patch_embed", None)
    if h > 0 and w > 0:
        if pe is not None and callable(getattr(pe, "dynamic_feat_size", None)):
            try:
                gh, gw = pe.dynamic_feat_size((h, w))
                grid = (int(gh), int(gw))
                grid_source = f"patch_embed for a {h}x{w} input"
            except Exception:  # exotic embeddings: fall back to the patch size
                grid = None
        patch = _pair(getattr(pe, "patch_size", None)) or _pair(getattr(root, "patch_size", None))
        if grid is None and patch is not None:
            grid = (h // patch[0], w // patch[1])
            grid_source = f"patch size {patch[0]}x{patch[1]} on a {h}x{w} input"
    prefix = getattr(root, "num_prefix_tokens", None)
    if isinstance(prefix, int):
        prefix_source = "num_prefix_tokens"
    else:
        prefix, parts = 0, []
        for attr in ("cls_token", "class_token", "dist_token", "reg_token", "register_tokens"):
            p = getattr(root, attr, None)
            if isinstance(p, torch.Tensor) and p.ndim == 3:
                prefix += int(p.shape[1])
                parts.append(attr)
        prefix_source = "+".join(parts) if parts else "no class or register tokens"
    return TokenInfo(grid, int(prefix), grid_source, prefix_source)


def _token_candidates(info: TokenInfo, ctx: LayoutContext) -> list[tuple[int, int]]:
    """Grids to try: an override, else the model's and its halvings (merged patches)."""
    if ctx.tokens_grid is not None:
        return [ctx.tokens_grid]
    if info.grid is None:
        return []
    grids = [info.grid]
    gh, gw = info.grid
    for k in range(1, 6):
        f = 2**k
        for g in ((-(-gh // f), -(-gw // f)), (gh // f, gw // f)):
            if min(g) >= 1 and g not in grids:
                grids.append(g)
    return grids


_PICK_HINT = (
    "Pick a layer before pooling/flatten; `featuremaps layers MODEL` shows every layer's shape."
)

_TOKENS_HINT = (
    "Set it with --tokens-grid HxW --prefix-tokens K "
    "(Python: LayoutContext(tokens_grid=(h, w), prefix_tokens=k))."
)


def _tokens_to_map(t: torch.Tensor, ctx: LayoutContext) -> tuple[torch.Tensor | None, Layout]:
    b, n, c = (int(s) for s in t.shape)
    if ctx.batch is not None and b != ctx.batch:
        why = f"not spatial: shape {tuple(t.shape)} (first dimension is not the batch)"
        return None, Layout(LayoutKind.NOT_SPATIAL, why, hint=_PICK_HINT)
    info = model_tokens(ctx.model, ctx.input_hw)
    grids = _token_candidates(info, ctx)
    if ctx.prefix_tokens is not None:
        prefixes = [ctx.prefix_tokens]
        source = "--prefix-tokens"
    else:
        prefixes = list(dict.fromkeys([info.prefix or 0, 0]))
        source = info.prefix_source
    if ctx.tokens_grid is not None and ctx.prefix_tokens is None:
        gh, gw = ctx.tokens_grid
        prefixes, source = [n - gh * gw], "tokens beyond --tokens-grid"
    if ctx.prefix_tokens is not None and not grids:
        grid = _grid_from_aspect(n - ctx.prefix_tokens, ctx.input_hw)
        grids = [grid] if grid else []
    for gh, gw in grids:
        for k in prefixes:
            if k >= 0 and k + gh * gw == n:
                patches = t[:, k:, :].reshape(b, gh, gw, c).permute(0, 3, 1, 2)
                where = "--tokens-grid" if ctx.tokens_grid else info.grid_source
                reason = f"prefix from {source}, grid from {where}"
                return patches, Layout(LayoutKind.TOKENS, reason, prefix=k, grid=(gh, gw))
    if info.grid is None and ctx.tokens_grid is None:
        why = f"cannot tell the patch grid ({info.grid_source})"
    else:
        tried = ", ".join(f"{gh}x{gw}" for gh, gw in grids[:3])
        why = (
            f"N={n} is not prefix tokens ({', '.join(map(str, prefixes))}) plus a patch "
            f"grid ({tried})"
        )
    why = f"tokens (B, N, C) = {tuple(t.shape)}: {why}. {_TOKENS_HINT}"
    return None, Layout(LayoutKind.NOT_SPATIAL, why)


def check_input_size(model: nn.Module, x: torch.Tensor) -> None:
    """Refuse inputs a torchvision ViT cannot take, before its forward asserts.

    torchvision's ``VisionTransformer`` accepts exactly ``image_size x image_size``;
    timm ViTs built with ``dynamic_img_size`` (as :func:`featuremaps.load_model` builds
    them) take any size.

    Raises:
        ModelError: ``x`` does not fit the model's fixed input size.
    """
    size = getattr(model, "image_size", None)
    if not isinstance(size, int) or not hasattr(model, "conv_proj") or x.ndim != 4:
        return
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if (h, w) != (size, size):
        raise ModelError(
            f"this torchvision {type(model).__name__} takes only {size}x{size} inputs "
            f"(its image_size; a non-square or resized input cannot be fed), got {h}x{w}. "
            "Keep the centre crop (no --full), or use a timm ViT (e.g. "
            "timm:vit_base_patch16_224), which accepts any size."
        )


def _grid_from_aspect(patches: int, input_hw: tuple[int, int]) -> tuple[int, int] | None:
    """The one grid with ``patches`` cells and the input's aspect ratio, if any."""
    h0, w0 = input_hw
    if patches <= 0 or h0 <= 0 or w0 <= 0:
        return None
    for gh in range(1, patches + 1):
        if patches % gh == 0 and gh * w0 == (patches // gh) * h0:
            return gh, patches // gh
    return None


def to_bchw(
    t: torch.Tensor,
    ctx: LayoutContext,
    module: nn.Module | None = None,
    *,
    key: OutputKey | None = None,
) -> tuple[torch.Tensor | None, Layout]:
    """Bring one output tensor into ``(B, C, H, W)``.

    * 4-D: NCHW as is; channels-last (``(B, H, W, C)``, e.g. Swin) is permuted. The
      decision comes from ``ctx.layouts`` (made while the forward ran) or else from
      ``module`` itself (see the module comment above :func:`_declared_layout`).
    * 3-D tokens ``(B, N, C)``: the prefix tokens (class, distillation, registers) are
      dropped and the ``h*w`` patch tokens reshaped into ``(B, C, h, w)``. Grid and
      prefix count come from the model (:func:`model_tokens`) or from
      ``ctx.tokens_grid`` / ``ctx.prefix_tokens``.

    Args:
        t: the tensor.
        ctx: input size, model and overrides.
        module: the module that returned ``t``.
        key: (module name, call, entry) of ``t``, to find ``ctx.layouts``.

    Returns:
        The map, possibly a permuted view of ``t`` (or ``None`` when it is not spatial),
        and the :class:`Layout` record of what was done, or why there is no map.
    """
    if t.ndim == 4:
        decided = ctx.layouts.get(key) if key is not None else None
        if decided is None and module is not None:
            decided = _declared_layout(module, tuple(t.shape))
        if decided is None:
            decided = _shape_guess(tuple(t.shape), ctx.input_hw)
        if decided is not None and decided.kind is NHWC:
            return t.permute(0, 3, 1, 2), decided
        return t, _PLAIN
    if t.ndim == 3 and t.shape[1] > 1 and t.is_floating_point():
        return _tokens_to_map(t, ctx)
    why = f"not spatial: shape {tuple(t.shape)}"
    return None, Layout(LayoutKind.NOT_SPATIAL, why, hint=_PICK_HINT)


def normalize_output(
    key: LayerKey,
    module: nn.Module,
    output: Any,
    ctx: LayoutContext,
    *,
    source: tuple[str, int] | None = None,
    calls: int | None = 1,
) -> list[tuple[LayerKey, torch.Tensor | None, LayerInfo]]:
    """Split one call's output into maps with their :class:`LayerInfo`.

    A tensor gives one entry keyed ``key``; each tensor in a tuple/list/dict gives one
    whose key has the entry set (``backbone[0]``, ``backbone[pool]``; nested:
    ``name[1][0]``).

    Args:
        key: module name (as the user gave it) and call to show.
        module: the module.
        output: what this call returned.
        ctx: input size, model, overrides and layout decisions.
        source: (name in ``named_modules()``, call) under which ``ctx.layouts`` keeps
            the decisions for this output; by default ``key``'s module and call.
        calls: how many times the module ran (``None``: not known).
    """
    mtype = type(module).__name__
    found = tensors_of(output)
    src = source or (key.module, key.call or 1)
    if not found:
        why = Layout(LayoutKind.NOT_SPATIAL, f"output is {type(output).__name__}", hint=_PICK_HINT)
        return [(key, None, LayerInfo(key, mtype, None, form=why, calls=calls))]
    container = "" if isinstance(output, torch.Tensor) else type(output).__name__
    result: list[tuple[LayerKey, torch.Tensor | None, LayerInfo]] = []
    for entry, t in found:
        full = LayerKey(key.module, key.call, entry)
        m, form = to_bchw(t, ctx, module, key=(src[0], src[1], entry))
        shape = tuple(m.shape) if m is not None else None
        stride = None
        if m is not None:
            h, w = m.shape[-2], m.shape[-1]
            stride = (round(ctx.input_hw[0] / h, 3), round(ctx.input_hw[1] / w, 3))
        info = LayerInfo(full, mtype, tuple(t.shape), shape, stride, form, container, calls)
        result.append((full, m, info))
    return result
