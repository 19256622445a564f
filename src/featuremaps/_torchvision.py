"""Import torchvision without importing ``torch._dynamo`` (about 1.5 s of a 3 s import).

``import torchvision`` imports every submodule, among them ``torchvision.ops.roi_align``,
whose first lines are ``from torch._dynamo.utils import is_compile_supported``; and
``torchvision.transforms.v2`` (the preprocessing) imports ``torchvision.tv_tensors``,
which decorates one function with ``torch.compiler.disable``. Either loads the whole
TorchDynamo compiler (sympy, torch.fx, torch.distributed.tensor, ...) although no
featuremaps command compiles anything.

:func:`import_torchvision` imports both with two stand-in modules in ``sys.modules`` for
the time of that import: ``torch._dynamo`` (its ``disable`` defers the real decorator to
the first call made once the real ``torch._dynamo`` is loaded; until then nothing can be
compiling, so the function runs as is) and ``torch._dynamo.utils`` (its
``is_compile_supported`` imports the real one when first called, by a detection model's
``roi_align``). The stand-ins are removed as soon as the import is done, so any later
``import torch._dynamo`` (``torch.compile``) gets the real module. Anything unexpected
(a torchvision that imports more of ``torch._dynamo``) makes it import torchvision the
ordinary way. ``FEATUREMAPS_EAGER_DYNAMO=1`` turns the stand-ins off.

The window is once per process and a fraction of a second, but ``sys.modules`` is
shared: another thread importing ``torch._dynamo`` during it would get the stand-in. A
program that compiles in threads while featuremaps first loads a model should import
``torch._dynamo`` first (then the stand-ins are not used) or set the variable above.

Every featuremaps module that needs torchvision calls :func:`import_torchvision` before
``from torchvision... import``; the first import in a process is the one that counts.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import types
from typing import Any

__all__ = ["import_torchvision"]

_DYNAMO = "torch._dynamo"
_DYNAMO_UTILS = "torch._dynamo.utils"
_MODULES = ("torchvision", "torchvision.transforms.v2")


def import_torchvision() -> types.ModuleType:
    """The ``torchvision`` module, imported without ``torch._dynamo`` where possible."""
    if all(name in sys.modules for name in _MODULES):
        return sys.modules["torchvision"]
    if _DYNAMO in sys.modules or os.environ.get("FEATUREMAPS_EAGER_DYNAMO"):
        return _import_all()
    import torch

    package = types.ModuleType(_DYNAMO, "stand-in for torch._dynamo while torchvision imports")
    package.__path__ = []  # a package with no submodules: anything else fails, then falls back
    utils = types.ModuleType(_DYNAMO_UTILS)
    package.disable = _deferred_disable  # type: ignore[attr-defined]
    package.utils = utils  # type: ignore[attr-defined]
    utils.is_compile_supported = _is_compile_supported  # type: ignore[attr-defined]
    stand_ins = {_DYNAMO: package, _DYNAMO_UTILS: utils}
    sys.modules.update(stand_ins)
    try:
        return _import_all()
    except ImportError:
        _remove(stand_ins, torch)
        return _import_all()  # the ordinary way
    finally:
        _remove(stand_ins, torch)


def _import_all() -> types.ModuleType:
    for name in _MODULES:
        importlib.import_module(name)
    return sys.modules["torchvision"]


def _remove(stand_ins: dict[str, types.ModuleType], torch: Any) -> None:
    """Take the stand-ins out of ``sys.modules`` and ``torch``, leaving the real ones."""
    for name, module in stand_ins.items():
        if sys.modules.get(name) is module:
            del sys.modules[name]
    if torch.__dict__.get("_dynamo") is stand_ins[_DYNAMO]:
        delattr(torch, "_dynamo")


def _deferred_disable(fn: Any = None, recursive: bool = True, *, reason: str | None = None) -> Any:
    """``torch._dynamo.disable``, applied on the first call made once dynamo is loaded.

    Before ``torch._dynamo`` is imported nothing can be compiling, so the function is
    called as it is; afterwards the call goes through the real ``disable(fn)``.
    """
    if fn is None:
        return functools.partial(_deferred_disable, recursive=recursive, reason=reason)
    real: Any = None

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal real
        dynamo = sys.modules.get(_DYNAMO)
        if dynamo is None or getattr(dynamo, "__path__", None) == []:  # absent, or a stand-in
            return fn(*args, **kwargs)
        if real is None:
            real = dynamo.disable(fn, recursive, reason=reason)
        return real(*args, **kwargs)

    return call


def _is_compile_supported(device_type: Any) -> Any:
    """``torch._dynamo.utils.is_compile_supported``, imported on its first call."""
    from torch._dynamo.utils import is_compile_supported

    return is_compile_supported(device_type)
