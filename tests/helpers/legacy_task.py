"""The task that wrote ``tests/data/store_v1.db`` with procval 0.1.0 (before the package moved).

Kept importable and unchanged: ``tests/test_legacy_store.py`` reruns it against that file to
prove that a store written by an earlier release still loads, reports, exports, compares and
resumes. Do not edit the programs or configs here; the stored identities depend on them.
"""

from __future__ import annotations

import os
from typing import Any

import procval

N = 40
STOP_AT = int(os.environ.get("LEGACY_STOP_AT", str(N)))


def examples() -> list[dict[str, Any]]:
    return [{"id": f"q{i}", "x": i} for i in range(min(N, STOP_AT))]


def program(example: dict[str, Any]) -> dict[str, Any]:
    if example["x"] % 9 == 4:
        raise ValueError(f"nine-four: {example['x']}")
    offset = procval.current_config().values.get("offset", 0)
    return {"double": example["x"] * 2 + offset, "rand": procval.rng().random()}


def metric(example: dict[str, Any], prediction: dict[str, Any]) -> float:
    return float(prediction["double"] == example["x"] * 2)


def setup() -> None:
    os.environ["LEGACY_SETUP_RAN"] = "1"


def configs() -> dict[str, procval.Config]:
    return {
        "exact": procval.Config(setup=setup, env={"LEGACY_TOKEN": "not-a-real-secret"}, seed=7),
        "off": procval.Config(values={"offset": 1}, seed=7),
    }


task = procval.Task(program, examples, metric, configs(), workers=2)
