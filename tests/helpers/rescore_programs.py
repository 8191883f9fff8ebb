"""Programs and metrics for tests/test_rescore.py (importable, so workers can unpickle them)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import procval

WHO = "RESCORE_TEST_WHO"  # a config's env variable, read by the metric in its worker


def data(n: int = 8) -> list[dict[str, Any]]:
    return [{"id": f"q{i}", "x": i} for i in range(n)]


def counted(example: dict[str, Any]) -> dict[str, Any]:
    """Doubles ``x``, wrongly for every third example; counts its calls in a file.

    The file is the config's ``values["calls"]``.
    """
    with open(procval.current_config().values["calls"], "a") as log:
        log.write(f"{example['id']}\n")
    if example["x"] == 5:
        raise ValueError("five is not allowed")
    return {"double": example["x"] * 2 + (example["x"] % 3 == 0)}


def exact(example: dict[str, Any], prediction: dict[str, Any]) -> bool:
    return prediction["double"] == example["x"] * 2


def near(example: Any, prediction: Any) -> bool:
    """Within one: a looser metric than ``exact`` (attribute access on the example works)."""
    return abs(prediction["double"] - example.x * 2) <= 1


def where(example: Any, prediction: Any) -> dict[str, float]:
    """Which config's worker scores it: its env variable, and that it is not the parent."""
    return {
        "near": float(abs(prediction["double"] - example["x"] * 2) <= 1),
        "alpha": float(os.environ.get(WHO) == "alpha"),
        "in_worker": float(os.getpid() != procval.current_config().values["parent"]),
    }


def changing(example: Any, prediction: Any) -> dict[str, float]:
    """Score names that change between examples."""
    return {"a": 1.0} if example["x"] % 2 == 0 else {"b": 1.0}


def fraction(example: Any, prediction: Any) -> float:
    return 0.5


def coin(example: dict[str, Any]) -> bool:
    return procval.rng().random() < 0.5


def heads(example: Any, prediction: Any) -> bool:
    return bool(prediction)


def tails(example: Any, prediction: Any) -> bool:
    return not prediction


def failing(example: Any) -> Any:
    raise RuntimeError("no prediction today")


@dataclasses.dataclass
class Answer:
    text: str
    confidence: float


class Pair(NamedTuple):
    left: int
    right: int


def typed(example: dict[str, Any]) -> Any:
    """A prediction of another type for each example: dataclass, NamedTuple, tuple, str, int."""
    x = example["x"]
    return [Answer(str(x), 0.5), Pair(x, -x), (x, "t"), str(x), x, [x], {"x": x}, None][x % 8]


def same_type(example: dict[str, Any], prediction: Any) -> bool:
    """Whether the rescored prediction equals ``typed``'s, type included."""
    expected = typed(example)
    return type(prediction) is type(expected) and prediction == expected


def dspy_program(example: Any) -> Any:
    import dspy

    return dspy.Prediction(answer=str(example["x"] * 2), reasoning="doubling")


def dspy_metric(example: Any, prediction: Any, trace: Any = None) -> bool:
    """Uses a prediction as DSPy metrics do: attribute access and ``.get``; its type too."""
    import dspy

    if not isinstance(prediction, dspy.Prediction):
        raise TypeError(f"got a {type(prediction).__name__}, not a dspy.Prediction")
    return prediction.answer == str(example.x * 2) and prediction.get("reasoning") == "doubling"


def near_double(example: Any, prediction: Any) -> bool:
    """For tests/data/store_v1.db's predictions: ``double`` within one of ``2 x``."""
    return abs(prediction["double"] - example["x"] * 2) <= 1


def configs(calls: str, parent: int) -> dict[str, procval.Config]:
    """Two configs, told apart in their workers by the env variable ``WHO``."""
    values = {"calls": calls, "parent": parent}
    return {
        "a": procval.Config(name="a", env={WHO: "alpha"}, values=values, seed=1),
        "b": procval.Config(name="b", env={WHO: "beta"}, values=values, seed=2),
    }


# for procval rescore --task: the configs of the test's run (its calls file and pid, by env)
task = procval.Task(
    counted,
    data,
    exact,
    configs(
        os.environ.get("RESCORE_TEST_CALLS", "-"), int(os.environ.get("RESCORE_TEST_PARENT", "0"))
    ),
)


def judge(example: Any, prediction: Any) -> float:
    """A stand-in LLM judge: it spends tokens, recorded as a judge's are."""
    procval.record_usage("judge-model", prompt_tokens=10, completion_tokens=2, cost=0.001)
    return 1.0
