"""The per-row cost of named scores and epochs: parent CPU per row and store rows/s.

Streams ``--rows`` rows (300,000 by default) of a trivial program into a run store, 2 workers,
in four modes, each run in a fresh process, alternated ``--repeats`` times (the order rotated
each round), and prints the median of each:

- ``single``: a metric returning one bool (the score before named scores and epochs);
- ``named``: a metric returning a mapping of 3 named scores;
- ``epochs``: one score, ``epochs=3`` over a third of the examples (the same number of rows);
- ``base``: ``single`` with the procval of another checkout (``--base PATH``, e.g. a worktree
  at the commit before store format v2), run by this file in a fresh process with that checkout
  first on ``PYTHONPATH`` (its workers import it too).

Parent CPU is the run's own: ``getrusage(RUSAGE_SELF)`` around ``evaluate`` (every thread of
the parent, its store writer included; no worker, no import). Rows/s is rows over the wall time
of ``evaluate``. Target: ``named`` and ``epochs`` within 10% of ``single`` in parent CPU per row.

    PYTHONPATH=$PWD python benchmarks/rows.py [--rows 300000] [--repeats 3] [--base PATH]
    PYTHONPATH=$PWD python benchmarks/rows.py --micro    # the parent's per-row code alone

Measured 2026-12-01 on the shared 2-core machine (load 3-8 during the end-to-end runs, 1.4-2
during the micro ones), before (main at 1665f2f) and after named scores crossed the pipe as
their JSON text (``procval._scores``), 6 alternating rounds of this file at ``--repeats 1``:

    parent CPU us/row (median)  single  named        epochs       rows/s named / single
    before                      16.18   21.19 x1.31  16.77 x1.04  x0.78
    after                       18.43   18.48 x1.00  18.54 x1.01  x0.93
    --micro total us/row        4.68    6.60  x1.41  4.82  x1.03   (before)
                                4.41    4.82  x1.09  4.52  x1.02   (after)

The end-to-end medians swing by +-15% from run to run under that load (the paired ratio of
named over single, run by run, has a median of x1.07 after, x1.35 before); ``--micro`` is the
steady one. In a worker, scoring a 3-score dict and making its wire form went from 4.5-5.3 us
to 2.1 us per row (0.3 us for one score).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("single", "named", "epochs")


def program(example: dict[str, Any]) -> int:
    """Next to no work: the benchmark measures the engine's overhead alone."""
    return example["id"] * 2


def metric(example: dict[str, Any], prediction: Any) -> bool:
    """One score."""
    return prediction is not None


def named_metric(example: dict[str, Any], prediction: Any) -> dict[str, float]:
    """Three named scores, as cheap."""
    return {"em": float(prediction is not None), "f1": 0.5, "len": 1.0}


def examples(n: int) -> Iterator[dict[str, Any]]:
    """``n`` trivial examples from a generator: never all in memory at once."""
    for i in range(n):
        yield {"id": i, "text": f"question number {i}"}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(mode: str, rows: int, path: str) -> None:
    """In a fresh process: one run of ``mode`` into the store at ``path``; print it as JSON."""
    import procval  # the checkout first on PYTHONPATH

    options: dict[str, Any] = {}
    epochs = 3 if mode == "epochs" else 1
    if epochs > 1:
        options["epochs"] = epochs
    chosen = named_metric if mode == "named" else metric
    data = examples(rows // epochs)
    wall, cpu = time.perf_counter(), _cpu()
    result = procval.evaluate(
        program, data, chosen, workers=2, progress=False, store=path, **options
    )
    wall, cpu = time.perf_counter() - wall, _cpu() - cpu
    with sqlite3.connect(path) as db:
        stored = db.execute("SELECT count(*) FROM rows").fetchone()[0]
    assert stored == rows // epochs * epochs, (stored, rows)
    assert result.score == 100.0 or result.score == 1.0, result.score
    print(json.dumps({"wall": wall, "cpu": cpu, "rows": stored, "procval": procval.__file__}))


def once(mode: str, rows: int, base: str | None) -> dict[str, Any]:
    """Run ``mode`` in a fresh process (``base``: this tree's ``single`` with that procval)."""
    tree = base if mode == "base" else os.path.dirname(HERE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory(prefix="procval-rows-") as tmp:
        out = subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--child",
                "single" if mode == "base" else mode,
                str(rows),
                os.path.join(tmp, "run.db"),
            ],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
        )
    if out.returncode:
        raise RuntimeError(f"the {mode} run failed:\n{out.stderr[-3000:]}")
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["procval"].startswith(os.path.realpath(tree)), (found["procval"], tree)
    return found


def micro(shard: int = 1000, repeats: int = 60) -> None:
    """The parent's per-row code alone, in this process: what the end-to-end run's noise hides.

    For each mode, a shard's reply as a worker sends it (each example scored by the worker's
    own code) is unpickled, made rows (``RowMaker.rows``) and encoded as store records
    (``codec.encode``): the per-row work of the parent's scheduler thread and store writer,
    without the pipe, SQLite or the progress bar. The modes alternate, the collector off (a run
    freezes its heap); each step's best of ``repeats``.
    """
    from procval import _pickling
    from procval.run.dataset import Item
    from procval.run.rows import RowMaker
    from procval.store import codec
    from procval.wire import ExampleResult, ShardDone
    from procval.worker.scoring import outcome

    try:  # the worker's wire form of named scores (absent before it was introduced)
        from procval._scores import wire_scores
    except ImportError:
        wire_scores = None

    def reply(mode: str) -> bytes:
        results = []
        for i in range(shard):
            score, scores, extra = outcome(
                named_metric({"id": i}, i) if mode == "named" else metric({"id": i}, i)
            )
            sent: Any = scores if scores is None or wire_scores is None else wire_scores(scores)
            results.append(ExampleResult(i, i * 2, score, None, 1, 1e-5, sent, extra))
        return _pickling.dumps(ShardDone(1, "node", "fp", results), what="results")

    print(f"parent per-row code alone, {shard:,}-row shards, best of {repeats} alternating, "
          f"collector off (load {os.getloadavg()[0]:.2f}):")  # fmt: skip
    print(f"  {'mode':<7} {'unpickle':>9} {'rows':>7} {'encode':>7} {'total us/row':>13}")
    cases = {}
    for mode in MODES:
        epochs = 3 if mode == "epochs" else 1
        items = {
            i: Item(i, i // epochs, {"id": i // epochs, "text": f"question {i}"}, i % epochs)
            for i in range(shard)
        }
        cases[mode] = (epochs, reply(mode), items)
    best = {mode: [math.inf] * 3 for mode in MODES}
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for mode, (epochs, data, items) in cases.items():
                maker = RowMaker("c", "fp", epochs=epochs)
                t0 = time.perf_counter()
                message = _pickling.loads(data)
                t1 = time.perf_counter()
                rows = maker.rows(message.results, dict(items), 1, "node", "fp")
                t2 = time.perf_counter()
                for row in rows:
                    codec.encode(row, "c", 1)
                t3 = time.perf_counter()
                found = (t1 - t0, t2 - t1, t3 - t2)
                best[mode] = [min(b, t) for b, t in zip(best[mode], found, strict=True)]
                del message, rows
    finally:
        gc.enable()
    totals = {}
    for mode in MODES:
        us = [b / shard * 1e6 for b in best[mode]]
        totals[mode] = sum(us)
        print(f"  {mode:<7} {us[0]:>9.2f} {us[1]:>7.2f} {us[2]:>7.2f} {totals[mode]:>13.2f}")
    for mode in MODES[1:]:
        print(f"  {mode} vs single: x{totals[mode] / totals['single']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--base", help="a checkout of procval to run 'single' with, as 'base'")
    parser.add_argument("--micro", action="store_true", help="the parent's per-row code alone")
    parser.add_argument(
        "--child", nargs=3, metavar=("MODE", "ROWS", "STORE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    if args.micro:
        micro()
        return
    modes = list(args.modes) + (["base"] if args.base else [])
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for i in range(args.repeats):
        for mode in modes[i % len(modes) :] + modes[: i % len(modes)]:
            runs[mode].append(once(mode, args.rows, args.base))
            last = runs[mode][-1]
            print(f"  {mode:<7} {last['cpu'] / last['rows'] * 1e6:6.2f} us/row", flush=True)
    n = args.rows
    cpu = {
        mode: statistics.median(r["cpu"] for r in found) / n * 1e6 for mode, found in runs.items()
    }
    rate = {mode: n / statistics.median(r["wall"] for r in found) for mode, found in runs.items()}
    print(
        f"medians of {args.repeats} alternating runs of {n:,} rows (load {os.getloadavg()[0]:.2f}):"
    )
    print(f"  {'mode':<7} {'parent CPU us/row':>18} {'store rows/s':>13}")
    for mode in modes:
        print(f"  {mode:<7} {cpu[mode]:>18.2f} {rate[mode]:>13,.0f}")
    for mode in modes:
        if mode != "single" and "single" in cpu:
            ratio = cpu[mode] / cpu["single"]
            verdict = "" if mode == "base" else ("  met" if ratio <= 1.10 else "  NOT MET")
            speed = rate[mode] / rate["single"]
            print(f"  {mode} vs single: parent CPU x{ratio:.3f}, rows/s x{speed:.3f}{verdict}")


if __name__ == "__main__":
    main()
