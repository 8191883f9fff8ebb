"""Epochs: each example of a dataset run ``k`` times, as ``k`` work items with their own seqs.

The items of example ``index`` are ``WorkItem(index * k + epoch, example_id, example, epoch)``
for ``epoch`` in ``0 .. k-1``, one after the other, so that a streamed dataset is still read once
and an example's epochs finish close together. The seq is unique within the run (the scheduler
and the slot table key on it); the row's index is ``seq // k``
(:class:`procval.run.rows.RowMaker`). With ``k == 1`` the dataset's items are passed as they are.
"""

from __future__ import annotations

from collections.abc import Iterator

from procval.run.dataset import Examples, Item
from procval.wire import WorkItem


class Repeated:
    """``examples`` with each example repeated ``epochs`` times (see the module docstring)."""

    def __init__(self, examples: Examples, epochs: int) -> None:
        self._examples = examples
        self.epochs = epochs
        total = examples.total
        self.total: int | None = None if total is None else total * epochs

    def __iter__(self) -> Iterator[Item]:
        """Each example's items, epoch 0 first."""
        k = self.epochs
        for index, example_id, example, _ in self._examples:
            seq = index * k
            for epoch in range(k):
                yield WorkItem(seq + epoch, example_id, example, epoch)


def repeat(examples: Examples, epochs: int) -> Examples | Repeated:
    """``examples`` as they are for one epoch, else :class:`Repeated`."""
    return examples if epochs == 1 else Repeated(examples, epochs)
