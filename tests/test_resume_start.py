"""A resume's workers start while it reads past its stored rows, not before (loky, real processes).

The skip of a big resume takes the parent a second or more; the fork server its workers fork
from is started in the background before it (``LokyBackend.prestart``), and the first worker
once the first new example is read (``procval.run.pools.read_ahead``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import procval
from helpers import env_at_import
from procval.backends import _preload
from procval.backends.loky import LokyBackend

MODULE = "helpers.env_at_import"


def servers(preload: tuple[str, ...]) -> set[int]:
    return {server.pid for key, server in _preload._servers.items() if key[0] == preload}


def test_a_resume_forks_from_a_server_started_before_its_first_new_example(tmp_path: Path):
    store = tmp_path / "run.db"
    run: dict[str, Any] = dict(store=store, workers=1, progress=False)
    procval.evaluate(
        env_at_import.observe, [{"id": i} for i in range(5)], env_at_import.accept, **run
    )
    preload = (MODULE, "fractions")  # a key of its own: no server of it runs yet
    assert not servers(preload)
    seen: dict[str, set[int]] = {}

    backend = LokyBackend(preload=list(preload))

    def examples() -> Iterator[dict[str, int]]:
        yield from ({"id": i} for i in range(4))
        seen["workers"] = {len(backend._workers)}  # while the stored rows are skipped
        yield {"id": 4}
        deadline = time.monotonic() + 60  # the first new example: is the server up (or going)?
        while not servers(preload) and time.monotonic() < deadline:
            time.sleep(0.02)
        seen["servers"] = servers(preload)
        yield from ({"id": i} for i in range(5, 8))

    again = procval.evaluate(
        env_at_import.observe,
        examples(),
        env_at_import.accept,
        backend=backend,
        **run,
    )
    assert (again.found, again.added) == (5, 3)
    assert seen["workers"] == {0}, "a worker started before the stored rows were skipped"
    assert seen["servers"], "no fork server was started before the first new example was read"
    new = [row for row in again.rows if row.example_id >= 5]
    assert {row.prediction["imported_in"] for row in new} == seen["servers"]  # forked from it


class Counting(LokyBackend):
    """The loky backend, counting the workers it starts."""

    started = 0

    def start_worker(self, spec: Any) -> Any:
        self.started += 1
        return super().start_worker(spec)


def test_a_finished_resume_starts_no_worker(tmp_path: Path) -> None:
    store = tmp_path / "run.db"
    run: dict[str, Any] = dict(store=store, workers=2, progress=False)
    data = [{"id": 1}, {"id": 2}]
    procval.evaluate(env_at_import.observe, iter(data), env_at_import.accept, **run)
    backend = Counting()
    again = procval.evaluate(
        env_at_import.observe, iter(data), env_at_import.accept, backend=backend, **run
    )
    assert (again.found, again.added, backend.started) == (2, 0, 0)
