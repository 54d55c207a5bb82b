"""The host of ``veil chat``: prompt-toolkit on asyncio, with trio as its guest.

prompt-toolkit owns the terminal, reads lines and prints what happens above the line
being typed. Trio runs as a guest (``trio.lowlevel.start_guest_run``) inside that asyncio
loop: the node, its ``LiveSession`` and every command live there, and the node stays pure
trio. Both loops run on the main thread.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

import outcome
import trio
from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import History
from prompt_toolkit.output import create_output
from prompt_toolkit.shortcuts import CompleteStyle

from cli.chat.commands import COMMANDS, NAME_ARG, QUIT_WORDS
from cli.chat.live import Chat
from cli.chat.screen import Screen
from cli.text import inert
from node.node import Node


class StoredHistory(History):
    """The up arrow's history: what was typed in this run (in memory, as prompt-toolkit
    keeps it), after the commands of earlier runs from the encrypted store. Each typed
    line goes to ``Chat.remember``, which keeps commands only (cli/chat/history.py)."""

    def __init__(self, chat: Chat) -> None:
        super().__init__()
        self.chat = chat

    def load_history_strings(self) -> Iterable[str]:
        return list(self.chat.input_history)  # newest first, as prompt-toolkit wants them

    def store_string(self, string: str) -> None:
        self.chat.remember(string)


class ChatCompleter(Completer):
    """Tab: command names after '/', contact names after a command that takes one
    and after '@'."""

    def __init__(self, names: Callable[[], list[str]]) -> None:
        self.names = names

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        if text.startswith("/") and " " not in text:
            for c in COMMANDS:
                if c.startswith(text[1:]):
                    yield Completion("/" + c, start_position=-len(text))
            return
        m = NAME_ARG.match(text)
        if m:
            word = m.group(2)
            for n in self.names():
                if n.startswith(word):
                    yield Completion(n, start_position=-len(word))
            return
        if text.startswith("@") and " " not in text:
            for n in self.names():
                if n.startswith(text[1:]):
                    yield Completion("@" + n + " ", start_position=-len(text))


async def _host(chat: Chat) -> None:
    loop = asyncio.get_running_loop()
    output = create_output()
    screen = chat.screen = Screen(loop, output)
    done: asyncio.Future[outcome.Outcome[None]] = loop.create_future()
    ready: asyncio.Future[None] = loop.create_future()

    def trio_done(result: outcome.Outcome[None]) -> None:
        if not done.done():
            done.set_result(result)

    def mark_ready() -> None:
        if not ready.done():
            ready.set_result(None)

    def trio_ready() -> None:
        loop.call_soon_threadsafe(mark_ready)

    trio.lowlevel.start_guest_run(
        chat.main, trio_ready,
        run_sync_soon_threadsafe=loop.call_soon_threadsafe,
        done_callback=trio_done,
        host_uses_signal_set_wakeup_fd=True,  # asyncio owns signal.set_wakeup_fd
    )
    started: list[asyncio.Future[Any]] = [ready, done]
    await asyncio.wait(started, return_when=asyncio.FIRST_COMPLETED)
    if not done.done():
        session: PromptSession[str] = PromptSession(
            lambda: screen.pending_area() + chat.prompt_text(),
            history=StoredHistory(chat),
            completer=ChatCompleter(lambda: chat.names),
            complete_style=CompleteStyle.READLINE_LIKE,
            complete_while_typing=False,
            erase_when_done=True,  # the line is echoed above, with its time and state
            output=output,
        )
        screen.app, screen.input = session.app, session.default_buffer
        try:
            await _prompt_loop(chat, screen, session, done)
        finally:
            screen.app = screen.input = None
            screen.close_area()
            chat.submit(None)  # finish the lines already typed, then stop
            try:
                result = await asyncio.shield(done)
            except asyncio.CancelledError:  # Ctrl-C while finishing: stop at once
                chat.stop_now()
                result = await done
    else:
        result = done.result()
    await asyncio.sleep(0)
    screen.flush()
    result.unwrap()


async def _prompt_loop(
    chat: Chat, screen: Screen, session: PromptSession[str], done: asyncio.Future[outcome.Outcome[None]]
) -> None:
    async def read() -> str | None:
        # Ctrl-C and Ctrl-D end the prompt with KeyboardInterrupt / EOFError. Catch them in
        # the task: a KeyboardInterrupt leaving an asyncio task aborts the whole loop.
        try:
            line: str = await session.prompt_async(default=screen.take_kept())
            return line
        except (EOFError, KeyboardInterrupt):
            return None

    while True:
        prompt = asyncio.ensure_future(read())
        try:
            either: list[asyncio.Future[Any]] = [prompt, done]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # SIGINT outside the prompt: quit cleanly
            prompt.cancel()
            await asyncio.gather(prompt, return_exceptions=True)
            return
        if not prompt.done():  # the trio side ended on its own
            if session.app.is_running:
                session.app.exit(exception=EOFError())
            await asyncio.gather(prompt, return_exceptions=True)
            return
        line = prompt.result()
        if line is None or line.strip().lower() in QUIT_WORDS:
            return
        if line.strip():
            if line.startswith("/"):
                screen.say(f"> {inert(line, keep_newlines=False)}")
            chat.submit(line)


class _ScreenLog(logging.Handler):
    """Log warnings as one line in the chat instead of on stderr under the prompt."""

    def __init__(self, chat: Chat) -> None:
        super().__init__(logging.WARNING)
        self.chat = chat

    def emit(self, record: logging.LogRecord) -> None:
        self.chat.error(inert(record.getMessage(), keep_newlines=False))


def run(args: argparse.Namespace, unlock: Callable[[argparse.Namespace], Node]) -> None:
    """Unlock with the master password, then run the REPL until /quit."""
    node = unlock(args)
    # Nothing may read the terminal behind the chat's back: a code or a newer password
    # is asked for by a `veil` command at the terminal (the chat says so).
    if not getattr(args, "code", None):
        node.ask_code = None
    node.ask_password = None
    chat = Chat(node)
    root = logging.getLogger()
    handler = _ScreenLog(chat)
    root.addHandler(handler)
    try:
        asyncio.run(_host(chat))
    finally:
        root.removeHandler(handler)
        node.close()
    print("bye")
