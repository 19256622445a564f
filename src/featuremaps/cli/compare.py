"""``featuremaps compare``: CKA between the layers of two models over a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..options import Device, Engine
from ._app import DeviceOpt, ModelArg, app, err, out, progress_bar

WeightsAOpt = Annotated[
    str,
    typer.Option(
        "--weights-a", help="Model A: DEFAULT (pretrained), none (random), or a weight file."
    ),
]
WeightsBOpt = Annotated[
    str,
    typer.Option(
        "--weights-b", help="Model B: DEFAULT (pretrained), none (random), or a weight file."
    ),
]


@app.command()
def compare(
    model_a: ModelArg,
    model_b: Annotated[str, typer.Argument(help="The second model, in the same forms.")],
    data: Annotated[str, typer.Argument(help="Folder (recursive), glob, or text file of paths.")],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder: cka.json, cka.png, compare.html.")
    ] = Path("featuremaps-compare"),
    weights_a: WeightsAOpt = "DEFAULT",
    weights_b: WeightsBOpt = "DEFAULT",
    layers: Annotated[
        str,
        typer.Option(
            "--layers", "-l", help="Layers of both models: names, globs or presets (stages)."
        ),
    ] = "stages",
    layers_a: Annotated[
        str | None, typer.Option("--layers-a", help="Layers of model A (overrides --layers).")
    ] = None,
    layers_b: Annotated[
        str | None, typer.Option("--layers-b", help="Layers of model B (overrides --layers).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Images per batch of the minibatch estimator (at least 4).")
    ] = 32,
    pool: Annotated[
        str, typer.Option(help="none: flattened C*H*W maps; mean: channel means.")
    ] = "none",
    engine: Annotated[
        Engine, typer.Option(help="local, or ray (--ray-address, RAY_ADDRESS, or local).")
    ] = Engine.LOCAL,
    workers: Annotated[int, typer.Option(help="Decoding processes (ray: model actors).")] = 2,
    device: DeviceOpt = Device.AUTO,
    gpus_per_worker: Annotated[
        float | None,
        typer.Option(help="GPUs per Ray actor [default: 1 where the cluster has GPUs, else 0]."),
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS or local).")
    ] = None,
    checkpoint_every: Annotated[float, typer.Option(help="Seconds between checkpoints.")] = 60.0,
    restart: Annotated[bool, typer.Option(help="Ignore a checkpoint in --out.")] = False,
) -> None:
    """Debiased linear CKA between every pair of layers of two models, a heatmap and a page."""
    import warnings

    from ..compare import build_compare

    def show(message: Any, *args: Any, **kwargs: Any) -> None:
        err.print(f"warning: {message}", markup=False, highlight=False)

    with progress_bar(rate=True) as progress, warnings.catch_warnings():
        warnings.showwarning = show
        done = build_compare(
            model_a,
            model_b,
            data,
            out_dir,
            layers=layers,
            layers_a=layers_a,
            layers_b=layers_b,
            weights_a=weights_a,
            weights_b=weights_b,
            batch_size=batch_size,
            pool=pool,
            engine=str(engine),
            device=device,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            ray_address=ray_address,
            progress=progress,
            checkpoint_seconds=checkpoint_every,
            restart=restart,
        )
    r = done.result
    resumed = f" ({r.resumed} done by an earlier run)" if r.resumed else ""
    out.print(
        f"{r.images_used} of {r.images_total} images used{resumed}, {len(r.skipped)} skipped"
        + (f", {r.left_out} left out (under 4 readable for a batch)" if r.left_out else "")
        + (f", {r.images_per_second:.1f} images/s" if r.images_per_second > 0 else ""),
        markup=False,
        highlight=False,
    )
    for what, path in done.files.items():
        out.print(f"{what} -> {path}", markup=False, highlight=False)
