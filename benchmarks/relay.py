"""The cost of relaying DSPy callbacks and LM history from the workers: a 1,000-example run.

Runs ``procval.dspy.Evaluate`` on a Predict feeding a ChainOfThought (2 LM calls per example,
2 workers x 4 threads) against the stand-in server (tests/helpers/llm_server.py, in its own
process so that its CPU is not the parent's), in three modes, alternated ``--repeats`` times:

- ``none``: no callback and no LM history relay (the relay's code path absent: the benchmark
  undoes the worker's history tap and the parent replays nothing), the true baseline;
- ``history``: no callback, the LM history relayed (what every ``Evaluate`` call does);
- ``dispatch``: the history, and a callback that does nothing, run in the workers
  (``procval_in_worker``): what DSPy's own callback machinery costs there (a call id, the
  call's arguments bound, the handler looked up, for every module, LM and adapter call), with
  nothing recorded or replayed: what any callback costs DSPy, in one process too;
- ``callback``: a counting callback in ``dspy.configure(callbacks=[...])`` and the history.

It prints the median of each over the alternating runs: wall time, the parent's own CPU time
(``getrusage(RUSAGE_SELF)``: every thread of the parent, no child process), the workers' CPU
time (summed over the worker processes, sampled with psutil by a process of its own, so that the
sampling costs the parent nothing) and, in ``callback``, the time spent in the counting
callback's own handlers (timed around each call: the user's part of the parent's CPU).
"The same run without callbacks" is ``history``: ``Evaluate`` relays the LM history whether or
not a callback is set, so ``callback`` against ``history`` is the cost of the callbacks' relay,
and against ``none`` the cost of the whole relay; ``callback`` against ``dispatch`` is what the
relay adds to what DSPy itself costs. Target: within 5% in wall time and parent CPU.
A parent's CPU here is a few tenths of a second for 1,000 examples (the stand-in server's
latency sets the wall time), so the relay's cost is also printed in seconds.

    PYTHONPATH=$PWD python benchmarks/relay.py [--examples 1000] [--repeats 3] [--modes ...]
        [--latency 0.2 --sigma 0.5 --threads 64]   # an LLM's latency: the run waits on the network

``--one MODE`` runs a single measurement and prints it as JSON (for a driver that alternates
two checkouts of procval in fresh processes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import select
import statistics
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
)

import dspy
import psutil
from dspy.utils.callback import BaseCallback

import procval.dspy
from helpers import observe_programs as programs
from helpers.llm_server import LLMServer
from procval.integrations import dspy as procval_dspy

MODES = ("none", "history", "dispatch", "callback")


class _Idle(BaseCallback):
    """Overrides every handler and does nothing, in the workers: DSPy's dispatch, no relay."""

    procval_in_worker = True


class _TimedCounting(programs.Counting):
    """The counting callback, with the time spent in its handlers (``seconds``)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0


def _idle(self: Any, *args: Any, **kwargs: Any) -> None:
    return None


def _timed(handler: Any) -> Any:
    def timed(self: _TimedCounting, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        try:
            handler(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    return timed


for _hook in programs.HOOKS:
    setattr(_Idle, _hook, _idle)
    setattr(_TimedCounting, _hook, _timed(getattr(programs.Counting, _hook)))


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


_SAMPLER = """
import sys, psutil
parent, excluded, me = int(sys.argv[1]), set(map(int, sys.argv[2:])), psutil.Process()
def read():
    found = {}
    try:
        children = psutil.Process(parent).children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        if child.pid in excluded or child.pid == me.pid:
            continue
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        found[child.pid] = times.user + times.system
    return found
import select
for line in sys.stdin:
    if line.strip() != "start":
        break
    start, seen = read(), {}
    while not select.select([sys.stdin], [], [], 0.25)[0]:
        seen.update(read())
    sys.stdin.readline()  # stop
    seen.update(read())
    print(sum(cpu - start.get(pid, 0.0) for pid, cpu in seen.items()), flush=True)
"""


class _WorkersCPU:
    """The workers' CPU time, sampled by a process of its own (none of it in the parent's CPU).

    It sums the CPU of the parent's descendants but ``excluded`` (the server), sampled every
    0.25 s between :meth:`start` and :meth:`stop`: a worker that exits between two samples loses
    its last fraction of a second.
    """

    def __init__(self, excluded: set[int]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SAMPLER, str(os.getpid()), *map(str, excluded)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def start(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("start\n")

    def stop(self) -> float:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("stop\n")
        if not select.select([self.process.stdout], [], [], 30)[0]:
            raise RuntimeError("the CPU sampler did not answer within 30 s")
        return float(self.process.stdout.readline())

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def _parent_cpu() -> float:
    """This process's own CPU time (user + system, all its threads, no children)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def once(
    server: Any, n: int, mode: str, sampler: _WorkersCPU, threads: int = 8
) -> tuple[float, ...]:
    """One run: wall time, parent CPU, workers' CPU, callback events seen, callback's time."""
    callback = _TimedCounting()
    lm = dspy.LM(server.model, api_base=server.api_base, api_key="sk-test", cache=False)
    callbacks = {"callback": [callback], "dispatch": [_Idle()]}.get(mode, [])
    dspy.configure(lm=lm, callbacks=callbacks)
    evaluate = procval.dspy.Evaluate(
        devset=programs.devset(n), metric=programs.exact, num_threads=threads, workers=2
    )
    original = procval_dspy.snapshot
    if mode == "none":
        procval_dspy.snapshot = _snapshot_without_relay  # type: ignore[assignment]
    try:
        sampler.start()
        wall, cpu = time.perf_counter(), _parent_cpu()
        result = evaluate(programs.Pipeline())
        wall, cpu = time.perf_counter() - wall, _parent_cpu() - cpu
        children = sampler.stop()
    finally:
        procval_dspy.snapshot = original  # type: ignore[assignment]
    assert result.score == 100.0
    assert len(lm.history) == (0 if mode == "none" else 2 * n), len(lm.history)
    return wall, cpu, children, len(callback.events), callback.seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--one", choices=MODES, help="one run of this mode, printed as JSON")
    parser.add_argument(
        "--latency",
        type=float,
        default=0.0,
        help="the server's median latency in seconds (default 0: the run is CPU-bound, the "
        "worst case for the relay; 0.2 with --sigma 0.5 is an LLM's, as in dspy_bench.py)",
    )
    parser.add_argument("--sigma", type=float, default=0.0, help="lognormal spread of latency")
    parser.add_argument("--threads", type=int, default=8, help="examples in flight (num_threads)")
    args = parser.parse_args()
    latency = ("--latency", str(args.latency), "--sigma", str(args.sigma), "--seed", "1")
    with LLMServer.in_process(*latency) as server:
        excluded = {child.pid for child in psutil.Process().children(recursive=True)}
        sampler = _WorkersCPU(excluded)
        try:
            once(server, 20, "callback", sampler, args.threads)  # warm up imports, the server
            if args.one:
                wall, cpu, workers, events, handlers = once(
                    server, args.examples, args.one, sampler, args.threads
                )
                found = {"wall": wall, "cpu": cpu, "workers": workers, "events": events}
                print(json.dumps({**found, "callback": handlers}))
                return
            runs: dict[str, list[tuple[float, ...]]] = {m: [] for m in args.modes}
            for i in range(args.repeats):  # alternating, the order rotated each round
                modes = args.modes[i % len(args.modes) :] + args.modes[: i % len(args.modes)]
                for mode in modes:
                    runs[mode].append(once(server, args.examples, mode, sampler, args.threads))
        finally:
            sampler.close()
    median = {
        mode: tuple(statistics.median(run[k] for run in found) for k in range(5))
        for mode, found in runs.items()
    }
    print(f"medians of {args.repeats} alternating runs of {args.examples} examples:")
    for mode in args.modes:
        wall, cpu, workers, events, handlers = median[mode]
        print(
            f"{mode:<8}  wall {wall:6.2f} s  parent CPU {cpu:5.2f} s  "
            f"workers CPU {workers:6.2f} s  events {events:.0f}"
            + (f"  (in the callback's handlers: {handlers:.3f} s)" if events else "")
        )
    pairs = (("none", "history"), ("history", "dispatch"), ("dispatch", "callback"))
    for base, mode in (*pairs, ("history", "callback")):
        if base in median and mode in median:
            w0, c0, k0, *_ = median[base]
            w1, c1, k1, *_ = median[mode]
            print(
                f"{mode} vs {base}: wall {100 * (w1 / w0 - 1):+.1f}%  "
                f"parent CPU {100 * (c1 / c0 - 1):+.1f}% ({c1 - c0:+.2f} s)  "
                f"workers CPU {100 * (k1 / k0 - 1):+.1f}%"
            )


if __name__ == "__main__":
    main()
