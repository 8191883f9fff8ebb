"""DSPy start-up and repeated calls: preloading DSPy in the fork server, and warm workers.

Usage::

    python benchmarks/dspy_warm.py               # both cases, 3 repetitions
    python benchmarks/dspy_warm.py --repeat 5

``start``: the first row of a 2-worker ``procval.evaluate`` of a ``dspy.Predict`` program
(``dspy.utils.DummyLM``, offline), each repetition in a fresh Python process (so the fork server
starts too), with and without ``LokyBackend(preload=["dspy"])``; and the PSS (proportional set
size, shared pages counted once) summed over the parent, the fork server(s) and the workers,
read with psutil while the workers are alive.

``loop``: an optimizer's loop, 20 calls x 50 examples, each with a changed program (new demos),
as DSPy optimizers call ``Evaluate``: plain ``evaluate`` calls, a ``procval.Workers`` pool, and
the pool with DSPy preloaded; and the same program 20 times in a pool (workers reused).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, os, sys, threading, time
t0 = time.perf_counter()
import dspy, psutil
from dspy.utils import DummyLM
import procval
from procval.backends.loky import LokyBackend

preload = sys.argv[1] == "preload"
dspy.configure(lm=DummyLM([{"answer": "4"}] * 200))
program = dspy.Predict("question -> answer")
devset = [dspy.Example(question=f"What is {i}+2?", answer="4").with_inputs("question")
          for i in range(40)]
first, pss = [], []

def on_rows(config, rows):
    if not first:
        first.append(time.perf_counter())
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                if "resource_tracker" not in " ".join(p.cmdline()):
                    total += p.memory_full_info().pss
            except psutil.Error:
                pass
        pss.append(total)

from procval.run.observe import on_rows as observe
config = procval.dspy.snapshot()
started = time.perf_counter()
with observe(on_rows):
    procval.evaluate(lambda e: program(**e.inputs()), devset, lambda e, p: p.answer == e.answer,
                     config=config, workers=2, threads=2, progress=False,
                     backend=LokyBackend(preload=["dspy"] if preload else []))
print(json.dumps({"first_row": first[0] - started, "pss_mb": pss[0] / 2**20,
                  "import_dspy": started - t0}))
"""


def start_case(repeat: int) -> None:
    print("start: first row of a 2-worker DSPy run, a fresh Python process per repetition")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    results: dict[str, list[dict[str, float]]] = {"no preload": [], "preload dspy": []}
    for _ in range(repeat):
        for name, arg in (("no preload", "plain"), ("preload dspy", "preload")):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, arg],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=True,
            )
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"  {'':14} {'first row s':>12} {'PSS MB':>8}   (medians of {repeat})")
    for name, runs in results.items():
        first = statistics.median(r["first_row"] for r in runs)
        pss = statistics.median(r["pss_mb"] for r in runs)
        print(f"  {name:14} {first:12.3f} {pss:8.1f}")


def loop_case(repeat: int, calls: int = 20, n: int = 50) -> None:
    import dspy
    from dspy.utils import DummyLM

    import procval
    from procval.backends.loky import LokyBackend

    dspy.configure(lm=DummyLM([{"answer": "4"}] * (calls * n * repeat * 4 + 100)))
    devset = [
        dspy.Example(question=f"What is {i}+2?", answer="4").with_inputs("question")
        for i in range(n)
    ]
    config = procval.dspy.snapshot()

    def metric(example, prediction):
        return prediction.answer == example.answer

    def programs(changed: bool) -> list[dspy.Predict]:
        made = []
        for i in range(calls):
            program = dspy.Predict("question -> answer")
            program.demos = [devset[i % n]] if changed else []
            made.append(program)
        return made

    def plain() -> None:
        for program in programs(True):
            procval.evaluate(
                lambda e, p=program: p(**e.inputs()),
                devset,
                metric,
                config=config,
                workers=2,
                threads=2,
                progress=False,
            )

    def pooled(preload: list[str], changed: bool) -> None:
        backend = LokyBackend(preload=preload)
        with procval.Workers(config, workers=2, threads=2, backend=backend) as pool:
            for program in programs(changed):
                pool.evaluate(_Call(program), devset, metric, progress=False)

    cases = {
        "evaluate, changed program": plain,
        "Workers, changed program": lambda: pooled([], True),
        "Workers+preload, changed": lambda: pooled(["dspy"], True),
        "Workers+preload, same prog": lambda: pooled(["dspy"], False),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    print(
        f"loop: {calls} calls x {n} examples (DummyLM), 2 workers x 2 threads; medians of {repeat}"
    )
    base = statistics.median(times["evaluate, changed program"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:28} {m:7.2f} s  {m / base:5.2f}x  ({m / calls * 1000:.0f} ms per call)")


class _Call:
    """``program(**example.inputs())``, picklable by reference to this module."""

    def __init__(self, program: object) -> None:
        self.program = program

    def __call__(self, example: object) -> object:
        return self.program(**example.inputs())  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--case", default="start,loop")
    args = parser.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if "start" in args.case:
        start_case(args.repeat)
    if "loop" in args.case:
        loop_case(args.repeat)


if __name__ == "__main__":
    main()
