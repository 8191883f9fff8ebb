"""Named scores: a metric returns a mapping or a score with extras, or several metrics run."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import procval
from helpers import model_programs as mp
from procval._scores import NamedScores, scores_json, wire_scores
from procval.run.dataset import Item
from procval.run.rows import RowMaker
from procval.wire import ExampleResult
from procval.worker.scoring import MetricSet, MetricTypeError, NonFiniteScore, outcome

DATA = [{"id": f"q{i}", "x": i} for i in range(10)]


def test_what_a_metric_returns_becomes_score_scores_and_extra() -> None:
    assert outcome(True) == (1.0, None, None)
    assert outcome({"em": 1, "f1": 0.5}) == (1.0, {"em": 1.0, "f1": 0.5}, None)
    assert outcome({"f1": 0.5, "score": 0}) == (0.0, {"f1": 0.5, "score": 0.0}, None)
    assert outcome({"score": 0.5}) == (0.5, None, None)
    assert outcome({"score": 0.5, "feedback": "ok"}) == (0.5, None, {"feedback": "ok"})
    assert outcome(mp.Feedback(1.0, "good")) == (1.0, None, {"feedback": "good"})
    judged = {"em": 1, "judge": mp.Feedback(0.5, "meh")}
    assert outcome(judged) == (1.0, {"em": 1.0, "judge": 0.5}, {"judge": {"feedback": "meh"}})
    with pytest.raises(MetricTypeError, match=r"score 'f1' returned a builtins\.str"):
        outcome({"em": 1, "f1": "high"})
    with pytest.raises(MetricTypeError, match="empty mapping"):
        outcome({})


def test_a_dspy_prediction_with_feedback_gives_its_score_and_extra() -> None:
    dspy = pytest.importorskip("dspy")
    value = dspy.Prediction(score=0.75, feedback="almost")
    assert outcome(value) == (0.75, None, {"feedback": "almost"})


def test_several_metrics_give_named_scores_with_the_first_as_primary() -> None:
    result = procval.evaluate(
        mp.identity, DATA, {"em": mp.em, "f1": mp.f1}, workers=1, progress=False
    )
    assert result.scores == {"em": 0.5, "f1": 0.25} and result.primary == "em"
    assert result.score == 0.5
    assert result.rows[1].scores == {"em": 0.0, "f1": 0.25} and result.rows[1].score == 0.0
    assert "scores: em 0.5000, f1 0.2500" in result.summary()
    listed = procval.evaluate(mp.identity, DATA, [mp.f1, mp.em], workers=1, progress=False)
    assert list(listed.scores) == ["f1", "em"] and listed.score == 0.25


def test_primary_chooses_the_score_and_every_score_is_stored_and_shown(tmp_path: Path) -> None:
    store = tmp_path / "run.db"
    result = procval.evaluate(
        mp.identity, DATA, mp.both, workers=1, progress=False, primary="f1", store=store
    )
    assert result.score == 0.25 and result.scores == {"f1": 0.25, "em": 0.5}
    loaded = procval.load(store)["default"]
    assert loaded.score == 0.25 and loaded.scores == {"f1": 0.25, "em": 0.5}
    assert loaded.rows[0].scores == {"em": 1.0, "f1": 0.25}
    report = subprocess.run(
        [sys.executable, "-m", "procval", "report", str(store), "--html", str(tmp_path / "r.html")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    assert "scores: f1 0.2500, em 0.5000" in report.stdout
    assert "Named scores" in (tmp_path / "r.html").read_text()


def test_a_prediction_with_feedback_keeps_the_feedback_as_extra() -> None:
    result = procval.evaluate(mp.identity, DATA, mp.judged, workers=1, progress=False)
    assert result.score == 0.5 and result.scores == {"score": 0.5}
    assert result.rows[3].extra == {"feedback": "x was 3"} and result.rows[3].scores is None


def test_score_names_that_change_between_examples_give_error_rows() -> None:
    result = procval.evaluate(mp.identity, DATA, mp.shifting, workers=1, progress=False)
    assert [row.error is None for row in result.rows] == [True] * 5 + [False] * 5
    error = result.rows[7].error
    assert error is not None and error.type == "ScoreNamesChanged"
    assert "['em', 'recall']" in error.message and "['em', 'f1']" in error.message
    assert result.rows[7].prediction == 7  # the prediction is kept


def test_bad_metric_options_are_refused_before_any_worker_starts() -> None:
    with pytest.raises(ValueError, match="two metrics are named 'em'"):
        procval.evaluate(mp.identity, DATA, [mp.em, mp.em], progress=False)
    with pytest.raises(ValueError, match=r"primary='recall' is not one of the metrics \['em'"):
        procval.evaluate(mp.identity, DATA, {"em": mp.em, "f1": mp.f1}, primary="recall")
    with pytest.raises(TypeError, match="metric 'f1' is not callable"):
        procval.evaluate(mp.identity, DATA, {"em": mp.em, "f1": 0.5})
    with pytest.raises(ValueError, match="metric is an empty list or dict"):
        procval.evaluate(mp.identity, DATA, {})
    assert repr(MetricSet({"em": mp.em})) == "MetricSet(['em'])"


def test_named_scores_kept_as_text_read_as_the_dict_they_hold() -> None:
    names, text = wire_scores({"em": 1.0, "f1": 0.5, "n": 2})
    assert text == '{"em":1.0,"f1":0.5,"n":2.0}' and names == ("em", "f1", "n")
    assert wire_scores({"em": 0.0, "f1": 1.0, "n": 3.0})[0] is names  # one tuple per names
    scores = NamedScores(names, text)
    assert scores == {"em": 1.0, "f1": 0.5, "n": 2.0}
    assert {"em": 1.0, "f1": 0.5, "n": 2.0} == scores  # noqa: SIM300  (a dict on the left)
    assert scores != {"em": 1.0} and scores == NamedScores(*wire_scores(dict(scores)))
    assert list(scores) == ["em", "f1", "n"] and len(scores) == 3 and "f1" in scores
    assert scores["f1"] == 0.5 and dict(scores.items()) == dict(scores)
    assert repr(scores) == "{'em': 1.0, 'f1': 0.5, 'n': 2.0}"
    copied = pickle.loads(pickle.dumps(scores))
    assert type(copied) is dict and copied == scores  # pickled as a plain dict
    with pytest.raises(TypeError):
        scores["em"] = 0.0  # type: ignore[index]
    assert scores_json(scores) == text and scores_json({"a": True}) == '{"a":1.0}'
    with pytest.raises(NonFiniteScore):
        outcome({"em": float("nan"), "f1": 1.0})


def test_the_row_maker_checks_the_names_a_worker_sends_with_their_text() -> None:
    maker = RowMaker("c", "fp")
    names = ("em", "f1")

    def result(seq: int, scores: Any) -> ExampleResult:
        return ExampleResult(seq, seq, 1.0, None, 1, 0.0, scores)

    items = {i: Item(i, i, {"x": i}, 0) for i in range(6)}
    rows = maker.rows(
        [
            result(0, (names, '{"em":1.0,"f1":0.5}')),
            result(1, (names, '{"em":0.0,"f1":0.25}')),
            result(2, (("f1", "em"), '{"f1":0.5,"em":1.0}')),  # the same names, in another order
            result(3, (("em", "recall"), '{"em":1.0,"recall":0.5}')),
            result(4, {"em": 1.0, "f1": 1.0}),  # a mapping is taken too
        ],
        items,
        1,
        "n",
        "fp",
    )
    assert [row.scores for row in rows[:3]] == [
        {"em": 1.0, "f1": 0.5},
        {"em": 0.0, "f1": 0.25},
        {"f1": 0.5, "em": 1.0},
    ]
    assert rows[3].error is not None and rows[3].error.type == "ScoreNamesChanged"
    assert "['em', 'recall']" in rows[3].error.message and rows[3].scores is None
    assert rows[4].error is None and rows[4].scores == {"em": 1.0, "f1": 1.0}
    chosen = RowMaker("c", "fp", primary="f1")
    row = chosen.rows([result(5, (names, '{"em":1.0,"f1":0.5}'))], items, 1, "n", "fp")
    assert row[0].score == 0.5 and row[0].scores == {"em": 1.0, "f1": 0.5}


def test_rows_of_a_run_without_a_store_hold_their_named_scores() -> None:
    result = procval.evaluate(mp.identity, DATA, mp.both, workers=2, progress=False)
    rows = pickle.loads(pickle.dumps(result.rows))
    assert rows == result.rows and rows[1].scores == {"em": 0.0, "f1": 0.25}
    assert result.examples()[1].scores == {"em": 0.0, "f1": 0.25}


def test_named_scores_of_rows_with_and_without_a_store_are_plain_dicts(tmp_path: Path) -> None:
    kept = procval.evaluate(mp.identity, DATA, mp.both, workers=1, progress=False)
    stored = procval.evaluate(
        mp.identity, DATA, mp.both, workers=1, progress=False, store=tmp_path / "s.db"
    )
    for result in (kept, stored):
        assert type(result.rows[1].scores) is dict
        assert json.loads(json.dumps(result.rows[1].scores)) == {"em": 0.0, "f1": 0.25}
