"""Build a model whose weights will be loaded without drawing its random initialization.

Random initialization is most of the time it takes to build a large model (VGG-11: a
second for 133 M parameters, on 2 cores), and all of it is overwritten when pretrained
weights are loaded. :class:`SkipRandomInit` is a torch function mode active while such a
model is built and its weights loaded: random fills (``Tensor.uniform_``, ``normal_``,
``nn.init.kaiming_uniform_``, ``torch.randn``, ...) leave the memory as it is, and every
tensor whose values came from a skipped fill, or were computed from one, is remembered
by its storage. Loading weights (``copy_`` from a clean tensor) clears a storage.

:meth:`SkipRandomInit.all_loaded` then says whether the model holds any value that was
never written: a parameter or buffer (non-persistent ones included) or a tensor kept as
an attribute, still marked. If so the caller builds the model again the ordinary way;
nothing the weights do not cover is ever left uninitialized. Deterministic
initialization (``zeros_``, ``ones_``, ``arange``, ...) runs as usual.

The mode is thread-local (torch function modes are), so a model built at the same time
in another thread is initialized as usual.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .errors import FeatureMapsError

__all__ = ["SkipRandomInit", "build_skipping_init"]

T = TypeVar("T")

_TENSOR = torch.Tensor
# In-place random fills: skipped, the tensor returned as it is.
_FILLS = frozenset(
    {
        _TENSOR.uniform_,
        _TENSOR.normal_,
        _TENSOR.random_,
        _TENSOR.bernoulli_,
        _TENSOR.exponential_,
        _TENSOR.cauchy_,
        _TENSOR.log_normal_,
        _TENSOR.geometric_,
        nn.init.uniform_,
        nn.init.normal_,
        nn.init.trunc_normal_,
        nn.init.kaiming_uniform_,
    }
)
# Random factories: replaced by torch.empty of the same size and options.
_FACTORIES = frozenset({torch.rand, torch.randn})


class SkipRandomInit(TorchFunctionMode):
    """Skip random fills while a model is built and loaded; see the module's docstring.

    Example:
        >>> skip = SkipRandomInit()
        >>> with skip:
        ...     layer = nn.Linear(4, 2)
        ...     _ = layer.load_state_dict({"weight": torch.ones(2, 4), "bias": torch.zeros(2)})
        >>> skip.all_loaded(layer)
        True
    """

    def __init__(self) -> None:
        super().__init__()
        self.unwritten: set[int] = set()  # storages holding values no one computed
        self.skipped = 0  # fills skipped (for tests and curiosity)
        self._watched: dict[int, weakref.finalize[Any, Any]] = {}

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _FILLS:
            target = args[0] if args else kwargs.get("tensor")  # nn.init passes keywords
            if isinstance(target, torch.Tensor):
                self.skipped += 1
                self._mark(target)
                return target
        if func in _FACTORIES:
            kwargs.pop("generator", None)
            out = torch.empty(*args, **kwargs)
            self.skipped += 1
            self._mark(out)
            return out
        result = func(*args, **kwargs)
        if func is _TENSOR.copy_ and args and isinstance(args[0], torch.Tensor):
            source = args[1] if len(args) > 1 else kwargs.get("src")
            dirty = isinstance(source, torch.Tensor) and self._is_marked(source)
            self._mark(args[0], dirty)  # overwritten: as clean as what was copied in
        elif self.unwritten and any(self._is_marked(t) for t in _tensors((args, kwargs))):
            for out in _tensors(result):
                self._mark(out)  # computed from unwritten values
        return result

    def all_loaded(self, module: nn.Module) -> bool:
        """Whether every tensor the module holds was written (no skipped value is left).

        Asked once, after the mode is left: it also stops watching the storages.
        """
        found = bool(self.unwritten) and any(self._is_marked(t) for t in _held_tensors(module))
        for watch in list(self._watched.values()):
            watch.detach()
        self._watched.clear()
        return not found

    def _mark(self, tensor: torch.Tensor, dirty: bool = True) -> None:
        key = _storage_key(tensor)
        if key is None:
            return
        if not dirty:
            self.unwritten.discard(key)
            return
        self.unwritten.add(key)
        watch = self._watched.get(key)
        if watch is None or not watch.alive:
            # A freed storage's address may be reused by a new, clean one: forget it.
            self._watched[key] = weakref.finalize(tensor.untyped_storage(), self._freed, key)

    def _freed(self, key: int) -> None:
        self.unwritten.discard(key)
        self._watched.pop(key, None)

    def _is_marked(self, tensor: torch.Tensor) -> bool:
        key = _storage_key(tensor)
        return key is not None and key in self.unwritten


def _storage_key(tensor: torch.Tensor) -> int | None:
    """The address of the tensor's storage; ``None`` where there is none to track."""
    if tensor.is_meta or tensor.numel() == 0:
        return None
    try:
        return int(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # sparse, nested and other storage-less kinds
        return None


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    return (leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor))


def _held_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor a model keeps: parameters, buffers and tensors set as attributes."""
    yield from module.parameters()
    yield from module.buffers()
    for sub in module.modules():
        for name, value in vars(sub).items():
            if name not in ("_parameters", "_buffers", "_modules"):
                yield from _tensors(value)


def build_skipping_init(build: Callable[[], T], module_of: Callable[[T], nn.Module]) -> T:
    """``build()`` (which builds a model and loads all its weights) without random fills.

    Built again the ordinary way when the weights left any skipped value in the model,
    or when the build failed with anything but a featuremaps error (some initialization
    may need the random values it computes with). A :class:`FeatureMapsError` (weights
    that do not fit, a download that failed) is raised as it is.
    """
    skip = SkipRandomInit()
    try:
        with skip:
            built = build()
    except FeatureMapsError:
        raise
    except Exception:
        return build()
    return built if skip.all_loaded(module_of(built)) else build()
