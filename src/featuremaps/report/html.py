"""Pages from templates: packaged assets, ``{{name}}`` filling, safe inline JSON and the
Content-Security-Policy of inline styles and scripts.

The report, the server's pages and the atlas pages share these helpers, so every page is
filled, escaped and locked down the same way. No model code and no numbers here.

Example:
    >>> page = fill_template("<p>{{x}}</p>", {"x": html.escape("<b>")})
    >>> page
    '<p>&lt;b&gt;</p>'
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any

from ..errors import FeatureMapsError
from ..render import data_url

__all__ = [
    "asset",
    "csp_hash",
    "data_url",
    "fill_template",
    "inline_csp",
    "script_json",
    "script_json_chunks",
]

_TOKEN = re.compile(r"\{\{(\w+)\}\}")


def asset(name: str) -> str:
    """The text of a packaged template or static file (``templates/x`` or ``static/x``)."""
    return (resources.files("featuremaps") / name).read_text(encoding="utf-8")


def fill_template(template: str, values: dict[str, str]) -> str:
    """Replace each ``{{name}}`` by ``values[name]`` in one pass (values are not rescanned).

    Values are inserted as given: escape user text with :func:`html.escape` first.

    Raises:
        FeatureMapsError: the template names a value that is not given.
    """

    def sub(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise FeatureMapsError(f"template value {key!r} is missing")
        return values[key]

    return _TOKEN.sub(sub, template)


_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"), ensure_ascii=False)


def _script_safe(text: str) -> str:
    """JSON text with ``<``, ``>``, ``&`` and the JS line separators escaped."""
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def script_json(obj: Any) -> str:
    """JSON safe to place inside a ``<script>`` element (no ``<``, ``>`` or ``&``).

    NaN and ±Inf are refused (:func:`featuremaps.summaries.json_float` turns them into
    ``null`` first).
    """
    return _script_safe(_ENCODER.encode(obj))


def script_json_chunks(obj: Any, size: int = 1 << 20) -> Iterator[str]:
    """:func:`script_json` in pieces of about ``size`` characters, never the whole text at
    once (a large report is written without a second copy of its data in memory)."""
    buf: list[str] = []
    n = 0
    for piece in _ENCODER.iterencode(obj):
        buf.append(piece)
        n += len(piece)
        if n >= size:
            yield _script_safe("".join(buf))
            buf, n = [], 0
    if buf:
        yield _script_safe("".join(buf))


def csp_hash(text: str) -> str:
    """The CSP source ``'sha256-...'`` that allows exactly this inline style or script."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def inline_csp(
    styles: Sequence[str],
    scripts: Sequence[str],
    img_src: str = "data: blob:",
    media_src: str | None = None,
) -> str:
    """A policy for a self-contained page: nothing is fetched, only these inline styles and
    scripts run, images come from ``img_src`` (data and blob URLs by default), audio and
    video from ``media_src`` (none by default; the report's embedded videos: ``data:``)."""
    style_src = " ".join(csp_hash(s) for s in styles) or "'none'"
    script_src = " ".join(csp_hash(s) for s in scripts) or "'none'"
    return (
        f"default-src 'none'; img-src {img_src}; "
        + (f"media-src {media_src}; " if media_src else "")
        + f"style-src {style_src}; "
        f"script-src {script_src}; base-uri 'none'; form-action 'none'"
    )


def escape(text: object) -> str:
    """User text for HTML element content or a quoted attribute."""
    return html.escape(str(text))
