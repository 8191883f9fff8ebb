"""Resuming a big streamed run: the parent's peak memory and the seconds before new work.

Usage::

    python benchmarks/resume.py                          # 1,000,000 examples, 900,000 stored
    python benchmarks/resume.py --base /work/wt/base     # and a base checkout, alternating
    python benchmarks/resume.py --quick                  # 100,000 / 90,000: a smoke run

The stored run is built once per store format and cached under the system's temporary folder
(``procval-bench-resume-N-vB-F.db``, ``F`` a hash of the building checkout's
``procval/store/schema.py``): ``N`` rows written through that checkout's own writer
(:class:`procval.store.writer.StoreSink`, one transaction per 2,000 rows, as the scheduler
commits its shards), for the first ``N`` examples of :func:`workloads.streamed_examples`, with
the config, program and metric the resume uses, and the session marked ``stopped``, as a run
stopped by Ctrl-C leaves it. Each measurement resumes a fresh copy of it in a new process,
``evaluate(first_touch, streamed_examples(TOTAL), metric, store=copy, workers=2)``, and reads:

- the parent's peak RSS (``VmHWM``, which a fresh process starts at its own size: see
  ``benchmarks/run.py``'s ``peak_rss``), and its RSS after imports;
- the seconds from the call to the first new example reaching a worker's program (each worker
  writes the time of its first call to a file; the earliest counts), worker start included;
- the parent's CPU seconds from the call until it reads the first new example from the dataset
  (the generator notes it): the work done before new work, which load from elsewhere does not
  inflate as it does the wall-clock seconds;
- the seconds to the end of the run, and that exactly the missing examples ran.

With ``--base``, every repetition runs the base checkout and then this one, so that load from
elsewhere hits both alike, each on the store its own writer built (a store's format, its
indexes and running totals, is part of what is measured); the ``uptime`` load is printed at the
start and the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MB = 1024 * 1024
TARGET_MB = 100.0
TARGET_SECONDS = 3.0
BUILD_VERSION = 2  # bump when the built store would differ: the cache is keyed on it (2: totals)
_touched = False


def first_touch(example: dict[str, Any]) -> int:
    """``workloads.trivial_program``, writing the time of each worker's first call to a file."""
    global _touched
    if not _touched:
        _touched = True
        path = os.environ.get("PROCVAL_BENCH_FIRST")
        if path:
            with open(path, "a", encoding="ascii") as f:
                f.write(f"{time.time()!r}\n")
    return example["id"] * 2


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------- building the stored run


def cached_store(done: int, checkout: str = ROOT) -> str:
    """The stored run of ``done`` examples as ``checkout`` writes it, built (in a subprocess)."""
    with open(os.path.join(checkout, "procval", "store", "schema.py"), "rb") as f:
        schema = hashlib.sha256(f.read()).hexdigest()[:8]
    name = f"procval-bench-resume-{done}-v{BUILD_VERSION}-{schema}.db"
    path = os.path.join(tempfile.gettempdir(), name)
    if not os.path.exists(path):
        print(f"building the stored run of {done:,} examples in {path} ...", flush=True)
        start = time.perf_counter()
        partial = path + ".partial"
        for suffix in ("", "-wal", "-shm", ".lock"):
            if os.path.exists(partial + suffix):
                os.unlink(partial + suffix)
        subprocess.run(
            [sys.executable, __file__, "--build-child", str(done), partial],
            check=True,
            env=child_env(checkout),
        )
        os.replace(partial, path)
        print(f"  built in {time.perf_counter() - start:.1f} s", flush=True)
    return path


def build_child(done: int, path: str) -> None:
    """In a fresh process: write ``done`` rows to ``path`` as a stopped run would leave them."""
    import socket

    import resume  # this file by its module name, as the measured runs name first_touch
    import workloads

    from procval.config import Config
    from procval.results import Row
    from procval.run.scoring import metric_of
    from procval.run.snapshot import take_snapshot
    from procval.store.writer import StoreSink

    snapshot = take_snapshot(Config(), resume.first_touch, metric_of(workloads.metric))
    sink = StoreSink(path, fresh=False, configs=["default"], run={"workers": 2, "threads": 1})
    sink.begin(snapshot)
    pid, node, fingerprint = os.getpid(), socket.gethostname(), snapshot.fingerprint
    shard: list[Row] = []
    for index, example in enumerate(workloads.streamed_examples(done)):
        row = Row(index, example["id"], example, example["id"] * 2, 1.0, None, 1, 1e-5, pid,
                  "default", fingerprint, node)  # fmt: skip
        shard.append(row)
        if len(shard) == 2_000:
            sink.add("default", shard)
            shard = []
    sink.add("default", shard)
    sink.close(completed=False)  # "stopped", as Ctrl-C leaves a session


# ---------------------------------------------------------------- one measurement


def child_env(checkout: str) -> dict[str, str]:
    """The environment of a measured process: ``checkout``'s procval, this folder's modules."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([checkout, HERE])
    return env


def measure(checkout: str, stored: str, total: int, done: int) -> dict[str, Any]:
    """Resume a copy of ``stored`` with ``checkout``'s procval in a new process."""
    with tempfile.TemporaryDirectory(prefix="procval-bench-resume-") as tmp:
        copy = os.path.join(tmp, "run.db")
        shutil.copyfile(stored, copy)
        first = os.path.join(tmp, "first.txt")
        env = child_env(checkout)
        env["PROCVAL_BENCH_FIRST"] = first
        out = subprocess.run(
            [sys.executable, __file__, "--resume-child", str(total), str(done), copy],
            check=True,
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        found = json.loads(out.stdout.strip().splitlines()[-1])
        with open(first, encoding="ascii") as f:
            found["first_new"] = min(float(line) for line in f if line.strip()) - found["called"]
    if (found["found"], found["added"]) != (done, total - done) or found["procval"] != checkout:
        raise SystemExit(f"the resume did not run exactly the missing examples: {found}")
    return found


def resume_child(total: int, done: int, path: str) -> None:
    """In a fresh process: resume the run in ``path`` to ``total`` examples; print JSON."""
    import resume
    import workloads

    import procval

    after_imports = peak_rss()
    seen: dict[str, float] = {}

    def noted(examples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for example in examples:
            if example["id"] == done and not seen:  # the first example not in the store
                seen["cpu"] = time.process_time() - cpu
            yield example

    called, cpu = time.time(), time.process_time()
    start = time.perf_counter()
    result = procval.evaluate(
        resume.first_touch,
        noted(workloads.streamed_examples(total)),
        workloads.metric,
        store=path,
        workers=2,
        progress=False,
    )
    seconds = time.perf_counter() - start
    record = {
        "procval": os.path.dirname(os.path.dirname(os.path.abspath(procval.__file__))),
        "after_imports": after_imports,
        "peak": peak_rss(),
        "called": called,
        "seconds": seconds,
        "cpu_to_new": seen["cpu"],
        "found": result.found,
        "added": result.added,
    }
    print(json.dumps(record))


def peak_rss() -> int:
    """This process's peak resident set size in bytes (``VmHWM``; see ``run.py``)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


# ---------------------------------------------------------------- the report


def report(name: str, runs: list[dict[str, Any]]) -> dict[str, float]:
    """Print one checkout's medians; return them."""
    peak = statistics.median(r["peak"] for r in runs) / MB
    first = statistics.median(r["first_new"] for r in runs)
    total = statistics.median(r["seconds"] for r in runs)
    imports = statistics.median(r["after_imports"] for r in runs) / MB
    cpu = statistics.median(r["cpu_to_new"] for r in runs)
    spread = ", ".join(f"{r['first_new']:.2f}" for r in runs)
    print(
        f"  {name:<8} {imports:>14.1f} {peak:>12.1f} {first:>14.2f} {cpu:>14.2f} "
        f"{total:>9.2f}   ({spread})"
    )
    return {"peak": peak, "first": first, "total": total, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--total", type=int, default=1_000_000)
    parser.add_argument("--done", type=int, default=900_000)
    parser.add_argument("--quick", action="store_true", help="100,000 examples, 90,000 stored")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--base", help="a base checkout to measure too, alternating")
    parser.add_argument("--build-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--resume-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_child:
        return build_child(int(args.build_child[0]), args.build_child[1])
    if args.resume_child:
        total, done, path = args.resume_child
        return resume_child(int(total), int(done), path)
    total, done = (100_000, 90_000) if args.quick else (args.total, args.done)
    checkouts = {"base": os.path.abspath(args.base)} if args.base else {}
    checkouts["this"] = ROOT
    stored = {name: cached_store(done, checkout) for name, checkout in checkouts.items()}
    print(f"load average at start: {load_average()}")
    print(f"resuming {total:,} streamed examples with {done:,} stored, {args.repeat} repetitions")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in checkouts}
    for _ in range(args.repeat):
        for name, checkout in checkouts.items():
            runs[name].append(measure(checkout, stored[name], total, done))
    print(
        f"  {'checkout':<8} {'MB after import':>14} {'peak RSS MB':>12} "
        f"{'s to new work':>14} {'parent CPU s':>14} {'s in all':>9}   (s to new work, each run)"
    )
    medians = {name: report(name, found) for name, found in runs.items()}
    now = medians["this"]
    if "base" in medians:
        base = medians["base"]
        print(
            f"  -> this / base: peak RSS {now['peak'] / base['peak']:.2f}x, "
            f"seconds to new work {now['first'] / base['first']:.2f}x, "
            f"parent CPU seconds to new work {now['cpu'] / base['cpu']:.2f}x"
        )
    for what, value, target, unit in (
        ("peak RSS", now["peak"], TARGET_MB, "MB"),
        ("seconds to new work", now["first"], TARGET_SECONDS, "s"),
    ):
        verdict = "met" if value <= target else "NOT MET"
        print(f"  -> {what}: {value:.2f} {unit} (target <= {target:g} {unit})  {verdict}")
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    main()
