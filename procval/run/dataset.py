"""Reading a dataset lazily into ``(index, example_id, example)`` items."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from procval.run.groups import GroupBy, Grouping
from procval.wire import WorkItem

_new = tuple.__new__  # tuple.__new__(WorkItem, values): a NamedTuple built in C

Item = WorkItem  # (seq, example_id, example, epoch), as sent to a worker


class Source(Protocol):
    """What the scheduler reads a config's items from (:class:`Examples`, epochs, a budget)."""

    total: int | None  # how many items (None: unknown)

    def __iter__(self) -> Iterator[Item]:
        """The items, in order."""
        ...


def example_id(example: Any, index: int) -> int | str:
    """The example's ``id`` key or attribute, else its position in the dataset.

    Raises:
        TypeError: the id is neither an int nor a str.
    """
    if type(example) is dict or isinstance(example, Mapping):  # a dict first: the common case
        value = example.get("id", index)
    else:
        try:
            value = getattr(example, "id", index)
        except Exception:  # objects whose __getattr__ raises something else
            value = index
        if callable(value):  # e.g. a method named id: not an identifier
            value = index
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(
            f"example #{index} has an id of type {type(value).__name__} ({value!r:.60}); "
            "ids must be int or str: convert them, e.g. {'id': str(uid), ...}"
        )
    return value


class Examples:
    """A dataset made ready for the scheduler: validated up front where that is cheap.

    A list or tuple is checked for duplicate ids before any worker starts. Other datasets are
    read lazily and checked as they are read, keeping each id seen; with ``track_ids=False`` they
    are not (a run store refuses a second row for an id instead, with no memory in the parent).
    A one-shot iterator (a generator) is read once; if several configs need it, it is read into
    memory first (pass a re-iterable such as :func:`read_jsonl` to stream it).

    With ``group_by``, each example's group is computed as it is read: all of a list's up front
    (an example without one is refused before anything runs), a streamed one's as it is read
    (see :mod:`procval.run.groups`); :meth:`group` gives it for a row.
    """

    def __init__(
        self,
        dataset: Iterable[Any],
        *,
        passes: int,
        track_ids: bool = True,
        group_by: GroupBy | None = None,
    ) -> None:
        if isinstance(dataset, str | bytes) or not isinstance(dataset, Iterable):
            raise TypeError(
                f"dataset must be an iterable of examples (a list, a generator, read_jsonl(path)), "
                f"got {type(dataset).__name__}"
            )
        one_shot = iter(dataset) is dataset
        if one_shot and passes > 1:
            dataset = list(dataset)
            one_shot = False
        self._one_shot = one_shot
        self._head: list[Any] = []
        if one_shot:
            iterator = iter(dataset)
            self._head = list(itertools.islice(iterator, 1))
            self._data: Iterable[Any] = itertools.chain(self._head, iterator)
        else:
            self._data = dataset
        self.total: int | None = _length(dataset)
        if (
            self.total == 0
            or (one_shot and not self._head)
            or (self.total is None and not one_shot and _is_empty(dataset))
        ):
            raise ValueError("dataset is empty: there is nothing to evaluate")
        self._checked = not track_ids  # False: someone else (the run store) catches duplicates
        self._ids: list[int | str] | None = None
        self._grouping = None if group_by is None else Grouping(group_by)
        self._groups: list[str] | None = None
        if isinstance(dataset, list | tuple):
            self._ids = _unique_ids(dataset)
            self._checked = True
            if self._grouping is not None:  # every example's group, before any worker starts
                self._groups = self._grouping.all(dataset, self._ids)

    @property
    def grouped(self) -> bool:
        """Whether rows get a group (``group_by`` was given)."""
        return self._grouping is not None

    def group(self, index: int, example: Any) -> str:
        """The group of the example at ``index`` (computed up front for a list).

        Raises:
            ValueError: without ``group_by``; or see :meth:`procval.run.groups.Grouping.one`.
        """
        if self._groups is not None:
            return self._groups[index]
        grouping = self._grouping
        if grouping is None:
            raise ValueError("this dataset has no group_by")
        try:
            value = grouping.raw(example)  # checked when it was read: the common case is a str
        except Exception:
            value = None
        if type(value) is str:
            return value
        return grouping.one(example, example_id(example, index), index)

    def __iter__(self) -> Iterator[Item]:
        """``WorkItem(index, example_id, example)`` each; raises ValueError at a duplicate id."""
        if self._ids is not None:  # a list: ids computed (and checked) once, up front
            # built in C: no Python frame per example
            return map(
                _new,
                itertools.repeat(WorkItem),
                zip(itertools.count(), self._ids, self._data, itertools.repeat(0)),
            )
        return self._read()

    def _read(self) -> Iterator[Item]:
        seen: dict[int | str, int] | None = None if self._checked else {}
        grouping = self._grouping
        for index, example in enumerate(self._data):
            eid = example.get("id", index) if type(example) is dict else None
            if type(eid) is not int and type(eid) is not str:  # not a plain dict's int or str
                eid = example_id(example, index)
            if seen is not None:
                first = seen.setdefault(eid, index)
                if first != index:
                    raise _duplicate(eid, first, index)
            if grouping is not None:
                grouping.one(example, eid, index)  # refused here, before it is sent
            yield _new(WorkItem, (index, eid, example, 0))  # built in C, as in __iter__


def _duplicate(eid: int | str, first: int, second: int) -> ValueError:
    return ValueError(
        f"duplicate example id {eid!r} at positions {first} and {second}; ids must be unique "
        "(drop the 'id' field to number examples by position)"
    )


def _unique_ids(dataset: list[Any] | tuple[Any, ...]) -> list[int | str]:
    ids = [example_id(example, index) for index, example in enumerate(dataset)]
    if len(set(ids)) != len(ids):
        seen: dict[int | str, int] = {}
        for index, eid in enumerate(ids):
            first = seen.setdefault(eid, index)
            if first != index:
                raise _duplicate(eid, first, index)
    return ids


def _length(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None


def _is_empty(dataset: Iterable[Any]) -> bool:
    return next(iter(dataset), _EMPTY) is _EMPTY


_EMPTY = object()


class read_jsonl:  # noqa: N801 - used like a function: read_jsonl(path)
    """A JSON-lines file as a lazy, re-iterable dataset: one example per non-blank line.

    Nothing is read until iteration; ``len()`` counts lines once (for progress bars).

    Args:
        path: the file to read.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            where = os.path.abspath(self.path)
            relative = "" if os.path.isabs(self.path) else " (relative to the current directory)"
            raise FileNotFoundError(
                f"no JSONL file at {self.path!r}: {where} does not exist{relative}"
            )
        self._len: int | None = None

    def __iter__(self) -> Iterator[Any]:
        with open(self.path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{self.path}:{number}: not valid JSON ({exc})") from exc

    def __len__(self) -> int:
        if self._len is None:
            with open(self.path, encoding="utf-8") as f:
                self._len = sum(1 for line in f if line.strip())
        return self._len

    def __repr__(self) -> str:
        return f"read_jsonl({self.path!r})"
