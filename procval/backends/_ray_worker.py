"""One Ray actor seen from the driver: its shards, its polls, how it was lost, what it left.

Nothing here blocks the scheduler's thread on a node. Answers arrive through callbacks; a
backend thread (:class:`procval.backends.ray.RayBackend`'s monitor) calls :meth:`RayWorker.check`
twice a second, which keeps the actor polled and declares it lost when it stops answering
(``lost_after``) or unplaced when it never starts (``placement_timeout``). When an actor dies,
its shards' futures fail only after a thread of its own has read what it left on its node
(skipped when Ray says the node is dead), so ``death()`` answers at once.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, InvalidStateError
from functools import partial
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from procval.backends._ray_actor import Remains, read_files, was_placed

REMAINS_TIMEOUT = 30.0  # seconds to read a dead actor's files on its node
STALL = 1.0  # seconds a poll may go unanswered before the slot table is read from outside
_FATAL_ERRORS = {
    "Segmentation fault": "SIGSEGV",
    "Floating point exception": "SIGFPE",
    "Aborted": "SIGABRT",
    "Bus error": "SIGBUS",
    "Illegal instruction": "SIGILL",
}


class LostWorker(Exception):
    """An actor stopped answering (its node froze or is cut off), or never started.

    Attributes:
        how: what happened, for the scheduler's messages.
        fails_config: the config cannot run at all (no actor of it can be placed): the scheduler
            gives up on that config and lets the others finish.
    """

    def __init__(self, how: str, *, fails_config: bool = False) -> None:
        super().__init__(how)
        self.how = how
        self.fails_config = fails_config


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
        self._lock = threading.RLock()  # _send fails shards under it, and _fail takes it
        self._poll_lock = threading.Lock()
        self._queued: deque[tuple[int, bytes, Future[bytes]]] = deque()
        self._futures: dict[int, Future[bytes]] = {}
        self._next = 0
        self._answer: tuple[int, list[tuple[int, float]], float] | None = None
        self._poll: Future[Any] | None = None
        self._polled = 0.0
        self._peek: Future[Any] | None = None
        self._remains: Remains | None = None
        self._how: str | None = None
        self._dead: Future[None] | None = None  # set once a call failed: the autopsy's outcome
        self._lost: LostWorker | None = None
        self._error_pid = 0
        self._error_node = ""
        self.created = time.monotonic()
        self._placed = False  # its constructor began: placed, maybe in a slow Config.setup
        self._heard = self.created  # the last sign of life: an answer, a result
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
    def started(self) -> bool:
        """Whether the actor has started and described itself."""
        return self._described() is not None

    @property
    def pid(self) -> int:
        """The actor's process id once it has started, else 0."""
        described = self._described()
        return described[0] if described else self._error_pid

    @property
    def node(self) -> str:
        """The Ray node id of the actor's node once it has started, else ""."""
        described = self._described()
        return described[2] if described else ""

    @property
    def host(self) -> str:
        """The hostname of the actor's node once it has started, else ""."""
        described = self._described()
        return described[1] if described else self._error_node

    node_id = node

    def alive(self) -> bool:
        """Whether the actor may still run shards (a pool lends only such workers).

        False once it was killed, closed, lost, or a call or its start failed. An idle actor
        is not polled, so one that died since its last call is found by its next one.
        """
        if self.killed or self.closing is not None or self._lost or self._dead is not None:
            return False
        return not (self._description.done() and self._description.exception() is not None)

    @property
    def label(self) -> str:
        """``pid N on HOST (node 1a2b3c4d)`` once the actor has started."""
        if not self.pid:
            return "a starting actor"
        where = f" on {self.host}" if self.host else ""
        node = f" (node {self.node[:8]})" if self.node else ""
        return f"pid {self.pid}{where}{node}"

    # work ----------------------------------------------------------------
    def submit(self, shard: bytes) -> Future[bytes]:
        """Queue a shard; the future fails with RayActorError or LostWorker if the actor dies."""
        future: Future[bytes] = Future()
        with self._lock:
            if not self._futures:
                self._heard = max(self._heard, time.monotonic())  # owed from now on
            index, self._next = self._next, self._next + 1
            self._futures[index] = future
            self._queued.append((index, shard, future))
        future.add_done_callback(partial(self._forget, index))
        if self._lost is not None:
            _resolve(future, exc=self._lost)
        self._send()
        return future

    def _forget(self, index: int, _: Future[bytes]) -> None:
        self._futures.pop(index, None)

    def _send(self) -> None:
        """Send the queued shards once the actor has described itself (fail them if it died)."""
        if not self._description.done():
            return
        failure = self._description.exception()
        if failure is None:
            self._heard = max(self._heard, time.monotonic())
        with self._lock:  # held while sending, so that shards leave in the order they came
            while self._queued:
                index, shard, future = self._queued.popleft()
                if future.done():
                    continue
                if failure is not None:
                    self._fail(future, failure)
                else:
                    sent = self._actor.run_shard.remote(index, shard).future()
                    sent.add_done_callback(partial(self._settle, future))

    def _settle(self, future: Future[bytes], sent: Future[bytes]) -> None:
        """Pass the outcome of the Ray call ``sent`` to the future handed to the scheduler."""
        exc = sent.exception()
        if exc is None:
            self._heard = time.monotonic()
            _resolve(future, result=sent.result())
        else:
            self._fail(future, exc)

    def _fail(self, future: Future[bytes], exc: BaseException) -> None:
        """Fail ``future`` with ``exc``; for a dead actor, once what it left has been read."""
        if future.done():
            return
        if not isinstance(exc, RayActorError) or self.killed:
            _resolve(future, exc=exc)
            return
        with self._lock:
            if self._dead is None:
                self._dead = Future()
                threading.Thread(
                    target=self._examine, args=(exc,), name="procval-ray-autopsy", daemon=True
                ).start()
        self._dead.add_done_callback(lambda _: _resolve(future, exc=exc))

    # polling -------------------------------------------------------------
    def running(self) -> list[tuple[int, float]]:
        """Examples running now: the last answer, aged since it came; never waits on the actor.

        The answer comes from the actor's poll method; if a poll goes unanswered for
        ``STALL`` seconds (C code holding the actor's GIL), from a task that reads the actor's
        slot table on its node. An answer ages by ``STALL`` at most: an example counts as
        running long only while the actor or its node still answers, so a frozen node's
        examples are lost (see :meth:`check`), never timed out.
        """
        if self._remains is not None:
            return self._remains.running
        if self._dead is not None or self._lost is not None:
            return []
        self._refresh()
        answer = self._answer
        if answer is None:
            return []
        # The slot table is the actor's, not a shard's: an example may outlive the shard it
        # came in (a straggler, or one past the timeout that a drain did not wait for).
        _, busy, received = answer
        age = min(time.monotonic() - received, STALL)
        return [(seq, seconds + age) for seq, seconds in busy]

    def _refresh(self) -> None:
        if self.killed or self._described() is None or self._dead is not None:
            return
        with self._poll_lock:
            poll = self._poll
            if poll is None or poll.done():
                if poll is not None and isinstance(poll.exception(), RayActorError):
                    return  # the actor is gone: its shards' futures say how
                self._poll, self._polled = self._actor.running.remote().future(), time.monotonic()
                self._poll.add_done_callback(self._on_answer)
            elif time.monotonic() - self._polled > STALL and (
                self._peek is None or self._peek.done()
            ):
                self._peek = self._read_files(final=False).future()
                self._peek.add_done_callback(self._on_peek)

    def _on_answer(self, poll: Future[Any]) -> None:
        if poll.exception() is None:
            index, busy = poll.result()
            self._heard = time.monotonic()
            self._answer = (index, busy, self._heard)

    def _on_peek(self, peek: Future[Any]) -> None:
        if peek.exception() is None and peek.result().found:
            # the stalled actor runs its oldest unfinished shard
            index = min(list(self._futures), default=-1)
            self._heard = time.monotonic()
            self._answer = (index, peek.result().running, self._heard)

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

    def check(self, *, lost_after: float, placement_timeout: float) -> str | None:
        """Poll the actor; if it owes work and is silent, or never started, say why it is lost.

        Called by the backend's monitor thread, never by the scheduler. Returns "unplaced" when
        no node took it within ``placement_timeout`` (the caller words the error, it knows the
        cluster; an actor still in its constructor, a slow ``Config.setup``, was placed), "silent"
        after declaring it lost, else None.
        """
        if self.killed or self._dead is not None or self._lost is not None:
            return None
        now = time.monotonic()
        if not self._description.done():
            if self._placed or now - self.created <= placement_timeout:
                return None
            self._placed = was_placed(self._name)
            return None if self._placed else "unplaced"
        if self._description.exception() is not None:
            return None  # it died starting: its shards fail with Ray's error
        if not self._futures:
            return None
        self._refresh()
        silent = now - self._heard
        if silent > lost_after:
            self.lose(
                LostWorker(
                    f"the actor {self.label} stopped answering for {silent:.0f}s (lost_after="
                    f"{lost_after:g}); its node froze or is cut off, so it was killed and replaced"
                )
            )
            return "silent"
        return None

    def lose(self, exc: LostWorker) -> None:
        """Give up on the actor: kill it and fail its shards with ``exc`` (no autopsy)."""
        self._lost = exc
        self._remains = Remains(found=False, running=[])
        self._how = exc.how
        for future in list(self._futures.values()):  # before kill(), which cancels queued ones
            _resolve(future, exc=exc)
        self.kill()

    # failures ------------------------------------------------------------
    def silent_for(self) -> float:
        """0.0: the backend's own monitor finds a frozen actor (``RayBackend(lost_after=)``)."""
        return 0.0

    def death(self, exc: BaseException) -> str | None:
        """How the actor died, if ``exc`` says it did: exit code, fatal signal or Ray's reason.

        Never waits: the shard's future failed only after the autopsy was done.
        """
        if isinstance(exc, LostWorker):
            return exc.how
        if not isinstance(exc, RayActorError):
            return None
        if self._how is None:  # a call that failed without an autopsy (killed meanwhile)
            self._how = self._explain(exc, self._remains or Remains(found=False, running=[]))
        return self._how

    def crash_log(self) -> str:
        """The dead actor's fault handler output (a native traceback), read on its node."""
        return self._remains.fault if self._remains is not None else ""

    def _examine(self, exc: RayActorError) -> None:
        """In a thread of its own: read what the dead actor left, then release its futures."""
        try:
            message = getattr(exc, "error_msg", "") or str(exc)
            pid = re.search(r"\bpid[:=] ?(\d+)", message)
            self._error_pid = int(pid.group(1)) if pid else 0
            remains = Remains(found=False, running=[])
            with contextlib.suppress(Exception):
                remains = self._read_remains(message) or remains
            self._remains = remains
            self._how = self._explain(exc, remains)
        finally:
            assert self._dead is not None
            self._dead.set_result(None)

    def _explain(self, exc: RayActorError, remains: Remains) -> str:
        message = getattr(exc, "error_msg", "") or str(exc)
        if getattr(exc, "actor_init_failed", False):
            return f"the actor failed to start ({_last_line(message)})"
        if remains.exit_status is not None:
            return f"the worker process died with exit code {remains.exit_status}"
        first = remains.fault.partition("\n")[0]
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

    def _read_remains(self, message: str) -> Remains | None:
        alive = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
        if self._described():
            targets = [(self.node, "")] if self.node in alive else []  # a dead node: skip
        else:  # died while starting: find its node by the IP in Ray's message
            ip = re.search(r"\bip[:=] ?([0-9A-Fa-f.:]+[0-9A-Fa-f])", message)
            found = [n for n in alive.values() if ip and n["NodeManagerAddress"] == ip.group(1)]
            self._error_node = found[0].get("NodeManagerHostname", "") if found else ""
            targets = [(n["NodeID"], self._name) for n in found]
        for node_id, name in targets:
            ref = self._read_files(final=True, node_id=node_id, path=name)
            try:
                remains: Remains = ray.get(ref, timeout=REMAINS_TIMEOUT)
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
        return self._remains is not None and self._remains.found


def _resolve(
    future: Future[bytes], *, result: bytes = b"", exc: BaseException | None = None
) -> None:
    """Settle ``future`` unless it already is (cancelled, or failed as lost meanwhile)."""
    with contextlib.suppress(InvalidStateError):
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)


def _last_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[-1] if lines else message


_remote_cache: dict[Any, Any] = {}


def _remote(fn: Any) -> Any:
    """``ray.remote`` for the small file tasks, made once (no CPU, no retries)."""
    if fn not in _remote_cache:
        _remote_cache[fn] = ray.remote(num_cpus=0, max_retries=0)(fn)
    return _remote_cache[fn]
