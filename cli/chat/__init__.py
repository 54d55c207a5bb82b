"""``veil chat``: the interactive REPL, in steps.

- ``host``: the two event loops. prompt-toolkit on asyncio owns the terminal; trio runs as
  its guest, with the node and every command. They talk in two ways only: typed lines go
  to trio through a memory channel (``Chat.submit``, scheduled with the trio token), and
  what to show goes to asyncio with ``loop.call_soon_threadsafe`` (``Screen``).
- ``screen``: what the terminal shows: lines printed above the prompt with
  ``run_in_terminal``, so that the prompt and its half-typed line are redrawn below,
  untouched, and the messages still pending, drawn as part of the prompt until they turn
  to sent in place.
- ``live``: the trio side while the chat runs: the node online (``LiveSession``), and its
  events (messages, sends, connection changes, warnings) turned into lines.
- ``commands``: a typed line, parsed, and the command it names carried out.
- ``conversation``: the current peer, who wrote last, unread counts (the store's read
  marks).
- ``history``: the input history: commands only, in the encrypted store.
- ``formatting``: how times and messages look.

Everything a peer controls (message bodies, names) goes through ``cli.text.inert`` before
it reaches the terminal; prompt-toolkit's ``Output.write`` also turns any ESC left into '?'.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from cli.chat.formatting import local_time, preview, wrap
from node.errors import VeilError
from node.node import Node

__all__ = ["local_time", "preview", "run_chat", "wrap"]


def run_chat(args: argparse.Namespace, unlock: Callable[[argparse.Namespace], Node]) -> None:
    """``veil chat``: unlock with the master password, then run the REPL until /quit."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise VeilError("veil chat needs a terminal; scripts can use `veil send` and `veil recv`")
    try:
        import prompt_toolkit  # noqa: F401
    except ImportError:
        raise VeilError("veil chat needs prompt-toolkit: pip install 'veil[chat]'") from None
    from cli.chat.host import run  # imports prompt-toolkit

    run(args, unlock)
