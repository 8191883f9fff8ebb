"""Budgets (``max_tokens``, ``max_cost``) and the rate-limit counts kept in the store (issue 15).

Real workers against the stand-in server (tests/helpers/llm_server.py), whose replies carry
usage that the programs record (tests/helpers/budget_programs.py).
"""

from __future__ import annotations

import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import procval
from helpers import budget_programs as programs
from helpers import limit_programs
from helpers.llm_server import LLMServer
from procval import cli
from procval.report.html import render_html
from procval.run.budget import Spend
from procval.store import readers as store_readers
from procval.usage import Usage

HELPERS = Path(__file__).resolve().parent / "helpers"
TASK = f"{HELPERS / 'budget_programs.py'}:task"


def tokens(result: procval.EvaluationResult) -> int:
    return sum(u.total_tokens for u in result.usage.values())


def per_row(result: procval.EvaluationResult) -> int:
    """Each row's tokens (the stand-in server's usage is the same for every question here)."""
    spent = {sum(u.total_tokens for u in (row.usage or {}).values()) for row in result.rows}
    assert len(spent) == 1, spent
    return spent.pop()


def at_server(server: LLMServer) -> dict[str, str]:
    return {"base": server.api_base}


# ---------------------------------------------------------------- a token budget


def test_a_token_budget_stops_its_config_keeps_rows_and_the_other_goes_on(tmp_path):
    store = tmp_path / "runs.db"
    with LLMServer(latency=0.1) as server:
        configs = [
            procval.Config("small", values=at_server(server)),  # evaluate's budget
            procval.Config("large", values=at_server(server), max_tokens=10**9),  # its own
        ]
        results = procval.evaluate(
            programs.asked, [f"q{i}" for i in range(60)], programs.one,
            configs=configs, workers=2, max_tokens=40, store=store,
        )  # fmt: skip
        sent = server.counts()["answered"]
    small, large = results["small"], results["large"]
    assert len(large) == 60 and large.stopped is None  # the other config ran to the end
    each = per_row(small)
    needed = math.ceil(40 / each)  # rows whose spend reaches the budget
    assert needed <= len(small) < 60  # stopped early, every finished row kept
    assert all(row.error is None for row in small.rows)
    assert sent == len(small) + 60  # no example was started and dropped: every call has a row
    # the overrun is the examples in flight when the budget was reached, and is said
    in_flight = len(small) - needed
    assert in_flight <= 10  # 1 worker, 1 thread: at most two small shards were out
    assert small.stopped is not None
    assert f"max_tokens=40 was reached; the {in_flight} examples already sent" in small.stopped
    assert f"{60 - len(small)} examples not run" in small.stopped
    assert f"store={str(store)!r} and a larger max_tokens" in small.stopped
    assert small.stopped in results.summary() and small.stopped in small.summary()
    assert tokens(small) == len(small) * each
    assert store_readers.sessions(store)[-1]["status"] == "stopped"  # not completed


def test_a_resume_counts_the_stored_spend_and_a_larger_budget_finishes(tmp_path):
    store = tmp_path / "runs.db"
    data = [f"q{i}" for i in range(30)]
    with LLMServer() as server:
        config = procval.Config("a", values=at_server(server))
        first = procval.evaluate(
            programs.asked, data, programs.one, config=config, workers=1, max_tokens=20,
            store=store,
        )  # fmt: skip
        assert 0 < len(first) < 30
        same = procval.evaluate(
            programs.asked, data, programs.one, config=config, workers=1, max_tokens=20,
            store=store,
        )  # fmt: skip
        asked_before = server.counts()["answered"]
        assert same.added == 0 and asked_before == len(first)  # the stored spend reached it
        assert same.stopped is not None and "reached by the spend already stored" in same.stopped
        done = procval.evaluate(
            programs.asked, data, programs.one, config=config, workers=1, max_tokens=10**6,
            store=store,
        )  # fmt: skip
    assert len(done) == 30 and done.found == len(first) and done.added == 30 - len(first)
    assert done.stopped is None
    assert tokens(done) == 30 * per_row(done)  # the config's spend over both sessions
    assert store_readers.sessions(store)[-1]["status"] == "completed"


def test_fresh_starts_the_spend_over(tmp_path):
    store = tmp_path / "runs.db"
    kept = procval.evaluate(
        programs.priced, range(20), programs.one, workers=1, max_tokens=50, store=store
    )
    assert kept.stopped is not None
    again = procval.evaluate(
        programs.priced, range(20), programs.one, workers=1, max_tokens=50, store=store,
        fresh=True,
    )  # fmt: skip
    assert again.found == 0 and again.added > 0  # the discarded rows' spend is not counted


# ---------------------------------------------------------------- a cost budget


def test_a_cost_budget_stops_a_config_that_records_its_cost():
    result = procval.evaluate(programs.priced, range(50), programs.one, workers=1, max_cost=0.05)
    assert 5 <= len(result) < 50
    assert result.usage["priced-model"].cost == pytest.approx(0.01 * len(result))
    assert result.stopped is not None and "max_cost=0.05 was reached" in result.stopped
    assert "nothing was stored (no store=)" in result.stopped


def test_a_budget_that_cannot_be_checked_says_so_in_the_summary():
    no_cost = procval.evaluate(
        programs.unpriced, range(10), programs.one, workers=1, max_cost=0.001
    )
    assert len(no_cost) == 10 and no_cost.stopped is None  # it never stops ...
    assert "max_cost counts no cost for 'unknown-model'" in no_cost.summary()  # ... and says why
    nothing = procval.evaluate(programs.silent, range(10), programs.one, workers=1, max_tokens=5)
    assert len(nothing) == 10
    assert "no example recorded any usage" in nothing.summary()
    assert "procval.record_usage" in nothing.summary()


def test_a_configs_own_budget_wins_over_evaluates(tmp_path):
    results = procval.evaluate(
        programs.priced, range(40), programs.one,
        configs=[procval.Config("own", max_cost=0.03), procval.Config("call")],
        workers=2, max_cost=10.0, store=tmp_path / "runs.db",
    )  # fmt: skip
    assert len(results["call"]) == 40 and results["call"].stopped is None
    assert len(results["own"]) < 40
    assert "Config(max_cost=) of this config" in results["own"].stopped


def test_the_spend_rule_counts_tokens_cost_and_cached_calls():
    spend = Spend(max_tokens=None, max_cost=1.0)
    spend.add({"m": Usage(calls=2, cached_calls=2, total_tokens=0, cost=None)})  # cache hits
    assert not spend.uncosted and not spend.reached
    spend.add({"m": Usage(calls=1, total_tokens=7, cost=0.6), "n": Usage(calls=1, cost=0.4)})
    assert spend.reached == "max_cost=1" and spend.tokens == 7


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("value", [0, -1, "10", True, math.nan, math.inf, [5]])
def test_bad_budgets_are_refused_before_any_worker_starts(value):
    for option in ("max_tokens", "max_cost"):
        with pytest.raises(ValueError, match=f"{option} must be a positive number"):
            procval.evaluate(programs.silent, range(3), programs.one, **{option: value})
        with pytest.raises(ValueError, match=f"Config.{option} must be a positive number"):
            procval.Config("c", **{option: value})


def test_bad_budgets_are_refused_by_a_pool_and_by_the_dspy_evaluator():
    with procval.Workers(procval.Config(), workers=1) as pool:
        with pytest.raises(ValueError, match="max_tokens must be a positive number"):
            pool.evaluate(programs.silent, range(3), programs.one, max_tokens=-5)
        assert pool.pids() == []  # no worker was started for it
        assert len(pool.evaluate(programs.priced, range(30), programs.one, max_cost=0.02)) < 30
    dspy = pytest.importorskip("dspy")
    from procval.dspy import Evaluate

    devset = [dspy.Example(question="q").with_inputs("question")]
    with pytest.raises(ValueError, match="max_cost must be a positive number"):
        Evaluate(devset=devset, max_cost=0)


# ---------------------------------------------------------------- the command line


def procval_cli(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "procval", *map(str, args)],
        capture_output=True, text=True, timeout=180, env={**os.environ, **env},
    )  # fmt: skip


def test_the_cli_budget_flags_stop_resume_and_refuse_bad_values(tmp_path):
    store = tmp_path / "runs.db"
    bad = procval_cli("run", TASK, "--store", store, "--max-tokens", "0", env={})
    assert bad.returncode == 2 and "--max-tokens" in bad.stderr
    bad = procval_cli("run", TASK, "--store", store, "--max-cost", "nan", env={})
    assert bad.returncode == 2 and "--max-cost" in bad.stderr
    with LLMServer() as server:
        env = {"BUDGET_BASE": server.api_base, "BUDGET_N": "40"}
        stopped = procval_cli("run", TASK, "--store", store, "--max-tokens", "30", env=env)
        assert stopped.returncode == 4, stopped.stderr
        assert "stopped: max_tokens=30 was reached" in stopped.stdout
        assert "config 'a' stopped at --max-tokens 30; resume with a larger one" in stopped.stderr
        assert "--max-tokens 60" in stopped.stderr
        done = procval_cli("run", TASK, "--store", store, "--max-tokens", "100000", env=env)
    assert done.returncode == 0, done.stderr
    assert "resumed 'a'" in done.stdout
    assert [len(procval.load(store)[name]) for name in "ab"] == [40, 40]


# ---------------------------------------------------------------- limit counts in the store


def test_limit_counts_are_stored_summed_on_resume_and_shown_by_the_report(tmp_path, capsys):
    store = tmp_path / "runs.db"
    limit = procval.RateLimit("k", requests_per_minute=6000)
    with LLMServer() as server:
        config = procval.Config("a", rate_limit=limit, values=at_server(server))
        first = procval.evaluate(
            limit_programs.limited_call, range(12), limit_programs.ok, config=config,
            workers=1, threads=4, store=store,
        )  # fmt: skip
        assert first.limits["k"]["calls"] == 12
        assert procval.load(store)["a"].limits["k"]["calls"] == 12
        more = procval.evaluate(
            limit_programs.limited_call, range(20), limit_programs.ok, config=config,
            workers=1, threads=4, store=store,
        )  # fmt: skip
    assert more.added == 8
    assert more.limits["k"]["calls"] == 20  # every session, as the store keeps them
    loaded = procval.load(store)["a"]
    assert loaded.limits["k"]["calls"] == 20 and loaded.limits["k"]["rate_limited"] == 0
    assert loaded.limits["k"]["tokens"] == 100  # 5 per call, as recorded
    assert cli.main(["report", str(store), "--html", str(tmp_path / "r.html")]) == 0
    out = capsys.readouterr().out
    assert "rate limit 'k': 20 calls, 0 answered 429" in out
    page = (tmp_path / "r.html").read_text()
    assert "<section id='limits'><h2>Rate limits</h2>" in page and "<td>k</td>" in page
    assert "<td class='num'>20</td>" in page


def test_a_store_without_the_limits_table_reads_and_gets_it_from_its_next_writer(tmp_path):
    store = tmp_path / "runs.db"
    procval.evaluate(programs.silent, range(3), programs.one, workers=1, store=store)
    with sqlite3.connect(store) as db:
        db.execute("DROP TABLE limits")  # a format 2 store from before the table
    assert procval.load(store)["default"].limits == {}  # a reader adds nothing
    with sqlite3.connect(store) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    assert "limits" not in tables
    procval.evaluate(programs.silent, range(4), programs.one, workers=1, store=store)
    with sqlite3.connect(store) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    assert "limits" in tables


def test_the_html_report_has_no_limits_section_without_limits():
    result = procval.evaluate(programs.silent, range(3), programs.one, workers=1)
    assert "id='limits'" not in render_html(result)


def test_the_resume_hint_names_where_the_budget_that_stopped_came_from(tmp_path):
    mixed = procval.Config("mixed", max_cost=10.0)  # its own cost budget; the call's tokens
    result = procval.evaluate(
        programs.priced, range(30), programs.one, config=mixed, workers=1, max_tokens=30,
        store=tmp_path / "runs.db",
    )  # fmt: skip
    assert result.stopped is not None and "max_tokens=30 was reached" in result.stopped
    assert "and a larger max_tokens (" in result.stopped and "Config(" not in result.stopped
