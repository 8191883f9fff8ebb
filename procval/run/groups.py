"""Groups: each example's group (``evaluate(..., group_by=)``), worked out in the parent.

``group_by`` is a key (``example["subject"]``), an attribute (``example.subject``) or a
function of the example; its value, made a str, is the row's ``group`` (stored as the store's
``group_key``). The parent computes it while it reads the dataset, never a worker::

    list or tuple ──▶ every example's group, up front ──▶ missing on some: ValueError naming how
                      (with the ids, before any worker)     many and the first ids, nothing runs
    streamed      ──▶ each example's group as it is read ──▶ missing: ValueError at that example,
                                                            before it is sent (the examples read
                                                            before it run and are kept, as when
                                                            a dataset raises)
    rows ──▶ GroupedSink.add sets row.group ──▶ the sink (the store, or memory)

A list's groups are kept (one str per example); a streamed example's group is computed again
from the row's example, so ``group_by`` should be a cheap, deterministic function. Without
``group_by`` none of this runs: no cost per example.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from procval.results import Row
from procval.store.sink import Sink, SinkWrapper

__all__ = ["GroupBy", "Grouping", "GroupedSink"]

GroupBy = str | Callable[[Any], Any]
_MISSING = object()
_SHOWN = 5  # ids named in an error message


class Grouping:
    """How to find an example's group from ``group_by`` (checked here, before anything runs).

    Args:
        group_by: a key or attribute name, or a function of the example.

    Raises:
        TypeError: ``group_by`` is neither a str nor callable.
        ValueError: ``group_by`` is an empty str.
    """

    def __init__(self, group_by: GroupBy) -> None:
        if isinstance(group_by, str):
            if not group_by:
                raise ValueError("group_by must be a key or attribute name, not ''")
            self._key: str | None = group_by
            self._fn: Callable[[Any], Any] | None = None
        elif callable(group_by):
            self._key, self._fn = None, group_by
        else:
            raise TypeError(
                "group_by must be a key or attribute name (a str) or a function of the example, "
                f"got {type(group_by).__name__}"
            )
        self.what = repr(group_by) if self._fn is None else "the group_by function"

    def raw(self, example: Any) -> Any:
        """The example's group value before it is made a str (``_MISSING`` when it has none)."""
        if self._fn is not None:
            value = self._fn(example)
        elif isinstance(example, Mapping):
            value = example.get(self._key, _MISSING)
        else:
            try:
                value = getattr(example, self._key, _MISSING)  # type: ignore[arg-type]
            except Exception:  # an object whose __getattr__ raises something else
                value = _MISSING
        return _MISSING if value is None else value

    def one(self, example: Any, example_id: int | str, index: int) -> str:
        """The group of one example (a streamed one, as it is read).

        Raises:
            ValueError: the example has no group (the key or attribute is missing or None).
            TypeError: the group is not a str, int, float or bool.
        """
        value = self._call(example, example_id)
        if value is _MISSING:
            raise ValueError(
                f"example {example_id!r} (#{index}) has no group: {self._missing()}; the "
                "dataset is read as it runs, so the examples before it ran and were kept"
                f"{self._fix()}"
            )
        return _text(value, example_id)

    def all(self, examples: Sequence[Any], ids: Sequence[int | str]) -> list[str]:
        """Every example's group, in order (a list or tuple dataset, before any worker starts).

        Raises:
            ValueError: some examples have no group: how many, and the first ids.
            TypeError: a group is not a str, int, float or bool.
        """
        raw = [self._call(example, eid) for example, eid in zip(examples, ids, strict=True)]
        missing = [eid for value, eid in zip(raw, ids, strict=True) if value is _MISSING]
        if missing:
            shown = ", ".join(map(repr, missing[:_SHOWN])) + (
                ", ..." if len(missing) > _SHOWN else ""
            )
            raise ValueError(
                f"{len(missing)} of {len(ids)} examples have no group ({shown}): "
                f"{self._missing()}{self._fix()}"
            )
        return [
            value if type(value) is str else _text(value, eid)
            for value, eid in zip(raw, ids, strict=True)
        ]

    def _call(self, example: Any, example_id: int | str) -> Any:
        try:
            return self.raw(example)
        except Exception as exc:
            raise ValueError(
                f"group_by raised {type(exc).__name__}: {exc} on example {example_id!r}; make it "
                "return a group for every example"
            ) from exc

    def _missing(self) -> str:
        if self._fn is not None:
            return "the group_by function returned None"
        return f"group_by={self._key!r} is not a key or attribute there (or is None)"

    def _fix(self) -> str:
        if self._fn is not None:
            return "; return a default for these, e.g. 'other'"
        key = self._key
        return (
            f"; pass a function that returns a default, e.g. group_by=lambda e: "
            f"e.get({key!r}) or 'other' (for objects: getattr(e, {key!r}, None) or 'other')"
        )


def _text(value: Any, example_id: int | str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float | bool):
        return str(value)
    raise TypeError(
        f"group_by gave a {type(value).__name__} ({value!r:.60}) for example {example_id!r}; a "
        "group must be a str (or an int, float or bool, made a str)"
    )


class GroupedSink(SinkWrapper):
    """A sink that sets each row's ``group`` before the wrapped sink keeps it.

    Args:
        sink: the sink to pass the rows on to.
        group: ``group(index, example) -> str``, the group of the example at ``index``
            (:meth:`procval.run.dataset.Examples.group`).
    """

    def __init__(self, sink: Sink, group: Callable[[int, Any], str]) -> None:
        super().__init__(sink)
        self._group = group

    def add(self, config: str, rows: list[Row]) -> None:
        """Set the rows' groups, then add them to the wrapped sink."""
        group = self._group
        for row in rows:
            # The rows were just made in the parent and nobody else has seen them yet: set the
            # field in place (a frozen dataclass, as __post_init__ would) rather than copy them.
            object.__setattr__(row, "group", group(row.index, row.example))
        self._sink.add(config, rows)
