"""The bug report that started procval, replayed offline with DSPy's DummyLM.

The report: after running a program in a plain ``ThreadPoolExecutor``, ``dspy.Evaluate`` scored
``dspy.configure(lm=gpt4o)`` and ``dspy.configure(lm=gpt4o_mini)`` identically, because worker
threads kept reading stale settings. Here the two models are ``DummyLM`` s in dict mode (the
answer is looked up by a question contained in the prompt): "gpt-4o" always knows the answer,
"gpt-4o-mini" never does. ``procval.dspy.Evaluate`` snapshots the settings the caller sees at
each call and installs them in fresh worker processes, so the scores must be 100 and 0.

Run: ``python examples/dspy_seed_scenario.py`` (offline, a few seconds).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import dspy
from dspy.utils import DummyLM

import procval

QUESTIONS = {
    "What is the capital of France?": "Paris",
    "Which planet is the largest in the solar system?": "Jupiter",
    "What color is a clear daytime sky?": "blue",
    "Which gas do plants absorb from the air?": "carbon dioxide",
    "How many legs does a spider have?": "eight",
    "Who wrote the play Hamlet?": "Shakespeare",
}


def exact_match(example: dspy.Example, prediction: dspy.Prediction, trace: object = None) -> bool:
    return example.answer.lower() == prediction.answer.strip().lower()


def main() -> dict[str, float]:
    devset = [
        dspy.Example(question=q, answer=a).with_inputs("question") for q, a in QUESTIONS.items()
    ]
    models = {
        "gpt-4o": DummyLM({q: {"answer": a} for q, a in QUESTIONS.items()}),
        "gpt-4o-mini": DummyLM({q: {"answer": "I am not sure"} for q in QUESTIONS}),
    }
    program = dspy.Predict("question -> answer")

    # Step 1 of the report: use the program from a plain thread pool.
    dspy.configure(lm=models["gpt-4o"])
    with ThreadPoolExecutor(max_workers=4) as pool:
        warmup = list(pool.map(lambda ex: program(**ex.inputs()).answer, devset))
    print(f"thread pool answers: {warmup}")

    # Step 2: evaluate under each model in turn.
    evaluate = procval.dspy.Evaluate(devset=devset, metric=exact_match, num_threads=4)
    scores = {}
    for name, lm in models.items():
        dspy.configure(lm=lm)
        scores[name] = evaluate(program).score
        print(f"{name}: {scores[name]}")
    return scores


if __name__ == "__main__":
    scores = main()
    assert scores["gpt-4o"] != scores["gpt-4o-mini"], f"the models scored the same: {scores}"
