"""The one hook lifecycle: every hook featuremaps puts on a model goes through :func:`hooked`.

Capture, the layer listing, the layout tracker and relevance all register their hooks on
the :class:`Hooks` that :func:`hooked` yields. The block puts the model in eval mode when
asked, and on leaving, whatever happened inside, removes every hook and gives each module
its train/eval mode back. An exception raised inside is never swallowed.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    >>> seen = []
    >>> with hooked(net) as hooks:
    ...     hooks.after(net[0], lambda m, i, o: seen.append(o.shape))
    ...     _ = net(torch.zeros(1, 3, 8, 8))
    >>> seen, sum(len(m._forward_hooks) for m in net.modules())
    ([torch.Size([1, 4, 6, 6])], 0)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import LayerError

ForwardHook = Callable[[nn.Module, Any, Any], Any]
PreHook = Callable[[nn.Module, Any], Any]


class Hooks:
    """The hooks registered during one :func:`hooked` block (removed when it ends)."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def after(self, module: nn.Module, fn: ForwardHook, *, prepend: bool = False) -> None:
        """Call ``fn(module, inputs, output)`` each time ``module`` returns.

        A non-``None`` return value of ``fn`` replaces the module's output.
        """
        self._handles.append(module.register_forward_hook(fn, prepend=prepend))

    def before(self, module: nn.Module, fn: PreHook, *, prepend: bool = False) -> None:
        """Call ``fn(module, inputs)`` each time ``module`` starts."""
        self._handles.append(module.register_forward_pre_hook(fn, prepend=prepend))

    def __len__(self) -> int:
        return len(self._handles)

    def _remove_all(self) -> None:
        while self._handles:
            self._handles.pop().remove()


def refuse_torchscript(model: nn.Module) -> None:
    """Raise :class:`LayerError` for a TorchScript model, whose layers hooks cannot see."""
    if isinstance(model, torch.jit.ScriptModule):
        raise LayerError(
            "this is a TorchScript model: its layers run inside TorchScript, where "
            "forward hooks cannot see them, so no layer can be captured. Load the Python "
            "model instead (`package.module:factory`, or a torchvision name with "
            "--weights FILE for a state dict)."
        )


@contextmanager
def hooked(
    model: nn.Module,
    *,
    eval_mode: bool = True,
    named: Sequence[tuple[str, nn.Module]] | None = None,
) -> Iterator[Hooks]:
    """Register hooks on ``model`` for the length of a ``with`` block.

    Args:
        model: the model; a TorchScript model is refused.
        eval_mode: put the model in eval mode for the block.
        named: ``model.named_modules()``, when the caller has walked it already.

    Yields:
        The :class:`Hooks` to register on. All are removed and every module's mode is
        restored on leaving, also when the block raises (the exception goes on).

    Raises:
        LayerError: a TorchScript model.
    """
    refuse_torchscript(model)
    modules = [m for _, m in (model.named_modules() if named is None else named)]
    modes = [(m, m.training) for m in modules]
    hooks = Hooks()
    try:
        if eval_mode and any(mode for _, mode in modes):
            model.eval()
        yield hooks
    finally:
        hooks._remove_all()
        for module, mode in modes:
            if module.training != mode:
                module.training = mode
