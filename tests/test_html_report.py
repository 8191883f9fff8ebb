"""The HTML report (procval/report/html.py): structure, escaping, and a real headless browser."""

from __future__ import annotations

import shutil
import struct
import subprocess
import time
import zlib
from html.parser import HTMLParser

import pytest

from helpers.rows import make_result, make_row
from procval.report.html import render_html
from procval.results import Results, RowError

EVIL = "<script>alert('pwned')</script>"


def make_rows(name, outcomes, *, prediction="fine"):
    """Rows from (score, error_type or None) pairs; every input carries markup to escape."""
    rows = [
        make_row(
            i,
            f"ex-{i}",
            config=name,
            example={"id": f"ex-{i}", "question": f"{EVIL} question {i}"},
            prediction=None if error else f"{prediction} {i} </td><img src=x onerror=1>",
            score=float(score),
            error=RowError(error, "failed <b>loudly</b> & badly", "Traceback <tb>")
            if error
            else None,
        )
        for i, (score, error) in enumerate(outcomes)
    ]
    return make_result(name, rows, duration=2.5)


def sample_results(n=40):
    strong = [(1, None) if i % 10 else (0, "TimeoutError") for i in range(n)]
    weak = [(1 if i % 3 else 0, None) if i % 7 else (0, "RateLimitError") for i in range(n)]
    return Results(
        {
            "strong": make_rows("strong", strong),
            "weak <i>model</i>": make_rows("weak <i>model</i>", weak, prediction="meh"),
        }
    )


class Page(HTMLParser):
    """Collects tags, attributes, text and the rows of each section's tables."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags = []
        self.attrs = []
        self.text = []
        self.section = None
        self.rows = {}

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)
        if tag == "section":
            self.section = dict(attrs).get("id")
        if tag == "tr" and self.section:
            self.rows[self.section] = self.rows.get(self.section, 0) + 1

    def handle_data(self, data):
        self.text.append(data)


def parse(page):
    parser = Page()
    parser.feed(page)
    parser.close()
    return parser


def test_report_has_every_section():
    page = parse(render_html(sample_results(), title="Nightly eval"))
    assert page.tags[0] == "html"
    assert "Nightly eval" in page.text
    sections = [value for name, value in page.attrs if name == "id"]
    assert sections == ["scores", "differences", "errors", "disagreements", "run"]
    assert page.rows["scores"] == 3  # header and one row per config
    assert page.rows["differences"] == 2  # header and "weak" minus the best, "strong"
    assert page.tags.count("svg") >= 2 + 1 + 2  # bars, a difference, and their axes
    text = " ".join(page.text)
    assert "TimeoutError" in text and "RateLimitError" in text
    assert "exact sign test" in text


def test_report_escapes_everything():
    source = render_html(sample_results(), title="<title>&")
    page = parse(source)
    assert "script" not in page.tags and "img" not in page.tags and "i" not in page.tags
    assert "<title>&" in page.text
    assert any(EVIL in chunk for chunk in page.text)  # shown as text, not run
    assert any("failed <b>loudly</b> & badly" in chunk for chunk in page.text)
    assert any("weak <i>model</i>" in chunk for chunk in page.text)
    assert "&lt;script&gt;" in source


def test_report_fetches_nothing():
    source = render_html(sample_results())
    page = parse(source)
    assert not {"script", "link", "img", "iframe", "object", "embed"} & set(page.tags)
    assert not [value for name, value in page.attrs if name in {"src", "href"}]
    urls = [v for n, v in page.attrs if v and "://" in v and n != "xmlns"]
    assert urls == []
    assert "@import" not in source and "url(" not in source
    assert "Content-Security-Policy" in source and "default-src 'none'" in source


def test_disagreements_are_capped_and_the_rest_counted():
    results = sample_results(n=60)
    disagreeing = sum(
        a.score != b.score for a, b in zip(*(r.rows for r in results.values()), strict=True)
    )
    page = parse(render_html(results, max_rows=5))
    assert page.rows["disagreements"] == 1 + 5
    text = " ".join(page.text)
    assert f"{disagreeing} of 60 examples got different scores" in text
    assert f"{disagreeing - 5} more were left out" in text


def test_one_config_and_agreeing_configs():
    one = make_rows("solo", [(1, None), (0, None)])
    text = " ".join(parse(render_html(one)).text)
    assert "nothing to compare" in text
    same = Results({"a": one, "b": make_rows("b", [(1, None), (0, None)])})
    text = " ".join(parse(render_html(same)).text)
    assert "All configs scored every example the same" in text
    assert "No example failed" in text


def test_report_survives_configs_without_common_examples():
    a = make_rows("a", [(1, None)] * 3)
    b = make_result("b", [make_row(0, "other", config="b", example={}, prediction="p", score=0.0)])
    text = " ".join(parse(render_html([a, b])).text)
    assert "no example id in common" in text


def parity(example):
    return example["n"] % 2 if example["n"] != 3 else f"<marquee>{example['n']}</marquee>"


def is_even(example, prediction):
    if isinstance(prediction, str):
        raise ValueError(f"cannot score {prediction}")
    return prediction == 0


def test_report_command_writes_the_html_file(tmp_path, capsys):
    import procval
    from procval import cli

    path = tmp_path / "run <1>.db"
    configs = {"first": procval.Config(), "second": procval.Config(values={"x": 1})}
    data = [{"id": f"n{i}", "n": i} for i in range(8)]
    procval.evaluate(parity, data, is_even, configs=configs, workers=1, progress=False, store=path)
    out_file = tmp_path / "report.html"
    assert cli.main(["report", str(path), "--html", str(out_file)]) == 0
    assert f"wrote {out_file}" in capsys.readouterr().out
    page = parse(out_file.read_text(encoding="utf-8"))
    assert "procval report: run <1>.db" in page.text
    sections = [value for name, value in page.attrs if name == "id"]
    assert sections == ["scores", "differences", "errors", "disagreements", "run"]
    assert "marquee" not in page.tags  # the prediction only shows up as text
    assert any("cannot score <marquee>3</marquee>" in chunk for chunk in page.text)
    assert "All configs scored every example the same" in " ".join(page.text)


class Tables(HTMLParser):
    """The text of every cell of the section ``section``'s tables, row by row."""

    def __init__(self, section):
        super().__init__(convert_charrefs=True)
        self.wanted, self.inside, self.rows, self.cell = section, False, [], None
        self.notes = []

    def handle_starttag(self, tag, attrs):
        if tag == "section":
            self.inside = dict(attrs).get("id") == self.wanted
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if self.inside and tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)
        elif self.inside:
            self.notes.append(data)


def tables(page, section):
    parser = Tables(section)
    parser.feed(page)
    parser.close()
    return parser


def test_report_command_html_says_when_the_run_happened_and_what_each_config_was(tmp_path):
    import platform
    import socket

    import procval
    from procval import cli

    path = tmp_path / "run.db"
    secret = "hunter2-do-not-show"
    env = {"PROCVAL_TEST_API_KEY": secret, "OTHER_VAR": "x"}
    configs = {
        "keyed": procval.Config(name="keyed", env=env, seed=7),
        "plain": procval.Config(name="plain", values={"x": 1}),
    }
    data = [{"id": f"n{i}", "n": i} for i in range(8)]
    before = time.time()
    first = procval.evaluate(
        parity, data[:4], is_even, configs=configs, workers=2, threads=2, progress=False,
        store=path,
    )  # fmt: skip
    procval.evaluate(parity, data, is_even, configs=configs, workers=1, progress=False, store=path)
    after = time.time()
    out_file = tmp_path / "report.html"
    assert cli.main(["report", str(path), "--html", str(out_file)]) == 0
    source = out_file.read_text(encoding="utf-8")
    assert secret not in source
    run = tables(source, "run")
    sessions = [r for r in run.rows if r and r[0].isdigit()]
    assert [r[0] for r in sessions] == ["1", "2"]
    for row in sessions:
        started, ended = (time.mktime(time.strptime(t, "%Y-%m-%d %H:%M:%S %z")) for t in row[1:3])
        assert before - 1 <= started <= ended <= after + 1
        assert row[4] == "completed" and row[5] == socket.gethostname()
    header = next(r for r in run.rows if r and r[0] == "config")
    by_config = {r[0]: dict(zip(header, r, strict=True)) for r in run.rows if r[0] in configs}
    keyed, plain = by_config["keyed"], by_config["plain"]
    assert (
        keyed["env (names)"] == "OTHER_VAR, PROCVAL_TEST_API_KEY" and plain["env (names)"] == "none"
    )
    assert keyed["seed"] == "7" and plain["seed"] == "none (not seeded)"
    assert keyed["fingerprint"] == first["keyed"].fingerprint
    assert keyed["identity"] == configs["keyed"].identity()
    assert keyed["threads"] == "1" and keyed["workers asked"] == "1"  # the last session's
    assert int(keyed["worker processes"]) >= 2  # one per session at least, all sessions
    assert keyed["procval"] == procval.__version__
    assert keyed["Python"] == platform.python_version()
    assert keyed["hosts"] == socket.gethostname()
    page = parse(source)
    text = " ".join(page.text)
    assert "2 sessions, the last one completed" in text  # under the title
    errors = " ".join(tables(source, "errors").notes)
    assert f"procval report {path} --errors" in errors


def test_results_in_memory_get_a_run_section_from_their_rows():
    run = tables(render_html(sample_results()), "run")
    header = next(r for r in run.rows if r and r[0] == "config")
    strong = dict(zip(header, next(r for r in run.rows if r[0] == "strong"), strict=True))
    assert strong["fingerprint"] == "f" * 16 and strong["worker processes"] == "1"
    assert strong["hosts"] == "here" and strong["seed"] == "–"
    assert "not read from a run store" in " ".join(run.notes)


def png_size_and_data(path):
    """Width, height and the decompressed (still filtered) image bytes of a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
    assert header is not None
    return header, zlib.decompress(idat)


def screenshot(chromium, page, png, profile):
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            "--window-size=1200,1600",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.mark.browser
def test_report_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    report = tmp_path / "report.html"
    report.write_text(render_html(sample_results(), title="Browser check"), encoding="utf-8")
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>", encoding="utf-8")
    screenshot(chromium, report, tmp_path / "report.png", tmp_path / "profile")
    screenshot(chromium, blank, tmp_path / "blank.png", tmp_path / "profile")

    (width, height), pixels = png_size_and_data(tmp_path / "report.png")
    _, blank_pixels = png_size_and_data(tmp_path / "blank.png")
    assert (width, height) == (1200, 1600)
    # A blank page is one color: its filtered scanlines hold a handful of distinct byte values
    # and compress to almost nothing. Text, bars and tables give hundreds, and a bigger file.
    assert len(set(blank_pixels)) < 16
    assert len(set(pixels)) > 128
    report_size = (tmp_path / "report.png").stat().st_size
    assert report_size > 5 * (tmp_path / "blank.png").stat().st_size
