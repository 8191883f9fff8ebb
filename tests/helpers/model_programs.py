"""Programs and metrics of tests/test_named_scores.py and tests/test_epochs.py (for workers)."""

from __future__ import annotations

import random
from typing import Any

import procval


def identity(example: dict[str, Any]) -> int:
    return int(example["x"])


def em(example: dict[str, Any], prediction: int) -> bool:
    return prediction % 2 == 0


def f1(example: dict[str, Any], prediction: int) -> float:
    return 0.25


def both(example: dict[str, Any], prediction: int) -> dict[str, float]:
    return {"em": float(prediction % 2 == 0), "f1": 0.25}


def shifting(example: dict[str, Any], prediction: int) -> dict[str, float]:
    """Named scores whose names change from example 5 on."""
    return {"em": 1.0, "f1": 0.5} if prediction < 5 else {"em": 1.0, "recall": 0.5}


class Feedback:
    """A ``dspy.Prediction(score=..., feedback=...)`` look-alike."""

    def __init__(self, score: float, feedback: str) -> None:
        self.score = score
        self.feedback = feedback


def judged(example: dict[str, Any], prediction: int) -> Feedback:
    return Feedback(float(prediction % 2 == 0), f"x was {prediction}")


def coin(example: dict[str, Any]) -> float:
    """A draw from the example's rng: what the epoch's seed gives."""
    return procval.rng().random()


def heads(example: dict[str, Any], prediction: float) -> bool:
    return prediction < 0.5


def global_draw(example: dict[str, Any]) -> float:
    return random.random()


def drawn(example: dict[str, Any], prediction: float) -> float:
    return prediction


def slow_coin(example: dict[str, Any]) -> float:
    """``coin`` after a pause, so that a run can be killed halfway."""
    import time

    time.sleep(0.02)
    return procval.rng().random()


def epoch_task() -> procval.Task:
    """A task of 30 examples x 3 epochs, for the kill -9 test (``--epochs`` may change it)."""
    return procval.Task(
        slow_coin,
        [{"id": f"q{i}", "x": i} for i in range(30)],
        heads,
        [procval.Config(seed=3)],
        epochs=3,
        workers=1,
    )


task = epoch_task()
