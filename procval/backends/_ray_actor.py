"""What runs on a Ray node for the Ray backend: the actor, and small tasks that read its files.

The actor keeps three files in its node's temp dir, named after the run and a counter
(``procval-ray-<run>-<n>.slots``, ``.fault``, ``.exit``): the slot table (which examples run
since when), the fault handler's log and the status given to ``os._exit``. Another process on
the node reads them when the actor cannot answer (C code holding its GIL) or has died.

Files outlive an actor that is killed (``ray.kill``, a driver's ``kill -9``, a lost node). Each
new actor therefore sweeps its node's temp dir at start: a slot table whose worker process is
gone (the pid in its header) is removed with its companions.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import tempfile
import time
from dataclasses import dataclass
from typing import NoReturn

import ray

from procval.wire import WorkerOptions
from procval.worker import runtime as _worker
from procval.worker.slots import SlotTable

PREFIX = "procval-ray-"
_SUFFIXES = ("", ".fault", ".exit")
_UNSTARTED_AGE = 3600.0  # seconds before a slot table no process ever claimed counts as stale


class ProcvalWorker:
    """The actor: installs one snapshot in its own process and runs shards for it.

    Its process title is ``ray::ProcvalWorker`` (handy in ``ps`` and Ray's dashboard).
    """

    def __init__(self, snapshot: bytes, options: WorkerOptions, name: str) -> None:
        mark_placed(name)  # placed: a slow Config.setup is not a placement failure
        remove_stale()
        self._path = os.path.join(tempfile.gettempdir(), name)
        self._slots = SlotTable(self._path, max(1, options.threads), create=True)
        self._slots.mark_ready(os.getpid())  # claimed: a later sweep checks this pid
        self._shard = -1
        self._node_id = ray.get_runtime_context().get_node_id()
        atexit.register(_remove_files, self._path)  # an orderly exit (Ray ends the job)
        _record_exit_status(self._path + ".exit")
        _worker.initialize(snapshot, options, self._path)
        if _worker._state is not None:  # rows name the Ray node, not the host it shares
            _worker._state.node = self._node_id

    @ray.method(concurrency_group="poll")
    def describe(self) -> tuple[int, str, str, str]:
        """``(pid, hostname, Ray node id, slot file path)`` of this actor."""
        import socket

        return os.getpid(), socket.gethostname(), self._node_id, self._path

    @ray.method(concurrency_group="poll")
    def running(self) -> tuple[int, list[tuple[int, float]]]:
        """The shard running now and ``(seq, seconds)`` of each of its examples running now."""
        return self._shard, self._slots.running()

    def run_shard(self, index: int, shard: bytes) -> bytes:
        """Run shard number ``index`` (the driver's numbering) and return its pickled results."""
        self._shard = index
        return _worker.run_shard(shard)

    def close(self) -> None:
        """Remove this actor's files and end its process (queued after its last shard)."""
        self._slots.close()
        _remove_files(self._path)
        ray.actor.exit_actor()


def _record_exit_status(path: str) -> None:
    """Make ``os._exit`` write its status to ``path`` first: Ray does not report exit codes."""
    real_exit = os._exit

    def recording_exit(status: int) -> NoReturn:
        with contextlib.suppress(Exception):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, str(int(status)).encode())
            os.close(fd)
        real_exit(status)

    os._exit = recording_exit


def _remove_files(path: str) -> None:
    for suffix in _SUFFIXES:
        with contextlib.suppress(OSError):
            os.remove(path + suffix)


@dataclass(frozen=True)
class Remains:
    """What an actor's files on its node say (read there by a small task, from another process)."""

    found: bool
    running: list[tuple[int, float]]
    fault: str = ""
    exit_status: int | None = None


def read_files(path: str, slots: int, *, final: bool) -> Remains:
    """Read an actor's slot table, from another process on the actor's node.

    With ``final`` (the actor died), also read its fault log and exit status, then remove its
    files. A bare file name is looked up in this node's temp dir.
    """
    path = os.path.join(tempfile.gettempdir(), path)  # a no-op for an absolute path
    if not os.path.exists(path):
        return Remains(found=False, running=[])
    running: list[tuple[int, float]] = []
    with contextlib.suppress(OSError, ValueError):
        table = SlotTable(path, slots)
        running = table.running()
        table.close()
    if not final:
        return Remains(found=True, running=running)
    fault, exit_status = "", None
    with contextlib.suppress(OSError), open(path + ".fault", errors="replace") as f:
        fault = f.read(64_000)
    with contextlib.suppress(OSError, ValueError), open(path + ".exit") as f:
        exit_status = int(f.read().strip())
    _remove_files(path)
    return Remains(found=True, running=running, fault=fault, exit_status=exit_status)


def remove_leftovers(pattern: str) -> int:
    """Remove the files of killed actors matching ``pattern`` in this node's temp dir."""
    paths = glob.glob(os.path.join(tempfile.gettempdir(), pattern))
    for path in paths:
        with contextlib.suppress(OSError):
            os.remove(path)
    return len(paths) + remove_stale()


def remove_stale() -> int:
    """Remove the files of actors whose process is gone, from any run; return how many tables.

    A slot table holds its actor's pid from the actor's first moment; one without a pid (its
    actor died while creating it) is removed once it is an hour old.
    """
    removed = 0
    for path in glob.glob(os.path.join(tempfile.gettempdir(), PREFIX + "*.slots")):
        try:
            with open(path, "rb") as f:
                pid = int.from_bytes(f.read(8), "little", signed=True)
            stale = _gone(pid) if pid > 0 else time.time() - os.path.getmtime(path) > _UNSTARTED_AGE
        except (OSError, ValueError):
            continue
        if stale:
            _remove_files(path)
            removed += 1
    return removed


# Ray's internal key-value store (GCS), ``ray.experimental.internal_kv``: the one way found for
# an actor to say "I was placed" before its constructor returns (the state API needs the
# dashboard). Tested on Ray 2.60; tests/test_backend_ray.py fails loudly if it stops working.
_KV_NAMESPACE = "procval"


def mark_placed(name: str) -> None:
    """Record that the actor whose files are called ``name`` was placed and is starting."""
    from ray.experimental import internal_kv

    with contextlib.suppress(Exception):
        internal_kv._internal_kv_put(name, b"1", namespace=_KV_NAMESPACE)


def was_placed(name: str) -> bool:
    """Whether :func:`mark_placed` ran for ``name`` (in the driver: a call to the GCS)."""
    from ray.experimental import internal_kv

    try:
        return bool(internal_kv._internal_kv_exists(name, namespace=_KV_NAMESPACE))
    except Exception:
        return False


def forget_placed(prefix: str) -> None:
    """Remove the run's placement marks."""
    from ray.experimental import internal_kv

    with contextlib.suppress(Exception):
        internal_kv._internal_kv_del(prefix, del_by_prefix=True, namespace=_KV_NAMESPACE)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False
