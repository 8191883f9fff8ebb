"""The scheduler's recovery rules, without processes (``helpers.fake_backend``).

Each rule is tested through ``Scheduler.run()`` with scripted fake workers, and the pure rules of
``procval.run.lifecycle`` directly. The same rules with real processes, signals and timeouts are
in ``backend_suite.py``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from helpers.fake_backend import (
    Crash,
    Fail,
    FakeBackend,
    FakeWorker,
    Freeze,
    Hang,
    Late,
    Vanish,
)
from procval.errors import IsolationError, SetupError, TooManyErrors
from procval.results import Results, Row
from procval.run import lifecycle
from procval.run.dataset import Examples
from procval.run.lifecycle import LOST_LIMIT, START_FAILURES, ExampleFate, WorkerState
from procval.run.progress import Progress
from procval.run.scheduler import RunOptions, Scheduler
from procval.store.sink import MemorySink, Sink
from procval.store.writer import StoreSink
from procval.wire import Shard, Snapshot, WorkerOptions, WorkerSpec, WorkItem, fingerprint


def spec(name: str = "c", threads: int = 1, timeout: float | None = None) -> WorkerSpec:
    data = f"snapshot of {name}".encode()
    snapshot = Snapshot(name, data, fingerprint(data), identity=name, description={})
    return WorkerSpec(snapshot, WorkerOptions(threads=threads, timeout=timeout))


def run(
    backend: FakeBackend,
    n: int | dict[str, int | Iterable[Any]] = 20,
    *,
    workers: int = 1,
    sink: Sink | None = None,
    bound: float = 20.0,
    threads: int = 1,
    **options: Any,
) -> Results:
    """Run the scheduler over ``n`` examples (ids 0..n-1) per config, within ``bound`` s.

    A config's ``n`` may be an iterable of examples instead (a generator, say).
    """
    sizes = n if isinstance(n, dict) else {"c": n}
    data = {
        name: [{"id": i} for i in range(size)] if isinstance(size, int) else size
        for name, size in sizes.items()
    }
    totals = [size if isinstance(size, int) else None for size in sizes.values()]
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["results"] = Scheduler(
                backend,
                [spec(name, threads, options.get("timeout")) for name in sizes],
                [Examples(examples, passes=1) for examples in data.values()],
                sink or MemorySink(),
                Progress(list(sizes), totals, enabled=False),
                RunOptions(workers=workers, **options),
            ).run()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(bound)
    if thread.is_alive():
        pytest.fail(f"the scheduler did not finish within {bound:g}s")
    if "error" in outcome:
        raise outcome["error"]
    assert backend.shut_down
    return outcome["results"]


def rows(results: Results, name: str = "c") -> dict[Any, Row]:
    by_id = {row.example_id: row for row in results[name].rows}
    assert len(by_id) == len(results[name].rows), "an example has two rows"
    return by_id


def sent_alone(backend: FakeBackend) -> list[int]:
    """The examples sent as suspects: alone in a drain shard to an idle worker."""
    return [
        shard.items[0].example_id
        for w in backend.workers
        for i, shard in enumerate(w.shards)
        if len(shard.items) == 1 and shard.drain and _idle_before(w, i)
    ]


def _idle_before(w: FakeWorker, i: int) -> bool:
    return i == 0 or w.shards[i - 1].drain  # a drain is answered before anything else is sent


def only_in(number: int, ids: set[int], step: Any) -> Any:
    """A script: ``step`` for these example ids in worker ``number``, success elsewhere."""
    return lambda w, item: step if w.number == number and item.example_id in ids else item.example


# ---------------------------------------------------------------- the pure rules


def test_fate_after_death_rules():
    verdict = lifecycle.fate_after_death(
        [1, 2, 3, 4], {2}, alone=False, replied=True, losses={4: LOST_LIMIT}
    )
    assert verdict.fates == {
        1: ExampleFate.REQUEUE,  # not running: innocent
        2: ExampleFate.SUSPECT,  # running when the worker died
        3: ExampleFate.REQUEUE,
        4: ExampleFate.SUSPECT,  # lost LOST_LIMIT times already
    }
    assert not verdict.start_failure
    alone = lifecycle.fate_after_death([7], {7}, alone=True, replied=True, losses={})
    assert alone.fates == {7: ExampleFate.CRASHED}
    never_started = lifecycle.fate_after_death([7], set(), alone=True, replied=True, losses={})
    assert never_started.fates == {7: ExampleFate.SUSPECT}
    fresh = lifecycle.fate_after_death([1], set(), alone=False, replied=False, losses={})
    assert fresh.start_failure and fresh.fates == {1: ExampleFate.REQUEUE}


def test_fate_after_timeout_rules():
    fates = lifecycle.fate_after_timeout([1, 2], {2})
    assert fates == {1: ExampleFate.RERUN, 2: ExampleFate.TIMEOUT}


def test_fate_after_loss_rules():
    fates = lifecycle.fate_after_loss([1, 2, 3], {2}, alone=False, losses={3: LOST_LIMIT})
    assert fates == {
        1: ExampleFate.REQUEUE,  # only queued, or finished and not yet sent back
        2: ExampleFate.SUSPECT,  # running when its worker froze: rerun alone
        3: ExampleFate.SUSPECT,  # lost LOST_LIMIT times already
    }
    assert lifecycle.fate_after_loss([7], set(), alone=True, losses={}) == {7: ExampleFate.LOST}


def test_worker_transitions():
    S, E = WorkerState, lifecycle.WorkerEvent
    assert lifecycle.advance(S.STARTING, E.REPLIED) is S.PRODUCING
    assert lifecycle.advance(S.PRODUCING, E.SENT_SUSPECT) is S.ALONE
    assert lifecycle.advance(S.ALONE, E.REPLIED) is S.PRODUCING
    assert lifecycle.advance(S.ALONE, E.DIED) is S.DEAD
    with pytest.raises(RuntimeError, match="a alone worker cannot be sent a suspect"):
        lifecycle.advance(S.ALONE, E.SENT_SUSPECT)
    with pytest.raises(RuntimeError):
        lifecycle.advance(S.DEAD, E.REPLIED)


# ---------------------------------------------------------------- through the scheduler


def test_a_clean_run_has_one_row_per_example_and_closes_its_workers():
    backend = FakeBackend()
    results = run(backend, 20, workers=2)
    assert sorted(rows(results)) == list(range(20))
    assert all(row.error is None and row.worker_pid >= 1000 for row in results["c"].rows)
    assert all(w.closed for w in backend.workers) and backend.deaths == 0


def test_a_crash_with_stragglers_outstanding_suspects_only_the_running_example():
    # worker 0: shard [0, 1] replies with 1 still running; shard [2, 3]: 1 finishes unreported,
    # 2 crashes the worker, 3 never starts. Only 2 was running: 1 and 3 are innocent.
    def script(w: FakeWorker, item: WorkItem) -> Any:
        if w.number == 0 and item.example_id == 1:
            return Late()
        if w.number == 0 and item.example_id == 2:
            return Crash()
        return item.example

    backend = FakeBackend(script)
    results = run(backend, 20)
    assert [s.items for s in backend.workers[0].shards][:2] == [
        [WorkItem(0, 0, {"id": 0}), WorkItem(1, 1, {"id": 1})],
        [WorkItem(2, 2, {"id": 2}), WorkItem(3, 3, {"id": 3})],
    ]
    assert backend.workers[1].shards[0] == Shard([WorkItem(2, 2, {"id": 2})], True)
    assert sent_alone(backend) == [2]  # 1 and 3 were requeued, not run alone
    by_id = rows(results)
    assert sorted(by_id) == list(range(20))
    assert all(row.error is None for row in by_id.values())
    assert {by_id[i].worker_pid for i in (1, 2, 3)} == {1001}  # rerun in the next worker
    assert by_id[1].attempts == by_id[3].attempts == 1


def test_a_suspect_that_crashes_its_lone_worker_gets_a_worker_crashed_row():
    backend = FakeBackend(lambda w, item: Crash() if item.example_id == 2 else item.example)
    results = run(backend, 20)
    by_id = rows(results)
    assert sorted(by_id) == list(range(20))
    error = by_id[2].error
    assert error is not None and error.type == "WorkerCrashed"
    assert "killed by SIGKILL while running this example alone in fake pid 1001" in error.message
    assert error.traceback == "Fatal Python error: Segmentation fault"
    assert by_id[2].score == 0.0
    assert [i for i, row in by_id.items() if row.error] == [2]
    assert backend.deaths == 2  # the first worker, then the one that ran 2 alone


def test_a_suspect_that_succeeds_alone_gets_a_normal_row():
    backend = FakeBackend(only_in(0, {2}, Crash()))
    by_id = rows(run(backend, 20))
    assert by_id[2].error is None and by_id[2].prediction == {"id": 2}
    assert by_id[2].worker_pid == 1001
    assert sent_alone(backend) == [2]
    assert backend.deaths == 1


def test_an_example_lost_lost_limit_times_is_run_alone():
    # In workers 0..LOST_LIMIT, example 1 is still running when its shard replies and has
    # finished (unreported) when the worker dies of something else at its second shard: it
    # is innocent each time, until it was lost LOST_LIMIT times.
    doomed = LOST_LIMIT + 1

    def script(w: FakeWorker, item: WorkItem) -> Any:
        if w.number < doomed and item.example_id == 1:
            return Late()
        if w.number < doomed and len(w.shards) == 2:
            return Vanish()
        return item.example

    backend = FakeBackend(script)
    by_id = rows(run(backend, 40))
    assert backend.deaths == doomed
    assert sent_alone(backend) == [1]
    alone = next(
        w
        for w in backend.workers
        if w.shards[0].items[:1] == [WorkItem(1, 1, {"id": 1})] and len(w.shards[0].items) == 1
    )
    assert alone.number == doomed  # not before its LOST_LIMIT-th loss
    assert sorted(by_id) == list(range(40))
    assert all(row.error is None for row in by_id.values())


@pytest.mark.parametrize("deaths", [START_FAILURES - 1, START_FAILURES])
def test_workers_dying_before_any_result_end_the_run_at_the_start_failure_limit(deaths):
    backend = FakeBackend(start_deaths=deaths)
    if deaths < START_FAILURES:
        assert sorted(rows(run(backend, 10))) == list(range(10))
        return
    with pytest.raises(SetupError, match="die before running any example \\(exit code 1\\)"):
        run(backend, 10)
    assert len(backend.workers) == START_FAILURES


def test_a_setup_failure_is_a_setup_error_with_the_workers_traceback():
    with pytest.raises(SetupError, match=r"(?s)Config.setup of config 'c' failed.*no GPU") as info:
        run(FakeBackend(setup_fails=True), 5)
    assert dict(info.value.results) == {}


def test_a_config_whose_setup_fails_stops_alone_and_the_others_run_to_completion():
    backend = FakeBackend(setup_fails={"bad"})
    with pytest.raises(SetupError) as caught:
        run(backend, {"bad": 30, "good": 40}, workers=2)
    error = caught.value
    assert "Config.setup of config 'bad' failed" in str(error)
    assert "the other configs ('good') ran to completion" in str(error)
    assert list(error.results) == ["good"]  # the healthy config's result, complete
    assert sorted(rows(error.results, "good")) == list(range(40))
    traceback = error.tracebacks["bad"]  # the user's frames, not procval's
    assert "/home/user/tasks.py" in traceback and traceback.endswith("RuntimeError: no GPU\n")
    assert "runtime.py" not in traceback and "config.setup()" not in traceback
    assert all(w.killed for w in backend.workers if w.spec.snapshot.name == "bad")
    assert sum(w.spec.snapshot.name == "good" for w in backend.workers) == 2  # got bad's slot


def test_a_config_whose_workers_die_at_start_stops_alone():
    backend = FakeBackend(lambda w, item: Vanish() if w.spec.snapshot.name == "bad" else item)
    with pytest.raises(SetupError, match="workers of config 'bad' die before running any") as info:
        run(backend, {"bad": 10, "good": 30}, workers=2)
    assert sorted(rows(info.value.results, "good")) == list(range(30))
    assert info.value.tracebacks == {"bad": ""}  # nothing to show: they died without one
    assert sum(w.spec.snapshot.name == "bad" for w in backend.workers) == START_FAILURES


class DatasetBroke(Exception):
    """A user's dataset failing to read an example."""


def breaking(n: int, at: int) -> Iterator[dict[str, int]]:
    for i in range(n):
        if i == at:
            raise DatasetBroke(f"example {at} is unreadable")
        yield {"id": i}


def test_a_dataset_that_raises_midway_finishes_what_was_read_then_raises_its_error():
    # every third example is still running when its shard replies: in flight at the raise
    backend = FakeBackend(lambda w, item: Late() if item.example_id % 3 == 0 else item.example)
    sink = MemorySink()
    with pytest.raises(DatasetBroke, match="example 25 is unreadable") as caught:
        run(backend, {"c": breaking(40, 25)}, workers=2, sink=sink)
    kept = sink.result("c", 0.0).rows
    assert [row.example_id for row in kept] == list(range(25))  # all read, none twice
    assert all(row.error is None for row in kept)
    assert backend.deaths == 0 and all(w.closed for w in backend.workers)
    if sys.version_info >= (3, 11):
        (note,) = caught.value.__notes__
        assert "the 25 examples read before it ran" in note


def test_a_dataset_error_in_one_config_lets_the_other_finish():
    sink = MemorySink()
    with pytest.raises(DatasetBroke):
        run(FakeBackend(), {"broken": breaking(40, 10), "fine": 30}, workers=2, sink=sink)
    assert len(sink.result("broken", 0.0).rows) == 10
    assert len(sink.result("fine", 0.0).rows) == 30


def test_a_result_knows_the_rows_it_found_in_the_store_and_the_rows_it_added(tmp_path):
    path = str(tmp_path / "run.db")
    first = run(FakeBackend(), 10, sink=StoreSink(path, fresh=False, configs=["c"]))["c"]
    assert (first.found, first.added, len(first)) == (0, 10, 10)
    again = run(FakeBackend(), 15, sink=StoreSink(path, fresh=False, configs=["c"]))["c"]
    assert (again.found, again.added, len(again)) == (10, 5, 15)
    done = run(FakeBackend(), 15, sink=StoreSink(path, fresh=False, configs=["c"]))["c"]
    assert (done.found, done.added, len(done)) == (15, 0, 15)
    memory = run(FakeBackend(), 7)["c"]
    assert (memory.found, memory.added) == (0, 7)


class PrestartingBackend(FakeBackend):
    """A fake backend that can start what workers need ahead (as loky's fork server)."""

    def __init__(self, read: list[int]) -> None:
        super().__init__()
        self.events: list[str] = []
        self._read = read

    def prestart(self, specs: list[WorkerSpec]) -> None:
        self.events.append(f"prestart {[s.snapshot.name for s in specs]} at {len(self._read)}")

    def start_worker(self, spec: WorkerSpec) -> FakeWorker:
        self.events.append(f"worker at {len(self._read)}")
        return super().start_worker(spec)


def test_a_resume_reads_past_its_stored_rows_while_the_backend_prestarts(tmp_path):
    path = str(tmp_path / "run.db")
    read: list[int] = []

    def streamed(n: int) -> Iterator[dict[str, int]]:
        for i in range(n):
            read.append(i)
            yield {"id": i}

    run(FakeBackend(), {"c": streamed(10)}, sink=StoreSink(path, fresh=False, configs=["c"]))
    read.clear()
    backend = PrestartingBackend(read)
    sink = StoreSink(path, fresh=False, configs=["c"])
    again = run(backend, {"c": streamed(15)}, sink=sink)["c"]
    assert (again.found, again.added) == (10, 5)
    # the servers start first; the first worker once the stored 10 and the first new are read
    assert backend.events[:2] == ["prestart ['c'] at 1", "worker at 11"]  # 1: Examples' head
    read.clear()
    backend = PrestartingBackend(read)
    done = run(backend, {"c": streamed(15)}, sink=StoreSink(path, fresh=False, configs=["c"]))["c"]
    assert (done.found, done.added) == (15, 0)
    assert backend.events == ["prestart ['c'] at 1"]  # nothing left: no worker starts


def test_a_fresh_run_prestarts_every_configs_servers_before_its_first_worker():
    """Not only a resume: configs with environments of their own then get their servers started
    in parallel, not one after the other as each config's first worker asks for its own."""
    backend = PrestartingBackend([])
    results = run(backend, {"a": 3, "b": 3})
    assert [results[name].added for name in "ab"] == [3, 3]
    assert backend.events[0] == "prestart ['a', 'b'] at 0"
    assert backend.events[1:] and all(e.startswith("worker") for e in backend.events[1:])


def test_a_timeout_gives_the_late_example_a_row_and_reruns_the_others_in_flight():
    # 2 hangs past the timeout while 3 is in flight (running, within the timeout)
    def script(w: FakeWorker, item: WorkItem) -> Any:
        if w.number == 0 and item.example_id == 2:
            return Hang(seconds=100)
        if w.number == 0 and item.example_id == 3:
            return Hang(seconds=1)
        return item.example

    backend = FakeBackend(script)
    by_id = rows(run(backend, 20, timeout=5.0))
    error = by_id[2].error
    assert error is not None and error.type == "Timeout"
    assert "still running after 5s; worker fake pid 1000 was killed" in error.message
    assert by_id[3].error is None and by_id[3].worker_pid == 1001  # rerun elsewhere
    assert [i for i, row in by_id.items() if row.error] == [2]
    assert backend.workers[0].killed
    assert sent_alone(backend) == []  # a timeout explains the death: no suspects


def test_a_timeout_in_a_threaded_worker_costs_its_neighbours_nothing():
    # 2 hangs past the timeout while 3 and 4 are still running in the same worker: 2 gets its
    # Timeout row, the worker takes nothing new, 3 and 4 finish there, then it is replaced
    def script(w: FakeWorker, item: WorkItem) -> Any:
        if w.number == 0 and item.example_id == 2:
            return Hang(seconds=100)
        if w.number == 0 and item.example_id in (3, 4):
            return Late()
        return item.example

    backend = FakeBackend(script)
    by_id = rows(run(backend, 20, timeout=5.0, threads=4))
    assert [i for i, row in by_id.items() if row.error] == [2]
    assert by_id[2].error is not None and by_id[2].error.type == "Timeout"
    assert by_id[3].worker_pid == by_id[4].worker_pid == 1000  # finished where they ran
    assert backend.sent == 20  # nothing was sent twice: no work was redone
    assert backend.workers[0].killed and len(backend.workers) == 2  # drained, then replaced


def test_a_timeout_kills_at_once_a_worker_whose_threads_are_all_stuck():
    backend = FakeBackend(only_in(0, {1, 2}, Hang(seconds=100)))
    by_id = rows(run(backend, 12, timeout=5.0, threads=2))
    assert sorted(i for i, row in by_id.items() if row.error) == [1, 2]
    assert all(by_id[i].error.type == "Timeout" for i in (1, 2))  # type: ignore[union-attr]
    assert backend.workers[0].killed


def test_timeout_action_rules():
    act, s = lifecycle.timeout_action, WorkerState
    drain, kill, none = (lifecycle.TimeoutAction.DRAIN, lifecycle.TimeoutAction.KILL,
                         lifecycle.TimeoutAction.NONE)  # fmt: skip
    assert act({1, 2}, set(), state=s.PRODUCING, threads=4, stuck=0) is none
    assert act({1, 2}, {1}, state=s.PRODUCING, threads=4, stuck=1) is drain
    assert act({1, 2}, {1}, state=s.PRODUCING, threads=1, stuck=1) is kill  # one thread
    assert act({1}, {1}, state=s.PRODUCING, threads=4, stuck=1) is kill  # nothing innocent
    assert act({1, 2}, {1}, state=s.ALONE, threads=4, stuck=1) is kill
    assert act({1, 2}, {1}, state=s.PRODUCING, threads=2, stuck=2) is kill  # all stuck
    assert act({2}, set(), state=s.DRAINING, threads=4, stuck=1) is none  # 2 still runs
    assert act(set(), set(), state=s.DRAINING, threads=4, stuck=1) is kill  # drained
    assert act({2, 3}, set(), state=s.DRAINING, threads=2, stuck=2) is kill  # all stuck


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_a_worker_frozen_between_examples_is_replaced_and_its_examples_rerun(timeout):
    # worker 0 freezes after running example 3 (as if stopped while it pickles its results):
    # nothing runs, so no timeout can fire; it owes answers and is silent past the bound
    backend = FakeBackend(only_in(0, {3}, Freeze()))
    by_id = rows(run(backend, 20, timeout=timeout, liveness=5.0))
    assert sorted(by_id) == list(range(20))
    assert all(row.error is None and row.attempts == 1 for row in by_id.values())
    assert by_id[3].worker_pid != 1000  # rerun in a fresh worker
    assert backend.workers[0].killed


def test_an_example_running_when_its_worker_froze_is_rerun_alone():
    backend = FakeBackend(only_in(0, {2}, Freeze(running=True)))
    by_id = rows(run(backend, 10, liveness=5.0))
    assert all(row.error is None for row in by_id.values())
    assert sent_alone(backend) == [2]


def test_an_example_that_freezes_its_lone_worker_too_gets_a_worker_lost_row():
    backend = FakeBackend(lambda w, item: Freeze(running=True) if item.example_id == 2 else 1)
    by_id = rows(run(backend, 6, liveness=5.0))
    error = by_id[2].error
    assert error is not None and error.type == "WorkerLost"
    assert "no sign of life for 3600s" in error.message and "PROCVAL_LIVENESS=5" in error.message
    assert [i for i, row in by_id.items() if row.error] == [2]


def test_max_errors_reached_mid_shard_stops_with_the_rows_so_far():
    sink = MemorySink()
    backend = FakeBackend(lambda w, item: Fail() if item.example_id % 2 else item.example)
    with pytest.raises(TooManyErrors, match="more than max_errors=2") as caught:
        run(backend, 40, sink=sink, max_errors=2)
    kept = caught.value.results["c"].rows
    assert 2 < caught.value.failed == sum(row.error is not None for row in kept)
    assert len(kept) < 40  # stopped early
    assert kept == sink.result("c", 0.0).rows  # what was delivered is kept
    assert all(w.killed or w.closed for w in backend.workers)


def test_stragglers_are_fetched_with_a_drain_when_nothing_else_is_left():
    backend = FakeBackend(lambda w, item: Late() if item.example_id == 4 else item.example)
    by_id = rows(run(backend, 5))
    assert sorted(by_id) == list(range(5))
    shards = backend.workers[0].shards
    assert shards[-1] == Shard([], True)  # the drain, after the last shard with 4
    assert any(WorkItem(4, 4, {"id": 4}) in s.items and not s.drain for s in shards)


def test_a_reply_with_another_snapshots_fingerprint_is_an_isolation_error():
    with pytest.raises(IsolationError, match="reports snapshot 0123456789abcdef, expected"):
        run(FakeBackend(fingerprint="0123456789abcdef"), 5)


def test_one_process_producing_rows_for_two_snapshots_is_an_isolation_error():
    with pytest.raises(IsolationError, match="process 7 on fakehost produced rows for snapshots"):
        run(FakeBackend(pid=lambda number: 7), {"a": 5, "b": 5}, workers=2)


def test_a_finished_configs_worker_slot_goes_to_a_config_with_work_left():
    backend = FakeBackend()
    results = run(backend, {"small": 2, "big": 60}, workers=2)
    assert len(rows(results, "small")) == 2 and len(rows(results, "big")) == 60
    names = [w.spec.snapshot.name for w in backend.workers]
    assert names[:2] == ["small", "big"]
    assert names.count("big") == 2  # the freed slot went to "big"
    assert backend.most_alive == 2
