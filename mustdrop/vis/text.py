"""Untrusted text made safe to show: every string that comes from a trace, an example file, the
model id or the user reaches the page through one of these, never as markup.

A trace is shared like any file, so its strings (question, answers, model id, preset, a forged
threshold ...) are written by whoever wrote the file. In ``gr.HTML`` they would be markup, in
``gr.Markdown`` links, images, code spans, emphasis, LaTeX ($$) and raw HTML. ``html_text`` is for
HTML; ``md_text`` for Markdown prose and table cells; ``md_code`` where a value is shown as code
(a model id); ``md_value`` leaves the numbers a good trace holds as they are and escapes the rest.
Matplotlib titles read ``$`` as mathtext: slides pass user text with ``parse_math=False``.
"""

from __future__ import annotations

import html
import numbers
import re

# Markdown syntax anywhere in a line: escapes, code spans, emphasis, strike-through, links and
# images, table cells, LaTeX ($$ in gradio). < and & become entities (no raw HTML, no autolinks).
_MD_INLINE = re.compile(r"([\\`*_\[\]~|$>])")
# Bare links GFM would turn into anchors (https://, www., e-mail addresses): break them up.
_MD_AUTOLINK = re.compile(r"(?i)(?<=[a-z])(:)(?=//)|(?<=\bwww)(\.)|(@)(?=[\w.+-]+\.)")
# Block syntax, which only counts at the start of a line: headings, lists, quotes, rules.
_MD_BLOCK = re.compile(r"^([#+\-=]|\d+(?=[.)]))")


def html_text(value) -> str:
    """``value`` as text inside HTML (element content or a quoted attribute)."""
    return html.escape(str(value), quote=True)


def _md_inline(s: str) -> str:
    s = s.replace("&", "&amp;").replace("<", "&lt;")
    s = _MD_INLINE.sub(r"\\\1", s)
    return _MD_AUTOLINK.sub(lambda m: "\\" + m.group(0), s)


def md_text(value) -> str:
    """``value`` as literal text inside Markdown (one line: runs of whitespace become one space)."""
    s = _md_inline(" ".join(str(value).split()))
    m = _MD_BLOCK.match(s)
    if m:
        s = s[:m.end()] + "\\" + s[m.end():] if m.group(0)[0].isdigit() else "\\" + s
    return s


def md_code(value, spaces: bool = False) -> str:
    """``value`` shown as code in Markdown, escaped: a code span's backticks could be broken out of.
    Line breaks become spaces; ``spaces`` keeps runs of spaces (a token's own spacing)."""
    s = str(value)
    s = " ".join(s.split()) if not spaces else " ".join(s.splitlines())
    return f"<code>{_md_inline(s)}</code>"


def md_value(value) -> str:
    """A trace value in Markdown: numbers as Python prints them, anything else escaped text."""
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return str(value)
    return md_text(value)


def mpl_text(value) -> str:
    """``value`` in a matplotlib label that parses mathtext (a legend entry): ``$`` stays a dollar."""
    return str(value).replace("$", r"\$")
