"""Debiased linear CKA, accumulated over minibatches.

Centered kernel alignment (Kornblith et al., 2019) compares two representations of the
same ``n`` examples through their ``n × n`` Gram matrices. With the linear kernel,
``K = X Xᵀ`` for features ``X`` of shape ``(n, D)``. The debiased estimator replaces
the biased HSIC by the unbiased one of Song et al. (2012):

    HSIC₁(K, L) = [tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n-1)(n-2)) - 2/(n-2) · 1ᵀK̃L̃1] / (n(n-3))

where ``K̃`` and ``L̃`` are ``K`` and ``L`` with their diagonals set to zero (``n ≥ 4``).
For datasets that do not fit in memory, the minibatch estimator of Nguyen, Raghu and
Kornblith (2021) averages HSIC₁ over batches of ``n`` examples each:

    CKA = mean_b HSIC₁(K_b, L_b) / sqrt(mean_b HSIC₁(K_b, K_b) · mean_b HSIC₁(L_b, L_b))

With one batch holding every example this is the full-batch debiased linear CKA.

Only ``n × n`` Gram matrices are formed, so features ``C·H·W`` wide cost one matrix
product each. For the linear kernel HSIC₁ depends on the features only through their
differences (it is a U-statistic of ``⟨x_i - x_r, x_j - x_q⟩`` products), so each batch
is centered before its Gram matrix is formed: the same value, without the cancellation a
large common offset (a ReLU's positive mean) would cause. Products run in the features'
precision over chunks of columns; Grams, their sums and HSIC are float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ReduceError

MIN_BATCH = 4
"""The unbiased HSIC estimator needs at least four examples per batch."""

ArrayLike = torch.Tensor | np.ndarray


class NonFiniteFeatures(ReduceError):
    """Some features are NaN or Inf: the batch cannot be added as it is."""


def _features(x: ArrayLike) -> torch.Tensor:
    """``(n, ...)`` features as a ``(n, D)`` tensor (no copy when already 2-D)."""
    t = torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x
    if t.ndim < 2:
        raise ReduceError(f"features must be (n, D) or (n, ...), got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1)


GRAM_CHUNK = 1 << 16
"""Feature columns per partial Gram product (float32 products, summed in float64)."""


def _gram(x: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of the batch-centered features, float64, diagonal set to zero.

    The features are taken :data:`GRAM_CHUNK` columns at a time: each chunk is centered
    (column means are per column, so a chunk's means are the batch's), multiplied in its
    own precision (float32: twice the speed of float64, about 1e-7 relative error per
    product), and the partial Grams are summed in float64. On MPS, which has no float64,
    the sums run on the CPU. The input is never modified.
    """
    n = x.shape[0]
    acc_device = torch.device("cpu") if x.device.type == "mps" else x.device
    k = torch.zeros(n, n, dtype=torch.float64, device=acc_device)
    wide = x.dtype in (torch.float32, torch.float64)
    for start in range(0, x.shape[1], GRAM_CHUNK):
        chunk = x[:, start : start + GRAM_CHUNK]
        if not wide:  # integers, float16, bfloat16: products in float32
            chunk = chunk.to(torch.float32)
        # the column means as one matrix-vector product: a reduction over dim 0 of a
        # column slice is ten times slower on the CPU
        mean = chunk.new_full((1, n), 1.0 / n) @ chunk
        centered = chunk - mean  # a new tensor
        part = centered @ centered.T
        if not bool(torch.isfinite(part).all()) and part.dtype != torch.float64:
            part = centered.double() @ centered.double().T  # float32 overflowed?
        k += part.to(acc_device, torch.float64)
    k.fill_diagonal_(0.0)
    return k.cpu()


@dataclass
class _Grams:
    """Zero-diagonal Grams of several layers, ``(m, n, n)``, with what HSIC₁ needs."""

    k: torch.Tensor
    rows: torch.Tensor = field(init=False)  # (m, n): K̃1
    total: torch.Tensor = field(init=False)  # (m,): 1ᵀK̃1

    def __post_init__(self) -> None:
        self.rows = self.k.sum(dim=2)
        self.total = self.rows.sum(dim=1)


def _hsic1(a: _Grams, b: _Grams, n: int) -> np.ndarray:
    """Unbiased HSIC between every Gram of ``a`` and every Gram of ``b``: ``(m_a, m_b)``."""
    trace = a.k.reshape(a.k.shape[0], -1) @ b.k.reshape(b.k.shape[0], -1).T  # tr(K̃L̃), K̃ sym.
    sums = torch.outer(a.total, b.total) / ((n - 1) * (n - 2))
    cross = (a.rows @ b.rows.T) * (2.0 / (n - 2))  # 1ᵀK̃L̃1 = (K̃1)·(L̃1)
    return ((trace + sums - cross) / (n * (n - 3))).numpy()


def _self_hsic1(a: _Grams, n: int) -> np.ndarray:
    """Unbiased HSIC of each Gram with itself: ``(m,)``."""
    trace = (a.k * a.k).sum(dim=(1, 2))
    sums = a.total**2 / ((n - 1) * (n - 2))
    cross = (a.rows * a.rows).sum(dim=1) * (2.0 / (n - 2))
    return ((trace + sums - cross) / (n * (n - 3))).numpy()


@dataclass(frozen=True)
class HSICParts:
    """What one batch adds to the sums: unbiased HSIC of every pair of layers, ``n`` examples.

    Small (``(n_a, n_b)`` float64), so an engine can compute it where the models run
    and send only these arrays back to be folded in batch order.
    """

    cross: np.ndarray  # (n_a, n_b): HSIC1(K_a, L_b)
    self_a: np.ndarray  # (n_a,): HSIC1(K_a, K_a)
    self_b: np.ndarray  # (n_b,): HSIC1(L_b, L_b)
    n: int


def hsic_parts(feats_a: Sequence[ArrayLike], feats_b: Sequence[ArrayLike]) -> HSICParts:
    """The unbiased HSIC terms of one batch: ``feats_a[i]`` is layer ``i`` of model A.

    Raises:
        ReduceError: batches of different sizes, or fewer than :data:`MIN_BATCH`
            examples; :class:`NonFiniteFeatures` for NaN or Inf.
    """
    xa = [_features(f) for f in feats_a]
    xb = [_features(f) for f in feats_b]
    if not xa or not xb:
        raise ReduceError("compare at least one layer of each model")
    sizes = {int(x.shape[0]) for x in (*xa, *xb)}
    if len(sizes) != 1:
        raise ReduceError(f"every layer must hold the same examples; batch sizes {sizes}")
    n = sizes.pop()
    if n < MIN_BATCH:
        raise ReduceError(
            f"a batch of {n} example(s): the unbiased HSIC needs at least {MIN_BATCH}"
        )
    ga = _Grams(torch.stack([_gram(x) for x in xa]))
    gb = _Grams(torch.stack([_gram(x) for x in xb]))
    if not bool(torch.isfinite(ga.k).all() and torch.isfinite(gb.k).all()):
        raise NonFiniteFeatures("the features hold NaN or Inf (or overflow float64)")
    parts = (_hsic1(ga, gb, n), _self_hsic1(ga, n), _self_hsic1(gb, n))
    if not all(np.isfinite(p).all() for p in parts):
        raise NonFiniteFeatures("the HSIC sums overflow float64")
    return HSICParts(*parts, n=n)


class CKAAccumulator:
    """Minibatch debiased linear CKA between ``n_a`` layers of one model and ``n_b`` of another.

    Each :meth:`update` takes one batch: the features of the same ``n`` examples in every
    layer. Memory is a few ``(n_a, n_b)`` float64 arrays whatever the number of batches.

    Example:
        >>> acc = CKAAccumulator(1, 1)
        >>> x = torch.randn(16, 8)
        >>> acc.update([x], [2 * x])
        >>> round(float(acc.matrix()[0, 0]), 6)
        1.0
    """

    def __init__(self, n_a: int, n_b: int) -> None:
        if n_a < 1 or n_b < 1:
            raise ReduceError("compare at least one layer of each model")
        self.n_a, self.n_b = n_a, n_b
        self.cross = np.zeros((n_a, n_b), dtype=np.float64)
        self.self_a = np.zeros(n_a, dtype=np.float64)
        self.self_b = np.zeros(n_b, dtype=np.float64)
        self.batches = 0
        self.examples = 0

    def update(self, feats_a: Sequence[ArrayLike], feats_b: Sequence[ArrayLike]) -> None:
        """Add one batch: ``feats_a[i]`` is layer ``i`` of model A, ``(n, ...)`` per example.

        Raises:
            ReduceError: wrong number of layers, batches of different sizes, or fewer
                than :data:`MIN_BATCH` examples; :class:`NonFiniteFeatures` for NaN or
                Inf. The accumulator is unchanged when it raises.
        """
        if len(feats_a) != self.n_a or len(feats_b) != self.n_b:
            raise ReduceError(
                f"expected {self.n_a} + {self.n_b} layers, got {len(feats_a)} + {len(feats_b)}"
            )
        self.add(hsic_parts(feats_a, feats_b))

    def add(self, parts: HSICParts) -> None:
        """Fold one batch's :func:`hsic_parts` (computed here or elsewhere) into the sums.

        Raises:
            ReduceError: the parts are of other layer counts.
        """
        if parts.cross.shape != (self.n_a, self.n_b):
            raise ReduceError(
                f"expected HSIC parts of {self.n_a} x {self.n_b} layers, got {parts.cross.shape}"
            )
        self.cross += parts.cross
        self.self_a += parts.self_a
        self.self_b += parts.self_b
        self.batches += 1
        self.examples += parts.n

    def matrix(self) -> np.ndarray:
        """The ``(n_a, n_b)`` CKA; NaN where a layer has no variance over the examples.

        Raises:
            ReduceError: no batch was added.
        """
        if self.batches == 0:
            raise ReduceError("no batch was added: CKA is undefined")
        denom = np.sqrt(np.clip(np.outer(self.self_a, self.self_b), 0.0, None))
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(denom > 0, self.cross / np.where(denom > 0, denom, 1.0), np.nan)
        return out


def debiased_cka(x: ArrayLike, y: ArrayLike) -> float:
    """Full-batch debiased linear CKA between two representations of the same examples.

    Args:
        x: ``(n, ...)`` features of ``n`` examples (flattened per example).
        y: ``(n, ...)`` features of the same examples, any width.

    Returns:
        The CKA (NaN when either representation is constant over the examples).

    Example:
        >>> x = np.random.default_rng(0).normal(size=(32, 10))
        >>> round(debiased_cka(x, 3.0 * x), 6)
        1.0
    """
    acc = CKAAccumulator(1, 1)
    acc.update([x], [y])
    return float(acc.matrix()[0, 0])
