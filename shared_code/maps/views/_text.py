"""Text hygiene shared by every renderer: one place decides how a source's name becomes safe text.

Names come from the monitored estate (process names, computer names, client group labels) and are
attacker-controllable. Every renderer passes them through these functions and nothing else:
``clean`` drops what XML 1.0 cannot carry at all (C0 controls, lone surrogates, U+FFFE/U+FFFF),
``esc`` escapes for HTML/SVG/XML text *and* attributes (quotes included), ``one_line`` folds line
breaks and tabs for labels that must stay on one line.
"""

from __future__ import annotations

import html
import re

_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_LINE_BREAKS = re.compile(r"[\r\n\t\u2028\u2029\x85]+")
_FILENAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def clean(text: str) -> str:
    """``text`` with every character XML 1.0 forbids replaced by U+FFFD."""
    return _XML_INVALID.sub("\ufffd", text)


def one_line(text: str) -> str:
    """``clean`` text with line breaks and tabs folded into single spaces."""
    return _LINE_BREAKS.sub(" ", clean(text)).strip()


_WHITESPACE_REFS = str.maketrans({"\n": "&#10;", "\r": "&#13;", "\t": "&#9;"})


def esc(text: str) -> str:
    """Safe in HTML/SVG/XML element text and in double- or single-quoted attribute values.

    Line breaks and tabs become character references, so an XML parser's attribute-value
    normalisation cannot turn a name into a different one (``data-`` values must match exactly).
    """
    return html.escape(clean(text), quote=True).translate(_WHITESPACE_REFS)


def shorten(text: str, limit: int) -> str:
    """``one_line`` text cut to ``limit`` characters with an ellipsis (the full name goes in a tooltip)."""
    flat = one_line(text)
    return flat if len(flat) <= limit else flat[: max(1, limit - 1)] + "\u2026"


def safe_filename(text: str, suffix: str) -> str:
    """An ASCII file name for a download (``Content-Disposition``), never empty."""
    base = _FILENAME_UNSAFE.sub("_", text.strip()).strip("._")[:80] or "map"
    return f"{base}{suffix}"
