"""The run store: one SQLite file that keeps every row of a run, so a run can be resumed.

Rows reach the store before they are reported. A run's rows go to a sink: :mod:`sink` defines
the interface and keeps rows in memory when there is no store; :mod:`writer` is the SQLite
sink, the only writer of a store, guarded by :mod:`lock`. :mod:`schema` is the file format and
:mod:`codec` turns rows into records and back; :mod:`scrub` takes each config's env values out
of its rows before any sink sees them. :mod:`readers` serve ``procval.load`` and the
CLI's ``report``, ``export`` and ``compare``.

The public functions are imported here lazily, so that ``procval.store.load`` and friends keep
working without loading SQLite into a run that has no store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from procval.store.readers import count_rows, iter_rows, load, sessions

__all__ = ["count_rows", "iter_rows", "load", "sessions"]


def __getattr__(name: str) -> Any:
    """``load``, ``iter_rows``, ``count_rows`` and ``sessions``, from :mod:`readers`."""
    if name in __all__:
        from procval.store import readers

        return getattr(readers, name)
    raise AttributeError(f"module 'procval.store' has no attribute {name!r}")
