"""``featuremaps visualize``: what a channel, a neuron, a class or a layer wants to see."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ._app import DeviceOpt, ModelArg, WeightsOpt, app, out, progress_bar


@app.command()
def visualize(
    model: ModelArg,
    objective: Annotated[
        list[str],
        typer.Option(
            "--objective",
            help="channel:LAYER:C (or a range A-B), neuron:LAYER:C, class:K, class:LABEL "
            "or layer:LAYER; repeat for more (all are optimized as one batch).",
        ),
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    weights: WeightsOpt = "DEFAULT",
    steps: Annotated[int, typer.Option(min=1, help="Optimization steps.")] = 512,
    size: Annotated[int, typer.Option(min=8, help="Side of the pictures in pixels.")] = 224,
    seed: Annotated[int, typer.Option(help="The same seed gives the same pictures (CPU).")] = 0,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam's learning rate.")] = 0.05,
    transforms: Annotated[
        bool, typer.Option(help="Random pad, jitter, scale and rotation at each step.")
    ] = True,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Objectives per batch (default: all at once).")
    ] = None,
    device: DeviceOpt = "auto",  # type: ignore[assignment]
) -> None:
    """Optimize one picture per objective; write PNGs and manifest.json to --out."""
    from .._files import prepare_output_dir
    from ..models import load_model
    from ..visualize import NO_TRANSFORMS, Transforms, parse_objectives
    from ..visualize import visualize as run_visualize

    objectives = parse_objectives(objective)  # malformed text fails before anything loads
    folder = prepare_output_dir(out_dir)
    loaded = load_model(model, weights)
    with progress_bar(rate=True) as progress:
        result = run_visualize(
            loaded,
            objectives,
            steps=steps,
            size=size,
            seed=seed,
            device=str(getattr(device, "value", device)),
            lr=lr,
            transforms=Transforms() if transforms else NO_TRANSFORMS,
            progress=progress,
            batch_size=batch_size,
        )
    paths = result.save(folder)
    for vis, path in zip(result, paths, strict=False):
        out.print(
            f"{escape(vis.objective.text):<32} {vis.value:10.4g}  -> {escape(str(path))}",
            highlight=False,
        )
    out.print(f"manifest: {escape(str(paths[-1]))}", highlight=False)
