"""The commands around one run: ``run``, ``demo`` and ``report``.

Options are typed (:mod:`featuremaps.options`): Typer refuses a bad choice or a number
out of range as a usage error, and building :class:`~featuremaps.options.RenderOptions`
checks the rest before any model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..options import (
    MAX_MAP_SIZE,
    Device,
    Norm,
    PCAColors,
    PCAComponents,
    Scale,
    order_help,
    parse_order,
)
from ._app import (
    DeviceOpt,
    LayersOpt,
    ModelArg,
    PrefixOpt,
    TokensGridOpt,
    WeightsOpt,
    app,
    out,
    plain,
    progress_bar,
    token_layout,
    warnings_shown,
)

ImagesArg = Annotated[list[str], typer.Argument(help="Image files, folders or globs.")]
RunInputsArg = Annotated[
    list[str],
    typer.Argument(
        help="Image files, folders or globs; videos (MP4, WebM, MOV, MKV, AVI) give PCA videos."
    ),
]
ORDER_HELP_SUFFIX = "; relevance (most relevant to --target first)"
TargetOpt = Annotated[
    str | None,
    typer.Option(
        "--target",
        help="Class for relevance: an ImageNet label (tabby) or index (default: top-1). "
        "Writes per-channel relevance and LAYER.cam.png (Grad-CAM).",
    ),
]
RelevanceOpt = Annotated[
    bool, typer.Option(help="Compute relevance to the top-1 class without --target.")
]
MaxMapsOpt = Annotated[int, typer.Option(min=0, help="Channels per grid (0: all).")]


@app.command()
def run(
    model: ModelArg,
    images: RunInputsArg,
    layers: LayersOpt = "stages",
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path(
        "featuremaps-out"
    ),
    weights: WeightsOpt = "DEFAULT",
    max_maps: MaxMapsOpt = 64,
    cols: Annotated[int | None, typer.Option(min=1, help="Grid columns.")] = None,
    map_size: Annotated[
        int, typer.Option(min=1, max=MAX_MAP_SIZE, help="Pixels per map (integer upsampling).")
    ] = 64,
    cmap: Annotated[str, typer.Option(help="Matplotlib colormap.")] = "viridis",
    norm: Annotated[Norm, typer.Option(help="How values map to colours.")] = Norm.LINEAR,
    order: Annotated[str, typer.Option(help=order_help() + ORDER_HELP_SUFFIX)] = "index",
    target: TargetOpt = None,
    relevance: RelevanceOpt = False,
    scale: Annotated[
        Scale, typer.Option(help="channel (own range) or layer (shared).")
    ] = Scale.CHANNEL,
    labels: Annotated[bool, typer.Option(help="Channel index above each map.")] = False,
    colorbar: Annotated[bool, typer.Option(help="Colour bar under each grid.")] = True,
    pca: Annotated[
        PCAComponents, typer.Option(help="PCA components: 3 (RGB), 1 (gray), 0 (none).")
    ] = PCAComponents.RGB,
    pca_basis: Annotated[
        Path | None, typer.Option(help="Per-layer PCA bases from `featuremaps atlas`.")
    ] = None,
    pca_foreground: Annotated[
        bool,
        typer.Option(
            help="DINO-style PCA: split the first component, refit on the foreground, "
            "background black; also writes LAYER.pca.png and LAYER.pca-overlay.png."
        ),
    ] = False,
    pca_whiten: Annotated[
        bool, typer.Option(help="PCA components scaled to unit variance (for sigmoid).")
    ] = False,
    pca_colors: Annotated[
        PCAColors, typer.Option(help="PCA colours: minmax (own range) or sigmoid.")
    ] = PCAColors.MINMAX,
    pca_outliers: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Leave out of the PCA the pixels whose norm exceeds the median by more "
            "than K median absolute deviations (try 6); counted in the manifest.",
        ),
    ] = None,
    pca_joint: Annotated[
        bool,
        typer.Option(
            help="One PCA basis per layer over all the images, so a colour means the same "
            "direction in every picture. Costs one extra forward per image (a first pass "
            "fits the basis; memory does not grow with the image count)."
        ),
    ] = False,
    fps: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="Video frames sampled per second (default: the video's own rate, at most "
            "10). One forward per sampled frame; the PCA video plays at this rate.",
        ),
    ] = None,
    channels: Annotated[
        str | None,
        typer.Option(
            help="Channels drawn beside the PCA picture in the videos, e.g. 3,17 (gray, one "
            "scale over the video).",
        ),
    ] = None,
    full: Annotated[bool, typer.Option(help="Keep the whole image (no centre crop).")] = False,
    device: DeviceOpt = Device.AUTO,
    save_activations: Annotated[
        bool, typer.Option(help="Also write activations.safetensors.")
    ] = False,
    allow_nan: Annotated[bool, typer.Option(help="Draw NaN/Inf in magenta.")] = False,
    tokens_grid: TokensGridOpt = None,
    prefix_tokens: PrefixOpt = None,
) -> None:
    """Capture LAYERS for each image and write grids, PCA panels and manifest.json."""
    from ..options import RenderOptions
    from ..pipeline import run as run_pipeline
    from ..relevance_outputs import request_from_options

    order, wanted = request_from_options(order, target, relevance)
    opts = RenderOptions(
        max_maps=max_maps or None,
        cols=cols,
        map_size=map_size,
        cmap=cmap,
        norm=norm,
        order=parse_order(order),
        scale=scale,
        labels=labels,
        colorbar=colorbar,
        pca=pca,
    )
    recipe = None
    if pca_foreground or pca_whiten or pca_colors != PCAColors.MINMAX or pca_outliers:
        from ..pca import PCARecipe

        recipe = PCARecipe(
            foreground="auto" if pca_foreground else "none",
            whiten=pca_whiten,
            colors=pca_colors.value,  # type: ignore[arg-type]
            outliers=pca_outliers,
        )
    with progress_bar(rate=True) as progress, warnings_shown():
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
            pca_recipe=recipe,
            relevance=wanted,
            fps=fps,
            channels=_parse_channels(channels),
            pca_joint=pca_joint,
        )
    _print_summary(result.manifest_data, result.out_dir, len(result.files))


def _parse_channels(text: str | None) -> list[int]:
    """``"3,17"`` -> ``[3, 17]``; a usage error names what is wrong."""
    if not text:
        return []
    try:
        chans = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: give channel indices separated by commas, e.g. 3,17",
            param_hint="--channels",
        ) from None
    if any(c < 0 for c in chans):
        raise typer.BadParameter(f"{text!r}: channels are 0 or more", param_hint="--channels")
    return chans


def _print_summary(manifest: dict[str, Any], out_dir: Path, n_files: int) -> None:
    for entry in manifest["images"]:
        out.print(plain((entry["path"], "bold")))
        for pred in entry.get("predictions") or []:
            out.print(plain(f"  {pred['probability']:6.1%}  {pred['label']}"))
        if entry.get("target"):
            t = entry["target"]
            out.print(plain(f"  relevance to {t['label']} (class {t['index']}, p={t['prob']:.3g})"))
        for name, rec in entry["layers"].items():
            shape = "x".join(map(str, rec["shape"]))
            out.print(plain(f"  {name:<28} {shape:<18} -> {out_dir / rec['grid']}"))
        if entry.get("pca_panel"):
            out.print(plain(f"  PCA panel -> {out_dir / entry['pca_panel']}"))
    for video in manifest.get("videos", []):
        rate = f"  {video['frames']} frames at {video['fps']:g} fps"
        out.print(plain((video["path"], "bold"), rate))
        for name, rel in video["videos"].items():
            out.print(plain(f"  {name:<28} PCA video -> {out_dir / rel}"))
    out.print(plain(f"wrote {n_files} files to {out_dir} (manifest: {out_dir / 'manifest.json'})"))


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
    from ..options import RenderOptions
    from ..pipeline import run as run_pipeline

    with progress_bar() as progress, warnings_shown():
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
    images: ImagesArg,
    layers: LayersOpt = "stages",
    out_file: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")] = Path(
        "featuremaps-report.html"
    ),
    weights: WeightsOpt = "DEFAULT",
    max_maps: MaxMapsOpt = 64,
    order: Annotated[str, typer.Option(help=order_help() + ORDER_HELP_SUFFIX)] = "index",
    class_target: TargetOpt = None,
    relevance: RelevanceOpt = False,
    compare: Annotated[
        str | None,
        typer.Option(
            help="A second model (or checkpoint with --weights-b): its PCA pictures beside "
            "these, one basis per pair of equal-width layers."
        ),
    ] = None,
    weights_b: Annotated[str, typer.Option(help="Weights of --compare's model.")] = "DEFAULT",
    cmap: Annotated[str, typer.Option(help="Colormap shown first.")] = "viridis",
    title: Annotated[str | None, typer.Option(help="Page title.")] = None,
    full: Annotated[bool, typer.Option(help="Keep the whole image (no centre crop).")] = False,
    device: DeviceOpt = Device.AUTO,
    tokens_grid: TokensGridOpt = None,
    prefix_tokens: PrefixOpt = None,
) -> None:
    """Write one self-contained HTML report (opens offline, images embedded).

    The file's folder is created, checked and locked before the model is loaded.
    """
    from .._files import output_lock, prepare_output_file
    from ..options import REPORT_CMAPS, check_cmap
    from ..relevance_outputs import request_from_options
    from ..report import write_report

    order, wanted = request_from_options(order, class_target, relevance, top_classes=5)
    chan_order = parse_order(order)
    check_cmap(cmap, offered=REPORT_CMAPS)
    target = prepare_output_file(out_file)
    with (
        output_lock(target.parent, "featuremaps report"),
        progress_bar() as progress,
        warnings_shown(),
    ):
        path = write_report(
            target,
            model,
            images,
            layers,
            weights=weights,
            max_channels=max_maps or None,
            order=chan_order,
            cmap=cmap,
            full=full,
            device=device,
            title=title,
            layout=token_layout(tokens_grid, prefix_tokens),
            progress=progress,
            relevance=wanted,
            compare=compare,
            weights_b=weights_b,
        )
    out.print(plain(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); open it in a browser"))
