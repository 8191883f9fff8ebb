"""What a resumed run has finished: the stored rows, read alongside the dataset, a window at a time.

A resumed run asks, for each example (and epoch) the dataset yields, whether the store holds its
row; if so, the example is not run again, and its content should be the one stored under its id.
Two costs grow with the run if done naively, and a million-row run pays both before its first
new example: every stored id held in the parent (~130 MB for 900,000), and the content of every
finished example hashed (~4 µs each: 3.5 s for 900,000). Here:

**Finding rows** (:class:`DoneRows`). The store keeps each row's position in the dataset
(``idx``, indexed), and the dataset is read in order. So the stored rows are read a window of
:data:`WINDOW` positions at a time, one range query each, keyed by id, when the dataset's
positions reach them; a row found in its window is taken out of it. The parent holds one window
(a few hundred kB), whatever the size of the run. An id missing from its window (the dataset was
reordered, examples were inserted before it) is looked up by its key, one query; once as many
rows have been found as the store holds, nothing more is looked up, so the new examples of an
unchanged dataset cost no query. Rows this session writes are never read: a window lies ahead of
every example sent so far, and a lookup skips this session's rows.

**Checking content** (:class:`ContentCheck`). The check guards against resuming on a dataset
whose examples changed under the same ids (an edited file, ids that are positions in another
file): the stored rows would then mix two datasets. Each finished example's canonical JSON is
hashed and compared with the hash stored with its row, for the first :data:`FULL` finished
examples of the session, then for a random one in :data:`SAMPLE` of the others, drawn afresh
each session. What this catches:

- every change, in a store of up to :data:`FULL` rows per config (per config and epoch count);
- a change to many examples (another dataset, a changed template in every example), at once:
  the first finished example already differs;
- ``k`` changed examples beyond the first :data:`FULL`, with probability
  ``1 - (1 - 1/SAMPLE) ** k`` per resume: 1 in 16 for one example, 48 % for 10, 96 % for 50.

What it misses: a few edited examples past the first :data:`FULL`, most of the time. Set
``PROCVAL_RESUME_CHECK=all`` to hash every finished example, as procval did before (3.5 s per
900,000 examples on the benchmark's machine); ``fresh=True`` or new ids for edited examples
avoid the question.
"""

from __future__ import annotations

import math
import os
import random
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from procval.store.codec import id_text, text_hash, to_json
from procval.store.faults import store_errors
from procval.wire import WorkItem as Item

WINDOW = 4096
"""Dataset positions whose stored rows are read in one query (and held at once)."""
FULL = 10_000
"""Finished examples whose content is always checked, first in each session."""
SAMPLE = 16
"""Past :data:`FULL`, one finished example in ``SAMPLE`` (at random) is checked."""
CHECKS = ("sample", "all")


def check_mode() -> str:
    """``PROCVAL_RESUME_CHECK``: ``"sample"`` (the default) or ``"all"``.

    Raises:
        ValueError: any other value.
    """
    value = os.environ.get("PROCVAL_RESUME_CHECK", "").strip().lower() or "sample"
    if value not in CHECKS:
        raise ValueError(
            f"PROCVAL_RESUME_CHECK must be 'sample' or 'all', got {value!r}; 'all' checks the "
            "content of every finished example when a run resumes"
        )
    return value


class ContentCheck:
    """Which finished examples get their content compared with the store (module docstring).

    The first :data:`FULL` finished examples are checked, then each of the others with
    probability ``1 / SAMPLE``: the gap to the next checked one is drawn (geometrically) when
    one is checked, so an unchecked example costs one comparison of counts.

    Args:
        mode: ``"sample"``, or ``"all"`` to check every one.
    """

    def __init__(self, mode: str = "sample") -> None:
        self._all = mode == "all"
        self._draw = random.Random().random  # seeded by the OS: a new sample each session
        self.seen = 0  # finished examples met so far
        self.due = 1  # the count (of seen) at which the next one is checked
        self.checked = 0

    def wanted(self) -> bool:
        """Whether the next finished example is to be checked (counts it)."""
        self.seen += 1
        return self.seen >= self.due and self.take()

    def take(self) -> bool:
        """Count a check of the ``seen``-th finished example; draw the next one. True."""
        self.checked += 1
        gap = 1
        if not self._all and self.seen >= FULL:
            gap += int(math.log(1.0 - self._draw()) / _LOG_MISS)  # P(gap = g) = q**(g-1) p
        self.due = self.seen + gap
        return True


_LOG_MISS = math.log(1.0 - 1.0 / SAMPLE)


class DoneRows:
    """The stored rows of one config that count as done, found by position, else by id.

    Args:
        db: the connection to read with (the writer's: it sees its own open transaction).
        path: the store, for error messages.
        config: the config's name.
        stored: how many rows count as done (the ``totals`` of the config's rows that count).
        epochs: the run's epochs; rows of later epochs are not looked at.
        session: this session's id; its rows are never counted as done before the run.
        only_ok: count only rows without an error (``retry_errors``).
    """

    def __init__(
        self,
        db: sqlite3.Connection,
        path: str,
        config: str,
        *,
        stored: int,
        epochs: int,
        session: int,
        only_ok: bool = False,
    ) -> None:
        self._db = db
        self._path = path
        self._where = "config = ? AND epoch < ? AND session != ?" + (
            " AND error_type IS NULL" if only_ok else ""
        )
        self._params: tuple[Any, ...] = (config, epochs, session)
        self._epochs = epochs
        with store_errors(path):  # the index answers: no row is read
            (last,) = db.execute("SELECT MAX(idx) FROM rows WHERE config = ?", (config,)).fetchone()
        self.unfound = stored  # stored rows no example has been matched with yet
        self._end = -1 if last is None else int(last) + 1  # no stored row at or past this idx
        self._lo = self._hi = 0
        self._window: dict[Any, int] = {}
        self.lookups = 0

    def find(self, index: int, example_id: int | str, epoch: int = 0) -> int | None:
        """The stored hash of this example's epoch if it has a row that counts, else None."""
        if not self._lo <= index < self._hi:
            self._load(index)
        digest = self._window.pop((example_id, epoch) if epoch else example_id, None)
        if digest is None and self.unfound > 0:
            digest = self._lookup(example_id, epoch)
        if digest is not None:
            self.unfound -= 1
        return digest

    def pending(
        self, items: Iterable[Item], check: ContentCheck, changed: Callable[[Item], Exception]
    ) -> Iterator[Item]:
        """The items without a row that counts, in order: :meth:`find` for each, in one loop.

        A finished item that :meth:`ContentCheck.wanted` picks is hashed; ``changed(item)`` is
        raised if its hash is not the stored one.
        """
        k = self._epochs  # an item's position is its seq // k (procval.run.epochs)
        lo, hi, window = self._lo * k, self._hi * k, self._window  # in seqs; locals: per example
        for item in items:
            seq, example_id, example, epoch = item
            if not lo <= seq < hi:
                self._load(seq // k)
                lo, hi, window = self._lo * k, self._hi * k, self._window
            digest = window.pop((example_id, epoch) if epoch else example_id, None)
            if digest is None:
                if self.unfound <= 0:
                    yield item
                    continue
                digest = self._lookup(example_id, epoch)
                if digest is None:
                    yield item
                    continue
            self.unfound -= 1
            check.seen += 1  # check.wanted(), inline: most finished examples are not checked
            if check.seen >= check.due and check.take() and digest != text_hash(to_json(example)):
                raise changed(item)

    def _load(self, index: int) -> None:
        """Read the window of positions ``[index, index + WINDOW)``."""
        self._lo, self._hi = index, index + WINDOW
        if index >= self._end or self.unfound <= 0:
            self._window = {}
            return
        where, params = f"{self._where} AND idx >= ? AND idx < ?", (*self._params, index, self._hi)
        with store_errors(self._path):
            first = f"SELECT {_ID}, example_hash FROM rows WHERE {where} AND epoch = 0"
            self._window = dict(self._db.execute(first, params))  # built in C
            if self._epochs > 1:
                later = self._db.execute(
                    f"SELECT {_ID}, epoch, example_hash FROM rows WHERE {where} AND epoch > 0",
                    params,
                )
                self._window.update(((eid, epoch), digest) for eid, epoch, digest in later)

    def _lookup(self, example_id: int | str, epoch: int) -> int | None:
        """The stored hash of a row outside its window, by the row's key."""
        self.lookups += 1
        with store_errors(self._path):
            found = self._db.execute(
                f"SELECT example_hash FROM rows WHERE {self._where} AND example_id = ? "
                "AND epoch = ?",
                (*self._params, id_text(example_id), epoch),
            ).fetchone()
        return None if found is None else int(found[0])


_ID = (
    "CASE WHEN substr(example_id, 1, 1) = '\"' THEN CASE WHEN instr(example_id, '\\') = 0 "
    "THEN substr(example_id, 2, length(example_id) - 2) END "
    "WHEN length(example_id) < 19 THEN CAST(example_id AS INTEGER) END"
)
"""A stored id (its JSON) decoded by SQLite, for the common forms: a str without escapes
(JSON escapes quotes, backslashes and all that is not ASCII), an int of up to 18 characters
(exact as SQLite's 64-bit INTEGER). Any other id reads as NULL, which no example's id equals:
such a row is found by :meth:`DoneRows._lookup`, which compares the stored JSON itself."""
