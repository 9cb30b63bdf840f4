"""The runnable parts of the documentation (README.md, docs/*.md), for tests/test_docs.py.

A snippet is one of:
- `python`: a ```python block (its source);
- `command`: a `python train.py ...` or `python -m xception_jax.<tool> ...` command, found in a
  ```bash block (on a line of its own, after `&&`, after a launcher such as `srun`, or inside a
  quoted `--command "..."`; `\\` continuations joined, a trailing `# comment` dropped) or as an
  inline code span outside the blocks;
- `name`: such a command without arguments in inline code (`python -m xception_jax.aot`): a
  tool named in prose;
- `shell`: a ```bash block with no such command (set-up, benchmarks), whole.

Fenced blocks of any other language than python, bash, text or none are an error, and so is a
command in an indented code block: nothing runnable can hide in a block this parser does not
read.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANGUAGES = ("python", "bash", "text", "")
# Where a command starts; it runs to the end of its line or to the quote that closes it.
COMMAND_START = re.compile(r"python (?:train\.py|-m xception_jax\.\w+)")
_FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
_INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
_INDENTED_COMMAND = re.compile(r"^(?: {4,}|\t)\s*" + COMMAND_START.pattern)


@dataclasses.dataclass(frozen=True)
class Snippet:
    file: str  # relative to the repository, e.g. 'docs/data.md'
    line: int  # 1-based line where the block or span starts
    kind: str  # 'python' | 'command' | 'name' | 'shell'
    text: str  # the source, the command on one line, or the shell block
    section: str  # the nearest heading above it
    chapter: str  # the nearest `## ` heading above it

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def __str__(self) -> str:
        first = self.text.strip().splitlines()[0] if self.text.strip() else ""
        return f"{self.where} [{self.kind}] {first[:120]}"


def doc_files() -> list[str]:
    """README.md and every page under docs/, relative to the repository."""
    pages = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
    return ["README.md"] + [os.path.relpath(p, REPO) for p in pages]


def _commands(block: str) -> list[str]:
    """The train.py / xception_jax commands of a bash block, each on one line."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        line = " ".join(line.split())
        if line.startswith("#"):
            continue
        for match in COMMAND_START.finditer(line):
            quoted = line[: match.start()].count('"') % 2 == 1
            end = line.find('"', match.end()) if quoted else -1
            command = line[match.start() : end if end >= 0 else len(line)]
            found.append(re.split(r"\s#\s", command, maxsplit=1)[0].strip())
    return found


def snippets(path: str) -> list[Snippet]:
    """Every snippet of one markdown file (relative to the repository), in file order."""
    with open(os.path.join(REPO, path)) as f:
        lines = f.read().splitlines()
    found: list[Snippet] = []
    section = chapter = ""
    prose: list[tuple[int, str]] = []  # (line number, text) outside the fenced blocks

    def flush_prose():
        text = "\n".join(t for _, t in prose)
        starts = [0]
        for _, t in prose:
            starts.append(starts[-1] + len(t) + 1)
        for m in _INLINE.finditer(text):
            span = " ".join(m.group(1).split())
            if COMMAND_START.match(span):
                index = max(i for i, s in enumerate(starts[:-1]) if s <= m.start())
                kind = "name" if COMMAND_START.fullmatch(span) else "command"
                found.append(Snippet(path, prose[index][0], kind, span, section, chapter))
        prose.clear()

    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence and _INDENTED_COMMAND.match(lines[i]):
            raise ValueError(f"{path}:{i + 1}: a command in an indented code block; use ```bash")
        if not fence:
            if lines[i].startswith("#"):
                flush_prose()
                section = lines[i].lstrip("#").strip()
                chapter = section if lines[i].startswith("## ") else chapter
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        flush_prose()
        indent, language = fence.groups()
        if language not in LANGUAGES:
            raise ValueError(f"{path}:{i + 1}: a ```{language} block; use one of {LANGUAGES}")
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{path}:{start}: a ``` block that is never closed")
        i += 1
        text = "\n".join(body) + "\n"
        if language == "python":
            found.append(Snippet(path, start, "python", text, section, chapter))
        elif language == "bash":
            commands = _commands(text)
            found += [Snippet(path, start, "command", c, section, chapter) for c in commands]
            if not commands:
                found.append(Snippet(path, start, "shell", text, section, chapter))
    flush_prose()
    return sorted(found, key=lambda s: s.line)


def all_snippets() -> list[Snippet]:
    return [s for path in doc_files() for s in snippets(path)]


def chapter_commands(path: str, chapter: str) -> list[str]:
    """The commands of the `## <chapter>` section of `path` (up to the next `## `), in order."""
    return [s.text for s in snippets(path) if s.kind == "command" and s.chapter == chapter]
