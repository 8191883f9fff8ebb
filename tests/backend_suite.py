"""The conformance suite every backend must pass (loky's and Ray's run the same tests).

A backend's test module subclasses :class:`BackendSuite` and sets ``backend``. Every test runs
real worker processes; nothing of procval or loky is mocked.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import procval
from helpers import toyframework, toys


class BackendSuite:
    backend: Any = "loky"

    def evaluate(self, program, dataset, metric, **kwargs):
        kwargs.setdefault("workers", 2)
        kwargs.setdefault("progress", False)
        return procval.evaluate(program, dataset, metric, backend=self.backend, **kwargs)

    # ------------------------------------------------------------- basics

    def test_scores_rows_and_provenance(self):
        result = self.evaluate(
            toys.program,
            toys.dataset(30),
            toys.metric,
            config=procval.Config("right", setup=toys.configure_model("right")),
        )
        assert result.score == 1.0
        assert [r.example_id for r in result.rows] == [f"ex{i}" for i in range(30)]
        assert [r.index for r in result.rows] == list(range(30))
        assert {r.config for r in result.rows} == {"right"}
        assert all(r.worker_pid not in (0, os.getpid()) for r in result.rows)
        assert len({r.fingerprint for r in result.rows}) == 1
        assert result.fingerprint == result.rows[0].fingerprint
        assert all(r.attempts == 1 and r.error is None for r in result.rows)

    def test_the_original_bug_cannot_happen(self):
        """The user first runs the program in their own thread pool, then compares two models."""
        toyframework.configure(model="wrong")
        naive = {}
        with ThreadPoolExecutor(4) as pool:
            # the user's own run: every pool thread reads the settings (and caches them)
            barrier = threading.Barrier(4)
            list(pool.map(lambda q: (barrier.wait(), toyframework.answer(q)), range(4)))
            # a naive thread-based evaluator then reuses those threads for both models
            for model in ("right", "wrong"):
                toyframework.configure(model=model)
                predictions = list(pool.map(toyframework.answer, range(20)))
                naive[model] = sum(p == q * 2 for q, p in zip(range(20), predictions))
        assert naive["right"] == naive["wrong"], "the toy framework must reproduce the bug"
        results = self.evaluate(
            toys.program,
            toys.dataset(20),
            toys.metric,
            configs={
                "right": procval.Config(setup=toys.configure_model("right")),
                "wrong": procval.Config(setup=toys.configure_model("wrong")),
            },
            threads=3,
        )
        assert results["right"].score == 1.0
        assert results["wrong"].score == pytest.approx(1 / 20)  # only q=1: 1+1 == 1*2
        pids = {name: {r.worker_pid for r in res.rows} for name, res in results.items()}
        assert not pids["right"] & pids["wrong"]

    def test_parent_mutating_globals_during_a_run_changes_nothing(self):
        stop = threading.Event()

        def meddle():
            while not stop.is_set():
                for model in ("wrong", None, "evil"):
                    toyframework.configure(model=model)
                time.sleep(0.001)

        meddler = threading.Thread(target=meddle)
        meddler.start()
        try:
            result = self.evaluate(
                toys.program,
                toys.dataset(200),
                toys.metric,
                config=procval.Config("right", setup=toys.configure_model("right")),
            )
        finally:
            stop.set()
            meddler.join()
        assert result.score == 1.0

    def test_a_config_poisoning_its_process_leaves_others_untouched(self):
        results = self.evaluate(
            toys.poisoning_program,
            toys.dataset(60),
            toys.any_score,
            configs=[
                procval.Config("evil", setup=toys.configure_model("right")),
                procval.Config("good", setup=toys.configure_model("right")),
            ],
            workers=2,
        )
        good = [r.prediction for r in results["good"].rows]
        assert good == [{"model": "right", "poison": None, "env": None}] * 60
        evil_seen = [r.prediction["poison"] for r in results["evil"].rows]
        assert "evil was here" in evil_seen  # the poison did land, in evil's own processes
        assert os.environ.get("TOY_POISON") is None

    def test_env_per_config_and_parent_environ_unchanged(self):
        before = dict(os.environ)
        results = self.evaluate(
            toys.env_program,
            list(range(20)),
            toys.any_score,
            configs={
                "a": procval.Config(env={"TOY_API_KEY": "key-a"}),
                "b": procval.Config(env={"TOY_API_KEY": "key-b"}),
                "none": procval.Config(),
            },
            workers=3,
        )
        for name, key in (("a", "key-a"), ("b", "key-b"), ("none", None)):
            assert {r.prediction["key"] for r in results[name].rows} == {key}
        assert dict(os.environ) == before
        pid_sets = [{r.worker_pid for r in res.rows} for res in results.values()]
        assert all(not (x & y) for i, x in enumerate(pid_sets) for y in pid_sets[i + 1 :])

    def test_fewer_workers_than_configs(self, no_leaked_workers):
        configs = {f"c{i}": procval.Config(values={"i": i}) for i in range(3)}
        results = self.evaluate(
            toys.whoami, list(range(12)), toys.any_score, configs=configs, workers=2
        )
        owner: dict[int, str] = {}
        for name, res in results.items():
            assert len(res.rows) == 12
            for row in res.rows:
                assert row.prediction["name"] == name
                assert row.prediction["values"] == {"i": int(name[1])}
                assert owner.setdefault(row.worker_pid, name) == name

    def test_current_config_in_workers_only(self):
        with pytest.raises(procval.NotInWorkerError, match="only inside a procval worker"):
            procval.current_config()
        result = self.evaluate(
            toys.whoami, [1, 2], toys.any_score, config=procval.Config("x", values={"k": [1, 2]})
        )
        assert {r.prediction["name"] for r in result.rows} == {"x"}
        assert result.rows[0].prediction["values"] == {"k": [1, 2]}

    # ------------------------------------------------------------- errors are data

    def test_program_and_metric_errors_are_rows(self):
        result = self.evaluate(
            toys.sometimes_failing, toys.dataset(12), toys.metric, failure_score=-1.0
        )
        failed = [r.example["q"] for r in result.errors]
        assert failed == [0, 3, 6, 9]
        row = result.errors[1]
        assert row.error.type == "RuntimeError" and row.error.message == "boom on 3"
        assert "sometimes_failing" in row.error.traceback
        assert row.score == -1.0 and row.prediction is None
        assert result.score == pytest.approx((8 * 1.0 + 4 * -1.0) / 12)
        assert result.error_types == {"RuntimeError": 4}

    def test_metric_returning_a_string_is_an_error_naming_the_type(self):
        result = self.evaluate(toys.program, toys.dataset(3), toys.bad_metric)
        assert len(result.errors) == 3
        assert "metric returned a builtins.str" in result.errors[0].error.message
        result = self.evaluate(toys.program, toys.dataset(2), toys.raising_metric)
        assert {r.error.type for r in result.rows} == {"KeyError"}

    def test_setup_failure_stops_the_run_with_the_workers_traceback(self):
        with pytest.raises(procval.SetupError, match="cannot reach the model server"):
            self.evaluate(
                toys.program,
                toys.dataset(5),
                toys.metric,
                config=procval.Config("down", setup=toys.failing_setup),
            )

    @pytest.mark.slow
    def test_workers_dying_at_start_is_a_setup_error(self, no_leaked_workers):
        with pytest.raises(procval.SetupError, match="die before running any example"):
            self.evaluate(
                toys.program,
                toys.dataset(5),
                toys.metric,
                workers=1,
                config=procval.Config("dies", setup=toys.exiting_setup),
            )

    # ------------------------------------------------------------- seeds, threads, async

    def test_seeded_outputs_do_not_depend_on_workers_or_threads(self):
        config = procval.Config(seed=1234)
        one = self.evaluate(
            toys.random_program, toys.dataset(40), toys.any_score, config=config, workers=1
        )
        two = self.evaluate(
            toys.random_program, toys.dataset(40), toys.any_score, config=config, workers=2
        )
        assert [r.prediction for r in one.rows] == [r.prediction for r in two.rows]
        assert len({r.prediction for r in one.rows}) == 40
        threaded = self.evaluate(
            toys.rng_program_threads,
            toys.dataset(40),
            toys.any_score,
            config=config,
            workers=2,
            threads=4,
        )
        assert [r.prediction for r in threaded.rows] == [r.prediction[1] for r in one.rows]

    def test_rng_is_private_to_each_async_example(self):
        config = procval.Config(seed=99)
        serial = self.evaluate(
            toys.async_rng_program,
            toys.dataset(12),
            toys.any_score,
            config=config,
            workers=1,
            threads=1,
        )
        concurrent = self.evaluate(
            toys.async_rng_program,
            toys.dataset(12),
            toys.any_score,
            config=config,
            workers=2,
            threads=6,
        )
        assert [r.prediction for r in serial.rows] == [r.prediction for r in concurrent.rows]

    def test_numpy_global_rng_is_seeded_per_example(self):
        pytest.importorskip("numpy")
        config = procval.Config(seed=7)
        one = self.evaluate(
            toys.numpy_program, list(range(12)), toys.any_score, config=config, workers=1
        )
        two = self.evaluate(
            toys.numpy_program, list(range(12)), toys.any_score, config=config, workers=2
        )
        assert [r.prediction for r in one.rows] == [r.prediction for r in two.rows]
        assert len({r.prediction for r in one.rows}) == 12

    def test_threads_run_examples_concurrently(self):
        result = self.evaluate(
            toys.thread_concurrency, list(range(24)), toys.any_score, workers=1, threads=4
        )
        assert max(r.prediction for r in result.rows) == 4

    def test_async_program_runs_threads_coroutines_at_once(self):
        result = self.evaluate(
            toys.async_program, toys.dataset(24), toys.any_score, workers=1, threads=6
        )
        assert max(r.prediction for r in result.rows) == 6
        assert result.score == 1.0

    @pytest.mark.parametrize("program", ["straggler_program", "async_straggler_program"])
    def test_threads_do_not_wait_for_a_slow_example_of_an_earlier_shard(self, program):
        # example 0 runs until all 59 others have finished: the other threads must go on to
        # the later shards' examples while it runs (no barrier at the end of a shard)
        result = self.evaluate(
            getattr(toys, program), list(range(60)), toys.any_score, workers=1, threads=4
        )
        assert [r.example for r in result.rows] == list(range(60))
        seen = result.rows[0].prediction
        assert seen == toys.STRAGGLER_OTHERS, f"threads waited at a shard's end (saw {seen})"
        assert result.errors == []

    @pytest.mark.parametrize("threads", [1, 3])
    def test_a_keyboard_interrupt_raised_by_the_program_is_its_examples_error(self, threads):
        result = self.evaluate(
            toys.interrupting_program, list(range(12)), toys.any_score, threads=threads
        )
        assert [(r.example, r.error.type) for r in result.errors] == [(3, "KeyboardInterrupt")]
        assert [r.prediction for r in result.rows if r.error is None] == [
            i for i in range(12) if i != 3
        ]

    # ------------------------------------------------------------- crashes, hangs, retries

    @pytest.mark.slow
    def test_worker_crashes_are_isolated_to_the_poison_examples(self, no_leaked_workers):
        result = self.evaluate(
            toys.crashy_program, toys.dataset(30), toys.metric, workers=2, threads=2
        )
        crashed = {r.example["q"]: r.error for r in result.errors}
        assert set(crashed) == {5, 11}
        assert crashed[5].type == "WorkerCrashed" and "SIGSEGV" in crashed[5].message
        assert crashed[11].type == "WorkerCrashed" and "7" in crashed[11].message
        assert "Segmentation fault" in crashed[5].traceback
        others = [r for r in result.rows if r.error is None]
        assert len(others) == 28 and all(r.score == 1.0 for r in others)
        assert all(r.attempts == 1 for r in others)

    @pytest.mark.slow
    def test_a_crash_reruns_what_earlier_shards_left_running(self, no_leaked_workers):
        # example 0 is still running (its shard long answered) when example 40 ends the
        # process: it must be rerun, not lost, and only example 40 gets a crash row
        result = self.evaluate(
            toys.crash_behind_a_straggler, list(range(60)), toys.any_score, workers=1, threads=4
        )
        assert [r.example for r in result.rows] == list(range(60))
        assert [(r.example, r.error.type) for r in result.errors] == [(40, "WorkerCrashed")]
        assert result.rows[0].prediction == 0
        first = result.rows[1].worker_pid
        assert result.rows[0].worker_pid != first  # rerun in a fresh worker

    @pytest.mark.slow
    def test_a_hanging_example_times_out_and_the_run_goes_on(self, no_leaked_workers):
        started = time.monotonic()
        result = self.evaluate(
            toys.hanging_program, toys.dataset(16), toys.metric, workers=2, threads=2, timeout=2
        )
        assert time.monotonic() - started < 60
        assert [(r.example["q"], r.error.type) for r in result.errors] == [(3, "Timeout")]
        assert "2s" in result.errors[0].error.message
        others = [r for r in result.rows if r.error is None]
        assert len(others) == 15 and all(r.score == 1.0 and r.attempts == 1 for r in others)

    def test_retries_fix_transient_errors(self):
        result = self.evaluate(
            toys.flaky_program, toys.dataset(6), toys.any_score, retries=2, backoff=0.01
        )
        assert result.score == 1.0
        assert [r.attempts for r in result.rows] == [3] * 6
        result = self.evaluate(
            toys.flaky_program, toys.dataset(4), toys.any_score, retries=1, backoff=0.01, workers=1
        )
        assert [r.error.type for r in result.errors] == ["ConnectionError"] * 4
        assert [r.attempts for r in result.rows] == [2] * 4

    def test_no_retry_marks_errors_final(self):
        result = self.evaluate(
            toys.fatal_program, toys.dataset(3), toys.any_score, retries=5, backoff=0.01
        )
        assert [(r.error.type, r.attempts) for r in result.rows] == [("NoRetry", 1)] * 3

    def test_max_errors_stops_early_and_keeps_what_finished(self, no_leaked_workers):
        with pytest.raises(procval.TooManyErrors, match="max_errors=5") as info:
            self.evaluate(
                toys.failing_program, toys.dataset(5000), toys.any_score, max_errors=5, workers=2
            )
        assert info.value.failed > 5
        partial = info.value.results["default"]
        assert 5 < len(partial.rows) < 5000
        assert all(r.error.type == "ValueError" for r in partial.rows)
