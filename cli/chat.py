"""``veil chat``: the interactive REPL.

Two event loops share the main thread. prompt-toolkit is the host, on asyncio: it owns the
terminal, reads lines, and prints what happens above the line being typed. Trio runs as a
guest (``trio.lowlevel.start_guest_run``) inside that asyncio loop: the node, its
``LiveSession`` and every command live there, and the node stays pure trio.

They talk in two ways only:

- lines typed at the prompt go to trio through a memory channel, scheduled onto the trio
  loop with its token (``TrioToken.run_sync_soon``);
- text for the screen goes to asyncio with ``loop.call_soon_threadsafe`` (``Screen.say``),
  where it is printed with ``run_in_terminal`` so that the prompt and its half-typed line
  are redrawn below it, untouched.

Everything a peer controls (message bodies, names) goes through ``cli.text.inert`` before
it reaches the terminal; prompt-toolkit's ``Output.write`` also turns any ESC left into '?'.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import re
import shutil
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import outcome
import trio

import wire
from cli.text import inert
from keyvault.errors import KeyvaultError
from keyvault.safety import format_safety_number
from node.errors import UnknownUser, VeilError
from node.node import Node, Received
from node.session import LiveSession
from node.store import StoredMessage

HISTORY_FILE = "chat-history"  # in the device's home directory
LINK_TIMEOUT = 15.0  # for commands that ask the relay (lookups, /devices)
QUIT_FLUSH_SECONDS = 3.0  # on /quit, how long to wait for queued messages to reach the relay
DEFAULT_HISTORY = 20

HELP = [
    ("/to NAME", "talk to NAME: plain lines go to them (the prompt shows who)"),
    ("@NAME text", "send one line to NAME and make them the current peer"),
    ("/history [NAME] [N]", f"the last N messages of the conversation (default {DEFAULT_HISTORY})"),
    ("/inbox", "conversations, with unread counts"),
    ("/contacts", "contacts: verified or not, devices, key changes"),
    ("/verify [NAME] [yes]", "show the safety number; 'yes' marks NAME verified"),
    ("/trust NAME", "accept NAME's changed identity key (releases held messages)"),
    ("/devices", "this account's devices (needs the relay)"),
    ("/status", "relay, connection, outbox"),
    ("/reconnect", "try the relay now instead of waiting for the backoff"),
    ("/help", "this list"),
    ("/quit", "leave (also Ctrl-D or Ctrl-C)"),
    ("//text", "send a line that starts with '/'"),
]
COMMANDS = sorted({h[0].split()[0][1:] for h in HELP if h[0].startswith("/") and h[0][1] != "/"} | {"exit"})
QUIT_WORDS = {"/quit", "/exit", "/q"}
NAME_ARG = re.compile(r"^/(to|verify|trust|history)\s+(\S*)$")

log = logging.getLogger("veil.chat")


# ---- formatting --------------------------------------------------------------------------


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


# ---- the asyncio side: the screen, history and completion ---------------------------------


class Screen:
    """Lines for the terminal, printed above the prompt. ``say`` may be called from the
    trio guest (or any thread); lines keep their order and are printed in batches."""

    def __init__(self, loop: asyncio.AbstractEventLoop, output: object) -> None:
        from prompt_toolkit.output import Output

        assert isinstance(output, Output)
        self.loop = loop
        self.output = output
        self.app: object | None = None  # the prompt's Application, once there is one
        self._lines: list[tuple[str, int]] = []
        self._scheduled = False

    def say(self, text: str, hang: int = 2) -> None:
        try:
            self.loop.call_soon_threadsafe(self._add, text, hang)
        except RuntimeError:  # the loop is closed: the REPL is gone
            pass

    def refresh(self) -> None:
        """Redraw the prompt (its text changed)."""
        try:
            self.loop.call_soon_threadsafe(self._invalidate)
        except RuntimeError:
            pass

    def _invalidate(self) -> None:
        from prompt_toolkit.application import Application

        if isinstance(self.app, Application) and self.app.is_running:
            self.app.invalidate()

    def _add(self, text: str, hang: int) -> None:
        self._lines.append((text, hang))
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        from prompt_toolkit.application import Application, run_in_terminal

        self._scheduled = False
        lines, self._lines = self._lines, []
        if not lines:
            return
        if isinstance(self.app, Application) and self.app.is_running:
            run_in_terminal(lambda: self._write(lines))
        else:
            self._write(lines)

    def _write(self, lines: list[tuple[str, int]]) -> None:
        from prompt_toolkit.output import Output

        out = self.output
        assert isinstance(out, Output)
        try:
            columns = out.get_size().columns
        except OSError:
            columns = shutil.get_terminal_size().columns
        width = max(20, columns - 1)
        for text, hang in lines:
            for row in wrap(text, width, hang):
                out.write(row)  # write(), not write_raw(): any ESC left becomes '?'
                out.write("\n")
        out.flush()


def _history_class() -> type:
    from prompt_toolkit.history import FileHistory

    class CommandHistory(FileHistory):
        """Input history kept per device in its home directory, for commands only.

        The file is plaintext, and a line typed to someone is a message: those stay in
        memory for this session (up-arrow still finds them) and never reach the disk."""

        def __init__(self, path: Path) -> None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.close(fd)
            os.chmod(path, 0o600)
            super().__init__(str(path))

        def store_string(self, string: str) -> None:
            if string.startswith("/") and not string.startswith("//"):
                super().store_string(string)

    return CommandHistory


def _completer(names: Callable[[], list[str]]) -> object:
    from prompt_toolkit.completion import Completer, Completion
    from prompt_toolkit.document import Document

    class ChatCompleter(Completer):
        """Tab: command names after '/', contact names after a command that takes one
        and after '@'."""

        def get_completions(self, document: Document, complete_event: object) -> Iterable[Completion]:
            text = document.text_before_cursor
            if text.startswith("/") and " " not in text:
                for c in COMMANDS:
                    if c.startswith(text[1:]):
                        yield Completion("/" + c, start_position=-len(text))
                return
            m = NAME_ARG.match(text)
            if m:
                word = m.group(2)
                for n in names():
                    if n.startswith(word):
                        yield Completion(n, start_position=-len(word))
                return
            if text.startswith("@") and " " not in text:
                for n in names():
                    if n.startswith(text[1:]):
                        yield Completion("@" + n + " ", start_position=-len(text))

    return ChatCompleter()


# ---- the trio side: the conversation state and the commands -------------------------------


class Chat:
    """The REPL's state and commands. Runs in the trio guest; talks to the screen only
    through ``Screen.say`` / ``Screen.refresh``."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.screen: Screen | None = None
        self.peer: str | None = None
        self.unread: dict[str, int] = {}  # per conversation, for this REPL session
        self.names: list[str] = []  # contact names, for completion
        self.status = "offline"
        self.retry_at: float | None = None  # time.monotonic() of the next attempt
        self.ever_online = False
        self.offline_said = False
        self.key_warned: set[str] = set()  # contacts whose key change was announced
        self.tracked: set[bytes] = set()  # messages typed here and not yet at the relay
        self.session: LiveSession | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self._lines: trio.MemorySendChannel[str | None] | None = None
        self._scope: trio.CancelScope | None = None
        self._sent = trio.Event()
        self._sent_while_connecting: list[str] = []

    # ---- from the asyncio side (thread-safe: scheduled onto trio) ----------------------
    def submit(self, line: str | None) -> None:
        """Hand a typed line to trio (None: finish up and stop)."""
        if self.token is None or self._lines is None:
            return
        try:
            self.token.run_sync_soon(self._lines.send_nowait, line)
        except trio.RunFinishedError:
            pass

    def stop_now(self) -> None:
        if self.token is None:
            return
        try:
            self.token.run_sync_soon(self._cancel)
        except trio.RunFinishedError:
            pass

    def _cancel(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def prompt_text(self) -> str:
        who = f"@{self.peer}" if self.peer else ""
        waiting = sum(self.unread.values())
        parts = []
        if self.status == "connecting":
            parts.append("connecting")
        elif self.status != "online":
            if self.retry_at is not None:
                parts.append(f"offline, retry in {max(0, math.ceil(self.retry_at - time.monotonic()))}s")
            else:
                parts.append("offline")
        if waiting:
            parts.append(f"{waiting} unread")
        state = f"[{', '.join(parts)}] " if parts else ""
        return f"{state}{who}> "

    # ---- output ---------------------------------------------------------------------------
    def say(self, text: str, hang: int = 2) -> None:
        if self.screen is not None:
            self.screen.say(text, hang)

    def note(self, text: str) -> None:
        self.say(f"-- {text}", 3)

    def error(self, text: str) -> None:
        self.say(f"! {text}", 2)

    def show(self, m: StoredMessage, *, state: str | None = None, note: str = "") -> None:
        who = f"{inert(m.sender)} -> {inert(m.peer)}" if m.outgoing else inert(m.sender)
        prefix = f"[{local_time(m.sent_at)}] {who}: "
        suffix = f" ({state})" if state else ""
        self.say(prefix + inert(m.body) + suffix + note, len(prefix))

    def _state_of(self, m: StoredMessage) -> str | None:
        if not m.outgoing:
            return None
        if m.state == "pending" and self._held(m.peer):
            return "held"
        return m.state

    def _held(self, peer: str) -> bool:
        c = self.node.store.contact(peer)
        return c is not None and c.verified and c.key_changed

    # ---- the trio main -------------------------------------------------------------------
    async def main(self, ready: Callable[[], None]) -> None:
        self.token = trio.lowlevel.current_trio_token()
        send, receive = trio.open_memory_channel[str | None](math.inf)
        self._lines = send
        session = self.session = LiveSession(self.node)
        session.on.message.append(self._guard(self._on_message))
        session.on.sent.append(self._guard(self._on_sent))
        session.on.status.append(self._guard(self._on_status))
        session.on.problem.append(self._guard(self._on_problem))
        self._refresh_names()
        ready()
        self._welcome()
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stay_online)
                nursery.start_soon(self._tick)
                await self._commands(receive)
                nursery.cancel_scope.cancel()

    def _welcome(self) -> None:
        me = self.node
        self.note(f"veil chat: {me.name} on {me.relay} (device {me.device_id.hex()[:8]}); /help lists the commands")
        self.check_keys()
        pending = me.store.pending_count()
        if pending:
            self.note(f"{pending} message(s) waiting in the outbox: they go out once online")

    def _guard(self, fn: Callable[..., None]) -> Callable[..., None]:
        """Listeners run inside the session's tasks: a bug in one must not take the
        connection down."""

        def guarded(*args: object) -> None:
            try:
                fn(*args)
            except Exception as exc:
                log.debug("listener failed", exc_info=True)
                self.error(f"internal error ({type(exc).__name__}) while showing an event")

        return guarded

    async def _stay_online(self) -> None:
        assert self.session is not None
        while True:
            try:
                await self.session.run()
            except Exception as exc:  # a bug below us: say so, keep the REPL, try again
                log.debug("session failed", exc_info=True)
                self.error(f"the connection handling failed ({type(exc).__name__}); trying again in 5s")
                self._on_status("offline")
                self.retry_at = time.monotonic() + 5
                await trio.sleep(5)

    async def _tick(self) -> None:
        """Keep the offline countdown in the prompt current."""
        while True:
            await trio.sleep(1)
            if self.status != "online":
                self._refresh_prompt()

    async def _commands(self, lines: trio.MemoryReceiveChannel[str | None]) -> None:
        async for line in lines:
            if line is None:
                break
            try:
                await self.handle(line)
            except (VeilError, KeyvaultError) as exc:
                self.error(inert(str(exc), keep_newlines=False))
            except trio.TooSlowError:
                self.error("the relay did not answer in time")
            except Exception as exc:  # nothing crashes the REPL
                log.debug("command failed", exc_info=True)
                self.error(f"internal error ({type(exc).__name__}); the REPL carries on")
        await self._finish()

    async def _finish(self) -> None:
        """On /quit: give messages typed here a moment to reach the relay."""
        assert self.session is not None

        def waiting() -> list[bytes]:
            out = []
            for mid in self.tracked:
                m = self.node.store.message(mid)
                if m is not None and m.state == "pending" and not self._held(m.peer):
                    out.append(mid)
            return out

        if waiting() and self.session.status == "online":
            with trio.move_on_after(QUIT_FLUSH_SECONDS):
                while waiting():
                    self._sent = trio.Event()
                    await self._sent.wait()
        left = self.node.store.pending_count()
        if left:
            self.note(f"{left} message(s) still pending: they go out the next time this device is online")

    # ---- session events ------------------------------------------------------------------
    def _on_message(self, r: Received) -> None:
        m = r.message
        self._refresh_names()
        self.check_keys()
        if m.outgoing:  # written on another device of ours
            if self.peer in (None, m.peer):
                self.show(m, note=" (from your other device)")
            else:
                self.note(f"you wrote to {inert(m.peer)} from your other device")
            return
        if self.peer in (None, m.peer):
            self.show(m)
            return
        n = self.unread[m.peer] = self.unread.get(m.peer, 0) + 1
        self.note(f"new message from {inert(m.peer)} ({n} unread): /to {inert(m.peer)} to read")
        self._refresh_prompt()

    def _on_sent(self, msg_id: bytes) -> None:
        self.tracked.discard(msg_id)
        self._sent.set()
        m = self.node.store.message(msg_id)
        if m is None:
            return
        line = f"[{local_time(m.sent_at)}] sent to {inert(m.peer)}: {preview(m.body)}"
        if self.status == "connecting":  # the outbox goes out while connecting: say so after "online"
            self._sent_while_connecting.append(line)
        else:
            self.say(line, 3)

    def _on_status(self, status: str) -> None:
        assert self.session is not None
        previous, self.status = self.status, status
        if status == "online":
            self.retry_at = None
            self.note("back online: reconnected to the relay" if self.ever_online
                      else f"online: connected to {self.node.relay}")
            self.ever_online = True
            self.offline_said = False
        elif status == "offline":
            nxt = self.session.next_retry
            self.retry_at = None if nxt is None else time.monotonic() + max(0.0, nxt - trio.current_time())
            if previous == "online":
                self.note("lost the connection to the relay: offline, reconnecting with backoff"
                          " (messages you write are queued)")
                self.offline_said = True
            elif not self.offline_said:
                self.note(f"cannot reach the relay at {self.node.relay}: offline, retrying with backoff"
                          " (messages you write are queued)")
                self.offline_said = True
        if status != "connecting":
            for line in self._sent_while_connecting:
                self.say(line, 3)
            self._sent_while_connecting.clear()
        self._refresh_prompt()

    def _on_problem(self, text: str) -> None:
        announced = self.check_keys()
        failed = self._check_failed(text)
        if "identity key" in text:
            # Key changes and held messages: check_keys() shows them, once per change,
            # tied to the conversation. The node repeats them on every send attempt.
            if not announced:
                log.debug("repeated key warning: %s", text)
            return
        if not failed:
            self.error(inert(text, keep_newlines=False))

    def _check_failed(self, text: str) -> bool:
        found = False
        for mid in list(self.tracked):
            m = self.node.store.message(mid)
            if m is not None and m.state == "failed":
                self.tracked.discard(mid)
                self.error(f"not sent to {inert(m.peer)}: {preview(m.body)} ({inert(text, keep_newlines=False)})")
                found = True
        return found

    def check_keys(self) -> bool:
        """Announce each contact whose identity key changed (once per change)."""
        announced = False
        for c in self.node.store.contacts():
            if c.key_changed and c.name not in self.key_warned:
                self.key_warned.add(c.name)
                self._key_warning(c.name, c.verified)
                announced = True
            elif not c.key_changed:
                self.key_warned.discard(c.name)
        return announced

    def _key_warning(self, name: str, verified: bool) -> None:
        n = inert(name)
        then = f"Sending to {n} is held until you /trust {n}." if verified else f"/trust {n} accepts it."
        self.error(f"WARNING: {n}'s identity key has changed (check: /verify {n}). {then}")

    def _refresh_names(self) -> None:
        self.names = [c.name for c in self.node.store.contacts()]

    def _refresh_prompt(self) -> None:
        if self.screen is not None:
            self.screen.refresh()

    # ---- commands ----------------------------------------------------------------------
    async def handle(self, line: str) -> None:
        if not line.strip():
            return
        if line.startswith("//"):
            self.send_line(line[1:])
        elif line.startswith("@"):
            name, _, text = line[1:].partition(" ")
            if not name:
                raise VeilError("write @NAME text")
            if await self.switch(name, quiet=bool(text.strip())) and text.strip():
                self.send_line(text)
        elif line.startswith("/"):
            word, _, rest = line[1:].partition(" ")
            handler = self._handlers().get(word.lower())
            if handler is None:
                raise VeilError(f"unknown command /{inert(word, keep_newlines=False)}: /help lists the commands")
            await handler(rest.strip())
        else:
            self.send_line(line)

    def _handlers(self) -> dict[str, Callable[[str], Awaitable[None]]]:
        return {
            "to": self.cmd_to, "history": self.cmd_history, "inbox": self.cmd_inbox,
            "contacts": self.cmd_contacts, "verify": self.cmd_verify, "trust": self.cmd_trust,
            "devices": self.cmd_devices, "status": self.cmd_status, "reconnect": self.cmd_reconnect,
            "help": self.cmd_help,
        }

    def send_line(self, text: str) -> None:
        assert self.session is not None
        if self.peer is None:
            raise VeilError("no conversation yet: pick one with /to NAME, or write @NAME text")
        msg = self.session.send(self.peer, text)
        self.tracked.add(msg.msg_id)
        state = self._state_of(msg)
        self.show(msg, state=state)
        if state == "held":
            self.error(f"sending to {inert(msg.peer)} is held: their identity key changed since you verified it"
                       f" (/verify {inert(msg.peer)}, then /trust {inert(msg.peer)})")

    def _name(self, raw: str) -> str:
        try:
            return wire.normalize_username(raw)
        except ValueError as exc:
            raise VeilError(f"{inert(raw, keep_newlines=False)!r} is not a username: {exc}") from None

    async def _lookup(self, name: str) -> bool:
        """Fetch NAME's keys from the relay (pins them on first use, flags a change).
        False when offline; UnknownUser for a name nobody has."""
        assert self.session is not None
        link = self.session.link
        if link is None:
            return False
        with trio.fail_after(LINK_TIMEOUT):
            await self.node.lookup(link, name)
        self._refresh_names()
        self.check_keys()
        return True

    async def switch(self, raw: str, *, quiet: bool = False) -> bool:
        name = self._name(raw)
        if name != self.node.name:
            known = self.node.store.contact(name) is not None
            try:
                online = await self._lookup(name)
            except UnknownUser:
                self.error(f"no such user: {name}")
                return False
            except VeilError as exc:
                if not known:
                    raise
                online = False
                log.debug("lookup failed: %s", exc)
            if not online and not known:
                self.note(f"offline: {name} is not checked yet; messages to {name} are queued")
        changed = name != self.peer
        self.peer = name
        self._refresh_prompt()
        unread = self.unread.pop(name, 0)
        if unread:
            self.note(f"talking to {name}; {unread} unread:")
            for m in self._last_incoming(name, unread):
                self.show(m, state=self._state_of(m))
        elif changed or not quiet:
            self.note(f"talking to {name}" + (" (notes to yourself and your other devices)"
                                              if name == self.node.name else ""))
        contact = self.node.store.contact(name)
        if contact is not None and contact.key_changed:
            self._key_warning(name, contact.verified)
        return True

    def _last_incoming(self, peer: str, n: int) -> list[StoredMessage]:
        msgs = self.node.store.history(peer, 1000)
        seen = 0
        for i in range(len(msgs) - 1, -1, -1):
            if not msgs[i].outgoing:
                seen += 1
                if seen == n:
                    return msgs[i:]
        return msgs

    async def cmd_to(self, rest: str) -> None:
        if not rest:
            if self.peer:
                self.note(f"talking to {self.peer}")
            else:
                raise VeilError("write /to NAME")
            return
        await self.switch(rest.split()[0])

    async def cmd_history(self, rest: str) -> None:
        peer, n = self.peer, DEFAULT_HISTORY
        for arg in rest.split():
            if arg.isdigit():
                n = max(1, min(int(arg), 1000))
            else:
                peer = self._name(arg)
        if peer is None:
            raise VeilError("no conversation yet: /history NAME, or pick one with /to NAME")
        msgs = self.node.store.history(peer, n)
        self.unread.pop(peer, None)
        self._refresh_prompt()
        if not msgs:
            self.note(f"no messages with {peer} yet")
            return
        self.note(f"history with {peer} (last {len(msgs)}, local time):")
        for m in msgs:
            self.show(m, state=self._state_of(m))
        contact = self.node.store.contact(peer)
        if contact is not None and contact.key_changed:
            self._key_warning(peer, contact.verified)

    def _conversations(self) -> dict[str, StoredMessage | None]:
        convs: dict[str, StoredMessage | None] = {c.name: None for c in self.node.store.contacts()}
        for m in self.node.store.history(None, 2000):
            convs[m.peer] = m  # oldest first: the last one wins
        for p in self.unread:
            convs.setdefault(p, None)
        return convs

    async def cmd_inbox(self, rest: str) -> None:
        convs = self._conversations()
        if not convs:
            self.note("no conversations yet: /to NAME starts one")
            return
        def rank(p: str) -> tuple[int, int, str]:
            last = convs[p]
            return (-self.unread.get(p, 0), -(last.seq if last is not None else 0), p)

        order = sorted(convs, key=rank)
        self.note("conversations (unread counts are for this session):")
        width = max(len(p) for p in order)
        for p in order:
            last = convs[p]
            n = self.unread.get(p, 0)
            count = f"{n} unread" if n else "no unread"
            when = f"  last [{local_time(last.sent_at)}]" if last else ""
            mark = "  <- current" if p == self.peer else ""
            self.say(f"  {inert(p).ljust(width)}  {count}{when}{mark}", 4)

    async def cmd_contacts(self, rest: str) -> None:
        contacts = self.node.store.contacts()
        if not contacts:
            self.note("no contacts yet: /to NAME or @NAME text adds one")
            return
        width = max(len(c.name) for c in contacts)
        for c in contacts:
            state = "verified" if c.verified else "unverified"
            flag = "  KEY CHANGED" if c.key_changed else ""
            n = self.unread.get(c.name, 0)
            unread = f"  {n} unread" if n else ""
            self.say(f"  {inert(c.name).ljust(width)}  {state}  {len(c.devices)} device(s){flag}{unread}", 4)

    async def cmd_verify(self, rest: str) -> None:
        assert self.session is not None
        args = rest.split()
        mark = bool(args) and args[-1].lower() in ("yes", "y", "--mark")
        if mark:
            args = args[:-1]
        if args:
            name = self._name(args[0])
        elif self.peer:
            name = self.peer
        else:
            raise VeilError("write /verify NAME")
        if name == self.node.name:
            raise VeilError("that is you: verify a contact")
        contact = self.node.store.contact(name)
        if contact is None:
            if not await self._lookup(name):
                raise VeilError(f"offline: {name} is not a contact yet and the relay is needed to fetch their key")
            contact = self.node.store.contact(name)
            assert contact is not None
        self.say(f"safety number for you ({self.node.name}) and {name}:")
        for row in format_safety_number(self.node.safety_number(contact)).splitlines():
            self.say("    " + row)
        if contact.key_changed:
            self.error(f"note: {name}'s identity key changed since it was first seen")
        if mark:
            with self.node.store.transaction():
                self.node.store.set_verified(name, True)
            self.check_keys()
            self.session.retry_held()
            self.note(f"{name} is now verified")
        elif contact.verified:
            self.note(f"{name} is verified")
        else:
            self.note(f"compare it with {name} (in person or on a call); if it is the same: /verify {name} yes")

    async def cmd_trust(self, rest: str) -> None:
        assert self.session is not None
        args = rest.split()
        name = self._name(args[0]) if args else self.peer
        if name is None:
            raise VeilError("write /trust NAME")
        contact = self.node.store.contact(name)
        if contact is None:
            raise VeilError(f"{name} is not a contact")
        if not contact.key_changed:
            self.note(f"{name}'s identity key has not changed: nothing to accept")
            return
        with self.node.store.transaction():
            self.node.store.accept_key(name)
        self.check_keys()
        self.session.retry_held()
        self.note(f"accepted {name}'s new identity key; held messages go out now"
                  f" ({name} is not verified any more: /verify {name})")

    async def cmd_devices(self, rest: str) -> None:
        assert self.session is not None
        link = self.session.link
        if link is None:
            raise VeilError("offline: /devices needs the relay; try again when online")
        with trio.fail_after(LINK_TIMEOUT):
            devices = await self.node.devices(link)
        self.note(f"devices of {self.node.name}:")
        for d in devices:
            this = "  (this device)" if d.device_id == self.node.device_id else ""
            try:
                added = datetime.fromtimestamp(d.created_day * 86400, tz=UTC).strftime("%Y-%m-%d")
            except (OverflowError, OSError, ValueError):
                added = "?"
            self.say(f"  {d.device_id.hex()[:8]}  added {added}{this}", 4)

    async def cmd_status(self, rest: str) -> None:
        assert self.session is not None
        s = self.session
        if self.status == "online":
            conn = "connected"
        elif self.status == "connecting":
            conn = "connecting"
        else:
            left = "" if self.retry_at is None else f", next try in {max(0, math.ceil(self.retry_at - time.monotonic()))}s"
            conn = f"not connected (attempt {s.attempts}{left}; /reconnect tries now)"
        self.say(f"account {self.node.name}, this device {self.node.device_id.hex()[:8]}")
        self.say(f"relay {self.node.relay}: {conn}")
        self.say(f"outbox: {self.node.store.pending_count()} pending")
        self.say(f"talking to: {self.peer or 'nobody (/to NAME)'}")

    async def cmd_reconnect(self, rest: str) -> None:
        assert self.session is not None
        if self.status == "online":
            self.note("already online")
            return
        self.session.reconnect_now()
        self.note("reconnecting now")

    async def cmd_help(self, rest: str) -> None:
        width = max(len(h[0]) for h in HELP)
        for cmd, text in HELP:
            self.say(f"  {cmd.ljust(width)}  {text}", width + 4)
        self.say("  Plain lines go to the current peer. Tab completes commands and names.", 2)


# ---- the host: prompt-toolkit on asyncio, trio as its guest ------------------------------


async def _host(chat: Chat) -> None:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.output import create_output
    from prompt_toolkit.shortcuts import CompleteStyle

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
        history_cls = _history_class()
        session: PromptSession[str] = PromptSession(
            chat.prompt_text,
            history=history_cls(chat.node.home.path / HISTORY_FILE),
            completer=_completer(lambda: chat.names),  # type: ignore[arg-type]
            complete_style=CompleteStyle.READLINE_LIKE,
            complete_while_typing=False,
            erase_when_done=True,  # the line is echoed above, with its time and state
            output=output,
        )
        screen.app = session.app
        try:
            await _prompt_loop(chat, screen, session, done)
        finally:
            screen.app = None
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
    chat: Chat, screen: Screen, session: object, done: asyncio.Future[outcome.Outcome[None]]
) -> None:
    from prompt_toolkit import PromptSession

    assert isinstance(session, PromptSession)

    async def read() -> str | None:
        # Ctrl-C and Ctrl-D end the prompt with KeyboardInterrupt / EOFError. Catch them in
        # the task: a KeyboardInterrupt leaving an asyncio task aborts the whole loop.
        try:
            line: str = await session.prompt_async()
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


def run_chat(args: argparse.Namespace, unlock: Callable[[argparse.Namespace], Node]) -> None:
    """``veil chat``: unlock with the master password, then run the REPL until /quit."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise VeilError("veil chat needs a terminal; scripts can use `veil send` and `veil recv`")
    try:
        import prompt_toolkit  # noqa: F401
    except ImportError:
        raise VeilError("veil chat needs prompt-toolkit: pip install 'veil[chat]'") from None
    node = unlock(args)
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
