"""What one viewer server is configured with, and which model specs it accepts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .._torchvision import import_torchvision
from ..errors import FeatureMapsError, suggest
from ..models import available_models
from .errors import ApiError

DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024
"""Largest accepted upload in bytes."""
DEFAULT_MAX_PIXELS = 40_000_000
"""Largest accepted image in pixels (width times height)."""
DEFAULT_MAX_DECODES = 2
"""Uploads decoded at the same time; more get 503 with a Retry-After hint."""
DEFAULT_IMAGE_BYTES = 256 << 20
"""Memory of the decoded uploads kept (one image larger than this is refused)."""
WEIGHTS = {"default": "DEFAULT", "none": "none"}
CMAPS = ("viridis", "magma", "inferno", "plasma", "cividis", "gray", "RdBu_r", "coolwarm", "jet")
_TIMM_NAME = re.compile(r"timm:[A-Za-z0-9_.\-]{1,120}")
_CODE_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit", ".py")


@dataclass(frozen=True)
class ServerConfig:
    """The limits and policies of one server.

    Args:
        allow_code_models: accept ``package.module:factory`` and TorchScript specs.
        max_upload_bytes: largest upload.
        max_pixels: largest image in pixels.
        max_decodes: uploads decoded at once (the rest get 503).
        image_bytes: memory of the decoded images kept.
        cache_entries: captures kept (one per model, weights and image).
        cache_bytes: total size of the kept activations.
        model_cache: loaded models kept.
        device: where models run.
    """

    allow_code_models: bool = False
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_decodes: int = DEFAULT_MAX_DECODES
    image_bytes: int = DEFAULT_IMAGE_BYTES
    cache_entries: int = 8
    cache_bytes: int = 1 << 30
    model_cache: int = 2
    device: str = "cpu"

    def validate(self) -> ServerConfig:
        """Return self, or raise when a limit is not positive.

        Raises:
            FeatureMapsError: a limit below one.
        """
        for name in (
            "max_upload_bytes",
            "max_pixels",
            "max_decodes",
            "image_bytes",
            "cache_entries",
            "cache_bytes",
            "model_cache",
        ):
            value = getattr(self, name)
            if value < 1:
                raise FeatureMapsError(f"{name} is {value}; it must be at least 1")
        return self

    def too_large(self) -> str:
        """The message of a 413 for an upload over the byte limit."""
        return too_large(self.max_upload_bytes)


def too_large(limit: int) -> str:
    """The message of a 413 for an upload over ``limit`` bytes."""
    return f"upload too large: the limit is {limit / 1e6:.1f} MB"


def _has_cached_weights(name: str) -> bool:
    """Whether torchvision's pretrained weights of ``name`` are on disk already."""
    from torch.hub import get_dir

    import_torchvision()
    from torchvision.models import get_model_weights

    try:
        url = get_model_weights(name).DEFAULT.url
    except Exception:
        return False
    return (Path(get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]).is_file()


class ModelCatalog:
    """The model names a server offers and the policy on specs that run code."""

    def __init__(self, allow_code_models: bool) -> None:
        self.allow_code_models = allow_code_models
        self._names: list[str] | None = None
        self._pretrained: dict[str, bool] | None = None

    def names(self) -> list[str]:
        """Every built-in model name, the default first."""
        if self._names is None:
            self._names = available_models()
        return self._names

    def pretrained(self) -> dict[str, bool]:
        """Whether each model's pretrained weights can be used without a download."""
        if self._pretrained is None:
            names = self.names()
            self._pretrained = {n: n == names[0] or _has_cached_weights(n) for n in names}
        return self._pretrained

    def check(self, spec: str, weights: str) -> tuple[str, str]:
        """Validate a model spec and weights from a request; return them normalized.

        Raises:
            ApiError: 403 for code specs when they are not allowed, 400 otherwise.
        """
        spec = spec.strip()
        w = WEIGHTS.get(weights.strip().lower())
        if w is None:
            raise ApiError(
                400,
                f"weights {weights!r}: the viewer takes DEFAULT (pretrained) or none "
                "(random); weight files are not read from requests",
            )
        if spec in self.names() or _TIMM_NAME.fullmatch(spec):
            return spec, w
        runs_code = (
            ":" in spec or "/" in spec or "\\" in spec or spec.lower().endswith(_CODE_SUFFIXES)
        )
        if runs_code:
            if not self.allow_code_models:
                raise ApiError(
                    403,
                    f"model spec {spec!r} runs code (package.module:factory or a TorchScript "
                    "file); this server refuses such specs. Start it with "
                    "`featuremaps serve --allow-code-models` to allow them.",
                )
            return spec, w
        raise ApiError(
            400,
            f"unknown model {spec!r}.{suggest(spec, self.names())} Choose a name from "
            "the list, or timm:NAME.",
        )
