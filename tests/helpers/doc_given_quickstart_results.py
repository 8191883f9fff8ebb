"""What the README's "Comparing configs" block takes as given: `results`, the quickstart's run.

The block runs where ``procval run examples/quickstart.py:task --store runs/quick.db`` ran (its
``after`` marker), so `results` is that store, loaded.
"""

from __future__ import annotations

from typing import Any

import procval

__all__ = ["check", "procval", "results"]

results = procval.load("runs/quick.db")


def check(namespace: dict[str, Any]) -> None:
    """The comparison is the one the README's console transcript shows."""
    c = namespace["c"]
    assert (len(c.wins), len(c.losses), len(c.ties)) == (65, 0, 135)
