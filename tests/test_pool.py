"""``procval.Workers``: warm workers across calls, one snapshot per process for life.

Real processes: the pids on the rows show which process served which call; kills and signals
are real. Every wait is bounded (``helpers.processes``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import textwrap
import time

import psutil
import pytest

import procval
from helpers import env_at_import, toys
from helpers.processes import assert_gone, is_tracker, start, stop
from procval.run.snapshot import take_snapshot

pytestmark = pytest.mark.usefixtures("no_leaked_workers")
OBSERVE, ACCEPT = env_at_import.observe, env_at_import.accept  # a program, a metric scoring 1


def pids(result: procval.EvaluationResult) -> set[int]:
    return {row.worker_pid for row in result.rows}


def processes(numbers: set[int] | list[int]) -> list[psutil.Process]:
    """The processes (those that exited already are left out: they are gone)."""
    found = []
    for pid in numbers:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.append(psutil.Process(pid))
    return found


def test_the_same_workers_serve_every_call_with_the_same_snapshot():
    with procval.Workers(workers=2) as pool:
        first = pool.evaluate(OBSERVE, range(20), ACCEPT)
        second = pool.evaluate(OBSERVE, range(20), ACCEPT)
        assert first.score == second.score == 1.0
        assert pids(first) == pids(second)
        assert len(pids(first)) == 2
        assert set(pool.pids()) == pids(first)  # idle, kept for the next call
        assert first.fingerprint == second.fingerprint


def test_a_new_snapshot_gets_new_processes():
    with procval.Workers(workers=2) as pool:
        first = pool.evaluate(OBSERVE, range(20), ACCEPT)
        old = processes(pids(first))
        other = pool.evaluate(toys.whoami, range(20), ACCEPT)
        assert pids(first).isdisjoint(pids(other))
        assert first.fingerprint != other.fingerprint
        assert_gone(old)  # made room for the new snapshot's workers: the pool holds 2
        again = pool.evaluate(toys.whoami, range(20), ACCEPT, retries=1)
        assert pids(again).isdisjoint(pids(other))  # other options, other processes


def test_a_snapshot_of_the_same_content_in_other_bytes_is_served_by_the_same_workers():
    label = "".join(["lab", "el"])
    shared = env_at_import.Labelled(label, label)  # one string object, pickled once
    apart = env_at_import.Labelled(label, "".join(["la", "bel"]))  # two equal ones
    assert (
        take_snapshot(procval.Config(), shared).data != take_snapshot(procval.Config(), apart).data
    )
    with procval.Workers(workers=2) as pool:
        first = pool.evaluate(shared, range(10), ACCEPT)
        second = pool.evaluate(apart, range(10), ACCEPT)
        changed = pool.evaluate(env_at_import.Labelled(label, "other"), range(10), ACCEPT)
    assert pids(second) == pids(first) and second.fingerprint == first.fingerprint
    assert pids(changed).isdisjoint(pids(first))


def test_configs_keep_their_own_processes_and_setup_runs_once_per_process():
    configs = {name: procval.Config(setup=env_at_import.install_config_name) for name in "ab"}
    with procval.Workers(configs=configs, workers=2) as pool:
        calls = [pool.evaluate(OBSERVE, range(8), ACCEPT)]
        calls.append(pool.evaluate(OBSERVE, range(8), ACCEPT))
    served = {name: pids(calls[0][name]) | pids(calls[1][name]) for name in configs}
    for name in configs:
        assert pids(calls[0][name]) & pids(calls[1][name])  # reused (a config that finished
        # first may lend its slot to the other: how many each gets varies with timing)
        for call in calls:
            # its own setup's mark, once: a reused worker did not run setup again
            assert {tuple(row.prediction["installed"]) for row in call[name].rows} == {(name,)}
    assert served["a"].isdisjoint(served["b"])


def test_close_and_restart_end_the_workers():
    pool = procval.Workers(workers=2)
    first = pids(pool.evaluate(OBSERVE, range(10), ACCEPT))
    running = processes(first)
    assert len(running) == 2
    pool.restart()
    assert pool.pids() == []
    assert_gone(running)
    second = pids(pool.evaluate(OBSERVE, range(10), ACCEPT))
    assert first.isdisjoint(second)
    running = processes(second)
    assert len(running) == 2
    pool.close()
    pool.close()  # idempotent
    assert_gone(running)
    with pytest.raises(RuntimeError, match="closed"):
        pool.evaluate(OBSERVE, range(2), ACCEPT)


def test_a_forgotten_pool_ends_its_workers_when_collected():
    pool = procval.Workers(workers=1)
    served = processes(pids(pool.evaluate(OBSERVE, range(4), ACCEPT)))
    del pool
    gc.collect()
    assert_gone(served)


def test_options_fixed_on_the_pool_are_refused_per_call():
    with procval.Workers(workers=1) as pool, pytest.raises(TypeError, match="set once"):
        pool.evaluate(OBSERVE, range(2), ACCEPT, threads=4)
    with pytest.raises(ValueError, match="workers must be a positive int"):
        procval.Workers(workers=0)


@pytest.mark.slow
def test_a_crashed_or_killed_worker_is_replaced():
    with procval.Workers(workers=2) as pool:
        crashed = pool.evaluate(toys.crashy_program, toys.dataset(16), toys.metric)
        errors = {row.example_id: row.error.type for row in crashed.rows if row.error}
        assert errors == {"ex5": "WorkerCrashed", "ex11": "WorkerCrashed"}
        assert len(crashed.rows) == 16 and crashed.replaced_workers >= 2
        first = pids(pool.evaluate(OBSERVE, range(10), ACCEPT))
        victim = min(first)
        os.kill(victim, signal.SIGKILL)  # an idle worker dies between calls
        assert_gone(processes({victim}))
        after = pool.evaluate(OBSERVE, range(10), ACCEPT)
        assert after.score == 1.0 and after.replaced_workers == 0  # a dead idle worker is not lent
        assert victim not in pids(after)


SCRIPT = textwrap.dedent("""
    import sys, time
    import procval

    def pid(example):
        import os
        return os.getpid()

    def slow(example):
        time.sleep(3600)

    with procval.Workers(workers=2) as pool:
        idle = pool.evaluate(pid, range(8), lambda e, p: 1.0)
        print(*sorted({row.worker_pid for row in idle.rows}), flush=True)
        if sys.argv[1] == "idle":
            time.sleep(3600)  # killed here, between calls
        pool.evaluate(slow, range(8), lambda e, p: 1.0)
""")


@pytest.mark.slow
@pytest.mark.parametrize(("when", "signum"), [("idle", signal.SIGKILL), ("busy", signal.SIGINT)])
def test_the_parent_killed_or_interrupted_leaves_no_worker(tmp_path, when, signum):
    script = tmp_path / "pool.py"
    script.write_text(SCRIPT)
    proc = start([sys.executable, str(script), when])
    try:
        idle = processes({int(pid) for pid in proc.stdout.readline().split()})
        assert len(idle) == 2
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 30
        while when == "busy" and time.monotonic() < deadline:  # the second call's workers
            if len([c for c in parent.children(recursive=True) if c not in idle]) >= 4:
                break
            time.sleep(0.1)
        everyone = [c for c in parent.children(recursive=True) if not is_tracker(c)]
        time.sleep(0.5)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=20)
    finally:
        stop(proc)
    if signum == signal.SIGINT:
        assert "KeyboardInterrupt" in err
    assert_gone(everyone)


@pytest.mark.dspy
def test_dspy_evaluate_keeps_its_workers_while_the_settings_stay_the_same():
    dspy = pytest.importorskip("dspy")
    from helpers import dspy_toys
    from procval.dspy import Evaluate

    program = dspy.Predict("question -> answer")
    evaluate = Evaluate(
        devset=dspy_toys.devset(), metric=dspy_toys.exact_match, num_threads=2, workers=1
    )
    with dspy.context(lm=dspy_toys.knowing_lm()):
        runs = [evaluate(program) for _ in range(3)]
    with dspy.context(lm=dspy_toys.clueless_lm()):
        other = evaluate(program)
    held = evaluate._procval_workers[1]
    held.close()
    assert [run.score for run in runs] == [100.0] * 3 and other.score == 0.0
    # the first run's predictions come back with DSPy's signature class state, which changes
    # the program's pickle once; from then on the same program is the same snapshot
    assert pids(runs[2].procval) == pids(runs[1].procval)
    assert pids(other.procval).isdisjoint(pids(runs[2].procval))  # other settings
    assert held.pids() == []
