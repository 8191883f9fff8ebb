"""The threads a program starts record into its example (``procval.worker.threads``)."""

from __future__ import annotations

import os

import procval
from helpers import thread_programs as programs
from helpers.log_capture import captured_logs


def one(example, prediction):
    return 1.0


def test_usage_and_logs_from_a_programs_threads_and_pool_are_its_examples(no_leaked_workers):
    # 4 examples at once in one process, sharing the program's own pool of 4 threads
    with captured_logs("threads.test") as handler:
        result = procval.evaluate(programs.pooled, range(1, 41), one, workers=1, threads=4)
    assert result.errors == []
    for row in result.rows:
        n = row.prediction
        assert row.usage is not None, f"example {n} recorded nothing"
        usage = row.usage["m"]
        assert (usage.calls, usage.prompt_tokens, usage.completion_tokens) == (4, 3 * n, n)
    assert result.usage["m"].prompt_tokens == 3 * sum(range(1, 41))
    by_example = {r.procval_example_id: r.getMessage() for r in handler.records}
    assert by_example == {
        r.example_id: f"from a thread of example {r.prediction}" for r in result.rows
    }
    assert {r.procval_pid for r in handler.records} == {result.rows[0].worker_pid} != {os.getpid()}


def test_a_thread_that_outlives_its_example_records_into_no_example(no_leaked_workers):
    with captured_logs("threads.test") as handler:
        result = procval.evaluate(programs.outliving, [0, 1], one, workers=1, threads=1)
    (late,) = handler.records
    assert late.getMessage() == "after example 0 ended"
    assert late.procval_example_id is None  # not example 0's, which had ended
    first, second = result.rows
    assert second.prediction is True  # the thread did spend, once example 0 had ended
    assert set(first.usage) == {"early"}  # not what its thread spent after it ended
    assert second.usage is None  # nor is that example 1's, which did not start the thread
    assert "late" not in result.usage
