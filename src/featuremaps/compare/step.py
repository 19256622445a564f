"""The engine-neutral step of a comparison: one group of batches through both models.

:func:`process_group` runs one forward of each model on a decoded group, with the layers
captured, and returns a :class:`GroupResult`: the group's HSIC terms (what the CKA sums
fold), the images dropped for non-finite activations, and the display pictures and maps
of the first ``want`` images for the page. The local engine calls it in the driver, the
Ray engine in its actors (the result travels as ``.npz`` bytes, no pickle); the driver
folds results in batch order either way, so both engines give the same sums.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..capture import FeatureMaps, capture
from ..images import display_image
from ..models import Preprocess
from .batches import Counted, Decoded
from .cka import MIN_BATCH, HSICParts, NonFiniteFeatures, hsic_parts


@dataclass
class GroupResult:
    """What one group of batches adds to a comparison.

    Attributes:
        indices: the batches of the group.
        ids: its readable images.
        bad: ``(id, reason)`` of its unreadable files.
        dropped: ids of images dropped for non-finite activations.
        parts: the HSIC terms; ``None`` when under ``MIN_BATCH`` images remain (the
            group is left out).
        want: how many example images were asked for.
        kept: display pictures ``(H, W, 3)`` uint8 of the first ``want`` images used.
        maps_a, maps_b: per layer, those images' maps ``(k, C, H, W)`` (empty when none).
    """

    indices: tuple[int, ...]
    ids: np.ndarray
    bad: list[tuple[int, str]]
    dropped: np.ndarray
    parts: HSICParts | None
    want: int = 0
    kept: list[np.ndarray] = field(default_factory=list)
    maps_a: list[torch.Tensor] = field(default_factory=list)
    maps_b: list[torch.Tensor] = field(default_factory=list)

    @property
    def used(self) -> int:
        """Images left after the non-finite ones were dropped."""
        return len(self.ids) - len(self.dropped)

    def serves(self, want: int) -> bool:
        """Whether its examples are the first ``want`` images that a fold asks for."""
        if self.parts is None:
            return True
        return min(self.want, self.used) >= min(max(want, 0), self.used)

    @classmethod
    def left_out(cls, group: Counted) -> GroupResult:
        """A group with too few readable images: nothing to compute."""
        return cls(group.indices, group.ids, group.bad, np.zeros(0, np.int64), None)

    def to_bytes(self) -> bytes:
        """``.npz`` bytes (arrays and one JSON string; read with :meth:`from_bytes`)."""
        meta = {
            "indices": list(self.indices),
            "bad": self.bad,
            "want": self.want,
            "n": self.parts.n if self.parts is not None else None,
            "maps": [len(self.maps_a), len(self.maps_b)],
        }
        arrays: dict[str, np.ndarray] = {
            "meta": np.array(json.dumps(meta)),
            "ids": self.ids,
            "dropped": self.dropped,
        }
        if self.parts is not None:
            arrays |= {"cross": self.parts.cross, "self_a": self.parts.self_a}
            arrays["self_b"] = self.parts.self_b
        if self.kept:
            arrays["kept"] = np.stack(self.kept)
        for prefix, maps in (("a", self.maps_a), ("b", self.maps_b)):
            for k, m in enumerate(maps):
                arrays[f"{prefix}{k}"] = m.numpy()
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> GroupResult:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            parts = None
            if meta["n"] is not None:
                parts = HSICParts(f["cross"], f["self_a"], f["self_b"], int(meta["n"]))
            na, nb = meta["maps"]
            return cls(
                indices=tuple(int(i) for i in meta["indices"]),
                ids=f["ids"],
                bad=[(int(i), str(r)) for i, r in meta["bad"]],
                dropped=f["dropped"],
                parts=parts,
                want=int(meta["want"]),
                kept=list(f["kept"]) if "kept" in f.files else [],
                maps_a=[torch.from_numpy(f[f"a{k}"]) for k in range(na)],
                maps_b=[torch.from_numpy(f[f"b{k}"]) for k in range(nb)],
            )


def features(fm: FeatureMaps, names: Sequence[str], pool: str) -> list[torch.Tensor]:
    """Per-example features of each layer: ``(B, C·H·W)`` or, with ``mean``, ``(B, C)``."""
    if pool == "mean":
        return [fm[n].mean(dim=(2, 3)) for n in names]
    return [fm[n].reshape(fm[n].shape[0], -1) for n in names]


def _finite_rows(feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Which examples have finite features in every layer (a float64 sum per row: finite
    exactly when every float32 value is, and no temporary as large as the features)."""
    ok = torch.ones(feats[0].shape[0], dtype=torch.bool)
    for f in feats:
        ok &= torch.isfinite(f.sum(dim=1, dtype=torch.float64)).cpu()
    return ok


@dataclass(frozen=True)
class StepSpec:
    """What each group computes, the same in every engine."""

    layers_a: tuple[str, ...]
    layers_b: tuple[str, ...]
    pool: str
    display: Preprocess
    """Model A's preprocessing, to turn its inputs back into pictures."""


def process_group(
    module_a: torch.nn.Module,
    module_b: torch.nn.Module,
    group: Decoded,
    spec: StepSpec,
    device: torch.device,
    want: int,
) -> GroupResult:
    """One forward of each model on ``group`` (``MIN_BATCH`` images or more): its HSIC terms.

    Images whose features hold NaN or Inf in any layer are dropped (their ids in
    ``dropped``); if fewer than ``MIN_BATCH`` remain, ``parts`` is ``None``. The first
    ``want`` images used keep their display picture and maps.
    """
    xa = group.xa.to(device, non_blocking=True)
    xb = xa if group.xb is None else group.xb.to(device, non_blocking=True)
    fa = capture(module_a, xa, list(spec.layers_a), copy=False)  # features used at once
    fb = capture(module_b, xb, list(spec.layers_b), copy=False)
    feats_a = features(fa, spec.layers_a, spec.pool)
    feats_b = features(fb, spec.layers_b, spec.pool)
    ok = torch.ones(len(group.ids), dtype=torch.bool)
    dropped = np.zeros(0, np.int64)
    try:
        parts = hsic_parts(feats_a, feats_b)
    except NonFiniteFeatures:  # rare: find the images, drop them, try again
        ok = _finite_rows([*feats_a, *feats_b])
        dropped = group.ids[~ok.numpy()]
        if int(ok.sum()) < MIN_BATCH:
            return GroupResult(group.indices, group.ids, group.bad, dropped, None, want)
        parts = hsic_parts([f[ok] for f in feats_a], [f[ok] for f in feats_b])
    result = GroupResult(group.indices, group.ids, group.bad, dropped, parts, want)
    if want > 0:
        rows = torch.nonzero(ok).flatten()[:want]
        result.kept = [display_image(group.xa[int(r)], spec.display) for r in rows]
        result.maps_a = [fa[n][rows].cpu() for n in spec.layers_a]
        result.maps_b = [fb[n][rows].cpu() for n in spec.layers_b]
    return result
