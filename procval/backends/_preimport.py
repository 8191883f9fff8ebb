"""What a preloading fork server imports before it forks workers (see ``_preload``).

Kept apart from ``_preload``, which starts servers, so that the server (``_forkserver``) can
import it without importing the code that starts it.
"""

from __future__ import annotations

import threading

__all__ = ["import_preload"]


def import_preload(names: list[str]) -> str | None:
    """In the server: import ``names``; None, or why workers cannot be forked from them.

    Forking is safe only from a single thread: a module that starts a thread at import would
    leave its locks held in every fork. Once imported, everything is moved to the collector's
    permanent generation (``gc.freeze``), so that collections in the workers do not write to
    the shared pages and copy them.
    """
    import gc

    for name in names:
        try:
            __import__(name)
        except BaseException as exc:
            return f"importing {name!r} failed: {type(exc).__name__}: {exc}"
    if threading.active_count() > 1:
        started = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())
        return f"importing {names} started threads {started}; a fork of them is not safe"
    gc.freeze()
    return None
