"""What ties a worker's life to its parent's: Ctrl-C, the parent's death, a fatal signal.

- Ctrl-C is the parent's to handle: the worker ignores SIGINT (:func:`ignore_interrupts`).
- A worker never outlives its parent, even after the parent's ``kill -9``: ``PR_SET_PDEATHSIG``
  on Linux and a watchdog thread everywhere (:func:`watch_parent`). Under the fork server the
  "parent" is the server, whose own death follows the parent's.
- A fatal signal (a segfault in a C extension) leaves the fault handler's tracebacks of every
  thread in a file next to the slot table (:func:`record_faults`), which the parent reads when
  it reports the crash.
- The parent can see that the worker is alive: a heartbeat thread writes the time into the slot
  table (:func:`beat`); it stops when the process is stopped (SIGSTOP) or frozen in the kernel.
- The worker's descendants die with it: the worker leads a session (and process group) of its
  own (:func:`lead_process_group`), which whoever kills or reaps the worker kills as a whole
  (the fork server, or the parent; see ``procval.backends._forkserver``). A child that starts a
  session of its own (a daemon) leaves the group and is not killed.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from procval.worker.slots import SlotTable

_fault_file: Any = None  # open for the process's life: the fault handler writes to it


def ignore_interrupts() -> None:
    """Ignore SIGINT in this process (and unblock it, as the backends block it while starting)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # (not on Windows)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def record_faults(path: str) -> None:
    """Send the fault handler's report of a fatal signal to a file the parent reads.

    Args:
        path: the file to write (created or truncated); if it cannot be opened, nothing is
            recorded and the worker runs on.
    """
    global _fault_file
    try:
        _fault_file = open(path, "w")  # noqa: SIM115 - must stay open for the process's life
    except OSError:
        return
    faulthandler.enable(file=_fault_file, all_threads=True)


def watch_parent(parent_pid: int) -> None:
    """End this process as soon as its parent is gone (even after the parent's ``kill -9``).

    Args:
        parent_pid: the process whose death ends this one; 0 to watch nothing.
    """
    if not parent_pid:
        return
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="procval-watchdog", daemon=True).start()


def beat(slots: SlotTable, every: float) -> None:
    """Write a heartbeat into ``slots`` now and every ``every`` seconds, from a daemon thread.

    The thread needs the GIL: C code that holds it for long (a long regex) delays the beat as
    much as a stopped process does; the parent tells them apart by the CPU time the process
    uses (``procval.backends.loky.LokyWorker.silent_for``).
    """
    slots.beat()

    def run() -> None:
        while True:
            time.sleep(every)
            slots.beat()

    threading.Thread(target=run, name="procval-heartbeat", daemon=True).start()


def lead_process_group() -> None:
    """Start a new session, so that this process's children share its process group.

    Killing the group (``os.killpg(worker_pid, SIGKILL)``) then ends the worker's descendants
    with it; without a terminal of its own, the session is also out of the terminal's job
    control (a Ctrl-C at the terminal reaches the parent only, which kills the workers). A
    process that already leads a group (a worker started by hand) keeps it.
    """
    if hasattr(os, "setsid"):
        with contextlib.suppress(OSError):
            os.setsid()
