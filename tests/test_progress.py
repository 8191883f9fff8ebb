from __future__ import annotations

import procval
from helpers import toys


def test_progress_bars_show_done_total_score_and_errors(capsys):
    procval.evaluate(
        toys.sometimes_failing,
        toys.dataset(9),
        toys.metric,
        workers=1,
        progress=True,
        configs={"alpha": procval.Config(), "beta": procval.Config()},
    )
    err = capsys.readouterr().err
    for name in ("alpha", "beta"):
        assert name in err
    assert "9/9" in err
    assert "errors=3" in err
    assert "score=0.667" in err


def test_progress_off_by_default_when_stderr_is_not_a_terminal(capsys):
    procval.evaluate(toys.program, toys.dataset(3), toys.metric, workers=1)
    assert capsys.readouterr().err == ""
