"""The caller's heap during a run: what was alive before it is left out of the garbage collector.

The parent of a run allocates as results arrive (rows, the DSPy relay's replayed events and LM
history entries), and each time enough of that survives, CPython's collector walks the whole
heap, which in a DSPy process is mostly the modules imported before the run (hundreds of
thousands of objects). :func:`frozen_heap` moves what is alive when the run starts to the
permanent generation (``gc.freeze()``) and back when it ends (``gc.unfreeze()``): the collector
still runs during the run, on what the run allocates. A garbage cycle made before the run is
collected after it instead. When the caller froze objects of its own, nothing is done (its
``gc.unfreeze()`` is its own to call).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["frozen_heap"]


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Leave the objects alive now out of the collector's passes until the block ends."""
    if gc.get_freeze_count() or not gc.isenabled():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
