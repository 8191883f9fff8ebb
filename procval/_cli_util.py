"""Helpers of the command line: signals, one-line errors, the resume hint, output files."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from procval.errors import ProcvalError
from procval.store import readers as store

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_TOO_MANY_ERRORS = 3
EXIT_BUDGET = 4
EXIT_INTERRUPTED = 130


def _install_signal_handlers() -> Callable[[], None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt once; a second signal exits at once."""
    interrupted = False

    def handle(signum: int, frame: Any) -> None:
        nonlocal interrupted
        if interrupted:
            os._exit(EXIT_INTERRUPTED)  # the store is safe: every commit is atomic
        interrupted = True
        raise KeyboardInterrupt

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handle)
    except ValueError:  # not the main thread: leave signals alone
        pass

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _first_line(exc: BaseException) -> str:
    """The message on one line: its first line, plus the last line of any detail below it."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) == 1:
        return lines[0]
    return f"{lines[0]} [{lines[-1]}] (set PROCVAL_DEBUG=1 for the details)"


def _resume_command(argv: Sequence[str], add: Sequence[str] = ()) -> str:
    """The command line that resumes this run: the same without ``--fresh``, plus ``add``."""
    kept = [item for item in argv if item != "--fresh"]
    kept += [item for item in add if item not in kept]
    return "procval " + shlex.join(kept)


def _budget_resume(argv: Sequence[str], results: Any) -> list[str]:
    """One line per config a budget stopped: how to resume it with a larger budget."""
    lines = []
    for name, result in results.items():
        stop = getattr(result, "_budget_stop", None)
        if stop is None:
            continue
        option, limit, source = stop
        flag = "--" + option.replace("_", "-")
        larger = f"{2 * limit:g}" if option == "max_cost" else str(int(2 * limit))
        kept = [a for i, a in enumerate(argv) if a != flag and (i == 0 or argv[i - 1] != flag)]
        kept = [a for a in kept if not a.startswith(flag + "=")]
        command = f"{_resume_command(kept)} {flag} {larger}"
        if source == "Config":
            lines.append(f"procval: config {name!r} stopped at its {option}={limit:g} (its "
                         f"Config's): raise it in the task, then resume with: "
                         f"{_resume_command(argv)}")  # fmt: skip
        else:
            lines.append(f"procval: config {name!r} stopped at {flag} {limit:g}; resume with a "
                         f"larger one (the spend stored counts toward it): {command}")  # fmt: skip
    return lines


def _count(path: str, names: list[str]) -> int:
    try:
        return store.count_rows(path, names)
    except ProcvalError:
        return 0


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    partial = f"{path}.partial"
    try:
        with open(partial, "w", encoding="utf-8", newline="") as out:
            yield out
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)


def _chain(first: dict[str, Any], rest: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield first
    yield from rest
