"""The ``procval`` command line (also ``python -m procval``).

::

    procval run TASK --store PATH [--config NAME ...] [--workers N] [--threads N] [--timeout S]
                [--rate-limit KEY:rpm=N,tpm=N,inflight=N ...]
                [--epochs K] [--primary NAME] [--group-by KEY]
                [--retries N] [--max-errors N] [--limit N] [--fresh] [--retry-errors]
                [--max-tokens N] [--max-cost X]
                [--backend loky|ray] [--no-progress]
    procval report PATH [--html FILE] [--errors]
    procval compare PATH A B [--confidence C] [--resamples N] [--seed N] [--common-only]
                [--examples N]
    procval export PATH [--format jsonl|csv] [--output FILE] [--config NAME ...]
    procval rescore PATH --metric FILE.py:NAME [--config NAME ...] [--as NAME] [--task TASK]
                [--workers N] [--threads N] [--timeout S] [--primary NAME] [--no-progress]
    procval repair PATH NEW

``TASK`` is ``path/to/file.py:name`` or ``module:name`` (see :mod:`procval.task`).

Exit status: 0 when the run completed (even if some examples failed), 2 for bad input (a wrong
task path or flag, a missing store or one of another format, a store that another live run is
writing, a config that cannot be set up: the other configs run to completion first, and the
failed one's worker traceback is printed), 3 when ``--max-errors`` stopped the run, 4 when a
budget (``--max-tokens``, ``--max-cost``) stopped a config (the others ran on), 130 when
interrupted (Ctrl-C or SIGTERM; a second one exits at once). Errors are one line on stderr,
``procval: error: ...``, in the words of the flags; set ``PROCVAL_DEBUG=1`` to see the
traceback too (the exit status stays the same).

Each subcommand is one function registered with :func:`command`: adding a subcommand is that
function and its decorator line.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shlex
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from procval._cli_args import COUNT, COUNT0, SECONDS, amount, rate_limit
from procval._cli_util import (
    EXIT_BUDGET,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TOO_MANY_ERRORS,
    EXIT_USAGE,
    _budget_resume,
    _chain,
    _count,
    _first_line,
    _install_signal_handlers,
    _output,
    _resume_command,
)
from procval.errors import ProcvalError, SetupError, StoreError, StoreFullError, TooManyErrors
from procval.results import Results
from procval.store import readers as store
from procval.store.sources import stored_configs
from procval.task import load_task

Handler = Callable[[argparse.Namespace], int]
Argument = tuple[tuple[str, ...], dict[str, Any]]


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, arguments and the function that runs it."""

    name: str
    help: str
    arguments: tuple[Argument, ...]
    handler: Handler


COMMANDS: dict[str, Command] = {}


def arg(*flags: str, **options: Any) -> Argument:
    """An argument of a subcommand, as ``ArgumentParser.add_argument(*flags, **options)``."""
    return flags, options


def command(name: str, help: str, *arguments: Argument) -> Callable[[Handler], Handler]:
    """Register the decorated function as the subcommand ``name``.

    Args:
        name: the subcommand, e.g. ``"report"``.
        help: one line for ``procval --help``.
        *arguments: the subcommand's arguments, each made with :func:`arg`.
    """

    def register(handler: Handler) -> Handler:
        COMMANDS[name] = Command(name, help, arguments, handler)
        return handler

    return register


class Failure(Exception):
    """A failure reported as one line on stderr with a given exit status."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------- subcommands


@command(
    "run",
    "run a task into a run store, or resume it",
    arg("task", help="the task: path/to/file.py:name or module:name"),
    arg("--store", required=True, metavar="PATH", help="the run store; resumed if it exists"),
    arg("--config", action="extend", nargs="+", metavar="NAME", help="run only these configs"),
    arg("--workers", type=COUNT, metavar="N", help="worker processes in total (default: CPUs)"),
    arg("--threads", type=COUNT, metavar="N", help="examples at once in each worker"),
    arg("--timeout", type=SECONDS, metavar="S", help="seconds an example may run"),
    arg("--retries", type=COUNT0, metavar="N", help="retries of an example whose program raises"),
    arg("--max-errors", type=COUNT0, metavar="N", help="stop once more examples than N failed"),
    arg("--max-tokens", type=COUNT, metavar="N", help="stop a config once its rows spent N tokens"),
    arg("--max-cost", type=amount, metavar="X", help="stop a config once its rows cost X"),
    arg("--rate-limit", action="append", type=rate_limit, metavar="KEY:rpm=N,tpm=N,inflight=N",
        help="limits shared by every config's calls under KEY (repeat for more keys)"),
    arg("--limit", type=COUNT, metavar="N", help="evaluate only the first N examples"),
    arg("--epochs", type=COUNT, metavar="K", help="run each example K times (resume adds epochs)"),
    arg("--primary", metavar="NAME", help="the named score that is the score"),
    arg("--group-by", metavar="KEY", help="scores by group: the examples' key or attribute KEY"),
    arg("--fresh", action="store_true", help="discard these configs' stored rows first"),
    arg("--retry-errors", action="store_true", help="rerun examples whose stored row failed"),
    arg("--backend", choices=("loky", "ray"), help="where workers run (default: loky, local)"),
    arg("--no-progress", action="store_true", help="no progress bars on stderr"),
)  # fmt: skip
def run(args: argparse.Namespace) -> int:
    """``procval run``: evaluate a task's configs into a store and print a summary table."""
    task = load_task(args.task)
    names = list(args.config or task.config_map())
    resume = _resume_command(args.argv)
    try:
        results = task.evaluate(
            only=args.config,
            limit=args.limit,
            store=args.store,
            fresh=args.fresh,
            retry_errors=args.retry_errors,
            backend=args.backend,
            workers=args.workers,
            threads=args.threads,
            timeout=args.timeout,
            retries=args.retries,
            max_errors=args.max_errors,
            max_tokens=args.max_tokens,
            max_cost=args.max_cost,
            rate_limit=args.rate_limit,
            epochs=args.epochs,
            primary=args.primary,
            group_by=args.group_by,
            progress=False if args.no_progress else None,
        )
    except TooManyErrors as exc:
        if isinstance(exc.results, Results):
            _print_summary(exc.results)
        # Only this call's failures count toward --max-errors; rerun the failed ones once fixed.
        again = _resume_command(args.argv, add=("--retry-errors",))
        limit = f"--max-errors {args.max_errors}" if args.max_errors is not None else (
            f"the task's max_errors={exc.limit}"
        )  # fmt: skip
        raise Failure(
            f"{exc.failed} examples failed, more than {limit}; the run stopped early (examples "
            f"already running finish first). Resume with: {again}",
            EXIT_TOO_MANY_ERRORS,
        ) from exc
    except StoreFullError as exc:  # the rows so far are stored: say how to resume
        raise Failure(f"{_first_line(exc).rstrip('.')}: {resume}") from exc
    except SetupError as exc:
        if isinstance(exc.results, Results) and exc.results:
            _print_summary(exc.results)
            print(f"rows are in {args.store}")
        raise Failure(_setup_failure(exc)) from exc
    except KeyboardInterrupt:
        rows = _count(args.store, names)
        print(f"procval: interrupted; {rows} rows are in the store. Resume with: {resume}",
              file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    _print_summary(results)
    print(f"rows are in {args.store}; see them with: procval report {shlex.quote(args.store)}")
    stopped = _budget_resume(args.argv, results)
    for line in stopped:
        print(line, file=sys.stderr)
    return EXIT_BUDGET if stopped else EXIT_OK


def _setup_failure(exc: SetupError) -> str:
    """Print each failed config's worker traceback (the user's frames); return the one line."""
    last = ""
    for name, worker_traceback in exc.tracebacks.items():
        if worker_traceback.strip():
            print(f"config {name!r} could not start; its worker's traceback:", file=sys.stderr)
            print(worker_traceback.rstrip(), file=sys.stderr)
            last = last or worker_traceback.strip().splitlines()[-1]
    first = str(exc).splitlines()[0].removesuffix(SetupError.TRACEBACK_FOLLOWS)
    return f"{first} [{last}]; the worker's traceback is above" if last else first


def _print_summary(results: Results) -> None:
    """The table, each config's errors by type, and on a resume what was done before and now."""
    print(results.summary())
    for name, result in results.items():
        if result.error_types:
            kinds = ", ".join(f"{n} x {kind}" for kind, n in result.error_types.items())
            print(f"errors in {name!r}: {kinds}")
    if any(result.found for result in results.values()):
        for name, result in results.items():
            print(
                f"resumed {name!r}: {result.found} examples were already done, "
                f"{result.added} ran now"
            )


@command(
    "report",
    "per config: score, examples, errors by type, duration",
    arg("path", help="the run store"),
    arg("--html", metavar="FILE", help="also write a self-contained HTML report to FILE"),
    arg("--errors", action="store_true", help="also list every failed example, one per line"),
)
def report(args: argparse.Namespace) -> int:
    """``procval report``: a summary of every config in a store (rows are not read).

    Each error type comes with its first failed example and message; ``--errors`` lists every
    failed example (id, type, first line of the message), streamed from the store.
    """
    results = store.load(args.path)
    sessions = store.sessions(args.path)
    if sessions:
        last = sessions[-1]
        status = {"running": "running, or killed"}.get(last["status"], last["status"])
        print(f"{args.path}: {len(sessions)} session(s), the last one {status}")
    if not results:
        print("no config has been stored yet")
    kinds = stored_configs(args.path, counts=False)  # no row is read
    for name, result in results.items():
        print(result.summary())
        if kinds[name].kind == "rescore":
            print(f"  a rescore of {kinds[name].source!r}: its predictions, scored again")
    failed = any(result.totals.errors for result in results.values())
    if args.errors:
        _print_errors(args.path)
    elif failed:
        path = shlex.quote(args.path)
        print(f"every failed example: procval report {path} --errors "
              f"(with tracebacks: procval export {path} --format jsonl)")  # fmt: skip
    if args.html:
        _write_html(results, args.path, args.html)
    return EXIT_OK


def _print_errors(path: str) -> None:
    """Every failed example, config by config in dataset order: ``id  type: message``."""
    config = None
    for name, example_id, kind, message in store.iter_errors(path):
        if name != config:
            config = name
            print(f"errors in {name!r}:")
        lines = message.strip().splitlines()
        print(f"  {example_id}  {kind}: {lines[0].strip() if lines else ''}".rstrip())


def _write_html(results: Results, store_path: str, path: str) -> None:
    from procval.report.html import render_html

    title = f"procval report: {os.path.basename(store_path)}"
    page = render_html(results, title=title, details=store.run_details(store_path))
    with open(path, "w", encoding="utf-8") as out:
        out.write(page)
    print(f"wrote {path}")


@command(
    "compare",
    "compare two configs example by example: difference, interval, p-value, flips",
    arg("path", help="the run store"),
    arg("a", help="a config"),
    arg("b", help="the config to compare it with (the difference is a - b)"),
    arg("--confidence", type=float, default=0.95, help="interval level (default: 0.95)"),
    arg("--resamples", type=int, default=10_000, metavar="N", help="default: 10000"),
    arg("--seed", type=int, default=0, metavar="N", help="seed of the resamples (default: 0)"),
    arg("--common-only", action="store_true", help="pair on the ids both configs have"),
    arg("--examples", type=int, default=5, metavar="N", help="flipped examples to list"),
)  # fmt: skip
def compare(args: argparse.Namespace) -> int:
    """``procval compare``: the paired comparison of two stored configs, in a few lines."""
    from procval.report.compare import compare as paired
    from procval.report.text import describe, spend_lines

    results = store.load(args.path)
    for name in (args.a, args.b):
        if name not in results:
            raise Failure(f"no config named {name!r} in {args.path}; there are {list(results)}")
    a, b = results[args.a], results[args.b]
    stats = {"confidence": args.confidence, "resamples": args.resamples, "seed": args.seed}
    comparison = paired(a, b, common_only=args.common_only, **stats)
    print(describe(comparison, a, b, examples=args.examples))
    every = paired(a, b, every=True, common_only=args.common_only, **stats)  # scores x groups
    if len(every) > 1:
        print("every score and group (p (Holm): adjusted for all of these comparisons):")
        print(repr(every))
    for label, result in ((f"a ({args.a}): ", a), (f"b ({args.b}): ", b)):
        for line in spend_lines(label, result):
            print(line)
    return EXIT_OK


@command(
    "export",
    "write the stored rows as JSON lines or CSV",
    arg("path", help="the run store"),
    arg("--format", choices=("jsonl", "csv"), default="jsonl", help="default: jsonl"),
    arg("--output", "-o", metavar="FILE", help="write to FILE instead of stdout"),
    arg("--config", action="extend", nargs="+", metavar="NAME", help="only these configs"),
)
def export(args: argparse.Namespace) -> int:
    """``procval export``: stream rows, config by config in dataset order, to a file or stdout."""
    rows = store.iter_rows(args.path, args.config)
    first = next(rows, None)  # opens and checks the store before any output file is made
    written = 0
    try:
        with _output(args.output) as out:  # a file appears only once every row is in it
            if first is None:
                return EXIT_OK
            all_rows = _chain(first, rows)
            if args.format == "jsonl":
                for row in all_rows:
                    out.write(json.dumps(row) + "\n")
                    written += 1
            else:
                names = store.score_names(args.path, args.config)
                columns = [c for c in first if c != "scores"]
                at = columns.index("score") + 1  # score.NAME columns right after score
                columns[at:at] = [f"score.{name}" for name in names]
                writer = csv.DictWriter(out, fieldnames=columns)
                writer.writeheader()
                for row in all_rows:
                    for name, value in (row.pop("scores") or {}).items():
                        row[f"score.{name}"] = value
                    row["example"] = json.dumps(row["example"])
                    row["prediction"] = json.dumps(row["prediction"])
                    for key in ("extra", "usage"):  # empty when none
                        row[key] = "" if row[key] is None else json.dumps(row[key])
                    writer.writerow(row)
                    written += 1
    except StoreError as exc:  # e.g. a damaged page halfway: never a silently partial export
        where = (
            f"nothing was written to {args.output}"
            if args.output
            else f"the output is INCOMPLETE: only its first {written} rows went to stdout"
        )
        raise Failure(f"{_first_line(exc)}; {where}") from exc
    return EXIT_OK


@command(
    "rescore",
    "score a store's predictions with another metric, as new configs (no program is called)",
    arg("path", help="the run store"),
    arg("--metric", required=True, metavar="FILE.py:NAME", help="the metric (or module:NAME)"),
    arg("--config", action="extend", nargs="+", metavar="NAME", help="only these configs"),
    arg("--as", dest="name", metavar="NAME", help="the new config's name (one config)"),
    arg("--task", metavar="TASK", help="a task whose configs are installed (a setup, env)"),
    arg("--workers", type=COUNT, metavar="N", help="worker processes in total (default: CPUs)"),
    arg("--threads", type=COUNT, metavar="N", help="examples at once in each worker"),
    arg("--timeout", type=SECONDS, metavar="S", help="seconds the metric may take per example"),
    arg("--primary", metavar="NAME", help="the named score that is the score"),
    arg("--no-progress", action="store_true", help="no progress bars on stderr"),
)  # fmt: skip
def rescore(args: argparse.Namespace) -> int:
    """``procval rescore``: each chosen config's stored predictions, scored into a new config."""
    from procval.run.rescore import rescore as score_again
    from procval.task import load_object

    metric = load_object(args.metric, "metric")
    configs: list[Any] | None = args.config
    if args.task:
        given = load_task(args.task).config_map()
        configs = [given.get(n, n) for n in args.config or given]
    results = score_again(
        args.path, metric, configs=configs, name=args.name, workers=args.workers,
        threads=args.threads or 1, timeout=args.timeout, primary=args.primary,
        progress=False if args.no_progress else None,
    )  # fmt: skip
    _print_summary(results)
    stored = stored_configs(args.path, counts=False)
    for name in results:  # same predictions, new scores: a paired comparison
        print(f"compare with its source: procval compare {shlex.quote(args.path)} "
              f"{shlex.quote(name)} {shlex.quote(stored[name].source or '')}")  # fmt: skip
    return EXIT_OK


@command(
    "repair",
    "copy every readable row of a damaged run store into a new store (then resume on it)",
    arg("path", help="the damaged run store (only read)"),
    arg("new", help="the new store to write (must not exist)"),
)
def repair(args: argparse.Namespace) -> int:
    """``procval repair``: salvage a damaged store's readable rows, configs and sessions."""
    from procval.store.repair import repair as salvage

    saved = salvage(args.path, args.new)
    lost = f"; {saved.lost} rows could not be read (a run on {args.new} runs them again)"
    print(
        f"repaired {args.path} into {args.new}: {saved.rows} rows of {saved.configs} configs"
        + (lost if saved.lost else "")
    )
    if saved.unlisted:  # a damaged configs table: the rows are there, their config's record not
        print(
            f"the records of configs {', '.join(map(repr, saved.unlisted))} could not be read: "
            f"their rows show once their task runs on {args.new} (it keeps them and runs only "
            "the missing ones)"
        )
    return EXIT_OK


# ---------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one subparser per registered command."""
    parser = argparse.ArgumentParser(
        prog="procval",
        description="Evaluate a program over a dataset with a metric, each config in its own "
        "worker processes.",
        allow_abbrev=False,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        sub = subparsers.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        sub.allow_abbrev = False  # so that "--fre" cannot mean --fresh
        for flags, options in cmd.arguments:
            sub.add_argument(*flags, **options)
        sub.set_defaults(handler=cmd.handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments)
    args.argv = arguments
    restore = _install_signal_handlers()
    try:
        return int(args.handler(args))
    except (Failure, ProcvalError, ValueError, TypeError) as exc:
        if os.environ.get("PROCVAL_DEBUG"):
            traceback.print_exc()  # the details, with the same exit status
        print(f"procval: error: {_first_line(exc)}", file=sys.stderr)
        return exc.status if isinstance(exc, Failure) else EXIT_USAGE
    except KeyboardInterrupt:
        print("procval: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. procval export ... | head
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        restore()
