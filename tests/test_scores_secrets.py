"""Odd metric values become rows a user can see; secrets stay out of everything procval keeps."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys

import numpy
import pytest

import procval
from helpers import score_programs as sp
from procval import _identity
from procval._identity import code_identity, digest, text_identity
from procval.results import Row, RowError
from procval.store.scrub import Scrubber
from procval.worker.scoring import MetricTypeError, NonFiniteScore
from procval.worker.scoring import score_of as _score

SECRET = "sk-test-0123456789abcdef"
MASK = f"***ENV:{sp.SECRET_NAME}***"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "procval", *args], capture_output=True, text=True, timeout=120
    )


# ---------------------------------------------------------------- NaN, inf and numpy scores


def test_scores_are_finite_numbers_bools_or_numpy_bools():
    assert _score(numpy.bool_(True)) == 1.0 and _score(numpy.bool_(False)) == 0.0
    assert _score(numpy.int64(3)) == 3.0 and _score(numpy.float32(0.5)) == 0.5
    for value in (math.nan, -math.inf, numpy.float64("inf")):
        with pytest.raises(NonFiniteScore, match=r"metric returned (nan|inf|-inf) for this"):
            _score(value)
    with pytest.raises(MetricTypeError, match=r"numpy\.ndarray"):
        _score(numpy.array([1.0]))


def test_a_nan_or_inf_score_is_an_error_row_counted_in_summary_report_and_compare(tmp_path):
    kinds = ["one", "nan", "numpy_true", "inf", "numpy_false", "numpy_nan", "one", "numpy_true"]
    dataset = [{"id": f"e{i}", "kind": kind} for i, kind in enumerate(kinds)]
    store = tmp_path / "odd.db"
    results = procval.evaluate(
        sp.echo,
        dataset,
        sp.odd_metric,
        configs={"a": procval.Config(), "b": procval.Config(seed=1)},
        store=store,
        workers=2,
        progress=False,
    )
    result = results["a"]
    assert result.score == pytest.approx(4 / 8)  # a real mean: non-finite rows score 0.0
    assert result.error_types == {"NonFiniteScore": 3}
    bad = [row for row in result.rows if row.error is not None]
    assert [row.example_id for row in bad] == ["e1", "e3", "e5"]
    assert bad[0].error.message.startswith("metric returned nan for this example")
    assert bad[1].error.message.startswith("metric returned inf for this example")
    assert [row.prediction for row in bad] == ["answer e1", "answer e3", "answer e5"]  # kept
    assert "(3 errors)" in result.summary() and "3 x NonFiniteScore" in result.summary()

    report = cli("report", str(store))
    assert report.returncode == 0, report.stderr
    assert "score 0.5000 over 8 examples (3 errors)" in report.stdout, report.stdout
    assert "3 x NonFiniteScore" in report.stdout, report.stdout
    compared = cli("compare", str(store), "a", "b")
    assert compared.returncode == 0, compared.stderr
    assert "nan" not in compared.stdout.lower() and "3 errors" in compared.stdout, compared.stdout


# ---------------------------------------------------------------- secrets in descriptions


def test_a_setup_closure_or_object_is_described_by_names_and_hashes_never_values():
    for make in (sp.make_setup, sp.KeyedSetup):
        config = procval.Config(setup=make(SECRET))
        text = json.dumps(config.describe())
        assert SECRET not in text and '"key"' in text, text
        assert procval.Config(setup=make(SECRET)).identity() == config.identity()
        # a changed captured value still changes the identity: resuming then refuses
        assert procval.Config(setup=make(SECRET + "x")).identity() != config.identity()


def test_a_config_without_captured_values_keeps_its_identity():
    config = procval.Config(name="plain", setup=sp.echo, env={"K": "v"}, seed=3)
    assert config._identity_v1() == ""  # nothing to accept besides the identity itself


def old_description(config: procval.Config, key: str) -> dict[str, object]:
    """What procval 0.1.0 wrote for a config whose setup is ``make_setup(key)``: the key itself."""
    setup = config.setup
    assert setup is not None
    return {
        "name": config.name,
        "env": {k: digest(v.encode())[:12] for k, v in sorted(config.env.items())},
        "seed": config.seed,
        "values": {},
        "setup": [
            setup.__module__,
            setup.__qualname__,
            _identity._codedigest(setup.__code__),
            [["key", key]],
        ],
        "program": code_identity(sp.leaky, sp.any_score),
    }


def test_a_store_written_with_the_old_closure_description_resumes_and_loses_the_secret(tmp_path):
    config = procval.Config(name="c", setup=sp.make_setup(SECRET), env={sp.SECRET_NAME: SECRET})
    old = old_description(config, SECRET)
    old_identity = text_identity({k: v for k, v in old.items() if k != "program"})
    assert old_identity != config.identity() and old_identity == config._identity_v1()
    store = tmp_path / "old.db"
    procval.evaluate(sp.leaky, [0, 1], sp.any_score, config=config, store=store, progress=False)
    with sqlite3.connect(store) as db:  # as 0.1.0 left it: its identity, the key in plain text
        db.execute(
            "UPDATE configs SET identity = ?, description = ? WHERE name = 'c'",
            (old_identity, json.dumps(old, sort_keys=True)),
        )
    db.close()

    resumed = procval.evaluate(
        sp.leaky, [0, 1, 2, 3], sp.any_score, config=config, store=store, progress=False
    )
    assert len(resumed) == 4
    with sqlite3.connect(store) as db:
        identity, description = db.execute("SELECT identity, description FROM configs").fetchone()
    db.close()
    assert identity == config.identity() and SECRET not in description
    assert json.loads(description)["setup"][3][0][0] == "key"

    changed = procval.Config(name="c", setup=sp.make_setup(SECRET + "x"), env=config.env)
    with pytest.raises(procval.StoreMismatchError, match="setup changed"):
        procval.evaluate(sp.leaky, [0], sp.any_score, config=changed, store=store, progress=False)


# ---------------------------------------------------------------- secrets in rows


def test_env_values_are_scrubbed_from_the_store_report_export_and_result(tmp_path):
    config = procval.Config(
        name="leaky", setup=sp.make_setup(SECRET), env={sp.SECRET_NAME: SECRET, "MODE": "True"}
    )
    store = tmp_path / "leaky.db"
    result = procval.evaluate(
        sp.leaky, list(range(6)), sp.any_score, config=config, store=store, progress=False
    )
    assert result.error_types == {"ValueError": 3}
    failed = result.errors[0].error
    assert failed.message == f"the API refused the key {MASK}"
    assert MASK in failed.traceback and SECRET not in failed.traceback
    assert result.rows[0].prediction == {"echo": f"called with {MASK}", "n": 0}

    html = tmp_path / "report.html"
    report = cli("report", str(store), "--html", str(html))
    export = cli("export", str(store), "--format", "jsonl")
    assert report.returncode == 0 and export.returncode == 0, report.stderr + export.stderr
    for text in (report.stdout, export.stdout, html.read_text()):
        assert SECRET not in text
    assert MASK in export.stdout and MASK in html.read_text()
    for path in tmp_path.iterdir():  # the store, its WAL if any: nowhere on disk
        assert SECRET.encode() not in path.read_bytes(), path


def test_env_values_are_scrubbed_in_memory_too():
    config = procval.Config(env={sp.SECRET_NAME: SECRET})
    result = procval.evaluate(sp.leaky, [0, 1], sp.any_score, config=config, progress=False)
    assert result.rows[0].prediction["echo"] == f"called with {MASK}"
    assert result.rows[1].error is not None and SECRET not in str(result.rows[1].error)


def test_the_scrubber_replaces_exact_values_and_leaves_short_ones_and_clean_rows_alone():
    scrub = Scrubber({"A": "abcdefgh-long", "B": "abcdefgh", "FLAG": "True", "EMPTY": ""})
    assert scrub.text("x abcdefgh-long y abcdefgh True") == "x ***ENV:A*** y ***ENV:B*** True"
    assert not Scrubber({"FLAG": "True", "N": "1"})  # nothing long enough to be a secret
    clean = Row(0, 0, {}, {"p": [1, "ok"]}, 1.0, RowError("E", "fine", "tb"), 1, 0.0, 1, "c", "f")
    assert scrub.row(clean) is clean
    leaked = Row(0, 0, {}, ("abcdefgh", {"k": "abcdefgh"}), 1.0, None, 1, 0.0, 1, "c", "f")
    assert scrub.row(leaked).prediction == ("***ENV:B***", {"k": "***ENV:B***"})


def test_a_prediction_object_holding_a_secret_is_kept_as_its_scrubbed_json():
    class Answer:
        def __init__(self) -> None:
            self.text = "token abcdefgh here"

    scrub = Scrubber({"B": "abcdefgh"})
    answer = Answer()
    assert scrub.value(answer) == {"text": "token ***ENV:B*** here"}
    answer.text = "clean"
    assert scrub.value(answer) is answer


def test_a_setup_error_does_not_show_an_env_secret(tmp_path):
    secret = "sk-setup-secret-0123456789"

    def setup():
        raise RuntimeError(f"cannot log in with {os.environ['STORE_TEST_SECRET']}")

    config = procval.Config("leaky", setup=setup, env={"STORE_TEST_SECRET": secret})
    with pytest.raises(procval.SetupError) as info:
        procval.evaluate(
            lambda e: e, [1, 2], lambda e, p: 1.0, config=config, workers=1, progress=False
        )
    text = str(info.value) + "".join(info.value.tracebacks.values())
    assert secret not in text and "***ENV:STORE_TEST_SECRET***" in text
