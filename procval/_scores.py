"""Named scores as their JSON text: made once in the worker, stored as is, decoded when read.

A row's named scores cross the pipe as ``(names, text)``: the score names (one tuple object per
worker for the same names, so a shard's pickle holds it once) and their canonical JSON text
``{"em":1.0,"f1":0.5}`` (:func:`scores_json`), in the scores' order (the order names the
primary). The parent keeps them as a :class:`NamedScores`, a read-only mapping that decodes the
text on first access only: a run into a store writes the text as it is and never decodes it (its
``result.scores`` are read back with SQL), so per row the parent neither unpickles a dict nor
encodes one. Both sides import this module: it stays light.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["NamedScores", "scores_json", "wire_scores"]

_TEMPLATES: dict[tuple[str, ...], tuple[tuple[str, ...], str]] = {}
_FLOAT_REPR = float.__repr__  # raises TypeError for anything but a float


def _template(names: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    """``(names, "%"-template of their JSON)``, made once per names (the first tuple kept)."""
    found = _TEMPLATES.get(names)
    if found is None:
        if len(_TEMPLATES) > 1000:  # names that change each row: do not keep them all
            _TEMPLATES.clear()
        escaped = (json.dumps(name).replace("%", "%%") for name in names)
        found = _TEMPLATES[names] = (names, "{" + ",".join(f"{n}:%s" for n in escaped) + "}")
    return found


def scores_json(scores: Mapping[str, float]) -> str:
    """``{name: value}`` as JSON, in the scores' order (the order names the primary).

    The scores are finite (the worker checks) floats, whose ``repr`` is JSON (an int or a
    bool is made a float first); the names of a config's rows are the same, so their JSON
    template is made once. A :class:`NamedScores` is its text already.
    """
    if type(scores) is NamedScores:
        return scores.text
    template = _template(tuple(scores))[1]
    try:
        return template % tuple(map(_FLOAT_REPR, scores.values()))  # floats: the common case
    except TypeError:  # an int or a bool
        return template % tuple(map(_FLOAT_REPR, map(float, scores.values())))


def wire_scores(scores: dict[str, float]) -> tuple[tuple[str, ...], str]:
    """``(names, text)`` of a worker's scores, as they cross the pipe.

    The scores are floats, as :func:`procval.worker.scoring.outcome` gives them; ``names`` is
    the same tuple object for the same names, so a shard's pickle holds it once.
    """
    names, template = _template(tuple(scores))
    try:
        return names, template % tuple(map(_FLOAT_REPR, scores.values()))
    except TypeError:
        return names, template % tuple(map(_FLOAT_REPR, map(float, scores.values())))


class NamedScores(Mapping[str, float]):
    """A row's named scores, held as their JSON text and decoded on first access.

    Read-only; equal to the dict of the same scores, shown and pickled as that dict.

    Args:
        names: the score names, in order.
        text: their JSON text, as :func:`scores_json` makes it.
    """

    __slots__ = ("_values", "names", "text")

    def __init__(self, names: tuple[str, ...], text: str) -> None:
        self.names = names
        self.text = text
        self._values: dict[str, float] | None = None

    def _decoded(self) -> dict[str, float]:
        values = self._values
        if values is None:
            values = self._values = json.loads(self.text)
        return values

    def __getitem__(self, name: str) -> float:
        return self._decoded()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NamedScores):
            return self.text == other.text or self._decoded() == other._decoded()
        if isinstance(other, Mapping):
            return self._decoded() == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # a mapping, as a dict is not hashable

    def __repr__(self) -> str:
        return repr(self._decoded())

    def __reduce__(self) -> tuple[Any, ...]:
        return dict, (self._decoded(),)  # a plain dict once pickled: no procval to read it
