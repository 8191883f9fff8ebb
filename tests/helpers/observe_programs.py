"""DSPy programs and callbacks for tests/test_dspy_observe.py (importable by worker processes)."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import dspy
from dspy.utils.callback import ACTIVE_CALL_ID, BaseCallback

HOOKS = (
    "on_module_start",
    "on_module_end",
    "on_lm_start",
    "on_lm_end",
    "on_adapter_format_start",
    "on_adapter_format_end",
    "on_adapter_parse_start",
    "on_adapter_parse_end",
    "on_evaluate_start",
    "on_evaluate_end",
)


class Counting(BaseCallback):
    """Records (hook, call_id, parent call id, instance) for every event; holds a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # cannot be pickled: it must stay in the caller
        self.events: list[tuple[str, str, str | None, Any]] = []

    def add(self, hook: str, call_id: str, instance: Any = None) -> None:
        with self.lock:
            self.events.append((hook, call_id, ACTIVE_CALL_ID.get(), instance))


def _handler(hook: str) -> Any:
    def handle(self: Any, call_id: str, instance: Any = None, **kwargs: Any) -> None:
        self.add(hook, call_id, instance)

    return handle


for _hook in HOOKS:
    setattr(Counting, _hook, _handler(_hook))


class Capturing(BaseCallback):
    """Keeps what every handler received: (hook, call_id, instance, inputs | outputs, exception)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str, Any, Any, Any]] = []


def _capturing(hook: str) -> Any:
    if hook.endswith("_start"):

        def start(self: Any, call_id: str, instance: Any, inputs: Any) -> None:
            with self.lock:
                self.calls.append((hook, call_id, instance, inputs, None))

        return start

    def end(self: Any, call_id: str, outputs: Any, exception: Any = None) -> None:
        with self.lock:
            self.calls.append((hook, call_id, None, outputs, exception))

    return end


for _hook in HOOKS:
    setattr(Capturing, _hook, _capturing(_hook))


class ModulesAndLMs(Counting):
    """Counts module and LM events only: it leaves the adapter handlers as BaseCallback's."""


for _hook in HOOKS:
    if _hook.startswith("on_adapter"):
        setattr(ModulesAndLMs, _hook, getattr(BaseCallback, _hook))


class ToFile(BaseCallback):
    """Appends ``pid hook`` lines to a file: a callback meant to run where the program runs."""

    procval_in_worker = True

    def __init__(self, path: str) -> None:
        self.path = path

    def add(self, hook: str, call_id: str, instance: Any = None) -> None:
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()} {hook}\n")


for _hook in HOOKS:
    setattr(ToFile, _hook, _handler(_hook))


class Pipeline(dspy.Module):
    """A Predict feeding a ChainOfThought: 2 LM calls per example."""

    def __init__(self) -> None:
        super().__init__()
        self.draft = dspy.Predict("question -> answer")
        self.refine = dspy.ChainOfThought("question, draft -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        draft = self.draft(question=question).answer
        return self.refine(question=question, draft=draft)


def devset(n: int) -> list[dspy.Example]:
    return [
        dspy.Example(question=f"q{i}", answer=f"answer-of:q{i}").with_inputs("question")
        for i in range(n)
    ]


def exact(example: Any, prediction: Any, trace: Any = None) -> bool:
    return bool(prediction.answer == example.answer)


class LogsThenWaits:
    """Example 0 logs and returns; example 1 waits (bounded) for the file the parent writes."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def __call__(self, example: int) -> str:
        if example == 0:
            logging.getLogger("observe.test").warning("example zero is done")
            return "logged"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if os.path.exists(self.flag):
                return "released"
            time.sleep(0.02)
        return "not released"


class Extra(dspy.Module):
    """Returns a Prediction with fields besides the answer."""

    def forward(self, question: str) -> dspy.Prediction:
        return dspy.Prediction(answer=question.upper(), confidence=0.5, notes=["a", "b"])
