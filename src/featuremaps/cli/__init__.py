"""The ``featuremaps`` command: parses arguments, calls the library, prints results.

Each command lives in its own module, which registers it on the shared Typer ``app``;
a new command is one new module and one import line below. User errors print one line
to stderr and exit 1 (2 for usage errors); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import sys

from ..errors import FeatureMapsError
from . import atlas as _atlas  # noqa: F401  (registers the command)
from . import compare as _compare  # noqa: F401
from . import layers as _layers  # noqa: F401
from . import run as _run  # noqa: F401
from . import serve as _serve  # noqa: F401
from . import visualize as _visualize  # noqa: F401
from ._app import app, err

__all__ = ["app", "main"]


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
