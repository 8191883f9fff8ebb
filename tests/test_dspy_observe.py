"""What happens in the workers is seen in the caller: DSPy callbacks, LM history, logs (issue 14).

Offline, against the stand-in server of tests/helpers/llm_server.py.
"""

from __future__ import annotations

import collections
import importlib
import logging
import os
import pickle
import threading

import pytest

dspy = pytest.importorskip("dspy")

from dspy.clients import base_lm  # noqa: E402

import procval  # noqa: E402
import procval.dspy  # noqa: E402
from helpers import observe_programs as programs  # noqa: E402
from helpers.llm_server import LLMServer  # noqa: E402
from helpers.log_capture import captured_logs  # noqa: E402

pytestmark = pytest.mark.dspy


@pytest.fixture(autouse=True)
def restore_dspy_settings():
    module = importlib.import_module("dspy.dsp.utils.settings")
    saved = dict(module.main_thread_config)
    yield
    dspy.configure(**saved)


@pytest.fixture
def server():
    with LLMServer() as running:
        yield running


def lm_of(server: LLMServer) -> dspy.LM:
    return dspy.LM(server.model, api_base=server.api_base, api_key="sk-test", cache=False)


def lineage(events: list) -> tuple[collections.Counter, int, bool]:
    """Counts per hook, top-level module calls under Evaluate, every parent a known call."""
    counts = collections.Counter(hook for hook, *_ in events)
    evaluate = next(call for hook, call, *_ in events if hook == "on_evaluate_start")
    starts = {call for hook, call, *_ in events if hook.endswith("_start")}
    top = sum(
        1 for hook, _, parent, _ in events if hook == "on_module_start" and parent == evaluate
    )
    known = all(parent in starts for hook, _, parent, _ in events if hook != "on_evaluate_start")
    return counts, top, known


def run(
    evaluate_class: type, server: LLMServer, n: int, program: object = None, threads: int = 4
) -> tuple[list, dspy.LM, float]:
    callback = programs.Counting()
    lm = lm_of(server)
    dspy.configure(lm=lm, callbacks=[callback])
    program = programs.Pipeline() if program is None else program
    try:
        result = evaluate_class(
            devset=programs.devset(n), metric=programs.exact, num_threads=threads
        )(program)
    finally:  # the callback's events hold the Evaluate, whose warm workers live as long as it
        dspy.configure(callbacks=[])
    return callback.events, lm, result.score


def test_callback_counts_and_lineage_equal_dspy_evaluate(server, no_leaked_workers):
    theirs, _, their_score = run(dspy.Evaluate, server, 12)
    ours, _, our_score = run(procval.dspy.Evaluate, server, 12)
    assert our_score == their_score == 100.0
    assert lineage(ours) == lineage(theirs)
    counts, top, _ = lineage(ours)
    assert counts["on_lm_start"] == counts["on_lm_end"] == 24
    assert counts["on_evaluate_start"] == counts["on_evaluate_end"] == 1
    assert top == 12  # every top-level module call hangs under the Evaluate call
    # the parent's own objects where it has them: its LM, its program's modules by path
    instances = {type(instance).__name__ for hook, _, _, instance in ours if hook.endswith("start")}
    assert {"Pipeline", "Predict", "LM", "ChatAdapter"} <= instances


def _as_plain(value):
    """What a handler received, comparable across processes (the relay's documented changes)."""
    if isinstance(value, dspy.Example):  # a Prediction too: its fields, its completions' signature
        signature = getattr(vars(value).get("_completions"), "signature", None)
        if isinstance(signature, type):
            signature = signature.signature
        return (type(value).__name__, dict(value._store), signature)
    if isinstance(value, type) and issubclass(value, dspy.Signature):
        return value.signature
    if isinstance(value, dict):
        return {k: _as_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_plain(v) for v in value]
    return value


def _per_example(calls: list) -> dict[str, list]:
    """Each example's calls, by question (contiguous: one thread in DSPy, one replay per row)."""
    examples: dict[str, list] = {}
    current: list = []
    for call in calls:
        hook, _, instance, data, _ = call
        if hook == "on_module_start" and type(instance).__name__ == "Pipeline":
            current = examples.setdefault(data["kwargs"]["question"], [])
        if not hook.startswith("on_evaluate"):
            current.append(call)
    return examples


def _shape(calls: list) -> list:
    """Hooks, instance types, plain data, exceptions, and which outputs are the same object."""
    outputs: list = []
    shape = []
    for hook, _, instance, data, exception in calls:
        same = None
        if hook.endswith("_end"):
            same = next((i for i, o in enumerate(outputs) if o is data), len(outputs))
            outputs.append(data)
        shape.append((hook, type(instance).__name__, _as_plain(data), repr(exception), same))
    return shape


def captured(evaluate_class: type, server: LLMServer, n: int, program: object, threads: int):
    """What a capturing callback in the caller received from an evaluation of ``program``."""
    callback = programs.Capturing()
    dspy.configure(lm=lm_of(server), callbacks=[callback])
    try:
        evaluate_class(devset=programs.devset(n), metric=programs.exact, num_threads=threads)(
            program
        )
    finally:
        dspy.configure(callbacks=[])
    return callback.calls


def test_handlers_receive_what_dspy_passes_them(server):
    def run_with(evaluate_class, threads):
        return _per_example(captured(evaluate_class, server, 4, programs.Pipeline(), threads))

    theirs, ours = run_with(dspy.Evaluate, 1), run_with(procval.dspy.Evaluate, 2)
    assert sorted(ours) == sorted(theirs) == [f"q{i}" for i in range(4)]
    for question, calls in theirs.items():
        assert len(calls) == 20
        assert _shape(ours[question]) == _shape(calls)  # data, instances, shared predictions


def test_hooks_no_callback_implements_are_not_recorded(server):
    from procval.integrations._dspy_observe import Recorder, needed_hooks
    from procval.wire import ExampleResult
    from procval.worker import record

    assert not {h for h in needed_hooks([programs.ModulesAndLMs()]) if "adapter" in h}
    both = needed_hooks([programs.ModulesAndLMs(), programs.Counting()])
    assert both == set(programs.HOOKS)
    recorder = pickle.loads(pickle.dumps(Recorder("t", ["on_lm_end"])))  # as the workers get it
    token = record.begin(0)
    recorder.on_adapter_parse_end(call_id="a", outputs={"answer": "x"}, exception=None)
    recorder.on_lm_end(call_id="b", outputs=["x"], exception=None)
    result = record.end(token, ExampleResult(0, None, 1.0, None, 1, 0.0))
    events = record.decoded(result.events)
    assert [(payload[1], payload[2]) for _, payload in events] == [("on_lm_end", "b")]
    counts = {}
    for evaluate_class in (dspy.Evaluate, procval.dspy.Evaluate):
        callback = programs.ModulesAndLMs()
        dspy.configure(lm=lm_of(server), callbacks=[callback])
        try:
            evaluate_class(devset=programs.devset(3), metric=programs.exact, num_threads=2)(
                programs.Pipeline()
            )
        finally:
            dspy.configure(callbacks=[])
        counts[evaluate_class] = collections.Counter(hook for hook, *_ in callback.events)
    assert counts[dspy.Evaluate] == counts[procval.dspy.Evaluate]
    assert counts[procval.dspy.Evaluate]["on_lm_start"] == 6


@pytest.mark.skipif(not programs.INTERPRETER_HOOKS, reason="DSPy < 3.4.1: no interpreter hooks")
def test_interpreter_and_compile_events_equal_dspy_evaluate(server, no_leaked_workers):
    # worker records arrive on the same loggers here
    with captured_logs("dspy") as captured:
        theirs, _, their_score = run(dspy.Evaluate, server, 6, programs.Interpreting())
        program = programs.Interpreting()
        ours, _, our_score = run(procval.dspy.Evaluate, server, 6, program)
    assert not [m for m in captured.messages if "callback" in m], captured.messages
    assert our_score == their_score == 100.0
    assert lineage(ours) == lineage(theirs)
    counts, top, _ = lineage(ours)
    per_example = {"startup": 1, "execute": 3, "tool_call": 1, "shutdown": 1}
    for operation, n in per_example.items():
        assert counts[f"on_interpreter_{operation}_start"] == 6 * n
        assert counts[f"on_interpreter_{operation}_end"] == 6 * n
    assert counts["on_compile_start"] == counts["on_compile_end"] == 6
    assert counts["on_lm_start"] == 6 and top == 6
    # the interpreter the program holds is the caller's own; one made in the worker is a stand-in
    interpreters = [i for h, _, _, i in ours if h.startswith("on_interpreter") and i is not None]
    assert {id(i) for i in interpreters if i is program.interpreter}
    stand_ins = [i for i in interpreters if i is not program.interpreter]
    assert len(stand_ins) == 6 * 3  # the fresh one's start, execute, shutdown
    assert {(i.kind, i.type.rsplit(".", 1)[1], i.name) for i in stand_ins} == {
        ("interpreter", "Calculator", None)
    }
    (optimizer,) = {repr(i) for h, _, _, i in ours if h == "on_compile_start"}
    assert "optimizer" in optimizer and "LabeledFewShot" in optimizer


@pytest.mark.skipif(not programs.INTERPRETER_HOOKS, reason="DSPy < 3.4.1: no interpreter hooks")
def test_interpreter_handlers_receive_what_dspy_passes_them(server):
    def run_with(evaluate_class, threads):
        return [
            (hook, _as_plain(data), repr(exception))
            for hook, _, _, data, exception in captured(
                evaluate_class, server, 3, programs.Interpreting(), threads
            )
            if hook.startswith("on_interpreter")
        ]

    theirs, ours = run_with(dspy.Evaluate, 1), run_with(procval.dspy.Evaluate, 1)
    assert len(theirs) == 3 * 12
    assert sorted(ours, key=repr) == sorted(theirs, key=repr)  # FinalOutput, exceptions too


def test_an_evaluate_inside_the_program_is_relayed_with_the_other_hooks(server):
    counts = {}
    for evaluate_class in (dspy.Evaluate, procval.dspy.Evaluate):
        callback = programs.Counting()
        dspy.configure(lm=lm_of(server), callbacks=[callback])
        try:  # one thread: inner Evaluates in two threads race on DSPy's tqdm._instances.clear()
            evaluate_class(devset=programs.devset(3), metric=programs.exact, num_threads=1)(
                programs.Evaluating()
            )
        finally:
            dspy.configure(callbacks=[])
        counts[evaluate_class] = collections.Counter(hook for hook, *_ in callback.events)
    assert counts[procval.dspy.Evaluate] == counts[dspy.Evaluate]
    assert counts[procval.dspy.Evaluate]["on_evaluate_start"] == 1 + 3


def test_events_in_dspy_parallel_threads_are_relayed_as_dspy_evaluate_sees_them(server):
    """A dspy.Parallel inside the program runs its modules in DSPy's own pool threads."""
    # one example at a time: two dspy.Parallel at once in one process race in DSPy's own
    # progress bars (tqdm._instances), with dspy.Evaluate as in a worker
    theirs, _, their_score = run(dspy.Evaluate, server, 6, programs.Fanning(), threads=1)
    ours, lm, our_score = run(procval.dspy.Evaluate, server, 6, programs.Fanning(), threads=1)
    assert our_score == their_score == 100.0
    assert lineage(ours) == lineage(theirs)
    counts, _, _ = lineage(ours)
    assert counts["on_lm_start"] == counts["on_lm_end"] == 12
    assert len(lm.history) == 12


def test_a_hook_the_recorder_does_not_know_is_ignored_in_the_worker():
    from procval.integrations._dspy_observe import Recorder, needed_hooks

    recorder = pickle.loads(pickle.dumps(Recorder("t")))
    assert recorder.on_retrieval_start(call_id="a", instance=None, inputs={}) is None
    assert recorder.on_retrieval_end(call_id="a", outputs=None, exception=None) is None
    with pytest.raises(AttributeError):
        getattr(recorder, "something_else")

    class Future(programs.Counting):
        def on_retrieval_start(self, call_id, instance, inputs):  # not a hook of this DSPy
            self.add("on_retrieval_start", call_id, instance)

    assert "on_retrieval_start" not in needed_hooks([Future()])


def test_evaluate_and_compile_hooks_alone_add_no_recording():
    from dspy.utils.callback import BaseCallback

    from procval.integrations._dspy_observe import needed_hooks

    class Outer(BaseCallback):
        def on_evaluate_start(self, call_id, instance, inputs):
            pass

        def on_compile_end(self, call_id, outputs, exception=None):
            pass

    assert needed_hooks([Outer()]) == frozenset()
    assert needed_hooks([Outer(), programs.ModulesAndLMs()]) >= {"on_evaluate_start"}


def test_each_example_replays_in_order(server):
    events, _, _ = run(procval.dspy.Evaluate, server, 6)
    open_calls: set[str] = set()
    for hook, call, _, _ in events:
        if hook.endswith("_start"):
            open_calls.add(call)
        else:
            assert call in open_calls, f"{hook} of {call} before its start"
            open_calls.remove(call)
    assert not open_calls


def test_lm_history_holds_every_worker_call_in_example_order(server):
    before = len(base_lm.GLOBAL_HISTORY)
    _, lm, _ = run(procval.dspy.Evaluate, server, 10)
    answered = server.counts()["answered"]
    assert len(lm.history) == answered == 20
    assert len(base_lm.GLOBAL_HISTORY) - before == answered
    questions = [entry["messages"][-1]["content"].split("\n")[1] for entry in lm.history]
    assert questions == [f"q{i}" for i in range(10) for _ in range(2)]


def test_history_is_bounded_as_dspy_bounds_it(server):
    dspy.configure(max_history_size=5)
    _, lm, _ = run(procval.dspy.Evaluate, server, 6)
    assert len(lm.history) == 5


def test_a_worker_keeps_its_latest_history_entries_and_the_caller_gets_them_all(server):
    """A long run does not grow each worker by DSPy's 10,000 entries: they are the caller's."""
    from procval.integrations._dspy_observe import WORKER_HISTORY

    lm = lm_of(server)
    calls = WORKER_HISTORY + 30
    result = procval.evaluate(
        programs.histories_after(calls),
        [0],
        lambda example, prediction: 1.0,
        config=procval.dspy.snapshot(lm=lm),
        workers=1,
    )
    assert result.rows[0].prediction == {"lm": WORKER_HISTORY, "global": WORKER_HISTORY}
    assert len(lm.history) == calls == server.counts()["answered"]  # here: DSPy's bound


def test_each_example_has_its_own_dspy_trace_in_the_workers(server):
    """Not one list per worker that every call appends to (10,000 predictions, never read)."""
    dspy.configure(lm=lm_of(server))
    result = procval.dspy.Evaluate(
        devset=programs.devset(12), metric=programs.exact, num_threads=4, workers=1
    )(programs.TraceLength())
    assert [prediction.trace for _, prediction, _ in result.results] == [2] * 12


def test_in_worker_callback_runs_once_per_event_in_the_workers(server, tmp_path):
    path = str(tmp_path / "events.txt")
    here = programs.Counting()
    dspy.configure(lm=lm_of(server), callbacks=[here, programs.ToFile(path)])
    procval.dspy.Evaluate(devset=programs.devset(5), metric=programs.exact, num_threads=2)(
        programs.Pipeline()
    )
    with open(path) as f:
        lines = [line.split() for line in f]
    assert {int(pid) for pid, _ in lines}.isdisjoint({os.getpid()})
    theirs = collections.Counter(hook for _, hook in lines)
    mine = collections.Counter(hook for hook, *_ in here.events)
    assert theirs["on_lm_start"] == mine["on_lm_start"] == 10
    assert "on_evaluate_start" not in theirs  # Evaluate runs here, for the callbacks here
    assert {k: v for k, v in mine.items() if not k.startswith("on_evaluate")} == theirs


def test_procval_evaluate_with_a_snapshot_relays_too(server):
    callback = programs.Counting()
    lm = lm_of(server)
    config = procval.dspy.snapshot(lm=lm, callbacks=[callback])
    result = procval.evaluate(
        programs.Pipeline(), programs.devset(4), programs.exact, config=config, workers=1
    )
    assert result.score == 1.0
    counts = collections.Counter(hook for hook, *_ in callback.events)
    assert counts["on_lm_start"] == 8 and counts["on_module_start"] == 16
    assert len(lm.history) == 8


class _Release(logging.Handler):
    """Writes the flag file when example 0's record arrives, with what it carried."""

    def __init__(self, flag: str) -> None:
        super().__init__()
        self.flag = flag
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        with open(self.flag, "w") as f:
            f.write("go")


def test_worker_logs_arrive_while_the_run_goes(tmp_path, no_leaked_workers):
    flag = str(tmp_path / "flag")
    handler = _Release(flag)
    target = logging.getLogger("observe.test")
    target.addHandler(handler)
    try:
        # one worker, one thread: example 1 runs after example 0 in the same shard, and waits
        # for the file this process writes when example 0's record arrives
        result = procval.evaluate(programs.LogsThenWaits(flag), [0, 1], lambda e, p: 1.0, workers=1)
    finally:
        target.removeHandler(handler)
    assert [row.prediction for row in result.rows] == ["logged", "released"]
    (record,) = handler.records
    assert record.getMessage() == "example zero is done" and record.levelno == logging.WARNING
    assert record.procval_example_id == 0
    assert record.procval_pid == result.rows[0].worker_pid != os.getpid()
    assert record.name == "observe.test"


def test_prediction_fields_are_kept_in_rows_and_the_store(server, tmp_path):
    store = str(tmp_path / "run.db")
    dspy.configure(lm=lm_of(server))
    result = procval.dspy.Evaluate(
        devset=programs.devset(2), metric=lambda e, p, t=None: 1.0, store=store
    )(programs.Extra())
    prediction = result.results[0][1]
    assert (prediction.answer, prediction.confidence, prediction.notes) == ("Q0", 0.5, ["a", "b"])
    (stored,) = procval.load(store).values()
    kept = stored.rows[0].prediction["prediction"]
    assert kept == {"answer": "Q0", "confidence": 0.5, "notes": ["a", "b"]}


def _records_unpicklable_for_odd(example: int) -> str:
    """Records a lock (cannot be pickled) for odd examples, a plain value for even ones."""
    from procval.worker import record

    record.add("probe", threading.Lock() if example % 2 else example)
    return f"done {example}"


def _records_a_lambda_for_odd(example: int) -> str:
    """Records what only cloudpickle takes (a lambda) for odd examples, a plain value for even."""
    from procval.worker import record

    record.add("probe", (lambda: example) if example % 2 else example)
    return f"done {example}"


def test_events_pickle_cannot_take_travel_with_cloudpickle(no_leaked_workers):
    from procval.run import replay

    delivered: dict[int, object] = {}
    replay.register("probe", lambda config, row, payloads: delivered.update({row.index: payloads}))
    try:
        procval.evaluate(_records_a_lambda_for_odd, [0, 1, 2, 3], lambda e, p: 1.0, workers=1)
    finally:
        replay._handlers.pop("probe", None)
    assert {i: p if i % 2 == 0 else [p[0]()] for i, p in delivered.items()} == {
        i: [i] for i in range(4)
    }


def test_unpicklable_events_are_dropped_and_their_rows_kept(no_leaked_workers):
    from procval.run import replay

    delivered: list[tuple[int, list]] = []
    replay.register("probe", lambda config, row, payloads: delivered.append((row.index, payloads)))
    try:
        with captured_logs("procval") as captured:
            result = procval.evaluate(
                _records_unpicklable_for_odd, [0, 1, 2, 3], lambda e, p: 1.0, workers=1
            )
    finally:
        replay._handlers.pop("probe", None)
    assert [row.prediction for row in result.rows] == [f"done {i}" for i in range(4)]
    assert all(row.error is None and row.score == 1.0 for row in result.rows)
    assert sorted(delivered) == [(0, [0]), (2, [2])]  # the even examples' events still arrive
    warnings = [m for m in captured.messages if "dropped the recorded events" in m]
    assert sum(int(m.split(" of ")[1].split()[0]) for m in warnings) == 2  # one per shard
    assert all("lock" in m for m in warnings)
