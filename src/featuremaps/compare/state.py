"""The checkpoint of a comparison: what a killed or interrupted run has done so far.

Everything the result depends on is small: the HSIC sums, the batches folded, the files
skipped and the maps of the few example images. It is written atomically to
``OUT/compare_state.npz`` (numpy arrays and one JSON string, no pickle). A run that finds
a checkpoint of the same configuration resumes from it and skips the batches it holds;
the sums are folded in the same batch order either way, so the result is the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._files import atomic_path
from ..errors import FeatureMapsError
from .cka import CKAAccumulator

STATE_FILE = "compare_state.npz"
_VERSION = 1


@dataclass
class CompareState:
    """The accumulator and what else a resumed run must know."""

    config: dict[str, Any]
    acc: CKAAccumulator
    done: set[int] = field(default_factory=set)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    left_out: int = 0
    kept: list[np.ndarray] = field(default_factory=list)
    maps_a: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    maps_b: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        meta = {
            "version": _VERSION,
            "config": self.config,
            "done": sorted(self.done),
            "skipped": self.skipped,
            "left_out": self.left_out,
            "batches": self.acc.batches,
            "examples": self.acc.examples,
            "layers_a": list(self.maps_a),
            "layers_b": list(self.maps_b),
        }
        arrays: dict[str, np.ndarray] = {
            "meta": np.array(json.dumps(meta)),
            "cross": self.acc.cross,
            "self_a": self.acc.self_a,
            "self_b": self.acc.self_b,
            "kept": np.stack(self.kept) if self.kept else np.zeros((0, 1, 1, 3), np.uint8),
        }
        for prefix, maps in (("a", self.maps_a), ("b", self.maps_b)):
            for k, parts in enumerate(maps.values()):
                if parts:
                    arrays[f"{prefix}{k}"] = torch.cat(parts).numpy()
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path, config: dict[str, Any]) -> CompareState:
        """Read a checkpoint; it must be of ``config``.

        Raises:
            FeatureMapsError: unreadable, or of another comparison.
        """
        try:
            with np.load(path, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
                arrays = {k: f[k] for k in f.files}
        except (OSError, ValueError, KeyError) as exc:
            raise FeatureMapsError(
                f"{path} is not a readable compare checkpoint ({exc}); delete it or use --restart"
            ) from exc
        if meta.get("version") != _VERSION or meta.get("config") != config:
            raise FeatureMapsError(
                f"{path} holds the checkpoint of another comparison (other models, layers, "
                "data or options); use --restart to start over, or another --out"
            )
        acc = CKAAccumulator(len(arrays["self_a"]), len(arrays["self_b"]))
        acc.cross[:] = arrays["cross"]
        acc.self_a[:] = arrays["self_a"]
        acc.self_b[:] = arrays["self_b"]
        acc.batches, acc.examples = int(meta["batches"]), int(meta["examples"])

        def maps(prefix: str, names: list[str]) -> dict[str, list[torch.Tensor]]:
            out: dict[str, list[torch.Tensor]] = {}
            for k, name in enumerate(names):
                key = f"{prefix}{k}"
                out[name] = [torch.from_numpy(arrays[key])] if key in arrays else []
            return out

        return cls(
            config=config,
            acc=acc,
            done={int(i) for i in meta["done"]},
            skipped=[(str(p), str(r)) for p, r in meta["skipped"]],
            left_out=int(meta["left_out"]),
            kept=list(arrays["kept"]),
            maps_a=maps("a", meta["layers_a"]),
            maps_b=maps("b", meta["layers_b"]),
        )
