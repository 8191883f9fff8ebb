"""Every code block of README.md and docs/*.md runs as written (issue 13 item 4).

The blocks are found, not listed (tests/helpers/doc_blocks.py, whose docstring has the marker
convention): a new page or block is tested without a change here. Per language:

- ``python`` runs in a subprocess (a fresh directory, or a shared copy of the repo for
  ``after``), after its ``given`` file; blocks marked ``needs-api-key`` or ``needs-ray-cluster``
  are compiled and every ``procval`` name they use must exist.
- ``bash``/``sh``: each command runs in a fresh copy of the repo, in order; ``pip install`` must
  name this project and its extras, and the test command must be the one CI runs (neither runs).
  Blocks marked ``slow`` or ``needs-ray-cluster`` are checked, not run: shell syntax, scripts
  that exist and accept the options used, pytest markers that are declared.
- ``console``: each ``$ command`` runs and prints what follows it (a ``...`` line ends the
  comparison).
- ``text`` never runs; anything else (an untagged fence) fails, asking for a language.

A block that fails because of a bug fixed on another branch is listed in KNOWN_FAILURES (strict
xfail: the lead removes the entry after merging the fix).
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.doc_blocks import NOT_RUN, ROOT, RUN, Block, all_blocks, blocks, commands, transcript

TIMEOUT = 120  # seconds for any one command or block; every one takes a few seconds at most
COMPILE_ONLY = ("needs-api-key", "needs-ray-cluster")
CHECK_ONLY = ("slow", "needs-ray-cluster")

# (file, the block's first line) -> (why it fails today, a text its failure message must hold)
KNOWN_FAILURES: dict[tuple[str, str], tuple[str, str]] = {}


class KnownFailure(AssertionError):
    """A block failed the way its KNOWN_FAILURES entry says (any other failure fails the test)."""


BLOCKS = all_blocks()


def _param(block: Block) -> object:
    key = next((k for k in KNOWN_FAILURES if _is_known(block, k)), None)
    marks = []
    if key:
        marks = [pytest.mark.xfail(strict=True, raises=KnownFailure, reason=KNOWN_FAILURES[key][0])]
    return pytest.param(block, id=f"{block.name}-{block.lang or 'untagged'}", marks=marks)


def _is_known(block: Block, key: tuple[str, str]) -> bool:
    return block.path.name == key[0] and block.first_line.startswith(key[1])


def _expect(block: Block, ok: bool, message: str) -> None:
    """Fail with `message` unless `ok`; as a KnownFailure if it is the block's known one."""
    if ok:
        return
    known = [v for k, v in KNOWN_FAILURES.items() if _is_known(block, k)]
    if known and known[0][1] in message:
        raise KnownFailure(message)
    raise AssertionError(message)


def _of(*langs: str) -> list[object]:
    return [_param(block) for block in BLOCKS if block.lang in langs]


def test_every_block_has_a_known_language() -> None:
    untagged = [
        f"{b.name} ({b.lang or 'no language'})" for b in BLOCKS if b.lang not in RUN + NOT_RUN
    ]
    assert not untagged, f"tag these fences with one of {RUN + NOT_RUN}: {untagged}"


def test_known_failures_name_existing_blocks() -> None:
    for key in KNOWN_FAILURES:
        assert sum(_is_known(b, key) for b in BLOCKS) == 1, f"no single block starts with {key}"


def test_markers_fit_their_blocks() -> None:
    allowed = {
        "python": {"continues", "given", "after", *COMPILE_ONLY},
        "bash": {"after", *CHECK_ONLY},
        "console": {"after"},
    }
    for block in BLOCKS:
        lang = "bash" if block.lang == "sh" else block.lang
        wrong = {key for key, _ in block.markers} - allowed.get(lang, set())
        assert not wrong, f"{block.name}: markers {wrong} do not apply to a {block.lang} block"
        for given in block.marked("given"):
            assert (ROOT / given).is_file(), f"{block.name}: given file {given} does not exist"


def test_the_finder_sees_markers_and_closes_fences(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n<!-- doc-test: needs-api-key -->\n```python\nx = 1\n```\n\n```bash\nls  # c\n```\n"
    )
    python, bash = blocks(page)
    assert (python.line, python.lang, python.text, python.markers) == (
        3,
        "python",
        "x = 1\n",
        (("needs-api-key", ""),),
    )
    assert (bash.markers, commands(bash)) == ((), ["ls"])
    page.write_text("```python\nx = 1\n")
    with pytest.raises(ValueError, match="never closed"):
        blocks(page)


# --- python ---------------------------------------------------------------------------------


@pytest.mark.parametrize("block", _of("python"))
def test_python_block_runs(block: Block, tmp_path: Path, after_copies: dict[str, Path]) -> None:
    chain = _chain(block)
    compile_only = [m for b in chain for m in COMPILE_ONLY if b.marked(m)]
    if compile_only:
        _check_compiles(chain, reason=compile_only[0])
        return
    after = [command for b in chain for command in b.marked("after")]
    cwd = after_copies[after[0]] if after else tmp_path
    script = _script(chain, [given for b in chain for given in b.marked("given")])
    result = _run([sys.executable, "-c", script], cwd=cwd, root=ROOT)
    _expect(block, result.returncode == 0, f"{block.name} failed:\n{result.stderr[-4000:]}")


def _chain(block: Block) -> list[Block]:
    """The block, after the earlier python blocks of its file that it continues."""
    same = [b for b in blocks(block.path) if b.lang == "python"]
    i = next(i for i, b in enumerate(same) if b.line == block.line)
    start = i
    while start > 0 and same[start].marked("continues"):
        start -= 1
    return same[start : i + 1]


def _script(chain: list[Block], givens: list[str]) -> str:
    """A script that runs the given files, the blocks (traced to their Markdown lines), checks."""
    lines = ["import runpy as _runpy", "_checks = []"]
    for given in givens:
        lines += [
            f"_given = _runpy.run_path({str(ROOT / given)!r})",
            "globals().update({k: v for k, v in _given.items() if not k.startswith('__')})",
            "_checks.append(_given.get('check'))",
        ]
    for b in chain:
        source = "\n" * b.line + b.text  # line numbers in tracebacks are the Markdown file's
        lines.append(f"exec(compile({source!r}, {str(b.path)!r}, 'exec'))")
    lines.append("[check(globals()) for check in _checks if check]")
    return "\n".join(lines) + "\n"


def _check_compiles(chain: list[Block], reason: str) -> None:
    """Not run (`reason`): it compiles, and every procval module and attribute it names exists."""
    names: set[str] = set()
    for b in chain:
        tree = compile("\n" * b.line + b.text, str(b.path), "exec", ast.PyCF_ONLY_AST)
        names |= _procval_names(tree)
    probe = (
        "import importlib, sys\n"
        "missing = []\n"
        f"for name in {sorted(names)!r}:\n"
        "    module, _, attr = name.rpartition(':')\n"
        "    obj = importlib.import_module(module)\n"
        "    for part in filter(None, attr.split('.')):\n"
        "        try:\n"
        "            obj = getattr(obj, part)\n"
        "        except AttributeError:\n"
        "            missing.append(name); break\n"
        "sys.exit(f'missing: {missing}' if missing else 0)\n"
    )
    result = _run([sys.executable, "-c", probe], cwd=ROOT, root=ROOT)
    assert result.returncode == 0, f"{chain[-1].name} ({reason}): {result.stderr[-2000:]}"


def _procval_names(tree: ast.AST) -> set[str]:
    """``module:attr.attr`` for each ``procval.x.y`` chain and ``from procval... import x``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("procval"):
            names |= {f"{node.module}:{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Attribute):
            parts = []
            inner: ast.expr = node
            while isinstance(inner, ast.Attribute):
                parts.insert(0, inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id == "procval":
                names.add("procval:" + ".".join(parts))
    return names


# --- bash -----------------------------------------------------------------------------------


@pytest.mark.parametrize("block", _of("bash", "sh"))
def test_bash_block_runs(block: Block, tmp_path: Path, after_copies: dict[str, Path]) -> None:
    if any(block.marked(m) for m in CHECK_ONLY):
        for command in commands(block):
            _check_not_run(block, command)
        return
    after = block.marked("after")
    copy = after_copies[after[0]] if after else _copy_repo(tmp_path / "repo")
    for command in commands(block):
        words = shlex.split(command)
        if words[:2] == ["pip", "install"]:
            _check_pip_install(block, words)
        elif "pytest" in words[:3]:
            ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
            assert command in ci, f"{block.name}: `{command}` is not the test command of .ci/run"
        else:
            result = _run(["bash", "-c", command], cwd=copy, root=copy)
            message = f"{block.name}: `{command}` exited {result.returncode}:\n{result.stderr}"
            _expect(block, result.returncode == 0, message[-4000:])


def _check_pip_install(block: Block, words: list[str]) -> None:
    """Names this project (or the repo root, for `-e .`) and only extras that pyproject has."""
    extras = _extras()
    for spec in (w for w in words[2:] if not w.startswith("-")):
        match = re.fullmatch(r"(procval|\.)(?:\[([\w,]+)\])?", spec)
        assert match, f"{block.name}: `pip install {spec}` names neither procval nor this repo"
        unknown = set((match.group(2) or "").split(",")) - {""} - extras
        assert not unknown, f"{block.name}: extras {unknown} are not in pyproject.toml {extras}"


def _extras() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, re.MULTILINE))


def _check_not_run(block: Block, command: str) -> None:
    """Valid shell; a `python SCRIPT` exists and takes the options used; pytest markers exist."""
    syntax = _run(["bash", "-n", "-c", command], cwd=ROOT, root=ROOT)
    assert syntax.returncode == 0, f"{block.name}: `{command}`: {syntax.stderr}"
    words = [w for w in shlex.split(command) if not re.fullmatch(r"[A-Z_]+=\S*", w)]
    if words[0] == "python" and words[1].endswith(".py") and "/" in words[1]:  # else the reader's
        assert (ROOT / words[1]).is_file(), f"{block.name}: {words[1]} does not exist"
        usage = _run([sys.executable, words[1], "--help"], cwd=ROOT, root=ROOT)
        assert usage.returncode == 0, f"{block.name}: {words[1]} --help: {usage.stderr}"
        for option in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
            assert option in usage.stdout, f"{block.name}: {words[1]} has no {option}"
    elif words[0] == "pytest" and "-m" in words:
        expression = words[words.index("-m") + 1]
        declared = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
        for marker in set(re.findall(r"\w+", expression)) - {"and", "or", "not"}:
            assert f'"{marker}:' in declared, f"{block.name}: pytest marker {marker} is undeclared"


# --- console --------------------------------------------------------------------------------


@pytest.mark.parametrize("block", _of("console"))
def test_console_block_prints_what_it_shows(
    block: Block, tmp_path: Path, after_copies: dict[str, Path]
) -> None:
    after = block.marked("after")
    copy = after_copies[after[0]] if after else _copy_repo(tmp_path / "repo")
    for command, expected in transcript(block):
        result = _run(["bash", "-c", command], cwd=copy, root=copy)
        assert result.returncode == 0, f"{block.name}: `{command}`:\n{result.stderr[-4000:]}"
        shown = [line.rstrip() for line in expected]
        while shown and not shown[-1]:
            shown.pop()
        printed = [line.rstrip() for line in result.stdout.splitlines()]
        if shown and shown[-1].strip() == "...":
            shown.pop()
            printed = printed[: len(shown)]
        assert printed == shown, f"{block.name}: `{command}` printed:\n{result.stdout}"


# --- text -----------------------------------------------------------------------------------


@pytest.mark.parametrize("block", _of(*NOT_RUN))
def test_text_block_holds_no_command(block: Block) -> None:
    """A transcript belongs in a console block, where it is checked, not in a text one."""
    prompts = [line for line in block.text.splitlines() if line.startswith("$ ")]
    assert not prompts, f"{block.name}: make it a console block, it shows {prompts}"


# --- shared ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def after_copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One copy of the repo per `after` command, that command run there once."""
    copies = {}
    for command in sorted({c for b in BLOCKS for c in b.marked("after")}):
        copy = _copy_repo(tmp_path_factory.mktemp("after") / "repo")
        # The store's folder is made here so that blocks after `procval run` are checked while
        # issue 13 item 3 is open; the README block that runs the command itself still shows it.
        words = shlex.split(command)
        if "--store" in words:
            (copy / words[words.index("--store") + 1]).parent.mkdir(parents=True, exist_ok=True)
        result = _run(["bash", "-c", command], cwd=copy, root=copy)
        assert result.returncode == 0, f"`{command}` failed:\n{result.stderr[-4000:]}"
        copies[command] = copy
    return copies


def _copy_repo(destination: Path) -> Path:
    """The repo as a fresh clone has it: without git data, caches, stores and reports."""
    shutil.copytree(
        ROOT,
        destination,
        ignore=shutil.ignore_patterns(".git", "__pycache__", ".*_cache", "runs", "*.html"),
    )
    return destination


def _run(argv: list[str], cwd: Path, root: Path) -> subprocess.CompletedProcess[str]:
    """Run with `root`'s procval and tests/helpers importable, bounded by TIMEOUT."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "tests")]))
    env.pop("PROCVAL_DEBUG", None)
    try:
        return subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"`{shlex.join(argv)[:200]}` did not finish in {TIMEOUT} s: {timeout.stderr}")
