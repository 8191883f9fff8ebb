"""Progress bars on stderr (tqdm): done/total, running mean score and errors, one bar a config."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tqdm.auto import tqdm


def wanted(progress: bool | None) -> bool:
    """``progress=None`` means: show bars when stderr is a terminal."""
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(progress)


class Progress:
    """One bar per config; updated with each shard's rows."""

    def __init__(
        self, names: Sequence[str], totals: Sequence[int | None], *, enabled: bool
    ) -> None:
        width = max((len(n) for n in names), default=0)
        self._bars = {
            name: tqdm(
                total=total,
                desc=name.ljust(width),
                position=i,
                file=sys.stderr,
                disable=not enabled,
                dynamic_ncols=True,
                leave=True,
                unit="ex",
                smoothing=0.1,
            )
            for i, (name, total) in enumerate(zip(names, totals, strict=True))
        }

    def advance(
        self, name: str, done: int, *, n: int, score_sum: float, errors: int, replaced: int = 0
    ) -> None:
        """Add ``done`` finished examples to ``name``'s bar; refresh score, errors, replaced."""
        bar = self._bars[name]
        if bar.disable:
            return
        mean = score_sum / n if n else 0.0
        lost = f" replaced={replaced}" if replaced else ""
        bar.set_postfix_str(f"score={mean:.3f} errors={errors}{lost}", refresh=False)
        bar.update(done)

    def close(self) -> None:
        """Close every bar."""
        for bar in self._bars.values():
            bar.close()
