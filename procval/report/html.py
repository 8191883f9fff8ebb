"""The HTML report: one self-contained file that opens offline, and the notebook views.

:func:`render_html` lays a run out top to bottom::

    Scores          per config: score, bootstrap interval, an inline SVG bar, errors, time
    Groups          with ``group_by``: per config, each group's score, interval and bar
    Differences     every other config minus the best one, paired: interval (inline SVG),
                    p-value, Holm-adjusted p-value, wins / losses / ties; with named scores
                    or groups, one line per score and group, Holm across all of them
    Errors          counts by error type and config, one sample traceback per type, and how
                    to list every failed example
    Disagreements   the examples whose scores differ between configs: input, each config's
                    prediction and score (capped, saying how many were left out)
    Run             sessions (started, ended, status, host) and per config its env names,
                    seed, fingerprint, identity, workers, threads, versions, hosts
                    (:mod:`procval.report.runinfo`)

Nothing is fetched: no scripts, fonts or stylesheets, and a Content-Security-Policy that forbids
them. Every value from a run (names, inputs, predictions, messages) goes through
:func:`procval.report.markup.esc`.
"""

from __future__ import annotations

import math
import shlex
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, cast

from procval._version import __version__
from procval.report.compare import Comparison, UnalignedResultsError, compare
from procval.report.markup import (
    as_text,
    axis_svg,
    bar_svg,
    ci_text,
    clip,
    diff_svg,
    domain,
    esc,
    num,
    plural,
)
from procval.report.protocol import ResultLike, RowLike, is_result, per_example
from procval.report.runinfo import run_section, run_span
from procval.report.stats import Interval, holm
from procval.report.text import format_p, per_correct

__all__ = ["render_html"]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;
 margin:0;background:#f6f8fa}
main{max-width:1120px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 8px;
 border-bottom:1px solid #d0d7de;padding-bottom:4px}h3{font-size:15px;margin:16px 0 4px}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.meta,.note{color:#59636e}.note{font-size:13px}
table{border-collapse:collapse;width:100%;margin:8px 0}
th,td{padding:5px 8px;border-bottom:1px solid #e6e9ec;text-align:left;vertical-align:top}
th{background:#f0f3f6;font-weight:600}td.num,th.num{text-align:right;
 font-variant-numeric:tabular-nums;white-space:nowrap}
tr.best td{background:#eef6ff}.cell{white-space:pre-wrap;word-break:break-word;max-width:360px;
 font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.score{display:inline-block;margin-top:3px;padding:0 6px;border-radius:9px;font-size:12px;
 font-weight:600;background:#eaeef2}.win .score{background:#cdf0d5;color:#0f5323}
.loss .score{background:#ffd8d3;color:#82071e}.err{color:#82071e}
svg{display:block}details{margin:6px 0}summary{cursor:pointer}
pre{background:#f6f8fa;padding:8px;overflow:auto;font-size:12px;max-height:320px}
footer{margin-top:40px;color:#8c959f;font-size:12px}
"""
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def render_html(
    results: Mapping[str, ResultLike] | Sequence[ResultLike] | ResultLike,
    *,
    title: str = "procval report",
    max_rows: int = 50,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
    details: Mapping[str, Any] | None = None,
) -> str:
    """Render results as one self-contained HTML page (see the module docstring).

    Args:
        results: a :class:`procval.Results` mapping, a list of results, or one result.
        title: the page's title and heading.
        max_rows: at most this many disagreeing examples are listed.
        confidence: level of the bootstrap intervals.
        resamples: bootstrap resamples (and sign flips) per interval and comparison.
        seed: seed of the resamples.
        details: what the store says about the run, as
            :func:`procval.store.readers.run_details` returns it (``procval report`` passes
            it); without it the run section shows only what the rows carry.

    Returns:
        The page, as a string to write to a ``.html`` file.
    """
    runs = _as_list(results)
    stats: dict[str, Any] = {"confidence": confidence, "resamples": resamples, "seed": seed}
    intervals = [r.ci(**stats) for r in runs]
    best = _best(runs)
    n = max((len(r) for r in runs), default=0)
    parts = [
        f'<h1>{esc(title)}</h1><p class="meta">{len(runs)} config{plural(len(runs))} · '
        f"{n} example{plural(n)} · {confidence:.0%} intervals from a bootstrap over examples "
        f"({resamples} resamples, seed {seed})</p>",
        f"<p class='meta'>{esc(run_span(details))}</p>" if run_span(details) else "",
        _scores_section(runs, intervals, best, confidence),
        _usage_section(runs),
        _limits_section(runs),
        _named_scores_section(runs),
        _groups_section(runs, stats),
        _differences_section(runs, best, stats),
        _errors_section(runs, (details or {}).get("path")),
        _disagreements_section(runs, max_rows),
        run_section(runs, details),
    ]
    return _page(title, "".join(parts))


# ------------------------------------------------------------------------------------- sections


def _named_scores_section(runs: list[ResultLike]) -> str:
    """A table of every named score's mean per config ("" when each config has one score)."""
    means = [dict(getattr(run, "scores", None) or {}) if run.totals.n else {} for run in runs]
    names = list(dict.fromkeys(name for found in means for name in found))
    if names in ([], ["score"]):
        return ""
    head = "".join(f"<th class='num'>{esc(name)}</th>" for name in names)
    rows = "".join(
        f"<tr><td>{esc(run.config)}</td>"
        + "".join(f"<td class='num'>{num(found.get(n, math.nan))}</td>" for n in names)
        + "</tr>"
        for run, found in zip(runs, means, strict=True)
    )
    return (
        "<section id='named-scores'><h2>Named scores</h2><p class='note'>the mean of each "
        "score (the primary one first is the score above)</p><table><tr><th>config</th>"
        f"{head}</tr>{rows}</table></section>"
    )


def _groups_section(runs: list[ResultLike], stats: dict[str, Any]) -> str:
    """Per config with groups, a table of each group's score and interval ("" without)."""
    tables = []
    for run in runs:
        split = getattr(run, "by_group", None)
        try:
            groups = split() if callable(split) and run.totals.n else {}
        except ValueError:  # no groups
            continue
        intervals = [g.ci(**stats) for g in groups.values()]
        lo, hi = domain([g.score for g in groups.values()], intervals)
        rows = "".join(
            f"<tr><td>{esc(name)}</td><td class='num'>{num(g.score)}</td>"
            f"<td class='num'>{ci_text(ci)}</td><td>{bar_svg(g.score, ci, lo, hi)}</td>"
            f"<td class='num'>{len(per_example(g))}</td><td class='num'>{g.totals.errors}</td></tr>"
            for (name, g), ci in zip(groups.items(), intervals, strict=True)
        )
        tables.append(
            f"<h3>{esc(run.config)}</h3><table><tr><th>group</th><th class='num'>score</th>"
            f"<th class='num'>{stats['confidence']:.0%} CI</th><th>{axis_svg(lo, hi)}</th>"
            f"<th class='num'>examples</th><th class='num'>errors</th></tr>{rows}</table>"
        )
    if not tables:
        return ""
    return "<section id='groups'><h2>Scores by group</h2>" + "".join(tables) + "</section>"


def _scores_section(
    runs: list[ResultLike], intervals: list[Interval], best: int | None, confidence: float
) -> str:
    lo, hi = domain([r.score for r in runs], intervals)
    rows = []
    for i, (run, interval) in enumerate(zip(runs, intervals, strict=True)):
        totals = run.totals
        rows.append(
            f"<tr{' class=best' if i == best else ''}><td>{esc(run.config)}"
            f"{' <b>(best)</b>' if i == best else ''}</td>"
            f"<td class='num'>{num(run.score)}</td><td class='num'>{ci_text(interval)}</td>"
            f"<td>{bar_svg(run.score, interval, lo, hi)}</td><td class='num'>{totals.n}</td>"
            f"<td class='num'>{totals.errors}</td><td class='num'>{run.duration:.2f}s</td></tr>"
        )
    return (
        "<section id='scores'><h2>Scores</h2><table><tr><th>config</th><th class='num'>score</th>"
        f"<th class='num'>{confidence:.0%} CI</th><th>{axis_svg(lo, hi)}</th>"
        "<th class='num'>examples</th><th class='num'>errors</th><th class='num'>time</th></tr>"
        + "".join(rows)
        + "</table><p class='note'>Failed examples count with the run's failure score. "
        "Bars start at the axis minimum; whiskers show the interval.</p></section>"
    )


def _usage_section(runs: list[ResultLike]) -> str:
    """Tokens and cost per config and model, and per correct answer (nothing when none)."""
    rows = []
    for run in runs:
        usage = getattr(run, "usage", None) or {}
        if not usage:
            continue
        tokens, cost = per_correct(run)
        per = f"{tokens:,.1f}" + ("" if cost is None else f" · {cost:.4g}")
        for i, (model, u) in enumerate(usage.items()):
            spent = "unknown" if u.cost is None else f"{u.cost:.4g}"
            rows.append(
                f"<tr><td>{esc(run.config) if i == 0 else ''}</td><td>{esc(model)}</td>"
                f"<td class='num'>{u.calls:,}</td><td class='num'>{u.cached_calls:,}</td>"
                f"<td class='num'>{u.prompt_tokens:,}</td>"
                f"<td class='num'>{u.completion_tokens:,}</td>"
                f"<td class='num'>{u.total_tokens:,}</td><td class='num'>{spent}</td>"
                f"<td class='num'>{per if i == 0 else ''}</td></tr>"
            )
    if not rows:
        return ""
    return (
        "<section id='usage'><h2>Usage</h2><table><tr><th>config</th><th>model</th>"
        "<th class='num'>calls</th><th class='num'>cached</th><th class='num'>prompt</th>"
        "<th class='num'>completion</th><th class='num'>tokens</th><th class='num'>cost</th>"
        "<th class='num'>per correct answer (tokens · cost)</th></tr>"
        + "".join(rows)
        + "</table><p class='note'>Spend of every call, failed examples included; cached calls "
        "cost no tokens. Correct answers: the scores summed.</p></section>"
    )


def _limits_section(runs: list[ResultLike]) -> str:
    """What each config's rate-limited calls met, per key: calls, 429s, waits (nothing if none)."""
    rows = []
    for run in runs:
        for i, (key, c) in enumerate((getattr(run, "limits", None) or {}).items()):
            rows.append(
                f"<tr><td>{esc(run.config) if i == 0 else ''}</td><td>{esc(key)}</td>"
                + "".join(
                    f"<td class='num'>{int(c.get(name, 0)):,}</td>"
                    for name in ("calls", "rate_limited", "waits")
                )
                + f"<td class='num'>{c.get('wait_seconds', 0.0):.1f}s</td>"
                f"<td class='num'>{int(c.get('tokens', 0)):,}</td></tr>"
            )
    if not rows:
        return ""
    return (
        "<section id='limits'><h2>Rate limits</h2><table><tr><th>config</th><th>key</th>"
        "<th class='num'>calls</th><th class='num'>answered 429</th><th class='num'>waited</th>"
        "<th class='num'>wait time</th><th class='num'>tokens</th></tr>"
        + "".join(rows)
        + "</table><p class='note'>Calls count every attempt (a call answered 429 is retried "
        "alone); waits are the calls the limits held back. Summed over the run's sessions."
        "</p></section>"
    )


def _differences_section(runs: list[ResultLike], best: int | None, stats: dict[str, Any]) -> str:
    head = "<section id='differences'><h2>Paired differences against the best config</h2>"
    if best is None or len(runs) < 2:
        return head + "<p class='note'>Only one config: there is nothing to compare.</p></section>"
    base = runs[best]
    found: list[Comparison] = []
    refused: list[str] = []
    for run in runs:
        if run is base:
            continue
        try:
            found.extend(compare(run, base, common_only=True, every=True, **stats))
        except UnalignedResultsError as exc:
            refused.append(str(exc))
    adjusted = holm([c.p_value for c in found])
    named = any(c.score_name is not None for c in found)
    grouped = any(c.group is not None for c in found)
    bound = max([abs(x) for c in found for x in (*c.ci, c.difference)] + [0.01]) * 1.1
    rows = []
    for c, p in zip(found, adjusted, strict=True):
        rows.append(
            f"<tr><td>{esc(c.a)}</td>"
            + (f"<td>{esc(c.score_name)}</td>" if named else "")
            + (f"<td>{esc(c.group or '(all)')}</td>" if grouped else "")
            + f"<td class='num'>{num(c.difference, signed=True)}</td>"
            f"<td class='num'>{ci_text(c.ci, signed=True)}</td>"
            f"<td>{diff_svg(c.difference, c.ci, bound)}</td>"
            f"<td class='num'>{format_p(c.p_value)}</td><td class='num'>{format_p(p)}</td>"
            f"<td class='num'>{len(c.wins)} / {len(c.losses)} / {len(c.ties)}</td>"
            f"<td class='num'>{c.n}</td><td>{esc(c.test)}</td></tr>"
        )
    refusals = "".join(f"<p class='err'>{esc(message)}</p>" for message in refused)
    return (
        head + f"<p>Each config minus <b>{esc(base.config)}</b>, example by example.</p>"
        "<table><tr><th>config</th>"
        + ("<th>score</th>" if named else "")
        + ("<th>group</th>" if grouped else "")
        + "<th class='num'>difference</th>"
        f"<th class='num'>{stats['confidence']:.0%} CI</th><th>{axis_svg(-bound, bound)}</th>"
        "<th class='num'>p</th><th class='num'>p (Holm)</th>"
        "<th class='num'>wins / losses / ties</th><th class='num'>paired</th><th>test</th></tr>"
        + "".join(rows)
        + "</table>"
        + refusals
        + "<p class='note'>Intervals: paired bootstrap over examples. p: exact sign test "
        "(McNemar) for 0/1 scores, paired sign-flip permutation test otherwise; Holm's "
        "adjustment accounts for testing several configs (and scores and groups) at once.</p>"
        "</section>"
    )


def _errors_section(runs: list[ResultLike], store: str | None) -> str:
    head = "<section id='errors'><h2>Errors by type</h2>"
    counts = {run.config: run.error_types for run in runs}
    kinds = Counter[str]()
    for per_run in counts.values():
        kinds.update(per_run)
    if not kinds:
        return head + "<p class='note'>No example failed.</p></section>"
    names = "".join(f"<th class='num'>{esc(run.config)}</th>" for run in runs)
    rows = []
    for kind, _ in kinds.most_common():
        cells = "".join(f"<td class='num'>{counts[run.config].get(kind, 0)}</td>" for run in runs)
        rows.append(f"<tr><td>{esc(kind)}</td>{cells}</tr>")
    samples = []
    for kind, total in kinds.most_common(10):
        row = next(r for run in runs for r in run.errors if r.error and r.error.type == kind)
        assert row.error is not None
        samples.append(
            f"<details><summary><b>{esc(kind)}</b> ({total}): {esc(clip(row.error.message))}"
            f"</summary><p class='note'>config {esc(row.config)}, example "
            f"{esc(repr(row.example_id))}</p><pre>{esc(row.error.traceback or row.error.message)}"
            "</pre></details>"
        )
    return (
        head + f"<table><tr><th>error type</th>{names}</tr>" + "".join(rows) + "</table>"
        "<p class='note'>One example of each type (open for the traceback):</p>"
        + "".join(samples)
        + _every_error_note(store)
        + "</section>"
    )


def _every_error_note(store: str | None) -> str:
    """How to see every failed example, not only the first of each type."""
    path = shlex.quote(store) if store else "STORE"
    listing = f"procval report {path} --errors"
    export = f"procval export {path} --format jsonl"
    where = (
        f"<code>{esc(listing)}</code> lists one line each; <code>{esc(export)}</code> has "
        "their tracebacks"
    )
    if not store:
        where += " (for a run with a store), <code>result.errors</code> in Python"
    return f"<p class='note'>Every failed example: {where}.</p>"


def _disagreements_section(runs: list[ResultLike], max_rows: int) -> str:
    head = "<section id='disagreements'><h2>Examples on which the configs disagree</h2>"
    if len(runs) < 2:
        return head + "<p class='note'>Only one config.</p></section>"
    reduced = [per_example(run) for run in runs]  # with epochs: reduced over them
    by_id = [{row.example_id: row for row in found} for found in reduced]
    order: dict[int | str, int] = {}
    for found in reduced:
        for row in found:
            order.setdefault(row.example_id, row.index)
    disagree = []
    for example_id, index in order.items():
        scores = [m[example_id].score for m in by_id if example_id in m]
        if len(set(scores)) > 1:
            disagree.append((-(max(scores) - min(scores)), index, example_id))
    if not disagree:
        return head + "<p class='note'>All configs scored every example the same.</p></section>"
    disagree.sort(key=lambda t: (t[0], t[1], str(t[2])))
    shown = disagree[:max_rows]
    left_out = len(disagree) - len(shown)
    names = "".join(f"<th>{esc(run.config)}</th>" for run in runs)
    rows = [_disagreement_row(example_id, by_id) for _, _, example_id in shown]
    note = f"{len(disagree)} of {len(order)} examples got different scores"
    if left_out:
        note += (
            f"; the {len(shown)} with the widest spread are shown, {left_out} more were left out"
        )
    return (
        head
        + f"<p>{note}.</p><table><tr><th>id</th><th>input</th>{names}</tr>"
        + "".join(rows)
        + "</table></section>"
    )


def _disagreement_row(example_id: int | str, by_id: list[dict[int | str, RowLike]]) -> str:
    present = [m[example_id] for m in by_id if example_id in m]
    top = max(r.score for r in present)
    low = min(r.score for r in present)
    cells = []
    for m in by_id:
        row = m.get(example_id)
        if row is None:
            cells.append("<td class='note'>not run</td>")
            continue
        kind = "win" if row.score == top else "loss" if row.score == low else ""
        if row.error is not None:
            shown = f"<span class='err'>{esc(clip(str(row.error)))}</span>"
        else:
            shown = esc(clip(as_text(row.prediction)))
        cells.append(
            f"<td class='{kind}'><div class='cell'>{shown}</div>"
            f"<span class='score'>{num(row.score, digits=3)}</span></td>"
        )
    example = esc(clip(as_text(present[0].example)))
    return (
        f"<tr><td>{esc(example_id)}</td><td><div class='cell'>{example}</div></td>"
        + "".join(cells)
        + "</tr>"
    )


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body><main>{body}"
        f"<footer>Generated by procval {esc(__version__)}.</footer></main></body></html>\n"
    )


def _as_list(
    results: Mapping[str, ResultLike] | Sequence[ResultLike] | ResultLike,
) -> list[ResultLike]:
    if isinstance(results, Mapping):
        return list(results.values())
    if is_result(results):
        return [results]
    return list(cast("Sequence[ResultLike]", results))


def _best(runs: list[ResultLike]) -> int | None:
    scored = [(r.score, -i) for i, r in enumerate(runs) if math.isfinite(r.score)]
    return -max(scored)[1] if scored else None
