"""Programs for the rate-limit tests: plain HTTP calls to the stand-in server under a key."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from typing import Any

import procval


def post(base: str, text: str, timeout: float = 30) -> int:
    """One chat completion request; its HTTP status (a 429 raises, as a client library does)."""
    body = {"model": "stand-in", "messages": [{"role": "user", "content": text}]}
    request = urllib.request.Request(
        f"{base}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return int(reply.status)


def limited_call(example: Any) -> int:
    """One call to the server named by ``Config.values["base"]``, under the key ``"k"``."""
    base = procval.current_config().values["base"]
    with procval.limited("k", tokens=5) as permit:
        status = post(base, f"question {example}")
        if permit is not None:
            permit.record(tokens=5)
    return status


def kill_holding_a_permit(example: Any) -> int:
    """Example 3 kills its worker (SIGKILL) while it holds a permit; the others call once."""
    if example == 3:
        with procval.limited("k", tokens=5):
            os.kill(os.getpid(), signal.SIGKILL)
    return limited_call(example)


def ok(example: Any, prediction: Any) -> float:
    """1.0 for a 200."""
    return float(prediction == 200)


def plain_call(example: Any) -> int:
    """One call to the server, unlimited (the hang test counts the server's requests)."""
    return post(procval.current_config().values["base"], f"question {example}", timeout=600)


def make_two_calls() -> Any:
    """A ``dspy.Module`` running :class:`TwoCalls` (built where DSPy is imported)."""
    import dspy

    class Program(dspy.Module):
        def __init__(self) -> None:
            super().__init__()
            self.draft = dspy.Predict("question -> draft")
            self.answer = dspy.Predict("question, draft -> answer")

        def forward(self, question: str) -> Any:
            draft = self.draft(question=question).draft
            return self.answer(question=question, draft=draft)

    return Program()


def answered(example: Any, prediction: Any, trace: Any = None) -> float:
    """1.0 when the stand-in server's answer came back."""
    return float(str(getattr(prediction, "answer", "")).startswith("answer-of:"))
