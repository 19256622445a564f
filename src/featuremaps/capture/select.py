"""Which outputs to capture: names, globs, presets, entries and calls.

What a user may type in ``--layers`` (or pass as ``layers=``), comma-separated:

* a module name, any of them when a module is reachable under several (``layer1``);
* one entry of a dict/tuple output (``body[pool]``, ``backbone[0]``);
* one call of a module that runs several times in one forward (``layer1.0.relu:2``,
  ``body:2[pool]``); the name alone gives every call;
* a glob over module names (``layer*``, ``features.*``, ``**.relu``);
* a preset (``stages``, ``blocks``, ``convs``), resolved from one probing forward;
* a bare index after a numbered child, for its sibling: ``features.0,3,6`` is
  ``features.0,features.3,features.6`` (a bare index that is a module name itself, as in
  a top-level ``nn.Sequential``, stays that module).

Each becomes a :class:`Selection`. ``featuremaps layers MODEL`` lists the names exactly as
they are typed here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from torch import nn

from ..errors import LayerError, suggest
from .keys import Entry, LayerKey, entry_text
from .layout import LayerInfo

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Selection:
    """One requested output.

    Attributes:
        module: the module's name as given.
        call: the call (1-based) asked for; ``None`` for every call.
        entry: the entry of a dict/tuple output asked for; ``None`` for every spatial one.
    """

    module: str
    call: int | None = None
    entry: Entry | None = None

    def __str__(self) -> str:
        return str(LayerKey(self.module, self.call, self.entry or ()))

    @classmethod
    def of(cls, key: LayerKey) -> Selection:
        """The selection of exactly the output ``key`` names."""
        return cls(key.module, key.call, key.entry or None)


# -- presets ---------------------------------------------------------------------------------

Preset = Callable[[nn.Module, list[LayerInfo]], list[str]]
_KeyPreset = Callable[[nn.Module, list[LayerInfo]], list[LayerKey]]


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


_PASS_THROUGH = frozenset(
    {"Identity", "Dropout", "Permute", "Flatten", "StochasticDepth", "DropPath"}
)
"""Module types that only pass their input on (in eval mode) or change its layout."""


def _stage_keys(model: nn.Module, order: list[LayerInfo]) -> list[LayerKey]:
    spine = _spine(model)
    picked: list[LayerKey] = []
    current: tuple[int, ...] | None = None
    last: LayerKey | None = None
    for info in order:
        if info.key.module not in spine or info.shape is None:
            continue
        if info.module_type.startswith("Adaptive") or info.module_type in _PASS_THROUGH:
            continue  # a classifier head's pooling, or the same data as the layer before
        hw = tuple(info.shape[-2:])
        if min(hw) <= 1:
            continue
        if current is not None and hw != current and last is not None:
            picked.append(last)
        current, last = hw, info.key
    if last is not None:
        picked.append(last)
    return list(dict.fromkeys(picked))


def preset_stages(model: nn.Module, order: list[LayerInfo]) -> list[str]:
    """The last output at each spatial resolution along the model's spine.

    ``order`` holds every module's output in the order modules returned. For a ResNet
    this gives ``relu, layer1, layer2, layer3, layer4``; for a torchvision ViT the
    encoder's output (one resolution); for Swin the last block of each stage and the
    final norm. Maps with a side of 1 and pass-through modules (``Identity``,
    ``Dropout``, ``Permute``) are never picked.
    """
    return [str(k) for k in _stage_keys(model, order)]


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


def _block_keys(model: nn.Module, order: list[LayerInfo]) -> list[LayerKey]:
    blocks = _block_names(model)
    return [
        i.key
        for i in order
        if i.key.module in blocks and i.shape is not None and min(i.shape[-2:]) > 1
    ]


def preset_blocks(model: nn.Module, order: list[LayerInfo]) -> list[str]:
    """Each repeated block's output in execution order (see :func:`_block_names`).

    For a ViT the token output of every encoder block (``encoder.layers.encoder_layer_0``
    ... or timm's ``blocks.0`` ...), for Swin every ``SwinTransformerBlock``, for a ResNet
    every residual block.
    """
    return [str(k) for k in _block_keys(model, order)]


def _conv_keys(model: nn.Module, order: list[LayerInfo]) -> list[LayerKey]:
    return [i.key for i in order if i.module_type == "Conv2d" and i.shape is not None]


def preset_convs(model: nn.Module, order: list[LayerInfo]) -> list[str]:
    """Every ``Conv2d``, in execution order."""
    return [str(k) for k in _conv_keys(model, order)]


PRESETS: dict[str, Preset] = {
    "stages": preset_stages,
    "blocks": preset_blocks,
    "convs": preset_convs,
}
"""Named layer sets. Each takes the model and every layer's info in execution order."""

_PRESET_KEYS: dict[str, _KeyPreset] = {
    "stages": _stage_keys,
    "blocks": _block_keys,
    "convs": _conv_keys,
}


# -- names -----------------------------------------------------------------------------------


def module_names(model: nn.Module) -> dict[str, nn.Module]:
    """Every name a module can be reached under (a shared submodule has several)."""
    return {n: m for n, m in model.named_modules(remove_duplicate=False) if n}


def canonical_names(
    model: nn.Module,
    names: dict[str, nn.Module] | None = None,
    named: Sequence[tuple[str, nn.Module]] | None = None,
) -> dict[str, str]:
    """Name -> the module's first name (the one ``model.named_modules()`` gives).

    Args:
        model: the model.
        names: :func:`module_names`, when the caller has it already.
        named: ``model.named_modules()``, when the caller has walked it already.
    """
    first = {id(m): n for n, m in (model.named_modules() if named is None else named)}
    return {n: first[id(m)] for n, m in (module_names(model) if names is None else names).items()}


def with_aliases(model: nn.Module, infos: list[LayerInfo]) -> list[LayerInfo]:
    """``infos`` with, after each, the same output under the module's other names.

    A submodule registered in several places (a shared block) is one module with several
    names; :func:`list_layers` reports it under its first, and every name is accepted.
    """
    others: dict[str, list[str]] = {}
    for name, first in canonical_names(model).items():
        if name != first:
            others.setdefault(first, []).append(name)
    if not others:
        return list(infos)
    out: list[LayerInfo] = []
    for info in infos:
        out.append(info)
        for alias in others.get(info.key.module, ()):
            key = replace(info.key, module=alias)
            out.append(replace(info, key=key, remark=f"same module as {info.key.module}"))
    return out


def runs_once(model: nn.Module, name: str, names: dict[str, nn.Module] | None = None) -> bool:
    """Whether the structure guarantees that ``name`` runs once per forward of ``model``.

    True when the model and every module between it and ``name`` are ``nn.Sequential``
    with the stock ``forward`` (each child called once, in order) and the module has no
    other name. Anything else may call a module any number of times. ``names``:
    :func:`module_names`, when the caller has it already.
    """
    names = module_names(model) if names is None else names
    target = names.get(name)
    if target is None or sum(m is target for m in names.values()) != 1:
        return False
    parts = name.split(".")
    ancestors = [model] + [names[".".join(parts[:i])] for i in range(1, len(parts))]
    return all(type(a).forward is nn.Sequential.forward for a in ancestors)


def request_list(layers: str | Sequence[str]) -> list[str]:
    """The requests in ``layers`` (a comma-separated string or a list), stripped."""
    items = layers.split(",") if isinstance(layers, str) else list(layers)
    return [s.strip() for s in items if s and s.strip()]


def needs_probe(layers: str | Sequence[str]) -> bool:
    """Whether the request names a preset (which needs one forward to resolve)."""
    return any(r in PRESETS for r in request_list(layers))


_SUFFIX = re.compile(r"(?::(?P<call>\d+))?(?P<entry>(?:\[[^\[\]]*\])*)")
_ENTRY_PART = re.compile(r"\[([^\[\]]*)\]")


def parse_request(text: str, modules: Sequence[str] | dict[str, nn.Module]) -> Selection | None:
    """Read ``name``, ``name:k``, ``name[key]`` or ``name:k[key]`` typed by a user.

    The longest known module name that the text starts with wins, so a module whose own
    name holds ``[`` or ``:`` is found too. ``None`` when no module name fits.

    Raises:
        LayerError: a call number below 1.
    """
    if text in modules:
        return Selection(text)
    for cut in range(len(text) - 1, 0, -1):
        if text[cut] not in ":[" or text[:cut] not in modules:
            continue
        match = _SUFFIX.fullmatch(text, cut)
        if match is None:
            continue
        call = int(match["call"]) if match["call"] is not None else None
        if call is not None and call < 1:
            raise LayerError(f"{text!r}: calls count from 1 ({text[:cut]}:1 is the first)")
        entry = tuple(_ENTRY_PART.findall(match["entry"])) or None
        return Selection(text[:cut], call, entry)
    return None


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


def _one_request(
    model: nn.Module, req: str, modules: dict[str, nn.Module], probe: list[LayerInfo] | None
) -> list[Selection]:
    if req in PRESETS:
        if probe is None:
            raise LayerError(f"preset {req!r} needs an example input to resolve")
        keys = _PRESET_KEYS[req](model, probe)
        if not keys:
            raise LayerError(f"preset {req!r} matches no layer of this model")
        return [Selection.of(k) for k in keys]
    parsed = parse_request(req, modules)
    if parsed is not None:
        return [parsed]
    if any(ch in req for ch in "*?["):
        pattern = _glob_regex(req)
        hits = [n for n, _ in model.named_modules() if n and pattern.fullmatch(n)]
        if not hits:
            raise LayerError(
                f"pattern {req!r} matches no layer.{suggest(req, modules)} "
                "List the layers with: featuremaps layers MODEL"
            )
        return [Selection(h) for h in hits]
    valid = list(modules) + list(PRESETS)
    raise LayerError(
        f"unknown layer {req!r}.{suggest(req, valid)} Presets: "
        f"{', '.join(PRESETS)}. List every layer with: featuremaps layers MODEL"
    )


def select_layers(
    model: nn.Module,
    layers: str | Sequence[str],
    probe: list[LayerInfo] | None = None,
) -> list[Selection]:
    """Turn names, calls, entries, globs and presets into selections, in request order.

    Args:
        model: the model.
        layers: a comma-separated string or a list (see the module docstring). A preset
            wins over a module of the same name (timm's ``blocks``: the preset gives
            each block, whose last one is what the module returns).
        probe: every layer's info in execution order (see
            :func:`featuremaps.capture.list_layers`); needed for presets.

    Raises:
        LayerError: a request matches nothing; the message lists the closest valid names.
    """
    requests = request_list(layers)
    if not requests:
        raise LayerError("no layers requested. List them with: featuremaps layers MODEL")
    modules = module_names(model)
    out: list[Selection] = []
    previous = ""
    for req in requests:
        req = _sibling(req, previous, modules)
        out.extend(s for s in _one_request(model, req, modules, probe) if s not in out)
        previous = req
    return out


def _sibling(req: str, previous: str, modules: dict[str, nn.Module]) -> str:
    """``3`` after ``features.0`` is ``features.3``, if that is a module and ``3`` is not."""
    if not req.isdigit() or req in modules or "." not in previous:
        return req
    parent, last = previous.rsplit(".", 1)
    if not re.match(r"\d+(?::\d+)?$", last):  # only after a numbered child
        return req
    name = f"{parent}.{req}"
    return name if name in modules else req


def resolve_layers(
    model: nn.Module,
    layers: str | Sequence[str],
    probe: list[LayerInfo] | None = None,
) -> list[str]:
    """:func:`select_layers`, as the names ``--layers`` takes (``stages`` -> ``relu, ...``)."""
    return [str(s) for s in select_layers(model, layers, probe)]


__all__ = [
    "PRESETS",
    "Selection",
    "entry_text",
    "module_names",
    "needs_probe",
    "parse_request",
    "resolve_layers",
    "runs_once",
    "select_layers",
    "with_aliases",
]
