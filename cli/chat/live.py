"""The trio side of ``veil chat`` while it runs: the node online, its events shown.

``Chat`` owns the REPL's state (the current peer, unread counts, the connection status)
and turns what the ``LiveSession`` reports (messages, sends, status changes, warnings)
into lines for the ``Screen``. Typed lines arrive through ``submit`` and are carried out
by ``commands.handle``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable

import trio

import wire
from cli.chat import commands
from cli.chat.conversation import Conversations
from cli.chat.formatting import local_time, message_line, preview
from cli.chat.history import PLAINTEXT_FILE, is_command, retire_plaintext_history
from cli.chat.screen import Screen
from cli.text import inert
from keyvault.errors import KeyvaultError
from node.control import ControlService
from node.errors import DeviceRevoked, VeilError
from node.groups import group_of
from node.node import Node, Received
from node.session import LiveSession
from node.store import StoredMessage

QUIT_FLUSH_SECONDS = 3.0  # on /quit, how long to wait for queued messages to reach the relay
BELL_SETTING = "chat_bell"  # in the store's meta table: b"1" or b"0"


class Chat:
    """The REPL's state, and the node's events as lines. Runs in the trio guest; talks to
    the screen only through ``Screen``'s thread-safe methods."""

    log = logging.getLogger("veil.chat")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.screen: Screen | None = None
        self.conv = Conversations(node.store)
        self.bell = self._bell_setting()
        self.input_history: list[str] = []  # commands of earlier runs, newest first
        self._retired: int | None = None  # commands moved from an old plaintext history file
        self.names: list[str] = []  # contact names, for completion
        self.status = "offline"
        self.retry_at: float | None = None  # time.monotonic() of the next attempt
        self.ever_online = False
        self.offline_said = False
        self.key_warned: set[str] = set()  # contacts whose key change was announced
        # Messages typed here and not yet at the relay, with why they went to their peer.
        self.tracked: dict[bytes, str] = {}
        self.session: LiveSession | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self._lines: trio.MemorySendChannel[str | None] | None = None
        self._scope: trio.CancelScope | None = None
        self._sent = trio.Event()
        self._sent_while_connecting: list[bytes] = []

    # ---- from the asyncio side (thread-safe: scheduled onto trio) ----------------------
    def submit(self, line: str | None) -> None:
        """Hand a typed line to trio (None: finish up and stop)."""
        if self.token is None or self._lines is None:
            return
        try:
            self.token.run_sync_soon(self._lines.send_nowait, line)
        except trio.RunFinishedError:
            pass

    def remember(self, line: str) -> None:
        """A line was typed: keep it in the store's input history if it is a command."""
        if self.token is None:
            return
        try:
            self.token.run_sync_soon(self._guard(self._remember), line)
        except trio.RunFinishedError:
            pass

    def _remember(self, line: str) -> None:
        if is_command(line):
            with self.node.store.transaction():
                self.node.store.add_input(line)

    def stop_now(self) -> None:
        """Stop at once, without waiting for the outbox (a second Ctrl-C)."""
        if self.token is None:
            return
        try:
            self.token.run_sync_soon(self._cancel)
        except trio.RunFinishedError:
            pass

    def _cancel(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def group_name(self, peer: str) -> str | None:
        """"#name" of a group conversation; None for a one-to-one one."""
        gid = group_of(peer)
        return None if gid is None else "#" + self.node.groups.label(gid)

    def shown(self, peer: str) -> str:
        """How a conversation is named on screen: the peer, or the group's "#name"."""
        return self.group_name(peer) or peer

    def prompt_text(self) -> str:
        """The prompt: connection state, unread count, current peer (or group)."""
        who = (self.group_name(self.conv.peer) or f"@{self.conv.peer}") if self.conv.peer else ""
        waiting = self.conv.total_unread()
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
    def say(self, text: str, hang: int = 2, *, ring: bool = False) -> None:
        """A line above the prompt; with ``ring``, the terminal bell sounds with it."""
        if self.screen is not None:
            self.screen.say(text, hang, ring=ring)

    def note(self, text: str) -> None:
        """A line about the chat itself ("-- ...")."""
        self.say(f"-- {text}", 3)

    def error(self, text: str) -> None:
        """A line about something that went wrong ("! ..."); the REPL carries on."""
        self.say(f"! {text}", 2)

    def show(
        self, m: StoredMessage, *, state: str | None = None, note: str = "", why: str = "", ring: bool = False
    ) -> None:
        """A message, as one line."""
        self.say(*message_line(m, state, note, why=why, group=self.group_name(m.peer)), ring=ring)

    def show_pending(self, m: StoredMessage, why: str) -> None:
        """A message on its way: its line changes in place once it is sent (``_on_sent``)."""
        if self.screen is not None:
            self.screen.show_pending(m.msg_id, *message_line(m, "pending", why=why, group=self.group_name(m.peer)))

    def keep_input(self, text: str) -> None:
        """Put a typed line back into the input."""
        if self.screen is not None:
            self.screen.keep_input(text)

    def state_of(self, m: StoredMessage) -> str | None:
        """What to show after an outgoing message: pending, held, sent or failed."""
        if not m.outgoing:
            return None
        if m.state == "pending" and self.held(m.peer):
            return "held"
        return m.state

    def held(self, peer: str) -> bool:
        """Sending to ``peer`` waits for /trust (a verified contact's key changed)."""
        c = self.node.store.contact(peer)
        return c is not None and c.verified and c.key_changed

    def refresh_prompt(self) -> None:
        """Redraw the prompt (its text changed)."""
        if self.screen is not None:
            self.screen.refresh()

    # ---- the trio main -------------------------------------------------------------------
    async def main(self, ready: Callable[[], None]) -> None:
        """The trio guest: online with the node, carrying out typed lines until /quit."""
        self.token = trio.lowlevel.current_trio_token()
        send, receive = trio.open_memory_channel[str | None](math.inf)
        self._lines = send
        session = self.session = LiveSession(self.node)
        session.on.message.append(self._guard(self._on_message))
        session.on.sent.append(self._guard(self._on_sent))
        session.on.status.append(self._guard(self._on_status))
        session.on.problem.append(self._guard(self._on_problem))
        self._refresh_names()
        try:
            self._retired = retire_plaintext_history(self.node.home.path, self.node.store)
        except OSError as exc:
            self.error(f"could not remove the plaintext input history {PLAINTEXT_FILE}: {exc.strerror or exc}")
        self.input_history = self.node.store.input_history()
        ready()
        self._welcome()
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stay_online)
                nursery.start_soon(self._tick)
                # `veil send` and `veil recv` from other processes go through this chat.
                nursery.start_soon(self._serve_control, session)
                await self._commands(receive)
                nursery.cancel_scope.cancel()

    def _welcome(self) -> None:
        me = self.node
        self.note(f"veil chat: {me.name} on {me.relay} (device {me.device_id.hex()[:8]}); /help lists the commands")
        if self._retired is not None:
            self.note(f"removed {PLAINTEXT_FILE}, the plaintext input history of an earlier version;"
                      f" its {self._retired} command(s) are now kept in the encrypted store")
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
                self.log.debug("listener failed", exc_info=True)
                self.error(f"internal error ({type(exc).__name__}) while showing an event")

        return guarded

    async def _stay_online(self) -> None:
        assert self.session is not None
        while True:
            try:
                await self.session.run()
            except Exception as exc:  # a bug below us: say so, keep the REPL, try again
                self.log.debug("session failed", exc_info=True)
                self.error(f"the connection handling failed ({type(exc).__name__}); trying again in 5s")
                self._on_status("offline")
                self.retry_at = time.monotonic() + 5
                await trio.sleep(5)

    async def _tick(self) -> None:
        """Keep the offline countdown in the prompt current."""
        while True:
            await trio.sleep(1)
            if self.status != "online":
                self.refresh_prompt()

    async def _commands(self, lines: trio.MemoryReceiveChannel[str | None]) -> None:
        async for line in lines:
            if line is None:
                break
            try:
                await commands.handle(self, line)
            except (VeilError, KeyvaultError) as exc:
                self.error(inert(str(exc), keep_newlines=False))
            except trio.TooSlowError:
                self.error("the relay did not answer in time")
            except Exception as exc:  # nothing crashes the REPL
                self.log.debug("command failed", exc_info=True)
                self.error(f"internal error ({type(exc).__name__}); the REPL carries on")
        await self._finish()

    async def _finish(self) -> None:
        """On /quit: give messages typed here a moment to reach the relay."""
        assert self.session is not None

        def waiting() -> list[bytes]:
            out = []
            for mid in self.tracked:
                m = self.node.store.message(mid)
                if m is not None and m.state == "pending" and not self.held(m.peer):
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

    # ---- the bell -------------------------------------------------------------------------
    def _bell_setting(self) -> bool:
        # VEIL_CHAT_BELL=0 / =1 decides for this run only; /bell changes the stored setting.
        env = os.environ.get("VEIL_CHAT_BELL", "").strip()
        if env in ("0", "1"):
            return env == "1"
        return self.node.store.get(BELL_SETTING) != b"0"

    def set_bell(self, on: bool) -> None:
        """Turn the bell on or off, now and in later runs on this device."""
        with self.node.store.transaction():
            self.node.store.put(BELL_SETTING, b"1" if on else b"0")
        self.bell = on

    # ---- the relay link, for commands ----------------------------------------------------
    def username(self, raw: str) -> str:
        """``raw`` as a canonical username, or a one-line error."""
        try:
            return wire.normalize_username(raw)
        except ValueError as exc:
            raise VeilError(f"{inert(raw, keep_newlines=False)!r} is not a username: {exc}") from None

    async def lookup(self, name: str) -> bool:
        """Fetch NAME's keys from the relay (pins them on first use, flags a change).
        False when offline; UnknownUser for a name nobody has."""
        assert self.session is not None
        link = self.session.link
        if link is None:
            return False
        with trio.fail_after(commands.LINK_TIMEOUT):
            await self.node.lookup(link, name)
        self._refresh_names()
        self.check_keys()
        return True

    # ---- session events ------------------------------------------------------------------
    def _on_message(self, r: Received) -> None:
        m = r.message
        self._refresh_names()
        self.check_keys()
        # The bell is for what someone else wrote outside the conversation on screen.
        ring = self.bell and not m.outgoing and m.peer != self.conv.peer
        if self.conv.arrived(m):
            self.show(m, note=" (from your other device)" if m.outgoing else "", ring=ring)
            return
        if m.outgoing:  # written on another device of ours, in another conversation
            self.note(f"you wrote to {inert(self.shown(m.peer))} from your other device")
            return
        n = self.conv.unread[m.peer]
        p = inert(self.shown(m.peer))
        self.say(f"-- new message from {p} ({n} unread): /to {p} to read", 3, ring=ring)
        self.refresh_prompt()

    async def _serve_control(self, session: LiveSession) -> None:
        service = ControlService(self.node, session, f"`veil chat` (pid {os.getpid()})")
        service.composed.append(self._guard(self._on_composed_elsewhere))
        try:
            await service.serve()
        except OSError as exc:  # the chat works without it; other commands then say who holds the home
            self.error(f"cannot open the control socket ({exc.strerror or exc}):"
                       " `veil send` and `veil recv` elsewhere will not reach this chat")

    def _on_composed_elsewhere(self, m: StoredMessage) -> None:
        self.tracked[m.msg_id] = "via `veil send`"
        self.show_pending(m, "via `veil send`")

    def _on_sent(self, msg_id: bytes) -> None:
        self._sent.set()
        if self.status == "connecting":  # the outbox goes out while connecting: say so after "online"
            self._sent_while_connecting.append(msg_id)
        else:
            self._show_sent(msg_id)

    def _show_sent(self, msg_id: bytes) -> None:
        why = self.tracked.pop(msg_id, "")
        m = self.node.store.message(msg_id)
        if m is None or self.screen is None:
            return
        # If the line has left the pending area, a short line of its own says it.
        fallback = f"[{local_time(m.sent_at)}] sent to {inert(self.shown(m.peer))}: {preview(m.body)}", 3
        self.screen.settle(msg_id, *message_line(m, "sent", why=why, group=self.group_name(m.peer)), fallback)

    def _on_status(self, status: str) -> None:
        assert self.session is not None
        previous, self.status = self.status, status
        if status == "online":
            self.retry_at = None
            self.note("back online: reconnected to the relay" if self.ever_online
                      else f"online: connected to {self.node.relay}")
            self.ever_online = True
            self.offline_said = False
        elif status == "revoked":
            self.note(f"{DeviceRevoked()} Quit with /quit.")
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
            for msg_id in self._sent_while_connecting:
                self._show_sent(msg_id)
            self._sent_while_connecting.clear()
        self.refresh_prompt()

    def _on_problem(self, text: str) -> None:
        announced = self.check_keys()
        failed = self._check_failed(text)
        if "identity key" in text:
            # Key changes and held messages: check_keys() shows them, once per change,
            # tied to the conversation. The node repeats them on every send attempt.
            if not announced:
                self.log.debug("repeated key warning: %s", text)
            return
        if not failed:
            self.error(inert(text, keep_newlines=False))

    def _check_failed(self, text: str) -> bool:
        found = False
        for mid in list(self.tracked):
            m = self.node.store.message(mid)
            if m is not None and m.state == "failed":
                why = self.tracked.pop(mid)
                if self.screen is not None:
                    self.screen.settle(mid, *message_line(m, "failed", why=why, group=self.group_name(m.peer)), None)
                self.error(f"not sent to {inert(m.peer)}: {preview(m.body)} ({inert(text, keep_newlines=False)})")
                found = True
        return found

    def check_keys(self) -> bool:
        """Announce each contact whose identity key changed (once per change)."""
        announced = False
        for c in self.node.store.contacts():
            if c.key_changed and c.name not in self.key_warned:
                self.key_warned.add(c.name)
                self.key_warning(c.name, c.verified)
                announced = True
            elif not c.key_changed:
                self.key_warned.discard(c.name)
        return announced

    def key_warning(self, name: str, verified: bool) -> None:
        """The warning line for a contact whose identity key changed."""
        n = inert(name)
        then = f"Sending to {n} is held until you /trust {n}." if verified else f"/trust {n} accepts it."
        self.error(f"WARNING: {n}'s identity key has changed (check: /verify {n}). {then}")

    def _refresh_names(self) -> None:
        self.names = [c.name for c in self.node.store.contacts()]
