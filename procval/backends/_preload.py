"""Modules preloaded in the fork server, so that workers start with them imported and shared.

A worker forked from a server that has imported ``dspy`` starts with ``dspy`` in
``sys.modules``: no import to pay (0.7 s for DSPy), and the module's pages are shared
copy-on-write with the server and every other worker instead of copied per process::

    LokyBackend(preload=["dspy"])  or  PROCVAL_PRELOAD=dspy,numpy  or  preload="auto"
        │
        ▼  per worker: server_for(config env, preload)
    one server per (preload, the worker's whole environment):
      parent env + Config.env ──exec──▶ python: imports procval's worker side, then the
                                        preload, under that environment; gc.freeze();
                                        refuses (falls back, with a warning) if an import
                                        failed or started a thread
                                           │ fork (ms)
                                           ▼
                                        workers of the configs with that environment

Why per environment: a module may read an environment variable when it is imported (litellm
reads ``LITELLM_LOCAL_MODEL_COST_MAP``, many libraries read their cache directory). A worker
must see the module as its own config's environment made it, so a module is never preloaded
under one environment and used under another: configs with different ``env`` get different
servers, and a parent whose ``os.environ`` changed gets a new one. A server runs no user code
and never sees a snapshot or a setup, so nothing a config installs reaches another config's
workers: each installs its snapshot in its own fork.

``"auto"`` preloads the modules that the snapshot refers to by name (its pickle's
globals), that the parent has imported, and that are not in the standard library: the heavy
libraries a program uses, DSPy among them. Without a preload (the default), workers fork from
the one shared server of :mod:`procval.backends._forkserver`, which imports procval only.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pickletools
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from procval.backends._preimport import import_preload

if TYPE_CHECKING:
    from procval.backends._forkserver import ForkServer

__all__ = [
    "AUTO",
    "DSPY",
    "import_preload",
    "integration_preload",
    "prestart",
    "referenced_packages",
    "resolve",
    "server_for",
    "start_in_background",
]

AUTO = "auto"
_ALWAYS = frozenset({"procval", "loky", "cloudpickle", "__main__", "builtins"})
#: Modules preloaded by default for a snapshot that refers to one of procval's integrations (a
#: ``procval.dspy.snapshot()`` config's setup pickles as ``procval.integrations.dspy._Configure``):
#: their import is known to start no thread.
#: With DSPy, procval's integration too: a worker unpickling a DSPy config imports it, and
#: what DSPy does at its first LM call (``procval.integrations._dspy_warm``: imports, its
#: 8 MB model table), 30-40 ms of CPU and a few MB per worker when not preloaded.
DSPY = ("dspy", "procval.integrations.dspy", "procval.integrations._dspy_warm")
_INTEGRATIONS = {b"procval.integrations.dspy": DSPY}

_Key = tuple[tuple[str, ...], frozenset[tuple[str, str]]]
_servers: dict[_Key, ForkServer] = {}
_refused: dict[_Key, str] = {}  # a preload that failed under this environment: not again
_warned: set[_Key] = set()  # refusals reported (a background start reports none)
_lock = threading.Lock()  # guards _starting
_starting: dict[_Key, threading.Lock] = {}  # held while that key's server starts


def resolve(preload: Sequence[str] | str | None) -> tuple[str, ...] | str:
    """The preload a backend uses: ``preload``, else ``PROCVAL_PRELOAD`` (comma-separated).

    Returns:
        The module names, checked, or ``"auto"``.

    Raises:
        ValueError: a name that is not a module the parent can find, with the fix.
    """
    if preload is None:
        preload = os.environ.get("PROCVAL_PRELOAD", "")
    if isinstance(preload, str):
        if preload.strip() == AUTO:
            return AUTO
        preload = [name.strip() for name in preload.split(",") if name.strip()]
    names = tuple(dict.fromkeys(preload))
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"preload must hold module names, got {name!r}")
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ValueError(
                f"preload names {name!r}, which is not an importable module here; install it "
                "or remove it from preload= / PROCVAL_PRELOAD"
            )
    return names


def referenced_packages(data: bytes) -> tuple[str, ...]:
    """The third-party modules a pickle refers to by name, if the parent has imported them.

    Read from the pickle's opcodes (the module strings of its globals), not by unpickling.
    """
    found: dict[str, None] = {}
    skip = _ALWAYS | getattr(sys, "stdlib_module_names", frozenset())
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and ("UNICODE" in opcode.name or opcode.name == "GLOBAL"):
                name = arg.split(" ", 1)[0]
                module = sys.modules.get(name) if name.split(".", 1)[0] not in skip else None
                if module is not None and getattr(module, "__file__", None):
                    found[name] = None
    except Exception:  # a pickle this reader does not follow: preload nothing
        return ()
    return tuple(found)


def integration_preload(data: bytes) -> tuple[str, ...]:
    """The default preload of a snapshot made by a procval integration (``procval.dspy``)."""
    return next((names for marker, names in _INTEGRATIONS.items() if marker in data), ())


def server_for(
    env: dict[str, str], preload: tuple[str, ...], *, quiet: bool = False
) -> ForkServer | None:
    """The fork server for a worker with the config's ``env`` that preloads ``preload``.

    Args:
        env: the config's ``env``, on top of this process's ``os.environ``.
        preload: the modules to preload.
        quiet: warn of nothing (a background start): a later call reports a refusal.

    Returns:
        A ``ForkServer``, or None when workers must start by ``fork+exec`` (no fork server
        here). A preload that cannot be used (an import fails or starts a thread in the
        server) is reported once as a ``RuntimeWarning``; the workers then fork from the plain
        server and import what they need themselves. A server being started (by
        :func:`prestart`) is waited for, not started twice; servers for other keys (another
        config's environment) start meanwhile, in parallel.
    """
    from procval.backends import _forkserver

    if not preload:
        return _forkserver.get_server(env)
    if not _forkserver.available():
        return None
    environ = {**os.environ, **env}
    key = (preload, frozenset(environ.items()))
    with _lock:
        starting = _starting.setdefault(key, threading.Lock())
    with starting:
        server = _servers.get(key)
        if server is not None and not server.alive():
            del _servers[key]
            server = None
        if server is None and key not in _refused:
            try:
                server = _servers[key] = _forkserver.ForkServer(preload, environ)
            except OSError as exc:
                _refused[key] = str(exc)
        if key in _refused and not quiet and key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"procval could not preload {list(preload)} in its fork server "
                f"({_refused[key]}); workers import these modules themselves",
                RuntimeWarning,
                stacklevel=2,
            )
    if quiet:
        return server
    return server if server is not None else _forkserver.get_server(env)


def prestart(env: dict[str, str], preload: Sequence[str] | str | None) -> None:
    """Start the preloading server for ``env`` in the background, before a call needs it.

    The server's imports (DSPy: 0.7 s or more) then overlap the caller's own work; the first
    worker that needs the server waits for it instead of starting another. Nothing starts where
    workers would not fork from such a server (no preload, ``"auto"``, no fork server here).
    The server is the same a call would start: the environment it runs under is read now, and a
    call whose environment has changed meanwhile starts its own.
    """
    from procval.backends import _forkserver

    names = resolve(preload) if not isinstance(preload, tuple) else preload
    if not names or isinstance(names, str) or not _forkserver.available():
        return
    start_in_background(env, names)


def start_in_background(env: dict[str, str], preload: tuple[str, ...]) -> None:
    """:func:`server_for` ``(env, preload)`` in a thread: the server a worker will fork from.

    With no ``preload``, the plain server of the environment. A refusal is reported by the
    worker's own call, not here.
    """
    threading.Thread(
        target=server_for,
        args=(dict(env), preload),
        kwargs={"quiet": True},
        name="procval-prestart",
        daemon=True,  # an exit meanwhile closes the socket: the server ends too
    ).start()


def _forget_in_child() -> None:
    """A fork of the parent starts its own servers when it needs them."""
    global _lock, _starting
    _lock = threading.Lock()  # a background start may have held them in the parent
    _starting = {}
    servers = list(_servers.values())
    _servers.clear()
    for server in servers:
        with contextlib.suppress(OSError):
            server._sock.close()


def _stop_at_exit() -> None:
    for server in list(_servers.values()):
        if server.owner == os.getpid():
            server.stop()


os.register_at_fork(after_in_child=_forget_in_child)
atexit.register(_stop_at_exit)
