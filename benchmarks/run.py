"""procval against the alternatives, side by side, in one run.

Usage::

    python benchmarks/run.py                  # every case, 3 repetitions (a few minutes)
    python benchmarks/run.py --quick          # smaller cases, 1 repetition: a smoke run
    python benchmarks/run.py --case cpu,cold --repeat 5
    python benchmarks/run.py --scaling        # examples/s against workers and threads
    python benchmarks/run.py --case fresh     # the first evaluate() in a new Python process

Each case runs procval and the alternatives in the same process, interleaved repetition by
repetition (so a burst of load from elsewhere hits every engine alike), and reports medians.
Every engine runs the same importable functions from ``benchmarks/workloads.py``, program and
metric both, and every result is checked, so no engine can win by skipping work.

Process-based engines are measured *cold*, the way ``evaluate`` runs: procval starts (and stops)
its worker processes in every call, so joblib's reusable executor is shut down before each timed
joblib call and a fresh ``ProcessPoolExecutor`` is made each time. Joblib with its workers already
running ("warm") is shown for reference. procval's fork server lives as long as the process that
started it, so every call after the first (the benchmark warms up) forks its workers from it; the
``fresh`` case times the first call in a new Python process, server start included. The memory
case runs each size in a fresh subprocess and reads the peak RSS there (``VmHWM``;
:func:`peak_rss` says why not ``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # workers import the workloads by name: make the module findable
    sys.path.insert(0, HERE)
# spawned workers (procval's, joblib's, multiprocessing's) inherit PYTHONPATH
os.environ["PYTHONPATH"] = os.pathsep.join(
    [HERE, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
)

import workloads  # noqa: E402

import procval  # noqa: E402

MB = 1024 * 1024


# ---------------------------------------------------------------- engines


def serial(task: Callable[[Any], float], data: list[Any]) -> list[float]:
    """A plain loop in the calling process."""
    return [task(example) for example in data]


def threads(task: Callable[[Any], float], data: list[Any], n: int) -> list[float]:
    """A ``ThreadPoolExecutor``, as thread-based evaluators use."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(task, data))


def spawn_pool(task: Callable[[Any], float], data: list[Any], n: int) -> list[float]:
    """A fresh spawn ``ProcessPoolExecutor``, started and shut down in the call."""
    chunksize = max(1, len(data) // (n * 16))
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(task, data, chunksize=chunksize))


def joblib_run(task: Callable[[Any], float], data: list[Any], n: int) -> list[float]:
    """``joblib.Parallel(n_jobs=n)`` with its default loky backend and auto-batching."""
    import joblib

    return joblib.Parallel(n_jobs=n)(joblib.delayed(task)(example) for example in data)


def joblib_stop() -> None:
    """Shut down joblib's reusable loky executor, so the next joblib call starts cold."""
    from joblib.externals.loky import reusable_executor

    executor = getattr(reusable_executor, "_executor", None)
    if executor is not None:
        executor.shutdown(wait=True, kill_workers=True)
        reusable_executor._executor = None


def procval_run(
    program: Callable[[Any], Any], data: Any, workers: int, nthreads: int = 1, **options: Any
) -> procval.EvaluationResult:
    """``procval.evaluate`` with the benchmark metric and no progress bar."""
    return procval.evaluate(
        program,
        data,
        workloads.metric,
        workers=workers,
        threads=nthreads,
        progress=False,
        **options,
    )


def check(values: list[float], n: int) -> None:
    """Every engine must have run program and metric on every example."""
    if len(values) != n or sum(values) != n:
        raise AssertionError(f"expected {n} scores of 1.0, got {len(values)}, sum {sum(values)}")


def check_result(result: procval.EvaluationResult, n: int) -> None:
    """The same check for a procval result."""
    check([row.score for row in result.rows], n)
    if result.errors:
        raise AssertionError(f"procval rows failed: {result.errors[0].error}")


# ---------------------------------------------------------------- cases


@dataclass
class Contender:
    """One engine on one case: ``run`` is timed, ``prepare`` (untimed) runs before it."""

    label: str
    run: Callable[[], None]
    prepare: Callable[[], None] | None = None
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


@dataclass
class Target:
    """``ratio(numerator / denominator)`` must be >= or <= ``bound``."""

    text: str
    numerator: str
    denominator: str
    op: str  # ">=" (procval faster by at least) or "<=" (procval slower by at most)
    bound: float

    def ratio(self, medians: dict[str, float]) -> float:
        return medians[self.numerator] / medians[self.denominator]

    def met(self, medians: dict[str, float]) -> bool:
        r = self.ratio(medians)
        return r >= self.bound if self.op == ">=" else r <= self.bound


@dataclass
class Case:
    """A workload, the engines run on it, and the targets it must show."""

    name: str
    title: str
    examples: int
    contenders: list[Contender]
    targets: list[Target]


def cpu_case(n: int, spins: int) -> Case:
    data = workloads.cpu_examples(n, spins)
    task = workloads.cpu_task

    def run_procval() -> None:
        check_result(procval_run(workloads.cpu_program, data, 2), n)

    return Case(
        "cpu",
        f"CPU-bound: {n} examples x ~20 ms of pure Python",
        n,
        [
            Contender("serial loop", lambda: check(serial(task, data), n)),
            Contender("ThreadPoolExecutor(8)", lambda: check(threads(task, data, 8), n)),
            Contender("joblib n_jobs=2", lambda: check(joblib_run(task, data, 2), n), joblib_stop),
            Contender("spawn ProcessPool(2)", lambda: check(spawn_pool(task, data, 2), n)),
            Contender("procval 2 workers", run_procval),
        ],
        [
            Target("procval vs serial", "serial loop", "procval 2 workers", ">=", 1.8),
            Target(
                "procval vs threads(8)", "ThreadPoolExecutor(8)", "procval 2 workers", ">=", 1.7
            ),
        ],
    )


def io_case(n: int, sleep: float) -> Case:
    data = workloads.io_examples(n, sleep)
    task = workloads.io_task

    def run_procval() -> None:
        check_result(procval_run(workloads.io_program, data, 2, 32), n)

    return Case(
        "io",
        f"I/O-bound: {n} examples x {sleep * 1000:.0f} ms sleep",
        n,
        [
            Contender("ThreadPoolExecutor(64)", lambda: check(threads(task, data, 64), n)),
            Contender("procval 2 workers x 32 threads", run_procval),
        ],
        [
            Target(
                "procval vs threads(64)",
                "procval 2 workers x 32 threads",
                "ThreadPoolExecutor(64)",
                "<=",
                1.2,
            )
        ],
    )


def llm_case(n: int, sleep: float) -> Case:
    data = workloads.io_examples(n, sleep)
    task = workloads.llm_task

    def run_procval() -> None:
        check_result(procval_run(workloads.llm_program, data, 2, 16), n)

    return Case(
        "llm",
        f"LLM-like: {n} examples, lognormal latency of mean {sleep * 1000:.0f} ms (no target)",
        n,
        [
            Contender("ThreadPoolExecutor(32)", lambda: check(threads(task, data, 32), n)),
            Contender("procval 2 workers x 16 threads", run_procval),
        ],
        [],
    )


def trivial_case(n: int) -> Case:
    data = workloads.trivial_examples(n)
    task = workloads.trivial_task

    def run_procval() -> None:
        check_result(procval_run(workloads.trivial_program, data, 2), n)

    return Case(
        "trivial",
        f"Trivial: {n} examples, engine overhead only",
        n,
        [
            Contender("serial loop", lambda: check(serial(task, data), n)),
            Contender("ThreadPoolExecutor(8)", lambda: check(threads(task, data, 8), n)),
            Contender("joblib n_jobs=2", lambda: check(joblib_run(task, data, 2), n), joblib_stop),
            Contender("joblib n_jobs=2, warm", lambda: check(joblib_run(task, data, 2), n)),
            Contender("procval 2 workers", run_procval),
        ],
        [Target("procval vs joblib", "procval 2 workers", "joblib n_jobs=2", "<=", 1.2)],
    )


def cold_case(n: int) -> Case:
    data = workloads.trivial_examples(n)
    task = workloads.trivial_task

    def run_procval() -> None:
        check_result(procval_run(workloads.trivial_program, data, 2), n)

    return Case(
        "cold",
        f"Cold start: {n} trivial examples, workers started and stopped in the call",
        n,
        [
            Contender("spawn ProcessPool(2)", lambda: check(spawn_pool(task, data, 2), n)),
            Contender("joblib n_jobs=2", lambda: check(joblib_run(task, data, 2), n), joblib_stop),
            Contender("procval 2 workers", run_procval),
        ],
        [
            Target(
                "procval vs spawn ProcessPool(2)",
                "procval 2 workers",
                "spawn ProcessPool(2)",
                "<=",
                2.0,
            )
        ],
    )


# ---------------------------------------------------------------- running and printing


def warm_up() -> None:
    """Import everything and start the resource trackers once, outside any timing."""
    data = workloads.trivial_examples(4)
    check(spawn_pool(workloads.trivial_task, data, 2), 4)
    check(joblib_run(workloads.trivial_task, data, 2), 4)
    joblib_stop()
    check_result(procval_run(workloads.trivial_program, data, 2), 4)


def measure(case: Case, repeat: int) -> None:
    for _ in range(repeat):
        for contender in case.contenders:
            if contender.prepare is not None:
                contender.prepare()
            start = time.perf_counter()
            contender.run()
            contender.times.append(time.perf_counter() - start)


def print_case(case: Case, quick: bool) -> list[tuple[str, bool]]:
    medians = {c.label: c.median for c in case.contenders}
    base = medians[next(c.label for c in case.contenders if c.label.startswith("procval"))]
    print(f"\n{case.title}")
    if case.name == "cpu":
        per = medians["serial loop"] / case.examples
        print(f"  (the serial loop measured {per * 1000:.1f} ms per example)")
    print(f"  {'engine':<32} {'median s':>9} {'min s':>8} {'examples/s':>11} {'vs procval':>11}")
    for c in case.contenders:
        rate = case.examples / c.median
        print(
            f"  {c.label:<32} {c.median:>9.3f} {min(c.times):>8.3f} {rate:>11,.0f} "
            f"{c.median / base:>10.2f}x"
        )
    if not case.targets:
        other = case.contenders[0]
        print(f"  -> procval vs {other.label}: {base / other.median:.2f}x its time (no target)")
    verdicts = []
    for t in case.targets:
        r = t.ratio(medians)
        ok = t.met(medians)
        if t.op == ">=":
            shown = f"{r:.2f}x faster (target >= {t.bound}x)"
        else:
            shown = f"{r:.2f}x its time (target <= {t.bound}x)"
        mark = "met" if ok else "NOT MET"
        note = " [quick run: sizes reduced, not the target's]" if quick else ""
        print(f"  -> {t.text}: {shown}  {mark}{note}")
        verdicts.append((f"{case.name}: {t.text}", ok))
    return verdicts


# ---------------------------------------------------------------- memory (run store)


def store_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("procval.store") is not None


def peak_rss() -> int:
    """This process's peak resident set size, in bytes.

    On Linux, ``VmHWM`` from ``/proc/self/status``: ``ru_maxrss`` is no good in a child process
    there, because the kernel keeps the larger of the old and new peak across ``exec``, so a
    fresh subprocess starts with its parent's RSS as its peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux and BSDs


def rss_child(n: int, path: str) -> None:
    """In a fresh process: stream ``n`` examples into a store; print the peak RSS as JSON."""
    before = peak_rss()
    model = os.environ.get("PROCVAL_BENCH_MODEL", "plain")  # plain | named | epochs
    options: dict[str, Any] = {}
    if model == "named":
        options["metric"] = workloads.named_metric
    epochs = 3 if model == "epochs" else 1
    start = time.perf_counter()
    data = workloads.streamed_examples(n // epochs)
    if options:
        result = procval.evaluate(
            workloads.trivial_program, data, workers=2, progress=False, store=path, **options
        )
    else:
        result = procval_run(workloads.trivial_program, data, 2, store=path, epochs=epochs)
    seconds = time.perf_counter() - start
    cpu = time.process_time()  # the parent's CPU, imports included
    peak = peak_rss()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "n": n,
                "before": before,
                "peak": peak,
                "ru_maxrss": maxrss,
                "seconds": seconds,
                "cpu": cpu,
                "score": result.score,
            }
        )
    )


def memory_case(sizes: list[int]) -> list[tuple[str, bool]]:
    title = f"Memory: {' and '.join(f'{n:,}' for n in sizes)} streamed examples into a store"
    print(f"\n{title}")
    if not store_available():
        print("  skipped: store not available (procval.store has not landed)")
        return []
    runs = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="procval-bench-") as tmp:
            out = subprocess.run(
                [sys.executable, __file__, "--rss-child", str(n), os.path.join(tmp, "run.db")],
                check=True,
                capture_output=True,
                text=True,
            )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"  {'examples':>10} {'peak MB after imports':>22} {'peak MB':>8} "
        f"{'seconds':>8} {'rows/s':>9} {'parent CPU us/row':>18}"
    )
    for r in runs:
        print(
            f"  {r['n']:>10,} {r['before'] / MB:>22.1f} {r['peak'] / MB:>8.1f} "
            f"{r['seconds']:>8.2f} {r['n'] / r['seconds']:>9,.0f} "
            f"{r['cpu'] / r['n'] * 1e6:>18.1f}"
        )
    small, big = runs[0]["peak"], runs[-1]["peak"]
    under = big < 300 * MB
    flat = big - small <= 0.1 * small  # 10x the examples may add at most 10% to the peak
    print(
        f"  -> peak RSS at {sizes[-1]:,}: {big / MB:.0f} MB (target < 300 MB)  "
        f"{'met' if under else 'NOT MET'}"
    )
    print(
        f"  -> flat in n: {(big - small) / MB:+.1f} MB from {sizes[0]:,} to {sizes[-1]:,} "
        f"(target: within 10%)  {'met' if flat else 'NOT MET'}"
    )
    return [("memory: peak RSS < 300 MB", under), ("memory: flat in n", flat)]


def model_case(n: int) -> list[tuple[str, bool]]:
    """Parent CPU per row and store rows/s of named scores and of epochs, against one score."""
    print(f"\nEvaluation model: {n:,} rows into a store (one score, two named scores, 3 epochs)")
    runs = {}
    for model in ("plain", "named", "epochs"):
        with tempfile.TemporaryDirectory(prefix="procval-bench-") as tmp:
            out = subprocess.run(
                [sys.executable, __file__, "--rss-child", str(n), os.path.join(tmp, "run.db")],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "PROCVAL_BENCH_MODEL": model},
            )
        runs[model] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {'model':>8} {'seconds':>8} {'rows/s':>9} {'parent CPU us/row':>18}")
    for model, r in runs.items():
        print(
            f"  {model:>8} {r['seconds']:>8.2f} {n / r['seconds']:>9,.0f} "
            f"{r['cpu'] / n * 1e6:>18.1f}"
        )
    verdicts = []
    base = runs["plain"]["cpu"]
    for model in ("named", "epochs"):
        ratio = runs[model]["cpu"] / base
        ok = ratio <= 1.10
        print(f"  -> {model}: parent CPU x{ratio:.2f} of one score (target <= 1.10)  "
              f"{'met' if ok else 'NOT MET'}")  # fmt: skip
        verdicts.append((f"model: {model} parent CPU within 10%", ok))
    return verdicts


# ---------------------------------------------------------------- first call in a fresh process


def fresh_child(spins: int) -> None:
    """In a new process: time the first and second calls, and a serial loop; print JSON."""
    timings: dict[str, float] = {}
    trivial = workloads.trivial_examples(10)
    cpu = workloads.cpu_examples(120, spins)
    timings["first cold"] = _timed(
        lambda: check_result(procval_run(workloads.trivial_program, trivial, 2), 10)
    )
    timings["second cold"] = _timed(
        lambda: check_result(procval_run(workloads.trivial_program, trivial, 2), 10)
    )
    timings["serial cpu"] = _timed(lambda: check(serial(workloads.cpu_task, cpu), 120))
    timings["procval cpu"] = _timed(
        lambda: check_result(procval_run(workloads.cpu_program, cpu, 2), 120)
    )
    print(json.dumps(timings))


def fresh_cpu_child(spins: int) -> None:
    """In a new process: time the CPU case as the process's first call; print JSON."""
    cpu = workloads.cpu_examples(120, spins)
    first = _timed(lambda: check_result(procval_run(workloads.cpu_program, cpu, 2), 120))
    print(json.dumps({"procval cpu first": first}))


def fresh_case(repeat: int) -> None:
    """The first ``evaluate`` in a new Python process: no fork server yet, nothing warm.

    Each repetition starts new processes (imports not timed): one times a 10-example call
    twice (first call, then a later one) and then the CPU case after a serial loop; another
    times the CPU case as its first call.
    """
    spins = workloads.calibrate(0.02)
    runs = []
    for _ in range(repeat):
        timings = {}
        for flag in ("--fresh-child", "--fresh-cpu-child"):
            out = subprocess.run(
                [sys.executable, __file__, flag, str(spins)],
                check=True,
                capture_output=True,
                text=True,
            )
            timings.update(json.loads(out.stdout.strip().splitlines()[-1]))
        runs.append(timings)
    print(f"\nFirst call in a fresh process ({repeat} processes each; no target)")
    print(f"  {'measurement':<52} {'median s':>9} {'min s':>8}")
    labels = {
        "first cold": "10 trivial examples, 2 workers: first call",
        "second cold": "10 trivial examples, 2 workers: second call",
        "procval cpu first": "CPU-bound 120 x 20 ms, 2 workers: first call",
        "serial cpu": "CPU-bound 120 x 20 ms, serial loop",
        "procval cpu": "CPU-bound 120 x 20 ms, 2 workers: third call",
    }
    for key, label in labels.items():
        values = [r[key] for r in runs]
        print(f"  {label:<52} {statistics.median(values):>9.3f} {min(values):>8.3f}")
    serial_s = statistics.median(r["serial cpu"] for r in runs)
    for key in ("procval cpu first", "procval cpu"):
        ratio = serial_s / statistics.median(r[key] for r in runs)
        print(f"  -> serial loop / {labels[key]}: {ratio:.2f}x")


# ---------------------------------------------------------------- scaling table


def scaling(quick: bool, repeat: int) -> None:
    """examples/s of procval against workers and threads, for CPU- and I/O-bound programs.

    Each setting runs ``n`` and ``2n`` examples: ``n / (t(2n) - t(n))`` is the steady rate, with
    the fixed cost of starting and stopping workers cancelled out; ``2n / t(2n)`` is the rate a
    call of that size sees, start-up included.
    """
    spins = workloads.calibrate(0.02)
    serial_rate = 1 / min(_timed(lambda: workloads.cpu_program({"spins": spins})) for _ in range(5))
    print(f"\nScaling (procval, examples/s; best of {repeat})")
    print(f"  serial loop, CPU-bound 20 ms: {serial_rate:,.1f} examples/s")
    print(
        f"  {'program':<24} {'workers':>7} {'threads':>7} {'n':>6} "
        f"{'t(n) s':>7} {'t(2n) s':>7} {'steady/s':>9} {'call/s':>8}"
    )
    settings = [("cpu", w, t) for w in (1, 2) for t in (1, 4)]
    settings += [("io", w, t) for w in (1, 2) for t in (1, 8, 32, 64, 128)]
    for kind, w, t in settings:
        if kind == "cpu":
            n = 30 if quick else 60
            make = lambda k: workloads.cpu_examples(k, spins)  # noqa: E731
            program, label = workloads.cpu_program, "CPU-bound, 20 ms"
        else:
            n = min(320 if quick else 1280, 20 * w * t)  # about one second of sleeping
            make = lambda k: workloads.io_examples(k, 0.05)  # noqa: E731
            program, label = workloads.io_program, "I/O-bound, 50 ms sleep"
        one, two = make(n), make(2 * n)
        ones, twos = [], []
        for _ in range(repeat):  # interleaved, so a burst of load hits both sizes alike
            ones.append(_timed(lambda: check_result(procval_run(program, one, w, t), n)))  # noqa: B023
            twos.append(_timed(lambda: check_result(procval_run(program, two, w, t), 2 * n)))  # noqa: B023
        t1, t2 = min(ones), min(twos)  # the least disturbed run: others share this machine
        steady = n / (t2 - t1) if t2 > t1 else float("inf")
        print(
            f"  {label:<24} {w:>7} {t:>7} {n:>6} {t1:>7.2f} {t2:>7.2f} "
            f"{steady:>9,.0f} {2 * n / t2:>8,.0f}"
        )


def _timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------- main


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=None, help="repetitions (default 3)")
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 repetition")
    parser.add_argument(
        "--case",
        default="cpu,io,llm,trivial,cold,memory",
        help="comma-separated subset of: cpu, io, llm, trivial, cold, memory, model, fresh "
        "(default: all but fresh)",
    )
    parser.add_argument("--scaling", action="store_true", help="print the scaling table only")
    parser.add_argument("--json", metavar="PATH", help="also write the timings as JSON")
    parser.add_argument("--rss-child", nargs=2, metavar=("N", "STORE"), help=argparse.SUPPRESS)
    parser.add_argument("--fresh-child", type=int, metavar="SPINS", help=argparse.SUPPRESS)
    parser.add_argument("--fresh-cpu-child", type=int, metavar="SPINS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.rss_child:
        rss_child(int(args.rss_child[0]), args.rss_child[1])
        return 0
    if args.fresh_child is not None:
        fresh_child(args.fresh_child)
        return 0
    if args.fresh_cpu_child is not None:
        fresh_cpu_child(args.fresh_cpu_child)
        return 0

    print(f"machine: {machine()}")
    print(f"load average at start: {load()}")
    if args.scaling:
        warm_up()
        scaling(args.quick, args.repeat or (1 if args.quick else 3))
        print(f"\nload average at end: {load()}")
        return 0

    repeat = args.repeat or (1 if args.quick else 3)
    q = args.quick
    wanted = [c.strip() for c in args.case.split(",") if c.strip()]
    unknown = set(wanted) - {"cpu", "io", "llm", "trivial", "cold", "memory", "model", "fresh"}
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}")
    print(f"repetitions: {repeat} (medians shown){'; quick mode' if q else ''}")

    warm_up()
    verdicts: list[tuple[str, bool]] = []
    report: dict[str, Any] = {"machine": machine(), "repeat": repeat, "quick": q, "cases": {}}
    for name in wanted:
        if name in ("memory", "model", "fresh"):
            continue
        if name == "cpu":
            case = cpu_case(24 if q else 120, workloads.calibrate(0.02))
        elif name == "io":
            case = io_case(240 if q else 1200, 0.05)
        elif name == "llm":
            case = llm_case(128 if q else 640, 0.2)
        elif name == "trivial":
            case = trivial_case(2000 if q else 20_000)
        else:
            case = cold_case(10)
        measure(case, repeat)
        verdicts += print_case(case, q)
        report["cases"][name] = {c.label: c.times for c in case.contenders}
    if "fresh" in wanted:
        fresh_case(repeat)
    if "memory" in wanted:
        verdicts += memory_case([3_000, 30_000] if q else [30_000, 300_000])
    if "model" in wanted:
        verdicts += model_case(30_000 if q else 300_000)

    print(f"\nload average at end: {load()}")
    if verdicts:
        met = sum(ok for _, ok in verdicts)
        print(f"targets met: {met}/{len(verdicts)}")
        for text, ok in verdicts:
            if not ok:
                print(f"  not met: {text}")
    if args.json:
        report["verdicts"] = verdicts
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
