"""The default backend: each worker is a private one-process loky executor.

One executor per process (rather than one per config) keeps failures local: loky fails every
in-flight future of an executor whose process dies, so with one process per executor only that
worker's own shards are affected, and a timeout kills exactly the process that ran the example.
Processes are started by loky's ``fork+exec`` spawn: a fresh interpreter that holds nothing of the
parent's state but the snapshot it installs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
from concurrent.futures import Future
from itertools import count

from loky import ProcessPoolExecutor
from loky.backend.context import get_context

from procval import _worker
from procval._slots import SlotTable
from procval.backends._base import WorkerSpec

_EXIT_CODES = re.compile(r"exit codes of the workers are \{([^}]*)\}")


class LokyWorker:
    """A worker process behind a private ``loky.ProcessPoolExecutor(max_workers=1)``."""

    def __init__(self, spec: WorkerSpec, slots_path: str) -> None:
        self._slots = SlotTable(slots_path, max(1, spec.options.threads), create=True)
        self._executor = ProcessPoolExecutor(
            max_workers=1,
            context=get_context("loky"),
            initializer=_worker.initialize,
            initargs=(spec.snapshot.data, spec.payload, spec.options, slots_path),
            env=dict(spec.env) or None,
        )
        self._path = slots_path

    @property
    def label(self) -> str:
        """``pid N`` once the worker has started."""
        pid = self._slots.pid()
        return f"pid {pid}" if pid else "a starting worker"

    def submit(self, shard: bytes) -> Future[bytes]:
        """Queue a shard on this worker's process."""
        return self._executor.submit(_worker.run_shard, shard)

    def running(self) -> list[tuple[int, float]]:
        """Examples running now, read from the shared slot table."""
        return self._slots.running()

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
        """SIGKILL the process, then drop the executor without waiting."""
        pid = self._slots.pid()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._executor.shutdown(wait=False, kill_workers=True)
        self._slots.close()

    def close(self) -> None:
        """Let the process exit once its queued shards are done, without waiting for it."""
        self._executor.shutdown(wait=False)
        self._slots.close()


class LokyBackend:
    """Local worker processes through loky."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="procval-")
        self._ids = count()

    def start_worker(self, spec: WorkerSpec) -> LokyWorker:
        """Start one worker process for ``spec.snapshot``."""
        return LokyWorker(spec, os.path.join(self._dir, f"worker-{next(self._ids)}.slots"))

    def shutdown(self) -> None:
        """Remove the slot files (workers are killed or closed by the scheduler)."""
        shutil.rmtree(self._dir, ignore_errors=True)
