"""Small pieces of HTML shared by the report page and the notebook views.

Escaping, numbers and intervals as table cells, and the inline SVG drawings (a score bar with
its interval as a whisker, a paired difference on a symmetric axis, the axis labels). Every
value from a run goes through :func:`esc`.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable
from typing import Any

from procval._convert import to_jsonable
from procval.report.stats import Interval

__all__ = [
    "axis_svg",
    "bar_svg",
    "ci_text",
    "clip",
    "as_text",
    "diff_svg",
    "domain",
    "esc",
    "num",
    "plural",
]

TEXT_LIMIT = 300  # characters of an input or prediction shown in a table cell
_BAR_WIDTH = 240
_BAR_HEIGHT = 18


def as_text(value: Any) -> str:
    """A value as text for a cell: strings as they are, the rest as JSON (else repr)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(to_jsonable(value), ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def clip(text: str) -> str:
    """At most :data:`TEXT_LIMIT` characters, saying how many were left out."""
    if len(text) <= TEXT_LIMIT:
        return text
    return f"{text[:TEXT_LIMIT]}… ({len(text) - TEXT_LIMIT} more characters)"


def esc(value: Any) -> str:
    """``str(value)``, HTML-escaped (quotes too)."""
    return html.escape(str(value), quote=True)


def num(value: float, *, digits: int = 4, signed: bool = False) -> str:
    """A number for a table cell ("–" when not finite)."""
    if not math.isfinite(value):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def ci_text(interval: Interval, *, signed: bool = False) -> str:
    """An interval as ``[low, high]``."""
    return f"[{num(interval.low, signed=signed)}, {num(interval.high, signed=signed)}]"


def _tick(value: float) -> str:
    return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.1e}"


def plural(count: int) -> str:
    """An "s" unless ``count`` is 1."""
    return "" if count == 1 else "s"


def bar_svg(score: float, interval: Interval, lo: float, hi: float) -> str:
    """A bar from the axis minimum to ``score`` with the interval as a whisker."""
    if not math.isfinite(score):
        return ""
    w, h = _BAR_WIDTH, _BAR_HEIGHT
    x = _scale(score, lo, hi)
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' role='img' "
        f"aria-label='score {score:.4f}'>",
        f"<rect x='0' y='3' width='{w}' height='{h - 6}' fill='#eef1f4'/>",
        f"<rect x='0' y='3' width='{x:.1f}' height='{h - 6}' fill='#6ea8fe'/>",
    ]
    if all(math.isfinite(v) for v in interval):
        a, b = _scale(interval.low, lo, hi), _scale(interval.high, lo, hi)
        mid = h / 2
        out.append(
            f"<path d='M{a:.1f} {mid}H{b:.1f}M{a:.1f} 4V{h - 4}M{b:.1f} 4V{h - 4}' "
            "stroke='#1f2328' stroke-width='1.5' fill='none'/>"
        )
    return "".join(out) + "</svg>"


def diff_svg(difference: float, interval: Interval, bound: float) -> str:
    """A dot at ``difference`` with its interval, on a symmetric axis with a line at zero."""
    w, h = _BAR_WIDTH, _BAR_HEIGHT
    zero = _scale(0.0, -bound, bound)
    a, b = _scale(interval.low, -bound, bound), _scale(interval.high, -bound, bound)
    x = _scale(difference, -bound, bound)
    color = "#1a7f37" if interval.low > 0 else "#cf222e" if interval.high < 0 else "#59636e"
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' role='img' "
        f"aria-label='difference {difference:+.4f}'>"
        f"<line x1='{zero:.1f}' y1='0' x2='{zero:.1f}' y2='{h}' stroke='#8c959f' "
        "stroke-dasharray='3 2'/>"
        f"<line x1='{a:.1f}' y1='{h / 2}' x2='{b:.1f}' y2='{h / 2}' stroke='{color}' "
        "stroke-width='3'/>"
        f"<circle cx='{x:.1f}' cy='{h / 2}' r='4.5' fill='{color}'/></svg>"
    )


def axis_svg(lo: float, hi: float) -> str:
    """Tick labels for the bars below it: both ends and the middle."""
    w = _BAR_WIDTH
    ticks = [(lo, "start"), ((lo + hi) / 2, "middle"), (hi, "end")]
    labels = "".join(
        f"<text x='{_scale(v, lo, hi):.1f}' y='12' text-anchor='{anchor}' font-size='11' "
        f"fill='#59636e'>{esc(_tick(v))}</text>"
        for v, anchor in ticks
    )
    return f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='16'>{labels}</svg>"


def _scale(value: float, lo: float, hi: float) -> float:
    if hi <= lo:
        return 0.0
    return max(0.0, min(1.0, (value - lo) / (hi - lo))) * _BAR_WIDTH


def domain(scores: Iterable[float], intervals: Iterable[Interval]) -> tuple[float, float]:
    """The bars' axis: 0 to 1 when everything fits (scores are usually fractions)."""
    values = [v for v in (*scores, *(x for i in intervals for x in i)) if math.isfinite(v)]
    if not values:
        return 0.0, 1.0
    lo = min(0.0, *values)
    hi = max(1.0, *values) if lo >= 0.0 else max(values)
    return lo, hi if hi > lo else lo + 1.0
