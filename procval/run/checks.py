"""The checks of ``evaluate``'s arguments, made before any worker starts.

Each raises a ``ValueError`` or ``TypeError`` that names the argument and the fix.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

from procval.backends import Backend
from procval.config import Config

__all__: list[str] = []


def _named_configs(
    config: Config | None, configs: Mapping[str, Config] | Sequence[Config] | None
) -> list[Config]:
    if config is not None and configs is not None:
        raise ValueError("pass either config= (one) or configs= (several), not both")
    if configs is None:
        one = config if config is not None else Config()
        if not isinstance(one, Config):
            raise TypeError(f"config must be a procval.Config, got {type(one).__name__}")
        return [one]
    if isinstance(configs, Mapping):
        named = []
        for name, value in configs.items():
            if not isinstance(value, Config):
                raise TypeError(
                    f"configs[{name!r}] must be a procval.Config, got {type(value).__name__}"
                )
            named.append(value if value.name == name else dataclasses.replace(value, name=name))
    elif isinstance(configs, Sequence) and not isinstance(configs, str):
        named = list(configs)
        for value in named:
            if not isinstance(value, Config):
                raise TypeError(
                    f"configs must hold procval.Config objects, got {type(value).__name__}"
                )
    else:
        raise TypeError("configs must be a mapping {name: Config} or a list of Configs")
    if not named:
        raise ValueError("configs is empty: pass at least one Config")
    names = [c.name for c in named]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"config names must be unique; {duplicates} appear more than once")
    return named


def _check_callables(program: Any, metric: Any) -> None:
    if not callable(program):
        raise TypeError(
            f"program must be callable as program(example), got {type(program).__name__}"
        )
    if not callable(metric):
        raise TypeError(
            f"metric must be callable as metric(example, prediction), got {type(metric).__name__}"
        )
    for what, fn, args in (("program", program, 1), ("metric", metric, 2)):
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):
            continue  # builtins and C callables: trust them
        try:
            signature.bind(*range(args))
        except TypeError as exc:
            call = "program(example)" if args == 1 else "metric(example, prediction)"
            raise TypeError(f"{what} cannot be called as {call}: {exc}") from None


def _check_counts(
    workers: int | None,
    threads: int,
    retries: int,
    backoff: float,
    timeout: float | None,
    max_errors: int | None,
) -> None:
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise ValueError(
            f"workers must be a positive int (or None for the CPU count), got {workers!r}"
        )
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int of at least 1, got {threads!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int of at least 0, got {retries!r}")
    if not isinstance(backoff, int | float) or backoff < 0:
        raise ValueError(f"backoff must be a number of seconds >= 0, got {backoff!r}")
    if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    if max_errors is not None and (
        isinstance(max_errors, bool) or not isinstance(max_errors, int) or max_errors < 0
    ):
        raise ValueError(f"max_errors must be an int of at least 0 or None, got {max_errors!r}")


def _check_store_options(
    store: str | os.PathLike[str] | None, fresh: bool, retry_errors: bool
) -> None:
    if store is None and (fresh or retry_errors):
        option = "fresh=True" if fresh else "retry_errors=True"
        raise ValueError(f"{option} only makes sense with store=")


def _check_backend(backend: str | Backend) -> None:
    if isinstance(backend, str) and backend not in ("loky", "ray"):
        raise ValueError(f"backend must be 'loky', 'ray' or a Backend object, got {backend!r}")
