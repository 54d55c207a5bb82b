"""What the terminal shows in ``veil chat``: lines printed above the prompt.

The asyncio side owns the terminal. ``Screen``'s public methods may be called from the
trio guest (or any thread): they only schedule work on the asyncio loop.
"""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

from prompt_toolkit.application import Application, run_in_terminal
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.output import Output

from cli.chat.formatting import wrap


class Screen:
    """Lines for the terminal, printed above the prompt. ``say`` may be called from the
    trio guest (or any thread); lines keep their order and are printed in batches."""

    def __init__(self, loop: asyncio.AbstractEventLoop, output: Output) -> None:
        self.loop = loop
        self.output = output
        self.app: Application[Any] | None = None  # the prompt's Application, once there is one
        self.input: Buffer | None = None  # the line being typed at that prompt
        self._lines: list[tuple[str, int]] = []
        self._scheduled = False
        self._kept = ""  # a line to put back into the input when the next prompt starts

    def say(self, text: str, hang: int = 2) -> None:
        """Print a line above the prompt (continuation rows indented by ``hang``)."""
        self._soon(self._add, text, hang)

    def keep_input(self, text: str) -> None:
        """Put a line that could not be carried out back into the input, unless
        something else is typed there by now (the up arrow still finds it)."""
        self._soon(self._keep_input, text)

    def take_kept(self) -> str:
        """The line to start the next prompt with (asyncio side)."""
        text, self._kept = self._kept, ""
        return text

    def refresh(self) -> None:
        """Redraw the prompt (its text changed)."""
        self._soon(self._invalidate)

    def _soon(self, fn: Any, *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the REPL is gone
            pass

    def _running(self) -> bool:
        return self.app is not None and self.app.is_running

    def _keep_input(self, text: str) -> None:
        if not self._running():
            self._kept = text
        elif self.input is not None and not self.input.text:
            self.input.text = text
            self.input.cursor_position = len(text)

    def _invalidate(self) -> None:
        if self.app is not None and self.app.is_running:
            self.app.invalidate()

    def _add(self, text: str, hang: int) -> None:
        self._lines.append((text, hang))
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Print what is queued now (asyncio side)."""
        self._scheduled = False
        lines, self._lines = self._lines, []
        if not lines:
            return
        if self._running():
            run_in_terminal(lambda: self._write(lines))
        else:
            self._write(lines)

    def _width(self) -> int:
        try:
            columns = self.output.get_size().columns
        except OSError:
            columns = shutil.get_terminal_size().columns
        return max(20, columns - 1)

    def _write(self, lines: list[tuple[str, int]]) -> None:
        out = self.output
        width = self._width()
        for text, hang in lines:
            for row in wrap(text, width, hang):
                out.write(row)  # write(), not write_raw(): any ESC left becomes '?'
                out.write("\n")
        out.flush()
