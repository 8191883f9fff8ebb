"""The default backend: each worker is a private one-process loky executor.

One executor per process (rather than one per config) keeps failures local: loky fails every
in-flight future of an executor whose process dies, so with one process per executor only that
worker's own shards are affected, and a timeout kills exactly the process that ran the example.
On Linux, processes are forked from a fork server (``_forkserver.py``): a clean interpreter,
started once per parent process, that has imported only procval's worker side, loky and
cloudpickle, so a worker starts in milliseconds instead of a new interpreter's tenths of a second.
Elsewhere, and for a config whose ``env`` must act when an interpreter starts, loky's
``fork+exec`` spawn starts a fresh interpreter. Either way a worker holds nothing of the parent's
state but the snapshot it installs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import BrokenExecutor, Future
from concurrent.futures.process import BrokenProcessPool
from itertools import count
from multiprocessing import resource_tracker as mp_resource_tracker
from typing import Any

import loky
from loky import ProcessPoolExecutor
from loky.backend import resource_tracker
from loky.backend.context import get_context
from loky.process_executor import ShutdownExecutorError

from procval.backends import WorkerSpec, _forkserver, _preload
from procval.worker import runtime as _worker
from procval.worker.slots import SlotTable

_EXIT_CODES = re.compile(r"exit codes of the workers are \{([^}]*)\}")
_PROCVAL = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the parent's procval
_TICKS = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0


class LokyWorker:
    """A worker process behind a private ``loky.ProcessPoolExecutor(max_workers=1)``."""

    def __init__(
        self,
        spec: WorkerSpec,
        slots_path: str,
        *,
        fork_server: bool = True,
        preload: tuple[str, ...] = (),
    ) -> None:
        self._slots = SlotTable(slots_path, max(1, spec.options.threads), create=True)
        server = _preload.server_for(dict(spec.env), preload) if fork_server else None
        # a local worker must import the parent's procval, and leads a process group of its
        # own: its descendants die with it (killed with its group by the server, or by kill())
        options = dataclasses.replace(spec.options, procval_path=_PROCVAL, session=True)
        if server is not None and options.parent_pid:
            # the worker's parent is the server, which dies with this process: the worker's
            # watchdog and PR_SET_PDEATHSIG watch the server
            options = dataclasses.replace(options, parent_pid=server.pid)
        context = get_context("loky") if server is None else _forkserver.ForkServerContext(server)
        self._executor = ProcessPoolExecutor(
            max_workers=1,
            context=context,
            initializer=_worker.initialize,
            initargs=(spec.snapshot.data, options, slots_path),
            env=dict(spec.env) or None,
        )
        self._forked = server is not None
        # fork+exec: the first submit starts the process, with SIGINT blocked (see submit)
        self._mask_start = not self._forked and hasattr(signal, "pthread_sigmask")
        self._guarded = False  # the result pipe's writer closes once (see submit)
        self._path = slots_path
        self._pid = 0
        self._cpu = -1.0  # the process's CPU seconds at the last silent_for(), and when
        self._progress = time.monotonic()  # it last grew (or the worker was created)

    @property
    def pid(self) -> int:
        """The process id, once the worker has installed its snapshot (else 0)."""
        if self._pid == 0 and not self._slots.closed:
            self._pid = self._slots.pid() or next(iter(self._processes()), 0)
        return self._pid

    def _processes(self) -> dict[int, object]:
        # loky keeps its processes by pid; used only for a worker killed while still starting
        return dict(getattr(self._executor, "_processes", None) or {})

    @property
    def label(self) -> str:
        """``pid N`` once the worker has started."""
        return f"pid {self.pid}" if self.pid else "a starting worker"

    def crash_log(self) -> str:
        """The fault handler's output (the native traceback of a segfault, say)."""
        try:
            with open(self._path + ".fault", encoding="utf-8", errors="replace") as f:
                return f.read(64_000)
        except OSError:
            return ""

    def submit(self, shard: bytes) -> Future[bytes]:
        """Queue a shard on this worker's process."""
        try:
            future = self._submit(shard)
        except (BrokenExecutor, ShutdownExecutorError) as exc:
            # the process died (or its executor was shut down) before the scheduler heard of
            # it: this shard's future fails as those in flight do, so the death is handled in
            # one place (``death()``, the scheduler's recovery) and loky's error never escapes
            return _failed(exc)
        except OSError as exc:
            if not self._forked:
                raise
            # the fork server died (killed) before it forked this worker: report a worker that
            # died at start, so the scheduler starts another one (from a new server)
            return _failed(BrokenProcessPool(f"the fork server could not start it: {exc}"))
        if not self._guarded:  # the process has started, with its copy of the result pipe
            self._guarded = True
            _serialize_result_writer_closes(self._executor)
        return future

    def _submit(self, shard: bytes) -> Future[bytes]:
        if not self._mask_start:
            return self._executor.submit(_worker.run_shard, shard)
        # the first submit starts the process (fork+exec): it starts with SIGINT blocked, so
        # a terminal's Ctrl-C (sent to the whole process group) cannot interrupt its imports
        # with a traceback; the worker's initializer ignores SIGINT, then unblocks it. The
        # resource trackers start first: CPython's unblocks SIGINT after starting its own.
        self._mask_start = False  # later submits start nothing (and probe no tracker)
        mp_resource_tracker.ensure_running()
        resource_tracker.ensure_running()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return self._executor.submit(_worker.run_shard, shard)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def running(self) -> list[tuple[int, float]]:
        """Examples running now, read from the shared slot table."""
        return self._slots.running()

    def silent_for(self) -> float:
        """Seconds the worker has shown no sign of life: no heartbeat, and no CPU time used.

        The heartbeat thread stops when the process is stopped (SIGSTOP) or frozen in the
        kernel, but also while C code holds the GIL (a long regex): a process whose CPU time
        grows is busy, not frozen, so either sign counts. Where the CPU time cannot be read
        (no ``/proc``), a worker with an example running is never called silent: ``timeout=``
        is what bounds a busy example.
        """
        now = time.monotonic()
        cpu = _cpu_seconds(self.pid)
        if cpu is None:
            if self._slots.closed or self._slots.running():
                return 0.0
        elif cpu != self._cpu:
            self._cpu, self._progress = cpu, now
        beat = 0.0 if self._slots.closed else self._slots.last_beat()
        return max(0.0, now - max(beat, self._progress))

    def death(self, exc: BaseException) -> str | None:
        """How the process died, from loky's TerminatedWorkerError/BrokenProcessPool."""
        name = type(exc).__name__
        if name not in {"TerminatedWorkerError", "BrokenProcessPool", "ShutdownExecutorError"}:
            return None
        match = _EXIT_CODES.search(str(exc))
        if match:
            return f"the worker process died with exit code {match.group(1).strip()}"
        return f"the worker process died ({name})"

    def kill(self) -> None:
        """SIGKILL the process and its process group, then drop the executor without waiting.

        The group holds the worker's descendants (the worker leads it). A forked worker's
        group is killed by the fork server when the worker exits, however it exits (and when
        the server itself ends, after the parent's ``kill -9``); a ``fork+exec`` worker's group
        is killed here, so the descendants of one that exits by itself survive it.
        """
        pid = self.pid
        self._close_result_writer()  # before the kill: loky's thread is not closing it yet
        if pid:
            if not self._forked:  # (the fork server kills a forked worker's group)
                kill_group(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._executor.shutdown(wait=False, kill_workers=True)
        self._slots.close()

    def _close_result_writer(self) -> None:
        """Close the parent's copy of the result pipe's write end, unless loky is closing it.

        A worker killed while it wrote a result leaves half a message in the result pipe, and
        loky's manager thread waits in recv() for the rest forever; the interpreter joins that
        thread at exit, so the process would never exit. The parent never writes to that pipe:
        closing its copy of the write end leaves the dead worker's as the last one (the fork
        server keeps none), so the read ends with EOF and loky marks the executor broken.

        Done before the kill, under loky's shutdown lock, and only while the executor is not
        broken: a broken executor's thread is closing the queue itself, and two threads closing
        one connection at once gave that thread an ``OSError: Bad file descriptor``, printed on
        the user's stderr. (A shutting-down one still gets it closed: its thread may be the one
        stuck in recv().) loky's thread closes the queue of a shutting-down executor without
        that lock, so the writer is also wrapped to close once whoever closes it
        (:class:`_SerialClose`): two ``os.close`` of one descriptor could otherwise close a file
        another thread had opened in between (the store's, say).
        """
        flags = getattr(self._executor, "_flags", None)
        queue = getattr(self._executor, "_result_queue", None)
        writer = getattr(queue, "_writer", None)
        if flags is None or writer is None:
            return
        with flags.shutdown_lock:
            if flags.broken is None:
                with contextlib.suppress(OSError):
                    writer.close()

    def close(self) -> None:
        """Let the process exit once its queued shards are done, without waiting for it."""
        _ = self.pid  # remember it before loky forgets its processes
        self._executor.shutdown(wait=False)

    def release(self) -> None:
        """Unmap the slot table (after the process is gone)."""
        self._slots.close()

    def alive(self) -> bool:
        """Whether the process still runs (a zombie awaiting its reaper counts as gone)."""
        pid = self.pid
        if not pid:
            return False
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            pass
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True


class LokyBackend:
    """Local worker processes through loky."""

    def __init__(
        self,
        *,
        grace: float = 2.0,
        fork_server: bool = True,
        preload: Sequence[str] | str | None = None,
    ) -> None:
        """Set up a backend.

        Args:
            grace: seconds closed workers get to exit before they are killed.
            fork_server: fork workers from the fork server where possible (Linux); False
                starts each worker as a new interpreter (loky's ``fork+exec``).
            preload: modules the fork server imports before it forks workers, so that they
                start with them imported and share their memory (e.g. ``["dspy"]``);
                ``"auto"``: the third-party packages the snapshot refers to; None: the
                ``PROCVAL_PRELOAD`` variable (comma-separated, or ``auto``), else DSPy for
                the configs of ``procval.dspy.snapshot()`` and nothing for the others.
                Preloading is per environment: a config whose ``env`` differs gets a server
                of its own, started under that ``env`` (:mod:`procval.backends._preload`).

        Raises:
            ValueError: ``preload`` names a module that cannot be found.
        """
        self._preload = _preload.resolve(preload)
        self._default = preload is None and not self._preload  # an integration's preload
        self._auto: dict[str, tuple[str, ...]] = {}  # the packages, by fingerprint
        self._dir = tempfile.mkdtemp(prefix="procval-")
        self._ids = count()
        self._workers: list[LokyWorker] = []
        self._grace = grace
        self._fork_server = fork_server

    def default_workers(self) -> int:
        """Workers when ``evaluate(workers=None)``: the CPUs this process may use."""
        return int(loky.cpu_count())

    def prestart(self, specs: Sequence[WorkerSpec]) -> None:
        """Start the fork servers that ``specs``' workers fork from, in the background.

        The scheduler calls it before a resumed run reads past its stored rows: the server's
        interpreter starts and imports meanwhile, and the first worker forks from a ready
        server. Nothing starts where workers start by ``fork+exec``.
        """
        if not self._fork_server:
            return
        for spec in specs:
            _preload.start_in_background(dict(spec.env), self._preload_of(spec))

    def start_worker(self, spec: WorkerSpec) -> LokyWorker:
        """Start one worker process for ``spec.snapshot``."""
        path = os.path.join(self._dir, f"worker-{next(self._ids)}.slots")
        preload = self._preload_of(spec)
        worker = LokyWorker(spec, path, fork_server=self._fork_server, preload=preload)
        self._workers.append(worker)
        return worker

    def _preload_of(self, spec: WorkerSpec) -> tuple[str, ...]:
        """The modules the fork server of ``spec``'s workers preloads."""
        preload = self._preload
        if isinstance(preload, str) or self._default:  # "auto", or by default
            key = spec.snapshot.fingerprint
            if key not in self._auto:
                find = (
                    _preload.integration_preload if self._default else _preload.referenced_packages
                )
                self._auto[key] = find(spec.snapshot.data)
            preload = self._auto[key]
        return preload

    def shutdown(self) -> None:
        """Let closed workers exit in the background; kill what remains after the grace period.

        The caller does not wait for its workers' interpreters to wind down (a tenth of a second
        or more per run): a reaper thread gives them ``grace`` seconds, kills what remains and
        removes the slot files. Workers killed earlier (Ctrl-C, timeouts) already got SIGKILL.
        """
        workers, self._workers = self._workers, []
        reaper = threading.Thread(
            target=_reap, args=(workers, self._dir, self._grace), name="procval-reaper"
        )
        reaper.start()  # not a daemon: the interpreter waits for it (at most `grace`) at exit


class _SerialClose:
    """A connection whose ``close()`` runs once, however many threads call it at once.

    ``multiprocessing``'s ``Connection.close()`` checks its handle, closes it (releasing the
    GIL) and only then forgets it: two threads can both close the descriptor. Everything else
    is the wrapped connection's.
    """

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the connection (once)."""
        with self._lock:
            self._connection.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


def _serialize_result_writer_closes(executor: ProcessPoolExecutor) -> None:
    """Wrap the parent's copy of the result pipe's writer in :class:`_SerialClose`.

    Only once the worker has started: the process got its own copy of the writer when loky
    pickled the queue for it, and the executor (one process, never replaced) pickles it no more.
    """
    queue = getattr(executor, "_result_queue", None)
    writer = getattr(queue, "_writer", None)
    if writer is not None and not isinstance(writer, _SerialClose):
        queue._writer = _SerialClose(writer)  # type: ignore[union-attr]


def _failed(exc: BaseException) -> Future[bytes]:
    """A future that has already failed with ``exc``."""
    future: Future[bytes] = Future()
    future.set_exception(exc)
    return future


def kill_group(pid: int) -> None:
    """SIGKILL the process group that worker ``pid`` leads, if it leads one.

    Only while the worker itself is not yet reaped, so that its pid cannot name another group.
    """
    with contextlib.suppress(OSError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)


def _cpu_seconds(pid: int) -> float | None:
    """The user + system CPU seconds process ``pid`` used so far (Linux), else None."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _reap(workers: list[LokyWorker], directory: str, grace: float) -> None:
    deadline = time.monotonic() + grace
    while any(w.alive() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    for worker in workers:
        if worker.alive():
            worker.kill()
        worker.release()
    shutil.rmtree(directory, ignore_errors=True)
