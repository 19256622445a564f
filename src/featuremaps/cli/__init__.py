"""The ``featuremaps`` command: parses arguments, calls the library, prints results.

Each command lives in its own module, which registers it on the shared Typer ``app``;
a new command is one new module and one import line below. User errors print one line
to stderr and exit 1 (2 for usage errors); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import errno
import sys
from typing import NoReturn

import typer

from ..errors import FeatureMapsError, Interrupted
from . import atlas as _atlas  # noqa: F401  (registers the command)
from . import compare as _compare  # noqa: F401
from . import layers as _layers  # noqa: F401
from . import run as _run  # noqa: F401
from . import serve as _serve  # noqa: F401
from . import visualize as _visualize  # noqa: F401
from ._app import app, err, plain, settings

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the app and turns every failure into a message.

    Exit codes: 0 done, 1 an error (one line naming what was wrong; an unexpected one
    asks to be reported), 2 a usage error, 130 Ctrl-C. ``--debug`` re-raises errors so
    Python prints the traceback.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    command = typer.main.get_command(app)
    try:
        with command.make_context("featuremaps", args) as ctx:
            command.invoke(ctx)
    except typer.Exit as exc:  # --help, --version and the like
        sys.exit(exc.exit_code)
    except typer.Abort:
        _fail("aborted")
    except typer.TyperException as exc:  # usage errors: bad option, value out of range
        show = getattr(exc, "show", None)
        if show is not None:
            show()  # the usage line, then the error, as Click writes them
        else:
            err.print(plain(("error:", "red"), f" {exc.format_message()}"))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:
        _fail(str(exc) if isinstance(exc, Interrupted) else "interrupted", 130)
    except FeatureMapsError as exc:
        if settings.debug:
            raise
        _fail(str(exc))
    except OSError as exc:
        if exc.errno == errno.EPIPE:  # the reader of our output went away (| head)
            _silence_stdout()
            sys.exit(1)
        if settings.debug:
            raise
        from .._files import describe_os_error

        _fail(describe_os_error(exc))
    except Exception as exc:
        if settings.debug:
            raise
        err.print(
            plain(("unexpected error:", "red"), f" {exc.__class__.__name__}: {exc}"),
            "Run again with --debug for the traceback, and please report it.",
            sep="\n",
        )
        sys.exit(1)


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(plain(("error:", "red"), f" {message}") if code == 1 else plain(message))
    sys.exit(code)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the flush at exit does not fail on the closed pipe."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in tests)
        pass
    finally:
        os.close(devnull)
