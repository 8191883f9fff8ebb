"""Programs, metrics and setups for tests/test_scores_secrets.py: importable by the workers."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy

SECRET_NAME = "PROCVAL_TEST_API_KEY"

# what each kind of example makes the metric return
ODD_SCORES: dict[str, Callable[[], Any]] = {
    "nan": lambda: float("nan"),
    "inf": lambda: math.inf,
    "numpy_nan": lambda: numpy.float64("nan"),
    "numpy_true": lambda: numpy.bool_(True),
    "numpy_false": lambda: numpy.bool_(False),
    "one": lambda: 1,
}


def echo(example: dict[str, Any]) -> str:
    return f"answer {example['id']}"


def odd_metric(example: dict[str, Any], prediction: Any) -> Any:
    return ODD_SCORES[example["kind"]]()


def leaky(example: int) -> dict[str, Any]:
    """Put the config's API key into an error message (odd examples) or the prediction."""
    key = os.environ[SECRET_NAME]
    if example % 2:
        raise ValueError(f"the API refused the key {key}")
    return {"echo": f"called with {key}", "n": example}


def any_score(example: Any, prediction: Any) -> float:
    return 1.0


def make_setup(key: str) -> Callable[[], None]:
    """A ``Config.setup`` closure that captured an API key, as users write them."""

    def setup() -> None:
        os.environ["PROCVAL_TEST_CAPTURED"] = str(len(key))

    return setup


class KeyedSetup:
    """A callable ``Config.setup`` object holding an API key as an attribute."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self) -> None:
        os.environ["PROCVAL_TEST_CAPTURED"] = str(len(self.key))
