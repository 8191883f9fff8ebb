"""What ends a run after the fact: a config that could not start, a dataset that raised.

Neither stops the other configs: the scheduler records the failure, lets everything else finish
(and be stored), then raises what these functions build.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from procval.errors import SetupError

__all__ = ["SetupFailure", "note_dataset_error", "setup_error"]


@dataclass(frozen=True)
class SetupFailure:
    """Why a config cannot start.

    Attributes:
        message: one sentence naming the config, the worker and what to fix.
        traceback: the worker's traceback, only the frames of the user's code ("" if none).
    """

    message: str
    traceback: str = ""


def setup_error(
    failures: Mapping[str, SetupFailure], ran: list[str], results: Mapping[str, Any]
) -> SetupError:
    """The error for configs that could not start, after the others ran.

    Args:
        failures: each failed config's failure, in the configs' order.
        ran: the configs that ran to completion.
        results: their results.
    """
    first = next(iter(failures.values()))
    more = f"; {len(failures) - 1} more config(s) failed too" if len(failures) > 1 else ""
    others = f"the other configs ({', '.join(map(repr, ran))}) ran to completion" if ran else ""
    message = "; ".join(filter(None, [first.message + more, others]))
    if first.traceback:
        message += f"{SetupError.TRACEBACK_FOLLOWS}\n{first.traceback}"
    tracebacks = {name: failure.traceback for name, failure in failures.items()}
    return SetupError(message, results=results, tracebacks=tracebacks)


def note_dataset_error(error: Exception, config: str, read: int, resume_hint: str) -> Exception:
    """The dataset's own exception, with a note (Python 3.11+) on what was kept and what next.

    Args:
        error: what the dataset raised.
        config: the config whose reading raised it.
        read: how many examples of it were read (and ran) in this call before it.
        resume_hint: how to resume ("" without a store).
    """
    kept = "are in the store" if resume_hint else "were not kept (no store=)"
    if hasattr(error, "add_note"):
        error.add_note(
            f"procval: the dataset of config {config!r} raised this; the {read} examples read "
            f"before it ran and {kept}. Fix the dataset, then {resume_hint or 'run again'}"
        )
    return error
