"""Paired statistics (procval/compare.py) and the result methods built on them."""

from __future__ import annotations

import importlib
import itertools
import math
import random
from fractions import Fraction

import pytest

import procval
from helpers import rows as test_rows
from helpers.rows import make_row
from procval.results import Results, RowError

# ``procval.report.compare`` is the function; the modules are reached through the import system.
comparing = importlib.import_module("procval.report.compare")
stats = importlib.import_module("procval.report.stats")
text = importlib.import_module("procval.report.text")


def make_result(name, scores, *, ids=None, errors=(), failure_score=0.0):
    """An EvaluationResult built directly from rows: example i has id ids[i] and scores[i]."""
    ids = list(range(len(scores))) if ids is None else list(ids)
    rows = []
    for i, (example_id, score) in enumerate(zip(ids, scores, strict=True)):
        failed = i in errors
        rows.append(
            make_row(
                i,
                example_id,
                config=name,
                example={"id": example_id, "question": f"q{example_id}"},
                prediction=None if failed else f"answer {example_id}",
                score=failure_score if failed else float(score),
                error=RowError("ValueError", "bad <input>", "Traceback ...") if failed else None,
            )
        )
    return test_rows.make_result(name, rows)


@pytest.fixture(params=["numpy", "python"])
def engine(request, monkeypatch):
    """Run a test with numpy's vectorised resampling and with the pure-Python fallback."""
    if request.param == "numpy":
        pytest.importorskip("numpy")
    else:
        monkeypatch.setattr(stats, "_numpy", lambda: None)
    return request.param


def gap_results():
    """1,000 examples: a is right on 800, b on 500 (all within a's): a 30-point gap."""
    a = make_result("a", [1] * 800 + [0] * 200)
    b = make_result("b", [1] * 500 + [0] * 500)
    return a, b


# ----------------------------------------------------------------------- known answers


@pytest.mark.parametrize("binary", [True, False])
def test_identical_configs_differ_by_nothing(engine, binary):
    rnd = random.Random(7)
    scores = [rnd.random() < 0.6 if binary else rnd.random() for _ in range(300)]
    a, b = make_result("a", scores), make_result("b", scores)
    c = procval.compare(a, b, resamples=2_000)
    assert c.difference == 0.0
    assert c.ci.contains(0.0)
    assert c.p_value == 1.0
    assert c.test == ("exact sign test" if binary else "permutation test")
    assert (c.wins, c.losses, len(c.ties), c.n) == ((), (), 300, 300)


def test_thirty_point_gap_on_binary_scores(engine):
    a, b = gap_results()
    c = procval.compare(a, b, resamples=2_000 if engine == "python" else 10_000)
    assert c.difference == pytest.approx(0.30)
    assert c.ci.contains(0.30)
    assert 0.25 < c.ci.low < c.ci.high < 0.35
    assert c.ci.high - c.ci.low < 0.07  # sd of the paired difference is ~0.0145
    # 300 discordant pairs, all won by a: p = 2 * (1/2)**300.
    assert c.p_value == pytest.approx(2.0**-299, rel=1e-12)
    assert (len(c.wins), len(c.losses), len(c.ties)) == (300, 0, 700)
    assert c.wins == tuple(range(500, 800))
    assert c.ci_a.contains(0.8) and c.ci_b.contains(0.5)


def test_thirty_point_gap_on_continuous_scores(engine):
    rnd = random.Random(1)
    base = [rnd.random() * 0.6 for _ in range(1_000)]
    a = make_result("a", [x + 0.3 + rnd.gauss(0, 0.05) for x in base])
    b = make_result("b", base)
    c = procval.compare(a, b, resamples=2_000)
    assert c.test == "permutation test"
    assert c.ci.contains(c.difference)
    assert 0.29 < c.ci.low < c.ci.high < 0.31
    assert c.p_value == 1 / 2_001  # no sign flip comes near: the smallest p possible


def test_sign_test_matches_the_binomial_by_hand():
    def by_hand(wins, losses):
        m, k = wins + losses, min(wins, losses)
        tail = sum(Fraction(math.comb(m, i), 2**m) for i in range(k + 1))
        return float(min(Fraction(1), 2 * tail))

    assert stats.sign_test(5, 0) == 2 / 32
    assert stats.sign_test(8, 2) == 2 * (1 + 10 + 45) / 1024
    assert stats.sign_test(3, 3) == 1.0
    assert stats.sign_test(0, 0) == 1.0
    assert stats.sign_test(1, 0) == 1.0
    for wins, losses in [(12, 3), (3, 12), (60, 40), (350, 50), (1000, 1100)]:
        assert stats.sign_test(wins, losses) == pytest.approx(by_hand(wins, losses), rel=1e-12)


def test_sign_test_for_many_pairs_uses_floats_and_agrees(monkeypatch):
    cases = [(6000, 5800), (700, 500), (90, 10)]
    exact = [stats.sign_test(wins, losses) for wins, losses in cases]
    monkeypatch.setattr(stats, "_EXACT_LIMIT", 0)
    approx = [stats.sign_test(wins, losses) for wins, losses in cases]
    assert approx == pytest.approx(exact, rel=1e-9)
    assert 0 < stats.sign_test(30_000, 29_000) < 1e-4


def test_mcnemar_on_scores_with_wins_and_losses():
    # a wins 350 examples and loses 50 (the rest tie): difference 0.30 on 1,000 examples.
    a = make_result("a", [1] * 350 + [0] * 50 + [1] * 300 + [0] * 300)
    b = make_result("b", [0] * 350 + [1] * 50 + [1] * 300 + [0] * 300)
    c = procval.compare(a, b)
    assert c.difference == pytest.approx(0.30)
    tail = sum(math.comb(400, i) for i in range(51))
    assert c.p_value == pytest.approx(2 * tail / 2**400, rel=1e-12)


def test_permutation_test_agrees_with_full_enumeration(engine):
    diffs = [0.5, 1.0, 1.5, -0.25, 2.0, 0.75, -1.0, 0.5]
    observed = abs(sum(diffs))
    flips = list(itertools.product([1, -1], repeat=len(diffs)))
    exact = sum(
        abs(sum(s * d for s, d in zip(signs, diffs))) >= observed - 1e-12 for signs in flips
    )
    exact /= len(flips)
    estimate = stats.permutation_test(diffs, 20_000, seed=3)
    assert estimate == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 20_000))


def test_permutation_test_with_many_distinct_differences(engine):
    rnd = random.Random(5)
    diffs = [rnd.gauss(0, 1) for _ in range(200)]
    p = stats.permutation_test(diffs, 4_000, seed=0)
    assert 0.05 < p <= 1.0  # no effect: rarely significant, and this seed is not
    assert stats.permutation_test([0.0] * 10, 100, seed=0) == 1.0


def test_bootstrap_interval_of_one_score(engine):
    result = make_result("a", [1] * 800 + [0] * 200)
    interval = result.ci(resamples=2_000)
    assert isinstance(interval, procval.Interval)
    half_width = 1.96 * math.sqrt(0.8 * 0.2 / 1_000)  # the normal approximation: ~0.025
    assert interval.low == pytest.approx(0.8 - half_width, abs=0.01)
    assert interval.high == pytest.approx(0.8 + half_width, abs=0.01)
    wider = result.ci(confidence=0.99, resamples=2_000)
    assert wider.low <= interval.low and wider.high >= interval.high
    assert all(math.isnan(x) for x in make_result("e", []).ci())


def test_numpy_and_python_resampling_agree():
    pytest.importorskip("numpy")
    rnd = random.Random(2)
    columns = [[rnd.random() for _ in range(400)], [rnd.random() for _ in range(400)]]
    fast = stats._intervals(stats._resample_means_numpy(stats._numpy(), columns, 4_000, 0), 0.9)
    slow = stats._intervals(stats._resample_means_python(columns, 4_000, 0), 0.9)
    for f, s in zip(fast, slow, strict=True):
        assert f.low == pytest.approx(s.low, abs=0.01)
        assert f.high == pytest.approx(s.high, abs=0.01)


def test_holm_adjustment():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx((0.03, 0.06, 0.06))
    assert stats.holm([0.5, 0.9]) == pytest.approx((1.0, 1.0))
    assert stats.holm([]) == ()


# ----------------------------------------------------------------------- alignment, errors


def test_unaligned_results_are_refused_with_counts():
    a = make_result("a", [1, 0, 1, 1, 0], ids=["x1", "x2", "x3", "x4", "x5"])
    b = make_result("b", [1, 1, 0, 1], ids=["x1", "x2", "x3", "y9"])
    with pytest.raises(comparing.UnalignedResultsError) as info:
        procval.compare(a, b)
    error = info.value
    assert isinstance(error, procval.ProcvalError) and isinstance(error, ValueError)
    assert (error.missing_in_a, error.missing_in_b) == (1, 2)
    message = str(error)
    assert "1 example id of 'b' missing from 'a'" in message
    assert "2 example ids of 'a' missing from 'b'" in message
    assert "'x4', 'x5' not in 'b'; 'y9' not in 'a'" in message
    assert "common_only=True" in message


def test_common_only_compares_the_shared_ids():
    a = make_result("a", [1, 0, 1, 1, 0], ids=["x1", "x2", "x3", "x4", "x5"])
    b = make_result("b", [1, 1, 0, 1], ids=["x1", "x2", "x3", "y9"])
    c = procval.compare(a, b, common_only=True)
    assert c.n == 3
    assert (c.wins, c.losses, c.ties) == (("x3",), ("x2",), ("x1",))
    assert (c.missing_in_a, c.missing_in_b) == (1, 2)
    assert "unpaired ids left out" in repr(c)


def test_no_common_ids_is_refused_even_with_common_only():
    a = make_result("a", [1, 0], ids=["a", "b"])
    b = make_result("b", [1, 0], ids=["c", "d"])
    with pytest.raises(comparing.UnalignedResultsError, match="no example id in common"):
        procval.compare(a, b, common_only=True)


def test_errored_rows_take_part_with_their_failure_score():
    a = make_result("a", [1, 1, 1, 1], errors={0, 1})  # failures score 0
    b = make_result("b", [1, 1, 1, 1], errors={3})
    c = procval.compare(a, b)
    assert (c.errors_a, c.errors_b) == (2, 1)
    assert c.difference == pytest.approx(0.5 - 0.75)
    assert (c.wins, c.losses) == ((3,), (0, 1))
    d = procval.compare(make_result("a", [1, 1, 1, 1], errors={0}, failure_score=0.5), b)
    assert d.test == "permutation test"  # a 0.5 failure score makes the scores non-binary
    assert "2 errors" in repr(c) and "1 error\n" in repr(c)


@pytest.mark.parametrize(
    "options",
    [{"confidence": 1.0}, {"confidence": 0}, {"resamples": 0}, {"seed": -1}, {"seed": 1.5}],
)
def test_bad_options_are_refused(options):
    a, b = gap_results()
    with pytest.raises(ValueError):
        procval.compare(a, b, **options)


def test_non_results_are_refused():
    with pytest.raises(TypeError, match="EvaluationResult"):
        procval.compare([1, 0], make_result("b", [1, 0]))


def test_results_are_deterministic_for_a_seed(engine):
    rnd = random.Random(4)
    a = make_result("a", [rnd.random() for _ in range(200)])
    b = make_result("b", [rnd.random() for _ in range(200)])
    first = procval.compare(a, b, resamples=1_000, seed=11)
    again = procval.compare(a, b, resamples=1_000, seed=11)
    other = procval.compare(a, b, resamples=1_000, seed=12)
    assert (first.ci, first.p_value, first.ci_a) == (again.ci, again.p_value, again.ci_a)
    assert first.ci != other.ci
    assert a.ci(resamples=500, seed=3) == a.ci(resamples=500, seed=3)


def test_repr_reads_as_a_summary():
    a, b = gap_results()
    text = repr(procval.compare(a, b))
    assert text.splitlines()[0] == "Comparison of 'a' (a) with 'b' (b) on 1000 paired examples"
    assert "+0.3000  95% CI [+0.2" in text
    assert "exact sign test" in text
    assert "a wins 300, loses 0, ties 700" in text


# ----------------------------------------------------------------------- Results.compare


def three_configs():
    rnd = random.Random(9)
    skills = {"base": 0.5, "better": 0.8, "same": 0.5}
    return Results(
        {
            name: make_result(name, [rnd.random() < s for _ in range(400)])
            for name, s in skills.items()
        }
    )


def test_results_compare_against_the_first_config():
    table = three_configs().compare(resamples=1_000)
    assert isinstance(table, procval.ComparisonTable)
    assert [(c.a, c.b) for c in table] == [("better", "base"), ("same", "base")]
    assert table[0].difference > 0.2 and table[0].p_value < 1e-10
    assert table.p_adjusted[0] >= table[0].p_value
    lines = repr(table).splitlines()
    assert lines[0].split()[:4] == ["a", "b", "n", "a"]
    assert lines[1].startswith("better") and "base" in lines[1]


def test_results_compare_with_a_named_baseline_and_all_pairs():
    results = three_configs()
    table = results.compare("better", resamples=500)
    assert [(c.a, c.b) for c in table] == [("base", "better"), ("same", "better")]
    assert all(c.difference < 0 for c in table)
    pairs = results.compare(pairs=True, resamples=500)
    assert [(c.a, c.b) for c in pairs] == [("better", "base"), ("same", "base"), ("same", "better")]
    with pytest.raises(KeyError, match="nope"):
        results.compare("nope")
    with pytest.raises(ValueError, match="not both"):
        results.compare("base", pairs=True)


# ----------------------------------------------------------------------- exports and views


def test_to_pandas_has_one_row_per_example():
    pandas = pytest.importorskip("pandas")
    result = make_result("a", [1, 0, 1], ids=["x", "y", "z"], errors={1})
    frame = result.to_pandas()
    assert isinstance(frame, pandas.DataFrame)
    assert list(frame["example_id"]) == ["x", "y", "z"]
    assert list(frame["score"]) == [1.0, 0.0, 1.0]
    assert frame.loc[1, "error_type"] == "ValueError"
    assert frame.loc[1, "error_message"] == "bad <input>"
    assert frame["error_type"].isna().sum() == 2
    assert {"prediction", "example", "attempts", "worker_pid", "config"} <= set(frame.columns)
    assert "error" not in frame.columns
    table = three_configs().compare(resamples=200).to_pandas()
    assert list(table["a"]) == ["better", "same"]
    assert {"difference", "ci_low", "ci_high", "p_value", "p_adjusted"} <= set(table.columns)


def test_notebook_views_escape_and_show_the_score():
    result = make_result("<cfg>", [1, 0, 1, 1], errors={1})
    page = result._repr_html_()
    assert "&lt;cfg&gt;" in page and "<cfg>" not in page
    assert "0.7500" in page and "<svg" in page
    assert "bad &lt;input&gt;" in page
    assert "<th>a</th>" in three_configs().compare(resamples=200)._repr_html_()


# ----------------------------------------------------------------------- end to end


def answer(example):
    return example["x"] * procval.current_config().values["factor"]


def exact(example, prediction):
    return prediction == 2 * example["x"]


def test_compare_after_a_real_run_and_on_the_command_line(tmp_path, capsys):
    data = [{"id": f"e{i}", "x": i} for i in range(30)]
    configs = {
        "double": procval.Config(values={"factor": 2}),
        "triple": procval.Config(values={"factor": 3}),
    }
    path = tmp_path / "run.db"
    results = procval.evaluate(
        answer, data, exact, configs=configs, workers=2, progress=False, store=path
    )
    c = procval.compare(results["double"], results["triple"], resamples=1_000)
    assert c.n == 30
    assert c.difference == pytest.approx(29 / 30)  # x = 0 is right for both
    assert c.ties == ("e0",) and len(c.wins) == 29
    assert c.p_value == pytest.approx(2.0**-28)
    assert [(row.a, row.b) for row in results.compare(resamples=200)] == [("triple", "double")]

    from procval import cli

    assert cli.main(["compare", str(path), "double", "triple", "--examples", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Comparison of 'double' (a) with 'triple' (b) on 30 paired examples"
    assert out[1].split()[:3] == ["a", "double", "1.0000"]
    assert out[2].split()[:3] == ["b", "triple", "0.0333"]
    assert out[3].split()[:3] == ["a", "-", "b"] and "p = 3.7e-09 (exact sign test)" in out[3]
    assert out[4] == "  a wins 29, loses 0, ties 1"
    assert out[5] == "First 2 of 29 examples where they differ:"
    assert out[6] == "  e1  a wins   a: 2 (1)  b: 3 (0)"
    assert out[7] == '      input: {"id": "e1", "x": 1}'
    assert len(out) == 10

    assert cli.main(["compare", str(path), "double", "quadruple"]) == 2
    assert "no config named 'quadruple'" in capsys.readouterr().err


def test_describe_lists_the_first_flipped_examples():
    a = make_result("a", [1, 0, 1, 1, 0, 1], ids=["k1", "k2", "k3", "k4", "k5", "k6"], errors={4})
    b = make_result("b", [1, 1, 0, 1, 1, 0], ids=["k1", "k2", "k3", "k4", "k5", "k6"])
    c = procval.compare(a, b, resamples=200)
    described = text.describe(c, a, b, examples=3)
    lines = described.splitlines()
    assert lines[: len(repr(c).splitlines())] == repr(c).splitlines()
    assert "First 3 of 4 examples where they differ:" in described
    assert lines[-6].split()[:3] == ["k2", "a", "loses"]
    assert lines[-4] == "  k3  a wins   a: 'answer k3' (1)  b: 'answer k3' (0)"
    assert lines[-3].startswith('      input: {"id": "k3", "question": "qk3"}')
    assert "k6" not in described
    assert "<ValueError> (0)" in text.describe(c, a, b, examples=4)
    assert text.describe(procval.compare(a, a, resamples=10), a, a) == repr(
        procval.compare(a, a, resamples=10)
    )


def named_answer(example):
    return example["x"] * procval.current_config().values["factor"]


def named_scores(example, prediction):
    return {
        "exact": prediction == 2 * example["x"],
        "close": 1 / (1 + abs(prediction - 2 * example["x"])),
    }


def test_command_line_compare_adds_every_score_and_group_below_the_usual_lines(tmp_path, capsys):
    data = [{"id": f"e{i}", "x": i, "kind": "odd" if i % 2 else "even"} for i in range(20)]
    configs = {
        "double": procval.Config(values={"factor": 2}),
        "triple": procval.Config(values={"factor": 3}),
    }
    path = tmp_path / "run.db"
    procval.evaluate(
        named_answer, data, named_scores, configs=configs, workers=1, progress=False,
        store=path, group_by="kind",
    )  # fmt: skip
    from procval import cli

    assert cli.main(["compare", str(path), "double", "triple", "--examples", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Comparison of 'double' (a) with 'triple' (b) on 20 paired examples"
    at = out.index("every score and group (p (Holm): adjusted for all of these comparisons):")
    table = out[at + 1 :]
    assert table[0].split()[:4] == ["a", "b", "score", "group"]
    assert [line.split()[2:4] for line in table[1:]] == [
        ["exact", "(all)"], ["close", "(all)"], ["exact", "even"], ["close", "even"],
        ["exact", "odd"], ["close", "odd"],
    ]  # fmt: skip
    assert all(line.split()[:2] == ["double", "triple"] for line in table[1:])
