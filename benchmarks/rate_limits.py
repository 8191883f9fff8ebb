"""Rate-limited LLM evaluations: dspy.Evaluate beside procval against a 50 requests/s server.

The stand-in server (tests/helpers/llm_server.py, in its own process) admits ``--rate``
requests per second (a bucket of ``--burst``) and answers 429 with ``Retry-After`` above it.
300 DSPy examples of 2 LM calls each, 64 in flight:

- ``dspy.Evaluate``, the LM's default ``num_retries=3``;
- ``procval.dspy.Evaluate(rate_limit=RateLimit(model, requests_per_minute=rate*60))``, 2
  processes of 32 threads, ``num_retries=0`` (procval retries a 429'd call itself);

then the hang case: 60 examples, 2 of which hang at their first call, with an LM timeout for
dspy.Evaluate and an example timeout for procval. Prints wall time against the ideal
(requests / rate), failed examples, the share of requests answered 429, requests made against
those needed. Targets (procval): wall <= 1.1x ideal, 0 failed, <= 1% 429s, requests <= 1.01x
needed; the hang case makes no more requests than dspy.Evaluate.

    PYTHONPATH=$PWD python benchmarks/rate_limits.py [--examples 300] [--rate 50]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
)

import dspy

import procval
import procval.dspy
from helpers import limit_programs as programs
from helpers.llm_server import LLMServer

HANG = "hang-me"


def devset(n: int, hanging: int = 0) -> list[dspy.Example]:
    return [
        dspy.Example(question=f"{HANG} {i}" if i < hanging else f"q{i}").with_inputs("question")
        for i in range(n)
    ]


def measure(label: str, server: Any, run: Any, needed: int, rate: float) -> dict[str, Any]:
    before = server.counts()
    wall = time.perf_counter()
    failed = run()
    wall = time.perf_counter() - wall
    after = server.counts()
    made = after["requests"] - before["requests"]
    limited = after["rate_limited"] - before["rate_limited"]
    ideal = needed / rate
    print(
        f"{label:<42} {wall:6.1f}s  {wall / ideal:5.2f}x ideal  {failed:3d} failed  "
        f"{100 * limited / max(1, made):5.1f}% 429  {made:4d} requests "
        f"({made / needed:4.2f}x the {needed} needed)",
        flush=True,
    )
    return {"wall": wall, "ideal": ideal, "failed": failed, "made": made, "limited": limited}


def failures(result: Any, metric_ok: float = 1.0) -> int:
    return sum(score < metric_ok for _, _, score in result.results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--burst", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=64)
    args = parser.parse_args()
    n, rate, needed = args.examples, args.rate, 2 * args.examples
    server_args = ["--rate", str(rate), "--burst", str(args.burst), "--latency", str(args.latency)]
    print(f"{n} examples x 2 LM calls, {args.threads} in flight, server at {rate:g} requests/s")
    program = programs.make_two_calls()
    metric = programs.answered
    with LLMServer.in_process(*server_args, "--hang", HANG) as server:
        lm = dspy.LM(server.model, api_base=server.api_base, api_key="sk-test", cache=False)
        with dspy.context(lm=lm):
            plain = dspy.Evaluate(
                devset=devset(n), metric=metric, num_threads=args.threads, max_errors=10**6
            )
            measure(
                "dspy.Evaluate (num_retries=3)",
                server,
                lambda: failures(plain(program)),
                needed,
                rate,
            )
        quiet = lm.copy(num_retries=0)
        limit = procval.RateLimit(server.model, requests_per_minute=rate * 60)
        with dspy.context(lm=quiet):
            ours = procval.dspy.Evaluate(
                devset=devset(n),
                metric=metric,
                num_threads=args.threads,
                workers=2,
                rate_limit=limit,
            )
            outcome: dict[str, Any] = {}

            def run_ours() -> int:
                result = ours(program)
                outcome["limits"] = result.procval.limits
                return failures(result)

            numbers = measure(
                "procval (rate_limit, 2 x 32 threads)", server, run_ours, needed, rate
            )
        print(f"  procval counted: {outcome['limits']}")
        hang_needed = 2 * 60
        with dspy.context(lm=lm.copy(timeout=3)):
            plain = dspy.Evaluate(
                devset=devset(60, 2), metric=metric, num_threads=args.threads, max_errors=10**6
            )
            theirs = measure(
                "hang: dspy.Evaluate (LM timeout=3)",
                server,
                lambda: failures(plain(program)),
                hang_needed,
                rate,
            )
        with dspy.context(lm=quiet):
            hung = procval.dspy.Evaluate(
                devset=devset(60, 2),
                metric=metric,
                num_threads=args.threads,
                workers=2,
                timeout=5,
                rate_limit=limit,
            )
            mine = measure(
                "hang: procval (timeout=5)",
                server,
                lambda: failures(hung(program)),
                hang_needed,
                rate,
            )
    targets = [
        ("wall <= 1.1x ideal", numbers["wall"] <= 1.1 * numbers["ideal"]),
        ("0 failed", numbers["failed"] == 0),
        ("<= 1% 429s", numbers["limited"] <= 0.01 * numbers["made"]),
        ("requests <= 1.01x needed", numbers["made"] <= 1.01 * needed),
        ("hang: requests <= dspy.Evaluate's", mine["made"] <= theirs["made"]),
    ]
    for name, met in targets:
        print(f"  {'met ' if met else 'MISSED'}  {name}")


if __name__ == "__main__":
    main()
