"""``procval.Workers``: keep each config's workers alive across many ``evaluate`` calls.

A plain :func:`procval.evaluate` starts its workers and stops them at the end of the call. A
pool lends the scheduler warm workers instead, and takes them back when the call is done::

    with procval.Workers(config=cfg, workers=2) as pool:
        pool.evaluate(program, devset, metric)       # starts 2 workers (snapshot S1)
        pool.evaluate(program, devset, metric)       # same snapshot S1: the same 2 processes
        pool.evaluate(program2, devset, metric)      # snapshot S2: 2 new processes (S1's end)

    Scheduler ──start_worker(spec)──▶ _Lease ──idle worker of spec's key?──▶ yes: lend it
        │                               │                                    no: start one
        │                               │                                    (an idle worker
        │                               │                                    of a key this call
        │                               │                                    does not use ends,
        │                               │                                    to make room)
        ├──worker.close() (retired)───▶ _Leased.close: back to the idle workers of its key
        ├──worker.kill() (died, timed out, Ctrl-C)──▶ killed for good, never lent again
        └──shutdown() (end of call)──▶ _Lease: anything lent and not given back is killed

With ``backend="ray"`` (or a ``RayBackend``) the workers are Ray actors, kept and lent the same
way; the backend lives as long as the pool.

The invariant holds: a process serves one snapshot for life. A worker's key is everything it
installed at start: the snapshot's fingerprint (the config, program and metric pickled
together), the worker options (threads, retries, backoff) and the config's env. A call whose
program, metric, config or options differ gets new processes; so does one after
:meth:`Workers.restart`. The program and metric are part of the snapshot (rather than sent per
call) so that a ``setup`` and a ``__main__`` program keep sharing one globals dict, as in a
plain run: an optimizer that changes its program each call (new demos, new instructions) gets
new processes each call, which a fork server with the library preloaded makes cheap
(``LokyBackend(preload=...)``; ``procval.dspy.Evaluate`` preloads DSPy).

What a reused worker keeps between calls: whatever its process holds. ``Config.setup`` ran once,
when the process started, not once per call; module globals, in-memory caches (DSPy's memory
cache: a repeated LM request is answered from it), an LM's ``history``, open connections and
anything the program stored on itself in the worker all persist. ``restart()`` ends the idle
workers, so the next call starts from fresh processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickletools
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from procval.backends import Backend, Worker, WorkerSpec
from procval.config import Config
from procval.results import EvaluationResult, Results
from procval.run.api import Metric, Program, _backend, _default_workers, run_configs
from procval.run.checks import _check_backend, _check_counts, _named_configs
from procval.wire import Snapshot

__all__ = ["Workers"]

_Key = tuple[str, tuple[Any, ...], frozenset[tuple[str, str]]]


_ATOMS = frozenset(
    {
        *("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING"),
        *("SHORT_BINSTRING", "BINSTRING", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8"),
        *("BININT", "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4", "BINFLOAT", "FLOAT"),
    }
)
_PUTS = frozenset({"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"})
_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})


def content_key(data: bytes) -> str:
    """A hash of a pickle's content, blind to which equal strings and numbers it shares.

    The same objects can pickle to different bytes: the pickler memoizes by identity, so two
    equal strings that are one object in one call and two in the next (a dynamically created
    DSPy signature class, a ``functools.partial`` whose ``__dict__`` was created meanwhile) give
    different bytes. Here memo writes and frames are dropped, a memo read of an atom (a string,
    bytes, a number) is replaced by the atom, and a memo read of anything else by its ordinal
    among the non-atoms: two pickles with the same key build the same objects, up to the
    identity of equal atoms.
    """
    digest = hashlib.sha256()
    memo: dict[int, str] = {}
    previous: tuple[str, Any] = ("", None)
    refs = 0
    for opcode, arg, _ in pickletools.genops(data):
        name = opcode.name
        if name in _PUTS:
            index = arg if isinstance(arg, int) else len(memo)  # MEMOIZE: the next index
            if previous[0] in _ATOMS:
                memo[index] = f"{previous[0]}:{previous[1]!r}"
            else:
                memo[index], refs = f"REF:{refs}", refs + 1
            continue
        if name == "FRAME":
            continue
        token = memo[arg] if name in _GETS and isinstance(arg, int) else f"{name}:{arg!r}"
        previous = (name, arg)
        digest.update(token.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def _key(spec: WorkerSpec) -> _Key:
    """Everything a worker installed at start: it may serve another call with the same key."""
    options = dataclasses.astuple(spec.options)
    return spec.snapshot.fingerprint, options, frozenset(spec.env.items())


class Workers:
    """Worker processes kept alive across :meth:`evaluate` calls, per config snapshot.

    Use it as a context manager (or call :meth:`close`): its workers end when the block does. A
    pool that is never closed ends its workers when it is garbage-collected or when the Python
    process exits, and every worker dies with its parent process (``kill -9`` included).

    Args:
        config: one config (default ``Config()``); :meth:`evaluate` returns an
            :class:`EvaluationResult`.
        configs: several configs, as ``{name: Config}`` or a list of uniquely named configs;
            :meth:`evaluate` returns a :class:`Results` mapping.
        workers: worker processes in total, shared among configs (default: the CPU count).
        threads: examples run at once inside each worker.
        backend: ``"loky"``, ``"ray"`` or a backend object; it lives as long as the pool.

    Raises:
        ValueError: bad arguments (both config and configs, workers < 1, ...).
    """

    def __init__(
        self,
        config: Config | None = None,
        configs: Mapping[str, Config] | Sequence[Config] | None = None,
        *,
        workers: int | None = None,
        threads: int = 1,
        backend: str | Backend = "loky",
    ) -> None:
        self._named = _named_configs(config, configs)
        self._single = configs is None
        _check_counts(workers, threads, 0, 0.0, None, None)
        _check_backend(backend)
        engine = _backend(backend)
        self._threads = threads
        self._state = _PoolState(engine, workers or _default_workers(engine))
        self._call = threading.Lock()
        self._finalizer = weakref.finalize(self, self._state.close)

    @property
    def workers(self) -> int:
        """The most worker processes the pool runs at once."""
        return self._state.workers

    def pids(self) -> list[int]:
        """The process ids of the idle workers, kept for the next call."""
        return self._state.pids()

    def evaluate(
        self, program: Program, dataset: Iterable[Any], metric: Metric, **options: Any
    ) -> EvaluationResult | Results:
        """Evaluate as :func:`procval.evaluate` does, on the pool's configs and warm workers.

        Args:
            program: called as ``program(example)`` in a worker.
            dataset: any iterable of examples.
            metric: called as ``metric(example, prediction)``.
            **options: ``evaluate``'s other options (``store=``, ``timeout=``, ``retries=``,
                ``max_errors=``, ``failure_score=``, ``progress=``, ``backoff=``, ``fresh=``,
                ``retry_errors=``, ``epochs=``, ``group_by=``, ``max_tokens=``, ``max_cost=``,
                ...); ``config``, ``workers``, ``threads`` and ``backend`` are the pool's.

        Returns:
            An :class:`EvaluationResult` (a pool of one config) or a :class:`Results` mapping.

        Raises:
            RuntimeError: the pool is closed, or running a call in another thread.
            TypeError: an option that is not ``evaluate``'s, or is the pool's.
            Exception: whatever :func:`procval.evaluate` raises.
        """
        fixed = {"config", "configs", "workers", "threads", "backend"} & set(options)
        if fixed:
            raise TypeError(
                f"{sorted(fixed)} are set once, on Workers(...), not per call; pass them there"
            )
        if self._state.closed:
            raise RuntimeError("this Workers pool is closed; open a new one")
        if not self._call.acquire(blocking=False):
            raise RuntimeError(
                "this Workers pool is running another evaluate call (in another thread); "
                "one call at a time per pool: wait for it, or open a second pool"
            )
        try:
            results = run_configs(
                self._named,
                program,
                dataset,
                metric,
                lambda: _Lease(self._state),
                adopt=self._state.adopt,
                workers=self._state.workers,
                threads=self._threads,
                **options,
            )
        except KeyboardInterrupt:
            self._state.end_idle(kill=True)  # Ctrl-C ends the idle workers too, at once
            raise
        finally:
            self._call.release()
        return results[self._named[0].name] if self._single else results

    def restart(self) -> None:
        """End the idle workers: the next call starts fresh processes (setup runs again)."""
        self._state.end_idle()

    def close(self) -> None:
        """End every worker of the pool and release its backend; idempotent."""
        self._finalizer()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PoolState:
    """The pool's workers, apart from the pool object so that its finalizer can end them."""

    def __init__(self, backend: Backend, workers: int) -> None:
        self.backend = backend
        self.workers = workers
        self.idle: dict[Worker, _Key] = {}  # oldest first
        self.lent: set[_Leased] = set()
        self.closed = False
        self.lock = threading.Lock()
        self.snapshots: dict[str, Snapshot] = {}  # of the idle workers, by fingerprint
        self.contents: dict[str, str] = {}  # their content keys, by fingerprint

    def adopt(self, snapshot: Snapshot) -> Snapshot:
        """``snapshot``, or an idle worker's of the same name and content (its workers serve it).

        Rows then carry the fingerprint of the bytes the worker installed, which hold the same
        objects as the caller's (see :func:`content_key`).
        """
        with self.lock:
            kept = {key[0] for key in self.idle.values()}
            for gone in set(self.snapshots) - kept:
                del self.snapshots[gone]
                self.contents.pop(gone, None)
            same_name = [s for s in self.snapshots.values() if s.name == snapshot.name]
        if not same_name or snapshot.fingerprint in self.snapshots:
            return snapshot
        content = content_key(snapshot.data)
        for earlier in same_name:
            if earlier.fingerprint not in self.contents:
                self.contents[earlier.fingerprint] = content_key(earlier.data)
            if self.contents[earlier.fingerprint] == content:
                return earlier
        return snapshot

    def pids(self) -> list[int]:
        with self.lock:
            return [w.pid for w in self.idle]

    def borrow(self, spec: WorkerSpec) -> Worker | None:
        """An idle, live worker with ``spec``'s key; idle workers found dead are dropped."""
        key = _key(spec)
        with self.lock:
            for worker, its_key in list(self.idle.items()):
                if its_key != key:
                    continue
                del self.idle[worker]
                if _alive(worker):
                    return worker
                worker.kill()
            return None

    def make_room(self, keep: set[_Key]) -> None:
        """End the oldest idle workers of keys not in ``keep`` while the pool is full.

        The keys of the running call are kept: a config that finished first gives its slot to
        another config, and keeps its idle worker for the next call.
        """
        with self.lock:
            others = [w for w, k in self.idle.items() if k not in keep]
            while others and len(self.idle) + len(self.lent) >= self.workers:
                worker = others.pop(0)
                del self.idle[worker]
                worker.close()

    def give_back(self, leased: _Leased) -> None:
        with self.lock:
            self.lent.discard(leased)
            if self.closed:
                leased.inner.kill()
            else:
                self.idle[leased.inner] = leased.key
                self.snapshots.setdefault(leased.key[0], leased.snapshot)

    def end_idle(self, *, kill: bool = False) -> None:
        """Close the idle workers (they exit at once: they have nothing queued), or kill them."""
        with self.lock:
            idle, self.idle = list(self.idle), {}
        for worker in idle:
            if kill:
                worker.kill()
            else:
                worker.close()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            lent, self.lent = list(self.lent), set()
        self.end_idle()
        for leased in lent:
            leased.inner.kill()
        self.backend.shutdown()


def _alive(worker: Worker) -> bool:
    alive = getattr(worker, "alive", None)  # LokyWorker and RayWorker have it
    return bool(alive()) if callable(alive) else True


class _Lease:
    """The scheduler's worker source for one call: the pool's workers, given back at the end."""

    def __init__(self, state: _PoolState) -> None:
        self._state = state
        self._lent: list[_Leased] = []
        self._keys: set[_Key] = set()  # this call's snapshots

    def default_workers(self) -> int:
        return self._state.workers

    def start_worker(self, spec: WorkerSpec) -> Worker:
        state, key = self._state, _key(spec)
        self._keys.add(key)
        worker = state.borrow(spec)
        if worker is None:
            state.make_room(self._keys)
            worker = state.backend.start_worker(spec)
        leased = _Leased(worker, key, state, spec.snapshot)
        with state.lock:
            state.lent.add(leased)
        self._lent.append(leased)
        return leased

    def shutdown(self) -> None:
        """The call is over: a worker lent and neither given back nor killed is killed."""
        for leased in self._lent:
            if not leased.returned:
                leased.kill()
        self._lent.clear()


class _Leased:
    """A pool's worker as the scheduler holds it: ``close()`` gives it back to the pool."""

    def __init__(self, inner: Worker, key: _Key, state: _PoolState, snapshot: Snapshot) -> None:
        self.inner = inner
        self.key = key
        self.snapshot = snapshot
        self._state = state
        self.returned = False

    @property
    def label(self) -> str:
        return self.inner.label

    @property
    def pid(self) -> int:
        return self.inner.pid

    @property
    def node(self) -> str:
        """The worker's node, as its rows name it ("" for this host; a Ray actor's node id)."""
        return str(getattr(self.inner, "node", ""))

    def submit(self, shard: bytes) -> Future[bytes]:
        return self.inner.submit(shard)

    def running(self) -> list[tuple[int, float]]:
        return self.inner.running()

    def silent_for(self) -> float:
        """How long the worker has shown no sign of life (the backend's measure)."""
        return self.inner.silent_for()

    def death(self, exc: BaseException) -> str | None:
        return self.inner.death(exc)

    def crash_log(self) -> str:
        return self.inner.crash_log()

    def kill(self) -> None:
        """Kill the process for good; the pool forgets it."""
        self.returned = True
        with self._state.lock:
            self._state.lent.discard(self)
        self.inner.kill()

    def close(self) -> None:
        """The scheduler is done with it (idle): keep it for the next call."""
        if not self.returned:
            self.returned = True
            self._state.give_back(self)
