"""The scheduler's states, and the rules that move a worker and an example between them.

Everything here is pure (no process, no future, no sink): the scheduler reports what happened,
these functions say what follows. ``tests/test_scheduler.py`` tests them directly and through
the scheduler with a fake backend.

A worker (one process, one config), :class:`WorkerState`::

                 a reply
     STARTING ──────────────▶ PRODUCING ◀─────── the suspect's reply ───────┐
        │                         │                                          │
        └──── a suspect sent ─────┴──── a suspect sent (when idle) ────▶ ALONE
                                                             (nothing else until it replies)

     STARTING, PRODUCING, ALONE ── nothing left to send ─────────────────▶ RETIRED (closed)
     STARTING, PRODUCING, ALONE ── died, timed out, or the run stopped ──▶ DEAD (killed)

An example (one row of the dataset), by where the scheduler keeps it::

      source ──▶ requeue ──sent in a shard──▶ outstanding ──its result──▶ a row
                    ▲                            │
                    │                            │ its worker was killed: an ExampleFate
                    └────── REQUEUE, RERUN ◀─────┤ (fate_after_death, fate_after_timeout)
                                                 ├──▶ SUSPECT ──▶ suspects ──sent alone,
                                                 │                first──▶ outstanding
                                                 ├──▶ CRASHED ──▶ a "WorkerCrashed" row
                                                 ├──▶ TIMEOUT ──▶ a "Timeout" row
                                                 └──▶ LOST ─────▶ a "WorkerLost" row

The rules for a death, in order (``fate_after_death``):

- the worker ran one suspect alone and that example was running: CRASHED (it killed two
  workers, the second one running nothing else);
- it ran alone (but the suspect never started), or the example was running (the worker's
  slot table showed it), or the example was lost ``LOST_LIMIT`` times already: SUSPECT;
- otherwise the example was only queued or finished-but-unreported in a worker that died of
  something else: REQUEUE, one more loss counted.

A death before the worker's first reply with nothing running is a *start failure*;
``START_FAILURES`` in a row (no reply from any worker of the config in between) stop that
config, as a ``SetupFailed`` reply does: the other configs run on, then ``SetupError`` is
raised. On a timeout the late examples are TIMEOUT and the others RERUN (no loss counted: the
timeout explains the death).

A worker that owes answers and shows no sign of life for ``liveness`` seconds (no heartbeat, no
CPU time: stopped, or frozen in the kernel) is *lost*: killed and replaced, and its examples
rerun without an attempt counted (``fate_after_loss``): those it was running go alone (SUSPECT),
the others back in the queue with a loss counted (REQUEUE), so that an example that freezes
every worker it meets is run alone after ``LOST_LIMIT`` losses; one whose lone worker is lost
too gets a "WorkerLost" row (LOST). A run never waits for ever on a frozen worker.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "LOST_LIMIT",
    "START_FAILURES",
    "DeathVerdict",
    "ExampleFate",
    "WorkerEvent",
    "WorkerState",
    "advance",
    "fate_after_death",
    "fate_after_loss",
    "fate_after_timeout",
]

START_FAILURES = 3  # fresh workers of a config dying before any result: give that config up
LOST_LIMIT = 3  # an example lost in this many unexplained deaths is run alone


class WorkerState(enum.Enum):
    """Where a worker is in its life (see the diagram above)."""

    STARTING = "starting"  # started, no reply yet
    PRODUCING = "producing"  # has replied; takes any shard
    ALONE = "alone"  # running one suspect by itself; gets nothing else until it replies
    RETIRED = "retired"  # closed: nothing was left to send it
    DEAD = "dead"  # killed: it died, timed out, or the run stopped

    @property
    def live(self) -> bool:
        """Whether the worker still belongs to its config."""
        return self not in (WorkerState.RETIRED, WorkerState.DEAD)


class WorkerEvent(enum.Enum):
    """What the scheduler does to, or hears from, a worker."""

    REPLIED = "replied"  # a shard's reply came back
    SENT_SUSPECT = "sent a suspect"  # a suspect was sent to it, alone
    RETIRED = "retired"  # closed: its config has nothing left to send
    DIED = "died"  # killed (after a death, a timeout, or at the end of a stopped run)


_S, _E = WorkerState, WorkerEvent
_TRANSITIONS: dict[tuple[WorkerState, WorkerEvent], WorkerState] = {
    (_S.STARTING, _E.REPLIED): _S.PRODUCING,
    (_S.PRODUCING, _E.REPLIED): _S.PRODUCING,
    (_S.ALONE, _E.REPLIED): _S.PRODUCING,
    (_S.STARTING, _E.SENT_SUSPECT): _S.ALONE,
    (_S.PRODUCING, _E.SENT_SUSPECT): _S.ALONE,
    **{(state, _E.RETIRED): _S.RETIRED for state in (_S.STARTING, _S.PRODUCING, _S.ALONE)},
    **{(state, _E.DIED): _S.DEAD for state in (_S.STARTING, _S.PRODUCING, _S.ALONE)},
}


def advance(state: WorkerState, event: WorkerEvent) -> WorkerState:
    """The worker's state after ``event``.

    Raises:
        RuntimeError: the transition is not in the diagram (a bug in the scheduler).
    """
    try:
        return _TRANSITIONS[state, event]
    except KeyError:
        raise RuntimeError(f"a {state.value} worker cannot be {event.value}") from None


class ExampleFate(enum.Enum):
    """What becomes of an example its worker did not answer, when that worker is killed."""

    REQUEUE = "requeue"  # innocent of a death: back in the queue, one loss counted
    RERUN = "rerun"  # innocent of a timeout: back in the queue, no loss counted
    SUSPECT = "suspect"  # may have killed the worker: rerun alone in its own worker
    CRASHED = "crashed"  # killed a worker while running alone: a "WorkerCrashed" row
    TIMEOUT = "timeout"  # ran past the timeout: a "Timeout" row
    LOST = "lost"  # its lone worker froze too: a "WorkerLost" row


@dataclass(frozen=True)
class DeathVerdict:
    """The consequences of one worker's death.

    Attributes:
        fates: each lost example's fate, by seq, in the order given.
        start_failure: the worker died before its first reply with nothing running.
    """

    fates: dict[int, ExampleFate]
    start_failure: bool


def fate_after_death(
    lost: Iterable[int],
    running: Collection[int],
    *,
    alone: bool,
    replied: bool,
    losses: Mapping[int, int],
) -> DeathVerdict:
    """Decide what a dead worker's unanswered examples become.

    Args:
        lost: the seqs the worker was given and did not answer.
        running: the seqs its slot table showed running when it died.
        alone: it was running a suspect by itself.
        replied: it had replied at least once.
        losses: how often each example was lost before (REQUEUE fates so far).

    Returns:
        Each example's fate, and whether the death counts as a start failure.
    """
    fates: dict[int, ExampleFate] = {}
    for seq in lost:
        if alone and seq in running:
            fates[seq] = ExampleFate.CRASHED
        elif alone or seq in running or losses.get(seq, 0) >= LOST_LIMIT:
            fates[seq] = ExampleFate.SUSPECT
        else:
            fates[seq] = ExampleFate.REQUEUE
    return DeathVerdict(fates, start_failure=not replied and not running)


def fate_after_timeout(lost: Iterable[int], late: Collection[int]) -> dict[int, ExampleFate]:
    """Decide what a timed-out worker's unanswered examples become.

    Args:
        lost: the seqs the worker was given and did not answer.
        late: the seqs running longer than the timeout.

    Returns:
        TIMEOUT for each late example, RERUN for the others, by seq.
    """
    return {seq: ExampleFate.TIMEOUT if seq in late else ExampleFate.RERUN for seq in lost}


def fate_after_loss(
    lost: Iterable[int], running: Collection[int], *, alone: bool, losses: Mapping[int, int]
) -> dict[int, ExampleFate]:
    """Decide what a lost worker's (frozen, then killed) unanswered examples become.

    Args:
        lost: the seqs the worker was given and did not answer.
        running: the seqs its slot table showed running when it was found frozen.
        alone: it was running a suspect by itself.
        losses: how often each example was lost before (REQUEUE fates so far).

    Returns:
        LOST for a suspect that was alone, SUSPECT for the examples that were running (or lost
        ``LOST_LIMIT`` times already), REQUEUE for the others, by seq.
    """
    fates: dict[int, ExampleFate] = {}
    for seq in lost:
        if alone:
            fates[seq] = ExampleFate.LOST
        elif seq in running or losses.get(seq, 0) >= LOST_LIMIT:
            fates[seq] = ExampleFate.SUSPECT
        else:
            fates[seq] = ExampleFate.REQUEUE
    return fates
