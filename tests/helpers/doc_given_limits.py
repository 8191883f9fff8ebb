"""What docs/rate-limits.md's DSPy block takes as given: a stand-in server limited to 20/s.

`server` is tests/helpers/llm_server.py's server on 127.0.0.1 (429 with Retry-After above 20
requests/s); `check` stops it and asserts that the block's run was never answered 429.
"""

from __future__ import annotations

from typing import Any

import dspy

import procval
from helpers.llm_server import LLMServer

__all__ = ["check", "dspy", "procval", "server"]

server = LLMServer(rate=20, burst=5).start()


def check(namespace: dict[str, Any]) -> None:
    """Every example answered, and the server never had to say 429."""
    counts = server.counts()
    server.stop()
    result = namespace["result"]
    assert result.errors == [] and counts["rate_limited"] == 0, (result.summary(), counts)
    assert result.limits[server.model]["calls"] == counts["answered"]
