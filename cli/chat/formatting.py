"""How times and messages look in ``veil chat``: one line per message, wrapped to the
terminal, everything a peer controls made inert."""

from __future__ import annotations

import textwrap
from datetime import datetime

from cli.text import inert
from node.store import StoredMessage


def local_time(ms: int, today: datetime | None = None) -> str:
    """A message time in local time: HH:MM today, with the date otherwise. The time comes
    from the sender's clock (inside the encryption), so it may be anything."""
    try:
        t = datetime.fromtimestamp(ms / 1000)
    except (OverflowError, OSError, ValueError):
        return "????-??-?? ??:??"
    today = today or datetime.now()
    return t.strftime("%H:%M") if t.date() == today.date() else t.strftime("%Y-%m-%d %H:%M")


def preview(text: str, width: int = 40) -> str:
    """The start of a message on one line, inert, for notes about it."""
    one = inert(text, keep_newlines=False)
    return one if len(one) <= width else one[: width - 3] + "..."


def wrap(text: str, width: int, hang: int) -> list[str]:
    """Wrap a line for a terminal ``width`` columns wide; continuation rows are indented
    by ``hang`` spaces (the width of the "[time] name: " prefix for messages)."""
    hang = hang if hang < width // 2 else 2
    rows: list[str] = []
    for i, line in enumerate(text.split("\n")):
        first = "" if i == 0 else " " * hang
        rows += textwrap.wrap(
            line, width, initial_indent=first, subsequent_indent=" " * hang,
            replace_whitespace=False, break_on_hyphens=False,
        ) or [first]
    return rows


def message_line(
    m: StoredMessage, state: str | None = None, note: str = "", *, why: str = "", group: str | None = None
) -> tuple[str, int]:
    """A message as the chat shows it, and the indent of its continuation rows. ``why``
    says why an outgoing message went to its peer ("who wrote last"); ``group`` is the
    group's "#name" for a message in a group."""
    why = f" ({why})" if why else ""
    if group is not None:
        who = f"{inert(m.sender)} -> {inert(group)}{why}" if m.outgoing else f"{inert(m.sender)} in {inert(group)}"
    else:
        who = f"{inert(m.sender)} -> {inert(m.peer)}{why}" if m.outgoing else inert(m.sender)
    prefix = f"[{local_time(m.sent_at)}] {who}: "
    suffix = f" ({state})" if state else ""
    return prefix + inert(m.body) + suffix + note, len(prefix)
