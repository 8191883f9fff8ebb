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


def _tracker(module: str, targets: list[int], fds: list[int], read_fd: int) -> None:
    """In a forked resource tracker: run ``module``'s ``main`` on ``read_fd``. Never returns.

    It starts as the fork+exec'd trackers do, with SIGINT and SIGTERM blocked until ``main``
    ignores them, and with the descriptors it was sent only (stderr and its pipe): it must not
    hold the server's socket, nor a worker's pipe. Its name (``ps``, ``psutil``'s ``name()``)
    is ``procval-tracker``; it leads no process group, so the server never kills it: it ends
    when every process holding its pipe's other end has closed it, as a tracker does.
    """
    import importlib

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    gc.enable()
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _place_fds(fds, targets)
        _set_name(b"procval-tracker")
        importlib.import_module(module).main(read_fd)
        code = 0
    except SystemExit as exc:  # loky's main exits with its status (1 if a cleanup failed)
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        with contextlib.suppress(BaseException):
            sys.stderr.write(f"procval's resource tracker failed:\n{traceback.format_exc()}")
    finally:
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
        os._exit(code)


def _set_name(name: bytes) -> None:
    """This process's name in ``/proc/PID/comm`` (15 bytes at most), where prctl exists."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(15, name[:15], 0, 0, 0)  # PR_SET_NAME
