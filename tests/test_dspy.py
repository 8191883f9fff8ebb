"""procval.dspy: settings snapshots and the drop-in Evaluate, offline with dict-mode DummyLMs."""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import re
import runpy
import subprocess
import sys
import threading

import loky
import pytest

dspy = pytest.importorskip("dspy")

import procval  # noqa: E402
from helpers import dspy_toys, toys  # noqa: E402
from procval.integrations._dspy_settings import _import_type  # noqa: E402
from procval.integrations.dspy import _plan  # noqa: E402

pytestmark = pytest.mark.dspy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "dspy_seed_scenario.py")
SECRET = "sk-test-0123456789abcdef"


@pytest.fixture(autouse=True)
def restore_dspy_settings():
    """Tests call dspy.configure (in pytest's thread, DSPy's owner): put the settings back."""
    module = importlib.import_module("dspy.dsp.utils.settings")  # `.settings` is also an object
    saved = dict(module.main_thread_config)
    yield
    dspy.configure(**saved)


# ---------------------------------------------------------------- import


def test_import_procval_does_not_import_dspy():
    code = "import sys, procval; print('dspy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
    assert procval.dspy is sys.modules["procval.dspy"]


def test_procval_dspy_is_a_module_to_import_from():
    code = (
        "import procval.dspy\n"
        "from procval.dspy import Evaluate, EvaluationResult, Scored, snapshot\n"
        "import procval.integrations.dspy as home\n"
        "assert Evaluate is home.Evaluate and snapshot is home.snapshot\n"
        "assert set(procval.dspy.__all__) == set(home.__all__)\n"
        "print(procval.dspy.Evaluate.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Evaluate"


@pytest.mark.parametrize(
    "statement",
    ["import procval; procval.dspy", "import procval.dspy", "from procval.dspy import Evaluate"],
)
def test_without_dspy_the_error_says_how_to_install_it(statement):
    code = f"import sys; sys.modules['dspy'] = None; {statement}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "ImportError" in out.stderr
    assert "pip install 'procval[dspy]'" in out.stderr


# ---------------------------------------------------------------- snapshot (no processes)


def test_snapshot_sees_the_callers_context_and_is_named_after_the_model():
    dspy.configure(lm=dspy.LM("openai/gpt-4o-mini", api_key=SECRET))
    with dspy.context(lm=dspy.LM("anthropic/claude-sonnet-4-6", api_key=SECRET)):
        config = procval.dspy.snapshot()
    assert config.name == "anthropic/claude-sonnet-4-6"
    assert config.values["model"] == "anthropic/claude-sonnet-4-6"
    assert config.env["LITELLM_LOCAL_MODEL_COST_MAP"] == os.environ.get(
        "LITELLM_LOCAL_MODEL_COST_MAP", "True"
    )
    assert procval.dspy.snapshot("mine").name == "mine"
    assert procval.dspy.snapshot().name == "openai/gpt-4o-mini"  # the context is over


def test_snapshot_keeps_the_api_key_out_of_values_and_describe():
    lm = dspy.LM(
        "openai/gpt-4o-mini",
        api_key=SECRET,
        temperature=0.5,
        extra_headers={"Authorization": f"Bearer {SECRET}"},
    )
    config = procval.dspy.snapshot(lm=lm)
    shown = json.dumps(config.describe()) + repr(config) + str(config.values)
    assert SECRET not in shown
    assert config.values["lm"]["kwargs"]["api_key"] == "***"
    assert config.values["lm"]["kwargs"]["temperature"] == 0.5
    assert "history" not in config.values["lm"]
    # ...but the workers get it: it lives in the pickled setup only.
    assert SECRET.encode() in pickle.dumps(config)


def test_snapshot_identity_is_stable_as_the_lm_is_used():
    lm = dspy_toys.knowing_lm()
    first = procval.dspy.snapshot(lm=lm)
    with dspy.context(lm=lm):
        dspy.Predict("question -> answer")(question=next(iter(dspy_toys.QUESTIONS)))
    assert len(lm.history) == 1
    assert procval.dspy.snapshot(lm=lm).identity() == first.identity()
    assert procval.dspy.snapshot(lm=dspy_toys.clueless_lm()).identity() != first.identity()


def test_snapshot_leaves_out_per_call_state():
    with dspy.context(trace=[("a predictor", {}, "a prediction")], caller_modules=["m"]):
        config = procval.dspy.snapshot(lm=dspy_toys.knowing_lm())
    settings, *_ = pickle.loads(config.setup._blob)
    assert procval.dspy.PER_CALL_SETTINGS.isdisjoint(settings)
    assert settings["lm"].history == []
    with pytest.raises(ValueError, match="trace"):
        procval.dspy.snapshot(trace=[])
    with pytest.raises(ValueError, match="unknown DSPy settings"):
        procval.dspy.snapshot(lm_model="x")


class _PicklableCallback(dspy.utils.BaseCallback):
    pass


class _LockedCallback(dspy.utils.BaseCallback):
    def __init__(self):
        self.lock = threading.Lock()

    def on_lm_start(self, call_id, instance, inputs):
        pass


def test_snapshot_drops_in_worker_callbacks_that_cannot_travel_with_a_warning():
    kept, locked = _PicklableCallback(), _LockedCallback()
    marked = [procval.dspy.in_worker(kept), procval.dspy.in_worker(locked)]
    with pytest.warns(UserWarning, match="left out of the snapshot"):
        config = procval.dspy.snapshot(callbacks=marked)
    settings, *_ = pickle.loads(config.setup._blob)
    assert [type(c.callback) for c in settings["callbacks"]] == [_PicklableCallback]


def test_snapshot_keeps_unmarked_callbacks_in_the_caller_and_never_pickles_them():
    from procval.integrations._dspy_observe import Recorder

    locked = _LockedCallback()  # cannot be pickled: no warning, it stays here
    config = procval.dspy.snapshot(callbacks=[locked])
    settings, *_ = pickle.loads(config.setup._blob)
    assert [type(c) for c in settings["callbacks"]] == [Recorder]
    assert settings["callbacks"][0].hooks == {"on_lm_start"}  # what the callback implements
    assert config.setup.relay.callbacks == [locked]


def test_a_callback_implementing_no_worker_event_adds_no_recorder():
    class _EvaluateOnly(dspy.utils.BaseCallback):
        def on_evaluate_start(self, call_id, instance, inputs):
            pass

    config = procval.dspy.snapshot(callbacks=[_EvaluateOnly()])
    settings, *_ = pickle.loads(config.setup._blob)
    assert settings["callbacks"] == []  # the workers' DSPy then runs without callbacks


def test_a_setting_that_cannot_be_pickled_is_named():
    with pytest.raises(procval.SnapshotError, match="DSPy setting 'rm'"):
        procval.dspy.snapshot(rm=threading.Lock())


@pytest.fixture
def restore_dspy_cache():
    saved = vars(dspy).get("cache")
    yield
    if saved is None:
        vars(dspy).pop("cache", None)
    else:
        dspy.cache = saved


def test_snapshot_carries_the_callers_cache_configuration(tmp_path, restore_dspy_cache):
    dspy.configure_cache(
        enable_disk_cache=True,
        enable_memory_cache=False,
        disk_cache_dir=str(tmp_path),
        restrict_pickle=True,
        safe_types=[_PicklableCallback],
    )
    config = procval.dspy.snapshot()
    _, cache, *_ = pickle.loads(config.setup._blob)
    assert cache["enable_disk_cache"] and not cache["enable_memory_cache"]
    assert cache["disk_cache_dir"] == str(tmp_path)
    assert cache["restrict_pickle"]
    assert _import_type(*cache["safe_types"][0]) is _PicklableCallback


def test_num_threads_maps_to_processes_times_threads():
    assert _plan(8, 2) == (2, 4)
    assert _plan(5, 2) == (2, 2)  # never more than num_threads in flight
    assert _plan(1, 4) == (1, 1)
    assert _plan(16, None) == (1, 16)  # by default, a process per 16 threads...
    processes = min(loky.cpu_count(), 4)  # ...up to the CPU count
    assert _plan(64, None) == (processes, 64 // processes)
    with dspy.context(num_threads=6):
        assert _plan(None, 3) == (3, 2)  # None: dspy.settings.num_threads, as in DSPy
    with pytest.raises(ValueError, match="num_threads"):
        _plan(-1, 2)


# ---------------------------------------------------------------- on worker processes


def test_seed_scenario_script():
    out = subprocess.run(
        [sys.executable, EXAMPLE], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert "gpt-4o: 100.0" in out.stdout
    assert "gpt-4o-mini: 0.0" in out.stdout


def test_seed_scenario_in_process():
    scores = runpy.run_path(EXAMPLE, run_name="dspy_seed_scenario")["main"]()
    assert scores == {"gpt-4o": 100.0, "gpt-4o-mini": 0.0}


def test_the_callers_dspy_context_is_honoured():
    dspy.configure(lm=dspy_toys.knowing_lm())
    evaluate = procval.dspy.Evaluate(
        devset=dspy_toys.devset(), metric=dspy_toys.exact_match, num_threads=2, workers=1
    )
    with dspy.context(lm=dspy_toys.clueless_lm()):
        result = evaluate(dspy.Predict("question -> answer"))
    assert result.score == 0.0
    assert {p.answer for _, p, _ in result.results} == {"I am not sure"}


def test_two_snapshots_side_by_side():
    knowing, clueless = dspy_toys.knowing_lm(), dspy_toys.clueless_lm()
    with dspy.context(lm=knowing):
        dspy_toys.Answer()(dspy_toys.devset()[0])
    configs = {
        "knowing": procval.dspy.snapshot(lm=knowing),
        "clueless": procval.dspy.snapshot(lm=clueless),
    }
    results = procval.evaluate(
        dspy_toys.Answer(), dspy_toys.devset(), dspy_toys.exact_match, configs=configs, workers=2
    )
    assert results["knowing"].score == 1.0
    assert results["clueless"].score == 0.0
    pids = {name: {row.worker_pid for row in r.rows} for name, r in results.items()}
    assert pids["knowing"].isdisjoint(pids["clueless"])
    # the workers used their own copies; each config's calls came back to its own LM
    assert len(knowing.history) == 1 + len(dspy_toys.devset())
    assert len(clueless.history) == len(dspy_toys.devset())
    assert all("I am not sure" in str(e["outputs"][0]) for e in clueless.history)


@pytest.mark.parametrize("module", [dspy.Predict, dspy.ChainOfThought])
def test_string_signature_programs(module):
    program = module("question -> answer")
    with pytest.raises(pickle.PicklingError):
        pickle.dumps(program)  # cloudpickle is what makes them travel
    evaluate = procval.dspy.Evaluate(
        devset=dspy_toys.devset(), metric=dspy_toys.exact_match, num_threads=2, workers=1
    )
    with dspy.context(lm=dspy_toys.knowing_lm()):
        result = evaluate(program)
    assert result.score == 100.0
    if module is dspy.ChainOfThought:
        assert all(p.reasoning == "I know this." for _, p, _ in result.results)


def test_results_match_dspy_evaluate(tmp_path, capsys):
    devset, metric = dspy_toys.devset(), dspy_toys.exact_match
    program = dspy.Predict("question -> answer")
    files = {kind: {"save_as_csv": tmp_path / f"{kind}.csv"} for kind in ("dspy", "procval")}
    for kind in files:
        files[kind]["save_as_json"] = tmp_path / f"{kind}.json"
    with dspy.context(lm=dspy_toys.half_lm()):
        theirs = dspy.Evaluate(devset=devset, metric=metric, num_threads=2, display_table=True)(
            program, **{k: str(v) for k, v in files["dspy"].items()}
        )
        their_table = capsys.readouterr().out
        ours = procval.dspy.Evaluate(
            devset=devset, metric=metric, num_threads=2, workers=1, display_table=True
        )(program, **{k: str(v) for k, v in files["procval"].items()})
        our_table = capsys.readouterr().out
    assert isinstance(ours, dspy.evaluate.EvaluationResult)
    assert ours.score == theirs.score == 50.0
    assert len(ours.results) == len(theirs.results) == len(devset)
    for (ex, pred, score), (their_ex, their_pred, their_score) in zip(
        ours.results, theirs.results, strict=True
    ):
        assert ex is their_ex
        assert pred.answer == their_pred.answer
        assert score == their_score
    assert our_table == their_table
    for kind in ("save_as_json", "save_as_csv"):
        assert files["procval"][kind].read_text() == files["dspy"][kind].read_text()
    # procval's side stays reachable.
    assert len(ours.rows) == len(devset) and not ours.errors
    assert ours.procval.config == "dummy"


def test_max_errors_keeps_what_finished():
    devset = dspy_toys.devset(
        {**dict(list(dspy_toys.QUESTIONS.items())[:2]), dspy_toys.UNKNOWN: "?", "Who?": "?"}
    )
    evaluate = procval.dspy.Evaluate(
        devset=devset,
        metric=dspy_toys.exact_match,
        num_threads=1,
        workers=1,
        max_errors=2,
        failure_score=0.25,
    )
    with dspy.context(lm=dspy_toys.knowing_lm()), pytest.raises(procval.TooManyErrors) as info:
        evaluate(dspy.Predict("question -> answer"))
    partial = info.value.results
    assert isinstance(partial, procval.dspy.EvaluationResult)
    finished = {ex.question: score for ex, _, score in partial.results}
    assert finished[next(iter(dspy_toys.QUESTIONS))] == 1.0
    assert len(partial.errors) == 2
    assert all(row.error.type == "AdapterParseError" for row in partial.errors)
    failed = [(p, s) for ex, p, s in partial.results if ex.answer == "?"]
    assert failed == [(dspy.Prediction(), 0.25)] * 2


def test_a_metric_returning_a_prediction_keeps_its_feedback_through_a_store(tmp_path):
    # Every example has id=0: procval numbers them by position instead (DSPy ignores ids).
    devset = [example.copy(id=0) for example in dspy_toys.devset()]
    evaluate = procval.dspy.Evaluate(
        devset=devset,
        metric=dspy_toys.feedback_metric,
        num_threads=2,
        workers=1,
        store=tmp_path / "run.sqlite",  # rows come back as JSON: predictions are rebuilt
    )
    with dspy.context(lm=dspy_toys.half_lm()):
        result = evaluate(dspy.Predict("question -> answer"))
    assert result.score == 50.0
    assert [s.feedback for *_, s in result.results] == ["ok", "wrong", "ok", "wrong"]
    assert [p.answer for _, p, _ in result.results] == [
        "Paris",
        "I am not sure",
        "blue",
        "I am not sure",
    ]
    assert [ex for ex, *_ in result.results] == devset
    assert [(row.example_id, row.score) for row in result.rows] == [
        (0, 1.0),
        (1, 0.0),
        (2, 1.0),
        (3, 0.0),
    ]


def test_bad_arguments_fail_before_any_worker_starts():
    evaluate = procval.dspy.Evaluate(devset=dspy_toys.devset())
    program = dspy.Predict("question -> answer")
    with pytest.raises(TypeError, match="metric must be callable"):
        evaluate(program)
    with pytest.raises(ValueError, match="empty devset"):
        evaluate(program, metric=dspy_toys.exact_match, devset=[])
    no_inputs = [dspy.Example(question="q", answer="a")]
    with pytest.raises(ValueError, match=r"devset\[0\] has no inputs"):
        evaluate(program, metric=dspy_toys.exact_match, devset=no_inputs)


# ---------------------------------------------------------------- procval.evaluate, DSPy programs


def _readme_dspy_block() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("\n## DSPy\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the README's DSPy section has one Python block"
    return blocks[0]


def test_the_readme_dspy_snippet_runs_as_written(capsys):
    """The block runs unchanged; only the LMs and the data are offline stand-ins."""
    names = {
        "gpt4o": dspy_toys.knowing_lm(),
        "gpt4o_mini": dspy_toys.clueless_lm(),
        "devset": dspy_toys.devset(),
        "metric": dspy_toys.exact_match,
    }
    exec(compile(_readme_dspy_block(), "README.md", "exec"), names)
    results, result = names["results"], names["result"]
    assert {name: r.score for name, r in results.items()} == {"gpt-4o": 1.0, "gpt-4o-mini": 0.0}
    assert not any(r.errors for r in results.values())
    assert result.score == 100.0 and not result.errors
    out, err = capsys.readouterr()
    assert " INFO dspy.evaluate.evaluate: Average Metric: 4 / 4 (100.0%)\n" in err  # DSPy's line
    assert "gpt-4o-mini   0.0000        4       0" in out


class _Answer(dspy.Module):
    """A module of one's own: forward takes the inputs as keywords only, as DSPy passes them."""

    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    def forward(self, *, question: str) -> dspy.Prediction:
        return self.predict(question=question)


@pytest.mark.parametrize(
    "make", [lambda: dspy.Predict("question -> answer"), _Answer], ids=["Predict", "Module"]
)
def test_evaluate_calls_a_dspy_module_the_dspy_way(make):
    config = procval.dspy.snapshot(lm=dspy_toys.knowing_lm())
    result = procval.evaluate(
        make(), dspy_toys.devset(), dspy_toys.exact_match, config=config, workers=1
    )
    assert not result.errors, result.summary()
    assert result.score == 1.0
    assert {row.prediction.answer for row in result.rows} == set(dspy_toys.QUESTIONS.values())


def test_a_dspy_program_keeps_its_identity_when_a_store_is_resumed(tmp_path):
    """DSPy gives each Predict random bytes (``stage``): a new object is still the same program."""
    store, devset = tmp_path / "run.sqlite", dspy_toys.devset()
    config = procval.dspy.snapshot("knowing", lm=dspy_toys.knowing_lm())
    procval.evaluate(
        _Answer(), devset[:2], dspy_toys.exact_match, config=config, store=store, workers=1
    )
    # warnings are errors here: a ProgramChangedWarning fails the test
    again = procval.evaluate(
        _Answer(), devset, dspy_toys.exact_match, config=config, store=store, workers=1
    )
    assert again.score == 1.0 and len(again) == 4


# ---------------------------------------------------------------- every example failed

LOUD = (
    "ALL 4 EXAMPLES FAILED: ValueError: cannot handle ex0; "
    "the score 0.0 is failure_score, not a measurement"
)


def _all_failing_store(tmp_path):
    store = tmp_path / "failed.sqlite"
    results = procval.evaluate(
        toys.failing_program,
        toys.dataset(4),
        toys.metric,
        configs={"broken": procval.Config()},
        store=store,
        workers=1,
    )
    return store, results


def test_a_config_whose_every_example_failed_says_so_loudly(tmp_path):
    store, results = _all_failing_store(tmp_path)
    assert LOUD in results["broken"].summary()
    assert f"broken: {LOUD}" in results.summary()
    loaded = procval.load(store)  # rows are not read: the first error comes from the store
    assert LOUD in loaded["broken"].summary()
    assert f"broken: {LOUD}" in loaded.summary()


def test_a_config_with_some_successes_gets_no_warning():
    result = procval.evaluate(toys.sometimes_failing, toys.dataset(10), toys.metric, workers=1)
    assert result.errors and len(result.errors) < len(result)
    assert "FAILED" not in result.summary()
    assert "FAILED" not in procval.Results({"c": result}).summary()


def test_procval_report_and_run_say_every_example_failed(tmp_path, capsys):
    from procval import cli

    store, _ = _all_failing_store(tmp_path)
    capsys.readouterr()
    assert cli.main(["report", str(store)]) == 0
    assert LOUD in capsys.readouterr().out
    task = tmp_path / "broken_task.py"
    task.write_text(
        "import procval\n"
        "from helpers import toys\n"
        "task = procval.Task(toys.failing_program, toys.dataset(4), toys.metric, workers=1)\n"
    )
    run = ["run", f"{task}:task", "--store", str(tmp_path / "run.db"), "--no-progress"]
    assert cli.main(run) == 0
    assert LOUD in capsys.readouterr().out


# ---------------------------------------------------------------- DSPy's console lines


def _scheduler_running() -> bool:
    from procval.run.scheduler import Scheduler

    frame = sys._getframe()
    while frame is not None:
        if frame.f_code is Scheduler.run.__code__:
            return True
        frame = frame.f_back
    return False


class _Recorder(logging.Handler):
    """Keeps each record with whether the run was still going when it was logged."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[logging.LogRecord, bool]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record, _scheduler_running()))


@pytest.mark.parametrize("provide_traceback", [False, True])
def test_failed_examples_are_logged_as_they_happen_in_dspys_words(provide_traceback):
    devset = dspy_toys.devset({**dspy_toys.QUESTIONS, dspy_toys.UNKNOWN: "?"})
    recorder = _Recorder()
    dspy_logger = logging.getLogger("dspy")
    dspy_logger.addHandler(recorder)
    try:
        evaluate = procval.dspy.Evaluate(
            devset=devset,
            metric=dspy_toys.exact_match,
            num_threads=2,
            workers=1,
            provide_traceback=provide_traceback,
        )
        with dspy.context(lm=dspy_toys.knowing_lm()):
            evaluate(dspy.Predict("question -> answer"))
    finally:
        dspy_logger.removeHandler(recorder)
    errors = [(r, live) for r, live in recorder.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    record, live = errors[0]
    assert live, "the error was logged after the run, not as it happened"
    assert record.name == "dspy.utils.parallelizer"  # DSPy's handler: time, level, name
    message = record.getMessage()
    assert message.startswith(f"Error for {devset[-1]}: AdapterParseError: ")
    assert ("Traceback (most recent call last)" in message) == provide_traceback
    assert ("Set `provide_traceback=True` for traceback." in message) != provide_traceback
    average = [r for r, _ in recorder.records if r.getMessage().startswith("Average Metric")]
    assert [(r.name, r.levelno, r.getMessage()) for r in average] == [
        ("dspy.evaluate.evaluate", logging.INFO, "Average Metric: 4.0 / 5 (80.0%)")
    ]
    dspy_handler = next(h for h in dspy_logger.handlers if h.get_name() == "dspy_handler")
    line = dspy_handler.format(average[0])
    assert re.fullmatch(
        r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO dspy.evaluate.evaluate: Average Metric: .*", line
    )
