"""The conformance suite against the Ray backend, plus what only Ray has (nodes, resources).

One local Ray cluster (2 CPUs) is started for the whole session, on first use, and shared by
every test here; the actors find ``helpers`` (and this checkout's procval) through the job's
``PYTHONPATH``. It is always a new cluster (``address="local"``): a cluster registered on the
machine (``ray start``, ``RAY_ADDRESS``) is never joined.
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pytest

ray = pytest.importorskip("ray")

import procval  # noqa: E402
from backend_suite import BackendSuite  # noqa: E402
from helpers import ray_programs, toys  # noqa: E402
from procval import _pickling  # noqa: E402
from procval.backends import WorkerSpec  # noqa: E402
from procval.backends.ray import RayBackend  # noqa: E402
from procval.run.snapshot import take_snapshot  # noqa: E402
from procval.wire import Shard, WorkerOptions, WorkItem  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local cluster for the session (a start costs seconds and ~800 MB)."""
    if ray.is_initialized():  # another test module's cluster: not the one these tests need
        ray.shutdown()
    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)
    ray.init(
        address="local",
        num_cpus=2,
        resources={"procval_test": 2},
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    yield
    ray.shutdown()


def actor_processes() -> list[psutil.Process]:
    """procval's actors in this session's cluster (its raylet is a child of this process)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            # "ray::ProcvalWorker", or "ray::ProcvalWorker.run_shard" while it runs one
            if proc.cmdline()[0].startswith("ray::ProcvalWorker"):
                found.append(proc)
        except (psutil.Error, IndexError):
            pass
    return found


@pytest.fixture
def no_leaked_workers():
    """Ray's own processes stay up for the session; procval's actors must not."""
    yield
    deadline = time.monotonic() + 10
    while actor_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = actor_processes()
    assert not alive, f"actors outlived the run: {[p.pid for p in alive]}"


class TestRay(BackendSuite):
    @property
    def backend(self):
        # half a CPU per actor: the suite asks for up to 3 workers on the 2-CPU cluster
        return RayBackend(num_cpus=0.5)


# ---------------------------------------------------------------- Ray only


def test_backend_by_name_uses_the_connected_cluster():
    result = procval.evaluate(
        ray_programs.where, list(range(6)), toys.any_score, backend="ray", workers=2, progress=False
    )
    here = ray.get_runtime_context().get_node_id()
    assert {r.prediction["node_id"] for r in result.rows} == {here}


def test_rows_carry_the_node_and_the_actor_process(no_leaked_workers):
    backend = RayBackend(num_cpus=0.5)
    results = procval.evaluate(
        ray_programs.where,
        list(range(20)),
        toys.any_score,
        configs=[procval.Config("a"), procval.Config("b")],
        backend=backend,
        workers=2,
        progress=False,
    )
    pids = {}
    for name, result in results.items():
        for row in result.rows:
            # the Ray node, not the host: several nodes may share one host
            assert row.node == row.prediction["node_id"] == ray.get_runtime_context().get_node_id()
            assert row.worker_pid == row.prediction["pid"] != os.getpid()
            pids.setdefault(name, set()).add(row.worker_pid)
        # every actor carries the run's marker, so Ray started a fresh process for it
        assert {r.prediction["run"] for r in result.rows} == {backend._run}
    assert not pids["a"] & pids["b"]


def test_per_config_resources_reach_that_configs_actors():
    backend = RayBackend(num_cpus=0.5, per_config={"big": {"resources": {"procval_test": 1}}})
    results = procval.evaluate(
        ray_programs.assigned_resources,
        list(range(4)),
        toys.any_score,
        configs=[procval.Config("big"), procval.Config("small")],
        backend=backend,
        workers=2,
        progress=False,
    )
    assert {r.prediction.get("procval_test") for r in results["big"].rows} == {1.0}
    assert {r.prediction.get("procval_test") for r in results["small"].rows} == {None}
    assert {r.prediction["CPU"] for r in results["small"].rows} == {0.5}


def test_running_answers_at_once_and_ages_while_the_actor_works():
    backend = RayBackend(num_cpus=0.5)
    spec = WorkerSpec(
        take_snapshot(procval.Config(), toys.hanging_program, toys.metric), WorkerOptions()
    )
    worker = backend.start_worker(spec)
    try:
        worker.submit(_pickling.dumps(Shard([WorkItem(7, "ex7", {"q": 3})], False), what="shard"))
        seen: list[tuple[int, float]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (seen and seen[0][1] > 0.5):
            started = time.perf_counter()
            seen = worker.running()
            assert time.perf_counter() - started < 0.05  # cached: never a round trip
            time.sleep(0.05)
        assert [seq for seq, _ in seen] == [7]
        assert worker.pid and worker.label.startswith(f"pid {worker.pid} on {socket.gethostname()}")
    finally:
        worker.kill()
        backend.shutdown()


@pytest.mark.slow
def test_a_hang_holding_the_gil_still_times_out(no_leaked_workers):
    """The actor cannot answer polls while C code holds its GIL: its examples keep ageing."""
    backend = RayBackend(num_cpus=0.5)
    result = procval.evaluate(
        ray_programs.gil_hang,
        toys.dataset(8),
        toys.metric,
        backend=backend,
        workers=2,
        timeout=2,
        progress=False,
    )
    assert [(r.example["q"], r.error.type) for r in result.errors] == [(3, "Timeout")]
    assert sum(r.score for r in result.rows) == 7
    # the killed actor's slot and fault files were removed from the node at shutdown
    assert not glob.glob(os.path.join(tempfile.gettempdir(), f"procval-ray-{backend._run}-*"))


def test_an_actor_dying_before_it_describes_itself_is_still_explained(no_leaked_workers):
    """Its node is found from Ray's error, and its exit status read there."""
    with pytest.raises(procval.SetupError, match=r"died with exit code 4\)"):
        procval.evaluate(
            toys.program,
            toys.dataset(3),
            toys.metric,
            config=procval.Config("dies", setup=toys.exiting_setup),
            backend=RayBackend(num_cpus=0.5),
            workers=1,
            progress=False,
        )


@pytest.mark.slow
def test_ctrl_c_kills_the_actors(no_leaked_workers):
    """A real SIGINT in the driver, once its actors run: they are killed, the driver lives on."""

    def interrupt() -> None:
        deadline = time.monotonic() + 60
        while len(actor_processes()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        procval.evaluate(
            ray_programs.sleepy,
            list(range(4)),
            toys.any_score,
            backend=RayBackend(num_cpus=0.5),
            workers=2,
            progress=False,
        )


def test_bad_per_config_options_are_refused_before_any_actor_starts():
    with pytest.raises(ValueError, match=r"per_config\['x'\] has unknown options \['gpus'\]"):
        RayBackend(per_config={"x": {"gpus": 1}})
    with pytest.raises(ValueError, match="num_cpus must be >= 0"):
        RayBackend(num_cpus=-1)


def test_import_procval_does_not_import_ray():
    code = "import sys, procval; assert 'ray' not in sys.modules, 'procval imported ray'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_run_with_backend_ray(tmp_path, capsys):
    from procval import cli

    store = str(tmp_path / "run.db")
    task = os.path.join(TESTS, "helpers", "cli_task.py") + ":single"
    status = cli.main(
        ["run", task, "--store", store, "--backend", "ray", "--workers", "2", "--no-progress"]
    )
    assert status == 0, capsys.readouterr().err
    rows = procval.load(store)["default"].rows
    assert len(rows) == 30 and all(r.node for r in rows)
    assert {r.worker_pid for r in rows}.isdisjoint({os.getpid()})


def test_the_suite_starts_its_own_local_cluster_and_workers_import_this_checkout():
    """Never a cluster found on the machine (RAY_ADDRESS, ray start); actors import this procval."""
    assert ray.get_runtime_context().gcs_address  # connected, to the cluster started above
    result = procval.evaluate(
        ray_programs.procval_file, [0], toys.any_score, backend="ray", workers=1, progress=False
    )
    assert result.rows[0].prediction == procval.__file__


def test_a_dead_drivers_slot_files_are_swept_by_the_next_actor(tmp_path):
    """A slot table whose actor process is gone (a driver's kill -9) is removed at next start."""
    from procval.backends._ray_actor import PREFIX
    from procval.worker.slots import SlotTable

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    path = os.path.join(tempfile.gettempdir(), f"{PREFIX}deadbeef0000-0.slots")
    table = SlotTable(path, 1, create=True)
    table.mark_ready(int(dead.stdout))
    table.close()
    open(path + ".fault", "w").close()
    procval.evaluate(
        toys.program,
        toys.dataset(2),
        toys.metric,
        backend=RayBackend(num_cpus=0.5),
        workers=1,
        progress=False,
    )
    assert not os.path.exists(path) and not os.path.exists(path + ".fault")


def test_an_actor_in_a_slow_setup_counts_as_placed():
    """The mark an actor leaves in Ray's internal KV at its first moment (Ray internals)."""
    from procval.backends._ray_actor import was_placed

    backend = RayBackend(num_cpus=0.5)
    config = procval.Config("slow", setup=ray_programs.slow_setup)
    worker = backend.start_worker(
        WorkerSpec(take_snapshot(config, toys.program, toys.metric), WorkerOptions())
    )
    try:
        deadline = time.monotonic() + 30
        while not was_placed(worker._name) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert was_placed(worker._name) and not worker.started  # placed, still in its setup
    finally:
        worker.kill()
        backend.shutdown()
    assert not was_placed(worker._name)  # the run's marks are removed at shutdown


# ---------------------------------------------------------------- start, warmth


def test_actors_start_in_parallel(no_leaked_workers):
    """Every actor of a run is created before any of them starts: none waits for another."""

    class Recording(RayBackend):
        def start_worker(self, spec):
            worker = super().start_worker(spec)
            created.append(time.time())
            return worker

    created: list[float] = []
    result = procval.evaluate(
        ray_programs.setup_time,
        list(range(12)),
        toys.any_score,
        config=procval.Config(setup=ray_programs.timed_setup),
        backend=Recording(num_cpus=0.5),
        workers=3,
        progress=False,
    )
    began = dict(r.prediction for r in result.rows)  # actor pid: when its setup began
    assert len(created) == len(began) == 3  # three actors, each ran examples
    assert max(created) < min(began.values()), (created, sorted(began.values()))


def test_a_workers_pool_keeps_its_actors_across_calls(no_leaked_workers):
    """The same actors serve the same snapshot again; a new snapshot gets new actors."""
    with procval.Workers(workers=2, backend=RayBackend(num_cpus=0.5)) as pool:
        first = pool.evaluate(ray_programs.where, list(range(8)), toys.any_score, progress=False)
        pids = {r.worker_pid for r in first.rows}
        assert sorted(pool.pids()) == sorted(pids) and len(pids) == 2
        again = pool.evaluate(ray_programs.where, list(range(8)), toys.any_score, progress=False)
        assert {r.worker_pid for r in again.rows} == pids
        assert {r.prediction["pid"] for r in again.rows} == pids
        other = pool.evaluate(ray_programs.where_too, list(range(8)), toys.any_score)
        assert not {r.worker_pid for r in other.rows} & pids  # another snapshot: new actors
        assert not set(pool.pids()) & pids
        assert {r.node for r in other.rows} == {ray.get_runtime_context().get_node_id()}


def test_an_actor_no_node_can_place_fails_the_run_naming_the_resource(no_leaked_workers):
    """Ray keeps such an actor pending forever, silently; the run fails after placement_timeout."""
    backend = RayBackend(num_cpus=0.5, resources={"procval_nowhere": 1}, placement_timeout=2)
    with pytest.raises(procval.SetupError) as caught:
        procval.evaluate(
            toys.program, toys.dataset(4), toys.metric, backend=backend, workers=2, progress=False
        )
    message = str(caught.value)
    assert "no live node has 'procval_nowhere'" in message and "placement_timeout" in message
    assert "The cluster offers: node " in message


SLOW_START = """
import os, time
marker = os.environ.get("PROCVAL_TEST_SLOW_START")
if marker:
    try:  # the first process starts at once, every later one takes seconds
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        time.sleep(5)
"""


def test_an_actor_slow_to_start_is_placed_not_given_up(tmp_path, no_leaked_workers):
    """Ray granted its resources; its process takes longer than placement_timeout to start.

    A loaded node does that. Before, such an actor counted as unplaced once another actor of
    its config ran: given up, counted as a start failure, and after three the config failed.
    """
    (tmp_path / "sitecustomize.py").write_text(SLOW_START)
    path = os.pathsep.join(p for p in (str(tmp_path), TESTS, os.environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": path, "PROCVAL_TEST_SLOW_START": str(tmp_path / "first")}
    backend = RayBackend(num_cpus=0.5, placement_timeout=2)
    result = procval.evaluate(
        ray_programs.slow_double,
        toys.dataset(30),
        toys.metric,
        configs=[procval.Config("slow", env=env)],
        backend=backend,
        workers=3,
        progress=False,
    )["slow"]
    assert sorted(r.example["q"] for r in result.rows) == list(range(30))
    assert not result.errors, result.error_types
    assert backend.lost_workers == 0 and result.replaced_workers == 0
    assert len({r.worker_pid for r in result.rows}) > 1  # the slow actors did start and run


def test_rows_the_driver_writes_name_the_actors_node(no_leaked_workers):
    """A Timeout row is written by the scheduler, but names the actor's Ray node, not the host."""
    result = procval.evaluate(
        toys.hanging_program,
        toys.dataset(6),
        toys.metric,
        backend=RayBackend(num_cpus=0.5),
        workers=1,
        timeout=1,
        progress=False,
    )
    [timed_out] = result.errors
    assert timed_out.error.type == "Timeout" and timed_out.example["q"] == 3
    node = ray.get_runtime_context().get_node_id()
    assert {r.node for r in result.rows} == {node} and node != socket.gethostname()


@pytest.mark.dspy
def test_dspy_evaluate_keeps_its_ray_actors_while_the_settings_stay_the_same(no_leaked_workers):
    dspy = pytest.importorskip("dspy")
    from helpers import dspy_toys
    from procval.dspy import Evaluate

    program = dspy.Predict("question -> answer")
    evaluate = Evaluate(
        devset=dspy_toys.devset(),
        metric=dspy_toys.exact_match,
        num_threads=2,
        workers=1,
        backend=RayBackend(num_cpus=0.5),
    )
    with dspy.context(lm=dspy_toys.knowing_lm()):
        runs = [evaluate(program) for _ in range(3)]
    held = evaluate._procval_workers[1]
    held.close()
    assert [run.score for run in runs] == [100.0] * 3
    pids = [{row.worker_pid for row in run.procval.rows} for run in runs]
    # as with loky: the first run's predictions change the program's pickle once
    assert pids[2] == pids[1] and held.pids() == []
    assert {row.node for row in runs[2].procval.rows} == {ray.get_runtime_context().get_node_id()}
