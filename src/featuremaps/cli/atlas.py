"""``featuremaps atlas``: top images per channel over a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ._app import (
    DeviceOpt,
    LayersOpt,
    ModelArg,
    WeightsOpt,
    app,
    err,
    out,
    progress_bar,
)


@app.command()
def atlas(
    model: ModelArg,
    data: Annotated[str, typer.Argument(help="Folder (recursive), glob, or text file of paths.")],
    layers: LayersOpt = "stages",
    top: Annotated[int, typer.Option("--top", "-k", help="Images kept per channel.")] = 9,
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (also holds the checkpoint).")
    ] = Path("featuremaps-atlas"),
    weights: WeightsOpt = "DEFAULT",
    score: Annotated[str, typer.Option(help="max (spatial max) or mean.")] = "max",
    batch_size: Annotated[int, typer.Option(help="Images per forward.")] = 32,
    workers: Annotated[int, typer.Option(help="Decoding processes (ray: model actors).")] = 2,
    engine: Annotated[str, typer.Option(help="local, or ray (RAY_ADDRESS or local).")] = "local",
    device: DeviceOpt = "auto",
    checkpoint_every: Annotated[float, typer.Option(help="Seconds between checkpoints.")] = 60.0,
    restart: Annotated[bool, typer.Option(help="Ignore a checkpoint in --out.")] = False,
    report_url: Annotated[
        str | None, typer.Option(help="Channel link template with {layer} and {channel}.")
    ] = None,
) -> None:
    """Top-K images per channel over a dataset, a dataset PCA basis and HTML pages."""
    import warnings

    from ..atlas import build_atlas

    def show(message: Any, *args: Any, **kwargs: Any) -> None:
        err.print(f"warning: {message}", markup=False, highlight=False)

    with progress_bar(rate=True) as progress, warnings.catch_warnings():
        warnings.showwarning = show
        r = build_atlas(
            model,
            data,
            layers,
            out_dir,
            weights=weights,
            top=top,
            score=score,
            batch_size=batch_size,
            workers=workers,
            engine=engine,
            device=device,
            checkpoint_seconds=checkpoint_every,
            restart=restart,
            report_url=report_url,
            progress=progress,
        )
    resumed = f" ({r.resumed} done by an earlier run)" if r.resumed else ""
    out.print(
        f"{r.images_used} of {r.images_total} images used{resumed}, "
        f"{len(r.skipped)} skipped, {r.images_per_second:.1f} images/s"
    )
    out.print(f"atlas -> {r.atlas_json}\npages -> {r.pages[0]}\nPCA basis -> {r.pca_basis}")
