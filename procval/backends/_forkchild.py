"""The forked side of the fork server: what a new worker does between its fork and loky.

It places the descriptors sent to it, checks that the parent has not abandoned it, and
bootstraps loky's worker from the data on its pipe.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import pickle
import signal
import sys
import time
import traceback
from typing import Any

from loky.backend import spawn


def _child(targets: list[int], fds: list[int], data_fd: int, parent: int) -> None:
    """In the forked worker: become what loky's ``fork+exec`` would have started. Never returns."""
    gc.enable()  # off in the server (see serve); its objects are frozen, not collected here
    code = 1
    server = os.getppid()
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # SIGINT stays ignored, as the worker's initializer wants it: Ctrl-C is the parent's
        _place_fds(fds, targets)
        code = _bootstrap(data_fd)
    except BaseException:
        if not _abandoned(server, parent):
            with contextlib.suppress(BaseException):
                sys.stderr.write(f"procval worker failed to start:\n{traceback.format_exc()}")
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _abandoned(server: int, parent: int, *, within: float = 2.0) -> bool:
    """Whether the run this worker was starting for is ending (its parent exits, say on Ctrl-C).

    A parent that exits while a worker unpickles what it sent (its queues' semaphores already
    unlinked) makes the start fail; that is no error to report. The parent's exit closes the
    server's socket, so the server exits too: wait a moment for either to go.
    """
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if os.getppid() != server:
            return True
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def _place_fds(fds: list[int], targets: list[int]) -> None:
    """Give the worker the parent's fds at the parent's numbers, and close every other fd."""
    import fcntl

    low = max([*fds, *targets]) + 1
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, low) for fd in fds]
    for fd in fds:
        os.close(fd)
    for fd, target in zip(high, targets, strict=True):
        os.dup2(fd, target)
    start = 0
    for fd in sorted({*targets, os.sysconf("SC_OPEN_MAX")}):
        if start < fd:  # (os.closerange(0, 0) closes every fd: close_range(0, -1))
            os.closerange(start, fd)
        start = fd + 1


def _bootstrap(data_fd: int) -> int:
    """What ``python -m loky.backend.popen_loky_posix`` does, after the environment is set."""
    from multiprocessing import process

    with os.fdopen(data_fd, "rb") as source:
        try:
            env = pickle.load(source)
        except EOFError:  # the parent gave up on this worker before sending anything (Ctrl-C)
            return 1
        os.environ.clear()
        os.environ.update(env)
        current: Any = process.current_process()
        current._inheriting = True
        try:
            prep_data = pickle.load(source)
            spawn.prepare(prep_data)
            process_obj = pickle.load(source)
        finally:
            del current._inheriting
    code = int(process_obj._bootstrap())
    atexit._run_exitfuncs()  # as an interpreter exit would; os._exit follows
    return code
