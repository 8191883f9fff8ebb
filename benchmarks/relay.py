"""The cost of relaying DSPy callbacks from the workers: a 1,000-example run with and without one.

Runs ``procval.dspy.Evaluate`` on a Predict feeding a ChainOfThought (2 LM calls per example)
against the stand-in server (tests/helpers/llm_server.py, in its own process so that its CPU is
not the parent's), once with no callback and once with a counting callback in
``dspy.configure(callbacks=[...])``, and prints wall time and parent CPU time of each.
Target: with the callback within 5% of without. History is relayed in both runs.

    PYTHONPATH=$PWD python benchmarks/relay.py [--examples 1000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
)

import dspy

import procval.dspy
from helpers import observe_programs as programs
from helpers.llm_server import LLMServer


def once(api_base: str, model: str, n: int, with_callback: bool) -> tuple[float, float, int]:
    callback = programs.Counting()
    lm = dspy.LM(model, api_base=api_base, api_key="sk-test", cache=False)
    dspy.configure(lm=lm, callbacks=[callback] if with_callback else [])
    evaluate = procval.dspy.Evaluate(
        devset=programs.devset(n), metric=programs.exact, num_threads=8, workers=2
    )
    wall, cpu = time.perf_counter(), time.process_time()
    result = evaluate(programs.Pipeline())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert result.score == 100.0 and len(lm.history) == 2 * n
    return wall, cpu, len(callback.events)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with LLMServer.in_process() as server:
        once(server.api_base, server.model, 20, True)  # warm up imports and the server
        best: dict[bool, tuple[float, float, int]] = {}
        for _ in range(args.repeats):
            for flag in (False, True):
                run = once(server.api_base, server.model, args.examples, flag)
                if flag not in best or run[0] < best[flag][0]:
                    best[flag] = run
    for flag in (False, True):
        wall, cpu, events = best[flag]
        label = "counting callback" if flag else "no callback     "
        print(f"{label}  wall {wall:6.2f} s  parent CPU {cpu:6.2f} s  events {events}")
    (w0, c0, _), (w1, c1, _) = best[False], best[True]
    print(f"relay cost: wall {100 * (w1 / w0 - 1):+.1f}%  parent CPU {100 * (c1 / c0 - 1):+.1f}%")


if __name__ == "__main__":
    main()
