"""Taking a config's snapshot: the config, program and metric pickled once, in the parent.

A :class:`procval.wire.Snapshot` is taken per config before any worker starts. Its bytes are
what every worker of that config unpickles at start, and their fingerprint is what each worker
stamps on its rows, so the parent can prove which snapshot produced each row.
"""

from __future__ import annotations

from typing import Any

from procval import _pickling
from procval._identity import code_identity
from procval.config import Config
from procval.wire import Snapshot, fingerprint

__all__ = ["Snapshot", "take_snapshot"]


def take_snapshot(config: Config, program: Any = None, metric: Any = None) -> Snapshot:
    """Pickle ``config``, with the program and metric its workers run, into one snapshot.

    They are pickled together, in one call, so that functions defined in ``__main__`` or a
    notebook share one globals dict in the worker: a ``setup`` that changes a module-level
    variable is seen by the program, as it would be in a single process.

    Raises:
        SnapshotError: the config, or something its ``setup`` or ``values`` reference, cannot be
            pickled; the message names the culprit.
    """
    if not isinstance(config, Config):
        raise TypeError(f"expected a procval.Config, got {type(config).__name__}")
    try:
        data = _pickling.dumps_fast((config, program, metric))
    except Exception:  # find which part fails, and say so (the slow path runs only here)
        _pickling.dumps(
            config,
            what=f"config {config.name!r}",
            hint="create it inside Config.setup, which runs in each worker",
        )
        _pickling.dumps(program, what="program")
        _pickling.dumps(metric, what="metric")
        data = _pickling.dumps((config, program, metric), what="program and metric")
    description = config.describe()
    if program is not None or metric is not None:
        description["program"] = code_identity(program, metric)
    return Snapshot(
        name=config.name,
        data=data,
        fingerprint=fingerprint(data),
        identity=config.identity(),
        description=description,
        identity_v1=config._identity_v1(),
    )
