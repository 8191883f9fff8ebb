"""What docs/rate-limits.md's DSPy block takes as given: a stand-in server limited to 20/s.

`server` is tests/helpers/llm_server.py's server on 127.0.0.1 (429 with Retry-After above 20
requests/s, a bucket of 5); `check` stops it and asserts what the block promises: every example
answered once, each 429 retried at the call and counted.

Not "never answered 429": the limiter paces when calls leave it (one every 50 ms here), but what
happens after (a worker thread waking, litellm building the request) is delayed unevenly on a
loaded machine. Measured at load 11-12 (the block's run against an unlimited stand-in, arrival
times logged): requests 0.6 ms apart, bunches that a bucket of 5.4 would need at 20/s. A
provider's bucket holds far more than 5, but this one tolerates only 0.2 s of such jitter.
"""

from __future__ import annotations

from typing import Any

import dspy

import procval
from helpers.llm_server import LLMServer

__all__ = ["check", "dspy", "procval", "server"]

server = LLMServer(rate=20, burst=5).start()


def check(namespace: dict[str, Any]) -> None:
    """Every example answered once; any 429 was retried at the call, and counted."""
    counts = server.counts()
    server.stop()
    result = namespace["result"]
    limits = result.limits[server.model]
    assert result.errors == [] and counts["answered"] == 40, (result.summary(), counts)
    assert limits["calls"] == counts["requests"] == 40 + counts["rate_limited"], (limits, counts)
    assert limits["rate_limited"] == counts["rate_limited"]
