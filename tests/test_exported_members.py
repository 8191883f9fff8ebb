"""The public namespace is exactly __all__ (plus lazily imported integrations)."""

from __future__ import annotations

import subprocess
import sys

import procval

IMPORTED = {"annotations", "TYPE_CHECKING", "Any"}


def test_all_matches_exported_members():
    exported = {n for n in dir(procval) if not n.startswith("_") and n not in IMPORTED}
    modules = {
        "config",
        "errors",
        "results",
        "backends",
        "integrations",
        "store",
        "compare",
        "task",
        "cli",
        "dspy",
    }
    assert exported - (modules - set(procval.__all__)) == set(procval.__all__)
    for name in procval.__all__:
        assert getattr(procval, name).__doc__, f"{name} has no docstring"


def test_import_procval_imports_no_optional_dependency():
    code = (
        "import sys, procval; print(sorted({'dspy', 'ray', 'pandas', 'numpy'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
