"""The local engine of a comparison: decoding in DataLoader workers, forwards in this process.

Batches are decoded by ``workers`` processes, grouped by :class:`~.batches.Grouper` as
they arrive, and each group runs :func:`~.step.process_group` on the driver's device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from ..atlas.data import ordered_loader
from ..models import Preprocess
from .batches import Counted, Decoded, Grouper, batch_paths, decode, merge_decoded
from .cka import MIN_BATCH
from .step import GroupResult, StepSpec, process_group


class _Batches(torch.utils.data.Dataset[Decoded]):
    """Item ``i``: batch ``pending[i]`` decoded with each distinct preprocessing."""

    def __init__(
        self,
        paths: Sequence[str],
        batch_size: int,
        pa: Preprocess,
        pb: Preprocess,
        pending: Sequence[int],
    ) -> None:
        self.paths = list(paths)
        self.batch_size = batch_size
        self.pa, self.pb = pa, pb
        self.pending = list(pending)

    def __len__(self) -> int:
        return len(self.pending)

    def __getitem__(self, item: int) -> Decoded:
        index = self.pending[item]
        first, paths = batch_paths(self.paths, self.batch_size, index)
        return decode(index, first, paths, self.pa, self.pb)


def decoded_batches(
    paths: Sequence[str],
    batch_size: int,
    pending: Sequence[int],
    pps: tuple[Preprocess, Preprocess],
    workers: int,
) -> torch.utils.data.DataLoader[Decoded]:
    """The ``pending`` batches decoded for both models by ``workers`` processes, in order."""
    return ordered_loader(_Batches(paths, batch_size, pps[0], pps[1], pending), workers)


def local_results(
    module_a: torch.nn.Module,
    module_b: torch.nn.Module,
    paths: Sequence[str],
    batch_size: int,
    pending: Sequence[int],
    pps: tuple[Preprocess, Preprocess],
    spec: StepSpec,
    device: torch.device,
    workers: int,
    want: Callable[[], int],
    arrived: Callable[[Counted], None],
) -> Iterator[GroupResult]:
    """The results of the ``pending`` batches' groups, in batch order.

    ``arrived`` is told of each decoded batch (after the group it closed, if any, was
    folded: an interrupt raised from it finds that group in the checkpoint); ``want()``
    is asked, just before each group runs, how many example images the fold still
    needs. Closing the generator early stops the workers.
    """
    loader = decoded_batches(paths, batch_size, pending, pps, workers)
    grouper: Grouper[Decoded] = Grouper(lambda g: len(g.ids), merge_decoded)
    for batch in loader:
        ready = grouper.push(batch)
        if ready is not None:
            yield process_group(module_a, module_b, ready, spec, device, want())
        arrived(batch.counted())  # after the fold: progress counts folded work first
    last = grouper.finish()
    if last is not None:
        if len(last.ids) >= MIN_BATCH:
            yield process_group(module_a, module_b, last, spec, device, want())
        else:
            yield GroupResult.left_out(last.counted())
