"""What DSPy does at its first LM call, done once in a DSPy-preloading fork server.

Preloaded after ``dspy`` (``procval.backends._preload.DSPY``), so that each worker forked from
the server starts with it done and shared copy-on-write, instead of paying it in every worker
at its first LM call, while the other workers start on the same cores::

    first LM call in a worker, without this          in the server, once (this module)
    ─────────────────────────────────────────        ───────────────────────────────────
    imports dspy.clients.execution, costs, ...       the same imports
    (before the request leaves)
    loads the model price table (8 MB, 25 ms;        the same table, when the environment
    after the first response: it prices it)          makes DSPy read its bundled copy
    procval prices a call DSPy did not price         the same table (``usage.price``)
    from LiteLLM's table (5 MB of objects)

The table is loaded only when ``LITELLM_LOCAL_MODEL_COST_MAP`` is true (``procval.dspy``
snapshots set it): otherwise DSPy fetches it from the network, which a server must not do. The
server runs under the workers' own environment (``_preload``), so what is loaded here is what
the workers would have loaded. Nothing here raises: a DSPy version without these modules leaves
the work to the workers, as before.
"""

from __future__ import annotations

import contextlib
import importlib
import os

__all__ = ["FIRST_CALL_MODULES", "warm"]

#: Modules DSPy imports at its first LM call (DSPy 3.4), not at ``import dspy``.
FIRST_CALL_MODULES = (
    "difflib",
    "dspy.clients.call_result",
    "dspy.clients.costs",
    "dspy.clients.engines.streaming",
    "dspy.clients.execution",
    "dspy._vendor.lm15.cloud.hosts",
    "dspy._vendor.lm15.cloud.sigv4",
)


def warm() -> None:
    """Import :data:`FIRST_CALL_MODULES` and load the bundled model table, where they exist."""
    for name in FIRST_CALL_MODULES:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    with contextlib.suppress(Exception):
        from procval.worker import usage

        usage.price("", 0, 0)  # reads the table a worker would read at its first unpriced call
    if os.environ.get("LITELLM_LOCAL_MODEL_COST_MAP", "").lower() != "true":
        return  # DSPy would fetch the table from the network: left to the workers
    with contextlib.suppress(Exception):
        metadata = importlib.import_module("dspy.clients.model_metadata")
        load = getattr(metadata, "_load", None)
        if callable(load):
            load()


warm()
