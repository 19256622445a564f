"""The optimization: one picture per objective, in one batch; the model left as found."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from ..capture import LayerInfo, check_input_size, hooked, list_layers
from ..errors import FeatureMapsError, LayerError, ModelError
from ..models import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, Preprocess
from .image import NO_TRANSFORMS, FourierImage, Transforms, random_view
from .objectives import Objective, parse_objectives
from .plan import Plan, StopForward, plan_objectives
from .results import Visualization, Visualizations


def _device_of(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _dtype_of(module: nn.Module) -> torch.dtype:
    first = next(module.parameters(), None)
    return first.dtype if first is not None and first.is_floating_point() else torch.float32


def _generators(seed: int, objectives: Sequence[Objective]) -> list[torch.Generator]:
    """One generator per image, from the seed and its objective (not its position)."""
    gens = []
    for obj in objectives:
        g = torch.Generator()
        g.manual_seed((seed * 1_000_003 + zlib.crc32(obj.text.encode())) % (1 << 63))
        gens.append(g)
    return gens


class _Forward:
    """Runs the model and reads each row's objective; hooked by :func:`_session`."""

    def __init__(self, module: nn.Module, plan: Plan):
        self.module = module
        self.plan = plan
        self.stop_early = not plan.class_rows
        self.n_readers = sum(len(r) for r in plan.readers.values())
        self._found: dict[str, tuple[list[int], torch.Tensor]] = {}
        self._calls: dict[str, int] = {}

    def hook_for(self, base: str) -> Callable[..., None]:
        readers = self.plan.readers[base]

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            call = self._calls[base] = self._calls.get(base, 0) + 1
            for reader in readers:
                if reader.call == call:
                    self._found[reader.name] = reader.values(output)
            if self.stop_early and len(self._found) == self.n_readers:
                raise StopForward

        return hook

    def objectives(self, x: torch.Tensor) -> torch.Tensor:
        """One forward; each row's objective value, ``(B,)``."""
        self._found, self._calls = {}, {}
        output = None
        try:
            output = self.module(x)
        except StopForward:
            pass
        missing = [
            r.name for rs in self.plan.readers.values() for r in rs if r.name not in self._found
        ]
        if missing:
            raise LayerError(
                f"layer(s) {', '.join(missing)} did not run during this forward pass "
                "(the model takes another path for this input)"
            )
        rows = [r for found_rows, _ in self._found.values() for r in found_rows]
        parts = [vals for _, vals in self._found.values()]
        if self.plan.class_rows:
            assert isinstance(output, torch.Tensor)
            r = torch.tensor(self.plan.class_rows, device=output.device)
            k = torch.tensor(self.plan.class_index, device=output.device)
            rows.extend(self.plan.class_rows)
            parts.append(output[r, k].float())
        order = torch.tensor(rows).argsort().to(parts[0].device)
        return torch.cat(parts)[order]


@contextmanager
def _session(module: nn.Module, plan: Plan) -> Iterator[_Forward]:
    """The model ready for the optimization, and left as found whatever happens.

    Inside: eval mode, no ``requires_grad`` on any parameter, a hook on each module an
    objective reads. On leaving: hooks removed, modes and ``requires_grad`` restored.
    """
    forward = _Forward(module, plan)
    grads = [(p, p.requires_grad) for p in module.parameters()]
    try:
        with hooked(module, eval_mode=True) as hooks:
            for p, _ in grads:
                p.requires_grad_(False)
            for base in plan.readers:
                hooks.after(module.get_submodule(base), forward.hook_for(base))
            yield forward
    finally:
        for p, flag in grads:
            if p.requires_grad != flag:
                p.requires_grad_(flag)


def visualize(
    model: LoadedModel | nn.Module,
    objectives: str | Objective | Sequence[str | Objective],
    *,
    steps: int = 512,
    size: int = 224,
    seed: int = 0,
    device: str | torch.device | None = None,
    lr: float = 0.05,
    transforms: Transforms | None = Transforms(),
    preprocess: Preprocess | None = None,
    categories: Sequence[str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    batch_size: int | None = None,
) -> Visualizations:
    """Optimize one picture per objective, all in one batch.

    Args:
        model: a :class:`LoadedModel` (its preprocessing and class names are used) or
            any ``nn.Module`` taking ``(B, 3, H, W)``.
        objectives: ``channel:LAYER:C`` (a channel's mean), ``neuron:LAYER:C`` (the
            centre position), ``class:K`` / ``class:LABEL`` (a logit), ``layer:LAYER``
            (DeepDream: the layer's mean square); ``C`` may be a range ``A-B``.
        steps: optimization steps (Adam).
        size: side of the square pictures, in pixels.
        seed: the same seed gives the same pictures (on the CPU).
        device: ``auto``, ``cpu``, ``cuda``, ``mps`` or a ``torch.device``; ``None``:
            where the model is. The model is moved there and back.
        lr: Adam's learning rate on the spectrum.
        transforms: the random transformation of each step; ``None`` or
            :data:`NO_TRANSFORMS` for none.
        preprocess: normalization, for a bare module (default: ImageNet mean and std).
        categories: class names, for a bare module (``class:LABEL``).
        progress: called as ``progress("visualize", done, total)`` after each step.
        batch_size: objectives optimized together (``None``: all in one batch). Each
            picture has its own generator, so the pictures do not depend on it (nor on
            which other objectives share their batch), up to float rounding.

    Returns:
        :class:`Visualizations`: one :class:`Visualization` per objective, in order.

    Raises:
        ObjectiveError: a malformed objective, an unknown layer (with suggestions), a
            channel or class out of range, a class on a model without classes.
        FeatureMapsError: bad settings; raised before any hook or heavy compute.

    Example:
        >>> import featuremaps as fm
        >>> m = fm.load_model("efficientnet_lite0")
        >>> vis = fm.visualize(m, "class:espresso", steps=256)  # doctest: +SKIP
        >>> vis[0].to_pil().save("espresso.png")  # doctest: +SKIP
    """
    if isinstance(model, LoadedModel):
        module = model.module
        pp = preprocess or model.preprocess
        categories = categories if categories is not None else model.categories
        spec, weights = model.spec, model.weights
    else:
        module = model
        pp = preprocess or Preprocess(mean=IMAGENET_MEAN, std=IMAGENET_STD)
        spec, weights = type(model).__name__, ""
    if isinstance(module, torch.jit.ScriptModule):
        raise ModelError(
            "this is a TorchScript model: forward hooks cannot see its layers. Load the "
            "Python model instead (a torchvision name with --weights FILE, or "
            "package.module:factory)."
        )
    if steps < 1 or size < 8 or lr <= 0:
        raise FeatureMapsError(
            f"steps {steps}, size {size}, lr {lr}: need steps >= 1, size >= 8 and lr > 0"
        )
    tf = transforms if transforms is not None else NO_TRANSFORMS
    tf.validate()
    try:
        check_input_size(module, torch.empty(1, 3, size, size, device="meta"))
    except ModelError:  # a torchvision ViT: one input size only
        fixed = getattr(module, "image_size", size)
        raise ModelError(
            f"size {size}: this torchvision {type(module).__name__} takes only {fixed}x{fixed} "
            f"inputs (its image_size); use --size {fixed}, or a timm ViT (timm:NAME), which "
            "takes any size"
        ) from None
    objs = parse_objectives(objectives)
    dev = _resolve(device)
    where = dev or _device_of(module)
    dtype = _dtype_of(module)

    def probe_input() -> torch.Tensor:
        return torch.zeros(1, 3, size, size, dtype=dtype, device=where)

    def plan(chunk: Sequence[Objective]) -> tuple[Plan, list[Objective]]:
        def probe() -> list[LayerInfo]:
            return list_layers(module, probe_input())

        return plan_objectives(
            module, chunk, probe, lambda: _output_of(module, probe_input()), categories
        )

    per_batch = batch_size if batch_size is not None and batch_size > 0 else len(objs)
    chunks = math.ceil(len(objs) / per_batch)
    items: list[Visualization] = []
    with _moved(module, dev):
        every, objs = plan(objs)  # every objective checked before the first step
        for k in range(chunks):
            chunk = objs[k * per_batch : (k + 1) * per_batch]
            chunk_plan = every if chunks == 1 else plan(chunk)[0]

            def tick(phase: str, done: int, total: int, k: int = k) -> None:
                if progress is not None:
                    progress(phase, k * steps + done, chunks * steps)

            gens = _generators(seed, chunk)
            final_rgb, final, trace = _optimize(
                module, chunk_plan, gens, size, pp, tf, steps, lr, where, dtype, tick
            )
            pictures = final_rgb.permute(0, 2, 3, 1).to("cpu", torch.float32).numpy()
            items.extend(
                Visualization(
                    objective=obj,
                    image=np.ascontiguousarray(pictures[i]),
                    value=float(final[i]),
                    history=tuple(float(v) for v in trace[:, i]),
                )
                for i, obj in enumerate(chunk)
            )
    return Visualizations(items, steps, size, seed, lr, tf, spec, weights)


def _optimize(
    module: nn.Module,
    plan: Plan,
    gens: Sequence[torch.Generator],
    size: int,
    pp: Preprocess,
    tf: Transforms,
    steps: int,
    lr: float,
    where: torch.device,
    dtype: torch.dtype,
    progress: Callable[[str, int, int], None] | None,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The loop: final pictures ``(B, 3, S, S)``, final values ``(B,)``, trace ``(steps, B)``."""
    mean = torch.tensor(pp.mean, dtype=torch.float32, device=where).view(1, 3, 1, 1)
    std = torch.tensor(pp.std, dtype=torch.float32, device=where).view(1, 3, 1, 1)
    history: list[torch.Tensor] = []
    with _session(module, plan) as session, torch.enable_grad():
        image = FourierImage(gens, size, where)
        optimizer = torch.optim.Adam([image.spectrum], lr=lr)
        for step in range(steps):
            x = (random_view(image.rgb(), tf, gens) - mean) / std
            values = session.objectives(x.to(dtype))
            (grad,) = torch.autograd.grad(-values.sum(), [image.spectrum])
            image.spectrum.grad = grad
            optimizer.step()
            history.append(values.detach().to("cpu", torch.float64))
            if progress is not None:
                progress("visualize", step + 1, steps)
        with torch.no_grad():
            final_rgb = image.rgb()
            final = session.objectives(((final_rgb - mean) / std).to(dtype)).float().cpu()
    return final_rgb.detach(), final, torch.stack(history).numpy()


def _resolve(device: str | torch.device | None) -> torch.device | None:
    if device is None or isinstance(device, torch.device):
        return device
    from ..pipeline import resolve_device

    return resolve_device(device)


class _moved:
    """The module on ``device`` inside the block, back where it was after."""

    def __init__(self, module: nn.Module, device: torch.device | None):
        self.module, self.device, self.home = module, device, _device_of(module)

    def __enter__(self) -> None:
        if self.device is not None and self.device != self.home:
            self.module.to(self.device)

    def __exit__(self, *exc: Any) -> None:
        if self.device is not None and self.device != self.home:
            self.module.to(self.home)


def _output_of(module: nn.Module, x: torch.Tensor) -> Any:
    """The model's output on ``x`` (eval mode, no gradient), modes restored."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            return module(x)
    finally:
        for m, mode in modes:
            m.training = mode
