"""What a preloading fork server imports before it forks workers (see ``_preload``).

Kept apart from ``_preload``, which starts servers, so that the server (``_forkserver``) can
import it without importing the code that starts it.
"""

from __future__ import annotations

import sys
import threading

__all__ = ["NOT_PRELOADED", "import_preload"]

#: Optional modules a preload imports only to show things in a notebook, which a worker never
#: does: DSPy imports ``IPython.display`` (0.7 s, a third of DSPy's import) for its tables, and
#: falls back to ``print`` without it. The server imports the preload without them; a worker
#: that imports one itself gets it as usual.
NOT_PRELOADED = ("IPython",)


def import_preload(names: list[str]) -> str | None:
    """In the server: import ``names``; None, or why workers cannot be forked from them.

    Forking is safe only from a single thread: a module that starts a thread at import would
    leave its locks held in every fork. Once imported, everything is moved to the collector's
    permanent generation (``gc.freeze``), so that collections in the workers do not write to
    the shared pages and copy them. :data:`NOT_PRELOADED` modules read as missing meanwhile.
    """
    import gc

    hidden = [name for name in NOT_PRELOADED if name not in sys.modules and name not in names]
    for name in hidden:  # None: "import IPython" raises ImportError
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        for name in names:
            try:
                __import__(name)
            except BaseException as exc:
                return f"importing {name!r} failed: {type(exc).__name__}: {exc}"
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    if threading.active_count() > 1:
        started = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())
        return f"importing {names} started threads {started}; a fork of them is not safe"
    gc.freeze()
    return None
