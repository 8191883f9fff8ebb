"""The command line end to end: real processes, real signals, real files; every wait bounded."""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import procval
from helpers.processes import (
    assert_gone,
    is_tracker,
    signal_group,
    start_cli,
    stop,
    stored,
    wait_for_rows,
)
from procval import cli
from procval.task import TaskError, load_task

HELPERS = Path(__file__).resolve().parent / "helpers"
TASK = str(HELPERS / "cli_task.py")
FAILING = str(HELPERS / "cli_failing_task.py")


def procval_cli(*args, env=None, cwd=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "procval", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def calls(log: Path) -> collections.Counter:
    return collections.Counter(log.read_text().split()) if log.exists() else collections.Counter()


# loky's resource tracker is a child of the procval process that shares its stderr and outlives
# it for a moment. When the process exits right after killing its workers (Ctrl-C, max_errors),
# loky's cleanup threads can be cut short, and the tracker then warns, after procval's own last
# line, about semaphores it was not told were released:
#   .../loky/backend/resource_tracker.py:444: UserWarning: resource_tracker: There appear to be
#       1 leaked semlock objects to clean up at shutdown: {'/loky-21401-dek25vwt': 1}
#     warnings.warn(
# (seen about once in 70 interrupted runs, with or without load). That is loky's output, not
# procval's: the tests take it out of stderr, and nothing else.
TRACKER_WARNING = re.compile(r"\S*resource_tracker\.py:\d+: UserWarning: resource_tracker: ")


def procval_lines(stderr: str) -> list[str]:
    """The lines of stderr written by procval: without loky's resource tracker warnings."""
    lines, tracker = [], False
    for line in stderr.strip().splitlines():
        if TRACKER_WARNING.match(line):
            tracker = True  # and the indented source line that follows it
        elif not (tracker and line.startswith("  warnings.warn(")):
            tracker = False
            lines.append(line)
    return lines


def test_procval_lines_drop_only_loky_resource_tracker_warnings():
    ours = "procval: interrupted; 56 rows are in the store. Resume with: procval run t.py:x"
    tracker = (
        "/usr/lib/python3/site-packages/loky/backend/resource_tracker.py:444: UserWarning: "
        "resource_tracker: There appear to be 1 leaked semlock objects to clean up at shutdown: "
        "{'/loky-21401-dek25vwt': 1}\n  warnings.warn(\n"
        "/usr/lib/python3/site-packages/loky/backend/resource_tracker.py:468: UserWarning: "
        "resource_tracker: /loky-21401-dek25vwt: FileNotFoundError(2, 'No such file')\n"
        "  warnings.warn('resource_tracker: %s: %r' % (name, e))\n"
    )
    assert procval_lines(f"{ours}\n{tracker}") == [ours]
    other = "elsewhere.py:3: UserWarning: something\n  warnings.warn(\n"
    assert procval_lines(f"{ours}\n{other}") == [ours, *other.strip().splitlines()]


def assert_one_error_line(out, *fragments, status=2):
    assert out.returncode == status, (out.stdout, out.stderr)
    lines = procval_lines(out.stderr)
    assert len(lines) == 1 and lines[0].startswith("procval: error: "), out.stderr
    assert "Traceback" not in out.stderr
    for fragment in fragments:
        assert fragment in lines[0]


# ---------------------------------------------------------------- run, resume, report, export


@pytest.mark.slow
def test_run_resume_report_and_export(tmp_path):
    store, log = tmp_path / "run.db", tmp_path / "calls.log"
    env = {"CLI_TASK_N": "30", "CLI_TASK_LOG": str(log)}

    first = procval_cli("run", f"{TASK}:task", "--store", store, "--limit", "5", env=env)
    assert first.returncode == 0, first.stderr
    assert sum(calls(log).values()) == 10  # 5 examples x 2 configs
    assert "resumed" not in first.stdout  # nothing was there before

    exe = shutil.which("procval")  # the console script, this time
    assert exe is not None
    second = subprocess.run(
        [exe, "run", f"{TASK}:task", "--store", str(store), "--no-progress", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert second.returncode == 0, second.stderr
    counted = calls(log)
    assert len(counted) == 30 and set(counted.values()) == {2}  # nothing ran twice per config
    table = second.stdout
    assert "base" in table and "offset" in table and "0.9000" in table
    assert "errors in 'base': 3 x ValueError" in table
    assert "resumed 'base': 5 examples were already done, 25 ran now" in table
    assert "resumed 'offset': 5 examples were already done, 25 ran now" in table

    report = procval_cli("report", store)
    assert report.returncode == 0, report.stderr
    assert "config 'base': score 0.9000 over 30 examples (3 errors)" in report.stdout
    assert "config 'offset': score 0.0000 over 30 examples (3 errors)" in report.stdout
    assert "3 x ValueError" in report.stdout and "2 session(s)" in report.stdout

    jsonl = procval_cli("export", store, "--format", "jsonl")
    rows = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert len(rows) == 60 and [r["index"] for r in rows[:30]] == list(range(30))
    assert rows[1]["example"] == {"id": 1, "x": 1} and rows[1]["prediction"] == {"double": 2}
    assert rows[7]["error_type"] == "ValueError" and "seven: 7" in rows[7]["error_traceback"]

    out = tmp_path / "rows.csv"
    assert (
        procval_cli("export", store, "--format", "csv", "-o", out, "--config", "offset").stdout
        == ""
    )
    with open(out, newline="") as f:
        table_rows = list(csv.DictReader(f))
    assert len(table_rows) == 30 and {r["config"] for r in table_rows} == {"offset"}
    assert json.loads(table_rows[2]["prediction"]) == {"double": 5}
    assert table_rows[17]["error_message"] == "seven: 17"


@pytest.mark.slow
def test_resuming_a_finished_store_says_that_nothing_was_left_to_run(tmp_path):
    store, log = tmp_path / "run.db", tmp_path / "calls.log"
    env = {"CLI_TASK_N": "12", "CLI_TASK_LOG": str(log)}
    assert procval_cli("run", f"{TASK}:single", "--store", store, env=env).returncode == 0
    again = procval_cli("run", f"{TASK}:single", "--store", store, env=env)
    assert again.returncode == 0, again.stderr
    assert "resumed 'default': 12 examples were already done, 0 ran now" in again.stdout
    assert sum(calls(log).values()) == 12  # the second run ran nothing


@pytest.mark.slow
def test_too_many_errors_exits_3_with_a_resume_hint(tmp_path):
    store = tmp_path / "run.db"
    out = procval_cli("run", f"{TASK}:single", "--store", store, "--max-errors", "0", env={})
    assert_one_error_line(out, "more than --max-errors 0", "Resume with: procval run", status=3)
    assert "max_errors=" not in out.stderr and "store=" not in out.stderr  # flags, not arguments
    assert "default" in out.stdout  # the partial results' table
    hint = out.stderr.split("Resume with: ")[1]
    assert "--max-errors 0" in hint and "--retry-errors" in hint  # rerun the failed ones
    assert stored(store)[0] >= 1


# ---------------------------------------------------------------- errors are one line


@pytest.fixture(scope="module")
def other_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    other = folder / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE things (x)")
    db.close()
    text = folder / "notes.txt"
    text.write_text("not a database\n")
    return folder


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["run", "missing.py:task", "--store", "{dir}/r.db"], ["task file missing.py does not"]),
        (["run", TASK + ":nope", "--store", "{dir}/r.db"], ["no attribute 'nope'", "task, single"]),
        (["run", TASK + ":not_a_task", "--store", "{dir}/r.db"], ["not a procval.Task"]),
        (["run", "no_such_module_xyz:task", "--store", "{dir}/r.db"], ["no task module"]),
        (["run", TASK, "--store", "{dir}/other.db"], ["other.db is not a procval run store"]),
        (["run", TASK + ":task", "--store", "{dir}/r.db", "--config", "zz"], ["no config 'zz'"]),
        (["report", "{dir}/missing.db"], ["no run store at", "missing.db"]),
        (["report", "{dir}/other.db"], ["not a procval run store", "another kind"]),
        (["export", "{dir}/notes.txt"], ["notes.txt is not a procval run store"]),
    ],
    ids=[
        "no-file",
        "no-attribute",
        "not-a-task",
        "no-module",
        "run-other-sqlite",
        "no-config",
        "missing-store",
        "report-other-sqlite",
        "export-text-file",
    ],
)
def test_bad_input_is_one_line_on_stderr(other_files, args, fragments):
    out = procval_cli(*(a.format(dir=other_files) for a in args), timeout=60)
    assert_one_error_line(out, *fragments)
    assert out.stdout == ""
    assert not (other_files / "r.db").exists()


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--workers", "0", "argument --workers: must be an integer of at least 1, got 0"),
        ("--threads", "-1", "argument --threads: must be an integer of at least 1, got -1"),
        ("--timeout", "0", "argument --timeout: must be a number above 0, got 0"),
        ("--retries", "x", "argument --retries: must be an integer of at least 0, got 'x'"),
        ("--max-errors", "-1", "argument --max-errors: must be an integer of at least 0, got -1"),
        ("--limit", "0", "argument --limit: must be an integer of at least 1, got 0"),
    ],
)
def test_a_bad_flag_value_is_named_by_its_flag_not_an_api_argument(tmp_path, flag, value, expected):
    out = procval_cli("run", f"{TASK}:single", "--store", tmp_path / "r.db", flag, value)
    assert out.returncode == 2, out.stderr
    assert procval_lines(out.stderr)[-1] == f"procval run: error: {expected}"
    assert "None" not in out.stderr and "=" not in out.stderr.split("error:")[1]
    assert not (tmp_path / "r.db").exists()


def test_a_missing_dataset_file_names_the_task_files_line(tmp_path):
    from helpers.cli_failing_task import MISSING_LINE

    out = procval_cli("run", f"{FAILING}:missing_data", "--store", tmp_path / "r.db", cwd=tmp_path)
    assert_one_error_line(
        out,
        "the task's dataset function failed: FileNotFoundError: no JSONL file at "
        f"'no_such_file.jsonl': {tmp_path / 'no_such_file.jsonl'} does not exist",
        f"({FAILING}:{MISSING_LINE})",
    )
    assert "procval/run/dataset.py" not in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("debug", ["", "1"], ids=["plain", "PROCVAL_DEBUG"])
def test_a_config_that_cannot_start_does_not_stop_the_others(tmp_path, debug):
    store = tmp_path / "run.db"
    out = procval_cli(
        "run", f"{FAILING}:mixed", "--store", store, "--no-progress", env={"PROCVAL_DEBUG": debug}
    )
    assert out.returncode == 2, out.stderr  # the same with PROCVAL_DEBUG=1
    assert stored(store) == (500, 500)  # every example of the healthy config
    assert re.search(r"^healthy\s+1\.0000\s+500\s+0\s", out.stdout, re.M), out.stdout
    lines = procval_lines(out.stderr)
    assert lines[-1].startswith("procval: error: Config.setup of config 'broken' failed in worker")
    assert "the other configs ('healthy') ran to completion" in lines[-1]
    assert "[RuntimeError: no GPU on this machine]; the worker's traceback is above" in lines[-1]
    shown = out.stderr.split("config 'broken' could not start; its worker's traceback:\n")[1]
    assert "in broken_setup" in shown and "RuntimeError: no GPU on this machine" in shown
    assert "procval/worker" not in shown.split("procval: error:")[0]  # the user's frames only

    report = procval_cli("report", store)
    assert report.returncode == 0, report.stderr
    assert "config 'healthy': score 1.0000 over 500 examples" in report.stdout
    assert "config 'broken': no rows" in report.stdout and "nan" not in report.stdout


def test_module_form_and_file_form_find_the_same_task():
    task = load_task(f"{TASK}:task")
    assert load_task(TASK) is task  # without :NAME, the task named `task`
    sys.path.insert(0, str(HELPERS.parent))
    try:
        assert isinstance(load_task("helpers.cli_task:single"), procval.Task)
        with pytest.raises(TaskError, match="has no attribute 'missing'; it defines Tasks named"):
            load_task("helpers.cli_task:missing")
    finally:
        sys.path.remove(str(HELPERS.parent))


def test_a_task_file_that_raises_names_the_file_and_line(tmp_path):
    broken = tmp_path / "cli_broken_task.py"
    broken.write_text("import procval\n\nraise RuntimeError('no data here')\n")
    with pytest.raises(TaskError) as info:
        load_task(f"{broken}:task")
    assert "RuntimeError: no data here" in str(info.value)
    assert f"{broken}:3" in str(info.value)


def test_limit_keeps_datasets_lazy():
    def gen():
        yield from ({"id": i} for i in range(10))

    task = procval.Task(abs, gen, lambda e, p: 1.0)
    head = task.examples(limit=3)
    assert iter(head) is head and len(list(head)) == 3  # a generator stays one
    listed = procval.Task(abs, list(range(10)), lambda e, p: 1.0).examples(limit=4)
    assert len(listed) == 4 and list(listed) == list(listed) == [0, 1, 2, 3]


def test_a_subcommand_is_one_function_and_one_line(capsys):
    @cli.command("hello", "say hello", cli.arg("name"))
    def hello(args: argparse.Namespace) -> int:
        print(f"hello {args.name}")
        return 0

    try:
        assert cli.main(["hello", "world"]) == 0
        assert capsys.readouterr().out == "hello world\n"
    finally:
        del cli.COMMANDS["hello"]


# ---------------------------------------------------------------- signals


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path):
    store, log = tmp_path / "run.db", tmp_path / "calls.log"
    env = {"CLI_TASK_N": "2000", "CLI_TASK_SLEEP": "0.005", "CLI_TASK_LOG": str(log)}
    args = ("run", f"{TASK}:single", "--store", store, "--workers", "2")
    proc = start_cli(*args, env=env)
    try:
        wait_for_rows(store, 1000, proc)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the run has no worker processes"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        stop(proc)
    assert_gone(children)
    at_kill = stored(store)
    assert at_kill[0] == at_kill[1] >= 1000  # the store opens, and holds no duplicate

    resumed = procval_cli(*args, env=env, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert stored(store) == (2000, 2000)
    counted = calls(log)
    recomputed = sum(counted.values()) - len(counted)
    assert len(counted) == 2000
    assert recomputed <= 200, f"{recomputed} examples ran twice"  # only what was in flight


@pytest.mark.slow
def test_a_second_run_on_a_busy_store_fails_fast_naming_the_holder(tmp_path):
    store, log, second_log = tmp_path / "run.db", tmp_path / "calls.log", tmp_path / "second.log"
    env = {"CLI_TASK_N": "5000", "CLI_TASK_SLEEP": "0.01", "CLI_TASK_LOG": str(log)}
    args = ("run", f"{TASK}:single", "--store", store, "--workers", "1")
    proc = start_cli(*args, env=env)
    try:
        wait_for_rows(store, 20, proc)
        started = time.monotonic()
        second = procval_cli(*args, env={**env, "CLI_TASK_LOG": str(second_log)}, timeout=60)
        elapsed = time.monotonic() - started
        holder = f"pid {proc.pid} on host {socket.gethostname()} (procval run {TASK}:single"
        assert_one_error_line(
            second,
            f"the run store {store} is being written by another run: {holder}",
            f"Wait for it to finish, or stop it (kill {proc.pid}), then run again to resume",
            "or use another store path",
        )
        assert second.stdout == "" and not second_log.exists()  # no worker ran anything
        assert elapsed < 30, f"{elapsed:.1f}s to refuse a busy store"  # the holder needs ~50 s
        report = procval_cli("report", store, timeout=60)  # readers need no lock
        assert report.returncode == 0 and "the last one running, or killed" in report.stdout
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        stop(proc)

    resumed = procval_cli(*args, env={**env, "CLI_TASK_SLEEP": "0"}, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert stored(store) == (5000, 5000)
    counted = calls(log)
    assert len(counted) == 5000 and sum(counted.values()) - 5000 <= 200  # in flight only


@pytest.mark.slow
@pytest.mark.parametrize(
    ("when", "delay"),
    [
        ("fork server starting", 0.0),
        ("fork server starting", 0.05),  # its interpreter is importing
        ("fork server starting", 0.1),
        ("fork server starting", 0.15),
        ("workers starting", 0.0),  # forked, unpickling what loky sent
        ("fork+exec workers starting", 0.0),  # no fork server: new interpreters importing
        ("fork+exec workers starting", 0.05),
        ("fork+exec workers starting", 0.1),
    ],
)
def test_ctrl_c_at_a_terminal_during_start_up_prints_no_traceback(tmp_path, when, delay):
    """A terminal's Ctrl-C reaches the whole process group, start-up processes included."""
    store = tmp_path / "run.db"
    env = {"CLI_TASK_N": "200", "CLI_TASK_SLEEP": "0.02"}
    if when.startswith("fork+exec"):
        env["PROCVAL_FORK_SERVER"] = "0"
    proc = start_cli(
        "run",
        TASK + ":single",
        "--store",
        store,
        env=env,
        start_new_session=True,  # its own process group, as a shell's job
    )
    try:
        me, deadline = psutil.Process(proc.pid), time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            commands = []
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if not is_tracker(child):  # forked by the server before its first worker
                        commands.append(" ".join(child.cmdline()))
            servers = [c for c in commands if "_forkserver" in c]
            spawned = [c for c in commands if "popen_loky_posix" in c]
            # the server's interpreter is importing; or it has forked its first worker; or a
            # fork+exec worker's interpreter is importing
            if (
                (when == "fork server starting" and servers)
                or len(servers) > 1
                or (when.startswith("fork+exec") and spawned)
            ):
                break
            time.sleep(0.002)
        time.sleep(delay)
        signal_group(proc, signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"no exit within 30 s of Ctrl-C; stderr: {proc.stderr}")
    finally:
        stop(proc, group=True)
    context = f"exit {proc.returncode}; stderr: {err!r}"
    assert proc.returncode == 130, context
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, context
    assert len(procval_lines(err)) == 1, context


@pytest.mark.slow
def test_sigint_mid_run_exits_promptly_with_a_resume_hint(tmp_path):
    store = tmp_path / "run.db"
    env = {"CLI_TASK_N": "2000", "CLI_TASK_SLEEP": "0.02"}
    proc = start_cli("run", f"{TASK}:single", "--store", store, "--fresh", env=env)
    try:
        wait_for_rows(store, 20, proc)  # mid run: the run is going, the rows are coming
        children = psutil.Process(proc.pid).children(recursive=True)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"no exit within 30 s of SIGINT; stderr: {err!r}")
        elapsed = time.monotonic() - sent
    finally:
        stop(proc)
    context = f"exit {proc.returncode} {elapsed:.1f}s after SIGINT; stderr: {err!r}"
    assert proc.returncode == 130, context
    assert elapsed < 10, context
    assert "Traceback" not in err, context
    lines = procval_lines(err)
    assert len(lines) == 1, context
    rows = stored(store)[0]
    assert lines[0] == (
        f"procval: interrupted; {rows} rows are in the store. "
        f"Resume with: procval run {TASK}:single --store {store}"  # --fresh is dropped
    ), context
    assert 20 <= rows < 2000, context  # interrupted mid run, and every stored row is counted
    assert_gone(children)


# ---------------------------------------------------------------- report: errors


def answer(example):
    if example["n"] % 10 == 3:
        raise ValueError(f"no answer for {example['id']}\nsecond line of detail")
    return "yes" if example["n"] == 5 else example["n"]


def exact(example, prediction):
    return prediction if isinstance(prediction, str) else prediction == example["n"]


@pytest.fixture(scope="module")
def failing_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("errors") / "errors.db"
    data = [{"id": f"q{i}", "n": i} for i in range(30)]
    procval.evaluate(answer, data, exact, workers=1, progress=False, store=store)
    return store


def test_report_shows_each_error_types_first_example_and_how_to_see_them_all(failing_store):
    out = procval_cli("report", failing_store, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "3 x ValueError, e.g. q3: no answer for q3\n" in out.stdout  # the first line only
    assert re.search(r"1 x MetricTypeError, e.g. q5: .*'yes'", out.stdout), out.stdout
    hint = f"every failed example: procval report {failing_store} --errors"
    assert hint in out.stdout and f"procval export {failing_store} --format jsonl" in out.stdout

    listed = procval_cli("report", failing_store, "--errors", timeout=60)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    start = lines.index("errors in 'default':")
    assert [line.split()[:2] for line in lines[start + 1 :]] == [
        ["q3", "ValueError:"],
        ["q5", "MetricTypeError:"],
        ["q13", "ValueError:"],
        ["q23", "ValueError:"],
    ]
    assert "  q13  ValueError: no answer for q13" in lines
    assert hint not in listed.stdout


def test_report_reads_error_examples_without_reading_the_rows(failing_store, monkeypatch, capsys):
    from procval.store import readers

    def refuse(self):
        raise AssertionError("procval report read every row")

    monkeypatch.setattr(readers.RowLoader, "__call__", refuse)
    assert cli.main(["report", str(failing_store)]) == 0
    assert "3 x ValueError, e.g. q3: no answer for q3" in capsys.readouterr().out
    summary = procval.load(failing_store)["default"].summary()
    assert "3 x ValueError, e.g. q3: no answer for q3" in summary


def test_a_result_in_memory_summarises_its_errors_the_same_way():
    data = [{"id": f"q{i}", "n": i} for i in range(15)]
    result = procval.evaluate(answer, data, exact, workers=1, progress=False)
    lines = result.summary().splitlines()
    assert lines[1] == "  2 x ValueError, e.g. q3: no answer for q3"
    assert lines[2].startswith("  1 x MetricTypeError, e.g. q5: ")
