"""loky's and multiprocessing's resource trackers, forked from the fork server.

Every loky worker is given two resource trackers by its parent (loky's, and CPython's for the
``shared_memory`` a worker may unpickle). Each one loky starts is a new interpreter (``fork+exec``
of ``python -c "...resource_tracker import main; main(fd)"``): 8 to 13 MB of its own and 30 to
50 ms of CPU, at the moment the first workers start on the same cores. Forked from the server
the first worker forks from, a tracker shares the server's pages instead (about 1 MB of its own)
and costs a fork::

    parent (first worker's launch)                 fork server              tracker
    pipe() -> r, w; keeps w as the tracker's fd
    stderr, r ── socket (SCM_RIGHTS) ───────────▶  fork() ────────────────▶ fds: stderr, r only;
    ◀── pid ── status pipe (closed at once)                                 main(r): what loky's
                                                                            and CPython's run

It is the same tracker, running the same ``main`` on the same pipe: it ends when every process
holding the pipe's write end (the parent, its workers) has closed it, and then cleans up what
was registered and not released, as before. It is not the parent's child, so the parent
records no pid for it (as a tracker inherited from another process); the server reaps it. A
tracker already running (started by other code of the parent) is kept. Where the server cannot
fork one, loky starts it as before. A tracker runs no user code, whichever server (a config's
preloading one, say) it was forked from: it serves every config's workers, as loky's did.
"""

from __future__ import annotations

import os
from multiprocessing import resource_tracker as mp_resource_tracker
from typing import TYPE_CHECKING, Any

from loky.backend import resource_tracker

if TYPE_CHECKING:
    from procval.backends._forkserver import ForkServer

__all__ = ["fork_trackers", "is_open"]

_TRACKERS: tuple[tuple[Any, str], ...] = (
    (resource_tracker._resource_tracker, "loky.backend.resource_tracker"),
    (mp_resource_tracker._resource_tracker, "multiprocessing.resource_tracker"),
)


def fork_trackers(server: ForkServer) -> None:
    """Start each resource tracker not running yet as a fork of ``server``."""
    for tracker, module in _TRACKERS:
        with tracker._lock:
            if tracker._fd is not None:
                continue  # running, or inherited: its ensure_running() checks it
            read_fd, write_fd = os.pipe()
            try:
                fds = [2, read_fd] if is_open(2) else [read_fd]  # stderr, if open, and its pipe
                _, status = server.spawn(fds, read_fd, tracker=module)
            except OSError:  # the server died: loky starts this tracker its own way
                os.close(write_fd)
                return
            finally:
                os.close(read_fd)
            os.close(status)  # the server reaps it; its exit is no worker's
            tracker._fd, tracker._pid = write_fd, None


def is_open(fd: int) -> bool:
    """Whether ``fd`` is an open descriptor of this process."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
