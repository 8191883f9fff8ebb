"""Ray on several nodes: nodes lost, frozen, a resource no node has, a driver killed.

``ray.cluster_utils.Cluster`` runs a head and extra raylets on this machine, each a Ray node of
its own. The module starts one such cluster (a head with one CPU) and each test adds the nodes
it needs and removes them after. Every wait is bounded, and the placement and silence bounds
are set low so the whole module takes about a minute.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

import procval  # noqa: E402
from helpers import ray_programs, toys  # noqa: E402
from procval.backends import _ray_worker  # noqa: E402
from procval.backends._ray_actor import PREFIX  # noqa: E402
from procval.backends.ray import RayBackend  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TESTS = os.path.dirname(os.path.abspath(__file__))
HELPERS = os.path.join(TESTS, "helpers")


@pytest.fixture(scope="module")
def cluster():
    """A head node (1 CPU) this process drives; tests add and remove worker nodes."""
    if ray.is_initialized():  # another module's local cluster: these tests need this one
        ray.shutdown()
    made = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)
    ray.init(
        address=made.address,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    yield made
    ray.shutdown()
    made.shutdown()


@pytest.fixture
def add_node(cluster):
    """Add a node to the cluster (removed after the test, even if frozen meanwhile)."""
    added = []

    def add(**args):
        node = cluster.add_node(**args)
        added.append(node)
        cluster.wait_for_nodes(timeout=60)
        return node

    yield add
    for node in added:
        for proc in node_processes(node):
            with _gone():
                proc.resume()
        with _gone():
            cluster.remove_node(node, allow_graceful=False)


class _gone:
    """Ignore a process that is already gone."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, (psutil.Error, ProcessLookupError))


def node_processes(node) -> list[psutil.Process]:
    """The node's raylet and everything it started (its actors' processes)."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    return [raylet, *raylet.children(recursive=True)]


def node_actors(node) -> list[psutil.Process]:
    found = []
    for proc in node_processes(node)[1:]:
        with _gone():
            if proc.cmdline() and proc.cmdline()[0].startswith("ray::ProcvalWorker"):
                found.append(proc)
    return found


def when(condition, what: str, timeout: float = 60.0) -> None:
    """Wait for ``condition()``; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def in_background(action) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


def once_each(rows, n: int) -> None:
    assert sorted(r.example["q"] for r in rows) == list(range(n))


# ---------------------------------------------------------------- tests


def test_a_resource_no_node_has_fails_that_config_and_the_others_finish(tmp_path, add_node):
    add_node(num_cpus=1)
    store = str(tmp_path / "run.sqlite")
    backend = RayBackend(
        num_cpus=0.5, placement_timeout=3, per_config={"big": {"resources": {"tpu_v9": 1}}}
    )
    with pytest.raises(procval.SetupError) as caught:
        procval.evaluate(
            toys.program,
            toys.dataset(12),
            toys.metric,
            configs=[procval.Config("big"), procval.Config("small")],
            backend=backend,
            workers=4,
            store=store,
            progress=False,
        )
    message = str(caught.value)
    assert "config 'big' could not run" in message and "'tpu_v9'" in message
    assert "The cluster offers: node " in message and "CPU 1" in message
    stored = procval.load(store)
    once_each(stored["small"].rows, 12)
    assert not stored["small"].errors


def test_a_lost_node_never_blocks_the_scheduler_and_its_examples_rerun(add_node, monkeypatch):
    """The node's actors die with it; nothing waits on that node in the scheduler's thread."""
    doomed = add_node(num_cpus=2)
    waits_on_main = []
    real_get = _ray_worker.ray.get

    def spy_get(*args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            waits_on_main.append(args)
        return real_get(*args, **kwargs)

    monkeypatch.setattr(_ray_worker.ray, "get", spy_get)

    def lose_the_node() -> None:
        when(lambda: len(node_actors(doomed)) == 2, "two actors on the node")
        time.sleep(1.5)  # a few examples done there
        for proc in node_processes(doomed):
            with _gone():
                proc.kill()

    killer = in_background(lose_the_node)
    result = procval.evaluate(
        ray_programs.slow_double,
        toys.dataset(30),
        toys.metric,
        backend=RayBackend(num_cpus=1, placement_timeout=5),
        workers=3,
        progress=False,
    )
    killer.join(timeout=5)
    once_each(result.rows, 30)
    assert not result.errors and result.score == 1.0
    assert result.replaced_workers >= 2 and "workers lost and replaced" in result.summary()
    assert not waits_on_main
    # rows name the Ray node that ran them: the lost node and the head, on one host
    assert doomed.node_id in {r.node for r in result.rows}
    assert len({r.node for r in result.rows}) == 2


def test_a_frozen_node_is_a_lost_worker_not_a_timeout(add_node):
    """SIGSTOP of a node: its examples are rerun elsewhere, none is stored as Timeout."""
    frozen = add_node(num_cpus=1)

    def freeze() -> None:
        when(lambda: node_actors(frozen), "an actor on the node")
        time.sleep(1.5)
        for proc in node_processes(frozen):
            with _gone():
                proc.suspend()

    freezer = in_background(freeze)
    result = procval.evaluate(
        ray_programs.slow_double,
        toys.dataset(24),
        toys.metric,
        backend=RayBackend(num_cpus=1, lost_after=3, placement_timeout=6),
        workers=2,
        timeout=2,
        progress=False,
    )
    freezer.join(timeout=5)
    once_each(result.rows, 24)
    assert not result.errors, result.error_types
    assert result.replaced_workers >= 1


def test_a_driver_killed_leaves_no_files_and_resumes(tmp_path, cluster):
    store = str(tmp_path / "run.sqlite")
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), PREFIX + "*")))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])),
    }
    driver = subprocess.Popen(
        [sys.executable, os.path.join(HELPERS, "ray_driver.py"), cluster.address, store, "40"],
        env=env,
    )
    try:

        def some_rows() -> bool:
            assert driver.poll() is None, "the driver ended early"
            try:
                return len(procval.load(store)["default"]) >= 4
            except (procval.StoreError, KeyError):
                return False

        when(some_rows, "rows in the store", timeout=90)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)
    finally:
        if driver.poll() is None:
            driver.kill()
    left = set(glob.glob(os.path.join(tempfile.gettempdir(), PREFIX + "*"))) - before
    result = procval.evaluate(
        ray_programs.slow_double,
        toys.dataset(40),
        toys.metric,
        backend=RayBackend(num_cpus=0.5),
        workers=2,
        store=store,
        progress=False,
    )
    once_each(procval.load(store)["default"].rows, 40)
    assert not result.errors
    # the killed driver's actors leave their files (Ray 2.60 SIGKILLs them: 4 files for 2
    # actors here); the resumed run's actors sweep them at start
    remaining = left & set(glob.glob(os.path.join(tempfile.gettempdir(), PREFIX + "*")))
    assert not remaining, sorted(remaining)
