"""The provenance check is live: a backend that lets one process serve two configs is caught."""

from __future__ import annotations

import pytest

import procval
from helpers import toys
from procval.backends.loky import LokyBackend


class SharingBackend(LokyBackend):
    """A broken backend: every config after the first gets the first config's process."""

    def __init__(self) -> None:
        super().__init__()
        self.first = None

    def start_worker(self, spec):
        if self.first is None:
            self.first = super().start_worker(spec)
        return self.first


def test_a_process_serving_two_configs_is_an_isolation_error(no_leaked_workers):
    with pytest.raises(procval.IsolationError, match=r"reports snapshot .* expected"):
        procval.evaluate(
            toys.program,
            toys.dataset(40),
            toys.metric,
            backend=SharingBackend(),
            workers=2,
            configs={
                "a": procval.Config(setup=toys.configure_model("right")),
                "b": procval.Config(setup=toys.configure_model("wrong")),
            },
            progress=False,
        )


def test_every_row_names_its_process_and_snapshot():
    results = procval.evaluate(
        toys.whoami,
        list(range(30)),
        toys.any_score,
        workers=2,
        progress=False,
        configs={"a": procval.Config(), "b": procval.Config(seed=1)},
    )
    for name, result in results.items():
        assert {r.fingerprint for r in result.rows} == {result.fingerprint}
        assert all(r.worker_pid == r.prediction["pid"] for r in result.rows)
        assert all(r.prediction["name"] == name for r in result.rows)
    assert results["a"].fingerprint != results["b"].fingerprint
