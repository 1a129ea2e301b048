"""Fenced code blocks of README.md and docs/*.md, with their ``docs-test`` directives.

A block may be preceded (blank lines allowed in between) by one HTML comment that tells the
docs test how to treat it; the comment is invisible in rendered markdown::

    <!-- docs-test: skip (needs the Hub) -->        not run; the reason is shown by pytest
    <!-- docs-test: fixture=bert_loop -->          run after the named setup (docs_fixtures.py)
    <!-- docs-test: continues -->                 run in the namespace of the previous block
    <!-- docs-test: recipe=sft -->                 a YAML fragment is composed onto this recipe

Kinds: ``python`` (executed), ``shell`` (bash blocks, and plain blocks made only of ``adarank``
or ``python scripts/...`` commands: checked command by command), ``yaml`` (parsed, composed onto
a recipe and validated), ``json`` (parsed; JSON Lines allowed) and ``text`` (diagrams, listings,
output: skipped).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Block", "ROOT", "doc_files", "read_blocks", "parse_blocks"]

ROOT = Path(__file__).resolve().parents[2]

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
_LANGS = {
    "python": "python",
    "py": "python",
    "bash": "shell",
    "sh": "shell",
    "shell": "shell",
    "console": "shell",
    "yaml": "yaml",
    "yml": "yaml",
    "json": "json",
    "jsonl": "json",
}
_COMMAND_PREFIXES = ("adarank ", ".venv/bin/adarank ", "python scripts/", "make ")


@dataclass(frozen=True)
class Block:
    """One fenced block.

    Attributes:
        file: path relative to the repository root (``README.md``, ``docs/x.md``).
        line: 1-based line of the opening fence.
        lang: the info string's first word ("" for a plain fence).
        kind: python | shell | yaml | json | text | other.
        text: the block's content (without the fences).
        skip: reason given by a ``skip`` directive, else None.
        fixture: name given by ``fixture=NAME``, else None.
        continues: run in the namespace left by the previous python block of the same file.
        recipe: base recipe for a YAML fragment (``recipe=NAME``), else None.
    """

    file: str
    line: int
    lang: str
    kind: str
    text: str
    skip: str | None = None
    fixture: str | None = None
    continues: bool = False
    recipe: str | None = None

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}:{self.lang or 'plain'}"


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and every docs/*.md (sorted)."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _kind(lang: str, text: str) -> str:
    if lang in _LANGS:
        return _LANGS[lang]
    if lang:
        return "other"
    logical = [ln.strip() for ln in text.replace("\\\n", " ").splitlines() if ln.strip()]
    if logical and all(ln.startswith(_COMMAND_PREFIXES) for ln in logical):
        return "shell"
    return "text"


def _directive(lines: list[str], fence_index: int, where: str) -> dict:
    """The ``docs-test`` comment right above a fence (blank lines allowed), parsed."""
    i = fence_index - 1
    while i >= 0 and not lines[i].strip():
        i -= 1
    match = _DIRECTIVE.match(lines[i]) if i >= 0 else None
    if match is None:
        return {}
    body = match.group("body")
    if body.startswith("skip"):
        reason = body[len("skip") :].strip().strip("()").strip()
        if not reason:
            raise ValueError(f"{where}: a docs-test skip needs a reason: skip (why)")
        return {"skip": reason}
    out: dict = {}
    for part in body.split():
        if part == "continues":
            out["continues"] = True
        elif part.startswith("fixture="):
            out["fixture"] = part.split("=", 1)[1]
        elif part.startswith("recipe="):
            out["recipe"] = part.split("=", 1)[1]
        else:
            raise ValueError(f"{where}: unknown docs-test directive {part!r}")
    return out


def parse_blocks(markdown: str, file: str) -> list[Block]:
    """Every fenced block of ``markdown`` (``file`` names it in ids and messages)."""
    lines = markdown.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        fence, start = match.group("fence"), i
        lang = match.group("info").strip().split(" ")[0].lower() if match.group("info") else ""
        body: list[str] = []
        i += 1
        while i < len(lines):
            close = _FENCE.match(lines[i])
            if close and close.group("fence").startswith(fence) and not close.group("info"):
                break
            body.append(lines[i])
            i += 1
        else:
            raise ValueError(f"{file}:{start + 1}: code fence is never closed")
        indent = len(match.group("indent"))
        text = "\n".join(ln[indent:] if ln[:indent].isspace() else ln for ln in body) + "\n"
        where = f"{file}:{start + 1}"
        blocks.append(
            Block(file, start + 1, lang, _kind(lang, text), text, **_directive(lines, start, where))
        )
        i += 1
    return blocks


def read_blocks(root: Path = ROOT) -> list[Block]:
    """Blocks of README.md and docs/*.md, in file order."""
    out: list[Block] = []
    for path in doc_files(root):
        out += parse_blocks(path.read_text(encoding="utf-8"), str(path.relative_to(root)))
    return out
