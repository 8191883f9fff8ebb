"""The evaluation model's options, checked in the parent before any worker starts.

Several metrics (``metric=[em, f1]`` or ``metric={"em": em, "f1": f1}``) become one
:class:`~procval.worker.scoring.MetricSet`; ``primary=`` must name one of their scores;
``epochs`` and ``reducer`` must fit each other (:func:`procval._reduce.check_reducer`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from procval._reduce import Reducer, check_reducer
from procval.worker.scoring import MetricSet

__all__ = ["check_model", "metric_of"]


def metric_of(metric: Any) -> Callable[[Any, Any], Any]:
    """``metric`` itself, or a :class:`MetricSet` of a list or dict of metrics.

    Raises:
        TypeError: a metric of the list or dict is not callable, or a name is not a str.
        ValueError: an empty list or dict, or two metrics of a list with the same name.
    """
    if callable(metric):
        return metric
    if isinstance(metric, Mapping):
        named = dict(metric)
        for name in named:
            if not isinstance(name, str) or not name:
                raise TypeError(f"metric names must be non-empty str, got {name!r}")
    elif isinstance(metric, Sequence) and not isinstance(metric, str | bytes):
        named = {}
        for one in metric:
            name = getattr(one, "__name__", type(one).__name__)
            if name in named:
                raise ValueError(
                    f"two metrics are named {name!r}; pass a dict to name them: "
                    f"metric={{'{name}': ..., '{name}_2': ...}}"
                )
            named[name] = one
    else:
        raise TypeError(
            "metric must be callable as metric(example, prediction), or a list or dict of such "
            f"metrics, got {type(metric).__name__}"
        )
    if not named:
        raise ValueError("metric is an empty list or dict: pass at least one metric")
    for name, one in named.items():
        if not callable(one):
            raise TypeError(f"metric {name!r} is not callable (got {type(one).__name__})")
    return MetricSet(named)


def check_model(
    metric: Callable[[Any, Any], Any], primary: str | None, epochs: int, reducer: Reducer
) -> Reducer:
    """Check ``primary``, ``epochs`` and ``reducer``; return the reducer as checked.

    Raises:
        ValueError: ``epochs`` below 1, ``primary`` not one of a metric set's names, or a
            reducer that does not fit ``epochs``.
        TypeError: ``epochs`` not an int, ``primary`` not a str, a malformed ``reducer``.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int):
        raise TypeError(f"epochs must be an int of at least 1, got {epochs!r}")
    if epochs < 1:
        raise ValueError(
            f"epochs must be at least 1 (each example runs that many times), got {epochs}"
        )
    if primary is not None:
        if not isinstance(primary, str):
            raise TypeError(f"primary must be a score name (a str), got {primary!r}")
        if isinstance(metric, MetricSet) and primary not in metric.metrics:
            raise ValueError(
                f"primary={primary!r} is not one of the metrics {list(metric.metrics)}; "
                "pass one of their names"
            )
    return check_reducer(reducer, epochs)
