"""What a worker process must become: :class:`Config`, and its pickled :class:`Snapshot`.

A config is taken as a snapshot in the parent (cloudpickled once, before any worker starts).
Every worker of that config installs exactly those bytes at start, in this order: ``env`` into
``os.environ``, ``seed`` into the global RNGs, then ``setup()``. A worker never installs a second
snapshot, so nothing one config does to its process can reach another config.
"""

from __future__ import annotations

import hashlib
import json
import re
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from procval import _pickling
from procval._convert import to_jsonable


class FrozenDict(Mapping[str, Any]):
    """A read-only, picklable mapping (``types.MappingProxyType`` cannot be pickled)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._data = dict(data or {})

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"{self._data!r}"

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._data.items(), key=lambda kv: kv[0])))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._data,))


class SecretEnv(FrozenDict):
    """``Config.env``: a read-only mapping whose repr shows names, never values."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k!r}: '***'" for k in self._data) + "}"

    def __hash__(self) -> int:
        return super().__hash__()


@dataclass(frozen=True)
class Config:
    """One configuration to evaluate, installed in its own worker processes.

    Args:
        name: how results, rows and the run store refer to this config.
        setup: called once in each worker process after ``env`` and ``seed`` are installed,
            e.g. ``lambda: dspy.configure(lm=dspy.LM("openai/gpt-4o-mini"))``.
        env: environment variables set in each worker (API keys, library switches). The
            parent's ``os.environ`` is not touched, and values are never written to the store.
        seed: seeds ``random`` (and numpy's global RNG when numpy is installed) at worker start,
            and again before each example from ``(seed, example_id)``.
        values: free user data, read in the worker through ``procval.current_config().values``.

    Raises:
        ValueError: an empty name.
        TypeError: a non-callable ``setup``, non-string ``env`` entries, or a non-int ``seed``.
    """

    name: str = "default"
    setup: Callable[[], Any] | None = None
    env: Mapping[str, str] = field(default_factory=SecretEnv)
    seed: int | None = None
    values: Mapping[str, Any] = field(default_factory=FrozenDict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"Config name must be a non-empty string, got {self.name!r}")
        if self.setup is not None and not callable(self.setup):
            raise TypeError(
                "Config.setup must be a callable taking no arguments, "
                f"got {type(self.setup).__name__}"
            )
        env = self.env or {}
        if not isinstance(env, Mapping):
            raise TypeError(f"Config.env must be a mapping of str to str, got {type(env).__name__}")
        for key, value in env.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(
                    f"Config.env entries must be str to str; {key!r} maps to a "
                    f"{type(value).__name__} (convert it with str())"
                )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise TypeError(f"Config.seed must be an int or None, got {type(self.seed).__name__}")
        values = self.values if self.values is not None else {}
        if not isinstance(values, Mapping):
            raise TypeError(f"Config.values must be a mapping, got {type(values).__name__}")
        object.__setattr__(self, "env", SecretEnv(env))
        object.__setattr__(self, "values", FrozenDict(values))

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description with no secret in it: env names only, values hashed.

        This is what the run store keeps, and what resuming compares (see :meth:`identity`).
        """
        return {
            "name": self.name,
            "env": {k: _digest(v.encode())[:12] for k, v in sorted(self.env.items())},
            "seed": self.seed,
            "values": to_jsonable(dict(self.values)),
            "setup": _describe_callable(self.setup),
        }

    def identity(self) -> str:
        """A stable hash of :meth:`describe`: equal for the same config in another process."""
        text = json.dumps(self.describe(), sort_keys=True, default=repr)
        return _digest(_ADDRESS.sub("", text).encode())[:16]


@dataclass(frozen=True)
class Snapshot:
    """A config pickled once in the parent: the bytes every worker of it installs.

    Attributes:
        name: the config's name.
        data: the cloudpickled ``(config, program, metric)``, pickled together once.
        fingerprint: a hash of ``data``; each worker recomputes it from the bytes it installed
            and stamps it on every row it produces.
        identity: :meth:`Config.identity`, compared when resuming from a store.
        description: :meth:`Config.describe`, plus a ``program`` hash of the program's and
            metric's code; kept in the store (resuming warns when the program changed).
    """

    name: str
    data: bytes = field(repr=False)
    fingerprint: str
    identity: str
    description: Mapping[str, Any] = field(repr=False)


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
    )


def code_identity(*functions: Any) -> str:
    """A stable hash of callables' code, closures and state: changes when the code changes."""
    text = json.dumps([_describe_callable(fn) for fn in functions], sort_keys=True, default=repr)
    return _digest(_ADDRESS.sub("", text).encode())[:16]


def fingerprint(data: bytes) -> str:
    """The fingerprint of snapshot bytes, as stamped on rows."""
    return _digest(data)[:16]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _code_digest(code: types.CodeType) -> str:
    parts = [code.co_code, repr(code.co_names).encode()]
    for const in code.co_consts:
        parts.append(
            _code_digest(const).encode()
            if isinstance(const, types.CodeType)
            else repr(const).encode()
        )
    return _digest(b"\0".join(parts))[:16]


def _describe_callable(fn: Any, depth: int = 0) -> Any:
    """Module, name, code and closure of a callable: stable across processes."""
    if fn is None:
        return None
    code = getattr(fn, "__code__", None)
    if code is None:
        inner = getattr(fn, "__func__", None) or getattr(type(fn), "__call__", None)
        head = f"{type(fn).__module__}.{type(fn).__qualname__}"
        state = getattr(fn, "__dict__", None)
        described = to_jsonable(state) if isinstance(state, dict) else repr(fn)
        return [head, described, _describe_callable(inner, depth + 1) if depth < 3 else None]
    cells = []
    for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or (), strict=False):
        try:
            cells.append([name, to_jsonable(cell.cell_contents)])
        except ValueError:
            cells.append([name, None])
    return [
        getattr(fn, "__module__", None),
        getattr(fn, "__qualname__", None),
        _code_digest(code),
        cells,
    ]
