r"""User text, checked once and printed through one escaping function per destination.

A cell's ``source`` and ``description``, a spec file's path inside a "regenerate
with" command, a name in an error message: text from the user reaches generated
Python, CUDA C++, LaTeX and Markdown, and the terminal.  :func:`check_text`
refuses what no destination can show safely (control, format and separator
characters such as a newline, ESC or a bidirectional override); the printers
below then make the rest inert where it lands:

* :func:`py_comment`, :func:`c_comment`: one line after ``#`` or ``//``;
* :func:`py_docstring`: inside a non-raw triple-quoted docstring;
* :func:`py_literal`: a Python string literal (``repr``), and
  :func:`py_raw_block` for a long embedded source;
* :func:`tex_text`, :func:`tex_comment`: LaTeX text mode and ``%`` comments;
* :func:`md_text`, :func:`html_comment`: Markdown text and ``<!-- -->`` comments;
* :func:`shown`: any string in a one-line message.

>>> print(tex_text("50% of {x} & $y$"))
50\% of \{x\} \& \$y\$
>>> print(md_text("<script>*x*</script>"))
&lt;script&gt;\*x\*&lt;/script&gt;
>>> print(shown("a\x1b[31m"))
'a\x1b[31m'
"""

from __future__ import annotations

import unicodedata

__all__ = [
    "MAX_TEXT", "bad_character", "check_text", "one_line", "shown", "py_comment", "py_docstring", "py_literal",
    "py_raw_block", "c_comment", "tex_text", "tex_comment", "md_text", "html_comment",
]

#: the longest ``source`` or ``description`` accepted (characters)
MAX_TEXT = 500


def bad_character(text: str) -> str | None:
    """The first character no destination shows safely, or None.

    Refused: Unicode categories C* (control, format such as U+202E, surrogate,
    private use, unassigned), Zl and Zp (line and paragraph separators), and
    every space but the plain one (a no-break space hides in a name)."""
    for ch in text:
        cat = unicodedata.category(ch)
        if cat[0] == "C" or cat in ("Zl", "Zp") or (cat == "Zs" and ch != " "):
            return ch
    return None


def check_text(text, what: str, limit: int = MAX_TEXT) -> str:
    """``text`` if it is a string of at most ``limit`` safe characters; else a ValueError
    naming ``what`` and the offending character (the caller turns it into its own error)."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    ch = bad_character(text)
    if ch is not None:
        name = unicodedata.name(ch, "") or f"U+{ord(ch):04X}"
        raise ValueError(f"{what} contains the character {ascii(ch)} ({name.lower()}); write it on one line, "
                         "without control characters")
    if len(text) > limit:
        raise ValueError(f"{what} is {len(text)} characters long; at most {limit} are allowed")
    return text


def shown(text: str, limit: int = 80) -> str:
    """``text`` quoted for a one-line message: non-printable characters escaped, long text cut."""
    out = "".join(ch if ch == " " or (ch.isprintable() and bad_character(ch) is None) else ascii(ch)[1:-1]
                  for ch in str(text))
    if len(out) > limit:
        out = out[: limit - 3] + "..."
    return f"'{out}'"


def one_line(text: str) -> str:
    """Every character :func:`bad_character` refuses, as a visible escape (defence in depth:
    checked text has none)."""
    return "".join(ascii(ch)[1:-1] if bad_character(ch) is not None else ch for ch in str(text))


def py_comment(text: str) -> str:
    """Text for a ``#`` comment: one line, whatever ``text`` holds."""
    return one_line(text)


def py_docstring(text: str) -> str:
    """Text inside a (non-raw) ``\"\"\"`` docstring: backslashes and quotes cannot end or
    change it."""
    return one_line(text).replace("\\", "\\\\").replace('"', '\\"')


def py_literal(text: str) -> str:
    """A Python string literal holding exactly ``text``."""
    return repr(str(text))


def py_raw_block(text: str) -> str:
    """A Python expression for a long multi-line ``text`` (embedded source code): a raw
    triple-quoted string where that holds it exactly, else concatenated literals."""
    if '"""' not in text and not text.endswith("\\") and "\r" not in text:
        return 'r"""' + text + '"""'
    return "(\n" + "\n".join(f"    {line!r}" for line in text.splitlines(keepends=True)) + "\n)"


def c_comment(text: str) -> str:
    """Text for a ``//`` comment: one line, and no backslash (a backslash at the end of a
    line would continue the comment onto the next one)."""
    return one_line(text).replace("\\", "(backslash)")


_TEX = {
    "\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#",
    "^": r"\textasciicircum{}", "_": r"\_", "%": r"\%", "~": r"\textasciitilde{}",
    "<": r"\ensuremath{<}", ">": r"\ensuremath{>}", "|": r"\ensuremath{|}", '"': r"\texttt{\char34}",
}
#: letters LaTeX has a command for (in every font encoding)
_TEX_LETTERS = {"ß": r"\ss{}", "æ": r"\ae{}", "Æ": r"\AE{}", "œ": r"\oe{}", "Œ": r"\OE{}", "ø": r"\o{}",
                "Ø": r"\O{}", "ł": r"\l{}", "Ł": r"\L{}", "ı": r"\i{}", "å": r"\aa{}", "Å": r"\AA{}"}
#: combining accents -> LaTeX's accent commands (in every font encoding)
_TEX_ACCENTS = {"\u0300": "`", "\u0301": "'", "\u0302": "^", "\u0303": "~", "\u0304": "=", "\u0306": "u",
                "\u0307": ".", "\u0308": '"', "\u030a": "r", "\u030b": "H", "\u030c": "v", "\u0327": "c"}


def _tex_char(ch: str) -> str:
    if ch in _TEX:
        return _TEX[ch]
    if ord(ch) < 128:
        return ch
    if ch in _TEX_LETTERS:
        return _TEX_LETTERS[ch]
    base, *marks = unicodedata.normalize("NFD", ch)
    if ord(base) < 128 and base.isalpha() and marks and all(m in _TEX_ACCENTS for m in marks):
        out = base
        for mark in marks:
            out = f"\\{_TEX_ACCENTS[mark]}{{{out}}}"
        return out
    name = unicodedata.name(ch, f"U+{ord(ch):04X}").lower()
    return f"\\textit{{[{name}]}}"


def tex_text(text: str) -> str:
    """``text`` for LaTeX text mode, printed as it reads, in plain ASCII: every special
    character escaped, accented Latin letters as accent commands, other characters
    (which pdflatex has no glyph for) by their Unicode names."""
    return "".join(_tex_char(ch) for ch in one_line(text))


def tex_comment(text: str) -> str:
    """Text for a ``%`` comment line."""
    return one_line(text)


#: the punctuation that starts emphasis, code, links, tables, strikethrough or math in the
#: middle of a line (the text never starts a line of the documents)
_MD_PUNCT = set("\\`*_[]|$~")


def md_text(text: str) -> str:
    """``text`` for Markdown: no HTML (``< > &`` as entities), no emphasis, links, code or
    math (the punctuation that makes them backslash-escaped)."""
    out = []
    for ch in one_line(text):
        if ch in "<>&":
            out.append({"<": "&lt;", ">": "&gt;", "&": "&amp;"}[ch])
        elif ch in _MD_PUNCT:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def html_comment(text: str) -> str:
    """Text inside ``<!-- `` and `` -->``: no ``<`` or ``>``, so neither ``-->`` nor ``--!>``
    ends the comment early and no ``<!--`` opens another."""
    return one_line(text).replace("<", "&lt;").replace(">", "&gt;")
