"""Tokens and cost per example and per config: record_usage, DSPy LMs, the store, a resume."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap

import psutil
import pytest

import procval
from procval.results import Usage

dspy = pytest.importorskip("dspy")

from helpers.llm_server import LLMServer, question  # noqa: E402
from helpers.processes import assert_gone, start_cli, stop, stored, wait_for_rows  # noqa: E402


def spending(example):
    procval.record_usage("m", prompt_tokens=example, completion_tokens=2, cost=0.25)
    procval.record_usage("m", cached=True)
    procval.record_usage("other", prompt_tokens=1)
    return example


def test_record_usage_outside_a_worker_does_nothing():
    assert spending(3) == 3  # the program runs unchanged in the calling process


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((3,), {}, TypeError),
        (("",), {}, TypeError),
        (("m",), {"prompt_tokens": 1.5}, TypeError),
        (("m",), {"completion_tokens": -1}, ValueError),
        (("m",), {"cost": float("nan")}, ValueError),
        (("m",), {"cost": "1"}, TypeError),
    ],
)
def test_record_usage_refuses_bad_counts(args, kwargs, error):
    with pytest.raises(error, match="record_usage"):
        procval.record_usage(*args, **kwargs)


def test_an_unpriced_call_is_priced_from_litellms_bundled_table(monkeypatch):
    """A DSPy call that came without a cost gets LiteLLM's price, read from its bundled JSON."""
    import importlib.util
    import json
    import os

    from procval.worker import usage

    spec = importlib.util.find_spec("litellm")
    if spec is None or spec.origin is None:
        pytest.skip("LiteLLM is not installed")
    monkeypatch.delitem(sys.modules, "litellm", raising=False)  # its file, not its module
    monkeypatch.setattr(usage, "_table", None)
    path = os.path.join(os.path.dirname(spec.origin), "model_prices_and_context_window_backup.json")
    with open(path, encoding="utf-8") as f:
        entry = json.load(f)["gpt-4o-mini"]
    expected = 1000 * entry["input_cost_per_token"] + 10 * entry["output_cost_per_token"]
    assert usage.price("gpt-4o-mini", 1000, 10) == pytest.approx(expected)
    assert usage.price("openai/gpt-4o-mini", 1000, 10) == pytest.approx(expected)  # provider/
    assert usage.price("openai/no-such-model", 1000, 10) is None
    assert all(isinstance(rates, tuple) for rates in usage._table.values())  # two rates each


@pytest.mark.parametrize("store", [False, True])
def test_record_usage_from_a_plain_program(tmp_path, store):
    where = str(tmp_path / "run.db") if store else None
    result = procval.evaluate(
        spending, [1, 2, 3], lambda e, p: float(p > 1), workers=1, progress=False, store=where
    )
    assert result.rows[0].usage == {
        "m": Usage(2, 1, 1, 2, 3, 0.25),
        "other": Usage(1, 0, 1, 0, 1, None),
    }
    expected = {"m": Usage(6, 3, 6, 6, 12, 0.75), "other": Usage(3, 0, 3, 0, 3, None)}
    assert result.usage == expected
    summary = result.summary()
    assert "m: 6 calls (3 cached), 12 tokens (6 prompt, 6 completion), cost 0.75" in summary
    assert "per correct answer: 7.5 tokens, cost 0.375" in summary  # 15 tokens, 2 correct
    if store:
        loaded = procval.load(where)["default"]
        assert loaded.usage == expected
        assert loaded._rows is None  # read from the usage table, not from the rows
        assert loaded.rows[2].usage == result.rows[2].usage


def _examples(n, same=False):
    return [
        dspy.Example(question="what is it" if same else f"what is {i}", answer="a").with_inputs(
            "question"
        )
        for i in range(n)
    ]


def _server_usage(server):
    counts = server.counts()
    return Usage(
        counts["requests"],
        0,
        counts["prompt_tokens"],
        counts["completion_tokens"],
        counts["total_tokens"],
        None,
    )


@pytest.mark.parametrize("store", [False, True])
def test_dspy_lm_usage_equals_the_servers_counts(tmp_path, store):
    where = str(tmp_path / "run.db") if store else None
    with LLMServer() as server:
        lm = dspy.LM(server.model, api_base=server.api_base, api_key="sk-test", cache=False)
        program = dspy.ChainOfThought("question -> answer")
        with dspy.context(lm=lm, track_usage=False):
            result = procval.evaluate(
                program,
                _examples(12),
                lambda e, p: 1.0,
                config=procval.dspy.snapshot(),
                workers=2,
                progress=False,
                store=where,
            )
        assert not result.errors
        assert result.usage == {server.model: _server_usage(server)}
        assert all(row.usage[server.model].calls == 1 for row in result.rows)
        if store:
            assert procval.load(where)[result.config].usage == result.usage


def test_lm_calls_in_dspy_parallel_threads_count_in_their_examples_usage():
    """DSPy's own pool threads (dspy.Parallel) do not inherit the example's context; their calls
    must count all the same, or a budget would never see them."""
    from helpers import observe_programs

    with LLMServer() as server:
        lm = dspy.LM(server.model, api_base=server.api_base, api_key="sk-test", cache=False)
        with dspy.context(lm=lm, callbacks=[]):
            result = procval.evaluate(
                observe_programs.Fanning(),
                _examples(6),
                lambda e, p: 1.0,
                config=procval.dspy.snapshot(),
                workers=2,  # one example at a time per worker: two dspy.Parallel at once in one
                progress=False,  # process race in DSPy's own progress bars (tqdm._instances)
                timeout=60,  # a hung call fails the test in a minute
            )
        assert not result.errors, [row.error for row in result.errors]
        assert server.counts()["requests"] == 12
        assert result.usage == {server.model: _server_usage(server)}
        assert all(row.usage[server.model].calls == 2 for row in result.rows)


def test_dspy_evaluate_counts_usage_without_callbacks():
    with LLMServer() as server:
        lm = dspy.LM(server.model, api_base=server.api_base, api_key="sk-test", cache=False)
        with dspy.context(lm=lm, callbacks=[]):
            evaluate = procval.dspy.Evaluate(
                devset=_examples(6), metric=lambda e, p, trace=None: 1.0, num_threads=2
            )
            outcome = evaluate(dspy.Predict("question -> answer"))
        assert outcome.usage == outcome.procval.usage == {server.model: _server_usage(server)}


@pytest.fixture
def memory_cache():
    saved = vars(dspy).get("cache")
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
    yield
    if saved is None:
        vars(dspy).pop("cache", None)
    else:
        dspy.cache = saved


def test_cached_calls_are_counted_apart(memory_cache):
    with LLMServer() as server:
        lm = dspy.LM(server.model, api_base=server.api_base, api_key="sk-test", cache=True)
        with dspy.context(lm=lm):
            result = procval.evaluate(
                dspy.Predict("question -> answer"),
                _examples(2, same=True),
                lambda e, p: 1.0,
                config=procval.dspy.snapshot(),
                workers=1,
                threads=1,
                progress=False,
            )
        counts = server.counts()
        assert counts["requests"] == 1  # the second example was answered from the cache
        spent = result.usage[server.model]
        assert (spent.calls, spent.cached_calls) == (2, 1)
        assert spent.total_tokens == counts["total_tokens"]
        assert [row.usage[server.model].cached_calls for row in result.rows] == [0, 1]


TASK = """
import os
import dspy
import procval

lm = dspy.LM(os.environ["USAGE_MODEL"], api_base=os.environ["USAGE_API_BASE"],
             api_key="sk-test", cache=False)
examples = [dspy.Example(question=f"question number {i:04d}", answer="a").with_inputs("question")
            for i in range(int(os.environ["USAGE_N"]))]
with dspy.context(lm=lm):
    config = procval.dspy.snapshot(name="dspy")
task = procval.Task(dspy.Predict("question -> answer"), examples, lambda e, p: 1.0, [config],
                    workers=2)
"""


def _table(path):
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
        table = db.execute("SELECT calls, prompt_tokens, total_tokens FROM usage").fetchall()
        rows = db.execute(
            "SELECT COUNT(*), SUM(json_extract(usage, '$.\"' || ? || '\".total_tokens')) FROM rows",
            (MODEL,),
        ).fetchone()
    return table, rows


MODEL = "openai/stand-in"


@pytest.mark.slow
def test_usage_survives_a_kill_and_a_resume(tmp_path):
    n = 120
    task, store = tmp_path / "usage_task.py", tmp_path / "run.db"
    task.write_text(textwrap.dedent(TASK))
    with LLMServer(latency=0.02) as server:
        assert server.model == MODEL
        env = {"USAGE_MODEL": MODEL, "USAGE_API_BASE": server.api_base, "USAGE_N": str(n)}
        args = ("run", f"{task}:task", "--store", store)
        proc = start_cli(*args, env=env)
        try:
            wait_for_rows(store, 20, proc)
            children = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            stop(proc)
        assert_gone(children)
        rows_at_kill = stored(store)[0]
        assert rows_at_kill < n
        [(calls, _, total)], (count, row_tokens) = _table(store)
        assert calls == count == rows_at_kill and total == row_tokens  # one transaction
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5) as db:
            kept = {int(i) for (i,) in db.execute("SELECT example_id FROM rows")}
        before = len(server.requests)  # the killed session's workers are gone: no more

        resumed = subprocess.run(
            [sys.executable, "-m", "procval", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=180,
            env={**__import__("os").environ, **env},
        )
        assert resumed.returncode == 0, resumed.stderr
        assert f"dspy: {MODEL}: {n} calls" in resumed.stdout
        spent = procval.load(store)["dspy"].usage[MODEL]
        counts = server.counts()
        asked = [int(question(r).rsplit(" ", 1)[-1]) for r in server.requests]
    # every stored example's call is counted once, the first session's too. The resumed session
    # asks for exactly the examples without a row, once each: those of the first session's
    # calls that reached the server but no row (in flight at the kill, or finished in a shard
    # whose results had not come back yet) are asked again, the stored ones never
    assert spent.calls == n
    assert sorted(asked[before:]) == sorted(set(range(n)) - kept)
    assert counts["requests"] - n == len(set(asked[:before]) - kept)
    per_call = counts["prompt_tokens"] / counts["requests"]  # the questions have equal lengths
    assert spent.prompt_tokens == per_call * n
    assert spent.total_tokens * counts["requests"] == counts["total_tokens"] * n


def test_report_html_and_compare_show_the_spend(tmp_path):
    where = str(tmp_path / "run.db")
    configs = [procval.Config(name="a"), procval.Config(name="b")]
    procval.evaluate(
        spending, [1, 2, 3], lambda e, p: float(p > 1), configs=configs, workers=1,
        progress=False, store=where,
    )  # fmt: skip
    page = tmp_path / "report.html"
    run = [sys.executable, "-m", "procval"]
    report = subprocess.run([*run, "report", where, "--html", str(page)], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert "m: 6 calls (3 cached), 12 tokens" in report.stdout
    html = page.read_text()
    assert "<section id='usage'>" in html and "<td>other</td>" in html
    compared = subprocess.run([*run, "compare", where, "a", "b"], capture_output=True,
                              text=True, timeout=120)  # fmt: skip
    assert compared.returncode == 0, compared.stderr
    assert "a (a): per correct answer: 7.5 tokens, cost 0.375" in compared.stdout
    assert "b (b): per correct answer: 7.5 tokens, cost 0.375" in compared.stdout
