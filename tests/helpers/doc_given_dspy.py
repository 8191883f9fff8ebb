"""What the README's DSPy side-by-side block takes as given, offline.

`gpt4o` and `gpt4o_mini` are DummyLMs (tests/helpers/dspy_toys.py): the first always answers
right, the second never, so the block's two configs must score 1.0 and 0.0.
"""

from __future__ import annotations

from typing import Any

import dspy

import procval
from helpers.dspy_toys import clueless_lm, knowing_lm
from helpers.dspy_toys import devset as make_devset

__all__ = ["check", "devset", "dspy", "gpt4o", "gpt4o_mini", "metric", "procval", "program"]

gpt4o, gpt4o_mini = knowing_lm(), clueless_lm()
program = dspy.Predict("question -> answer")
devset = make_devset()


def metric(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> bool:
    return example.answer == prediction.answer


def check(namespace: dict[str, Any]) -> None:
    """Each config scored its own model: the right one everything, the clueless one nothing."""
    results = namespace["results"]
    scores = {name: result.score for name, result in results.items()}
    errors = {name: result.error_types for name, result in results.items()}
    assert scores == {"gpt-4o": 1.0, "gpt-4o-mini": 0.0}, (scores, errors)
