"""The Ray backend: each worker is one Ray actor, a dedicated process created with the snapshot.

::

    driver (scheduler, store)                       one actor = one process, on some node
    ─────────────────────────                       ─────────────────────────────────────
    start_worker(spec) ── .options(resources,       __init__ (main thread): sweeps stale files,
      runtime_env: config env + run marker)  ─────▶ slot table and fault log files in the
      .remote(snapshot ref)                         node's temp dir, os._exit recorded,
                                                    _worker.initialize()
    describe.remote() ◀──── pid, node, file path ── "poll" group (a thread of its own)
    submit(shard): held until described, then
      run_shard.remote(i, shard) ─────────────────▶ default group: one shard at a time
      future ◀──────────────────── result bytes ─── (rows stamped with pid, Ray node id, ...)
    monitor thread, twice a second: ──────────────▶ poll group: the slot table, read while
      polls; no answer for STALL s: a task on the   run_shard runs
      node reads the slot table from outside;
      silent for lost_after s while owing work:
      lost (killed, its examples rerun); not
      started in placement_timeout s: unplaced
    death(RayActorError): an autopsy thread runs ─▶ reads what the dead actor left: slot table
      a task on the node (skipped if Ray says the   (what ran), fault log, exit status
      node is dead); the shard fails after it
    kill(): ray.kill(no_restart=True)               close(): after its shards, removes its
    close() ── close.remote() ────────────────────▶ files and exits

Ray never restarts an actor or retries a call here (``max_restarts=0``, ``max_task_retries=0``):
the scheduler replaces dead workers, reruns lost examples and isolates poison ones itself, as it
does for loky; Ray's retries would rerun the innocent examples queued behind a poison one.

Every actor's ``runtime_env`` carries a ``PROCVAL_RAY_RUN`` variable unique to the run, so Ray
must start a new process for it: no process that ran another task or actor hosts a procval worker.

Nothing on the scheduler's thread waits on a node: ``running()`` returns the last answer,
``death()`` the autopsy's finding (the shard's future fails only once it is done), and the
monitor thread notices silent and unplaced actors. The actor side lives in ``_ray_actor``, the
driver's view of one actor in ``_ray_worker``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import threading
import uuid
from collections.abc import Mapping
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from procval.backends import WorkerSpec
from procval.backends._channels import reachable
from procval.backends._ray_actor import PREFIX, ProcvalWorker, forget_placed, remove_leftovers
from procval.backends._ray_worker import LostWorker, RayWorker, _remote, _remote_cache

__all__ = ["RayBackend"]

_RUN_MARKER = "PROCVAL_RAY_RUN"
_ACTOR_OPTIONS = frozenset(
    {"num_cpus", "num_gpus", "memory", "resources", "accelerator_type", "scheduling_strategy"}
)
_TICK = 0.5  # seconds between the monitor's checks


class RayBackend:
    """Workers as Ray actors, on the cluster Ray finds or on a local one.

    Args:
        address: the cluster to connect to if Ray is not initialised yet: ``"auto"`` (a cluster
            started with ``ray start`` on this machine), ``"ray://host:10001"``, ``"host:6379"``,
            ``"local"`` (always a new local cluster); with None, Ray looks for ``RAY_ADDRESS``
            and a local cluster, else starts a local one for this process (it stays up for later
            runs until ``ray.shutdown()`` or exit). When Ray is already initialised
            (``ray.init`` called by you), that connection is used and ``address`` and
            ``init_kwargs`` are ignored.
        num_cpus: CPUs each actor reserves; Ray places actors by it, so with 1 a run spreads over
            the cluster's CPUs. Use a fraction (0.25) to pack I/O-bound actors (``threads=``).
            Actors that do not fit wait for resources, up to ``placement_timeout``.
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
        placement_timeout: seconds an actor may wait for a node to take it. Past it, if no
            live node has what it asks for, the config fails with an error naming the resource
            and what the cluster offers, and its worker slots go to the other configs; if other
            actors of its config run, the actor is given up and its slot retried later (a
            frozen node); otherwise it keeps waiting for a busy cluster. An actor whose
            constructor began (a slow ``Config.setup``) was placed, and so was one whose
            resources a node granted (its process slow to start on a loaded node). Raise it
            when the cluster autoscales.
        lost_after: seconds an actor that owes results may go without answering a poll (nor
            a read of its slot table on its node) before it counts as lost: it is killed and
            replaced and its examples rerun (never ``Timeout`` rows). A frozen or partitioned
            node is noticed this way long before Ray declares it dead (about a minute).

    Raises:
        ValueError: a negative resource amount or time, or an unknown ``per_config`` option.
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
        placement_timeout: float = 60.0,
        lost_after: float = 10.0,
    ) -> None:
        for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0 (resources per actor), got {value!r}")
        for name, value in (("placement_timeout", placement_timeout), ("lost_after", lost_after)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
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
        self._placement_timeout = placement_timeout
        self._lost_after = lost_after
        self._run = uuid.uuid4().hex[:12]
        self._ids = itertools.count()
        self._lock = threading.Lock()  # the lists below: the scheduler adds, the monitor prunes
        self._workers: list[RayWorker] = []
        self._configs: dict[RayWorker, tuple[str, dict[str, Any]]] = {}
        self._snapshots: dict[int, tuple[WorkerSpec, Any]] = {}
        self._spec_of: dict[RayWorker, int] = {}
        self._leftovers: set[str] = set()  # nodes of forgotten killed actors: files to remove
        self._started = False  # an actor was created since the last shutdown
        self._monitor: threading.Thread | None = None
        self._stop = threading.Event()
        self.lost_workers = 0
        """How many actors this backend gave up on as silent or unplaced."""

    def _connect(self) -> None:
        if ray.is_initialized():
            return
        try:
            ray.init(address=self._address, **self._init_kwargs)
        except ConnectionError as exc:
            explicit = self._address not in (None, "auto", "local") or os.environ.get("RAY_ADDRESS")
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
        with self._lock:
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
        name = f"{PREFIX}{self._run}-{next(self._ids)}.slots"
        # the driver's pid means nothing on a node: Ray ends actors with their driver instead;
        # nor do its Unix sockets: the rate limiter and the log relay are reached over TCP
        worker_options = dataclasses.replace(
            spec.options, parent_pid=0, **reachable(spec.options, ray.util.get_node_ip_address)
        )
        worker = RayWorker(
            actor.remote(snapshot, worker_options, name),
            name,
            max(1, spec.options.threads),
            self._tasks(),
        )
        with self._lock:
            self._workers.append(worker)
            self._configs[worker] = (spec.snapshot.name, options)
            self._spec_of[worker] = id(spec)
            self._started = True
        self._watch()
        return worker

    # the monitor ---------------------------------------------------------
    def _watch(self) -> None:
        if self._monitor is None or not self._monitor.is_alive():
            self._stop.clear()
            self._monitor = threading.Thread(
                target=self._monitor_loop, name="procval-ray-monitor", daemon=True
            )
            self._monitor.start()

    def _monitor_loop(self) -> None:
        while not self._stop.wait(_TICK):
            for worker in list(self._workers):
                with contextlib.suppress(Exception):  # a monitor that dies would hide hangs
                    self._check(worker)
            with contextlib.suppress(Exception):
                self._prune()

    def _prune(self) -> None:
        """Forget the actors that ended, and the snapshots no actor of ours installs any more.

        A :class:`procval.Workers` pool keeps its backend for many calls, each of which may
        start new actors: without this the lists (and the snapshots pinned in the object
        store) would grow with every call.
        """
        with self._lock:
            closing = [w.closing for w in self._workers if w.closing is not None and not w.killed]
        exited = set(ray.wait(closing, num_returns=len(closing), timeout=0)[0]) if closing else ()
        with self._lock:
            gone = [w for w in self._workers if w.killed or w.closing in exited]
            for worker in gone:
                if worker.killed and not worker.examined and worker.node_id:
                    self._leftovers.add(worker.node_id)
                self._workers.remove(worker)
                self._configs.pop(worker, None)
                self._spec_of.pop(worker, None)
            used = set(self._spec_of.values())
            for key in [key for key in self._snapshots if key not in used]:
                del self._snapshots[key]

    def _check(self, worker: RayWorker) -> None:
        verdict = worker.check(
            lost_after=self._lost_after, placement_timeout=self._placement_timeout
        )
        if verdict == "silent":
            self.lost_workers += 1
        elif verdict == "unplaced":
            config, options = self._configs[worker]
            if self._starting(worker, options):
                return  # a node granted its resources: its process is starting (slow under load)
            others = [
                w
                for w in self._workers
                if w is not worker and self._configs[w][0] == config and w.started and not w.killed
            ]
            if not others and not _missing(options):
                return  # a node could take it once others finish: waiting is no failure
            self.lost_workers += 1
            worker.lose(
                LostWorker(
                    _unplaced_message(config, options, self._placement_timeout, bool(others)),
                    fails_config=not others,
                )
            )

    def _starting(self, worker: RayWorker, options: Mapping[str, Any]) -> bool:
        """Whether Ray granted ``worker``'s resources on a node: placed, its process starting.

        Ray's actor table says ``PENDING_CREATION`` both while an actor waits for resources and
        while its process starts (Python, ``import ray``: seconds on a loaded node); only the
        cluster's pending resource requests tell them apart. Requests are not named, so of our
        unstarted actors asking for the same resources, the newest ``pending`` ones are taken
        to be waiting (Ray grants them in order) and the older ones to be starting. False when
        Ray does not say (the caller then judges by placement marks alone).
        """
        asked = _asked(options)
        pending = _pending_requests(asked)
        if pending is None:
            return False
        with self._lock:
            waiting = sorted(
                (
                    w
                    for w in self._workers
                    if not w.started
                    and not w.killed
                    and w in self._configs
                    and _asked(self._configs[w][1]) == asked
                ),
                key=lambda w: w.created,
            )
        return worker in waiting[: max(0, len(waiting) - pending)]

    def shutdown(self) -> None:
        """Give closing actors ``grace`` seconds, kill the rest, remove killed actors' files."""
        self._stop.set()
        with self._lock:
            workers, started = list(self._workers), self._started
        closing = {w.closing: w for w in workers if w.closing is not None}
        exited: set[RayWorker] = set()
        if closing:
            ready, _ = ray.wait(list(closing), num_returns=len(closing), timeout=self._grace)
            exited = {closing[ref] for ref in ready}
        leftovers, self._leftovers = self._leftovers, set()
        for worker in workers:
            if worker in exited:
                continue  # it removed its files itself
            if not worker.killed:
                worker.kill()
            if not worker.examined and worker.node_id:
                leftovers.add(worker.node_id)
        self._remove_leftovers(leftovers)
        if started:
            forget_placed(f"{PREFIX}{self._run}-")
        with self._lock:
            self._started = False
            self._workers.clear()
            self._configs.clear()
            self._snapshots.clear()
            self._spec_of.clear()

    def _remove_leftovers(self, nodes: set[str]) -> None:
        """Remove the files of killed actors on their live nodes (one small task per node)."""
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        pattern = f"{PREFIX}{self._run}-*"
        refs = [
            _remote(remove_leftovers)
            .options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                **self._tasks(),
            )
            .remote(pattern)
            for node_id in nodes & alive
        ]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=self._grace)


def _unplaced_message(config: str, options: Mapping[str, Any], waited: float, others: bool) -> str:
    """Why an actor of ``config`` did not start: what it asks for, what the cluster offers."""
    asked = _asked(options)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    missing = _missing(options, nodes)
    offered = "; ".join(
        f"node {n['NodeID'][:8]} ({n.get('NodeManagerHostname', '?')}): "
        + ", ".join(
            f"{k} {_amount(k, v)}"
            for k, v in sorted(n.get("Resources", {}).items())
            if not k.startswith("node:") and k != "object_store_memory"
        )
        for n in nodes
    )
    wants = ", ".join(f"{k} {_amount(k, v)}" for k, v in asked.items()) or "nothing"
    if missing:
        why = f"no live node has {', '.join(repr(m) for m in missing)} in that amount"
    else:
        why = "the nodes that have it are busy, or its actor process could not start"
    fix = (
        "the slot was retried later"
        if others
        else "the config was given up and its worker slots went to the other configs; add a "
        "node that has it, lower the request (RayBackend(...) or per_config), or raise "
        "RayBackend(placement_timeout=)"
    )
    return (
        f"no actor of config {config!r} was placed within {waited:g}s (placement_timeout): "
        f"each asks for {wants}; {why}. The cluster offers: {offered or 'no live node'}. {fix}"
    )


def _missing(options: Mapping[str, Any], nodes: list[dict[str, Any]] | None = None) -> list[str]:
    """The resources of ``options`` that no live node has in the amount asked for."""
    if nodes is None:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    return [
        name
        for name, amount in _asked(options).items()
        if not any(float(n.get("Resources", {}).get(name, 0)) >= amount for n in nodes)
    ]


def _pending_requests(asked: Mapping[str, float]) -> int | None:
    """How many of the cluster's resource requests waiting for a node ask for ``asked``.

    A request whose resources a node granted (its worker process starting) is not pending.
    None if Ray's autoscaler state cannot be read (an older or remote-client Ray).
    """
    try:
        from ray.autoscaler.v2.sdk import get_cluster_resource_state

        driver: Any = ray._private.worker.global_worker  # private: Ray exports no other way
        state = get_cluster_resource_state(driver.gcs_client)
        return sum(
            request.count
            for request in state.pending_resource_requests
            if {
                name: float(amount)
                for name, amount in request.request.resources_bundle.items()
                if not name.startswith("accelerator_type:")
            }
            == dict(asked)
        )
    except Exception:
        return None


def _asked(options: Mapping[str, Any]) -> dict[str, float]:
    asked = {"CPU": float(options.get("num_cpus") or 0), "GPU": float(options.get("num_gpus") or 0)}
    if options.get("memory"):
        asked["memory"] = float(options["memory"])
    for name, amount in (options.get("resources") or {}).items():
        asked[name] = float(amount)
    return {k: v for k, v in asked.items() if v > 0}


def _amount(name: str, value: Any) -> str:
    return f"{float(value) / 2**30:.1f} GiB" if name == "memory" else f"{float(value):g}"


def _actor_class() -> Any:
    if ProcvalWorker not in _remote_cache:
        remote: Any = ray.remote  # its type stubs lack concurrency_groups
        _remote_cache[ProcvalWorker] = remote(
            concurrency_groups={"poll": 1}, max_restarts=0, max_task_retries=0
        )(ProcvalWorker)
    return _remote_cache[ProcvalWorker]
