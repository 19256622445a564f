"""The running state of an atlas and its checkpoint, ``OUT/atlas_state.npz``.

The state is everything folded so far: per-layer partials (top-K arrays, sums, dead
counts, PCA accumulators, and with ``--score relevance`` the relevance top-K), which
batches are done, and the skipped files. It is written
atomically (numpy arrays and one JSON string, no pickle). A run that finds a checkpoint
of the same configuration resumes from it and skips the batches it holds; one of another
configuration, or one that cannot be read, is refused with a message that names
``--restart``.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._files import atomic_path, describe_os_error
from ..errors import FeatureMapsError
from .batch import AtlasSpec, BatchResult, LayerPartial, partials_from, partials_to_arrays

STATE_FILE = "atlas_state.npz"
_STATE_VERSION = 1


class CheckpointError(FeatureMapsError):
    """The checkpoint in the output folder cannot be used."""


@dataclass
class AtlasState:
    """Everything folded so far, in batch order."""

    config: dict[str, Any]
    layers: list[LayerPartial]
    done: set[int] = field(default_factory=set)
    n_images: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)

    @classmethod
    def empty(cls, config: dict[str, Any], spec: AtlasSpec) -> AtlasState:
        return cls(config, [LayerPartial.empty(c, spec.top, spec.relevance) for c in spec.channels])

    def fold(self, result: BatchResult) -> None:
        """Add one batch's result (batches must be folded in batch order)."""
        for mine, theirs in zip(self.layers, result.layers, strict=True):
            mine.merge(theirs)
        self.n_images += result.n_images
        self.skipped.extend(result.bad)
        self.done.add(result.index)

    def save(self, path: Path) -> None:
        """Write the checkpoint atomically (a crash leaves the previous one)."""
        arrays = partials_to_arrays(self.layers)
        meta = {
            "version": _STATE_VERSION,
            "config": self.config,
            "n_images": self.n_images,
            "skipped": sorted(self.skipped),
        }
        arrays["meta"] = np.array(json.dumps(meta))
        arrays["done"] = np.array(sorted(self.done), dtype=np.int64)
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, **arrays)  # type: ignore[arg-type]
        except OSError as exc:
            raise FeatureMapsError(
                f"cannot write the atlas checkpoint: {describe_os_error(exc, path)}"
            ) from exc

    @classmethod
    def load(cls, path: Path) -> AtlasState:
        """Read a checkpoint.

        Raises:
            CheckpointError: the file is truncated, corrupt or of another version.
        """
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = json.loads(str(arrays.pop("meta")))
            done = {int(j) for j in arrays.pop("done")}
            if meta.get("version") != _STATE_VERSION:
                raise ValueError(f"state version {meta.get('version')}")
            skipped = [(int(i), str(m)) for i, m in meta["skipped"]]
            layers = partials_from(arrays)
            return cls(meta["config"], layers, done, int(meta["n_images"]), skipped)
        except (
            OSError,
            EOFError,
            KeyError,
            ValueError,
            TypeError,
            AttributeError,
            zipfile.BadZipFile,
            zlib.error,
        ) as exc:
            cause = describe_os_error(exc) if isinstance(exc, OSError) else f"{exc}"
            raise CheckpointError(
                f"the atlas checkpoint {path} is truncated or corrupt ({type(exc).__name__}: "
                f"{cause}). Pass --restart to start over (or delete it)."
            ) from exc


def open_state(path: Path, config: dict[str, Any], spec: AtlasSpec, restart: bool) -> AtlasState:
    """The checkpoint at ``path`` if it belongs to this configuration, else a fresh state.

    Raises:
        CheckpointError: the checkpoint is unreadable, of another configuration, or does
            not fit the layers (each message suggests ``--restart``).
    """
    for stale in path.parent.glob(f".{path.name}.*.part"):  # left by a killed run
        stale.unlink(missing_ok=True)
    if restart or not path.exists():
        return AtlasState.empty(config, spec)
    state = AtlasState.load(path)
    if state.config != config:
        diff = sorted(k for k in {*config, *state.config} if config.get(k) != state.config.get(k))
        raise CheckpointError(
            f"{path.parent} holds the checkpoint of another atlas run (it differs in: "
            f"{', '.join(diff)}). Re-run with the same options to resume it, choose another "
            "--out, or pass --restart to start over."
        )
    shapes = [p.scores.shape for p in state.layers]
    with_relevance = {p.relevance is not None for p in state.layers}
    if shapes != [(c, spec.top) for c in spec.channels] or with_relevance - {spec.relevance}:
        raise CheckpointError(
            f"the atlas checkpoint {path} does not fit the layers (top-K arrays of shapes "
            f"{shapes}). Pass --restart to start over (or delete it)."
        )
    return state
