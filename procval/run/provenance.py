"""The isolation check: every answer comes from a process that serves its config's snapshot only.

Each worker stamps its answers with its pid, its node (the host, or the Ray node id) and the
fingerprint of the snapshot it installed. The parent checks both halves of the promise on every
answer: the fingerprint is the config's, and no process (keyed on node and pid) has ever answered
for another snapshot.
"""

from __future__ import annotations

from procval.errors import IsolationError

__all__ = ["Provenance"]


class Provenance:
    """The snapshot each process has answered for, in this run."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, int], str] = {}

    def check(self, config: str, expected: str, pid: int, node: str, fingerprint: str) -> None:
        """Accept an answer of ``config`` (snapshot ``expected``) from ``pid`` on ``node``.

        Raises:
            IsolationError: the answer names another snapshot, or the process has answered for
                another snapshot before.
        """
        if fingerprint != expected:
            raise IsolationError(
                f"a worker of config {config!r} (pid {pid}) reports snapshot {fingerprint}, "
                f"expected {expected}"
            )
        first = self._seen.setdefault((node, pid), fingerprint)
        if first != fingerprint:
            raise IsolationError(
                f"process {pid} on {node} produced rows for snapshots {first} and {fingerprint}"
            )
