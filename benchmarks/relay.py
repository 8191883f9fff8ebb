"""The cost of relaying DSPy callbacks and LM history from the workers: a 1,000-example run.

Runs ``procval.dspy.Evaluate`` on a Predict feeding a ChainOfThought (2 LM calls per example,
2 workers x 4 threads) against the stand-in server (tests/helpers/llm_server.py, in its own
process so that its CPU is not the parent's), in three modes, alternated ``--repeats`` times:

- ``none``: no callback and no LM history relay (the relay's code path absent: the benchmark
  undoes the worker's history tap and the parent replays nothing), the true baseline;
- ``history``: no callback, the LM history relayed (what every ``Evaluate`` call does);
- ``callback``: a counting callback in ``dspy.configure(callbacks=[...])`` and the history.

It prints the best (by wall time) run of each: wall time, the parent's CPU time and the
workers' CPU time (summed over the worker processes, sampled with psutil).
Target: ``callback`` within 5% of ``none`` in wall time and parent CPU.

    PYTHONPATH=$PWD python benchmarks/relay.py [--examples 1000] [--repeats 2] [--modes ...]

``--one MODE`` runs a single measurement and prints it as JSON (for a driver that alternates
two checkouts of procval in fresh processes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
)

import dspy
import psutil

import procval.dspy
from helpers import observe_programs as programs
from helpers.llm_server import LLMServer
from procval.integrations import dspy as procval_dspy

MODES = ("none", "history", "callback")


class _NoRelay:
    """``Config.setup`` that installs the snapshot, then takes the history tap off the LM."""

    def __init__(self, setup: Any) -> None:
        self.setup = setup

    def __call__(self) -> None:
        self.setup()
        lm = dspy.settings.get("lm")
        if lm is not None:
            vars(lm).pop("update_history", None)  # DSPy's own update_history again


def _snapshot_without_relay(**kwargs: Any) -> procval.Config:
    config = procval.dspy.snapshot(**kwargs)
    return dataclasses.replace(config, setup=_NoRelay(config.setup))  # no relay in the parent


class _WorkersCPU:
    """The CPU time of the children but ``excluded`` (the server), sampled during a run.

    A worker that exits between two samples loses its last fraction of a second.
    """

    def __init__(self, excluded: set[int]) -> None:
        self.excluded = excluded
        self.seen: dict[int, float] = {}
        self.stop = threading.Event()
        self.start = self._read()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _read(self) -> dict[int, float]:
        found = {}
        for child in psutil.Process().children(recursive=True):
            if child.pid in self.excluded:
                continue
            try:
                times = child.cpu_times()
            except psutil.Error:
                continue
            found[child.pid] = times.user + times.system
        return found

    def _sample(self) -> None:
        while not self.stop.wait(0.25):
            self.seen.update(self._read())

    def total(self) -> float:
        self.stop.set()
        self.thread.join(5)
        self.seen.update(self._read())
        return sum(cpu - self.start.get(pid, 0.0) for pid, cpu in self.seen.items())


def once(server: Any, n: int, mode: str, excluded: set[int]) -> tuple[float, float, float, int]:
    """One run: wall time, parent CPU, workers' CPU, callback events seen."""
    callback = programs.Counting()
    lm = dspy.LM(server.model, api_base=server.api_base, api_key="sk-test", cache=False)
    dspy.configure(lm=lm, callbacks=[callback] if mode == "callback" else [])
    evaluate = procval.dspy.Evaluate(
        devset=programs.devset(n), metric=programs.exact, num_threads=8, workers=2
    )
    original = procval_dspy.snapshot
    if mode == "none":
        procval_dspy.snapshot = _snapshot_without_relay  # type: ignore[assignment]
    try:
        workers = _WorkersCPU(excluded)
        wall, cpu = time.perf_counter(), time.process_time()
        result = evaluate(programs.Pipeline())
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        children = workers.total()
    finally:
        procval_dspy.snapshot = original  # type: ignore[assignment]
    assert result.score == 100.0
    assert len(lm.history) == (0 if mode == "none" else 2 * n), len(lm.history)
    return wall, cpu, children, len(callback.events)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--one", choices=MODES, help="one run of this mode, printed as JSON")
    args = parser.parse_args()
    with LLMServer.in_process() as server:
        excluded = {child.pid for child in psutil.Process().children(recursive=True)}
        once(server, 20, "callback", excluded)  # warm up imports and the server
        if args.one:
            wall, cpu, workers, events = once(server, args.examples, args.one, excluded)
            print(json.dumps({"wall": wall, "cpu": cpu, "workers": workers, "events": events}))
            return
        best: dict[str, tuple[float, float, float, int]] = {}
        for _ in range(args.repeats):
            for mode in args.modes:
                run = once(server, args.examples, mode, excluded)
                if mode not in best or run[0] < best[mode][0]:
                    best[mode] = run
    for mode in args.modes:
        wall, cpu, workers, events = best[mode]
        print(
            f"{mode:<8}  wall {wall:6.2f} s  parent CPU {cpu:5.2f} s  "
            f"workers CPU {workers:6.2f} s  events {events}"
        )
    if "none" in best:
        w0, c0, k0, _ = best["none"]
        for mode in args.modes[1:] if args.modes[0] == "none" else args.modes:
            if mode == "none":
                continue
            w1, c1, k1, _ = best[mode]
            print(
                f"{mode} vs none: wall {100 * (w1 / w0 - 1):+.1f}%  "
                f"parent CPU {100 * (c1 / c0 - 1):+.1f}%  workers CPU {100 * (k1 / k0 - 1):+.1f}%"
            )


if __name__ == "__main__":
    main()
