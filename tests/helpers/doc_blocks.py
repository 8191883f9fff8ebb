"""The fenced code blocks of README.md and docs/*.md, for tests/test_docs.py.

A block is a fence with a language: ``python``, ``bash``/``sh`` and ``console`` (a transcript:
``$ command`` lines followed by the output they print) run; ``text`` (diagrams, formulas,
recorded measurements) never runs. A block may be preceded by marker comments, invisible when
the Markdown is rendered, one per line, directly above the fence::

    <!-- doc-test: continues -->          python: runs after the file's previous python block
    <!-- doc-test: given PATH.py -->      python: PATH (from the repo root) runs first, in the
                                          same namespace; its `check(namespace)`, if defined,
                                          runs after the block
    <!-- doc-test: after COMMAND -->      run in a copy of the repo where COMMAND already ran
                                          (one copy shared by every block after the same COMMAND)
    <!-- doc-test: needs-api-key -->      python: syntax and procval names checked, not run
    <!-- doc-test: needs-ray-cluster -->  python or bash: checked, not run (see test_docs.py)
    <!-- doc-test: slow -->               bash: checked, not run (benchmarks of minutes)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = ("python", "bash", "sh", "console")
NOT_RUN = ("text",)
MARKERS = ("continues", "given", "after", "needs-api-key", "needs-ray-cluster", "slow")

_FENCE = re.compile(r"^```(\S*)\s*$")
_MARKER = re.compile(r"^<!--\s*doc-test:\s*(\S+)\s*(.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language, its text and its markers."""

    path: Path
    line: int  # the line of the opening fence, 1-based
    lang: str
    text: str
    markers: tuple[tuple[str, str], ...]  # (keyword, argument) in document order

    @property
    def name(self) -> str:
        """``README.md:20``: the file, relative to the repo, and the fence's line."""
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def first_line(self) -> str:
        """The block's first non-blank line, stripped: how a known failure names its block."""
        return next((line.strip() for line in self.text.splitlines() if line.strip()), "")

    def marked(self, keyword: str) -> list[str]:
        """The arguments of every marker with this keyword (an empty list: not marked)."""
        return [argument for key, argument in self.markers if key == keyword]


def doc_files() -> list[Path]:
    """README.md and every docs/*.md, so that a new page is picked up without a test change."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """Every fenced block of one Markdown file, in order.

    Raises:
        ValueError: a fence is never closed, or a marker has an unknown keyword.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{path.name}:{i + 1}: a code fence is never closed")
        found.append(
            Block(
                path=path,
                line=i + 1,
                lang=fence.group(1),
                text="\n".join(lines[i + 1 : end]) + "\n",
                markers=_markers_above(path, lines, i),
            )
        )
        i = end + 1
    return found


def all_blocks() -> list[Block]:
    """Every block of every documentation file."""
    return [block for path in doc_files() for block in blocks(path)]


def _markers_above(path: Path, lines: list[str], fence: int) -> tuple[tuple[str, str], ...]:
    markers = []
    j = fence - 1
    while j >= 0 and (marker := _MARKER.match(lines[j].strip())):
        keyword, argument = marker.groups()
        if keyword not in MARKERS:
            raise ValueError(
                f"{path.name}:{j + 1}: unknown doc-test marker {keyword!r}; use one of {MARKERS}"
            )
        markers.insert(0, (keyword, argument))
        j -= 1
    return tuple(markers)


def transcript(block: Block) -> list[tuple[str, list[str]]]:
    """A console block as ``(command, expected output lines)`` pairs.

    Raises:
        ValueError: the block does not start with a ``$ `` line.
    """
    pairs: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            pairs.append((line[2:].strip(), []))
        elif not pairs:
            raise ValueError(f"{block.name}: a console block must start with a `$ command` line")
        else:
            pairs[-1][1].append(line)
    return pairs


def commands(block: Block) -> list[str]:
    """The commands of a bash block: one a line, comments and blank lines dropped, `&&` split."""
    found = []
    for line in block.text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        found.extend(part.strip() for part in line.split("&&") if part.strip())
    return found
