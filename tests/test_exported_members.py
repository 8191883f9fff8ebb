"""The public namespace is exactly ``__all__``, every public module's too; derived, not listed."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import types

import pytest

import procval

PUBLIC_MODULES = sorted(
    name
    for _, name, _ in pkgutil.iter_modules(procval.__path__)
    if not name.startswith("_") and name not in {"cli"}  # cli: a command, not an API
)

OPTIONAL = {"dspy": "dspy"}  # public modules that need an extra: module -> what it imports


def _defined_here(module: types.ModuleType) -> set[str]:
    """Public classes and functions a module defines itself (not those it imports)."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == module.__name__
    }


def test_procval_namespace_is_its_all():
    exported = set()
    for name in dir(procval):
        if name.startswith("_"):
            continue
        value = getattr(procval, name)
        if isinstance(value, types.ModuleType):
            continue  # a submodule, imported by someone
        if str(getattr(value, "__module__", "")).startswith("procval"):
            exported.add(name)
    assert exported == set(procval.__all__)
    for name in procval.__all__:
        assert getattr(procval, name).__doc__, f"{name} has no docstring"


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_a_public_module_defines_only_its_all(name):
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name])
    module = importlib.import_module(f"procval.{name}")
    if not hasattr(module, "__path__"):  # a package's __init__ may only re-export
        assert _defined_here(module) <= set(module.__all__), f"procval.{name} has internals"
    for member in getattr(module, "__all__", []):
        assert getattr(module, member).__doc__, f"procval.{name}.{member} has no docstring"


def test_procval_exports_come_from_modules_that_export_them():
    """Each public name is in the ``__all__`` of the module that defines it, or of a package."""
    for name in procval.__all__:
        home = importlib.import_module(getattr(procval, name).__module__)
        assert name in getattr(home, "__all__", [name]), f"{home.__name__} does not export {name}"


def test_import_procval_imports_no_optional_dependency():
    code = (
        "import sys, procval; print(sorted({'dspy', 'ray', 'pandas', 'numpy'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
