"""The code that runs inside a worker process (one config's snapshot, for the process's life).

- :mod:`runtime`: the entry points the backends call (``initialize``, ``run_shard``), the
  process's state and run mode, and ``current_config`` / ``rng`` for user code;
- :mod:`execute`: one example (seeded, retried with backoff, scored), its outcome a row;
- :mod:`feed`: examples waiting for a runner, results waiting for a shard call;
- :mod:`runners`: the threads, or the event loop, that drain the feed;
- :mod:`lifeline`: SIGINT ignored, the parent-death watchdog, the fault-handler file;
- :mod:`slots`: the shared-memory table in which each worker thread records the example it
  runs, read by the parent for timeouts and crash suspects.

A worker imports nothing of the parent's run, store or report side
(``tests/test_worker_modules.py`` checks it). Internal: import from ``procval``.
"""
