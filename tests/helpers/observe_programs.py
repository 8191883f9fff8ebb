"""DSPy programs and callbacks for tests/test_dspy_observe.py (importable by worker processes)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any

import dspy
from dspy.utils.callback import ACTIVE_CALL_ID, BaseCallback, with_callbacks

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
# DSPy 3.4.1's code interpreter hooks, and an optimizer's (an older DSPy may lack them)
INTERPRETER_HOOKS = tuple(
    f"on_interpreter_{operation}_{end}"
    for operation in ("startup", "execute", "tool_call", "shutdown")
    for end in ("start", "end")
    if hasattr(BaseCallback, f"on_interpreter_{operation}_{end}")
)
COMPILE_HOOKS = tuple(h for h in ("on_compile_start", "on_compile_end") if hasattr(BaseCallback, h))
HOOKS += INTERPRETER_HOOKS + COMPILE_HOOKS


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


def echo(text: str) -> str:
    """The interpreter's one tool."""
    return text


class Calculator:
    """A code interpreter (``dspy.CodeInterpreter``'s protocol) that evaluates one expression.

    Its ``start``, ``execute``, ``invoke_tool`` and ``shutdown`` go through DSPy's callbacks as
    ``dspy.PythonInterpreter``'s do (no lazy start: its copies in the workers would start once
    each, where DSPy's one process starts it once); code calls a tool by name
    (``echo(text=draft)``), through ``invoke_tool``. Code starting with ``fail`` raises
    ``CodeExecutionError``. Only for a DSPy with code interpreters (3.4.1 and later).
    """

    def __init__(self) -> None:
        self._tools: dict[str, Any] = {"echo": echo}
        self.started = False

    @property
    def tools(self) -> dict[str, Any]:
        return self._tools

    @with_callbacks
    def start(self) -> None:
        self.started = True

    @with_callbacks
    def execute(self, code: str, variables: dict[str, Any] | None = None) -> Any:
        from dspy.primitives.code_interpreter import CodeExecutionError, FinalOutput

        if code.startswith("fail"):
            raise CodeExecutionError(f"cannot run {code!r}")
        names = {name: _calling(self, name) for name in self._tools}
        return FinalOutput({"answer": eval(code, names, dict(variables or {}))})

    @with_callbacks
    def invoke_tool(self, tool_name: str, kwargs: dict[str, Any]) -> Any:
        return self._tools[tool_name](**kwargs)

    @with_callbacks
    def shutdown(self) -> None:
        self.started = False


def _calling(interpreter: Calculator, name: str) -> Any:
    return lambda **kwargs: interpreter.invoke_tool(name, kwargs)


class Interpreting(dspy.Module):
    """A Predict, then code run in an interpreter it holds and in one made for the call.

    Per example: 1 LM call; the held interpreter runs ``echo(text=draft)`` (a tool call) and a
    failing code (caught); a fresh interpreter starts, runs, and shuts down; an optimizer
    (``LabeledFewShot``) compiles the Predict.
    """

    def __init__(self) -> None:
        super().__init__()
        self.draft = dspy.Predict("question -> answer")
        self.interpreter = Calculator()

    def forward(self, question: str) -> dspy.Prediction:
        from dspy.primitives.code_interpreter import CodeExecutionError

        draft = self.draft(question=question).answer
        final = self.interpreter.execute("echo(text=draft)", {"draft": draft})
        with contextlib.suppress(CodeExecutionError):
            self.interpreter.execute("fail here")
        fresh = Calculator()
        fresh.start()
        fresh.execute("draft", {"draft": draft})
        fresh.shutdown()
        trainset = [dspy.Example(question="q", answer="a").with_inputs("question")]
        dspy.LabeledFewShot(k=1).compile(self.draft.deepcopy(), trainset=trainset)
        return dspy.Prediction(answer=final.output["answer"])


class Evaluating(dspy.Module):
    """Runs a ``dspy.Evaluate`` of its Predict on the example, then the Predict: 2 LM calls.

    The inner Evaluate runs in the calling thread (``num_threads=1``); :class:`Fanning` has a
    program whose modules run in DSPy's pool threads.
    """

    def __init__(self) -> None:
        super().__init__()
        self.draft = dspy.Predict("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        example = dspy.Example(question=question, answer=f"answer-of:{question}")
        inner = dspy.Evaluate(devset=[example.with_inputs("question")], metric=exact, num_threads=1)
        inner(self.draft)
        return self.draft(question=question)


class Fanning(dspy.Module):
    """Asks its Predict two questions at once through ``dspy.Parallel``: 2 LM calls, each made
    in one of DSPy's own pool threads, then answers with the first."""

    def __init__(self) -> None:
        super().__init__()
        self.draft = dspy.Predict("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        parallel = dspy.Parallel(num_threads=2, disable_progress_bar=True)
        first, _ = parallel(
            [(self.draft, {"question": question}), (self.draft, {"question": question})]
        )
        return dspy.Prediction(answer=first.answer)


def histories_after(calls: int) -> Any:
    """A program: ``calls`` LM calls, then the lengths of this process's DSPy histories."""
    from dspy.clients import base_lm

    def program(example: Any) -> dict[str, int]:
        lm = dspy.settings.lm
        for i in range(calls):
            lm(f"call {i}")
        return {"lm": len(lm.history), "global": len(base_lm.GLOBAL_HISTORY)}

    return program


class TraceLength(Pipeline):
    """The pipeline, answering with the length of DSPy's trace as its example ends."""

    def forward(self, question: str) -> dspy.Prediction:
        prediction = super().forward(question)
        return dspy.Prediction(answer=prediction.answer, trace=len(dspy.settings.trace))
