"""Functions travel to workers with the globals they would see in one process."""

from __future__ import annotations

import procval
from helpers import toys, user_module
from procval import _pickling


def test_lambda_and_closure_setups_of_a_user_module_change_that_modules_state():
    results = procval.evaluate(
        user_module.program,
        [1, 2],
        toys.any_score,
        configs=user_module.make_configs(),
        workers=2,
        progress=False,
    )
    assert [r.prediction for r in results["lambda"].rows] == ["via-lambda:1", "via-lambda:2"]
    assert [r.prediction for r in results["closure"].rows] == ["via-closure:1", "via-closure:2"]
    assert user_module.SETTINGS == {"model": None}  # the parent's module is untouched


def test_functions_rebuilt_in_their_module_keep_closures_defaults_and_attributes():
    def outer(scale):
        empty_later = None

        def inner(x, *, offset=1):
            return x * scale + offset + (0 if empty_later is None else 1)

        inner.tag = "kept"
        return inner

    fn = outer(3)
    fn.__module__ = user_module.__name__  # as if defined there
    fn_globals_ok = fn.__globals__ is not vars(user_module)  # defined here: cloudpickle's way
    clone = _pickling.loads(_pickling.dumps(fn, what="fn"))
    assert fn_globals_ok and clone(2) == 7 and clone(2, offset=0) == 6 and clone.tag == "kept"

    setup = user_module.make_configs()["closure"].setup
    clone = _pickling.loads(_pickling.dumps(setup, what="setup"))
    assert clone.__globals__ is vars(user_module)  # the module's own globals, not a copy
    assert clone.__qualname__ == setup.__qualname__


def test_recursive_local_functions_still_pickle():
    def make():
        def fact(n):
            return 1 if n <= 1 else n * fact(n - 1)

        return fact

    assert _pickling.loads(_pickling.dumps(make(), what="fact"))(5) == 120
