"""Groups (``evaluate(..., group_by=)``): rows' groups, ``by_group()``, reports, errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types

import pytest

import procval
from helpers.rows import make_result, make_row
from procval.report import stats
from procval.report.html import render_html

SUBJECTS = ("algebra", "geometry", "logic")


def data(n=12):
    return [{"id": f"q{i}", "x": i, "subject": SUBJECTS[i % 3], "level": i % 2} for i in range(n)]


def echo(example):
    return example["x"] if isinstance(example, dict) else example.x


def even(example, prediction):
    return prediction % 2 == 0


def thirds(example, prediction):
    return {"even": float(prediction % 2 == 0), "small": float(prediction < 6)}


# ------------------------------------------------------------------------ where groups come from


def test_groups_from_a_key_are_on_every_row_and_make_by_group():
    result = procval.evaluate(echo, data(), even, workers=1, progress=False, group_by="subject")
    assert [row.group for row in result.rows] == [SUBJECTS[i % 3] for i in range(12)]
    groups = result.by_group()
    assert list(groups) == sorted(SUBJECTS)
    assert [len(g) for g in groups.values()] == [4, 4, 4]
    # algebra is x = 0, 3, 6, 9: even on 0 and 6
    assert groups["algebra"].score == 0.5
    assert [r.example_id for r in groups["algebra"].rows] == ["q0", "q3", "q6", "q9"]
    low, high = groups["algebra"].ci(resamples=500)
    assert 0 <= low <= 0.5 <= high <= 1
    assert groups["algebra"].config == result.config


def test_groups_from_an_attribute_and_from_a_function_made_str():
    objects = [types.SimpleNamespace(id=i, x=i, kind=i % 2) for i in range(6)]
    by_attribute = procval.evaluate(echo, objects, even, workers=1, progress=False, group_by="kind")
    assert [row.group for row in by_attribute.rows] == ["0", "1", "0", "1", "0", "1"]
    assert by_attribute.by_group()["0"].score == 1.0 and by_attribute.by_group()["1"].score == 0

    by_function = procval.evaluate(
        echo,
        data(6),
        even,
        workers=1,
        progress=False,
        group_by=lambda e: "big" * (e["x"] > 2) or "small",
    )
    assert {g: len(r) for g, r in by_function.by_group().items()} == {"big": 3, "small": 3}


def test_no_group_by_means_no_groups():
    result = procval.evaluate(echo, data(3), even, workers=1, progress=False)
    assert all(row.group is None for row in result.rows)
    with pytest.raises(ValueError, match=r"no groups.*group_by"):
        result.by_group()
    assert "group" not in result.summary()


def test_by_group_keeps_epochs_named_scores_and_examples():
    result = procval.evaluate(
        echo, data(), thirds, workers=1, progress=False, group_by="subject", epochs=3
    )
    assert len(result.rows) == 36
    algebra = result.by_group()["algebra"]
    assert algebra.epochs == 3 and len(algebra.rows) == 12 and len(algebra.examples()) == 4
    assert algebra.scores == {"even": 0.5, "small": 0.5}  # x = 0, 3, 6, 9
    lines = result.summary().splitlines()
    header = next(line for line in lines if line.split()[:1] == ["group"])
    assert header.split()[:2] == ["group", "even"] and "small" in header
    algebra_line = next(line for line in lines if line.strip().startswith("algebra"))
    assert algebra_line.split()[1:2] == ["0.5000"] and algebra_line.split()[-1] == "0.5000"


# -------------------------------------------------------------------------------- bad group_by


def test_a_key_missing_on_some_examples_is_refused_before_any_worker(tmp_path):
    log = tmp_path / "ran"
    examples = data(10)
    for i in (2, 5, 6, 7, 8, 9):
        del examples[i]["subject"]
    examples[5]["subject"] = None  # None counts as missing

    def program(example):
        log.write_text("a worker ran")
        return 1

    with pytest.raises(ValueError) as caught:
        procval.evaluate(program, examples, even, workers=1, progress=False, group_by="subject")
    message = str(caught.value)
    assert "6 of 10 examples have no group ('q2', 'q5', 'q6', 'q7', 'q8', ...)" in message
    assert "group_by='subject'" in message and "lambda e: e.get('subject') or 'other'" in message
    assert not log.exists()


def test_bad_group_values_and_functions_are_named():
    with pytest.raises(ValueError, match=r"1 of 3 examples have no group \('q1'\).*returned None"):
        procval.evaluate(
            echo, data(3), even, workers=1, group_by=lambda e: None if e["x"] == 1 else "a"
        )
    with pytest.raises(ValueError, match="group_by raised KeyError: 'nope' on example 'q0'"):
        procval.evaluate(echo, data(3), even, workers=1, group_by=lambda e: e["nope"])
    with pytest.raises(TypeError, match=r"group_by gave a list .* for example 'q0'; a group must"):
        procval.evaluate(echo, data(3), even, workers=1, group_by=lambda e: [e["x"]])
    with pytest.raises(TypeError, match="group_by must be a key or attribute name"):
        procval.evaluate(echo, data(3), even, workers=1, group_by=3)  # type: ignore[arg-type]


def test_a_streamed_dataset_is_refused_at_the_first_example_without_a_group(tmp_path):
    examples = data(10)
    del examples[6]["subject"]
    store = tmp_path / "run.db"
    with pytest.raises(ValueError, match=r"example 'q6' \(#6\) has no group") as caught:
        procval.evaluate(
            echo, iter(examples), even, workers=1, progress=False, store=store, group_by="subject"
        )
    assert "the examples before it ran and were kept" in str(caught.value)
    stored = procval.load(store)["default"]
    assert [row.example_id for row in stored.rows] == [f"q{i}" for i in range(6)]
    assert [row.group for row in stored.rows] == [SUBJECTS[i % 3] for i in range(6)]


# ------------------------------------------------------------------------------ stored results


def test_groups_are_stored_read_back_resumed_and_reported(tmp_path):
    store = tmp_path / "run.db"
    configs = {"a": procval.Config(), "b": procval.Config(values={"b": 1})}
    first = procval.evaluate(
        echo, data(6), even, configs=configs, workers=1, progress=False, store=store,
        group_by="subject",
    )  # fmt: skip
    resumed = procval.evaluate(
        echo, data(), even, configs=configs, workers=1, progress=False, store=store,
        group_by="subject",
    )  # fmt: skip
    assert first["a"].added == 6 and resumed["a"].found == 6 and resumed["a"].added == 6
    loaded = procval.load(store)
    for result in (resumed["a"], loaded["a"]):
        assert [row.group for row in result.rows] == [SUBJECTS[i % 3] for i in range(12)]
    stored = procval.load(store)["a"]
    assert {g: r.score for g, r in stored.by_group().items()} == {
        "algebra": 0.5, "geometry": 0.5, "logic": 0.5,
    }  # fmt: skip
    assert list(loaded.by_group()) == sorted(SUBJECTS)
    assert list(loaded.by_group()["logic"]) == ["a", "b"]
    exported = list(procval.store.readers.iter_rows(store, ["a"]))
    assert [row["group"] for row in exported][:3] == list(SUBJECTS)
    assert "geometry" in procval.load(store).summary()

    page = render_html(loaded, resamples=200)
    assert "<section id='groups'><h2>Scores by group</h2>" in page
    assert page.count("<td>geometry</td>") >= 2  # a table per config, and the differences


def test_cli_run_with_group_by_and_report_show_the_groups(tmp_path):
    task = tmp_path / "grouped_task.py"
    task.write_text(
        textwrap.dedent(
            """
            import procval

            def program(example):
                return example["x"]

            def metric(example, prediction):
                return prediction % 2 == 0

            data = [{"id": f"q{i}", "x": i, "subject": "ab"[i % 2]} for i in range(8)]
            task = procval.Task(program, data, metric, workers=1)
            """
        )
    )
    store = tmp_path / "run.db"

    def cli(*args):
        done = subprocess.run(
            [sys.executable, "-m", "procval", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    ran = cli("run", f"{task}:task", "--store", store, "--group-by", "subject", "--no-progress")
    assert "default by group:" in ran
    report = cli("report", store, "--html", tmp_path / "report.html").splitlines()
    header = next(i for i, line in enumerate(report) if line.split()[:2] == ["group", "score"])
    assert report[header + 1].split()[:2] == ["a", "1.0000"]
    assert report[header + 2].split()[:2] == ["b", "0.0000"]
    assert report[header + 1].split()[-2:] == ["4", "0"]  # examples, errors
    assert "Scores by group" in (tmp_path / "report.html").read_text()


# -------------------------------------------------------------------------------- comparisons


def grouped_result(name, scores, *, named=None, epochs=1):
    """Rows of example i in group "g{i % 2}" with scores[i] (a list per epoch when epochs > 1)."""
    rows = []
    for i, score in enumerate(scores):
        for epoch, value in enumerate(score if epochs > 1 else [score]):
            extra = {"scores": {"main": value, **named[i]}} if named else {}
            rows.append(
                make_row(
                    i, f"e{i}", config=name, score=value, group=f"g{i % 2}", epoch=epoch, **extra
                )
            )
    return procval.EvaluationResult(name, rows, duration=1.0, epochs=epochs)


def test_compare_covers_every_score_and_group_with_holm_across_all():
    a_scores = [1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1]
    b_scores = [0, 1, 0, 0, 0, 1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 0, 1, 0, 0, 1]
    a = grouped_result("a", a_scores, named=[{"len": i / 20} for i in range(20)])
    b = grouped_result("b", b_scores, named=[{"len": (i % 3) / 3} for i in range(20)])
    table = procval.Results({"b": b, "a": a}).compare(resamples=500)
    assert [(c.score_name, c.group) for c in table] == [
        ("main", None), ("len", None), ("main", "g0"), ("len", "g0"), ("main", "g1"),
        ("len", "g1"),
    ]  # fmt: skip
    assert [(c.a, c.b) for c in table] == [("a", "b")] * 6
    raw = [c.p_value for c in table]
    m = len(raw)
    order = sorted(range(m), key=raw.__getitem__)
    expected = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):  # Holm by hand: running max of (m - rank) * p, capped
        running = max(running, min(1.0, (m - rank) * raw[i]))
        expected[i] = running
    assert list(table.p_adjusted) == pytest.approx(expected)
    assert all(adj >= p for adj, p in zip(table.p_adjusted, raw, strict=True))
    smallest = order[0]
    assert table.p_adjusted[smallest] == pytest.approx(min(1.0, m * raw[smallest]))

    g0 = table[2]  # the main score, examples 0, 2, ..., 18
    alone = procval.compare(a, b, group="g0", score="main", resamples=500)
    assert g0.n == 10 == alone.n and g0.p_value == alone.p_value and g0.ci == alone.ci
    assert alone.wins == ("e0", "e2", "e4", "e6", "e10", "e12") and alone.ties[:2] == ("e8", "e14")
    assert "score 'main', group 'g0'" in repr(alone).splitlines()[0]
    every = procval.compare(a, b, every=True, resamples=500)
    assert every.records() == table.records()
    text = repr(table).splitlines()
    assert text[0].split()[:4] == ["a", "b", "score", "group"]
    assert text[1].split()[:4] == ["a", "b", "main", "(all)"]
    with pytest.raises(ValueError, match="has no score 'f1'"):
        procval.compare(a, b, score="f1")


def test_one_score_without_groups_keeps_the_plain_table():
    a = make_result("a", [make_row(i, config="a", score=i % 2) for i in range(10)])
    b = make_result("b", [make_row(i, config="b", score=0) for i in range(10)])
    table = procval.Results({"b": b, "a": a}).compare(resamples=200)
    assert len(table) == 1 and table[0].score_name is None and table[0].group is None
    assert repr(table).split()[:4] == ["a", "b", "n", "a"]


def test_epochs_pair_by_example_so_intervals_are_clustered_by_example():
    # Each example scores the same in all 5 of its epochs: the epochs add no information.
    per_example_a = [0.9, 0.1, 0.8, 0.2, 0.7, 0.6, 0.3, 0.95]
    per_example_b = [0.5, 0.5, 0.4, 0.5, 0.5, 0.4, 0.5, 0.5]
    k = 5
    a = grouped_result("a", [[s] * k for s in per_example_a], epochs=k)
    b = grouped_result("b", [[s] * k for s in per_example_b], epochs=k)
    clustered = procval.compare(a, b, resamples=4000)
    assert clustered.n == 8

    # the same comparison on one row per example: the epoch means
    means_a = make_result("a", [make_row(i, f"e{i}", config="a", score=s)
                                for i, s in enumerate(per_example_a)])  # fmt: skip
    means_b = make_result("b", [make_row(i, f"e{i}", config="b", score=s)
                                for i, s in enumerate(per_example_b)])  # fmt: skip
    by_example = procval.compare(means_a, means_b, resamples=4000)
    assert clustered.ci == by_example.ci and clustered.p_value == by_example.p_value

    # treating the 40 epoch rows as 40 independent examples would narrow the interval
    flat_a = [s for s in per_example_a for _ in range(k)]
    flat_b = [s for s in per_example_b for _ in range(k)]
    means = stats._resample_means([flat_a, flat_b], 4000, 0)
    naive = stats._intervals(means, 0.95)[2]
    width = clustered.ci.high - clustered.ci.low
    assert naive.high - naive.low < 0.7 * width


def test_task_and_workers_pool_take_group_by():
    task = procval.Task(echo, data(6), even, workers=1, group_by="subject")
    results = task.evaluate(progress=False)
    assert [row.group for row in results["default"].rows] == [SUBJECTS[i % 3] for i in range(6)]
    override = task.evaluate(progress=False, group_by=lambda e: f"level{e['level']}")
    assert list(override["default"].by_group()) == ["level0", "level1"]
    with procval.Workers(workers=1) as pool:
        result = pool.evaluate(echo, data(6), even, progress=False, group_by="level")
    assert {g: len(r) for g, r in result.by_group().items()} == {"0": 3, "1": 3}
