"""Keeping a config's env values out of what procval keeps: rows are scrubbed before the sink.

A program may put a secret of ``Config.env`` into what it returns or raises (``ValueError(f"bad
key {key}")``, a prediction echoing a request). Before a row reaches the sink (the store, or the
in-memory result), every exact occurrence of one of its config's env values in the error's
message and traceback and in the prediction becomes ``***ENV:NAME***``; the store, the reports,
the exports and the returned rows all see the scrubbed row. The parent does it: it has the
config, and a worker's rows all pass through it.

Values shorter than :data:`MIN_SECRET` characters are left alone: they are switches, not secrets
(``"True"``, ``"1"``, ``"cuda"``), and replacing them would wreck every text they occur in. A
config without env costs nothing; one with env costs one combined regex search per text.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

from procval._convert import to_jsonable
from procval.config import Config
from procval.results import Row, RowError
from procval.store.sink import Sink, SinkWrapper

MIN_SECRET = 8
_PLAIN = (bool, int, float, type(None))


class Scrubber:
    """Replaces the exact values of one config's env (those of ``MIN_SECRET`` chars or more)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._names: dict[str, str] = {}
        for name, value in sorted(env.items()):
            if len(value) >= MIN_SECRET:
                self._names.setdefault(value, name)
        # longest first, so a value that contains another is replaced whole
        values = sorted(self._names, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, values))) if values else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def text(self, text: str) -> str:
        """``text`` with each env value replaced by ``***ENV:NAME***``."""
        if self._pattern is None or self._pattern.search(text) is None:
            return text
        return self._pattern.sub(lambda m: f"***ENV:{self._names[m.group()]}***", text)

    def value(self, value: Any) -> Any:
        """``value`` itself when no env value occurs in it, else a scrubbed copy.

        Strings, lists, tuples and dicts are scrubbed in place of their items; another object
        holding a secret is replaced by its scrubbed JSON form (what the store would keep).
        """
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, _PLAIN):
            return value
        if isinstance(value, list | tuple):
            items = [self.value(item) for item in value]
            if all(a is b for a, b in zip(items, value, strict=True)):
                return value
            return items if isinstance(value, list) else tuple(items)
        if isinstance(value, dict):
            pairs = [(self.value(k), self.value(v)) for k, v in value.items()]
            if all(a is k and b is v for (a, b), (k, v) in zip(pairs, value.items(), strict=True)):
                return value
            return dict(pairs)
        plain = to_jsonable(value)
        text = json.dumps(plain, default=repr)
        return value if self.text(text) == text else self.value(plain)

    def row(self, row: Row) -> Row:
        """``row`` itself when it holds no env value, else a copy with them replaced."""
        prediction = self.value(row.prediction)
        error = row.error
        if error is not None:
            message, traceback = self.text(error.message), self.text(error.traceback)
            if message is not error.message or traceback is not error.traceback:
                error = RowError(error.type, message, traceback)
        if prediction is row.prediction and error is row.error:
            return row
        return dataclasses.replace(row, prediction=prediction, error=error)


def scrubbed(sink: Sink, configs: list[Config]) -> Sink:
    """``sink``, or a :class:`ScrubbedSink` around it when a config has an env value to hide."""
    scrubbers = {c.name: Scrubber(c.env) for c in configs}
    scrubbers = {name: s for name, s in scrubbers.items() if s}
    return ScrubbedSink(sink, scrubbers) if scrubbers else sink


class ScrubbedSink(SinkWrapper):
    """A sink that scrubs each config's env values from its rows, then passes them on."""

    def __init__(self, sink: Sink, scrubbers: Mapping[str, Scrubber]) -> None:
        super().__init__(sink)
        self._scrubbers = scrubbers

    def add(self, config: str, rows: list[Row]) -> None:
        """Scrub the rows of a config with env values, then add them to the wrapped sink."""
        scrubber = self._scrubbers.get(config)
        self._sink.add(config, rows if scrubber is None else [scrubber.row(r) for r in rows])
