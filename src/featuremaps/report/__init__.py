"""One self-contained HTML report of what a model's layers see in some images.

The report is a single file: the input photos, the PCA pictures and the channel maps are
embedded, the page's script and style are inline, and a Content-Security-Policy forbids
every request, so it opens from disk with no network.

- :mod:`.build`: the data the page embeds, built one image at a time.
- :mod:`.html`: templates, assets, safe inline JSON and the CSP (shared with the server's
  and the atlas's pages).

Example:
    >>> from featuremaps.images import sample_image
    >>> path = write_report("r.html", "efficientnet_lite0", [sample_image("cat")])
"""

from __future__ import annotations

from .build import (
    REPORT_CMAPS,
    ReportBuilder,
    ReportOptions,
    atlas_png,
    build_report,
    layer_data,
    page_values,
    quantize,
    render_html,
    report_css,
    report_script,
    write_report,
)
from .html import asset, csp_hash, data_url, escape, fill_template, inline_csp, script_json

__all__ = [
    "REPORT_CMAPS",
    "ReportBuilder",
    "ReportOptions",
    "asset",
    "atlas_png",
    "build_report",
    "csp_hash",
    "data_url",
    "escape",
    "fill_template",
    "inline_csp",
    "layer_data",
    "page_values",
    "quantize",
    "render_html",
    "report_css",
    "report_script",
    "script_json",
    "write_report",
]
