"""What the README's run-store block takes as given: procval, a program, a metric, configs, data.

The program, metric and configs are the quickstart's (examples/quickstart.py); big.jsonl, the
quickstart's 200 examples, is written to the working directory (a fresh one for each run).
"""

from __future__ import annotations

import json
from typing import Any

import procval
from examples.quickstart import configs, make_dataset, metric, program

__all__ = ["check", "configs", "metric", "procval", "program"]

with open("big.jsonl", "w", encoding="utf-8") as file:
    for example in make_dataset():
        file.write(json.dumps(example) + "\n")


def check(namespace: dict[str, Any]) -> None:
    """The store holds what the call returned: every example of both configs."""
    runs, results = namespace["runs"], namespace["results"]
    assert set(runs) == set(results) == {"careful", "sloppy"}
    for name in runs:
        assert len(runs[name].rows) == 200, name
        assert runs[name].score == results[name].score, name
