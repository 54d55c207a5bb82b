"""Text from other people, made safe to print on a terminal."""

from __future__ import annotations

import unicodedata

_KEEP = {"\n", "\t"}


def inert(text: str, *, keep_newlines: bool = True) -> str:
    """Replace control characters (C0, C1, DEL, bidi overrides and other format
    characters) with visible escapes, so a peer cannot move the cursor, recolour the
    screen or hide text: ESC becomes ``\\x1b`` and so on."""
    out = []
    for ch in text:
        if ch in _KEEP and keep_newlines:
            out.append(ch)
            continue
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _columns(ch: str) -> int:
    if unicodedata.combining(ch):
        return 0
    # Ambiguous ones too: a terminal set up for East Asian text draws them double width,
    # and counting them so only makes rows shorter elsewhere.
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F", "A") else 1


def rows(line: str, first: int, rest: int) -> list[str]:
    """Cut one line (no newlines, no tabs) into rows that a terminal will not wrap
    itself: the first at most ``first`` columns wide, the others at most ``rest``."""
    out: list[str] = []
    row: list[str] = []
    used, room = 0, max(1, first)
    for ch in line:
        w = _columns(ch)
        if row and used + w > room:
            out.append("".join(row))
            row, used, room = [], 0, max(1, rest)
        row.append(ch)
        used += w
    out.append("".join(row))
    return out


def qr_code(text: str) -> str:
    """``text`` as a QR code drawn with block characters, for a terminal (segno)."""
    import io

    import segno

    out = io.StringIO()
    segno.make(text, error="m").terminal(out=out, compact=True)
    return out.getvalue()
