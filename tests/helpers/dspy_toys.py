"""Offline DSPy pieces for the tests: DummyLMs in dict mode, a devset, a metric, programs.

A dict-mode DummyLM answers with the first entry whose key is contained in the prompt's last
message (the one holding the inputs); a prompt matching no key gets "No more responses", which
the adapter fails to parse (an AdapterParseError: a failing example). Keys here are whole
questions, none contained in another. Importable, so worker processes can load what they need.
"""

from __future__ import annotations

from typing import Any

import dspy
from dspy.utils import DummyLM

QUESTIONS = {
    "What is the capital of France?": "Paris",
    "Which planet is the largest in the solar system?": "Jupiter",
    "What color is a clear daytime sky?": "blue",
    "How many legs does a spider have?": "eight",
}
UNKNOWN = "What did the fox say?"  # no DummyLM here knows it: the program raises


def devset(questions: dict[str, str] | None = None) -> list[dspy.Example]:
    return [
        dspy.Example(question=q, answer=a).with_inputs("question")
        for q, a in (questions or QUESTIONS).items()
    ]


def knowing_lm() -> DummyLM:
    """Always right; answers with reasoning too, so it serves Predict and ChainOfThought."""
    return DummyLM({q: {"reasoning": "I know this.", "answer": a} for q, a in QUESTIONS.items()})


def clueless_lm() -> DummyLM:
    """Always wrong."""
    return DummyLM({q: {"reasoning": "No idea.", "answer": "I am not sure"} for q in QUESTIONS})


def half_lm() -> DummyLM:
    """Right on every other question."""
    return DummyLM(
        {
            q: {"answer": a if i % 2 == 0 else "I am not sure"}
            for i, (q, a) in enumerate(QUESTIONS.items())
        }
    )


def exact_match(example: dspy.Example, prediction: Any, trace: Any = None) -> bool:
    return bool(example.answer.lower() == prediction.answer.strip().lower())


class Answer:
    """A program for ``procval.evaluate``: ``program(example)`` runs a Predict on its inputs."""

    def __init__(self) -> None:
        self.predict = dspy.Predict("question -> answer")

    def __call__(self, example: dspy.Example) -> dspy.Prediction:
        return self.predict(**example.inputs())


def feedback_metric(example: dspy.Example, prediction: Any, trace: Any = None) -> dspy.Prediction:
    """A GEPA-style metric: a Prediction with a score and feedback."""
    right = exact_match(example, prediction)
    return dspy.Prediction(score=1.0 if right else 0.0, feedback="ok" if right else "wrong")
