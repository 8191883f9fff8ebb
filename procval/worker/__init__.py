"""The code that runs inside a worker process (one config's snapshot, for the process's life).

:mod:`runtime` installs the snapshot and runs shards; :mod:`slots` is the shared-memory table in
which each worker thread records the example it runs, read by the parent for timeouts and crash
suspects. A worker imports nothing of the parent's run, store or report side
(``tests/test_imports.py`` checks it). Internal: import from ``procval``.
"""
