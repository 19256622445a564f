"""Capturing what chosen layers return, as ``(B, C, H, W)`` maps.

Hooks live inside :func:`~featuremaps.capture.hooks.hooked` and are removed whatever
happens. Each captured value is copied the moment the module returns it, so a later
in-place operation (VGG's ``ReLU(inplace=True)``) cannot change what is shown. A module
that runs several times in one forward is captured at every call (``NAME:1`` ...).

The forward stops once the last requested output has been returned, unless the full
output is asked for. For a module that may run again later in the forward, the last call
cannot be known while the forward runs: the forward then runs to its end, and the number
of calls is kept per model and input, so later captures on the same kind of input stop
right after that module's last call. A module inside plain ``nn.Sequential`` containers
all the way up to the model runs once by construction, and a request for ``NAME:k`` needs
only the calls up to ``k``: both stop early from the first capture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..errors import LayerError, suggest
from .cache import LayoutRecord, ModelMemo, Signature, memo_for, signature
from .hooks import Hooks, hooked, refuse_torchscript
from .keys import LayerKey, entry_text
from .layout import (
    LayerInfo,
    Layout,
    LayoutContext,
    LayoutKind,
    LayoutTracker,
    check_input_size,
    map_tensors,
    normalize_output,
)
from .select import (
    Selection,
    canonical_names,
    module_names,
    needs_probe,
    runs_once,
    select_layers,
)

__all__ = ["Capture", "FeatureMaps", "capture", "list_layers"]


@dataclass
class FeatureMaps(Mapping[str, torch.Tensor]):
    """Captured maps, output name -> ``(B, C, H, W)`` tensor on the CPU, in request order.

    Names are as ``--layers`` takes them: ``layer1``, ``layer1.0.relu:2``, ``body[pool]``.

    Attributes:
        maps: the tensors.
        info: per-output :class:`LayerInfo` (its ``key`` holds module, call and entry).
        output: the model's own output when the full forward ran, else ``None``.
        input_shape: shape of the input batch.
        stopped_early: the forward was stopped after the last requested output.
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

    def _repr_html_(self) -> str:
        from ..notebook import maps_html  # a table of layers, a PCA thumbnail each

        return maps_html(self)


class _StopForward(Exception):
    """Raised from a hook once every requested output has been returned."""


def _copy_output(output: Any) -> Any:
    """Detach and copy every tensor of an output to the CPU, keeping its structure."""
    return map_tensors(output, lambda t: t.detach().to("cpu", copy=True))


def _clone_output(output: Any) -> Any:
    """Clone every tensor of an output (in the autograd graph), keeping its structure."""
    return map_tensors(output, torch.clone)


Entries = list[tuple[LayerKey, torch.Tensor | None, LayerInfo]]
Picked = list[tuple[LayerKey, torch.Tensor, LayerInfo]]


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
    module's train/eval mode is restored on exit, also when the forward raises. Only the
    model's first forward inside the block is recorded.

    Deciding which outputs are channels-last takes a hook on every module for one
    forward. The decisions are kept per model and input (shape, dtype, device, mode)
    while the model's modules stay the same; with ``example_input`` given and decisions
    kept for it, only the requested layers are hooked. Should the forward then run on
    another kind of input, every module is hooked from its start after all.

    With ``keep_graph=True`` (for gradients, see :func:`featuremaps.relevance`) each
    requested output is kept as the module returned it, in the autograd graph, and the
    rest of the forward is handed a clone: an in-place op that follows (VGG's
    ``ReLU(inplace=True)``) changes the clone, never the kept output, so the gradient
    taken with respect to :attr:`raw` is the gradient of what the module returned.

    With ``copy=False`` a CPU output is kept as the module returned it, not copied, and
    its version counter is noted; :meth:`modified` then says whether a later in-place
    operation changed one of them (:func:`capture` re-runs the forward with copies when
    it did, and the model's memo remembers to copy that module's output from then on).
    It also keeps the maps that the modules returned channels-last in that layout
    (``keep_layout``), where :attr:`maps` otherwise makes every map contiguous.
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
        keep_graph: bool = False,
        copy: bool = True,
        keep_layout: bool | None = None,
    ) -> None:
        self.model = model
        self.keep_graph = keep_graph
        self.copy = copy or keep_graph
        # channels-last maps stay channels-last in .maps (else they are made contiguous)
        self.keep_layout = not self.copy if keep_layout is None else keep_layout
        self._lent: list[tuple[str, torch.Tensor, int]] = []
        probe = None
        if needs_probe(layers):
            if example_input is None:
                raise LayerError("presets need example_input= to find the layers")
            probe = list_layers(model, example_input, layout=layout)
        self.selections = select_layers(model, layers, probe)
        self.names = [str(s) for s in self.selections]
        self.early_stop = early_stop
        self.eval_mode = eval_mode
        self.layout = layout
        self._expected: Signature | None = (
            signature(example_input, model.training and not eval_mode)
            if isinstance(example_input, torch.Tensor)
            else None
        )
        self._bases = list(dict.fromkeys(s.module for s in self.selections))
        self._raw: dict[str, list[Any]] = {}
        self._stack: ExitStack | None = None
        self._hooks: Hooks | None = None
        self._maps: FeatureMaps | None = None
        self._modules: dict[str, nn.Module] = {}
        self._canonical: dict[str, str] = {}
        self._named: list[tuple[str, nn.Module]] = []
        self._memo: ModelMemo | None = None
        self._record: LayoutRecord | None = None
        self._tracker: LayoutTracker | None = None
        self._known_calls: dict[str, int | None] = {}
        self._stop_after: dict[str, int] | None = None
        self._stopped = False
        self._root_calls = 0
        self._signature: Signature | None = None  # of the input the forward ran on

    # -- entering: one hooked() block ------------------------------------------------------

    def __enter__(self) -> Capture:
        self._named = list(self.model.named_modules())
        self._modules = module_names(self.model)
        self._canonical = canonical_names(self.model, self._modules, self._named)
        self._memo = _memo = memo_for(self.model, self._named)
        self._raw, self._maps, self._record, self._tracker = {}, None, None, None
        self._lent = []
        self._root_calls, self._stopped = 0, False
        with ExitStack() as stack:
            hooks = stack.enter_context(
                hooked(self.model, eval_mode=self.eval_mode, named=self._named)
            )
            self._hooks = hooks
            hooks.before(self.model, self._pre_hook)
            record = _memo.layouts.get(self._expected)
            if record is not None and record.covers(self._canonical[b] for b in self._bases):
                self._record = record
            else:
                self._attach_tracker()  # before the hooks that may stop the forward
            for base in self._bases:
                hooks.after(self._modules[base], self._hook_for(base))
            self._plan(record)
            self._stack = stack.pop_all()
        return self

    def _plan(self, record: LayoutRecord | None) -> None:
        """How many calls of each module to wait for before stopping (see the module doc)."""
        self._known_calls = {}
        for base in self._bases:
            known = record.calls_of(self._canonical[base]) if record is not None else None
            if known is None and runs_once(self.model, base, self._modules):
                known = 1
            self._known_calls[base] = known
        self._stop_after = None
        if not self.early_stop:
            return
        plan: dict[str, int] = {}
        for base in self._bases:
            asked = [s.call for s in self.selections if s.module == base]
            calls = [c for c in asked if c is not None]
            needed = max(calls) if len(calls) == len(asked) else self._known_calls[base]
            if not needed:
                return  # not known (or never runs): run the forward to its end
            plan[base] = needed
        self._stop_after = plan

    def _hook_for(self, base: str) -> Callable[..., Any]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            if self._root_calls > 1:
                return None  # a later forward of the model: the maps are those of the first
            if self.keep_graph:
                kept = output
            elif self.copy or self._canonical[base] in self._memo_modified():
                kept = _copy_output(output)
            else:
                kept = map_tensors(output, lambda t: self._lend(base, t))
            self._raw.setdefault(base, []).append(kept)
            plan = self._stop_after
            if plan is not None and all(len(self._raw.get(b, ())) >= n for b, n in plan.items()):
                self._stopped = True
                raise _StopForward
            return _clone_output(output) if self.keep_graph else None

        return hook

    def _memo_modified(self) -> set[str]:
        return self._memo.modified if self._memo is not None else set()

    def _lend(self, base: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` itself (detached) when its changes can be seen, else a CPU copy."""
        if t.device.type != "cpu" or t.is_inference():
            return t.detach().to("cpu", copy=True)  # no version counter to check
        kept = t.detach()  # shares the storage and the version counter
        self._lent.append((base, kept, kept._version))
        return kept

    def modified(self) -> list[str]:
        """Modules whose kept output (``copy=False``) an in-place operation changed since.

        Each is also noted in the model's memo, so later captures copy its output.
        """
        changed = list(dict.fromkeys(b for b, t, v in self._lent if t._version != v))
        if changed and self._memo is not None:
            self._memo.modified.update(self._canonical[b] for b in changed)
        return changed

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        """The model's own forward starts: note the input, check the kept layouts fit it."""
        self._root_calls += 1
        if self._root_calls > 1:
            return  # the maps are those of the first forward: keep its input size
        for a in args if isinstance(args, tuple) else (args,):
            if isinstance(a, torch.Tensor) and a.ndim == 4:
                self._signature = signature(a, module.training)
                break
        if self._signature != self._expected:
            self._plan(None)  # what was kept is for another input
            if self._record is not None:
                self._record = None  # follow this forward instead
                self._attach_tracker(late=True).start(module, args)

    def _attach_tracker(self, *, late: bool = False) -> LayoutTracker:
        """Hook every module; ``late``: from the model's pre-hook, ahead of our hooks."""
        assert self._hooks is not None  # only called inside the hooked() block
        self._tracker = LayoutTracker()
        self._tracker.attach(self._hooks, self.model, self._named, prepend=late)
        return self._tracker

    # -- leaving -----------------------------------------------------------------------------

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        stack, self._stack, self._hooks = self._stack, None, None
        if stack is not None:
            stack.close()  # removes every hook and restores the modes
        if exc_type is None or exc_type is _StopForward:
            self._keep_layouts()
        return exc_type is _StopForward

    def _keep_layouts(self) -> None:
        """Keep the tracker's decisions for later captures on the same kind of input."""
        tracker, memo, sig = self._tracker, self._memo, self._signature
        if tracker is None or memo is None or sig is None or self._root_calls != 1:
            return
        memo.record(sig).add(tracker, complete=not self._stopped)

    # -- the maps ----------------------------------------------------------------------------

    @property
    def maps(self) -> FeatureMaps:
        """The captured maps (after the forward has run)."""
        if self._maps is None:
            self._maps = self.collect()
        return self._maps

    @property
    def raw(self) -> dict[str, list[Any]]:
        """What each hooked module returned, per call: CPU copies, or with ``keep_graph``
        the outputs themselves. Keyed by the module's name as requested."""
        return self._raw

    def collect(self, raw: Mapping[str, list[Any]] | None = None) -> FeatureMaps:
        """The maps of the requested outputs, checked, in request order.

        Args:
            raw: structures shaped like :attr:`raw` to lay out the same way (gradients
                with respect to the outputs, say); by default :attr:`raw` itself.

        Raises:
            LayerError: a layer that never ran, a call it did not make, an entry it does
                not have, or an output that is not a spatial map.
        """
        missing = [b for b in self._bases if not self._raw.get(b)]
        if missing:
            raise LayerError(
                f"layer(s) {', '.join(missing)} never ran during the forward pass "
                "(not used by forward(), or the forward stopped before them)"
            )
        ctx = self._context()
        values = self._raw if raw is None else raw
        normalized: dict[tuple[str, int | None, int], Entries] = {}
        maps: dict[str, torch.Tensor] = {}
        info: dict[str, LayerInfo] = {}
        for sel in self.selections:
            for key, m, li in self._outputs_of(sel, ctx, values, normalized):
                name = str(key)
                if name not in maps:
                    # channels-last outputs kept as they are (copy=False): no copy
                    keep = self.keep_layout and m.is_contiguous(memory_format=torch.channels_last)
                    maps[name] = m if keep else m.contiguous()
                    info[name] = li
        return FeatureMaps(maps=maps, info=info)

    def _layouts(self) -> dict[Any, Layout]:
        """The layout decisions for the captured outputs: tracked now, or kept from before."""
        if self._tracker is not None:
            return self._tracker.layouts
        if self._record is None:
            return {}
        outputs = {
            (self._canonical[b], j): out
            for b in self._bases
            for j, out in enumerate(self._raw.get(b, ()), 1)
        }
        found = self._record.layouts_for(outputs)
        if found is None:  # this forward went another way: track the next one again
            if self._memo is not None and self._expected is not None:
                self._memo.layouts.pop(self._expected, None)
            return {}
        return found

    def _context(self) -> LayoutContext:
        shape = self._signature[0] if self._signature is not None else None  # the input's
        ctx = self.layout or LayoutContext(input_hw=(0, 0))
        return replace(
            ctx,
            input_hw=(int(shape[-2]), int(shape[-1])) if shape is not None else ctx.input_hw,
            model=ctx.model if ctx.model is not None else self.model,
            batch=ctx.batch if ctx.batch is not None or shape is None else int(shape[0]),
            layouts=self._layouts(),
        )

    def _outputs_of(
        self,
        sel: Selection,
        ctx: LayoutContext,
        values: Mapping[str, list[Any]],
        normalized: dict[tuple[str, int | None, int], Entries],
    ) -> Picked:
        """The maps ``sel`` asks for, checked; ``normalized`` keeps each call's entries."""
        seen = values[sel.module]
        if sel.call is not None and sel.call > len(seen):
            calls = ", ".join(f"{sel.module}:{j}" for j in range(1, len(seen) + 1))
            raise LayerError(
                f"{sel}: layer {sel.module!r} ran {len(seen)} time(s) in the forward "
                f"(its calls: {calls})"
            )
        total = len(seen) if not self._stopped else self._known_calls.get(sel.module)
        picked: Picked = []
        for j in [sel.call] if sel.call is not None else range(1, len(seen) + 1):
            shown = j if sel.call is not None or len(seen) > 1 else None
            slot = (sel.module, shown, j)
            if slot not in normalized:
                normalized[slot] = normalize_output(
                    LayerKey(sel.module, shown),
                    self._modules[sel.module],
                    seen[j - 1],
                    ctx,
                    source=(self._canonical[sel.module], j),
                    calls=total,
                )
            picked.extend(_pick_entries(sel, normalized[slot]))
        return picked


def _pick_entries(sel: Selection, entries: Entries) -> Picked:
    """The entries of one call that ``sel`` asks for; an error for what is not a map."""
    if sel.entry is not None:
        chosen = [e for e in entries if e[0].entry == sel.entry]
        if not chosen:
            keys = [str(k) for k, _, _ in entries]
            wanted = f"{sel.module}{entry_text(sel.entry)}"
            raise LayerError(
                f"layer {sel.module!r} has no output entry {wanted}; its entries "
                f"are {', '.join(keys)}.{suggest(wanted, keys)}"
            )
    else:
        spatial = [e for e in entries if e[1] is not None]
        chosen = spatial or entries  # e.g. the logits beside the maps of a tuple output
    picked = []
    for key, m, li in chosen:
        if m is None:
            hint = f" {li.form.hint}" if li.form.hint else ""
            raise LayerError(
                f"layer {str(key)!r} ({li.module_type}) gives no spatial map: "
                f"{li.note or li.layout}.{hint}"
            )
        picked.append((key, m, li))
    return picked


def capture(
    model: nn.Module,
    x: torch.Tensor,
    layers: str | Sequence[str],
    *,
    full_forward: bool = False,
    layout: LayoutContext | None = None,
    copy: bool = True,
) -> FeatureMaps:
    """Run ``model`` on ``x`` and return the maps of ``layers``.

    Args:
        model: any ``nn.Module``; its train/eval mode is restored afterwards.
        x: the input batch ``(B, 3, H, W)`` on the model's device.
        layers: names (``layer1``), calls (``layer1.0.relu:2``), entries
            (``body[pool]``), glob patterns or presets (``stages``, ``blocks``,
            ``convs``), as a list or a comma-separated string.
        full_forward: run the whole model and keep its output in ``.output``; otherwise
            the forward stops after the last requested output (see the module doc).
        layout: overrides for token layouts (grid, prefix tokens).
        copy: ``False`` keeps CPU outputs as the modules returned them instead of
            copying each (faster, and the maps may share memory with the model's
            outputs). PyTorch's version counters tell whether a later in-place operation
            changed one; the forward then runs again with copies, and later captures of
            the model copy that module's output from the start. Maps the modules returned
            channels-last (for a channels-last input) then keep that layout.

    Returns:
        :class:`FeatureMaps` with ``(B, C, H, W)`` CPU tensors. A module that ran k > 1
        times gives ``NAME:1`` ... ``NAME:k``.

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
    for attempt in range(2):
        cap = Capture(
            model,
            layers,
            example_input=x,
            early_stop=not full_forward,
            layout=layout,
            copy=copy or attempt > 0,
            keep_layout=not copy,  # the same layout on a rerun with copies
        )
        output = None
        stopped = False
        with torch.no_grad(), cap:
            try:
                output = model(x)
            except _StopForward:
                stopped = True
        if copy or not cap.modified():
            break  # else: an in-place op changed a kept output; run again with copies
    result = cap.maps
    result.input_shape = tuple(x.shape)
    result.stopped_early = stopped
    if output is not None:
        result.output = map_tensors(output, lambda t: t.detach().to("cpu", copy=copy))
    return result


def list_layers(
    model: nn.Module, x: torch.Tensor, *, layout: LayoutContext | None = None
) -> list[LayerInfo]:
    """Every module's output, in the order modules returned (one forward, no copies).

    A module that ran k > 1 times gives one entry per call, ``NAME:1`` ... ``NAME:k``.
    Modules that did not run are appended at the end with ``raw_shape=None``. The
    result is cached per model and input shape, until a module of the model is added,
    removed or replaced (or :func:`~featuremaps.capture.clear_cache`).
    """
    refuse_torchscript(model)
    check_input_size(model, x)
    named = list(model.named_modules())
    memo = memo_for(model, named)
    key = (signature(x, False), layout is not None and repr(layout))
    cached = memo.probes.get(key)
    if cached is not None:
        return cached
    tracker = LayoutTracker()
    hw = (int(x.shape[-2]), int(x.shape[-1]))
    ctx = layout or LayoutContext(input_hw=hw, model=model)
    ctx = replace(
        ctx,
        input_hw=hw,
        model=ctx.model if ctx.model is not None else model,
        batch=int(x.shape[0]),
        layouts=tracker.layouts,
    )
    found: list[tuple[int, list[LayerInfo]]] = []
    calls: dict[str, int] = {}

    def make(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            call = calls[name] = calls.get(name, 0) + 1
            entries = normalize_output(LayerKey(name), module, output, ctx, source=(name, call))
            found.append((call, [li for _, _, li in entries]))

        return hook

    with hooked(model, eval_mode=True, named=named) as hooks:
        tracker.attach(hooks, model, named)  # first: each layout is decided before `make` reads
        for name, module in named:
            if name:
                hooks.after(module, make(name))
        with torch.no_grad():
            model(x)
    memo.record(key[0]).add(tracker, complete=True)
    order = [
        li if calls[li.key.module] == 1 else _as_call(li, call, calls[li.key.module])
        for call, infos in found
        for li in infos
    ]
    for name, module in named:
        if name and name not in calls:
            form = Layout(LayoutKind.NOT_SPATIAL)
            mtype = type(module).__name__
            order.append(LayerInfo(LayerKey(name), mtype, None, form=form, remark="did not run"))
    memo.keep_probe(key, order)
    return order


def _as_call(info: LayerInfo, call: int, calls: int) -> LayerInfo:
    return replace(info, key=replace(info.key, call=call), calls=calls)
