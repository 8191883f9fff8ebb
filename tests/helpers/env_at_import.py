"""A module that reads an environment variable when it is imported (``tests/test_preload.py``).

``AT_IMPORT`` is the value the module saw at import; ``IMPORTED_IN`` the pid of the process that
imported it (a preloaded module was imported by the fork server, not by the worker);
``installed`` is what a config's ``setup`` adds, which no worker of another config may see.
"""

from __future__ import annotations

import os
import sys
from typing import Any

AT_IMPORT = os.environ.get("PROCVAL_TEST_AT_IMPORT", "<unset>")
IMPORTED_IN = os.getpid()
installed: list[str] = []


def install(name: str) -> None:
    """A config's setup: leave a mark in this module's state."""
    installed.append(name)


def install_config_name() -> None:
    """A config's setup: leave the config's name in this module's state."""
    import procval

    installed.append(procval.current_config().name)


def observe(example: Any) -> dict[str, Any]:
    """The program: what this worker sees of the module."""
    return {
        "at_import": AT_IMPORT.upper(),  # not the value itself: procval scrubs env values
        "imported_in": IMPORTED_IN,
        "pid": os.getpid(),
        "installed": list(installed),
    }


def accept(example: Any, prediction: Any) -> bool:
    """The metric: every observation counts."""
    return True


class Labelled:
    """A program holding two labels: equal strings that may or may not be one object."""

    def __init__(self, first: str, second: str) -> None:
        self.first = first
        self.second = second

    def __call__(self, example: Any) -> dict[str, Any]:
        return observe(example)


def ipython_seen(example: object) -> tuple[bool, bool]:
    """Whether IPython was imported before this call, and whether it can be imported now."""
    import importlib.util

    before = "IPython" in sys.modules
    return before, importlib.util.find_spec("IPython") is not None


def dspy_first_call_done(example: object) -> tuple[bool, bool]:
    """Whether DSPy's first-LM-call imports and its model table were there before this call."""
    from dspy.clients import model_metadata

    warm = sys.modules.get("procval.integrations._dspy_warm")
    imported = warm is not None and all(name in sys.modules for name in warm.FIRST_CALL_MODULES)
    return imported, getattr(model_metadata, "_data", None) is not None


def collector_on(example: object) -> tuple[bool, bool]:
    """Whether this worker's cyclic garbage collector is on, and whether its server's is off."""
    import gc

    return gc.isenabled(), "gc.disable()" in open(f"/proc/{os.getppid()}/cmdline").read()
