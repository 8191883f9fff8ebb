"""The HTML report's run section: when the run happened and what each config was.

From a store (``details`` as :func:`procval.store.readers.run_details` returns them)::

    Sessions   per session: started, ended, how long, status, host, pid
    Configs    per config: env variable names (never values, nor their hashes), seed,
               fingerprint, identity, worker processes that produced rows, threads per worker,
               workers asked for, procval and Python versions, hosts of its workers

Without a store (results in memory) only what the rows carry is shown: fingerprints, worker
processes and hosts. Every value goes through :func:`procval.report.markup.esc`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from procval.report.markup import esc, plural
from procval.report.protocol import ResultLike

__all__ = ["run_section", "run_span"]

_DASH = "–"


def when(epoch: float | None) -> str:
    """Epoch seconds as local time with its UTC offset, e.g. ``2026-12-01 14:03:07 +0100``."""
    if epoch is None:
        return _DASH
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(epoch))


def run_span(details: Mapping[str, Any] | None) -> str:
    """One line for under the title: when the first session started and the last one ended."""
    found: Sequence[Mapping[str, Any]] = (details or {}).get("sessions") or []
    if not found:
        return ""
    first, last = found[0], found[-1]
    end = when(last.get("ended")) if last.get("ended") else f"not ended ({last.get('status')})"
    return (
        f"Run {when(first.get('started'))} → {end} · {len(found)} session{plural(len(found))}, "
        f"the last one {last.get('status')}"
    )


def run_section(runs: Sequence[ResultLike], details: Mapping[str, Any] | None) -> str:
    """The ``<section id='run'>``: sessions, then one row per config."""
    head = "<section id='run'><h2>Run</h2>"
    if details is None:
        sessions = (
            "<p class='note'>These results were not read from a run store: no session, env, "
            "seed or version was recorded. Pass <code>store=</code> to keep them.</p>"
        )
    else:
        sessions = _sessions_table(details.get("sessions") or [])
    configs = (details or {}).get("configs") or {}
    return head + sessions + _configs_table(runs, configs) + "</section>"


def _sessions_table(found: Sequence[Mapping[str, Any]]) -> str:
    if not found:
        return "<p class='note'>The store records no session.</p>"
    rows = []
    for number, s in enumerate(found, 1):
        started, ended = s.get("started"), s.get("ended")
        took = f"{ended - started:.1f}s" if started is not None and ended is not None else _DASH
        rows.append(
            f"<tr><td class='num'>{number}</td><td>{esc(when(started))}</td>"
            f"<td>{esc(when(ended))}</td><td class='num'>{esc(took)}</td>"
            f"<td>{esc(s.get('status', _DASH))}</td><td>{esc(s.get('host', _DASH))}</td>"
            f"<td class='num'>{esc(s.get('pid', _DASH))}</td></tr>"
        )
    return (
        "<h3>Sessions</h3><table><tr><th class='num'>#</th><th>started</th><th>ended</th>"
        "<th class='num'>took</th><th>status</th><th>host</th><th class='num'>pid</th></tr>"
        + "".join(rows)
        + "</table><p class='note'>One session per <code>evaluate</code> call or "
        "<code>procval run</code> on the store; a resumed run adds one. Times are local.</p>"
    )


def _configs_table(runs: Sequence[ResultLike], configs: Mapping[str, Any]) -> str:
    rows = []
    for run in runs:
        info: Mapping[str, Any] = configs.get(run.config) or {}
        description: Mapping[str, Any] = info.get("description") or {}
        ran: Mapping[str, Any] = description.get("run") or {}
        env = ", ".join(sorted(description.get("env") or {})) or ("none" if info else _DASH)
        if info:
            workers, hosts = info.get("workers", 0), info.get("nodes") or []
        else:  # from the rows in memory
            workers = len({(r.node, r.worker_pid) for r in run.rows})
            hosts = sorted({r.node for r in run.rows if r.node})
        fingerprint = info.get("fingerprint") or _fingerprints(run)
        asked = ran.get("workers", _DASH) if ran else _DASH
        cells = [
            esc(run.config),
            esc(env),
            esc(_seed(description)) if info else _DASH,
            f"<code>{esc(fingerprint or _DASH)}</code>",
            f"<code>{esc(info.get('identity') or _DASH)}</code>",
            esc(workers),
            esc(ran.get("threads", _DASH)),
            esc("default (CPUs)" if ran and asked is None else asked),
            esc(ran.get("procval", _DASH)),
            esc(ran.get("python", _DASH)),
            esc(", ".join(hosts) or _DASH),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    names = (
        "config",
        "env (names)",
        "seed",
        "fingerprint",
        "identity",
        "worker processes",
        "threads",
        "workers asked",
        "procval",
        "Python",
        "hosts",
    )
    return (
        "<h3>Configs</h3><table><tr>"
        + "".join(f"<th>{esc(n)}</th>" for n in names)
        + "</tr>"
        + "".join(rows)
        + "</table><p class='note'>Env: the variables each config sets in its workers, by name "
        "only (their values are never stored). Fingerprint: the hash of the snapshot every "
        "worker installed; identity: the hash of the config, compared when resuming. Worker "
        "processes: those that produced rows, over all sessions; threads, workers asked for and "
        "versions are those of the config's last session (– where the store predates them).</p>"
    )


def _fingerprints(run: ResultLike) -> str:
    found = sorted({row.fingerprint for row in run.rows if row.fingerprint})
    return ", ".join(found)


def _seed(description: Mapping[str, Any]) -> str:
    if "seed" not in description:
        return _DASH
    seed = description["seed"]
    return "none (not seeded)" if seed is None else str(seed)
