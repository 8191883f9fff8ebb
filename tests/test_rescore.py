"""procval.rescore and procval rescore: stored predictions scored again, never the program."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import procval
from helpers import rescore_programs as rp
from procval.store import readers
from procval.store.sources import stored_configs
from procval.task import load_task
from procval.worker.stored import Fields, rebuild

HERE = Path(__file__).resolve().parent
PROGRAMS = str(HERE / "helpers" / "rescore_programs.py")


def procval_cli(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "procval", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def configs(calls: Path) -> dict[str, procval.Config]:
    """Two configs, told apart in their workers by the env variable ``WHO``."""
    return rp.configs(str(calls), os.getpid())


@pytest.fixture
def run(tmp_path):
    """A store of two configs of ``counted`` scored by ``exact``, and the program's call log."""
    store, calls = tmp_path / "run.db", tmp_path / "calls.log"
    procval.evaluate(
        rp.counted, rp.data(), rp.exact, configs=configs(calls), store=store, workers=2,
        progress=False,
    )  # fmt: skip
    return store, calls


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def rows_by_id(result: procval.EvaluationResult) -> dict[tuple[object, int], procval.Row]:
    return {(r.example_id, r.epoch): r for r in result.rows}


# ---------------------------------------------------------------- the library


def test_rescore_changes_scores_keeps_predictions_and_never_calls_the_program(run):
    store, calls = run
    before = lines(calls)
    results = procval.rescore(store, rp.near, configs=list(configs(calls).values()), workers=2,
                              progress=False)  # fmt: skip
    assert lines(calls) == before == 16  # the program ran 16 times, all of them in evaluate
    assert list(results) == ["a+near", "b+near"]
    loaded = procval.load(store)
    source, rescored = loaded["a"], loaded["a+near"]
    assert source.score == pytest.approx(4 / 8) and rescored.score == pytest.approx(7 / 8)
    old, new = rows_by_id(source), rows_by_id(rescored)
    assert old.keys() == new.keys()
    for key, row in new.items():
        assert row.prediction == old[key].prediction and row.example == old[key].example
    failed = new[("q5", 0)].error  # the program failed for q5: its row keeps that error
    assert failed is not None and failed.type == "ValueError" and "five" in failed.message
    assert failed.traceback == old[("q5", 0)].error.traceback
    stored = stored_configs(store)["a+near"]
    assert (stored.kind, stored.source) == ("rescore", "a")
    assert stored_configs(store)["a"].kind == "run"


def test_the_metric_runs_in_a_worker_of_each_config_with_its_snapshot(run):
    store, calls = run
    results = procval.rescore(store, rp.where, configs=configs(calls), workers=2, progress=False)
    a, b = results["a+where"], results["b+where"]
    assert a.error_types == b.error_types == {"ValueError": 1}  # q5's program had failed
    scored_a = [r.scores for r in a.rows if r.error is None]
    scored_b = [r.scores for r in b.rows if r.error is None]
    assert len(scored_a) == len(scored_b) == 7
    assert all(s["alpha"] == 1.0 and s["in_worker"] == 1.0 for s in scored_a)
    assert all(s["alpha"] == 0.0 and s["in_worker"] == 1.0 for s in scored_b)
    pids_a, pids_b = {r.worker_pid for r in a.rows}, {r.worker_pid for r in b.rows}
    assert os.getpid() not in pids_a | pids_b and not pids_a & pids_b


def test_a_config_is_rebuilt_from_the_store_when_its_env_is_here(run, monkeypatch):
    store, _ = run
    monkeypatch.setenv(rp.WHO, "alpha")  # a's value: a can be rebuilt, b cannot
    result = procval.rescore(store, rp.where, configs=["a"], name="judged", workers=1,
                             progress=False)["judged"]  # fmt: skip
    assert {r.scores["alpha"] for r in result.rows if r.error is None} == {1.0}
    with pytest.raises(ValueError, match=r"config 'b' cannot be rebuilt.*RESCORE_TEST_WHO.*pass"):
        procval.rescore(store, rp.where, configs=["b"], progress=False)


def test_a_config_given_must_be_the_stored_one(run, tmp_path):
    store, calls = run
    other = procval.Config(name="a", env={rp.WHO: "gamma"}, values={"calls": str(calls)})
    with pytest.raises(ValueError, match=r"'a' given differs .*\(its env, seed, values differ\)"):
        procval.rescore(store, rp.near, configs=[other], progress=False)


def test_bad_input_is_refused_before_any_worker_starts(run, tmp_path):
    store, calls = run
    given = list(configs(calls).values())
    procval.rescore(store, rp.near, configs=given[:1], name="n", workers=1, progress=False)
    with pytest.raises(ValueError, match="has a config named 'n' already; choose another name"):
        procval.rescore(store, rp.near, configs=given[:1], name="n", progress=False)
    with pytest.raises(ValueError, match="has a config named 'a' already"):
        procval.rescore(store, rp.near, configs=given[:1], name="a", progress=False)
    with pytest.raises(ValueError, match=r"names one rescored config, but 2 configs"):
        procval.rescore(store, rp.near, configs=given, name="x", progress=False)
    with pytest.raises(procval.StoreError, match="has no config 'nope'"):
        procval.rescore(store, rp.near, configs=["nope"], progress=False)
    with pytest.raises(ValueError, match="reducer"):
        procval.rescore(store, rp.near, configs=given, reducer="pass@2", progress=False)
    with pytest.raises(TypeError, match="metric cannot be called as metric"):
        procval.rescore(store, lambda example: 1, configs=given, progress=False)
    with pytest.raises(procval.StoreError, match="no run store"):
        procval.rescore(tmp_path / "missing.db", rp.near, progress=False)
    assert set(procval.load(store)) == {"a", "b", "n"}  # nothing else was stored


def test_a_store_without_predictions_is_refused(tmp_path):
    store = tmp_path / "failed.db"
    procval.evaluate(rp.failing, rp.data(4), rp.exact, store=store, progress=False, workers=1)
    with pytest.raises(ValueError, match=r"'default' .* no predictions to rescore \(each of its 4"):
        procval.rescore(store, rp.near, progress=False)


def test_the_metric_usage_and_the_rows_groups_are_kept(run):
    store, calls = run
    with sqlite3.connect(store) as db:  # groups as group_by would have stored them
        db.execute("UPDATE rows SET group_key = 'odd' WHERE config = 'a' AND idx % 2 = 1")
    db.close()
    result = procval.rescore(store, rp.judge, configs=[configs(calls)["a"]], workers=1,
                             progress=False)["a+judge"]  # fmt: skip
    assert {r.example_id: r.group for r in result.rows} == {
        f"q{i}": "odd" if i % 2 else None for i in range(8)
    }
    spent = procval.load(store)["a+judge"].usage["judge-model"]
    assert (spent.calls, spent.prompt_tokens, spent.cost) == (7, 70, pytest.approx(0.007))


def test_score_names_that_change_give_error_rows(run):
    store, calls = run
    result = procval.rescore(store, rp.changing, configs=[configs(calls)["a"]], workers=1,
                             progress=False)["a+changing"]  # fmt: skip
    assert result.error_types == {"ValueError": 1, "ScoreNamesChanged": 3}


def test_rescore_of_an_epochs_run_keeps_epochs_and_reduces_them(tmp_path):
    store = tmp_path / "coins.db"
    config = procval.Config(name="c", seed=0)
    source = procval.evaluate(rp.coin, rp.data(10), rp.heads, config=config, store=store,
                              epochs=3, progress=False, workers=1)  # fmt: skip
    result = procval.rescore(store, rp.tails, reducer="pass@2", progress=False, workers=1)[
        "c+tails"
    ]
    assert len(result.rows) == 30 and {r.epoch for r in result.rows} == {0, 1, 2}
    assert [r.score for r in result.rows] == [1 - r.score for r in source.rows]
    assert len(result.examples()) == 10 and stored_configs(store)["c+tails"].epochs == 3
    assert json.loads(_configs_column(store, "c+tails", "metric"))["reducer"] == "pass@2"
    with pytest.raises(ValueError, match=r"0/1 scores"):
        procval.rescore(store, rp.fraction, reducer="pass@2", progress=False,
                        workers=1)["c+fraction"].examples()  # fmt: skip


def test_compare_a_rescore_with_its_source_pairs_the_same_examples(run):
    store, calls = run
    procval.rescore(store, rp.near, configs=[configs(calls)["a"]], workers=1, progress=False)
    loaded = procval.load(store)
    comparison = procval.compare(loaded["a+near"], loaded["a"])
    assert comparison.n == 8 and comparison.difference == pytest.approx(3 / 8)
    assert sorted(comparison.wins) == ["q0", "q3", "q6"] and not comparison.losses
    compared = procval_cli("compare", store, "a+near", "a")
    assert compared.returncode == 0 and "on 8 paired examples" in compared.stdout
    exported = procval_cli("export", store, "--config", "a+near")
    assert exported.returncode == 0 and len(exported.stdout.splitlines()) == 8


def test_predictions_are_rebuilt_as_their_type(tmp_path):
    store = tmp_path / "typed.db"
    procval.evaluate(rp.typed, rp.data(8), rp.same_type, store=store, progress=False, workers=1)
    result = procval.rescore(store, rp.same_type, progress=False, workers=1)["default+same_type"]
    assert [r.score for r in result.rows] == [1.0] * 8, [r.error for r in result.rows]


def test_dspy_predictions_keep_attribute_access(tmp_path):
    pytest.importorskip("dspy")
    store = tmp_path / "dspy.db"
    procval.evaluate(rp.dspy_program, rp.data(4), rp.heads, store=store, progress=False,
                     workers=1)  # fmt: skip
    result = procval.rescore(store, rp.dspy_metric, progress=False, workers=1)
    rows = result["default+dspy_metric"].rows
    assert [r.score for r in rows] == [1.0] * 4, [r.error for r in rows]
    assert rows[0].prediction == {"answer": "0", "reasoning": "doubling"}


def test_rebuild_rules():
    assert rebuild({"a": 1}, None) == {"a": 1} and type(rebuild({"a": 1}, None)) is dict
    fields = rebuild({"answer": "4"}, "__main__.Answer")  # a script's type: not importable
    assert isinstance(fields, Fields) and fields.answer == "4" and fields.get("answer") == "4"
    with pytest.raises(AttributeError):
        _ = fields.missing
    assert rebuild([1, 2], "builtins.tuple") == (1, 2)
    assert rebuild([1, -1], "helpers.rescore_programs.Pair") == rp.Pair(1, -1)
    assert rebuild("<object at 0x1>", "helpers.rescore_programs.Answer") == "<object at 0x1>"
    assert rebuild({"x": 1}, "no.such.module.Type") == Fields(x=1)


def test_score_names_are_kept_in_the_configs_metric(run):
    store, calls = run
    procval.rescore(store, rp.where, configs=[configs(calls)["a"]], workers=1, progress=False)
    assert json.loads(_configs_column(store, "a+where", "metric"))["scores"] == [
        "near", "alpha", "in_worker",
    ]  # fmt: skip
    assert json.loads(_configs_column(store, "a", "metric"))["scores"] == []
    assert readers.score_names(store, ["a+where"]) == ["near", "alpha", "in_worker"]


# ---------------------------------------------------------------- the command line


def test_cli_rescore_as_report_and_refusals(run):
    store, calls = run
    task = f"{PROGRAMS}:task"
    env = {"RESCORE_TEST_CALLS": str(calls), "RESCORE_TEST_PARENT": str(os.getpid())}
    done = procval_cli("rescore", store, "--metric", f"{PROGRAMS}:near", "--config", "a",
                       "--as", "loose", "--task", task, "--workers", "1", "--no-progress",
                       env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "loose" in done.stdout and "procval compare" in done.stdout
    assert procval.load(store)["loose"].score == pytest.approx(7 / 8)
    report = procval_cli("report", store)
    assert "a rescore of 'a'" in report.stdout
    again = procval_cli("rescore", store, "--metric", f"{PROGRAMS}:near", "--config", "a",
                        "--as", "loose", "--task", task, env=env)  # fmt: skip
    assert again.returncode == 2 and "'loose' already" in again.stderr
    unknown = procval_cli("rescore", store, "--metric", f"{PROGRAMS}:near", "--config", "zzz")
    assert unknown.returncode == 2 and "no config 'zzz'" in unknown.stderr
    no_env = procval_cli("rescore", store, "--metric", f"{PROGRAMS}:near", "--config", "b")
    assert no_env.returncode == 2 and "--task TASK" in no_env.stderr, no_env.stderr


def test_a_legacy_store_can_be_rescored(tmp_path):
    store = tmp_path / "v1.db"
    shutil.copy(HERE / "data" / "store_v1.db", store)
    result = procval.rescore(store, rp.near_double, configs=["off"], progress=False,
                             workers=1)["off+near_double"]  # fmt: skip
    assert len(result) == 30 and result.error_types == {"ValueError": 3}  # its program's errors
    assert result.score == pytest.approx(27 / 30)  # offset by one: near, not exact
    with pytest.raises(ValueError, match=r"'exact' cannot be rebuilt .* it has a setup"):
        procval.rescore(store, rp.near_double, configs=["exact"], progress=False)
    # the config itself, from its task file as procval run loads it: the stored identity
    exact = load_task(str(HERE / "helpers" / "legacy_task.py")).config_map()["exact"]
    again = procval.rescore(store, rp.near_double, configs={"exact": exact}, progress=False,
                            workers=1)["exact+near_double"]  # fmt: skip
    assert again.score == pytest.approx(27 / 30)


def _configs_column(store: Path, name: str, column: str) -> str:
    with sqlite3.connect(store) as db:
        found = db.execute(f"SELECT {column} FROM configs WHERE name = ?", (name,)).fetchone()
    db.close()
    return found[0]
