"""Budgets: a config stops taking examples once its rows have spent ``max_tokens`` or ``max_cost``.

::

    evaluate(max_tokens=, max_cost=)     Config(max_tokens=, max_cost=)   (the config's wins)
                 │ checked before any worker starts (positive numbers)
                 ▼
    Budgets ── gated(name, examples) ──▶ the scheduler reads the config's examples through a
       │                                 gate, which closes once the config's spend reaches
       │                                 its budget: nothing more is sent (the others go on)
       └── BudgetSink(sink).add(rows) ─▶ the rows' usage (Row.usage) adds to the spend; a
                                         store's earlier sessions count first (resume)
           rows of examples in flight when the gate closed still come, and are kept: the
           overrun is what those examples spent. The result's ``stopped`` says why and how
           to resume; a budget that cannot be checked (no usage, or no cost) is said too.

Spend is what the rows record: DSPy LM calls automatically, other programs through
:func:`procval.record_usage`; the cost from the response, else LiteLLM's price table.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from procval.config import Config, _check_budget
from procval.results import EvaluationResult, Row, Totals
from procval.run.dataset import Item, Source
from procval.store.sink import Sink, SinkWrapper
from procval.usage import Usage
from procval.wire import Snapshot

__all__ = ["BudgetSink", "Budgets", "Gated", "Spend", "check_budgets"]


def check_budgets(max_tokens: object, max_cost: object) -> None:
    """Refuse ``evaluate``'s budgets unless each is None or a positive number.

    Raises:
        ValueError: a budget that is a bool, not a number, zero, negative, NaN or infinite.
    """
    _check_budget("max_tokens", max_tokens)
    _check_budget("max_cost", max_cost)


@dataclass
class Spend:
    """One config's spend against its budget.

    Attributes:
        max_tokens: the token budget (None: none).
        max_cost: the cost budget (None: none).
        own: the options (``"max_tokens"``, ``"max_cost"``) the config set itself (the others
            are ``evaluate``'s).
        tokens: tokens spent, earlier sessions' included.
        cost: cost spent (of the calls whose cost is known).
        before: whether the spend already stored reached the budget (nothing ran now).
        uncosted: models whose calls reported no cost (``max_cost`` cannot count them).
        recorded: whether any usage came back at all.
        reached: ``"max_tokens=1,000"`` once a budget is reached, else "".
        in_flight: rows that arrived after it was reached (examples already sent then).
        total: the config's examples (None: unknown).
    """

    max_tokens: float | None
    max_cost: float | None
    own: frozenset[str] = frozenset()
    tokens: float = 0.0
    cost: float = 0.0
    before: bool = False
    uncosted: set[str] = field(default_factory=set)
    recorded: bool = False
    reached: str = ""
    in_flight: int = 0
    total: int | None = None

    def add(self, usage: Mapping[str, Usage] | None) -> None:
        """Count what one row (or earlier sessions) spent, then check the budget."""
        for model, spent in (usage or {}).items():
            self.recorded = True
            self.tokens += spent.total_tokens
            if spent.cost is None:
                if spent.calls > spent.cached_calls:  # a cached call costs nothing
                    self.uncosted.add(model)
            else:
                self.cost += spent.cost
        if self.reached:
            return
        if self.max_tokens is not None and self.tokens >= self.max_tokens:
            self.reached = f"max_tokens={_number(self.max_tokens)}"
        elif self.max_cost is not None and self.cost >= self.max_cost:
            self.reached = f"max_cost={_number(self.max_cost)}"

    def spent_text(self) -> str:
        """``"1,234 tokens, cost 0.0123"`` (the cost only when it is budgeted or known)."""
        cost = f", cost {self.cost:.4g}" if self.max_cost is not None or self.cost else ""
        return f"{_number(self.tokens)} tokens{cost}"


class Budgets:
    """The budgets of one run, config by config (only the configs that have one).

    Args:
        configs: the run's configs; a config's own ``max_tokens``/``max_cost`` wins.
        max_tokens: ``evaluate``'s token budget, for every config without its own.
        max_cost: ``evaluate``'s cost budget, likewise.
        store: the run store's path (None: no store, nothing to resume).
    """

    def __init__(
        self,
        configs: Sequence[Config],
        max_tokens: float | None,
        max_cost: float | None,
        store: str | None,
    ) -> None:
        self.store = store
        self.spends: dict[str, Spend] = {}
        for config in configs:
            tokens = config.max_tokens if config.max_tokens is not None else max_tokens
            cost = config.max_cost if config.max_cost is not None else max_cost
            if tokens is None and cost is None:
                continue
            own = frozenset(
                option
                for option, value in (
                    ("max_tokens", config.max_tokens),
                    ("max_cost", config.max_cost),
                )
                if value is not None
            )
            self.spends[config.name] = Spend(tokens, cost, own)

    def gated(self, names: Sequence[str], examples: Sequence[Source]) -> list[Source]:
        """Each config's examples, read through its budget's gate where it has a budget."""
        out: list[Source] = []
        for name, data in zip(names, examples, strict=True):
            spend = self.spends.get(name)
            if spend is not None:
                spend.total = data.total
            out.append(data if spend is None else Gated(data, spend))
        return out

    def wrap(self, sink: Sink) -> Sink:
        """``sink``, counting each config's spend as rows arrive (``sink`` when no budget)."""
        return BudgetSink(sink, self) if self.spends else sink


class Gated:
    """A config's examples, read until its budget is reached (then the source looks exhausted)."""

    def __init__(self, examples: Source, spend: Spend) -> None:
        self._examples = examples
        self._spend = spend
        self.total = examples.total

    def __iter__(self) -> Iterator[Item]:
        """The examples, while the budget is not reached (checked before each one is read)."""
        items = iter(self._examples)
        while not self._spend.reached:
            try:
                item = next(items)
            except StopIteration:
                return
            yield item


class BudgetSink(SinkWrapper):
    """Counts each config's spend from its rows; its results say whether a budget stopped it."""

    def __init__(self, sink: Sink, budgets: Budgets) -> None:
        super().__init__(sink)
        self._budgets = budgets

    def begin(self, snapshot: Snapshot) -> Totals:
        """Register the config; a store's earlier spend counts toward its budget (a resume)."""
        totals = self._sink.begin(snapshot)
        spend = self._budgets.spends.get(snapshot.name)
        stored = getattr(self._sink, "spent", None)
        if spend is not None and callable(stored):
            found: Mapping[str, Usage] = stored(snapshot.name)
            spend.add(found)
            spend.before = bool(spend.reached)
        return totals

    def add(self, config: str, rows: list[Row]) -> None:
        """Keep the rows (durable first), then add their usage to the config's spend."""
        self._sink.add(config, rows)
        spend = self._budgets.spends.get(config)
        if spend is None:
            return
        for row in rows:
            if spend.reached:
                spend.in_flight += 1
            spend.add(row.usage)

    def result(self, config: str, duration: float) -> EvaluationResult:
        """The config's result, with why its budget stopped it and what it could not count."""
        result = self._sink.result(config, duration)
        spend = self._budgets.spends.get(config)
        if spend is not None:
            result._stopped = stop_note(spend, result.totals.n, self._budgets.store)
            result._budget_warning = budget_warning(spend)
            if spend.reached:
                option = spend.reached.split("=")[0]
                limit = spend.max_tokens if option == "max_tokens" else spend.max_cost
                source = "Config" if option in spend.own else "evaluate"
                result._budget_stop = (option, float(limit or 0), source)
        return result

    def close(self, *, completed: bool) -> None:
        """Close the wrapped sink; a run a budget stopped is not a completed one."""
        stopped = any(spend.reached for spend in self._budgets.spends.values())
        self._sink.close(completed=completed and not stopped)


def stop_note(spend: Spend, rows: int, store: str | None) -> str | None:
    """Why the budget stopped the config, its overrun, and how to resume; None if it did not."""
    if not spend.reached:
        return None
    left = "" if spend.total is None else f"; {max(0, spend.total - rows)} examples not run"
    if spend.before:
        when = "was reached by the spend already stored"
    else:
        when = f"was reached; the {spend.in_flight} examples already sent then finished, kept"
    what = spend.reached.split("=")[0]
    where = f"Config({what}=) of this config" if what in spend.own else what
    resume = (
        f"to continue, run again with store={store!r} and a larger {where} (the spend "
        "stored counts toward it)"
        if store
        else "nothing was stored (no store=): pass store= to be able to resume"
    )
    return f"stopped: {spend.reached} {when} ({spend.spent_text()} spent{left}); {resume}"


def budget_warning(spend: Spend) -> str | None:
    """A budget the rows cannot be checked against (no usage, or no cost), else None."""
    if not spend.recorded:
        return (
            "the budget was never checked: no example recorded any usage (DSPy LM calls are "
            "counted automatically; other programs call procval.record_usage)"
        )
    if spend.max_cost is not None and spend.uncosted:
        models = ", ".join(repr(m) for m in sorted(spend.uncosted))
        return (
            f"max_cost counts no cost for {models}: its calls report none (and LiteLLM's price "
            "table does not know it); give max_tokens, or record it with "
            "procval.record_usage(cost=...)"
        )
    return None


def _number(value: float) -> str:
    """``1,234`` for a whole number, else ``0.5`` (``:g``)."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"
