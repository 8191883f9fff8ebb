"""Programs and a task for the budget tests: calls to the stand-in server whose usage is recorded.

``asked`` posts one chat completion to the server named by ``Config.values["base"]`` and records
the usage its reply carries with :func:`procval.record_usage` (no cost: the stand-in's model is
in no price table); ``priced`` spends nothing but records a call costing 0.01. ``task`` is the
CLI's: ``procval run tests/helpers/budget_programs.py:task`` against the server whose base URL
is in ``BUDGET_BASE``.
"""

from __future__ import annotations

import json
import os
import urllib.request
from typing import Any

import procval


def asked(example: Any) -> str:
    """One request to the server; its usage is recorded as the example's."""
    base = procval.current_config().values.get("base") or os.environ["BUDGET_BASE"]
    body = {"model": "stand-in", "messages": [{"role": "user", "content": f"question {example}"}]}
    request = urllib.request.Request(
        f"{base}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        answer = json.loads(reply.read())
    usage = answer["usage"]
    procval.record_usage(
        "stand-in",
        prompt_tokens=usage["prompt_tokens"],
        completion_tokens=usage["completion_tokens"],
    )
    return str(answer["choices"][0]["message"]["content"])


def priced(example: Any) -> int:
    """No request: one call of 10 tokens costing 0.01 is recorded."""
    procval.record_usage("priced-model", prompt_tokens=10, cost=0.01)
    return int(example)


def unpriced(example: Any) -> int:
    """One call of 10 tokens whose cost is not known."""
    procval.record_usage("unknown-model", prompt_tokens=10)
    return int(example)


def silent(example: Any) -> int:
    """Records no usage at all."""
    return int(example)


def one(example: Any, prediction: Any) -> float:
    """Every prediction scores 1."""
    return 1.0


task = procval.Task(
    asked,
    [f"q{i}" for i in range(int(os.environ.get("BUDGET_N", "40")))],
    one,
    configs=[procval.Config("a"), procval.Config("b")],
    workers=2,
)
