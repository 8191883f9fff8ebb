"""SQLite's errors as :class:`procval.StoreError`: every store entry point goes through here.

No ``sqlite3`` exception reaches a user. Each public function of the store package (the readers,
:class:`~procval.store.writer.StoreSink`'s methods, :func:`~procval.store.schema.connect`) runs
its SQLite calls inside :func:`store_errors`, which turns an error into the StoreError that names
the file and the fix, by SQLite's primary result code:

==================  ======================================================================
SQLITE_FULL         :class:`procval.StoreFullError`: free space, run again to resume
SQLITE_CORRUPT      :class:`procval.StoreCorruptError`: salvage the rows with ``procval repair``
SQLITE_NOTADB       the same (a store whose header is damaged; ``connect`` says "not a store"
                    for a file that was never one)
SQLITE_BUSY/LOCKED  another process held SQLite's lock for the whole busy timeout
SQLITE_READONLY     the file or its folder is not writable
others              "cannot read/write the run store PATH: <SQLite's message>"
==================  ======================================================================

An I/O error on a file system with no space left is a full disk too (SQLite reports some write
failures caused by ``ENOSPC`` as ``SQLITE_IOERR``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import shutil
import sqlite3
from collections.abc import Iterator

from procval.errors import StoreCorruptError, StoreError, StoreFullError

# SQLite's primary result codes (https://sqlite.org/rescode.html)
SQLITE_PERM = 3
SQLITE_BUSY = 5
SQLITE_LOCKED = 6
SQLITE_READONLY = 8
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_CANTOPEN = 14
SQLITE_NOTADB = 26


@contextlib.contextmanager
def store_errors(path: str, doing: str = "read") -> Iterator[None]:
    """Run the body, turning any ``sqlite3.Error`` (or ``ENOSPC``) into a StoreError.

    Args:
        path: the run store, for the message.
        doing: ``"read"`` or ``"write"``: what the body does, for the message.

    Raises:
        StoreError: what the body raised, translated (see the module's doc).
    """
    try:
        yield
    except sqlite3.Error as exc:
        raise translate(exc, path, doing) from exc
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise full(path, exc.strerror or str(exc)) from exc


def primary_code(exc: sqlite3.Error) -> int | None:
    """SQLite's primary result code of ``exc`` (None if the exception carries none)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def translate(exc: sqlite3.Error, path: str, doing: str = "read") -> StoreError:
    """The StoreError for ``exc``, raised while doing ``doing`` to the store at ``path``."""
    code = primary_code(exc)
    text = str(exc) or type(exc).__name__
    if code == SQLITE_FULL or (code == SQLITE_IOERR and _no_space_left(path)):
        return full(path, text)
    if code in (SQLITE_CORRUPT, SQLITE_NOTADB) or "malformed" in text:
        return corrupt(path, text)
    if code in (SQLITE_BUSY, SQLITE_LOCKED):
        return StoreError(
            f"the run store {path} stayed locked by another process for longer than the busy "
            f"timeout ({text}); a program that holds it open in a transaction (an sqlite3 "
            "shell?) must let go. Try again once it did"
        )
    if code in (SQLITE_READONLY, SQLITE_PERM, SQLITE_CANTOPEN):
        return StoreError(
            f"cannot {doing} the run store {path} ({text}); check that the file and its "
            "directory are writable by this user and the file system is not mounted read-only, "
            "or copy the store to a writable place"
        )
    return StoreError(f"cannot {doing} the run store {path}: {text}")


def full(path: str, text: str) -> StoreFullError:
    """The error for a store whose disk (or file system) is full."""
    folder = os.path.dirname(os.path.abspath(path))
    return StoreFullError(
        f"the disk is full: cannot write the run store {path} ({text}); the rows stored so far "
        f"are safe. Free some space on the file system of {folder}, then run again with the "
        "same store to resume",
        path=path,
    )


def corrupt(path: str, text: str) -> StoreCorruptError:
    """The error for a store whose file is damaged."""
    stem, _ = os.path.splitext(path)
    fixed = f"{stem}-repaired.db"
    return StoreCorruptError(
        f"the run store {path} is damaged ({text}); procval cannot use it. Copy its readable "
        f"rows into a new store with: procval repair {shlex.quote(path)} {shlex.quote(fixed)}, "
        f"then use {fixed} (a run on it resumes: lost rows run again)",
        path=path,
    )


def _no_space_left(path: str) -> bool:
    try:
        usage = shutil.disk_usage(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return False
    return usage.free < 64 * 1024  # less than a few pages: SQLite's write failed for space
