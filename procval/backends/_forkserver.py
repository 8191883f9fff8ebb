"""A fork server for loky workers: a worker starts as a fork, not as a new interpreter.

Starting a worker by ``fork+exec`` costs a whole interpreter start and the imports of loky,
cloudpickle and procval's worker side (0.2 s of CPU here, much more on a loaded machine), for
every worker of every call. Instead, the first call starts one server per parent process, a
fresh interpreter that imports only those modules; each worker is then forked from it::

    parent (evaluate)                    fork server                     worker
    ─────────────────                    ───────────                     ──────
    first worker: fork+exec ───────────▶ fresh interpreter; imports
      python -c ...serve()               procval.worker.runtime, loky and
                                         cloudpickle, nothing else; no
                                         user code, no snapshot, one
                                         thread
    loky's Process.start → _launch:
      stdio, loky's queue and tracker
      fds, a data pipe, a status pipe
      ── socket (SCM_RIGHTS) ──────────▶ fork() ───────────────────────▶ fds at the parent's
      ◀── pid ── status pipe                                             numbers, others closed
      environ, loky's prep data, the
      process object (with the snapshot)
      ── data pipe (never the server) ─────────────────────────────────▶ environ := parent's +
                                                                         config's; loky's
                                                                         bootstrap; initialize()
      ◀── exit status ── status pipe ◀── waitpid()

What the worker gets is what a ``fork+exec`` worker gets: the parent's current environment with
the config's ``env`` on top (set before the snapshot is unpickled and before any module that is
not in the server is imported), the parent's stdio, ``sys.path`` and working directory, and one
snapshot. The server never sees a snapshot (nor ``Config.env``, unless it preloads modules
under it: ``_preload``); they travel on a pipe that only the worker reads. Variables that act
when an interpreter starts or when the server's modules are imported (``PYTHON*``, ``LD_*``,
locale, ``TZ``, ``LOKY_*``, ...) cannot be applied to a fork: a config that sets one starts its
workers by ``fork+exec`` (or from a preloading server started under it), and a parent whose own
values changed gets a new server. Forked workers share the server's string hash seed; ``random`` is
reseeded in each (CPython does so after ``fork``).

Lifetimes: the server exits when the parent process dies or closes its end of the socket (EOF),
or is re-parented (checked twice a second); each worker's ``PR_SET_PDEATHSIG`` and watchdog
(``procval.worker.lifeline.watch_parent``, given the server's pid) end it when the server dies. So a
``kill -9`` of the parent still ends every worker. Each worker leads a process group of its own
(``lifeline.lead_process_group``); when a worker exits, however it exits, the server kills its
group before it reaps it (the pid cannot name another group until then), and at its own exit it
kills the group of every worker still alive: a program's children (``subprocess.Popen("sleep
300")``) never outlive the run, nor keep its stdout open. The server also forks loky's and
CPython's resource trackers (``_trackers``): they lead no group and are never killed; each ends
when the last process holding its pipe has closed it. Linux only; elsewhere workers start by
``fork+exec``. ``PROCVAL_FORK_SERVER=0`` turns it off.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
from typing import Any

from loky.backend import popen_loky_posix, reduction, resource_tracker, spawn
from loky.backend.context import LokyContext
from loky.backend.process import LokyProcess

from procval.backends._forkchild import _child, _tracker
from procval.backends._preimport import import_preload
from procval.backends._trackers import fork_trackers, is_open

#: Modules the server imports: what a loky worker running procval imports before its snapshot.
PRELOAD = ("loky", "loky.process_executor", "procval.worker.runtime")

#: Environment variables read when an interpreter starts or when a preloaded module is imported.
STARTUP_ENV_PREFIXES = (
    "PYTHON",
    "LD_",
    "DYLD_",
    "MALLOC_",
    "GLIBC_",
    "LC_",
    "LANG",
    "TZ",
    "LOKY_",
)

_STATUS = struct.Struct("q")
_READY = b"procval-fork-server-ready"
_FAILED = b"procval-fork-server-failed:"
_MAX_MESSAGE = 64 * 1024
_START_TIMEOUT = 60.0  # seconds for the server to import its modules, on a very loaded machine


class ForkServerError(OSError):
    """The fork server could not be started or did not answer."""


def startup_env(env: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The part of ``env`` that a fork cannot change: see :data:`STARTUP_ENV_PREFIXES`."""
    return {k: v for k, v in env.items() if k.startswith(STARTUP_ENV_PREFIXES)}


# ---------------------------------------------------------------- parent side


class ForkServer:
    """The parent's handle on its fork server process."""

    def __init__(
        self, preload: tuple[str, ...] = (), environ: dict[str, str] | None = None
    ) -> None:
        """Start a server that imports ``preload`` too, under ``environ`` (see ``_preload``)."""
        self.startup = startup_env(os.environ if environ is None else environ)
        self.preload = preload
        self.owner = os.getpid()
        parent_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        path = json.dumps([p or os.getcwd() for p in sys.path])
        # procval is imported from the parent's own package, first on the path for that import
        # only: a folder named "procval" first on the parent's path (next to a task file) must
        # not replace the code the server and its workers run (it would not be the parent's)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = (
            "import gc; gc.disable(); "  # until forks: see serve()
            "import sys, json; path = json.loads(sys.argv[3]); sys.path[:] = [sys.argv[4], *path]; "
            "from procval.backends._forkserver import serve; import procval.worker.runtime; "
            "sys.path[:] = path; serve(int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[5]))"
        )
        argv = [sys.executable, "-c", code, str(server_end.fileno()), str(os.getpid()), path]
        # The server starts with SIGINT blocked (the mask survives exec) and ignores it before
        # unblocking: a Ctrl-C at the terminal, sent to the whole process group, must not print
        # a KeyboardInterrupt traceback from its imports; the parent handles Ctrl-C and kills
        # the workers. (CPython's and loky's resource trackers start the same way.)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self._process = subprocess.Popen(
                [*argv, root, json.dumps(list(preload))],
                pass_fds=[server_end.fileno()],
                stdin=subprocess.DEVNULL,
                env=environ,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            server_end.close()
        self._sock = parent_end
        self._lock = threading.Lock()
        self._dead = False
        self.pid = self._process.pid
        ready, _, _ = select.select([self._sock], [], [], _START_TIMEOUT)
        answer = self._sock.recv(_MAX_MESSAGE) if ready else b""
        if answer != _READY:
            self.stop()
            why = answer.removeprefix(_FAILED).decode(errors="replace") if answer else ""
            raise ForkServerError(why or "the procval fork server did not start")

    def alive(self) -> bool:
        """Whether the server still runs (it never writes after its ready message)."""
        if self._dead or self._process.poll() is not None:
            return False
        try:
            return not select.select([self._sock], [], [], 0)[0]
        except (OSError, ValueError):
            return False

    def spawn(self, fds: list[int], data_fd: int, *, tracker: str = "") -> tuple[int, int]:
        """Fork a worker that gets ``fds`` at the same numbers; return its pid and status fd.

        The status fd is readable once the worker has exited (it then holds the exit status,
        or nothing if the server died first). With ``tracker`` (a module name), the fork is
        not a worker but that module's resource tracker, reading the pipe ``data_fd``
        (``procval.backends._trackers``).
        """
        status_r, status_w = os.pipe()
        try:
            request = {"data": data_fd, "targets": fds, "tracker": tracker}
            header = json.dumps(request).encode()
            with self._lock:
                socket.send_fds(self._sock, [header], [*fds, status_w])
            os.close(status_w)
            status_w = -1
            pid = _read_status(status_r, block=True)
        except BaseException:
            self._dead = True  # the next worker gets a new server
            os.close(status_r)
            raise
        finally:
            if status_w >= 0:
                os.close(status_w)
        if pid is None:
            self._dead = True
            os.close(status_r)
            raise ForkServerError("the procval fork server died")
        return pid, status_r

    def stop(self) -> None:
        """Close the socket: the server exits (and with it any worker still alive)."""
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self._process.wait(timeout=5)


_server: ForkServer | None = None
_server_lock = threading.Lock()
_failed: str | None = None  # why the server could not start: do not try again


def available() -> bool:
    """Whether workers may be forked from a server here (Linux, not turned off)."""
    linux = sys.platform.startswith("linux") and hasattr(socket, "send_fds")
    return linux and os.environ.get("PROCVAL_FORK_SERVER") != "0"


def get_server(env: dict[str, str]) -> ForkServer | None:
    """The fork server for a worker with the config's ``env``, or None to use ``fork+exec``."""
    global _server, _failed
    if not available():
        return None
    with _server_lock:
        current = startup_env(os.environ)
        if any(current.get(k) != env[k] for k in startup_env(env)):
            return None  # this config sets a variable a fork cannot apply
        server = _server
        if server is not None and (not server.alive() or server.startup != current):
            server.stop()
            server = _server = None
        if server is None and _failed is None:
            try:
                server = _server = ForkServer()
            except (OSError, ValueError) as exc:
                _failed = f"{type(exc).__name__}: {exc}"
                return None
        return server


def _forget_in_child() -> None:
    """A fork of the parent (by the user's code) starts its own server when it needs one."""
    global _server
    server, _server = _server, None
    if server is not None:
        with contextlib.suppress(OSError):
            server._sock.close()


os.register_at_fork(after_in_child=_forget_in_child)


def _stop_at_exit() -> None:
    if _server is not None and _server.owner == os.getpid():
        _server.stop()  # EOF: the server exits at once


atexit.register(_stop_at_exit)


class ForkServerContext(LokyContext):
    """loky's context, with processes forked by a :class:`ForkServer`."""

    def __init__(self, server: ForkServer) -> None:
        super().__init__()
        self._server = server
        fork_trackers(server)  # before the executor's first lock would start loky's by fork+exec

    def Process(self, *args: Any, **kwargs: Any) -> ForkServerProcess:  # noqa: N802 - loky's name
        """A process started by the fork server (called by loky as ``context.Process``)."""
        return ForkServerProcess(self._server, *args, **kwargs)


class ForkServerProcess(LokyProcess):
    """A loky process that the fork server starts."""

    def __init__(self, server: ForkServer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._server = server

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_server", None)
        return state

    @staticmethod
    def _Popen(process_obj: Any) -> ForkServerPopen:  # noqa: N802 - multiprocessing's name
        return ForkServerPopen(process_obj)


class ForkServerPopen(popen_loky_posix.Popen):
    """loky's ``Popen``, asking the fork server for the process instead of ``fork+exec``."""

    returncode: int | None
    sentinel: int

    def _launch(self, process_obj: Any) -> None:
        from multiprocessing.context import set_spawning_popen

        tracker_fd = resource_tracker._resource_tracker.getfd()
        buffer = io.BytesIO()
        pickle.dump({**os.environ, **process_obj.env}, buffer)
        set_spawning_popen(self)
        try:
            prep_data = spawn.get_preparation_data(process_obj._name, False)
            reduction.dump(prep_data, buffer)
            reduction.dump(process_obj, buffer)  # registers the queues' fds in self._fds
        finally:
            set_spawning_popen(None)
        child_r, parent_w = os.pipe()
        try:
            stdio = [fd for fd in (0, 1, 2) if is_open(fd)]  # as fork+exec: closed stays closed
            wanted = [*stdio, child_r, tracker_fd, prep_data["mp_tracker_fd"], *self._fds]
            fds = list(dict.fromkeys(wanted))
            self.pid, self.sentinel = process_obj._server.spawn(fds, child_r)
        except BaseException:
            os.close(parent_w)
            raise
        finally:
            os.close(child_r)
        from multiprocessing import util

        util.Finalize(self, os.close, (self.sentinel,))
        with os.fdopen(parent_w, "wb") as f:
            f.write(buffer.getbuffer())

    def poll(self, flag: int = os.WNOHANG) -> int | None:
        """The exit status, read from the server's status pipe (None while running)."""
        if self.returncode is None:
            status = _read_status(self.sentinel, block=flag != os.WNOHANG, closed=-signal.SIGKILL)
            if status is not None:
                self.returncode = status
        return self.returncode

    def kill(self) -> None:
        """SIGKILL the process."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def _read_status(fd: int, *, block: bool, closed: int | None = None) -> int | None:
    """One status word from ``fd``; ``closed`` if the writer closed it first; None if none yet."""
    if not block and not select.select([fd], [], [], 0)[0]:
        return None
    data = b""
    while len(data) < _STATUS.size:
        chunk = os.read(fd, _STATUS.size - len(data))
        if not chunk:
            return closed
        data += chunk
    return int(_STATUS.unpack(data)[0])


# ---------------------------------------------------------------- server side


def serve(fd: int, parent: int, preload: list[str] | None = None) -> None:
    """The server's main loop: fork a worker per request, report each one's exit status.

    The server runs with the cyclic garbage collector off, from its first line (as CPython's
    ``gc.freeze`` documentation advises for a process that forks without exec): its imports
    run without the collections that are 8% of DSPy's import time, they leave no freed holes
    in the pages its workers share, and what they built is frozen before the first fork
    (``import_preload``). Each worker turns the collector back on as it starts (``_child``).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked until now: see start
    sock = socket.socket(fileno=fd)
    for name in PRELOAD:
        __import__(name)
    failure = import_preload(preload or [])
    if failure is not None:
        with contextlib.suppress(OSError):
            sock.send(_FAILED + failure.encode(errors="replace")[: _MAX_MESSAGE // 2])
        os._exit(0)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select() through wake_w
    status: dict[int, int] = {}  # worker pid -> the fd to report its exit status on
    if os.getppid() != parent:
        os._exit(0)
    try:
        sock.send(_READY)
    except OSError:  # the parent is gone already (e.g. interrupted while it waited for us)
        os._exit(0)
    while True:
        ready, _, _ = select.select([sock.fileno(), wake_r], [], [], 0.5)
        if os.getppid() != parent:
            break
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 512):
                    pass
            _reap(status)
        if sock.fileno() in ready:
            try:
                message, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 256)
            except OSError:  # the parent died
                break
            if not message:
                break  # the parent closed its end, or died
            request = json.loads(message)
            *child_fds, status_w = fds
            pid = os.fork()
            if pid == 0:
                if request.get("tracker"):
                    _tracker(request["tracker"], request["targets"], child_fds, request["data"])
                _child(request["targets"], child_fds, request["data"], parent)
            for f in child_fds:
                os.close(f)
            status[pid] = status_w
            with contextlib.suppress(OSError):  # the parent gave up on it (Ctrl-C): it exits
                os.write(status_w, _STATUS.pack(pid))
            _reap(status)
    for pid in status:  # not reaped: each pid still names the worker's group
        _kill_group(pid)
    os._exit(0)  # workers still alive die too: PR_SET_PDEATHSIG, and their watchdog


def _kill_group(pid: int) -> None:
    """SIGKILL the process group a worker leads: its descendants die with it."""
    with contextlib.suppress(OSError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)


def _reap(status: dict[int, int]) -> None:
    while status:
        try:  # peek first: while the worker is not reaped, its pid still names its group
            exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if exited is None:
            return
        _kill_group(exited.si_pid)
        try:
            pid, code = os.waitpid(exited.si_pid, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = status.pop(pid, None)
        if fd is not None:
            returncode = -os.WTERMSIG(code) if os.WIFSIGNALED(code) else os.WEXITSTATUS(code)
            with contextlib.suppress(OSError):
                os.write(fd, _STATUS.pack(returncode))
            os.close(fd)
