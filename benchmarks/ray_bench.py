"""The Ray backend against loky: 2,000 examples of 5 ms, and the first result, in one run.

Usage::

    python benchmarks/ray_bench.py                       # this checkout, 3 repetitions
    python benchmarks/ray_bench.py --repeat 5 --n 2000 --ms 5
    python benchmarks/ray_bench.py --tree /path/to/base --tree .   # before and after, alternating

One local Ray cluster (2 CPUs) is started first and stays up for the whole run: every number is
"on a running cluster". Each repetition runs, for each checkout given (``--tree``, default this
one), one fresh driver process that connects to that cluster, warms loky's fork server with a
tiny call, and then times, alternating the order from one repetition to the next:

- ``loky`` and ``ray``: one ``procval.evaluate`` of ``n`` examples that sleep ``ms`` each
  (workers=2, threads=1), worker start included, as a user sees it; the first result is the
  time from the call to the first row reaching the caller (``procval.run.observe.on_rows``);
- ``actor floor``, just before the ``ray`` call: how long 2 bare actors with a fresh
  ``runtime_env`` (as procval's actors have) take to answer a call: Ray's share of the start;
- ``warm``: the same call made twice in a ``procval.Workers`` pool of each backend; the second
  call's wall time (the workers are already up).

The example sleeps rather than spins, so that the numbers measure procval's path (scheduling,
pickling, Ray calls) and not the fight for 2 shared cores between the examples and Ray's own
processes. Medians are printed with the ratios and the targets, and the load beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_RATIO = 1.3  # ray's wall time over loky's, 2,000 x 5 ms
TARGET_FIRST = 1.5  # seconds to the first result on a running cluster


def sleeper(example: dict[str, Any]) -> int:
    """The example: ``ms`` milliseconds of waiting."""
    time.sleep(example["ms"] / 1000)
    return example["i"]


def score(example: dict[str, Any], prediction: int) -> bool:
    return prediction == example["i"]


def _timed(call: Any) -> dict[str, float]:
    """Wall time of ``call()`` and the time to its first row."""
    from procval.run.observe import on_rows

    started = time.perf_counter()
    first: list[float] = []

    def seen(config: str, rows: list[Any]) -> None:
        if not first:
            first.append(time.perf_counter() - started)

    with on_rows(seen):
        result = call()
    wall = time.perf_counter() - started
    assert not result.errors and len(result) > 0, result.summary()
    return {"wall": wall, "first": first[0]}


def _bare_actors(ray: Any, n: int) -> float:
    """Seconds for ``n`` bare actors with a fresh ``runtime_env`` (as procval's) to answer."""

    class Bare:
        def ready(self) -> int:
            return os.getpid()

    started = time.perf_counter()
    env = {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "PROCVAL_RAY_RUN": str(time.time_ns())}
    options = {"num_cpus": 1, "runtime_env": {"env_vars": env}}
    actors = [ray.remote(Bare).options(**options).remote() for _ in range(n)]
    ray.get([a.ready.remote() for a in actors], timeout=120)
    seconds = time.perf_counter() - started
    for actor in actors:
        ray.kill(actor)
    return seconds


def child(address: str, n: int, ms: float, order: int, warm: bool) -> None:
    """One driver: connect, warm loky, time loky and ray (in ``order``), print JSON."""
    import ray

    import procval
    from procval.backends.ray import RayBackend

    ray.init(
        address=address,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}},
    )
    data = [{"i": i, "ms": ms} for i in range(n)]
    procval.evaluate(sleeper, data[:4], score, workers=2, progress=False)  # loky's fork server

    def plain(backend: Any) -> Any:
        return procval.evaluate(sleeper, data, score, workers=2, progress=False, backend=backend)

    def pooled(backend: Any) -> dict[str, float]:
        with procval.Workers(workers=2, backend=backend) as pool:
            pool.evaluate(sleeper, data, score, progress=False)
            return _timed(lambda: pool.evaluate(sleeper, data, score, progress=False))

    out: dict[str, Any] = {}
    engines = [("loky", "loky"), ("ray", RayBackend)]
    for name, backend in engines if order == 0 else engines[::-1]:
        make = backend if callable(backend) else lambda b=backend: b
        if name == "ray":  # Ray's part of the start, just before procval's
            out["actor floor"] = {"first": _bare_actors(ray, 2)}
        out[name] = _timed(lambda make=make: plain(make()))
        if warm:
            try:
                out[f"{name} warm"] = pooled(make())
            except Exception as exc:  # a checkout whose Workers cannot use this backend
                out[f"{name} warm"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    ray.shutdown()
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--ms", type=float, default=5.0)
    parser.add_argument("--tree", action="append", help="a procval checkout (repeatable)")
    parser.add_argument("--no-warm", action="store_true", help="skip the Workers pool case")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--order", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.n, args.ms, args.order, not args.no_warm)

    import ray

    trees = [os.path.abspath(t) for t in args.tree or [HERE]]
    started = time.perf_counter()
    context = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"local cluster started in {time.perf_counter() - started:.1f} s; ray {ray.__version__}")
    address = context.address_info["gcs_address"]
    runs: dict[str, list[dict[str, Any]]] = {tree: [] for tree in trees}
    loads = []
    for repeat in range(args.repeat):
        for tree in trees:
            env = {**os.environ, "PYTHONPATH": tree}
            command = [sys.executable, os.path.abspath(__file__), "--child", address]
            command += ["--n", str(args.n), "--ms", str(args.ms), "--order", str(repeat % 2)]
            command += ["--no-warm"] if args.no_warm else []
            loads.append(os.getloadavg()[0])
            out = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=600, cwd=tree
            )
            if out.returncode:
                sys.exit(f"the driver for {tree} failed:\n{out.stderr[-3000:]}")
            runs[tree].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  repeat {repeat + 1}, {tree}: {runs[tree][-1]}", flush=True)
    ray.shutdown()
    print(
        f"\n{args.n} examples x {args.ms:g} ms, workers=2, medians of {args.repeat}; "
        f"1-min load during the run {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores"
    )
    for tree, results in runs.items():
        print(f"\n{tree}")

        def median(case: str, key: str, results: list[dict[str, Any]] = results) -> float:
            values = [r[case][key] for r in results if key in r.get(case, {})]
            return statistics.median(values) if values else float("nan")

        loky, ray_ = median("loky", "wall"), median("ray", "wall")
        first = median("ray", "first")
        print(f"  wall       loky {loky:6.2f} s   ray {ray_:6.2f} s   ray/loky {ray_ / loky:.2f}x"
              f"   (target <= {TARGET_RATIO}x)")  # fmt: skip
        print(f"  first row  loky {median('loky', 'first'):6.2f} s   ray {first:6.2f} s"
              f"                   (target <= {TARGET_FIRST} s)")  # fmt: skip
        floor = median("actor floor", "first")
        print(f"  Ray's floor: 2 bare actors with a fresh runtime_env answer in {floor:.2f} s")
        if not args.no_warm:
            errors = {r["ray warm"]["error"] for r in results if "error" in r.get("ray warm", {})}
            warm_loky, warm_ray = median("loky warm", "wall"), median("ray warm", "wall")
            print(f"  warm call  loky {warm_loky:6.2f} s   ray {warm_ray:6.2f} s   ray/loky "
                  f"{warm_ray / warm_loky:.2f}x   first row ray "
                  f"{median('ray warm', 'first'):.2f} s")  # fmt: skip
            for error in errors:
                print(f"  ray warm failed: {error}")


if __name__ == "__main__":
    main()
