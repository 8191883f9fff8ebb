"""The first results of a threaded worker reach the caller as soon as its first examples finish.

A shard's call returns once its last example has started, so a first shard larger than the
worker's threads would hold every result back until a thread had finished a whole round.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import procval
from procval.run.observe import on_rows

WAIT = 30.0  # bound on the slow examples' wait: a regression fails, it does not hang


def _held_until_released(example: dict) -> str:
    """Example 0 answers at once; the others wait until the caller saw a row (or WAIT)."""
    if example["id"] == 0:
        return "fast"
    flag = Path(example["flag"])
    deadline = time.monotonic() + WAIT
    while not flag.exists():
        if time.monotonic() > deadline:
            return "held back"
        time.sleep(0.01)
    return "released"


def _ok(example: dict, prediction: str) -> bool:
    return prediction != "held back"


def test_a_first_result_arrives_while_the_other_threads_are_still_busy(tmp_path: Path) -> None:
    flag = tmp_path / "release"
    seen: list[int | str] = []

    def release(config: str, rows: list[procval.Row]) -> None:
        seen.extend(row.example_id for row in rows)
        flag.touch()  # the caller has a row: the held examples may finish

    dataset = [{"id": i, "flag": os.fspath(flag)} for i in range(200)]  # shards of 2+ rounds
    with on_rows(release):
        result = procval.evaluate(
            _held_until_released, dataset, _ok, workers=1, threads=8, progress=False
        )
    assert seen[0] == 0  # the fast example's row came first, while 7 threads were held
    assert [row.prediction for row in result.rows if row.prediction == "held back"] == []
    assert result.score == 1.0
