"""Functions travel to workers with the globals they would see in one process."""

from __future__ import annotations

import subprocess
import sys
import traceback

import pytest

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


def test_code_pickled_by_value_keeps_its_file_line_and_source_line(tmp_path):
    path = tmp_path / "user_code.py"
    path.write_text("def f(x):\n    y = x + 1\n    raise ValueError(f'refused {y}')\n")
    namespace = {"__name__": "not_an_importable_module"}  # so cloudpickle pickles f by value
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    clone = _pickling.loads(_pickling.dumps(namespace["f"], what="f"))
    assert clone.__code__.co_filename == str(path)
    with pytest.raises(ValueError) as caught:
        clone(1)
    text = "".join(traceback.format_exception(caught.value))
    assert f'File "{path}", line 3, in f' in text and "raise ValueError(f'refused {y}')" in text


SCRIPT = """\
import sys
import procval


def program(example):
    if example == 2:
        raise ValueError("two is refused")
    return example


def metric(example, prediction):
    return 1.0


def broken_setup():
    raise RuntimeError("setup is broken")


if __name__ == "__main__":
    procval.evaluate(program, [1, 2], metric, store=sys.argv[1], workers=1, progress=False)
    try:
        config = procval.Config(setup=broken_setup)
        procval.evaluate(program, [1], metric, config=config, workers=1, progress=False)
    except procval.SetupError as exc:
        print(exc)
"""


def test_tracebacks_of_a_script_name_its_file_in_rows_the_html_report_and_setup_error(tmp_path):
    script = tmp_path / "my_eval.py"
    script.write_text(SCRIPT)
    store = tmp_path / "runs.db"
    run = subprocess.run(
        [sys.executable, str(script), str(store)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "<dynamic-code>" not in run.stdout
    assert f'File "{script}", line 16, in broken_setup' in run.stdout, run.stdout
    assert 'raise RuntimeError("setup is broken")' in run.stdout

    (row,) = procval.load(store)["default"].errors
    assert f'File "{script}", line 7, in program' in row.error.traceback, row.error.traceback
    assert 'raise ValueError("two is refused")' in row.error.traceback

    html = tmp_path / "report.html"
    report = subprocess.run(
        [sys.executable, "-m", "procval", "report", str(store), "--html", str(html)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    page = html.read_text()
    assert str(script) in page and "line 7, in program" in page and "<dynamic-code>" not in page
