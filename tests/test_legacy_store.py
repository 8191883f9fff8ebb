"""Files written by procval 0.1.0, before the package layout changed, still work.

``tests/data/store_v1.db`` is a partial run (30 of 40 examples of ``helpers/legacy_task.py``,
two configs) and ``tests/data/pickles_v1.pkl`` holds its configs and an in-memory result,
pickled. Both were written by the release before the move and are never regenerated.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import procval

HERE = Path(__file__).parent
DATA = HERE / "data"
TASK = str(HERE / "helpers" / "legacy_task.py") + ":task"


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "v1.db"
    shutil.copy(DATA / "store_v1.db", path)
    return path


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "procval", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_an_old_store_loads_with_its_rows_and_scores(store):
    runs = procval.load(store)
    assert list(runs) == ["exact", "off"]
    assert len(runs["exact"]) == 30 and runs["exact"].score == pytest.approx(0.9)
    assert runs["off"].score == 0.0
    assert runs["exact"].error_types == {"ValueError": 3}
    assert runs["exact"].rows[4].error.message == "nine-four: 4"


def test_an_old_store_reports_exports_and_compares(store):
    report = cli("report", str(store))
    assert report.returncode == 0, report.stderr
    assert "config 'exact': score 0.9000 over 30 examples (3 errors)" in report.stdout
    export = cli("export", str(store), "--format", "jsonl")
    assert export.returncode == 0, export.stderr
    rows = [json.loads(line) for line in export.stdout.splitlines()]
    assert len(rows) == 60 and {r["config"] for r in rows} == {"exact", "off"}
    compared = cli("compare", str(store), "exact", "off")
    assert compared.returncode == 0, compared.stderr
    assert "on 30 paired examples" in compared.stdout


@pytest.mark.slow
def test_an_old_store_resumes_running_only_the_missing_examples(store):
    before = {r.example_id: r.worker_pid for r in procval.load(store)["exact"].rows}
    out = cli("run", TASK, "--store", str(store), env={"LEGACY_STOP_AT": "40"})
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "changed" not in out.stderr, out.stderr
    runs = procval.load(store)
    assert [len(runs[name]) for name in runs] == [40, 40]
    after = {r.example_id: r.worker_pid for r in runs["exact"].rows}
    assert {k: after[k] for k in before} == before  # the 30 stored rows were not rerun
    assert sorted(set(after) - set(before)) == sorted(f"q{i}" for i in range(30, 40))
    assert [s["status"] for s in procval.store.sessions(store)] == ["completed", "completed"]
    assert runs["exact"].error_types == {"ValueError": 4}


def test_old_pickles_of_configs_and_results_load():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        payload = pickle.loads((DATA / "pickles_v1.pkl").read_bytes())
    sys.path.insert(0, str(HERE))
    try:
        from helpers import legacy_task
    finally:
        sys.path.remove(str(HERE))
    configs = payload["configs"]
    assert isinstance(configs["exact"], procval.Config)
    assert configs["exact"].identity() == legacy_task.configs()["exact"].identity()
    result = payload["results"]["exact"]
    assert isinstance(result, procval.EvaluationResult) and len(result) == 12
    assert result.score == pytest.approx(11 / 12)
    assert isinstance(payload["row"], procval.Row) and payload["row"].error == payload["error"]
    assert payload["error"].type == "ValueError"
