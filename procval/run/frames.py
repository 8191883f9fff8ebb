"""Pointing at the user's code: tracebacks and error locations without procval's own frames.

A user whose ``Config.setup`` or dataset fails wants the line of *their* file that failed, not
the procval line that called it. These helpers drop procval's frames (and the import system's)
from a traceback, as text (what a worker sends) or as a live traceback (in the parent).
"""

from __future__ import annotations

import os
import re
import traceback
from types import TracebackType

__all__ = ["is_internal", "user_frame", "user_traceback"]

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # procval/
_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line \d+')


def is_internal(filename: str) -> bool:
    """Whether a frame's file is procval's own or the import machinery's, not the user's."""
    if filename.startswith("<frozen") or f"{os.sep}importlib{os.sep}" in filename:
        return True
    return os.path.abspath(filename).startswith(_PACKAGE)


def user_traceback(text: str) -> str:
    """A formatted traceback with procval's frames taken out (the header and error kept).

    Args:
        text: a traceback as ``traceback.format_exc()`` writes it.

    Returns:
        The same text without the ``File ...`` entries (and their source lines) that are in
        procval; unchanged if every frame is procval's (then nothing would be left to show).
    """
    kept: list[str] = []
    skipping = False
    frames = user = 0
    for line in text.splitlines(keepends=True):
        match = _FRAME.match(line)
        if match:
            frames += 1
            skipping = is_internal(match["file"])
            user += not skipping
        elif skipping and not line.startswith("    "):
            skipping = False  # the source lines of a frame are indented by four
        if not skipping:
            kept.append(line)
    return "".join(kept) if user or not frames else text


def user_frame(tb: TracebackType | None) -> traceback.FrameSummary | None:
    """The innermost frame of a traceback that is in the user's code (None if there is none)."""
    frames = [f for f in traceback.extract_tb(tb) if not is_internal(f.filename)]
    return frames[-1] if frames else None
