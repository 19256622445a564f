"""The names of captured outputs, as structured keys.

A captured map is one entry of one call of one module. :class:`LayerKey` holds those three
parts; its text form is what ``--layers`` accepts and what the manifest, the pictures and
``featuremaps layers`` show: ``layer1``, ``layer1.0.relu:2`` (the second call of a module
that ran several times), ``body[pool]`` (an entry of a dict output), ``body:2[pool]``.
Code keeps the key; the text is only ever made from it, never parsed back.
"""

from __future__ import annotations

from dataclasses import dataclass

Entry = tuple[str, ...]
"""Keys into a (nested) dict/tuple/list output, outermost first: ``("pool",)``, ``("1", "0")``."""


def entry_text(entry: Entry) -> str:
    """``("1", "0")`` -> ``"[1][0]"``."""
    return "".join(f"[{part}]" for part in entry)


@dataclass(frozen=True)
class LayerKey:
    """One captured output: module name, call and entry.

    Attributes:
        module: the module's name as the user gave it (any of its names when a module is
            reachable under several).
        call: which call (1-based) of a module that ran several times in one forward;
            ``None`` for a module that ran once.
        entry: the keys into a dict/tuple/list output; ``()`` for a tensor output.
    """

    module: str
    call: int | None = None
    entry: Entry = ()

    def __str__(self) -> str:
        call = f":{self.call}" if self.call is not None else ""
        return f"{self.module}{call}{entry_text(self.entry)}"


OutputKey = tuple[str, int, Entry]
"""Where a layout decision is kept: (module name in ``named_modules()``, call, entry)."""
