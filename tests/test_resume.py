"""Resuming from a run store: only what is missing runs; failed rows are rerun on request."""

from __future__ import annotations

import warnings

import pytest

import procval
from helpers import toys


def calls(path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_resume_runs_only_the_missing_examples(tmp_path):
    store, log = tmp_path / "run.db", tmp_path / "calls.txt"
    config = procval.Config(env={"TOY_CALLS": str(log)})
    first = procval.evaluate(
        toys.counting_program, toys.dataset(10), toys.metric, config=config, store=store, workers=2
    )
    assert first.score == 1.0 and sorted(calls(log)) == sorted(f"ex{i}" for i in range(10))
    log.unlink()
    again = procval.evaluate(
        toys.counting_program, toys.dataset(10), toys.metric, config=config, store=store, workers=2
    )
    assert calls(log) == [] and len(again.rows) == 10
    more = procval.evaluate(
        toys.counting_program, toys.dataset(15), toys.metric, config=config, store=store, workers=2
    )
    assert sorted(calls(log)) == sorted(f"ex{i}" for i in range(10, 15))
    assert [r.example_id for r in more.rows] == [f"ex{i}" for i in range(15)]
    assert procval.load(store)["default"].score == 1.0


def test_failed_rows_are_rerun_only_with_retry_errors(tmp_path):
    store, flag = tmp_path / "run.db", tmp_path / "broken"
    flag.touch()
    config = procval.Config(env={"TOY_BROKEN": str(flag)})
    run = dict(config=config, store=store, workers=2)
    first = procval.evaluate(toys.fixable_program, toys.dataset(10), toys.metric, **run)
    assert len(first.errors) == 5
    flag.unlink()  # the bug is fixed
    kept = procval.evaluate(toys.fixable_program, toys.dataset(10), toys.metric, **run)
    assert len(kept.errors) == 5  # failed examples count as done by default
    fixed = procval.evaluate(
        toys.fixable_program, toys.dataset(10), toys.metric, retry_errors=True, **run
    )
    assert fixed.errors == [] and fixed.score == 1.0 and len(fixed.rows) == 10


def test_max_errors_counts_only_this_calls_failures(tmp_path):
    store, flag = tmp_path / "run.db", tmp_path / "broken"
    flag.touch()
    config = procval.Config(env={"TOY_BROKEN": str(flag)})
    with pytest.raises(procval.TooManyErrors, match="retry_errors=True") as info:
        procval.evaluate(
            toys.fixable_program,
            toys.dataset(400),
            toys.metric,
            config=config,
            store=store,
            max_errors=3,
            workers=1,
        )
    stored_errors = len(info.value.results["default"].errors)
    assert stored_errors > 3
    flag.unlink()
    result = procval.evaluate(
        toys.fixable_program,
        toys.dataset(400),
        toys.metric,
        config=config,
        store=store,
        max_errors=3,
        workers=2,
    )
    assert len(result.rows) == 400 and len(result.errors) == stored_errors
    result = procval.evaluate(
        toys.fixable_program,
        toys.dataset(400),
        toys.metric,
        config=config,
        store=store,
        max_errors=3,
        retry_errors=True,
    )
    assert result.errors == [] and result.score == 1.0


def test_retry_errors_needs_a_store():
    with pytest.raises(ValueError, match="retry_errors=True only makes sense with store="):
        procval.evaluate(toys.program, toys.dataset(2), toys.metric, retry_errors=True)


def test_resuming_with_changed_program_code_warns(tmp_path):
    store = tmp_path / "run.db"
    procval.evaluate(toys.program, toys.dataset(4), toys.metric, store=store, workers=1)
    procval.evaluate(toys.program, toys.dataset(6), toys.metric, store=store, workers=1)
    with pytest.warns(procval.ProgramChangedWarning, match="program or metric of config"):
        procval.evaluate(
            toys.sometimes_failing, toys.dataset(8), toys.metric, store=store, workers=1
        )


def test_a_program_that_captured_a_module_keeps_its_identity_as_the_module_changes(tmp_path):
    """A captured module is described by its name, not by what it holds at each call."""
    store = tmp_path / "run.db"
    procval.evaluate(toys.through(toys), toys.dataset(4), toys.metric, store=store, workers=1)
    toys.STATE.append(len(toys.STATE))  # the module holds something else now
    with warnings.catch_warnings():
        warnings.simplefilter("error", procval.ProgramChangedWarning)
        result = procval.evaluate(
            toys.through(toys), toys.dataset(6), toys.metric, store=store, workers=1
        )
    assert result.errors == [] and len(result.rows) == 6


def test_a_call_refused_up_front_leaves_no_store_behind(tmp_path):
    store = tmp_path / "run.db"
    with pytest.raises(ValueError, match="dataset is empty"):
        procval.evaluate(toys.program, [], toys.metric, store=store)
    assert not store.exists()


def test_a_store_refuses_duplicate_ids_of_a_generator(tmp_path):
    data = ({"id": f"k{7 if i == 300 else i}", "q": i} for i in range(400))
    with pytest.raises(ValueError, match="duplicate example id 'k7' at positions 7 and 300"):
        procval.evaluate(toys.program, data, toys.metric, store=tmp_path / "run.db", workers=1)
