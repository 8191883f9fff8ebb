"""procval quickstart: compare two configs of a toy "model", each in its own worker processes.

Runs offline in a few seconds:  python examples/quickstart.py
"""

from __future__ import annotations

import random

import procval

# Module-level settings, like an LLM library's "current model". Each config's setup() sets it in
# that config's own worker processes; the parent's copy is never used by the workers.
SETTINGS = {"model": None}


def toy_model(question: str) -> str:
    """A pretend LLM: 'careful' adds correctly, 'sloppy' is off by one a third of the time."""
    a, b = (int(x) for x in question.removeprefix("What is ").removesuffix("?").split(" + "))
    answer = a + b
    if SETTINGS["model"] == "sloppy" and procval.rng().random() < 1 / 3:
        answer += 1
    return str(answer)


def program(example: dict) -> str:
    return toy_model(example["question"])


def metric(example: dict, prediction: str) -> bool:
    return prediction == example["answer"]


def make_dataset(n: int = 200) -> list[dict]:
    rng = random.Random(0)
    data = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        data.append({"id": f"q{i}", "question": f"What is {a} + {b}?", "answer": str(a + b)})
    return data


configs = {
    "careful": procval.Config(setup=lambda: SETTINGS.update(model="careful"), seed=1),
    "sloppy": procval.Config(setup=lambda: SETTINGS.update(model="sloppy"), seed=1),
}

# For the command line:  procval run examples/quickstart.py:task --store runs/quickstart.db
task = procval.Task(program, make_dataset, metric, configs, workers=2)


if __name__ == "__main__":
    results = procval.evaluate(program, make_dataset(), metric, configs=configs, workers=2)
    print(results.summary())
    for name, result in results.items():
        pids = sorted({row.worker_pid for row in result.rows})
        print(f"{name}: worker pids {pids}, snapshot {result.fingerprint}")
