"""Capturing layer outputs as ``(B, C, H, W)`` maps.

``hooks`` holds the one hook lifecycle, ``select`` what a user may ask for (names, calls,
entries, globs, presets), ``layout`` how any output becomes a map (a :class:`Layout`
record per output), ``cache`` what is kept per model, ``core`` the capture itself.
"""

from __future__ import annotations

from .cache import clear_cache
from .core import Capture, FeatureMaps, capture, list_layers
from .hooks import Hooks, hooked
from .keys import LayerKey
from .layout import (
    LayerInfo,
    Layout,
    LayoutContext,
    LayoutKind,
    TokenInfo,
    check_input_size,
    model_tokens,
    normalize_output,
    to_bchw,
)
from .select import (
    PRESETS,
    Selection,
    module_names,
    needs_probe,
    parse_request,
    resolve_layers,
    select_layers,
)

__all__ = [
    "PRESETS",
    "Capture",
    "FeatureMaps",
    "Hooks",
    "LayerInfo",
    "LayerKey",
    "Layout",
    "LayoutContext",
    "LayoutKind",
    "Selection",
    "TokenInfo",
    "capture",
    "check_input_size",
    "clear_cache",
    "hooked",
    "list_layers",
    "model_tokens",
    "module_names",
    "needs_probe",
    "normalize_output",
    "parse_request",
    "resolve_layers",
    "select_layers",
    "to_bchw",
]
