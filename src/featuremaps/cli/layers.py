"""``featuremaps layers``: every name a user may type, exactly as ``--layers`` takes it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from ._app import (
    ModelArg,
    PrefixOpt,
    TokensGridOpt,
    WeightsOpt,
    app,
    out,
    plain,
    token_layout,
)


@app.command()
def layers(
    model: ModelArg,
    weights: WeightsOpt = "none",
    image: Annotated[
        Path | None, typer.Option(help="Run this image instead of a blank input.")
    ] = None,
    tokens_grid: TokensGridOpt = None,
    prefix_tokens: PrefixOpt = None,
) -> None:
    """List every layer with its type and output shape (one dry forward).

    The names are those --layers takes: an entry of a dict/tuple output as NAME[KEY],
    each call of a module that runs several times as NAME:K.
    """
    import torch

    from ..capture import PRESETS, list_layers
    from ..capture.select import with_aliases
    from ..images import load_image, preprocess
    from ..models import load_model

    loaded = load_model(model, weights)
    pp = loaded.preprocess
    if image is not None:
        x = preprocess(load_image(image), pp)[None]
    else:
        side = pp.crop or pp.resize or 224
        x = torch.zeros(1, 3, side, side)
    infos = list_layers(loaded.module, x, layout=token_layout(tokens_grid, prefix_tokens))
    infos = with_aliases(loaded.module, infos)
    # user text (model spec, layer names, notes) goes in as Text: never read as markup
    table = Table(title=Text(f"{loaded.spec} ({loaded.weights}), input {tuple(x.shape)}"))
    for column in ("name", "type", "output shape", "map (B,C,H,W)", "note"):
        table.add_column(column)
    rank = _module_order(loaded.module)
    for info in sorted(infos, key=lambda i: rank.get(i.key.module, 1 << 30)):
        raw = "x".join(map(str, info.raw_shape)) if info.raw_shape else "-"
        shape = "x".join(map(str, info.shape)) if info.shape else "-"
        layout = "" if info.layout in ("NCHW", "not spatial") else info.layout
        note = "; ".join(part for part in (layout, info.note) if part)
        table.add_row(*(Text(cell) for cell in (info.name, info.module_type, raw, shape, note)))
    out.print(table)
    out.print(plain(f"preprocessing: {pp.describe()}"))
    out.print(plain(f"presets: {', '.join(PRESETS)} (e.g. --layers stages)"))


def _module_order(module: Any) -> dict[str, int]:
    """Every module name (all names of a shared module) -> its place in the model."""
    names = (n for n, _ in module.named_modules(remove_duplicate=False))
    return {n: i for i, n in enumerate(names)}
