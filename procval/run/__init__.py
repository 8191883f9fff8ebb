"""The parent side of a run: arguments checked, snapshots taken, examples scheduled.

``api.evaluate`` checks the arguments and takes a :mod:`snapshot` per config; the
:mod:`scheduler` reads the :mod:`dataset` lazily in :mod:`shards`, sends them to workers started
by a backend (``procval.backends``), checks each answer's provenance, and hands rows to a sink
(``procval.store``) before the :mod:`progress` bars see them. Internal: import from ``procval``.
"""
