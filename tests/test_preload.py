"""Modules preloaded in the fork server: shared by the workers, yet each config sees its own.

A preloaded module is imported once, in a fork server started under the worker's environment
(``procval/backends/_preload.py``). The tests prove the two halves of the isolation promise with
real processes: a module that reads an environment variable at import sees each config's own
value, and what one config's ``setup`` installs in a preloaded module never reaches a worker of
another config. No timings are asserted (``benchmarks/dspy_warm.py`` measures the speed).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import warnings

import pytest

import procval
from helpers import env_at_import
from procval.backends import _preload
from procval.backends.loky import LokyBackend

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork server: Linux only"),
    pytest.mark.usefixtures("no_leaked_workers"),
]

MODULE = "helpers.env_at_import"


def _configs() -> dict[str, procval.Config]:
    return {
        name: procval.Config(
            setup=functools.partial(env_at_import.install, name),
            env={"PROCVAL_TEST_AT_IMPORT": f"value of {name}"},
        )
        for name in ("a", "b")
    }


def _observations(preload: object) -> dict[str, list[dict[str, object]]]:
    results = procval.evaluate(
        env_at_import.observe,
        range(6),
        env_at_import.accept,
        configs=_configs(),
        workers=2,
        backend=LokyBackend(preload=preload),  # type: ignore[arg-type]
    )
    return {name: [row.prediction for row in result.rows] for name, result in results.items()}


@pytest.mark.parametrize("preload", [[MODULE], "auto"])
def test_a_module_preloaded_sees_each_configs_env_and_nothing_of_the_others(preload):
    seen = _observations(preload)
    for name, observations in seen.items():
        assert len(observations) == 6
        for seen_here in observations:
            # imported before the worker existed: by its fork server, not by the worker itself
            assert seen_here["imported_in"] != seen_here["pid"]
            assert seen_here["at_import"] == f"VALUE OF {name.upper()}"
            assert seen_here["installed"] == [name]  # its own setup's mark, no other config's
    servers = {o["imported_in"] for o in seen["a"]}, {o["imported_in"] for o in seen["b"]}
    assert servers[0].isdisjoint(servers[1])  # one server per environment


def test_without_preload_each_worker_imports_the_module_itself():
    for name, observations in _observations([]).items():
        for seen_here in observations:
            assert seen_here["imported_in"] == seen_here["pid"]
            assert seen_here["at_import"] == f"VALUE OF {name.upper()}"
            assert seen_here["installed"] == [name]


def test_a_parent_whose_environment_changed_gets_a_server_preloaded_under_it(monkeypatch):
    config = procval.Config(setup=functools.partial(env_at_import.install, "c"))
    seen = []
    for value in ("first", "second"):
        monkeypatch.setenv("PROCVAL_TEST_AT_IMPORT", value)
        result = procval.evaluate(
            env_at_import.observe,
            range(2),
            env_at_import.accept,
            config=config,
            workers=1,
            backend=LokyBackend(preload=[MODULE]),
        )
        seen.append({row.prediction["at_import"] for row in result.rows})
    assert seen == [{"FIRST"}, {"SECOND"}]


def test_preload_names_are_checked_before_any_worker_starts(monkeypatch):
    with pytest.raises(ValueError, match=r"no_such_module_here.*not an importable module"):
        LokyBackend(preload=["no_such_module_here"])
    monkeypatch.setenv("PROCVAL_PRELOAD", "helpers.env_at_import, no_such_module_here")
    with pytest.raises(ValueError, match="PROCVAL_PRELOAD"):
        LokyBackend()
    monkeypatch.setenv("PROCVAL_PRELOAD", "auto")
    assert _preload.resolve(None) == "auto"
    monkeypatch.setenv("PROCVAL_PRELOAD", f"{MODULE},{MODULE}")
    assert _preload.resolve(None) == (MODULE,)


def test_auto_finds_the_third_party_packages_a_snapshot_refers_to():
    from procval.run.snapshot import take_snapshot

    snapshot = take_snapshot(procval.Config(), env_at_import.observe, env_at_import.accept)
    found = _preload.referenced_packages(snapshot.data)
    assert MODULE in found
    assert not {name.split(".")[0] for name in found} & {"procval", "os", "builtins"}


def test_a_preload_that_starts_a_thread_is_refused_with_a_warning_and_the_run_goes_on():
    def run() -> procval.EvaluationResult:
        backend = LokyBackend(preload=["helpers.starts_a_thread"])  # one backend per run
        return procval.evaluate(
            env_at_import.observe, range(2), env_at_import.accept, workers=1, backend=backend
        )

    with pytest.warns(RuntimeWarning, match="started threads"):
        result = run()
    assert [row.error for row in result.rows] == [None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused once: the next run does not warn again
        run()
    assert os.environ.get("PROCVAL_PRELOAD") is None


def test_dspy_is_preloaded_without_ipython_which_workers_can_still_import():
    pytest.importorskip("dspy")
    pytest.importorskip("IPython")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a preload that failed would warn and fall back
        result = procval.evaluate(
            env_at_import.ipython_seen, range(2), env_at_import.accept, workers=1,
            backend=LokyBackend(preload=["dspy"]),
        )  # fmt: skip
    assert [row.prediction for row in result.rows] == [(False, True)] * 2


def _server_pids(preload: tuple[str, ...]) -> set[int]:
    return {server.pid for key, server in _preload._servers.items() if key[0] == preload}


def _wait_for_server(preload: tuple[str, ...], before: set[int]) -> set[int]:
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        started = _server_pids(preload) - before
        if started:
            return started
        time.sleep(0.05)
    raise AssertionError(f"no server preloading {preload} started within 60 s")


def test_a_prestarted_server_is_the_one_the_run_forks_from(monkeypatch):
    monkeypatch.setenv("PROCVAL_TEST_AT_IMPORT", "prestarted")
    preload = (MODULE, "json")  # a key of its own: no other test's server
    before = _server_pids(preload)
    _preload.prestart({}, preload)
    started = _wait_for_server(preload, before)
    result = procval.evaluate(
        env_at_import.observe,
        range(2),
        env_at_import.accept,
        config=procval.Config(setup=functools.partial(env_at_import.install, "p")),
        workers=1,
        backend=LokyBackend(preload=list(preload)),
    )
    assert {row.prediction["imported_in"] for row in result.rows} == started
    assert {row.prediction["at_import"] for row in result.rows} == {"PRESTARTED"}


def test_a_run_after_the_environment_changed_does_not_use_the_prestarted_server(monkeypatch):
    monkeypatch.setenv("PROCVAL_TEST_AT_IMPORT", "at prestart")
    preload = (MODULE, "csv")
    before = _server_pids(preload)
    _preload.prestart({}, preload)
    prestarted = _wait_for_server(preload, before)
    monkeypatch.setenv("PROCVAL_TEST_AT_IMPORT", "at the call")
    result = procval.evaluate(
        env_at_import.observe,
        range(2),
        env_at_import.accept,
        workers=1,
        backend=LokyBackend(preload=list(preload)),
    )
    assert {row.prediction["at_import"] for row in result.rows} == {"AT THE CALL"}
    assert not {row.prediction["imported_in"] for row in result.rows} & prestarted


def test_prestart_starts_nothing_without_a_preload():
    servers = dict(_preload._servers)
    _preload.prestart({}, ())
    _preload.prestart({}, "auto")
    assert _preload._servers == servers


def test_a_dspy_snapshot_preloads_dspy_by_default():
    pytest.importorskip("dspy")
    import procval.dspy
    from procval.run.snapshot import take_snapshot

    snapshot = take_snapshot(procval.dspy.snapshot(name="d"), env_at_import.observe)
    assert _preload.integration_preload(snapshot.data) == _preload.DSPY
    plain = take_snapshot(procval.Config(), env_at_import.observe, env_at_import.accept)
    assert _preload.integration_preload(plain.data) == ()


_STARTS_ON_MAKE = """
import time
import procval.dspy
from procval.backends import _preload
assert not _preload._servers, "a server before Evaluate was made"
procval.dspy.Evaluate(devset=[], metric=lambda example, prediction: True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    pids = [s.pid for key, s in _preload._servers.items() if key[0] == _preload.DSPY]
    if pids:
        print("started", pids[0])
        break
    time.sleep(0.05)
else:
    raise SystemExit("no DSPy-preloading server within 60 s of Evaluate(...)")
"""


def test_dspy_evaluate_starts_its_preloading_server_when_it_is_made():
    pytest.importorskip("dspy")
    # a fresh process: this one may run a DSPy-preloading server already (earlier tests)
    out = subprocess.run(
        [sys.executable, "-c", _STARTS_ON_MAKE], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("started ")


_PARENT_SIDE = ("procval.run.api", "procval.run.scheduler", "procval.run.pool", "procval.report")
_WORKER_IMPORTS = f"""
import sys
import procval.integrations.dspy
print(sorted(m for m in sys.modules if m.startswith({_PARENT_SIDE!r})))
"""


def test_the_dspy_integration_imports_nothing_of_a_runs_parent_side():
    """A DSPy worker (and a DSPy-preloading server) imports the integration to unpickle its
    snapshot: the scheduler, the pool and the reports it would load with it are the caller's."""
    pytest.importorskip("dspy")
    out = subprocess.run(
        [sys.executable, "-c", _WORKER_IMPORTS], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_dspy_worker_starts_with_dspys_first_call_work_done_in_its_server():
    pytest.importorskip("dspy")
    import procval.dspy

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a preload that failed would warn and fall back
        result = procval.evaluate(
            env_at_import.dspy_first_call_done, range(2), env_at_import.accept,
            config=procval.dspy.snapshot(name="warm"), workers=1,
        )  # fmt: skip
    assert [row.prediction for row in result.rows] == [(True, True)] * 2


_WARM_OFFLINE = """
import procval.integrations._dspy_warm
from dspy.clients import model_metadata
print(model_metadata._data is None)
"""


def test_the_dspy_warm_up_fetches_nothing_unless_dspy_reads_its_bundled_table():
    pytest.importorskip("dspy")
    env = {k: v for k, v in os.environ.items() if k != "LITELLM_LOCAL_MODEL_COST_MAP"}
    out = subprocess.run(
        [sys.executable, "-c", _WARM_OFFLINE], capture_output=True, text=True, timeout=180, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"  # left to the workers: DSPy would fetch it first


def test_a_server_still_starting_does_not_hold_up_another_environments_server(tmp_path):
    import threading

    release = tmp_path / "release"
    slow = ("helpers.blocks_at_import",)
    slow_env = {"PROCVAL_TEST_RELEASE": str(release)}
    starting = threading.Thread(target=_preload.server_for, args=(slow_env, slow), daemon=True)
    starting.start()  # its server imports until `release` exists
    try:
        got: list[object] = []
        other = threading.Thread(
            target=lambda: got.append(
                _preload.server_for({"PROCVAL_TEST_AT_IMPORT": "x"}, (MODULE,))
            )
        )
        other.start()
        other.join(timeout=60)
        assert got and got[0] is not None, "the other server waited for the one still starting"
        assert starting.is_alive()  # (still importing)
    finally:
        release.touch()
        starting.join(timeout=60)
    assert not starting.is_alive()


@pytest.mark.parametrize("preload", [[], [MODULE]])
def test_a_forked_worker_collects_garbage_though_its_server_does_not(preload):
    from procval.backends import _forkserver

    if not _forkserver.available():
        pytest.skip("workers fork from a server on Linux only")
    result = procval.evaluate(
        env_at_import.collector_on, range(2), env_at_import.accept, workers=1,
        backend=LokyBackend(preload=preload),
    )  # fmt: skip
    assert [row.prediction for row in result.rows] == [(True, True)] * 2
