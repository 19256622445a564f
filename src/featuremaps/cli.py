"""The ``featuremaps`` command: parses arguments, calls the library, prints results.

User errors print one line to stderr and exit 1 (2 for usage errors); ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from .errors import FeatureMapsError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="See what a vision network sees at every layer.",
)
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

ModelArg = Annotated[
    str,
    typer.Argument(
        help="torchvision name (resnet50), efficientnet_lite0 (offline, pretrained), "
        "timm:NAME, package.module:factory, or a TorchScript file."
    ),
]
WeightsOpt = Annotated[
    str,
    typer.Option(
        "--weights",
        "-w",
        help="DEFAULT (pretrained), none (random), or a .pth/.pt/.safetensors state dict.",
    ),
]
LayersOpt = Annotated[
    str,
    typer.Option(
        "--layers",
        "-l",
        help="Comma-separated names, globs (layer*) or presets (stages, blocks, convs).",
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")]
TokensGridOpt = Annotated[
    str | None, typer.Option("--tokens-grid", help="Patch grid HxW of token outputs.")
]
PrefixOpt = Annotated[
    int | None, typer.Option("--prefix-tokens", help="Class/register tokens before patches.")
]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """See what a vision network sees at every layer."""


class _Rate(ProgressColumn):
    """Items per second of a task."""

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:7.1f}/s" if speed else "")


@contextmanager
def _progress(enabled: bool = True, rate: bool = False) -> Iterator[Any]:
    """A rich progress bar (with items/s if ``rate``); yields the library's callback."""
    columns: list[Any] = [TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn()]
    if rate:
        columns.append(_Rate())
    bar = Progress(*columns, TimeElapsedColumn(), console=err, transient=True, disable=not enabled)
    tasks: dict[str, Any] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total, completed=done)
        bar.update(tasks[phase], completed=done, total=total)

    with bar:
        yield update


def _layout(tokens_grid: str | None, prefix_tokens: int | None) -> Any:
    if tokens_grid is None and prefix_tokens is None:
        return None
    from .capture import LayoutContext

    grid = None
    if tokens_grid is not None:
        try:
            h, w = (int(v) for v in tokens_grid.lower().split("x"))
        except ValueError:
            raise FeatureMapsError(f"--tokens-grid {tokens_grid!r}: write it as HxW, e.g. 14x14")
        grid = (h, w)
    return LayoutContext(input_hw=(0, 0), tokens_grid=grid, prefix_tokens=prefix_tokens)


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
    """List every layer with its type and output shape (one dry forward)."""
    import torch

    from .capture import list_layers
    from .images import load_image, preprocess
    from .models import load_model

    loaded = load_model(model, weights)
    pp = loaded.preprocess
    if image is not None:
        x = preprocess(load_image(image), pp)[None]
    else:
        side = pp.crop or pp.resize or 224
        x = torch.zeros(1, 3, side, side)
    infos = list_layers(loaded.module, x, layout=_layout(tokens_grid, prefix_tokens))
    table = Table(title=f"{loaded.spec} ({loaded.weights}), input {tuple(x.shape)}")
    table.add_column("name")
    table.add_column("type")
    table.add_column("output shape")
    table.add_column("map (B,C,H,W)")
    table.add_column("note")
    rank = _module_order(loaded.module)
    for info in sorted(infos, key=lambda i: rank.get(i.name.split("[")[0], 1 << 30)):
        raw = "x".join(map(str, info.raw_shape)) if info.raw_shape else "-"
        shape = "x".join(map(str, info.shape)) if info.shape else "-"
        layout = "" if info.layout in ("NCHW", "not spatial") else info.layout
        note = "; ".join(part for part in (layout, info.note) if part)
        table.add_row(info.name, info.module_type, raw, shape, note)
    out.print(table)
    out.print(f"preprocessing: {pp.describe()}")
    from .capture import PRESETS

    out.print(f"presets: {', '.join(PRESETS)} (e.g. --layers stages)")


def _module_order(module: Any) -> dict[str, int]:
    return {n: i for i, (n, _) in enumerate(module.named_modules())}


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
    from .pipeline import RenderOptions
    from .pipeline import run as run_pipeline

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
    with _progress() as progress:
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
            layout=_layout(tokens_grid, prefix_tokens),
            allow_nan=allow_nan,
            progress=progress,
        )
    _print_summary(result.manifest_data, result.out_dir, len(result.files))


def _check_render_options(opts: Any) -> None:
    """Fail before loading anything when a rendering option is wrong."""
    from .render import colormap_lut

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
    from .images import sample_image
    from .pipeline import RenderOptions
    from .pipeline import run as run_pipeline

    with _progress() as progress:
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

    from .atlas import build_atlas

    def show(message: Any, *args: Any, **kwargs: Any) -> None:
        err.print(f"warning: {message}", markup=False, highlight=False)

    with _progress(rate=True) as progress, warnings.catch_warnings():
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
    from .report import write_report

    with _progress() as progress:
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
            layout=_layout(tokens_grid, prefix_tokens),
            progress=progress,
        )
    out.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); open it in a browser")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind (loopback only by default).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    allow_code_models: Annotated[
        bool,
        typer.Option(help="Accept package.module:factory and TorchScript specs (run code)."),
    ] = False,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload in MB.")] = 20.0,
    device: Annotated[str, typer.Option(help="cpu, cuda or mps.")] = "cpu",
) -> None:
    """Start the local interactive viewer (needs the extra featuremaps[serve])."""
    from .serve import is_loopback, run_server

    if not is_loopback(host):
        err.print(f"[yellow]warning:[/yellow] serving on {host}: other machines can reach it")
    out.print(f"featuremaps viewer on http://{host}:{port}/  (Ctrl+C stops it)")
    run_server(
        host,
        port,
        allow_code_models=allow_code_models,
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        device=device,
    )


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the app and turns user errors into messages."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        app(args=args, prog_name="featuremaps")
    except FeatureMapsError as exc:
        if debug:
            raise
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        err.print(
            f"[red]unexpected error:[/red] {exc.__class__.__name__}: {exc}\n"
            "Run again with --debug for the traceback, and please report it.",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
