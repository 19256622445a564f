"""Errors raised on bad input. Each message says what was wrong and what to do.

Every error the user can cause derives from :class:`FeatureMapsError`; the CLI prints
its message without a traceback (``--debug`` shows one).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FeatureMapsError(Exception):
    """Base class of every error caused by input the user can fix."""


class ModelError(FeatureMapsError):
    """A model spec cannot be resolved or its weights cannot be loaded."""


class WeightsUnavailableError(ModelError):
    """Pretrained weights are neither cached nor downloadable."""


class ImageError(FeatureMapsError):
    """An image cannot be found, decoded or converted."""


class LayerError(FeatureMapsError):
    """A requested layer does not exist, never ran, or gives no spatial map."""


class ReduceError(FeatureMapsError):
    """A numeric reduction got input it cannot give a defined result for."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; says how many images were written, and where.

    A :class:`KeyboardInterrupt`, so code that stops on Ctrl-C still stops; the CLI
    prints its message and exits 130.
    """

    def __init__(self, written: int, total: int, where: object) -> None:
        super().__init__(f"interrupted: {written} of {total} images written to {where}")
        self.written = written
        self.total = total
        self.where = where


def suggest(given: str, valid: Iterable[str], n: int = 5) -> str:
    """Return ``" Did you mean: a, b?"`` for the closest valid names, or ``""``."""
    matches = difflib.get_close_matches(given, list(valid), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(matches)}?" if matches else ""
