"""Measure the Ray backend against loky on the same runs (the numbers in docs/ray.md).

Run from the repository root::

    python tests/helpers/ray_overhead.py            # 2 CPUs, 3 repeats
    python tests/helpers/ray_overhead.py --repeats 5

It prints the local cluster's start time; the time for an actor to be ready, with procval's
per-run marker (a fresh process) and without (Ray may hand it a prestarted one); then, as a
Markdown table, the wall time of the same ``evaluate`` call on loky and on Ray (workers=2) for n
and 2n examples: 2,000 trivial ones, and 200 of a 20 ms CPU-bound program. Wall times include
starting the workers, as a user sees them; the overhead per example is the marginal cost,
``(wall(2n) - wall(n)) / n`` minus the example's own work shared by the 2 workers, so worker
start-up cancels out. The best of the repeats is kept (other work on the machine only adds).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trivial(example: dict[str, Any]) -> int:
    """Next to no work: the run measures the engine's overhead."""
    return example["q"] * 2


def spin(example: dict[str, Any]) -> int:
    """Pure-Python CPU work holding the GIL: ``example["spins"]`` rounds."""
    acc = 0
    for i in range(example["spins"]):
        acc = (acc * 31 + i) % 1_000_003
    return acc


def any_score(example: Any, prediction: Any) -> float:
    return 1.0


def calibrate(seconds: float) -> int:
    """How many ``spin`` rounds take ``seconds`` here (best of 5 probes)."""
    probe, best = 200_000, float("inf")
    for _ in range(5):
        start = time.perf_counter()
        spin({"spins": probe})
        best = min(best, time.perf_counter() - start)
    return max(1, int(probe * seconds / best))


def _best(repeats: int, fn: Any) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, TESTS)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTS, os.environ.get("PYTHONPATH")) if p
    )
    import ray

    import procval
    from helpers import ray_overhead as bench  # by reference, so workers import it
    from procval.backends.ray import RayBackend

    started = time.perf_counter()
    ray.init(
        num_cpus=args.cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}},
    )
    cluster = time.perf_counter() - started

    @ray.remote(num_cpus=0)
    class Probe:
        def ready(self) -> int:
            return os.getpid()

    def actor(marked: bool) -> None:
        env = {"runtime_env": {"env_vars": {"PROCVAL_RAY_RUN": str(time.time_ns())}}}
        probe = Probe.options(**(env if marked else {})).remote()
        ray.get(probe.ready.remote())
        ray.kill(probe)

    fresh = _best(args.repeats, lambda: actor(True))
    pooled = _best(args.repeats, lambda: actor(False))

    spins = bench.calibrate(0.020)
    runs = {
        "trivial": (bench.trivial, lambda n: [{"q": i} for i in range(n)], 2000, 0.0),
        "20 ms CPU": (bench.spin, lambda n: [{"spins": spins}] * n, 200, 0.020),
    }
    backends = {"loky": lambda: "loky", "ray": lambda: RayBackend()}
    rows = []
    for name, (program, make, n, work) in runs.items():
        for label, backend in backends.items():

            def run(size: int, program: Any = program, backend: Any = backend) -> None:
                procval.evaluate(
                    program,
                    make(size),
                    bench.any_score,
                    workers=2,
                    progress=False,
                    backend=backend(),
                )

            one = _best(args.repeats, lambda: run(n))
            two = _best(args.repeats, lambda: run(2 * n))
            # marginal cost of an example, beyond its own work shared by 2 workers
            extra = ((two - one) / n - work / 2) * 1e3
            rows.append((name, label, n, one, 2 * n, two, extra))
    ray.shutdown()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"cpus={os.cpu_count()} ray={ray.__version__} load(1 min)={load:.1f}")
    print(f"local cluster start (ray.init, {args.cpus} CPUs): {cluster:.1f} s")
    print(f"actor ready: fresh process (run marker) {fresh:.2f} s, no marker {pooled:.2f} s")
    print("\n| program | backend | wall, n | wall, 2n | overhead per example |")
    print("|---|---|---|---|---|")
    for name, label, n, one, n2, two, extra in rows:
        print(f"| {name} | {label} | {one:.2f} s (n={n}) | {two:.2f} s (n={n2}) | {extra:.3f} ms |")


if __name__ == "__main__":
    main()
