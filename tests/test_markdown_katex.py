"""Every math block of the Markdown export renders with KaTeX in strict mode.

The Markdown derivation (``render_markdown``) is meant to be read where math is rendered by
KaTeX (or MathJax): every display block (``$$`` alone on a line, the TeX, ``$$`` alone on a
line) and every inline ``$...$`` is handed to KaTeX with ``throwOnError: true`` and
``strict: "error"``, so any construct KaTeX does not know, or only accepts with a warning,
fails the test. All expressions of a document go to one Node process
(``tests/katex/render.js``); KaTeX is pinned in ``tests/katex/package.json`` and installed
by ``bash .ci/install``. A missing Node or KaTeX is a failure, never a skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from symrnn.cells import builtin_names
from symrnn.pipeline import build, render_markdown

KATEX_DIR = Path(__file__).resolve().parent / "katex"
RENDER_JS = KATEX_DIR / "render.js"
KATEX_PACKAGE = KATEX_DIR / "node_modules" / "katex" / "package.json"
INSTALL_HINT = "run `bash .ci/install` (it runs `npm ci --prefix tests/katex`)"

# Fewest display blocks a derivation can have: the forward equations alone are more.
MIN_DISPLAY_BLOCKS = 6

_HTML_COMMENT = re.compile(r"<!--.*?-->")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# One `$`, not part of `$$`, then the TeX up to the next lone `$` on the same line.
_INLINE = re.compile(r"(?<!\$)\$(?!\$)([^$\n]+?)(?<!\$)\$(?!\$)")


@dataclass(frozen=True)
class Math:
    tex: str
    display: bool
    line: int  # 1-based line of the document where the expression starts


def extract_math(markdown: str) -> tuple[list[Math], list[str]]:
    """The math of a Markdown document, and the ways its ``$`` delimiters are malformed.

    A display block opens with a line that is exactly ``$$`` and closes at the next such
    line. Outside display blocks, HTML comments and code spans are not math; every other
    ``$`` must pair up as inline math on its line.
    """
    found: list[Math] = []
    problems: list[str] = []
    lines = markdown.split("\n")
    block: list[str] | None = None
    block_start = 0
    in_fence = False
    for number, line in enumerate(lines, start=1):
        if block is not None:
            if line == "$$":
                tex = "\n".join(block)
                if not tex.strip():
                    problems.append(f"line {block_start}: empty display block")
                found.append(Math(tex, True, block_start))
                block = None
            elif "$$" in line:
                problems.append(
                    f"line {number}: `$$` inside a display block, not alone on its "
                    f"line: {line!r}"
                )
                block.append(line)
            elif not line.strip():
                problems.append(
                    f"line {number}: blank line inside the display block opened on "
                    f"line {block_start} (it ends the Markdown paragraph)"
                )
                block.append(line)
            else:
                block.append(line)
            continue
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        if line == "$$":
            block = []
            block_start = number
            continue
        text = _CODE_SPAN.sub("", _HTML_COMMENT.sub("", line))
        if "$$" in text:
            problems.append(f"line {number}: `$$` not alone on its line: {line!r}")
            continue
        for match in _INLINE.finditer(text):
            found.append(Math(match.group(1), False, number))
        leftover = _INLINE.sub("", text)
        if "$" in leftover:
            problems.append(f"line {number}: unpaired `$` outside math: {line!r}")
    if block is not None:
        problems.append(f"line {block_start}: display block never closed")
    if in_fence:
        problems.append("a fenced code block is never closed")
    return found, problems


def katex_render(items: list[Math]) -> list[str | None]:
    """KaTeX's error message for each expression (None where it rendered), one Node call."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"`node` is not on PATH: install Node.js, then {INSTALL_HINT}")
    if not KATEX_PACKAGE.is_file():
        pytest.fail(f"KaTeX is not installed in {KATEX_DIR}: {INSTALL_HINT}")
    payload = json.dumps([{"tex": m.tex, "display": m.display} for m in items])
    proc = subprocess.run(
        [node, str(RENDER_JS)],
        input=payload,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
        cwd=KATEX_DIR,
    )
    if proc.returncode != 0:
        pytest.fail(f"{RENDER_JS} exited with {proc.returncode}:\n{proc.stderr}")
    results = json.loads(proc.stdout)
    assert isinstance(results, list) and len(results) == len(items), proc.stdout[:2000]
    return results


def katex_version() -> str:
    return json.loads(KATEX_PACKAGE.read_text(encoding="utf-8"))["version"]


def test_extract_math_splits_display_and_inline():
    doc = (
        "<!-- a $comment$ -->\n"
        "Text $a + b$ and `$code$` and $c$.\n"
        "\n"
        "$$\n"
        "\\begin{aligned}\n"
        "x &= 1 \\tag{1}\n"
        "\\end{aligned}\n"
        "$$\n"
        "| $x$ | y |\n"
    )
    found, problems = extract_math(doc)
    assert problems == []
    assert found == [
        Math("a + b", False, 2),
        Math("c", False, 2),
        Math("\\begin{aligned}\nx &= 1 \\tag{1}\n\\end{aligned}", True, 4),
        Math("x", False, 9),
    ]


@pytest.mark.parametrize(
    "doc",
    [
        "$$x$$\n",  # display delimiters on the TeX's line
        "$$\nx\n",  # never closed
        "$$\nx\n\ny\n$$\n",  # blank line inside
        "a $x\n",  # unpaired
        "$$\nx $$\n$$\n",  # closing `$$` not alone
    ],
)
def test_extract_math_flags_malformed_delimiters(doc):
    _, problems = extract_math(doc)
    assert problems


@pytest.mark.parametrize("form", ["vector", "unit"])
@pytest.mark.parametrize("cell", builtin_names())
def test_markdown_math_renders_with_katex_strict(cell, form):
    from symrnn.latex import Notation

    markdown = render_markdown(build(cell), Notation(form=form))
    found, problems = extract_math(markdown)
    assert not problems, f"{cell}: malformed math delimiters:\n" + "\n".join(problems)

    display = [m for m in found if m.display]
    assert len(display) >= MIN_DISPLAY_BLOCKS, (
        f"{cell}: only {len(display)} display blocks ($$ ... $$) in the Markdown export; "
        f"expected at least {MIN_DISPLAY_BLOCKS}"
    )
    assert any(not m.display for m in found), f"{cell}: no inline math found"

    results = katex_render(found)
    failures = [
        f"line {m.line} ({'display' if m.display else 'inline'}): {error}\n"
        f"    TeX: {m.tex!r}"
        for m, error in zip(found, results)
        if error is not None
    ]
    assert not failures, (
        f"{cell}: {len(failures)} of {len(found)} math expressions rejected by KaTeX "
        f"{katex_version()} (strict: 'error'):\n" + "\n".join(failures)
    )
