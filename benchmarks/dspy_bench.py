"""The DSPy table: ``procval.dspy.Evaluate`` beside ``dspy.Evaluate``, against the targets.

Usage::

    python benchmarks/dspy_bench.py                      # every case, medians of 3
    python benchmarks/dspy_bench.py --quick              # small sizes, 1 repetition
    python benchmarks/dspy_bench.py --before ../base     # a third column: another checkout
    python benchmarks/dspy_bench.py --case first,c16 --repeat 5

The program is a ``Predict`` feeding a ``ChainOfThought`` (2 LM calls per example,
``tests/helpers/observe_programs.Pipeline``), its LM the stand-in server of
``tests/helpers/llm_server.py`` in a process of its own (lognormal latency, median 200 ms,
sigma 0.5, drawn from each request's messages, so that every tool meets the same latency for the
same LM call; ``cache=False``, so every call reaches it). Every measurement runs in a new Python
process (``--one``) that imports DSPy and configures the LM before any clock starts; the cases
loop outermost, then the repetitions, then the tools, so the tools alternate.

- ``c16``, ``c64``, ``c128``: wall time of one ``Evaluate(...)(program)`` call (300, 300 and
  1,200 examples at ``num_threads`` 16, 64, 128), a new evaluator per call, after an untimed
  16-example call in the same process (DSPy's and LiteLLM's first-call costs, procval's fork
  server): what every call of a process pays but its first.
- ``first``: a fresh process's first call, 300 examples at 16: seconds from ``Evaluate(...)``
  (built just before the call) to the first row in the caller (for ``dspy.Evaluate``, which
  returns nothing before the end, the first metric result); the call's wall time; and the peak
  PSS (proportional set size: shared pages counted once) summed over the process and all its
  descendants (fork servers, workers, loky's resource tracker), read from
  ``/proc/PID/smaps_rollup`` every 0.1 s by this driver process, not by the measured one.
- ``overlap``: as ``first`` (64 examples), but the caller runs its program on 2 examples
  between ``Evaluate(...)`` and the call, as an optimizer bootstraps demos: the clock starts at
  the call.
- ``loop``: an optimizer's loop in a fresh process: one evaluator called 20 times on 50
  examples at 16, each time with a new program (other demos), as optimizers do.
- ``configs``: ``procval.evaluate`` of 4 DSPy configs (temperatures) × 2 workers × 4 threads
  on 40 examples, fresh process: first row and peak PSS (no ``dspy.Evaluate`` equivalent).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {
    **{"c16": (300, 16), "c64": (300, 64), "c128": (1200, 128)},
    **{"first": (300, 16), "overlap": (64, 16)},
}
QUICK = {
    "c16": (64, 16),
    "c64": (128, 64),
    "c128": (256, 128),
    "first": (64, 16),
    "overlap": (32, 16),
}
CASES = ("first", "overlap", "c16", "c64", "c128", "loop", "configs")
LOOP = (20, 50, 16)  # calls, examples, num_threads
QUICK_LOOP = (5, 32, 16)


# ---------------------------------------------------------------- one measurement (child)


def _child(case: str, tool: str, port: int, n: int, c: int, loop: tuple[int, int, int]) -> None:
    """Run one measurement in this fresh process and print it as JSON."""
    import logging

    import dspy

    from helpers import observe_programs as programs

    logging.getLogger("dspy").setLevel(logging.WARNING)  # no "Average Metric" lines
    lm = dspy.LM(
        "openai/stand-in", api_base=f"http://127.0.0.1:{port}/v1", api_key="sk-test", cache=False
    )
    dspy.configure(lm=lm)
    marks: dict[str, float] = {}
    if case == "configs":
        print(json.dumps(_configs(programs, marks)))
        return
    evaluator = _evaluator(tool, marks)
    if case in {"c16", "c64", "c128"}:
        evaluator(programs.devset(16), 16)(programs.Pipeline())  # untimed: first-call costs
        marks.clear()
    if case == "loop":
        calls, size, threads = loop
        devset = programs.devset(size)
        started = time.perf_counter()
        evaluate = evaluator(devset, threads)
        for i in range(calls):
            program = programs.Pipeline()
            program.draft.demos = [devset[i % size]]  # a new candidate each call
            result = evaluate(program)
            assert result.score == 100.0, result.score
        print(json.dumps({"wall": time.perf_counter() - started}))
        return
    devset = programs.devset(n)
    program = programs.Pipeline()
    started = time.perf_counter()
    evaluate = evaluator(devset, c)
    if case == "overlap":  # the caller's own work between Evaluate(...) and the call, as an
        for example in devset[:2]:  # optimizer bootstrapping demos: 2 examples run here
            program(**example.inputs())
        started = time.perf_counter()
    result = evaluate(program)
    wall = time.perf_counter() - started
    assert result.score == 100.0, result.score
    print(json.dumps({"wall": wall, "first": marks.get("first", wall + started) - started}))


def _evaluator(tool: str, marks: dict[str, float]) -> Callable[[list[Any], int], Any]:
    """``make(devset, num_threads)``: an evaluator of ``tool`` that notes its first row."""
    import dspy

    from helpers import observe_programs as programs

    def first() -> None:
        marks.setdefault("first", time.perf_counter())

    if tool == "dspy":

        def metric(example: Any, prediction: Any, trace: Any = None) -> bool:
            score = programs.exact(example, prediction)
            first()
            return score

        return lambda devset, c: dspy.Evaluate(
            devset=devset, metric=metric, num_threads=c, display_progress=False
        )
    import procval.dspy
    from procval.integrations import dspy as integration

    class FirstRow(integration._ErrorLog):  # type: ignore[misc, name-defined]
        def __call__(self, config: str, rows: list[Any]) -> None:
            first()
            super().__call__(config, rows)

    integration._ErrorLog = FirstRow  # type: ignore[attr-defined]
    return lambda devset, c: procval.dspy.Evaluate(
        devset=devset, metric=programs.exact, num_threads=c
    )


def _configs(programs: Any, marks: dict[str, float]) -> dict[str, float]:
    import dspy

    import procval
    import procval.dspy
    from procval.run.observe import on_rows

    lm = dspy.settings.lm
    configs = [
        procval.dspy.snapshot(name=f"t{t}", lm=lm.copy(temperature=t)) for t in (0.0, 0.3, 0.6, 0.9)
    ]
    program = programs.Pipeline()
    started = time.perf_counter()
    with on_rows(lambda config, rows: marks.setdefault("first", time.perf_counter())):
        results = procval.evaluate(
            _Call(program),
            programs.devset(40),
            programs.exact,
            configs=configs,
            workers=8,
            threads=4,
            progress=False,
        )
    wall = time.perf_counter() - started
    assert all(r.score == 1.0 for r in results.values()), results
    return {"wall": wall, "first": marks["first"] - started}


class _Call:
    """``program(**example.inputs())``, picklable by reference to this module."""

    def __init__(self, program: Any) -> None:
        self.program = program

    def __call__(self, example: Any) -> Any:
        return self.program(**example.inputs())


# ---------------------------------------------------------------- the driver


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class _PeakPSS:
    """The peak PSS of a process and its descendants, sampled from this (another) process."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.processes = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.wait(0.1):
            try:
                pids = [self.pid, *(p.pid for p in root.children(recursive=True))]
            except psutil.Error:
                return
            total = sum(_pss_kb(pid) for pid in pids)
            if total > self.peak:
                self.peak, self.processes = total, len(pids)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(5)
        return self.peak / 1024


def _measure(
    tree: str, case: str, tool: str, port: int, args: argparse.Namespace
) -> dict[str, float]:
    n, c = (QUICK if args.quick else SIZES).get(case, (0, 0))
    loop = QUICK_LOOP if args.quick else LOOP
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([tree, os.path.join(tree, "tests")]),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    one = json.dumps([case, tool, port, n, c, loop])
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--one", one],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        cwd=tree,
    )
    sampler = _PeakPSS(child.pid) if case in {"first", "configs"} else None
    try:
        out, _ = child.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise RuntimeError(f"{case} / {tool} took over 900 s") from None
    peak = sampler.stop() if sampler is not None else 0.0
    if child.returncode != 0:
        raise RuntimeError(f"{case} / {tool} failed with exit code {child.returncode}")
    result = dict(json.loads(out.strip().splitlines()[-1]))
    if sampler is not None:
        result["pss"] = peak
        result["processes"] = sampler.processes
    return result


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 repetition")
    parser.add_argument("--repeat", type=int, default=None, help="repetitions (default 3)")
    parser.add_argument("--case", default=",".join(CASES), help=f"some of {','.join(CASES)}")
    parser.add_argument("--before", default=None, help="another procval checkout to compare")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        case, tool, port, n, c, loop = json.loads(args.one)
        _child(case, tool, port, n, c, tuple(loop))
        return
    repeat = args.repeat or (1 if args.quick else 3)
    cases = [c.strip() for c in args.case.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose among {','.join(CASES)}")
    tools = {"dspy": ("dspy", HERE), "procval": ("procval", HERE)}
    if args.before:
        tools = {"dspy": ("dspy", HERE), "before": ("procval", args.before), **tools}
        tools.pop("procval")
        tools["procval"] = ("procval", HERE)
    sys.path.insert(0, os.path.join(HERE, "tests"))
    from helpers.llm_server import LLMServer

    print(f"load average at start: {_load()}")
    print(f"repetitions: {repeat} (medians shown); each measurement in a new process")
    measured: dict[tuple[str, str], list[dict[str, float]]] = {}
    server_args = ("--latency", "0.2", "--sigma", "0.5", "--seed", "1", "--keyed")
    with LLMServer.in_process(*server_args) as server:
        for case in cases:
            loads = [_load()]
            for _ in range(repeat):
                for name, (tool, tree) in tools.items():
                    if case == "configs" and tool == "dspy":
                        continue
                    run = _measure(tree, case, tool, server.port, args)
                    measured.setdefault((case, name), []).append(run)
            loads.append(_load())
            _report(case, measured, list(tools), loads, args.quick)
    print(f"load average at end: {_load()}")
    _summary(measured, list(tools))


def _median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _report(
    case: str,
    measured: dict[tuple[str, str], list[dict[str, float]]],
    names: list[str],
    loads: list[str],
    quick: bool,
) -> None:
    n, c = (QUICK if quick else SIZES).get(case, (0, 0))
    calls, size, threads = QUICK_LOOP if quick else LOOP
    title = {
        "c16": f"{n} examples, concurrency {c}, fork server running",
        "c64": f"{n} examples, concurrency {c}, fork server running",
        "c128": f"{n} examples, concurrency {c}, fork server running",
        "first": f"first call of a fresh process, {n} examples at concurrency {c}",
        "overlap": f"the same, {n} examples, 2 run by the caller between Evaluate(...) and the "
        "call (clock from the call)",
        "loop": f"an optimizer's loop, fresh process: {calls} calls x {size} examples at {threads}",
        "configs": "4 configs x 2 workers x 4 threads, 40 examples, fresh process",
    }[case]
    print(f"\n{case}: {title}  (load {loads[0]} -> {loads[1]})")
    for name in names:
        runs = measured.get((case, name))
        if not runs:
            continue
        cells = [f"wall {_median(runs, 'wall'):7.2f} s"]
        if "first" in runs[0] and case in {"first", "overlap", "configs"}:
            cells.append(f"first row {_median(runs, 'first'):6.2f} s")
        if "pss" in runs[0]:
            cells.append(f"peak PSS {_median(runs, 'pss'):6.1f} MB ({runs[0]['processes']} proc)")
        walls = " ".join(f"{r['wall']:.2f}" for r in runs)
        print(f"  {name:8} " + "  ".join(cells) + f"   [walls {walls}]")


TARGETS = (  # (label, case, key, compare to dspy?, target, at most?)
    ("300 examples, c16: wall vs dspy.Evaluate", "c16", "wall", True, 1.0),
    ("300 examples, c64: wall vs dspy.Evaluate", "c64", "wall", True, 1.0),
    ("1,200 examples, c128: wall vs dspy.Evaluate", "c128", "wall", True, 0.8),
    ("first row reaching the caller, c16 (s)", "first", "first", False, 0.4),
    ("... after the caller's own work (s)", "overlap", "first", False, 0.4),
    ("peak PSS, all processes, c16 vs dspy.Evaluate", "first", "pss", True, 2.0),
    ("optimizer loop vs dspy.Evaluate", "loop", "wall", True, 1.1),
    ("4 configs x 2 workers: first row (s)", "configs", "first", False, 1.0),
)


def _summary(measured: dict[tuple[str, str], list[dict[str, float]]], names: list[str]) -> None:
    print("\ntargets (medians):")
    met = total = 0
    for label, case, key, relative, target in TARGETS:
        base = measured.get((case, "dspy"))
        cells = []
        verdict = ""
        for name in names:
            runs = measured.get((case, name))
            if name == "dspy" or not runs or (relative and not base):
                continue
            value = _median(runs, key)
            shown = value / _median(base, key) if relative and base else value
            unit = "x" if relative else " s"
            cells.append(f"{name} {shown:.2f}{unit}")
            if name == "procval":
                ok = shown <= target
                verdict = "met" if ok else "NOT MET"
                met, total = met + ok, total + 1
        if cells:
            unit = "x" if relative else " s"
            print(f"  {label:48} {'  '.join(cells):30} target <= {target}{unit}  {verdict}")
    print(f"targets met: {met}/{total}")


if __name__ == "__main__":
    main()
