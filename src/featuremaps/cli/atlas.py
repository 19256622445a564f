"""``featuremaps atlas``: top images per channel over a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..options import Device, Engine, Precision, Score
from ._app import (
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
    data: Annotated[
        str,
        typer.Argument(
            help="Folder (recursive), glob, or text file of paths; or an fsspec URL "
            "(s3://bucket/prefix/, a glob, or a list file of URLs)."
        ),
    ],
    layers: LayersOpt = "stages",
    top: Annotated[int, typer.Option("--top", "-k", help="Images kept per channel.")] = 9,
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (also holds the checkpoint).")
    ] = Path("featuremaps-atlas"),
    weights: WeightsOpt = "DEFAULT",
    score: Annotated[
        Score,
        typer.Option(
            help="max (spatial max) or mean; relevance (classifiers) also ranks by each "
            "channel's relevance to each image's own top-1 class, beside the max ranking."
        ),
    ] = Score.MAX,
    batch_size: Annotated[int, typer.Option(help="Images per forward.")] = 32,
    workers: Annotated[int, typer.Option(help="Decoding processes (ray: model actors).")] = 2,
    engine: Annotated[
        Engine, typer.Option(help="local, or ray (--ray-address, RAY_ADDRESS, or local).")
    ] = Engine.LOCAL,
    device: Annotated[
        Device, typer.Option(help="auto, cpu, cuda or mps (local engine).")
    ] = Device.AUTO,
    precision: Annotated[
        Precision, typer.Option(help="Forward precision; statistics stay float32/64.")
    ] = Precision.FP32,
    gpus_per_worker: Annotated[
        float | None,
        typer.Option(help="GPUs per Ray actor [default: 1 where the cluster has GPUs, else 0]."),
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS or local).")
    ] = None,
    checkpoint_every: Annotated[float, typer.Option(help="Seconds between checkpoints.")] = 60.0,
    restart: Annotated[bool, typer.Option(help="Ignore a checkpoint in --out.")] = False,
    report_url: Annotated[
        str | None, typer.Option(help="Channel link template with {layer} and {channel}.")
    ] = None,
    visualize: Annotated[
        bool,
        typer.Option(
            help="Also one feature visualization per channel (what maximizes its mean) on "
            "the layer pages, after the pass over the data (ray: spread over the actors)."
        ),
    ] = False,
    visualize_steps: Annotated[
        int, typer.Option(help="Optimization steps per visualization.")
    ] = 128,
    visualize_size: Annotated[int, typer.Option(help="Side of each visualization, pixels.")] = 96,
    visualize_batch: Annotated[int, typer.Option(help="Channels optimized together.")] = 16,
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
            precision=precision,
            gpus_per_worker=gpus_per_worker,
            ray_address=ray_address,
            checkpoint_seconds=checkpoint_every,
            restart=restart,
            report_url=report_url,
            visualize=visualize,
            visualize_steps=visualize_steps,
            visualize_size=visualize_size,
            visualize_batch=visualize_batch,
            progress=progress,
        )
    resumed = f" ({r.resumed} done by an earlier run)" if r.resumed else ""
    out.print(
        f"{r.images_used} of {r.images_total} images used{resumed}, "
        f"{len(r.skipped)} skipped, {r.images_per_second:.1f} images/s",
        markup=False,
        highlight=False,
    )
    out.print(
        f"atlas -> {r.atlas_json}\npages -> {r.pages[0]}\nPCA basis -> {r.pca_basis}",
        markup=False,
        highlight=False,
    )
