"""The Ray backend: each worker is one Ray actor, a dedicated process created with the snapshot.

::

    driver (scheduler, store)                       one actor = one process, on some node
    ─────────────────────────                       ─────────────────────────────────────
    start_worker(spec) ── .options(resources,       __init__ (main thread): slot table and
      runtime_env: config env + run marker)  ─────▶ fault log files in the node's temp dir,
      .remote(snapshot ref)                         os._exit recorded, _worker.initialize()
    describe.remote() ◀──── pid, node, file path ── "poll" group (a thread of its own)
    submit(shard): held until described, then
      run_shard.remote(i, shard) ─────────────────▶ default group: one shard at a time
      future ◀──────────────────── result bytes ─── (rows stamped with pid, node, fingerprint)
    running(): the last answer, aged since ◀─────── poll group: the slot table, read while
      (poll unanswered for STALL s: a task on the   run_shard runs
      node reads the slot table from outside)
    death(RayActorError): a task on the node ─────▶ reads what the dead actor left: slot table
      (what ran), fault log, exit status            (what ran), fault log, exit status
    kill(): ray.kill(no_restart=True)               close(): after its shards, removes its
    close() ── close.remote() ────────────────────▶ files and exits

Ray never restarts an actor or retries a call here (``max_restarts=0``, ``max_task_retries=0``):
the scheduler replaces dead workers, reruns lost examples and isolates poison ones itself, as it
does for loky; Ray's retries would rerun the innocent examples queued behind a poison one.

Every actor's ``runtime_env`` carries a ``PROCVAL_RAY_RUN`` variable unique to the run, so Ray
must start a new process for it: no process that ran another task or actor hosts a procval worker.

``running()`` never waits on the actor: it returns the last answer, adding the time elapsed since
it came. An actor stuck in C code that holds its GIL cannot answer; then the slot table, a file,
is read from another process on its node, as the loky backend reads it from the parent, so the
scheduler's timeout still fires. Shards wait in the driver until the actor has said where it
runs, so the driver always knows where to read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import itertools
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any, NoReturn

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from procval.backends import WorkerSpec
from procval.wire import WorkerOptions
from procval.worker import runtime as _worker
from procval.worker.slots import SlotTable

REMAINS_TIMEOUT = 30.0  # seconds to read a dead actor's files on its node
STALL = 1.0  # seconds a poll may go unanswered before the slot table is read from outside
_RUN_MARKER = "PROCVAL_RAY_RUN"
_ACTOR_OPTIONS = frozenset(
    {"num_cpus", "num_gpus", "memory", "resources", "accelerator_type", "scheduling_strategy"}
)
_FATAL_ERRORS = {
    "Segmentation fault": "SIGSEGV",
    "Floating point exception": "SIGFPE",
    "Aborted": "SIGABRT",
    "Bus error": "SIGBUS",
    "Illegal instruction": "SIGILL",
}


# ---------------------------------------------------------------- inside the actor


class ProcvalWorker:
    """The actor: installs one snapshot in its own process and runs shards for it.

    Its process title is ``ray::ProcvalWorker`` (handy in ``ps`` and Ray's dashboard).
    """

    def __init__(self, snapshot: bytes, options: WorkerOptions, name: str) -> None:
        self._path = os.path.join(tempfile.gettempdir(), name)
        self._slots = SlotTable(self._path, max(1, options.threads), create=True)
        self._shard = -1
        _record_exit_status(self._path + ".exit")
        _worker.initialize(snapshot, options, self._path)

    @ray.method(concurrency_group="poll")
    def describe(self) -> tuple[int, str, str, str]:
        """``(pid, hostname, Ray node id, slot file path)`` of this actor."""
        node_id = ray.get_runtime_context().get_node_id()
        return os.getpid(), socket.gethostname(), node_id, self._path

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
    for suffix in ("", ".fault", ".exit"):
        with contextlib.suppress(OSError):
            os.remove(path + suffix)


@dataclass(frozen=True)
class _Remains:
    """What an actor's files on its node say (read there by a small task, from another process)."""

    found: bool
    running: list[tuple[int, float]]
    fault: str = ""
    exit_status: int | None = None


def read_files(path: str, slots: int, *, final: bool) -> _Remains:
    """Read an actor's slot table, from another process on the actor's node.

    With ``final`` (the actor died), also read its fault log and exit status, then remove its
    files. A bare file name is looked up in this node's temp dir.
    """
    path = os.path.join(tempfile.gettempdir(), path)  # a no-op for an absolute path
    if not os.path.exists(path):
        return _Remains(found=False, running=[])
    running: list[tuple[int, float]] = []
    with contextlib.suppress(OSError, ValueError):
        table = SlotTable(path, slots)
        running = table.running()
        table.close()
    if not final:
        return _Remains(found=True, running=running)
    fault, exit_status = "", None
    with contextlib.suppress(OSError), open(path + ".fault", errors="replace") as f:
        fault = f.read(64_000)
    with contextlib.suppress(OSError, ValueError), open(path + ".exit") as f:
        exit_status = int(f.read().strip())
    _remove_files(path)
    return _Remains(found=True, running=running, fault=fault, exit_status=exit_status)


def remove_leftovers(pattern: str) -> int:
    """Remove the files of killed actors matching ``pattern`` in this node's temp dir."""
    paths = glob.glob(os.path.join(tempfile.gettempdir(), pattern))
    for path in paths:
        with contextlib.suppress(OSError):
            os.remove(path)
    return len(paths)


# ---------------------------------------------------------------- in the driver


class RayWorker:
    """One actor serving one snapshot, seen from the driver.

    Shards wait in the driver until the actor has described itself (pid, node, file path), so
    that whatever its examples do to it later -- hold the GIL, crash -- the driver knows where
    to read what it left.
    """

    def __init__(self, actor: Any, name: str, slots: int, tasks: Mapping[str, Any]) -> None:
        self._actor = actor
        self._name = name  # the actor's file name, if it dies before describing itself
        self._slots = slots
        self._tasks = tasks  # options (runtime_env) for the small tasks that read its files
        self._lock = threading.Lock()
        self._queued: deque[tuple[int, bytes, Future[bytes]]] = deque()
        self._futures: dict[int, Future[bytes]] = {}
        self._next = 0
        self._answer: tuple[int, list[tuple[int, float]], float] | None = None
        self._poll: Future[Any] | None = None
        self._polled = 0.0
        self._peek: Future[Any] | None = None
        self._remains: _Remains | None = None
        self._how: str | None = None
        self._error_pid = 0
        self._error_node = ""
        self.closing: Any = None
        """The ObjectRef of the actor's close call, once :meth:`close` was called."""
        self.killed = False
        self._description: Future[Any] = actor.describe.remote().future()
        self._description.add_done_callback(lambda _: self._send())

    # identity ------------------------------------------------------------
    def _described(self) -> tuple[int, str, str, str] | None:
        future = self._description
        if future.done() and future.exception() is None:
            return future.result()
        return None

    @property
    def pid(self) -> int:
        """The actor's process id once it has started, else 0."""
        described = self._described()
        return described[0] if described else self._error_pid

    @property
    def node(self) -> str:
        """The hostname of the actor's node once it has started, else ""."""
        described = self._described()
        return described[1] if described else self._error_node

    @property
    def node_id(self) -> str:
        """The Ray node id of the actor's node once it has started, else ""."""
        described = self._described()
        return described[2] if described else ""

    @property
    def label(self) -> str:
        """``pid N on HOST`` once the actor has started."""
        if not self.pid:
            return "a starting actor"
        return f"pid {self.pid} on {self.node}" if self.node else f"pid {self.pid}"

    # work ----------------------------------------------------------------
    def submit(self, shard: bytes) -> Future[bytes]:
        """Queue a shard; the future fails with RayActorError if the actor dies."""
        future: Future[bytes] = Future()
        with self._lock:
            index, self._next = self._next, self._next + 1
            self._futures[index] = future
            self._queued.append((index, shard, future))
        future.add_done_callback(partial(self._forget, index))
        self._send()
        return future

    def _forget(self, index: int, _: Future[bytes]) -> None:
        self._futures.pop(index, None)

    def _send(self) -> None:
        """Send the queued shards once the actor has described itself (fail them if it died)."""
        if not self._description.done():
            return
        failure = self._description.exception()
        with self._lock:  # held while sending, so that shards leave in the order they came
            while self._queued:
                index, shard, future = self._queued.popleft()
                if failure is not None:
                    future.set_exception(failure)
                else:
                    sent = self._actor.run_shard.remote(index, shard).future()
                    sent.add_done_callback(partial(_settle, future))

    def running(self) -> list[tuple[int, float]]:
        """Examples running now: the last answer, aged since it came; never waits on the actor.

        The answer comes from the actor's poll method; if a poll goes unanswered for
        ``STALL`` seconds (C code holding the actor's GIL), from a task that reads the actor's
        slot table on its node.
        """
        if self._remains is not None:
            return self._remains.running
        self._refresh()
        answer = self._answer
        if answer is None:
            return []
        index, busy, received = answer
        future = self._futures.get(index)
        if future is None or future.done():  # that shard is over: its examples are too
            return []
        age = time.monotonic() - received
        return [(seq, seconds + age) for seq, seconds in busy]

    def _refresh(self) -> None:
        if self.killed or self._described() is None:
            return
        poll = self._poll
        if poll is None or poll.done():
            if poll is not None and isinstance(poll.exception(), RayActorError):
                return  # the actor is gone: death() reads what ran
            self._poll, self._polled = self._actor.running.remote().future(), time.monotonic()
            self._poll.add_done_callback(self._on_answer)
        elif time.monotonic() - self._polled > STALL and (self._peek is None or self._peek.done()):
            self._peek = self._read_files(final=False).future()
            self._peek.add_done_callback(self._on_peek)

    def _on_answer(self, poll: Future[Any]) -> None:
        if poll.exception() is None:
            index, busy = poll.result()
            self._answer = (index, busy, time.monotonic())

    def _on_peek(self, peek: Future[Any]) -> None:
        if peek.exception() is None and peek.result().found:
            # the stalled actor runs its oldest unfinished shard
            index = min(list(self._futures), default=-1)
            self._answer = (index, peek.result().running, time.monotonic())

    def _read_files(self, *, final: bool, node_id: str = "", path: str = "") -> Any:
        """Start a task reading this actor's files on its node; returns its ObjectRef."""
        described = self._described()
        if described:
            node_id, path = described[2], described[3]
        reader = _remote(read_files).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            **self._tasks,
        )
        return reader.remote(path, self._slots, final=final)

    # failures ------------------------------------------------------------
    def silent_for(self) -> float:
        """0.0: Ray's own health checks find a frozen actor (its slot table beats, unread)."""
        return 0.0

    def death(self, exc: BaseException) -> str | None:
        """How the actor died, if ``exc`` says it did: exit code, fatal signal or Ray's reason."""
        if not isinstance(exc, RayActorError):
            return None
        if self._how is None:
            self._how = self._autopsy(exc)
        return self._how

    def crash_log(self) -> str:
        """The dead actor's fault handler output (a native traceback), read on its node."""
        return self._remains.fault if self._remains is not None else ""

    def _autopsy(self, exc: RayActorError) -> str:
        message = getattr(exc, "error_msg", "") or str(exc)
        pid = re.search(r"\bpid[:=] ?(\d+)", message)
        self._error_pid = int(pid.group(1)) if pid else 0
        self._remains = self._read_remains(message) or _Remains(found=False, running=[])
        if getattr(exc, "actor_init_failed", False):
            return f"the actor failed to start ({_last_line(message)})"
        if self._remains.exit_status is not None:
            return f"the worker process died with exit code {self._remains.exit_status}"
        first = self._remains.fault.partition("\n")[0]
        fatal = first.removeprefix("Fatal Python error: ").strip()
        if fatal in _FATAL_ERRORS:
            return f"the worker process was killed by {_FATAL_ERRORS[fatal]} ({fatal})"
        if isinstance(exc, ActorUnavailableError):
            return "the actor became unreachable (its node failed or the network did)"
        detail = re.search(r"Worker exit type: (\S+) Worker exit detail: ([^.]*)", message)
        reason = f"{detail.group(1)}: {detail.group(2)}" if detail else _last_line(message)
        return (
            f"the worker process died without an exit code ({reason}); SIGKILL, the OOM killer "
            "or a lost node do this"
        )

    def _read_remains(self, message: str) -> _Remains | None:
        if self._described():
            targets = [("", "")]
        else:  # died while starting: find its node by the IP in Ray's message
            ip = re.search(r"\bip[:=] ?([0-9A-Fa-f.:]+[0-9A-Fa-f])", message)
            found = [n for n in ray.nodes() if ip and n["NodeManagerAddress"] == ip.group(1)]
            self._error_node = found[0].get("NodeManagerHostname", "") if found else ""
            targets = [(n["NodeID"], self._name) for n in found if n.get("Alive")]
        for node_id, name in targets:
            ref = self._read_files(final=True, node_id=node_id, path=name)
            try:
                remains: _Remains = ray.get(ref, timeout=REMAINS_TIMEOUT)
            except (GetTimeoutError, ray.exceptions.RayError):
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
                continue
            if remains.found:
                return remains
        return None

    # endings -------------------------------------------------------------
    def kill(self) -> None:
        """Kill the actor's process at once; its pending futures fail with RayActorError."""
        self.killed = True
        with contextlib.suppress(Exception):
            ray.kill(self._actor, no_restart=True)
        with self._lock:
            queued, self._queued = self._queued, deque()
        for _, _, future in queued:
            future.cancel()

    def close(self) -> None:
        """Let the actor finish its queued shards, then exit (without waiting for it)."""
        if self.closing is None and not self.killed:
            self.closing = self._actor.close.remote()

    @property
    def examined(self) -> bool:
        """Whether its files were read (and removed) after it died."""
        return self._remains is not None


class RayBackend:
    """Workers as Ray actors, on the cluster Ray finds or on a local one.

    Args:
        address: the cluster to connect to if Ray is not initialised yet: ``"auto"`` (a cluster
            started with ``ray start`` on this machine), ``"ray://host:10001"``, ``"host:6379"``;
            with None, Ray looks for ``RAY_ADDRESS`` and a local cluster, else starts a local one
            for this process (it stays up for later runs until ``ray.shutdown()`` or exit).
            When Ray is already initialised (``ray.init`` called by you), that connection is used
            and ``address`` and ``init_kwargs`` are ignored.
        num_cpus: CPUs each actor reserves; Ray places actors by it, so with 1 a run spreads over
            the cluster's CPUs. Use a fraction (0.25) to pack I/O-bound actors (``threads=``).
            Actors that do not fit wait for resources: keep ``workers`` within the cluster.
        num_gpus: GPUs each actor reserves (Ray sets ``CUDA_VISIBLE_DEVICES`` in the actor).
        memory: bytes of memory each actor reserves (a scheduling hint, not a limit).
        resources: custom resources each actor reserves, e.g. ``{"vllm": 1}``.
        runtime_env: Ray's ``runtime_env`` for every actor (``py_modules``, ``working_dir``,
            ``pip``, ``env_vars``); each config's ``env`` is added to its ``env_vars``.
        init_kwargs: more keywords for ``ray.init`` (``runtime_env``, ``namespace``, ...).
        per_config: options by config name that override the ones above for that config's
            actors, e.g. ``{"llama-70b": {"num_gpus": 1}}``; allowed keys: ``num_cpus``,
            ``num_gpus``, ``memory``, ``resources``, ``accelerator_type``,
            ``scheduling_strategy``.
        grace: seconds ``shutdown`` gives closing actors to exit before killing them.

    Raises:
        ValueError: a negative resource amount or an unknown ``per_config`` option.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: float = 1,
        num_gpus: float = 0,
        memory: int | None = None,
        resources: Mapping[str, float] | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
        per_config: Mapping[str, Mapping[str, Any]] | None = None,
        grace: float = 5.0,
    ) -> None:
        for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0 (resources per actor), got {value!r}")
        for config, options in (per_config or {}).items():
            unknown = sorted(set(options) - _ACTOR_OPTIONS)
            if unknown:
                raise ValueError(
                    f"per_config[{config!r}] has unknown options {unknown}; "
                    f"use {sorted(_ACTOR_OPTIONS)}"
                )
        self._address = address
        self._init_kwargs = dict(init_kwargs or {})
        self._options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        if memory is not None:
            self._options["memory"] = memory
        if resources:
            self._options["resources"] = dict(resources)
        self._runtime_env = dict(runtime_env or {})
        self._per_config = {name: dict(options) for name, options in (per_config or {}).items()}
        self._grace = grace
        self._run = uuid.uuid4().hex[:12]
        self._ids = itertools.count()
        self._workers: list[RayWorker] = []
        self._snapshots: dict[int, tuple[WorkerSpec, Any]] = {}

    def _connect(self) -> None:
        if ray.is_initialized():
            return
        try:
            ray.init(address=self._address, **self._init_kwargs)
        except ConnectionError as exc:
            explicit = self._address not in (None, "auto") or os.environ.get("RAY_ADDRESS")
            if not explicit or os.environ.get("RAY_AUTH_MODE"):
                raise
            raise ConnectionError(
                f"{exc}; if the cluster requires Ray's token authentication, set "
                "RAY_AUTH_MODE=token in the driver's environment and give it the cluster's "
                "token (~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH): Ray does not "
                "turn token authentication on by itself when the address is explicit"
            ) from exc

    def default_workers(self) -> int:
        """Workers when ``evaluate(workers=None)``: the cluster's CPUs over ``num_cpus`` per actor.

        With ``num_cpus=0`` (actors reserve no CPU) it is the cluster's CPU count.
        """
        self._connect()
        cpus = float(ray.cluster_resources().get("CPU", 1))
        per_actor = float(self._options["num_cpus"])
        return max(1, int(cpus // per_actor) if per_actor > 0 else int(cpus))

    def _tasks(self) -> dict[str, Any]:
        return {"runtime_env": self._runtime_env} if self._runtime_env else {}

    def start_worker(self, spec: WorkerSpec) -> RayWorker:
        """Create one actor for ``spec.snapshot`` (Ray starts its process asynchronously)."""
        self._connect()
        if id(spec) not in self._snapshots:  # one copy in the object store per config
            self._snapshots[id(spec)] = (spec, ray.put(spec.snapshot.data))
        snapshot = self._snapshots[id(spec)][1]
        env_vars = {
            **self._runtime_env.get("env_vars", {}),
            **spec.env,
            _RUN_MARKER: self._run,
        }
        options = {**self._options, **self._per_config.get(spec.snapshot.name, {})}
        actor = _actor_class().options(
            runtime_env={**self._runtime_env, "env_vars": env_vars}, **options
        )
        name = f"procval-ray-{self._run}-{next(self._ids)}.slots"
        # the driver's pid means nothing on a node: Ray ends actors with their driver instead
        worker_options = dataclasses.replace(spec.options, parent_pid=0)
        worker = RayWorker(
            actor.remote(snapshot, worker_options, name),
            name,
            max(1, spec.options.threads),
            self._tasks(),
        )
        self._workers.append(worker)
        return worker

    def shutdown(self) -> None:
        """Give closing actors ``grace`` seconds, kill the rest, remove killed actors' files."""
        closing = {w.closing: w for w in self._workers if w.closing is not None}
        exited: set[RayWorker] = set()
        if closing:
            ready, _ = ray.wait(list(closing), num_returns=len(closing), timeout=self._grace)
            exited = {closing[ref] for ref in ready}
        leftovers = set()
        for worker in self._workers:
            if worker in exited:
                continue  # it removed its files itself
            if not worker.killed:
                worker.kill()
            if not worker.examined and worker.node_id:
                leftovers.add(worker.node_id)
        self._remove_leftovers(leftovers)
        self._workers.clear()
        self._snapshots.clear()

    def _remove_leftovers(self, nodes: set[str]) -> None:
        """Remove the files of killed actors on their nodes (one small task per node)."""
        pattern = f"procval-ray-{self._run}-*"
        refs = [
            _remote(remove_leftovers)
            .options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                **self._tasks(),
            )
            .remote(pattern)
            for node_id in nodes
        ]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=self._grace)


def _settle(future: Future[bytes], sent: Future[bytes]) -> None:
    """Pass the outcome of the Ray call ``sent`` to the future handed to the scheduler."""
    if future.cancelled():  # a shard still queued when the actor was killed
        return
    exc = sent.exception()
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(sent.result())


def _last_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[-1] if lines else message


_remote_cache: dict[Any, Any] = {}


def _remote(fn: Any) -> Any:
    """``ray.remote`` for the small file tasks, made once (no CPU, no retries)."""
    if fn not in _remote_cache:
        _remote_cache[fn] = ray.remote(num_cpus=0, max_retries=0)(fn)
    return _remote_cache[fn]


def _actor_class() -> Any:
    if ProcvalWorker not in _remote_cache:
        remote: Any = ray.remote  # its type stubs lack concurrency_groups
        _remote_cache[ProcvalWorker] = remote(
            concurrency_groups={"poll": 1}, max_restarts=0, max_task_retries=0
        )(ProcvalWorker)
    return _remote_cache[ProcvalWorker]
