"""Evaluate's held LM history: bounded as DSPy bounds histories, and the same in the end."""

from __future__ import annotations

import random

import pytest

dspy = pytest.importorskip("dspy")

from dspy.clients import base_lm  # noqa: E402

from procval.integrations._dspy_held import HeldHistory  # noqa: E402

pytestmark = pytest.mark.dspy


class _LM:
    """What the end of the call appends to: an LM's history, DSPy's global one, both bounded."""

    def __init__(self, shared: list) -> None:
        self.history: list = []
        self.shared = shared

    def update_history(self, entry: dict, per_lm: int, overall: int) -> None:
        self.shared.append(entry)
        del self.shared[:-overall]
        self.history.append(entry)
        del self.history[:-per_lm]


def _appended(entries: list, per_lm: int, overall: int) -> tuple[dict, list]:
    shared: list = []
    lms = {key: _LM(shared) for key in ("lm", ("predictor", "a"), ("predictor", "b"))}
    for key, entry in entries:
        lms[key].update_history(entry, per_lm, overall)
    return {key: lm.history for key, lm in lms.items()}, shared


@pytest.mark.parametrize(("per_lm", "overall"), [(3, 5), (7, 4), (5, 5)])
def test_held_entries_leave_the_histories_that_holding_them_all_would(monkeypatch, per_lm, overall):
    monkeypatch.setattr(base_lm, "MAX_HISTORY_SIZE", overall)
    rng = random.Random(per_lm * 100 + overall)
    # 40 examples finishing in a random order, each with 1 to 3 calls of 3 LMs
    calls = [
        (index, rng.choice(["lm", ("predictor", "a"), ("predictor", "b")]), {"n": (index, i)})
        for index in range(40)
        for i in range(rng.randint(1, 3))
    ]
    arrival = sorted(range(40), key=lambda _: rng.random())
    arriving = [call for index in arrival for call in calls if call[0] == index]
    held = HeldHistory()
    with dspy.context(max_history_size=per_lm):
        for index, key, entry in arriving:
            held.add(index, key, entry)
        assert len(held) <= 3 * max(per_lm, overall)  # bounded, whatever the run's length
        kept = held.entries()
    everything = [(key, entry) for _, key, entry in calls]  # example order, as before
    assert _appended(kept, per_lm, overall) == _appended(everything, per_lm, overall)
    assert len(held) == 0


def test_nothing_is_held_when_history_is_disabled():
    held = HeldHistory()
    with dspy.context(disable_history=True):
        held.add(0, "lm", {"n": 0})
    assert held.entries() == []
