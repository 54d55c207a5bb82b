"""What the terminal shows in ``veil chat``: lines printed above the prompt, and the
messages still pending in a small area just above it.

The asyncio side owns the terminal. Lines go out through prompt-toolkit's
``run_in_terminal``, which erases the prompt, lets us print, and redraws the prompt with
its half-typed line below. A message you send is first drawn as part of the prompt itself
(the lines before the last line of a prompt-toolkit message), marked "pending"; once the
relay holds it, the line is printed above for good, marked "sent", in the same redraw that
takes it out of the area, so on the terminal the line changes in place. Lines printed
above the prompt never move again, so a pending line that has to leave the area early
(too many, or too long) is printed as it is, and its send is then told in a short line of
its own.

``Screen``'s public methods may be called from the trio guest (or any thread): they only
schedule work on the asyncio loop, in order.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from typing import Any

from prompt_toolkit.application import Application, run_in_terminal
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.output import Output

from cli.chat.formatting import wrap

PENDING_MAX = 3  # messages kept in the pending area above the prompt
PENDING_ROWS = 6  # terminal rows that area may take


@dataclass
class _Line:
    """A line to print above the prompt."""

    text: str
    hang: int
    ring: bool = False  # sound the terminal bell with it
    replaces: bytes | None = None  # the pending line it takes out of the area


@dataclass
class _Pending:
    """A message's line in the pending area."""

    key: bytes
    text: str
    hang: int
    settled: bool = False  # its final text is in; it leaves once the lines above it have
    leaving: bool = False  # printed above in the next batch, then taken out


class Screen:
    """The terminal of the chat: lines above the prompt (``say``), the pending area
    (``show_pending``, ``settle``), the input line (``keep_input``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, output: Output) -> None:
        self.loop = loop
        self.output = output
        self.app: Application[Any] | None = None  # the prompt's Application, once there is one
        self.input: Buffer | None = None  # the line being typed at that prompt
        self._lines: list[_Line] = []
        self._scheduled = False
        self._kept = ""  # a line to put back into the input when the next prompt starts
        self._pending: list[_Pending] = []
        self._area_open = True  # False once the prompt is gone for good

    # ---- thread-safe -------------------------------------------------------------------
    def say(self, text: str, hang: int = 2, *, ring: bool = False) -> None:
        """Print a line above the prompt (continuation rows indented by ``hang``); with
        ``ring``, sound the terminal bell as it appears."""
        self._soon(self._add, _Line(text, hang, ring))

    def show_pending(self, key: bytes, text: str, hang: int) -> None:
        """Show a message that is on its way in the pending area, under ``key``."""
        self._soon(self._show_pending, key, text, hang)

    def settle(self, key: bytes, text: str, hang: int, fallback: tuple[str, int] | None) -> None:
        """The message under ``key`` has its final state: its line becomes ``text`` in
        place. If it is no longer in the pending area, print ``fallback`` instead."""
        self._soon(self._settle, key, text, hang, fallback)

    def keep_input(self, text: str) -> None:
        """Put a line that could not be carried out back into the input, unless
        something else is typed there by now (the up arrow still finds it)."""
        self._soon(self._keep_input, text)

    def refresh(self) -> None:
        """Redraw the prompt (its text changed)."""
        self._soon(self._invalidate)

    # ---- asyncio side ------------------------------------------------------------------
    def take_kept(self) -> str:
        """The line to start the next prompt with."""
        text, self._kept = self._kept, ""
        return text

    def pending_area(self) -> str:
        """The pending lines, wrapped to the terminal, each ending in a newline: the
        part of the prompt above the line being typed."""
        width = self._width()
        return "".join(row + "\n" for p in self._pending for row in wrap(p.text, width, p.hang))

    def close_area(self) -> None:
        """The prompt is gone for good: print the pending lines as they are."""
        self._area_open = False
        for p in self._pending:
            if not p.leaving:
                self._leave(p)

    def flush(self) -> None:
        """Print what is queued now."""
        self._scheduled = False
        lines, self._lines = self._lines, []
        if not lines:
            return
        if self._running():
            run_in_terminal(lambda: self._write(lines))
        else:
            self._write(lines)

    def _soon(self, fn: Any, *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the REPL is gone
            pass

    def _running(self) -> bool:
        return self.app is not None and self.app.is_running

    def _invalidate(self) -> None:
        if self.app is not None and self.app.is_running:
            self.app.invalidate()

    def _keep_input(self, text: str) -> None:
        if not self._running():
            self._kept = text
        elif self.input is not None and not self.input.text:
            self.input.text = text
            self.input.cursor_position = len(text)

    def _add(self, line: _Line) -> None:
        self._lines.append(line)
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.flush)

    def _rows(self, text: str, hang: int) -> int:
        return len(wrap(text, self._width(), hang))

    def _show_pending(self, key: bytes, text: str, hang: int) -> None:
        if not self._area_open or self._rows(text, hang) > PENDING_ROWS:
            self._add(_Line(text, hang))
            return
        self._pending.append(_Pending(key, text, hang))
        staying = [p for p in self._pending if not p.leaving]
        while len(staying) > PENDING_MAX or sum(self._rows(p.text, p.hang) for p in staying) > PENDING_ROWS:
            self._leave(staying.pop(0))
        self._invalidate()

    def _settle(self, key: bytes, text: str, hang: int, fallback: tuple[str, int] | None) -> None:
        mine = next((p for p in self._pending if p.key == key and not p.leaving), None)
        if mine is None:
            if fallback is not None:
                self._add(_Line(*fallback))
            return
        mine.text, mine.hang, mine.settled = text, hang, True
        # Settled lines leave from the top only, so lines above the prompt keep the order
        # the messages were written in.
        for p in self._pending:
            if p.leaving:
                continue
            if not p.settled:
                break
            self._leave(p)
        self._invalidate()

    def _leave(self, p: _Pending) -> None:
        p.leaving = True
        self._add(_Line(p.text, p.hang, replaces=p.key))

    def _width(self) -> int:
        try:
            columns = self.output.get_size().columns
        except OSError:
            columns = shutil.get_terminal_size().columns
        return max(20, columns - 1)

    def _write(self, lines: list[_Line]) -> None:
        out = self.output
        width = self._width()
        rang = False
        for line in lines:
            if line.ring and not rang:  # one bell for a batch, before the line it is for
                out.write_raw("\a")
                rang = True
            for row in wrap(line.text, width, line.hang):
                out.write(row)  # write(), not write_raw(): any ESC left becomes '?'
                out.write("\n")
            if line.replaces is not None:
                self._pending = [p for p in self._pending if p.key != line.replaces]
        out.flush()
