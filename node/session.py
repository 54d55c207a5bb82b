"""Staying connected: a device that is online whenever the relay can be reached.

``LiveSession.run`` connects, authenticates, seals and flushes what was composed
offline, then receives pushed messages until the link drops; then it waits (exponential
backoff with jitter) and tries again, for as long as it runs. Messages composed with
``LiveSession.send`` are stored at once (state "pending") and go out as soon as a link is
up. Listeners hear about received messages, delivery-state changes, status changes and
warnings; they run on the trio loop and must not block.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

import wire
from node.errors import (
    ConnectionLost,
    DeviceRevoked,
    LoginFailed,
    RelayKeyMismatch,
    RelayRefused,
    RelayUnreachable,
)
from node.link import RelayLink
from node.node import Node, Received
from node.onion_auth import OnionAuthRefused, TorControlError
from node.store import StoredMessage

log = logging.getLogger("veil.node")
E = wire.ErrorCode

# What a dropped link or an unreachable relay looks like; all end in a retry.
_TRANSIENT = (RelayUnreachable, ConnectionLost, RelayRefused, OSError)

PREKEY_CHECK_EVERY = 6 * 3600.0
OUTBOX_RETRY_EVERY = 30.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0


@dataclass
class Listeners:
    message: list[Callable[[Received], None]] = field(default_factory=list)
    sent: list[Callable[[bytes], None]] = field(default_factory=list)  # msg_id now held by the relay
    status: list[Callable[[str], None]] = field(default_factory=list)  # "connecting", "online", "offline"
    problem: list[Callable[[str], None]] = field(default_factory=list)  # one-line warnings and errors


class LiveSession:
    """Keeps one node online and moves messages both ways."""

    def __init__(self, node: Node, *, backoff_max: float = BACKOFF_MAX) -> None:
        self.node = node
        self.backoff_max = backoff_max
        self.on = Listeners()
        self.status = "offline"
        self.link: RelayLink | None = None
        self.attempts = 0
        self.next_retry: float | None = None
        self._poke = trio.Event()
        self._reconnect_now = trio.Event()
        node.events.append(self._problem)
        node.sent_listeners.append(self._sent)
        node.received_listeners.append(self._received)

    # ---- for the user interface ---------------------------------------------------------
    def send(self, peer: str, text: str) -> StoredMessage:
        """Compose a message; it goes out now if online, or on the next connection."""
        msg = self.node.compose_group(peer, text) if peer.startswith("#") else self.node.compose(peer, text)
        self._poke.set()
        return msg

    def reconnect_now(self) -> None:
        """Skip the rest of the backoff wait."""
        self._reconnect_now.set()

    def retry_held(self) -> None:
        """Try again to seal and send what is queued: after the user accepted a changed key
        (messages held for it go out now if online, or on the next connection)."""
        self._poke.set()

    # ---- the loop ------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; reports started at once (online or not)."""
        task_status.started()
        backoff = BACKOFF_FIRST
        while True:
            self._set_status("connecting")
            try:
                await self._online()
                backoff = BACKOFF_FIRST
            except DeviceRevoked:
                # For good: trying again cannot help. Whoever shows the status says why.
                self._set_status("revoked")
                self.link = None
                return
            except (LoginFailed, RelayKeyMismatch, OnionAuthRefused, TorControlError) as exc:
                # Said every time: an impostor (or a relay with a new key), a private relay's
                # client key that is refused, or a control port that will not take it, is not
                # just "offline".
                self._problem(str(exc))
                backoff = self.backoff_max
            except _TRANSIENT as exc:
                log.debug("link down: %s", type(exc).__name__)
            except BaseExceptionGroup as group:
                # Several tasks saw the link die at once; anything else is a real error.
                # Only the rest goes on: a link that died as the run was cancelled leaves
                # the cancellation, not a ConnectionLost that would escape the cancel scope.
                _, rest = group.split(_TRANSIENT)
                if rest is not None:
                    raise rest from None
            finally:
                self.link = None
            self.attempts += 1
            delay = backoff * random.uniform(0.75, 1.25)
            backoff = min(backoff * 2, self.backoff_max)
            self.next_retry = trio.current_time() + delay
            self._reconnect_now = trio.Event()
            # Announced after next_retry is set, so "offline" listeners can show when the
            # next attempt is (and may call reconnect_now).
            self._set_status("offline")
            with trio.move_on_after(delay):
                await self._reconnect_now.wait()
            self.next_retry = None

    async def _online(self) -> None:
        async with self.node.connected() as link:
            self.link = link
            self.attempts = 0
            self._set_status("online")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive, link)
                nursery.start_soon(self._flush_on_poke, link)
                nursery.start_soon(self._maintain_prekeys, link)
                await link.closed.wait()
                nursery.cancel_scope.cancel()
            if link.revoked:
                raise DeviceRevoked()
            raise ConnectionLost()

    async def _receive(self, link: RelayLink) -> None:
        async for frame in link.deliveries:
            await self.node.accept(link, frame)  # announces each message via _received

    async def _maintain_prekeys(self, link: RelayLink) -> None:
        # Connecting refills and rotates; a device that stays online checks again daily.
        while True:
            await trio.sleep(PREKEY_CHECK_EVERY)
            await self.node.refresh_prekeys(link)

    async def _flush_on_poke(self, link: RelayLink) -> None:
        while True:
            # Woken by a new message; and, while something waits in the outbox (for a
            # full mailbox, say), now and then anyway.
            waiting = self.node.store.outbox_count() > 0
            with trio.move_on_after(OUTBOX_RETRY_EVERY if waiting else math.inf):
                await self._poke.wait()
            if self._poke.is_set():
                self._poke = trio.Event()
                for msg_id, exc in await self.node.seal_pending(link):
                    self._problem(str(exc))
                    del msg_id
            try:
                await self.node.flush_outbox(link)
            except RelayRefused as exc:
                if exc.code not in (E.MAILBOX_FULL, E.RECIPIENT_LIMITED, E.INTERNAL, E.RATE_LIMITED):
                    raise
                self._problem(f"the outbox could not be sent now ({exc}); it is tried again later")

    def _received(self, r: Received) -> None:
        for fn in self.on.message:
            fn(r)

    def _sent(self, msg_id: bytes) -> None:
        for fn in self.on.sent:
            fn(msg_id)

    def _set_status(self, status: str) -> None:
        if status != self.status:
            self.status = status
            for fn in self.on.status:
                fn(status)

    def _problem(self, text: str) -> None:
        for fn in self.on.problem:
            fn(text)

