"""evaluate()'s checks: bad input is refused with a clear message before any worker starts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import traceback

import psutil
import pytest

import procval
from helpers import toys
from helpers.processes import is_tracker


def children() -> set[int]:
    """Worker processes (loky's resource trackers live for the whole session)."""
    found = set()
    for proc in psutil.Process().children(recursive=True):
        if not is_tracker(proc):
            found.add(proc.pid)
    return found


@pytest.fixture
def no_worker_started():
    before = children()
    yield
    assert children() <= before, "a worker was started for a call that should fail first"


def run(program=toys.program, dataset=None, metric=toys.metric, **kwargs):
    kwargs.setdefault("progress", False)
    return procval.evaluate(program, dataset or toys.dataset(3), metric, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"workers": 0}, ValueError, "workers must be a positive int"),
        ({"workers": -2}, ValueError, "workers must be a positive int"),
        ({"threads": -1}, ValueError, "threads must be an int of at least 1"),
        ({"threads": 0}, ValueError, "threads must be an int of at least 1"),
        ({"retries": -1}, ValueError, "retries must be an int"),
        ({"timeout": 0}, ValueError, "timeout must be a positive number"),
        ({"max_errors": -1}, ValueError, "max_errors must be an int"),
        (
            {"config": procval.Config(), "configs": {"a": procval.Config()}},
            ValueError,
            "either config= .* or configs=",
        ),
        ({"configs": {}}, ValueError, "configs is empty"),
        (
            {"configs": [procval.Config("a"), procval.Config("a")]},
            ValueError,
            r"config names must be unique; \['a'\]",
        ),
        ({"configs": {"a": "gpt-4"}}, TypeError, r"configs\['a'\] must be a procval.Config"),
        ({"fresh": True}, ValueError, "fresh=True only makes sense with store="),
        ({"backend": "spark"}, ValueError, "backend must be 'loky', 'ray'"),
    ],
)
def test_bad_options_are_refused_before_any_worker_starts(kwargs, error, match, no_worker_started):
    with pytest.raises(error, match=match):
        run(**kwargs)


def test_non_callables_and_wrong_signatures(no_worker_started):
    with pytest.raises(TypeError, match="program must be callable"):
        run(program="gpt-4")
    with pytest.raises(TypeError, match="metric must be callable"):
        run(metric=None)
    with pytest.raises(
        TypeError, match=r"metric cannot be called as metric\(example, prediction\)"
    ):
        run(metric=lambda example: 1.0)
    with pytest.raises(TypeError, match=r"program cannot be called as program\(example\)"):
        run(program=lambda: 1)


def test_a_dspy_style_metric_with_trace_works():
    assert run(metric=lambda example, prediction, trace=None: 1.0, workers=1).score == 1.0


def test_empty_datasets_are_refused(no_worker_started):
    for empty in ([], (), iter([]), (x for x in [])):
        with pytest.raises(ValueError, match="dataset is empty"):
            procval.evaluate(toys.program, empty, toys.metric, progress=False)
    with pytest.raises(TypeError, match="dataset must be an iterable"):
        procval.evaluate(toys.program, 42, toys.metric, progress=False)


def test_duplicate_ids_name_both_positions(no_worker_started):
    data = [{"id": "a", "q": 1}, {"id": "b", "q": 2}, {"id": "a", "q": 3}]
    with pytest.raises(ValueError, match=r"duplicate example id 'a' at positions 0 and 2"):
        run(dataset=data)


def test_duplicate_ids_in_a_generator_stop_the_run():
    data = ({"id": i % 50, "q": i} for i in range(60))
    with pytest.raises(ValueError, match="duplicate example id 0 at positions 0 and 50"):
        run(dataset=data, workers=1)


def test_ids_come_from_keys_attributes_or_positions():
    class Obj:
        def __init__(self, id, q):
            self.id, self.q = id, q

    result = run(
        program=lambda e: 0, metric=toys.any_score, dataset=[Obj("x", 1), Obj(7, 2)], workers=1
    )
    assert [r.example_id for r in result.rows] == ["x", 7]
    result = run(program=lambda e: 0, metric=toys.any_score, dataset=["a", "b"], workers=1)
    assert [r.example_id for r in result.rows] == [0, 1]
    with pytest.raises(TypeError, match="ids must be int or str"):
        run(dataset=[{"id": 1.5, "q": 1}])


def test_generators_and_multiple_configs():
    gen = ({"id": i, "q": i} for i in range(10))
    results = run(
        dataset=gen,
        configs={
            "r": procval.Config(setup=toys.configure_model("right")),
            "w": procval.Config(setup=toys.configure_model("wrong")),
        },
    )
    assert results["r"].score == 1.0 and len(results["w"].rows) == 10


def test_read_jsonl_is_lazy_and_reiterable(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(f'{{"id": "j{i}", "q": {i}}}\n' for i in range(8)) + "\n")
    data = procval.read_jsonl(path)
    assert len(data) == 8 and list(data)[3] == {"id": "j3", "q": 3}
    results = run(dataset=data, configs=[procval.Config("a"), procval.Config("b")])
    assert [r.example_id for r in results["b"].rows] == [f"j{i}" for i in range(8)]


def test_unpicklable_program_is_refused_naming_the_culprit(no_worker_started):
    lock = threading.Lock()

    def program(example):
        with lock:
            return example

    with pytest.raises(
        procval.SnapshotError,
        match=r"program closes over `lock`, which is a "
        r"_thread.lock, which cannot be sent to a worker process",
    ) as info:
        run(program=program)
    assert isinstance(info.value, TypeError)
    assert "create it inside the program, or in Config.setup" in str(info.value)


def test_unpicklable_config_is_refused(no_worker_started):
    config = procval.Config("c", values={"conn": threading.Lock()})
    with pytest.raises(procval.SnapshotError, match=r"config 'c'.*\['conn'\] is a _thread.lock"):
        run(config=config)


def test_unpicklable_examples_become_error_rows():
    data = [{"id": 0, "q": 1}, {"id": 1, "q": threading.Lock()}, {"id": 2, "q": 2}]
    result = run(program=lambda e: 1, metric=toys.any_score, dataset=data, workers=1)
    assert [r.error.type if r.error else None for r in result.rows] == [None, "SnapshotError", None]


def test_unpicklable_prediction_becomes_an_error_row():
    result = run(program=lambda e: threading.Lock(), metric=lambda e, p: 1.0, workers=1)
    assert {r.error.type for r in result.rows} == {"UnpicklablePrediction"}


def test_program_defined_in_a_scripts_main_runs_in_workers(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(
        textwrap.dedent("""
        import procval
        MODEL = {"name": "parent-default"}

        def program(example):
            return MODEL["name"], example * 2

        def metric(example, prediction):
            return prediction[1] == example * 2

        configs = {
            name: procval.Config(setup=lambda name=name: MODEL.update(name=name))
            for name in ("alpha", "beta")
        }
        results = procval.evaluate(program, range(10), metric, configs=configs, workers=2)
        for name, result in results.items():
            seen = {row.prediction[0] for row in result.rows}
            print(name, result.score, sorted(seen))
    """)
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["alpha 1.0 ['alpha']", "beta 1.0 ['beta']"]


def test_results_mapping_is_read_only_and_readable():
    results = run(configs={"a": procval.Config(), "b": procval.Config()})
    with pytest.raises(TypeError):
        results["c"] = results["a"]  # type: ignore[index]
    with pytest.raises(KeyError, match="no config named 'c'"):
        results["c"]
    assert "a" in results.summary() and "score" in results.summary()
    assert repr(results["a"]).startswith("EvaluationResult(config='a', score=")
    assert "over 3 examples" in results["a"].summary()


def test_parent_environ_is_not_changed_by_config_env():
    before = dict(os.environ)
    run(config=procval.Config(env={"PROCVAL_TEST_SECRET": "s3cret"}), workers=1)
    assert dict(os.environ) == before


class UnreadableData(OSError):
    """A dataset whose source fails midway (a network share gone, say)."""


def test_a_dataset_that_raises_midway_keeps_every_example_read_before_it(tmp_path):
    def examples():
        for i in range(3000):
            if i == 2000:
                raise UnreadableData(f"lost the share at example {i}")
            yield {"id": i, "q": i}

    store = tmp_path / "run.db"
    with pytest.raises(UnreadableData, match="lost the share at example 2000") as caught:
        run(dataset=examples(), workers=2, threads=4, store=store)
    rows = procval.load(store)["default"].rows
    assert [row.example_id for row in rows] == list(range(2000))  # none lost, none twice
    assert all(row.error is None for row in rows)
    if sys.version_info >= (3, 11):
        assert (
            "the 2000 examples read before it ran and are in the store" in caught.value.__notes__[0]
        )
    # the traceback is the user's: its innermost frame is the generator's raise
    assert caught.value.__traceback__ is not None
    last = traceback.extract_tb(caught.value.__traceback__)[-1]
    assert last.name == "examples" and "raise UnreadableData" in (last.line or "")


def test_a_missing_jsonl_file_is_refused_at_the_users_call(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as caught:
        procval.read_jsonl("missing.jsonl")  # the line the traceback must show
    message = str(caught.value)
    assert (
        f"no JSONL file at 'missing.jsonl': {tmp_path / 'missing.jsonl'} does not exist" in message
    )
    frames = traceback.extract_tb(caught.value.__traceback__)
    assert frames[0].name == "test_a_missing_jsonl_file_is_refused_at_the_users_call"
    assert "procval.read_jsonl" in (frames[0].line or "")


def test_a_config_without_rows_says_so_instead_of_a_nan_score():
    empty = procval.EvaluationResult("broken", [], duration=0.0)
    assert empty.summary().startswith("config 'broken': no rows")
    assert "nan" not in empty.summary()
    assert "nan" not in procval.Results({"broken": empty}).summary()
