"""What every command shares: the Typer app, the consoles, common options, progress.

Text that comes from the user or the file system (paths, layer and model names, error
messages) is never read as rich markup: print it with :func:`plain` or ``markup=False``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
from rich.text import Text

from ..errors import FeatureMapsError
from ..options import Device

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="See what a vision network sees at every layer.",
)
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)


@dataclass
class Settings:
    """Global flags, set by the root callback before any command runs."""

    debug: bool = False


settings = Settings()


def plain(*parts: str | tuple[str, str]) -> Text:
    """A line from plain strings and ``(text, style)`` pairs; no markup is read."""
    return Text.assemble(*parts)


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
DeviceOpt = Annotated[Device, typer.Option(help="Where the model runs (auto: CUDA, MPS, CPU).")]
TokensGridOpt = Annotated[
    str | None, typer.Option("--tokens-grid", help="Patch grid HxW of token outputs.")
]
PrefixOpt = Annotated[
    int | None, typer.Option("--prefix-tokens", help="Class/register tokens before patches.")
]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
) -> None:
    """See what a vision network sees at every layer."""
    settings.debug = debug


class _Rate(ProgressColumn):
    """Items per second of a task."""

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:7.1f}/s" if speed else "")


@contextmanager
def progress_bar(enabled: bool = True, rate: bool = False) -> Iterator[Any]:
    """A rich progress bar (with items/s if ``rate``); yields the library's callback.

    It is drawn only on a terminal: elsewhere (a pipe, a log file) rich would leave a
    blank line where the bar was, which would open every later message.
    """
    columns: list[Any] = [TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn()]
    if rate:
        columns.append(_Rate())
    enabled = enabled and err.is_terminal
    bar = Progress(*columns, TimeElapsedColumn(), console=err, transient=True, disable=not enabled)
    tasks: dict[str, Any] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total, completed=done)
        bar.update(tasks[phase], completed=done, total=total)

    with bar:
        yield update


@contextmanager
def warnings_shown() -> Iterator[None]:
    """Print each warning the library raises as one plain ``warning:`` line on stderr."""

    def show(message: Any, *args: Any, **kwargs: Any) -> None:
        err.print(plain(("warning:", "yellow"), f" {message}"))

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def token_layout(tokens_grid: str | None, prefix_tokens: int | None) -> Any:
    if tokens_grid is None and prefix_tokens is None:
        return None
    from ..capture import LayoutContext

    grid = None
    if tokens_grid is not None:
        try:
            h, w = (int(v) for v in tokens_grid.lower().split("x"))
        except ValueError:
            raise FeatureMapsError(f"--tokens-grid {tokens_grid!r}: write it as HxW, e.g. 14x14")
        grid = (h, w)
    return LayoutContext(input_hw=(0, 0), tokens_grid=grid, prefix_tokens=prefix_tokens)
