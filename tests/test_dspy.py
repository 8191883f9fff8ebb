"""procval.dspy: settings snapshots and the drop-in Evaluate, offline with dict-mode DummyLMs."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import runpy
import subprocess
import sys
import threading

import loky
import pytest

dspy = pytest.importorskip("dspy")

import procval  # noqa: E402
from helpers import dspy_toys  # noqa: E402
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
    assert procval.dspy is sys.modules["procval.integrations.dspy"]


def test_without_dspy_the_error_says_how_to_install_it():
    code = "import sys; sys.modules['dspy'] = None; import procval; procval.dspy"
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
    settings, _ = pickle.loads(config.setup._blob)
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


def test_snapshot_drops_callbacks_that_cannot_travel_with_a_warning():
    kept, locked = _PicklableCallback(), _LockedCallback()
    with pytest.warns(UserWarning, match="left out of the snapshot"):
        config = procval.dspy.snapshot(callbacks=[kept, locked])
    settings, _ = pickle.loads(config.setup._blob)
    assert [type(c) for c in settings["callbacks"]] == [_PicklableCallback]


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
    _, cache = pickle.loads(config.setup._blob)
    assert cache["enable_disk_cache"] and not cache["enable_memory_cache"]
    assert cache["disk_cache_dir"] == str(tmp_path)
    assert cache["restrict_pickle"]
    assert _import_type(*cache["safe_types"][0]) is _PicklableCallback


def test_num_threads_maps_to_processes_times_threads():
    assert _plan(8, 2) == (2, 4)
    assert _plan(5, 2) == (2, 2)  # never more than num_threads in flight
    assert _plan(1, 4) == (1, 1)
    assert _plan(4, None) == (1, 4)  # by default, a process per 4 threads...
    processes = min(loky.cpu_count(), 4)  # ...up to the CPU count
    assert _plan(16, None) == (processes, 16 // processes)
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
    assert len(knowing.history) == 1  # the workers used their own copies


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
