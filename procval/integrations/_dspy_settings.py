"""DSPy's settings as a procval config: :func:`snapshot` and what it needs.

The settings half of :mod:`procval.integrations.dspy`, which re-exports :func:`snapshot` and
:data:`PER_CALL_SETTINGS` and draws how they travel to the workers. Here: what is captured
(``dspy.settings.config`` minus per-call state, the LM copied without its history, callbacks
that can be pickled, the caller's cache configuration), the ``Config.setup`` that installs it
in a worker (:class:`_Configure`), and the secret-free description kept in ``Config.values``.
Import it through :mod:`procval.integrations.dspy`, which checks that DSPy is installed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import pickle
import re
import types
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import dspy
from dspy.clients.base_lm import BaseLM
from dspy.dsp.utils.settings import DEFAULT_CONFIG

from procval import _pickling
from procval._convert import to_jsonable
from procval.config import Config
from procval.errors import SnapshotError
from procval.integrations import _dspy_observe as _observe
from procval.ratelimit import RateLimit, rate_limits

__all__ = ["PER_CALL_SETTINGS", "snapshot"]

PER_CALL_SETTINGS = frozenset(
    {
        "trace",
        "usage_tracker",
        "send_stream",
        "caller_predict",
        "caller_modules",
        "stream_listeners",
    }
)
"""DSPy settings that belong to the call in progress in the caller's thread, not to a config.

They are never carried to workers, where each example's call starts from DSPy's defaults:
``trace`` (filled by optimizers while they trace a call), ``usage_tracker`` (one
``dspy.track_usage()`` block), ``send_stream`` and ``stream_listeners`` (one ``dspy.streamify``
call), ``caller_predict`` and ``caller_modules`` (the module stack of the call in progress).
"""

_COST_MAP = "LITELLM_LOCAL_MODEL_COST_MAP"
_SECRET = re.compile(
    r"api_?key|secret|passw|credential|cookie|auth|headers?$|token$", re.IGNORECASE
)
_REDACTED = "***"


def snapshot(
    name: str | None = None,
    *,
    rate_limit: RateLimit | Sequence[RateLimit] | None = None,
    **overrides: Any,
) -> Config:
    """Capture the DSPy settings the calling thread sees now, as a config for worker processes.

    The captured settings are ``dspy.settings.config`` (``dspy.configure`` plus the
    ``dspy.context(...)`` overrides active in this thread), updated with ``overrides``, minus
    :data:`PER_CALL_SETTINGS`. They are pickled at once, so later changes in the caller do not
    reach the snapshot. Each worker of the config installs them with ``dspy.configure(...)``,
    after applying the caller's DSPy cache configuration (``dspy.configure_cache``) if this
    process has built a cache.

    The LM (``lm``) is copied with ``lm.copy()``, which leaves its ``history`` behind: workers
    start with empty histories and the config's identity does not change as the caller's LM is
    used; the LM calls made in the workers are appended to the caller's LM ``history`` as
    their rows arrive. Callbacks (``callbacks``) stay in the caller, which sees every event of
    the workers replayed (see :mod:`procval.integrations._dspy_observe`); callbacks marked with
    :func:`procval.dspy.in_worker` (or a true ``procval_in_worker`` attribute) travel instead,
    if they can be pickled, and run in the workers only.

    Secrets: the pickled settings (with the LM's ``api_key``) live only in ``Config.setup``,
    whose ``repr`` does not show them. ``Config.values`` holds a JSON description of the
    settings that differ from DSPy's defaults (``lm`` and ``adapter`` always), with fields named
    like secrets (``api_key``, ``*token``, ``*headers``, ...) replaced by ``"***"`` and LM
    histories left out; it is what ``Config.describe()`` and the run store show.

    ``Config.env`` sets ``LITELLM_LOCAL_MODEL_COST_MAP=True`` (unless the caller's environment
    sets it), so LiteLLM reads its bundled cost map instead of fetching it at each worker start.

    Args:
        name: the config's name; defaults to the LM's model name (``"dspy"`` without an LM).
        rate_limit: ``Config.rate_limit``: limits on the LM calls of every worker, shared by
            every config naming the same key (``RateLimit(key)`` applies to the LM whose model
            name is ``key``); see docs/rate-limits.md.
        **overrides: DSPy settings to change in the snapshot, e.g. ``lm=dspy.LM(...)`` or
            ``adapter=dspy.JSONAdapter()``.

    Returns:
        A :class:`procval.Config` for :func:`procval.evaluate`. Use ``dataclasses.replace`` to
        add ``env`` (API keys) or a ``seed``.

    Raises:
        ValueError: an override names an unknown setting or a per-call one.
        SnapshotError: a setting cannot be pickled; the message names it.
    """
    settings = dict(dspy.settings.config)
    unknown = sorted(set(overrides) - set(settings))
    if unknown:
        raise ValueError(
            f"unknown DSPy settings {unknown}; snapshot() accepts the keys of "
            f"dspy.settings.config: {sorted(set(settings) - PER_CALL_SETTINGS)}"
        )
    per_call = sorted(set(overrides) & PER_CALL_SETTINGS)
    if per_call:
        raise ValueError(
            f"{per_call} belong to one call in progress and are never sent to workers; "
            "leave them out of snapshot()"
        )
    settings.update(overrides)
    carried = {k: v for k, v in settings.items() if k not in PER_CALL_SETTINGS}
    lm = carried.get("lm")
    if isinstance(lm, BaseLM):
        carried["lm"] = lm.copy()  # a copy with an empty history (and its own kwargs)
    callbacks = list(carried.get("callbacks") or [])
    here = [c for c in callbacks if not _observe.runs_in_worker(c)]
    described = _describe({**carried, "callbacks": callbacks})
    # The same settings get the same relay token: a snapshot taken again (each Evaluate call)
    # is then the same snapshot, and warm workers (procval.Workers) serve it; the relay made
    # last for a token receives its events.
    token = hashlib.sha256(json.dumps(described, sort_keys=True, default=repr).encode())
    relay = _observe.Relay(here, lm, carried.get("adapter"), token=token.hexdigest()[:32])
    carried["callbacks"] = _travelling_callbacks(
        [c for c in callbacks if _observe.runs_in_worker(c)]
    )
    hooks = _observe.needed_hooks(here)  # none: no recording, and no DSPy dispatch in workers
    if hooks:
        carried["callbacks"].append(_observe.Recorder(relay.token, hooks))
    blob = _dump(carried, _cache_settings(), relay.token)
    env = worker_env()
    return Config(
        name=name if name is not None else _model_name(lm),
        setup=_Configure(blob, relay),
        env=env,
        values={"model": _model_name(lm) if lm is not None else None, **described},
        rate_limit=rate_limits(rate_limit) or None,
    )


def worker_env() -> dict[str, str]:
    """``Config.env`` of a snapshot taken now: LiteLLM's local cost map, unless set here."""
    return {_COST_MAP: os.environ.get(_COST_MAP, "True")}


class _Configure:
    """``Config.setup`` of a snapshot: installs the pickled settings in a worker.

    The settings stay as bytes because they hold the LM and its API key; ``__slots__`` (no
    ``__dict__``) and a fixed ``repr`` keep them out of ``Config.describe()``.
    """

    __slots__ = ("_blob", "_relay")

    def __init__(self, blob: bytes, relay: _observe.Relay | None = None) -> None:
        self._blob = blob
        self._relay = relay  # the parent's half; never pickled

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Configure, (self._blob,))

    @property
    def relay(self) -> _observe.Relay | None:
        """In the caller: where the events recorded in the workers are replayed."""
        return self._relay

    def __call__(self) -> None:
        """Configure DSPy's cache as the caller had it, then ``dspy.configure(**settings)``.

        Then the LM's history is recorded for the caller, and DSPy's own loggers, which do not
        propagate, are sent to the caller too when the worker relays its logs.
        """
        settings, cache, *rest = pickle.loads(self._blob)
        if cache is not None:
            _configure_cache(cache)
        dspy.configure(**settings)
        if rest and rest[0]:
            _observe.install(rest[0], settings)
        _relay_dspy_logs()

    def __repr__(self) -> str:
        return "<procval.dspy settings>"


# Snapshots pickle _Configure by reference and Config.identity() hashes where it lives; a run
# store refuses to resume a config whose identity changed. So it keeps the home it had before it
# moved here, procval.integrations.dspy (which imports it), and stored DSPy runs still resume.
_Configure.__module__ = _Configure.__call__.__module__ = "procval.integrations.dspy"


def _model_name(lm: Any) -> str:
    if lm is None:
        return "dspy"
    model = getattr(lm, "model", None)
    return model if isinstance(model, str) and model else type(lm).__name__


def _travelling_callbacks(callbacks: Sequence[Any]) -> list[Any]:
    kept = []
    for callback in callbacks:
        try:
            _pickling.dumps(callback, what=f"DSPy callback {callback!r}")
        except SnapshotError as exc:
            warnings.warn(
                f"{exc}. It is left out of the snapshot: it still runs for Evaluate in this "
                "process, but not for the modules and LMs in the workers",
                UserWarning,
                stacklevel=3,
            )
        else:
            kept.append(callback)
    return kept


def _relay_dspy_logs() -> None:
    """In a worker whose root logger relays to the parent: let DSPy's loggers propagate to it.

    DSPy gives its ``dspy`` logger its own stderr handler and no propagation; in a relaying
    worker that would print the records here instead of sending them to the caller, whose own
    ``dspy`` handler shows them.
    """
    from procval.worker.logs import RelayHandler

    if any(isinstance(h, RelayHandler) for h in logging.getLogger().handlers):
        dspy_logger = logging.getLogger("dspy")
        for handler in list(dspy_logger.handlers):
            dspy_logger.removeHandler(handler)
        dspy_logger.propagate = True


def _dump(settings: dict[str, Any], cache: dict[str, Any] | None, token: str) -> bytes:
    try:
        return _pickling.dumps((settings, cache, token), what="DSPy settings")
    except SnapshotError:
        for key, value in settings.items():
            _pickling.dumps(
                value,
                what=f"DSPy setting {key!r}",
                hint=f"override it, e.g. procval.dspy.snapshot({key}=...), with a value that "
                "can be pickled, or create it inside the program",
            )
        raise


def _cache_settings() -> dict[str, Any] | None:
    """How this process configured DSPy's cache, as ``dspy.configure_cache`` arguments.

    None when no cache was built here yet: workers then build DSPy's default one, which follows
    ``DSPY_CACHEDIR`` and ``DSPY_CACHE_LIMIT`` (inherited from this process's environment).
    The disk size limit is not carried (DSPy's default or ``DSPY_CACHE_LIMIT`` applies).
    """
    cache = vars(dspy).get("cache")  # dspy builds its cache lazily, on first use
    if cache is None:
        return None
    settings: dict[str, Any] = {
        "enable_disk_cache": bool(getattr(cache, "enable_disk_cache", True)),
        "enable_memory_cache": bool(getattr(cache, "enable_memory_cache", True)),
        "disk_cache_dir": getattr(cache, "disk_cache_dir", None),
    }
    maxsize = getattr(getattr(cache, "memory_cache", None), "maxsize", None)
    if settings["enable_memory_cache"] and maxsize:
        settings["memory_max_entries"] = maxsize
    # configure_cache(restrict_pickle=True, safe_types=[...]) bakes the allowed types into the
    # diskcache Disk class: carry them as (module, qualname) pairs, imported in the worker.
    disk = getattr(getattr(cache, "disk_cache", None), "_disk", None)
    allowed = getattr(disk, "_allowed", None)
    if allowed is not None:
        settings["restrict_pickle"] = True
        settings["safe_types"] = sorted(allowed)
    return settings


def _configure_cache(settings: dict[str, Any]) -> None:
    settings = dict(settings)
    if "safe_types" in settings:
        settings["safe_types"] = [_import_type(m, q) for m, q in settings["safe_types"]]
    dspy.configure_cache(**settings)


def _import_type(module: str, qualname: str) -> type:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _describe(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings as JSON without secrets: those that differ from DSPy's defaults."""
    described = {}
    for key, value in settings.items():
        if key not in ("lm", "adapter") and key in DEFAULT_CONFIG:
            try:
                if value == DEFAULT_CONFIG[key]:
                    continue
            except Exception:  # an object whose __eq__ raises: describe it
                pass
        described[key] = _public(value)
    return described


def _public(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return to_jsonable(value)
    if isinstance(value, list | tuple):
        return [_public(v) for v in value]
    if isinstance(value, Mapping):
        return _redact(to_jsonable(value))
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    if isinstance(value, types.FunctionType | types.BuiltinFunctionType | type):
        return {"function": f"{value.__module__}.{value.__qualname__}"}
    if isinstance(value, BaseLM):
        state = {k: v for k, v in vars(value).items() if not k.startswith("_") and k != "history"}
        return {"class": kind, **_redact(to_jsonable(state))}
    return {"class": kind, "state": _redact(to_jsonable(value))}


def _redact(value: Any) -> Any:
    """Replace values under secret-looking keys with ``"***"``; drop LM histories."""
    if isinstance(value, dict):
        return {
            k: (_REDACTED if v not in (None, "", {}, []) else v)
            if _SECRET.search(k)
            else _redact(v)
            for k, v in value.items()
            if k != "history"
        }
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value
