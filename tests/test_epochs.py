"""Epochs: each example runs k times with its own seed; reducers give each example's score."""

from __future__ import annotations

import math
import signal
import sqlite3
from pathlib import Path

import pytest

import procval
from helpers import model_programs as mp
from helpers.processes import start_cli, stop, wait_for_rows
from helpers.rows import make_row
from procval._reduce import reduce
from procval.results import EvaluationResult

DATA = [{"id": f"q{i}", "x": i} for i in range(8)]
SEEDED = procval.Config(seed=11)
TASK = str(Path(__file__).parent / "helpers" / "model_programs.py") + ":task"


def run(**options: object) -> EvaluationResult:
    return procval.evaluate(
        mp.coin, DATA, mp.drawn, config=SEEDED, workers=1, progress=False, **options
    )


def test_each_example_runs_once_per_epoch_with_its_own_seed() -> None:
    once, thrice = run(), run(epochs=3)
    assert len(thrice.rows) == 24 and [r.epoch for r in thrice.rows[:3]] == [0, 1, 2]
    assert [r.index for r in thrice.rows[:6]] == [0, 0, 0, 1, 1, 1]
    epoch0 = [r.prediction for r in thrice.rows if r.epoch == 0]
    assert epoch0 == [r.prediction for r in once.rows]  # epoch 0 seeds as without epochs
    assert len({r.prediction for r in thrice.rows}) == 24  # every epoch its own draw
    assert [r.prediction for r in run(epochs=3).rows] == [r.prediction for r in thrice.rows]
    examples = thrice.examples()
    assert [r.example_id for r in examples] == [d["id"] for d in DATA]
    means = [math.fsum(r.prediction for r in thrice.rows if r.index == i) / 3 for i in range(8)]
    assert [r.score for r in examples] == pytest.approx(means)
    assert thrice.score == pytest.approx(sum(means) / 8)
    assert "8 examples x 3 epochs (24 rows)" in thrice.summary()


def test_reducers_per_score_name() -> None:
    result = procval.evaluate(
        mp.coin,
        DATA,
        {"heads": mp.heads, "draw": mp.drawn},
        config=SEEDED,
        workers=1,
        progress=False,
        epochs=4,
        reducer={"heads": "pass@2", "draw": "max"},
    )
    for example in result.examples():
        rows = [r for r in result.rows if r.index == example.index]
        c = sum(r.scores["heads"] for r in rows)
        assert example.scores["heads"] == pytest.approx(1 - math.comb(4 - int(c), 2) / 6)
        assert example.scores["draw"] == max(r.scores["draw"] for r in rows)
    assert result.score == pytest.approx(result.scores["heads"])


@pytest.mark.parametrize(
    ("how", "values", "expected"),
    [
        ("mean", [1.0, 0.0, 0.5], 0.5),
        ("max", [1.0, 0.0, 0.5], 1.0),
        ("median", [1.0, 0.0, 0.25], 0.25),
        ("mode", [0.0, 1.0, 1.0], 1.0),
        ("mode", [0.0, 1.0], 0.0),  # a tie goes to the value seen first
        ("pass@1", [1.0, 0.0, 0.0, 0.0], 0.25),
        ("pass@2", [1.0, 0.0, 0.0, 0.0], 0.5),
        ("pass@3", [1.0, 1.0, 0.0], 1.0),
        ("pass^2", [1.0, 1.0, 0.0], 1 / 3),
        ("pass^3", [1.0, 1.0, 0.0], 0.0),
    ],
)
def test_reducer_values(how: str, values: list[float], expected: float) -> None:
    assert reduce(how, values, score="s", example_id="q0") == pytest.approx(expected)


def test_pass_at_k_on_a_score_that_is_not_0_or_1_is_a_clear_error() -> None:
    result = run(epochs=2, reducer="pass@2")
    with pytest.raises(ValueError, match=r"reducer 'pass@2' needs 0/1 scores, but score 'score'"):
        _ = result.score


def test_bad_epochs_and_reducers_are_refused_before_any_worker_starts() -> None:
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        run(epochs=0)
    with pytest.raises(ValueError, match=r"'pass@3' needs 3 epochs per example but the run has"):
        run(epochs=2, reducer="pass@3")
    with pytest.raises(ValueError, match="'best' is not a reducer"):
        run(epochs=2, reducer={"score": "best"})
    with pytest.raises(TypeError, match="epochs must be an int"):
        run(epochs=2.0)


def test_configs_compare_by_example_over_their_epochs() -> None:
    results = procval.evaluate(
        mp.coin,
        DATA,
        mp.drawn,
        configs={"a": SEEDED, "b": procval.Config(seed=12)},
        workers=1,
        progress=False,
        epochs=3,
    )
    comparison = results.compare(resamples=200)[0]
    a, b = results["b"], results["a"]  # a is the other config, b the baseline
    assert comparison.n == 8
    assert comparison.difference == pytest.approx(a.score - b.score)


def test_a_reduced_example_fails_only_when_every_epoch_failed() -> None:
    boom = procval.RowError("ValueError", "boom")
    rows = [
        make_row(0, "a", score=0.0, error=boom, epoch=0),
        make_row(0, "a", score=1.0, epoch=1),
        make_row(1, "b", score=0.0, error=boom, epoch=0),
        make_row(1, "b", score=0.0, error=boom, epoch=1),
    ]
    result = EvaluationResult("a", rows, duration=1.0, epochs=2)
    assert [r.error for r in result.examples()] == [None, boom]
    assert result.score == 0.25


def test_more_epochs_on_resume_run_only_the_missing_epochs(tmp_path: Path) -> None:
    store = tmp_path / "run.db"
    first = run(epochs=2, store=store)
    assert (first.found, first.added) == (0, 16)
    before = {(r.example_id, r.epoch): r.worker_pid for r in first.rows}
    more = run(epochs=3, store=store)
    assert (more.found, more.added) == (16, 8)
    assert sorted((r.example_id, r.epoch) for r in more.rows) == sorted(
        (d["id"], e) for d in DATA for e in range(3)
    )
    kept = {(r.example_id, r.epoch): r.worker_pid for r in more.rows if r.epoch < 2}
    assert kept == before  # the stored epochs were not run again
    assert procval.load(store)["default"].epochs == 3
    assert run(epochs=3, store=store).added == 0


def test_fewer_epochs_on_resume_leave_the_later_epochs_in_the_store(tmp_path: Path) -> None:
    store = tmp_path / "run.db"
    run(epochs=3, store=store)
    fewer = run(epochs=2, store=store)
    assert (fewer.found, fewer.added, fewer.epochs) == (16, 0, 2)
    assert sorted({r.epoch for r in fewer.rows}) == [0, 1] and len(fewer.rows) == 16
    assert len(fewer.examples()) == 8 and len(fewer) == 16
    assert "8 stored rows of epoch 2 are not counted" in fewer.summary()
    assert "epochs=3 counts them again" in fewer.summary()
    loaded = procval.load(store)["default"]
    assert (loaded.epochs, len(loaded.rows), loaded.totals.n) == (2, 16, 16)
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT COUNT(*) FROM rows WHERE epoch = 2").fetchone() == (8,)
    again = run(epochs=3, store=store)  # the kept rows count again, and nothing reruns
    assert (again.found, again.added, len(again.rows)) == (24, 0, 24)
    assert "not counted" not in again.summary()


@pytest.mark.slow
def test_a_killed_epoch_run_resumes_every_missing_epoch_and_more(
    tmp_path: Path,
) -> None:
    store = tmp_path / "run.db"
    proc = start_cli("run", TASK, "--store", store, "--no-progress", start_new_session=True)
    try:
        wait_for_rows(store, 20, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop(proc, group=True)
    with sqlite3.connect(store) as db:
        (partial,) = db.execute("SELECT COUNT(*) FROM rows").fetchone()
    assert 20 <= partial < 90
    again = start_cli("run", TASK, "--store", store, "--no-progress", "--epochs", 4)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    result = procval.load(store)["default"]
    keys = [(r.example_id, r.epoch) for r in result.rows]
    assert len(keys) == len(set(keys)) == 120  # the task's 3 epochs, and one more
    assert sorted(keys) == sorted((f"q{i}", e) for i in range(30) for e in range(4))
    assert result.epochs == 4 and len(result.examples()) == 30
    assert [s["status"] for s in procval.store.sessions(store)] == ["interrupted", "completed"]
