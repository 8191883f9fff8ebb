"""Named scores: a metric returns a mapping or a score with extras, or several metrics run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import procval
from helpers import model_programs as mp
from procval.worker.scoring import MetricSet, MetricTypeError, outcome

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
