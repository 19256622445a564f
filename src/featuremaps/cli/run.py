"""The commands around one run: ``layers``, ``run``, ``demo`` and ``report``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import FeatureMapsError
from ._app import (
    DeviceOpt,
    LayersOpt,
    ModelArg,
    PrefixOpt,
    TokensGridOpt,
    WeightsOpt,
    app,
    out,
    progress_bar,
    token_layout,
)


@app.command()
def run(
    model: ModelArg,
    images: Annotated[list[str], typer.Argument(help="Image files, folders or globs.")],
    layers: LayersOpt = "stages",
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path(
        "featuremaps-out"
    ),
    weights: WeightsOpt = "DEFAULT",
    max_maps: Annotated[int, typer.Option(help="Channels per grid (0: all).")] = 64,
    cols: Annotated[int | None, typer.Option(help="Grid columns.")] = None,
    map_size: Annotated[int, typer.Option(help="Pixels per map (integer upsampling).")] = 64,
    cmap: Annotated[str, typer.Option(help="Matplotlib colormap.")] = "viridis",
    norm: Annotated[str, typer.Option(help="linear, log or symlog.")] = "linear",
    order: Annotated[
        str, typer.Option(help="index, top (by mean activation) or a list like 3,7,12.")
    ] = "index",
    scale: Annotated[str, typer.Option(help="channel (own range) or layer (shared).")] = "channel",
    labels: Annotated[bool, typer.Option(help="Channel index above each map.")] = False,
    colorbar: Annotated[bool, typer.Option(help="Colour bar under each grid.")] = True,
    pca: Annotated[int, typer.Option(help="PCA components: 3 (RGB), 1 (gray), 0 (none).")] = 3,
    pca_basis: Annotated[
        Path | None, typer.Option(help="Per-layer PCA bases from `featuremaps atlas`.")
    ] = None,
    full: Annotated[bool, typer.Option(help="Keep the whole image (no centre crop).")] = False,
    device: DeviceOpt = "auto",
    save_activations: Annotated[
        bool, typer.Option(help="Also write activations.safetensors.")
    ] = False,
    allow_nan: Annotated[bool, typer.Option(help="Draw NaN/Inf in magenta.")] = False,
    tokens_grid: TokensGridOpt = None,
    prefix_tokens: PrefixOpt = None,
) -> None:
    """Capture LAYERS for each image and write grids, PCA panels and manifest.json."""
    from ..pipeline import RenderOptions
    from ..pipeline import run as run_pipeline

    chan_order: str | list[int] = order
    if order not in ("index", "top"):
        try:
            chan_order = [int(v) for v in order.split(",")]
        except ValueError:
            raise FeatureMapsError(f"--order {order!r}: use index, top or numbers like 3,7,12")
    opts = RenderOptions(
        max_maps=max_maps or None,
        cols=cols,
        map_size=map_size,
        cmap=cmap,
        norm=norm,
        order=chan_order,
        scale=scale,
        labels=labels,
        colorbar=colorbar,
        pca=pca,
    )
    _check_render_options(opts)
    with progress_bar() as progress:
        result = run_pipeline(
            model,
            images,
            layers,
            out_dir,
            weights=weights,
            options=opts,
            full=full,
            device=device,
            save_activations=save_activations,
            pca_basis=pca_basis,
            layout=token_layout(tokens_grid, prefix_tokens),
            allow_nan=allow_nan,
            progress=progress,
        )
    _print_summary(result.manifest_data, result.out_dir, len(result.files))


def _check_render_options(opts: Any) -> None:
    """Fail before loading anything when a rendering option is wrong."""
    from ..render import colormap_lut

    if opts.norm not in ("linear", "log", "symlog"):
        raise FeatureMapsError(f"--norm {opts.norm!r}: use linear, log or symlog")
    if opts.scale not in ("channel", "layer"):
        raise FeatureMapsError(f"--scale {opts.scale!r}: use channel or layer")
    if opts.pca not in (0, 1, 3):
        raise FeatureMapsError(f"--pca {opts.pca}: use 3 (RGB), 1 (gray) or 0 (none)")
    colormap_lut(opts.cmap)


def _print_summary(manifest: dict[str, Any], out_dir: Path, n_files: int) -> None:
    for entry in manifest["images"]:
        out.print(f"[bold]{entry['path']}[/bold]")
        for pred in entry.get("predictions") or []:
            out.print(f"  {pred['probability']:6.1%}  {pred['label']}")
        for name, rec in entry["layers"].items():
            shape = "x".join(map(str, rec["shape"]))
            out.print(f"  {name:<28} {shape:<18} -> {out_dir / rec['grid']}")
        if entry.get("pca_panel"):
            out.print(f"  PCA panel -> {out_dir / entry['pca_panel']}")
    out.print(f"wrote {n_files} files to {out_dir} (manifest: {out_dir / 'manifest.json'})")


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path(
        "featuremaps-demo"
    ),
    model: Annotated[str, typer.Option(help="Model spec.")] = "efficientnet_lite0",
    sample: Annotated[str, typer.Option(help="Bundled photo: cat or coffee.")] = "cat",
) -> None:
    """Run the offline pretrained model on a bundled photo; print where the pictures are."""
    from ..images import sample_image
    from ..pipeline import RenderOptions
    from ..pipeline import run as run_pipeline

    with progress_bar() as progress:
        result = run_pipeline(
            model,
            [sample_image(sample)],
            "stages",
            out_dir,
            options=RenderOptions(max_maps=64, labels=True),
            progress=progress,
        )
    _print_summary(result.manifest_data, result.out_dir, len(result.files))


@app.command()
def report(
    model: ModelArg,
    images: Annotated[list[str], typer.Argument(help="Image files, folders or globs.")],
    layers: LayersOpt = "stages",
    out_file: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")] = Path(
        "featuremaps-report.html"
    ),
    weights: WeightsOpt = "DEFAULT",
    max_maps: Annotated[int, typer.Option(help="Channels per layer (0: all).")] = 64,
    order: Annotated[str, typer.Option(help="index or top (by mean activation).")] = "index",
    cmap: Annotated[str, typer.Option(help="Colormap shown first.")] = "viridis",
    title: Annotated[str | None, typer.Option(help="Page title.")] = None,
    full: Annotated[bool, typer.Option(help="Keep the whole image (no centre crop).")] = False,
    device: DeviceOpt = "auto",
    tokens_grid: TokensGridOpt = None,
    prefix_tokens: PrefixOpt = None,
) -> None:
    """Write one self-contained HTML report (opens offline, images embedded)."""
    from ..report import write_report

    with progress_bar() as progress:
        path = write_report(
            out_file,
            model,
            images,
            layers,
            weights=weights,
            max_channels=max_maps or None,
            order=order,
            cmap=cmap,
            full=full,
            device=device,
            title=title,
            layout=token_layout(tokens_grid, prefix_tokens),
            progress=progress,
        )
    out.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); open it in a browser")
