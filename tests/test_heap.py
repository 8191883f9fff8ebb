"""procval.run.heap: a run leaves the caller's garbage collector as it found it."""

from __future__ import annotations

import gc

import pytest

from procval.run.heap import frozen_heap


@pytest.fixture(autouse=True)
def _unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.enable()


def test_alive_before_is_frozen_during_and_unfrozen_after():
    with frozen_heap():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


def test_unfrozen_after_a_raising_run():
    with pytest.raises(RuntimeError), frozen_heap():
        raise RuntimeError("the run failed")
    assert gc.get_freeze_count() == 0


def test_a_callers_own_freeze_is_left_to_it():
    gc.freeze()
    with frozen_heap():
        pass
    assert gc.get_freeze_count() > 0  # still frozen: not unfrozen by procval


def test_a_disabled_collector_is_left_alone():
    gc.disable()
    with frozen_heap():
        assert gc.get_freeze_count() == 0
    assert not gc.isenabled()


def test_cycles_made_during_the_run_are_collected_during_it():
    class Node:
        pass

    with frozen_heap():
        a, b = Node(), Node()
        a.other, b.other = b, a
        del a, b
        assert gc.collect() >= 2
