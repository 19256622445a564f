"""Atlas engines behind one :class:`Engine` protocol: ``local`` and ``ray``.

Neither engine imports the other; :func:`create_engine` imports the one asked for, so
Ray is only imported when ``--engine ray`` is used.
"""

from __future__ import annotations

from .base import Engine, EngineCapabilities, EngineOptions

ENGINES = ("local", "ray")

__all__ = ["ENGINES", "Engine", "EngineCapabilities", "EngineOptions", "create_engine"]


def create_engine(name: str, options: EngineOptions) -> Engine:
    """The engine called ``name`` (``local`` or ``ray``), configured by ``options``.

    Raises:
        FeatureMapsError: an unknown engine, or Ray missing for ``ray``.
    """
    if name == "ray":
        from .ray import RayEngine

        return RayEngine(options)
    if name == "local":
        from .local import LocalEngine

        return LocalEngine(options)
    from ...errors import FeatureMapsError

    raise FeatureMapsError(f"--engine {name!r}: use {' or '.join(ENGINES)}")
