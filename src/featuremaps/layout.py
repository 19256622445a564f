"""Bringing any module output into ``(B, C, H, W)``: tokens, channels-last, multi-output.

Vision Transformers return tokens ``(B, N, C)``; Swin and timm NHWC stages return
``(B, H, W, C)``; detection backbones return dicts of pyramid levels. The functions here
turn each into maps, reading the patch grid and the prefix tokens (class, distillation,
registers) from the model and deciding channels-last from the modules that ran, and say
what they did in :attr:`LayerInfo.layout`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ModelError


@dataclass(frozen=True)
class LayerInfo:
    """What one layer produced.

    Attributes:
        name: the name as in ``model.named_modules()`` (``name[key]`` for one entry of a
            dict/tuple output).
        module_type: class name of the module.
        raw_shape: shape of the tensor the module returned.
        shape: shape after layout normalization, ``(B, C, H, W)``; ``None`` if the output
            is not a spatial map.
        stride: input height / map height and input width / map width.
        layout: what was done to reach ``(B, C, H, W)``: ``"NCHW"`` (nothing),
            ``"NHWC->NCHW"`` (channels-last, permuted), ``"tokens(prefix=5,
            grid=37x37)->NCHW"`` (prefix tokens dropped, patches laid on the grid) or
            ``"not spatial"``.
        note: anything else worth telling: why that layout, which entry of a
            dict/tuple output, or why there is no map.
    """

    name: str
    module_type: str
    raw_shape: tuple[int, ...] | None
    shape: tuple[int, ...] | None = None
    stride: tuple[float, float] | None = None
    layout: str = "NCHW"
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.module_type,
            "raw_shape": list(self.raw_shape) if self.raw_shape else None,
            "shape": list(self.shape) if self.shape else None,
            "stride": list(self.stride) if self.stride else None,
            "layout": self.layout,
            "note": self.note,
        }


# -- layout normalization ------------------------------------------------------------------

NCHW = "NCHW"
NHWC = "NHWC"


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
        layouts: channels-last decisions made while the forward ran, output name ->
            ``(layout, reason)``; filled by capture and :func:`list_layers`.
    """

    input_hw: tuple[int, int]
    model: nn.Module | None = None
    tokens_grid: tuple[int, int] | None = None
    prefix_tokens: int | None = None
    batch: int | None = None
    layouts: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False, compare=False)


def _entry_key(key: Any) -> str:
    return f"[{key}]"


def _tensors_of(output: Any, depth: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Entries of a (possibly nested) output that are tensors, with their keys.

    A tensor has the key ``""``; entries of dicts, tuples and lists get ``"[key]"``
    (the dict key or the position), nested ones ``"[a][b]"``.
    """
    if isinstance(output, torch.Tensor):
        return [("", output)]
    if depth > 3:
        return []
    items: list[tuple[Any, Any]] = []
    if isinstance(output, Mapping):
        items = list(output.items())
    elif isinstance(output, (tuple, list)):
        items = list(enumerate(output))
    found: list[tuple[str, torch.Tensor]] = []
    for key, value in items:
        for sub, t in _tensors_of(value, depth + 1):
            found.append((_entry_key(key) + sub, t))
    return found


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


def _flip(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The shape the same data would have in the other layout."""
    b, d1, d2, d3 = shape
    return (b, d3, d1, d2) if layout == NHWC else (b, d2, d3, d1)


def _other(layout: str) -> str:
    return NCHW if layout == NHWC else NHWC


def _fmt_name(value: Any) -> str | None:
    text = str(getattr(value, "value", value)).upper()
    return text if text in (NCHW, NHWC) else None


_LAST_DIM_NORMS: tuple[type[nn.Module], ...] = tuple(
    getattr(nn, n) for n in ("LayerNorm", "RMSNorm") if hasattr(nn, n)
)


def _declared_layout(module: nn.Module, shape: tuple[int, ...]) -> tuple[str, str] | None:
    """The layout a module's own type says its 4-D output has, with the reason."""
    tname = type(module).__name__
    dims = getattr(module, "dims", None)
    if tname == "Permute" and isinstance(dims, (list, tuple)) and len(dims) == 4:
        if list(dims) == [0, 2, 3, 1]:
            return NHWC, f"{tname}({list(dims)}) makes it channels-last"
        if list(dims) == [0, 3, 1, 2]:
            return NCHW, f"{tname}({list(dims)}) makes it channels-first"
    fmt = _fmt_name(getattr(module, "output_fmt", None))
    if fmt is not None and getattr(module, "flatten", False) is not True:
        return fmt, f"timm {tname}.output_fmt is {fmt}"
    if isinstance(module, nn.Linear):
        return NHWC, "a Linear output (it acts on the last dim, the channels)"
    if isinstance(module, _LAST_DIM_NORMS) and "2d" not in tname.lower():
        normalized = tuple(getattr(module, "normalized_shape", ()) or ())
        if len(normalized) == 1 and normalized[0] == shape[-1]:
            return NHWC, f"{tname} over the last dim (the channels)"
    if "2d" in tname:
        return NCHW, ""
    return None


def _shape_guess(shape: tuple[int, ...], input_hw: tuple[int, int]) -> tuple[str, str] | None:
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
    return NHWC, (
        "guessed from the shape (nothing in the model said; only the channels-last "
        "reading matches the input's aspect ratio)"
    )


@dataclass
class _Frame:
    """One running module: its input and the last 4-D output among its submodules."""

    module: nn.Module | None
    in_shape: tuple[int, ...] | None
    in_layout: str | None
    last: tuple[tuple[int, ...], str] | None = None


class _LayoutTracker:
    """Follows one forward pass and decides the layout of every 4-D module output.

    Its hooks must run before any hook that may stop the forward, so that a module's
    layout is decided before the stop: attach it first, or attach it late (from the
    model's own forward pre-hook, see :meth:`start`) with ``prepend=True``.
    """

    def __init__(self) -> None:
        self.layouts: dict[str, tuple[str, str]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.ran: set[str] = set()
        self.input_hw = (0, 0)  # set by the model's pre-hook
        self._stack: list[_Frame] = []
        self._known: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}
        self._recent: dict[tuple[int, ...], tuple[str, int]] = {}
        self._step = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(
        self,
        model: nn.Module,
        named: Sequence[tuple[str, nn.Module]] | None = None,
        *,
        prepend: bool = False,
    ) -> None:
        """Hook every module of ``model`` (TorchScript modules are skipped).

        Args:
            model: the model.
            named: ``model.named_modules()``, when the caller has walked it already.
            prepend: run these hooks before the hooks already on each module.
        """
        if isinstance(model, torch.jit.ScriptModule):
            return
        self._handles.append(model.register_forward_pre_hook(self._root_pre, prepend=prepend))
        for name, module in model.named_modules() if named is None else named:
            if isinstance(module, torch.jit.ScriptModule):
                continue
            self._handles.append(module.register_forward_pre_hook(self._pre, prepend=prepend))
            post = self._post_for(name)
            self._handles.append(module.register_forward_hook(post, prepend=prepend))

    def start(self, model: nn.Module, args: Any) -> None:
        """What the model's pre-hooks do, for a tracker attached inside them.

        A pre-hook added while the model's own pre-hooks run does not run for that call.
        """
        self._root_pre(model, args)
        self._pre(model, args)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _remember(self, t: torch.Tensor, layout: str) -> None:
        self._step += 1
        self._known[id(t)] = (weakref.ref(t), layout)
        self._recent[tuple(t.shape)] = (layout, self._step)

    def _lookup(self, t: torch.Tensor) -> str | None:
        entry = self._known.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        return None

    def _by_shape(self, shape: tuple[int, ...]) -> str | None:
        """The layout of the latest tensor of this shape or of its transpose."""
        options: list[tuple[str, int]] = []
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
            self.ran.add(name)
            for key, t in _tensors_of(output):
                if t.ndim != 4:
                    continue
                decided = self._decide(module, t, frame)
                if name + key not in self.layouts:
                    self.layouts[name + key] = decided
                    self.shapes[name + key] = tuple(t.shape)
                self._remember(t, decided[0])
                if self._stack:
                    self._stack[-1].last = (tuple(t.shape), decided[0])

        return hook

    def _decide(self, module: nn.Module, t: torch.Tensor, frame: _Frame) -> tuple[str, str]:
        shape = tuple(t.shape)
        own = _declared_layout(module, shape)
        if own is not None:
            return own
        known = self._lookup(t)
        if known is not None:
            return known, f"returns a tensor already seen as {known}"
        if frame.in_layout is not None and frame.in_shape == shape:
            return frame.in_layout, f"same shape as its {frame.in_layout} input"
        if frame.last is not None:
            last_shape, last_layout = frame.last
            if last_shape == shape:
                return last_layout, f"as its last submodule ({last_layout})"
            if _flip(last_shape, last_layout) == shape:
                return _other(last_layout), f"its last submodule's {last_layout} output, permuted"
        recent = self._by_shape(shape)
        if recent is not None:
            return recent, f"same shape as the latest {recent} tensor of the forward"
        return _shape_guess(shape, self.input_hw) or (NCHW, "")


@dataclass
class _LayoutRecord:
    """A tracker's decisions, kept to be reused by later forwards of the same model.

    Valid while the model has the same modules and the input the same shape, dtype and
    device: the forward then takes the same path and a tracker would decide the same way,
    so a capture can take these decisions instead of hooking every module. Each decision
    keeps the shape it was made for, and :meth:`layouts_for` refuses outputs of another
    shape (a forward whose path depends on the data).
    """

    layouts: dict[str, tuple[str, str]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    ran: set[str] = field(default_factory=set)
    """Modules whose output the trackers saw (a forward that stopped early saw fewer)."""

    def add(self, tracker: _LayoutTracker) -> None:
        for name, decided in tracker.layouts.items():
            if name not in self.layouts:
                self.layouts[name] = decided
                self.shapes[name] = tracker.shapes[name]
        self.ran |= tracker.ran

    def covers(self, modules: Iterable[str]) -> bool:
        """Whether every one of these modules ran in a recorded forward."""
        return self.ran.issuperset(modules)

    def layouts_for(self, outputs: Mapping[str, Any]) -> dict[str, tuple[str, str]] | None:
        """The kept decisions for the 4-D tensors of these outputs.

        Args:
            outputs: module name -> what the module returned.

        Returns:
            Output name -> ``(layout, reason)``, or ``None`` when a 4-D tensor was not
            recorded with its shape (the forward went another way).
        """
        found: dict[str, tuple[str, str]] = {}
        for name, output in outputs.items():
            for key, t in _tensors_of(output):
                if t.ndim != 4:
                    continue
                if self.shapes.get(name + key) != tuple(t.shape):
                    return None
                found[name + key] = self.layouts[name + key]
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


_TOKENS_HINT = (
    "Set it with --tokens-grid HxW --prefix-tokens K "
    "(Python: LayoutContext(tokens_grid=(h, w), prefix_tokens=k))."
)


def _tokens_to_map(t: torch.Tensor, ctx: LayoutContext) -> tuple[torch.Tensor | None, str]:
    b, n, c = (int(s) for s in t.shape)
    if ctx.batch is not None and b != ctx.batch:
        return None, f"not spatial: shape {tuple(t.shape)} (first dimension is not the batch)"
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
                return patches, (
                    f"tokens(prefix={k}, grid={gh}x{gw})->NCHW; prefix from {source}, "
                    f"grid from {where}"
                )
    if info.grid is None and ctx.tokens_grid is None:
        why = f"cannot tell the patch grid ({info.grid_source})"
    else:
        tried = ", ".join(f"{gh}x{gw}" for gh, gw in grids[:3])
        why = (
            f"N={n} is not prefix tokens ({', '.join(map(str, prefixes))}) plus a patch "
            f"grid ({tried})"
        )
    return None, f"tokens (B, N, C) = {tuple(t.shape)}: {why}. {_TOKENS_HINT}"


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
    name: str | None = None,
) -> tuple[torch.Tensor | None, str]:
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
        name: its output name (``layer`` or ``layer[key]``), to find ``ctx.layouts``.

    Returns:
        The map, possibly a permuted view of ``t`` (or ``None`` when it is not spatial),
        and a word on what was done:
        ``"NCHW"``, ``"NHWC->NCHW"`` or ``"tokens(prefix=K, grid=hxw)->NCHW; ..."``, or
        why there is no map.
    """
    if t.ndim == 4:
        decided = ctx.layouts.get(name) if name is not None else None
        if decided is None and module is not None:
            decided = _declared_layout(module, tuple(t.shape))
        if decided is None:
            decided = _shape_guess(tuple(t.shape), ctx.input_hw)
        if decided is not None and decided[0] == NHWC:
            why = f"; {decided[1]}" if decided[1] else ""
            return t.permute(0, 3, 1, 2), f"NHWC->NCHW{why}"
        return t, NCHW
    if t.ndim == 3 and t.shape[1] > 1 and t.is_floating_point():
        return _tokens_to_map(t, ctx)
    return None, f"not spatial: shape {tuple(t.shape)}"


def normalize_output(
    name: str, module: nn.Module, output: Any, ctx: LayoutContext
) -> list[tuple[str, torch.Tensor | None, LayerInfo]]:
    """Split a module's output into named maps with their :class:`LayerInfo`.

    A tensor gives one entry named ``name``; each tensor in a tuple/list/dict gives one
    named ``name[key]`` (``backbone[0]``, ``backbone[pool]``; nested: ``name[1][0]``).
    """
    mtype = type(module).__name__
    entries = _tensors_of(output)
    if not entries:
        info = LayerInfo(name, mtype, None, note=f"output is {type(output).__name__}")
        return [(name, None, info)]
    result: list[tuple[str, torch.Tensor | None, LayerInfo]] = []
    for key, t in entries:
        full = name + key
        m, layout = to_bchw(t, ctx, module, name=full)
        note = ""
        if m is None:
            layout, note = "not spatial", layout
        elif ";" in layout:
            layout, note = (s.strip() for s in layout.split(";", 1))
        if key:
            what = f"entry {key} of a {type(output).__name__} output"
            note = f"{what}; {note}" if note else what
        result.append((full, m, _info(full, mtype, t, m, layout, note, ctx)))
    return result


def _info(
    name: str,
    mtype: str,
    raw: torch.Tensor,
    m: torch.Tensor | None,
    layout: str,
    note: str,
    ctx: LayoutContext,
) -> LayerInfo:
    shape = tuple(m.shape) if m is not None else None
    stride = None
    if m is not None:
        h, w = m.shape[-2], m.shape[-1]
        stride = (round(ctx.input_hw[0] / h, 3), round(ctx.input_hw[1] / w, 3))
    return LayerInfo(name, mtype, tuple(raw.shape), shape, stride, layout, note)
