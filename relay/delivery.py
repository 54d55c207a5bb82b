"""Delivery: pushing envelopes to the connected devices they are for.

Each authenticated connection has an ``Outlet``. A send's envelopes are pushed at once
to the connections of their devices that are idle and caught up (``Router.push_early``),
before their group commit: the commit then only makes them durable, and delivery waits
for no disk. The rest are handed to the outlets of their device when committed (in
memory: no database read on the hot path); the outlet's task sends them in batches, many
envelopes to a frame. A backlog (mail stored while the device was away, or more than an
outlet buffers) is read from the mailbox in pages. An outlet may drop its buffer at any
time and re-read the mailbox instead: nothing is lost, and ``seq`` (with the envelopes
pushed and not acknowledged) keeps each envelope from being pushed twice on one
connection. Envelopes stay in the mailbox until the device acknowledges them; a new
connection gets every unacknowledged one again. With a store that several processes
share, a re-read starts where the last one ended (another process may have committed an
envelope with a lower seq than one pushed here since): one acknowledged moments before,
its deletion not committed yet, may then be pushed once more (PROTOCOL 12.3).

Order: a connection gets a device's envelopes in the order the relay took their sends.
An envelope goes early only when every envelope for its device whose send is still
awaiting its commit went early to that same connection; otherwise it waits for its
commit, behind the others.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio

import wire
from relay.store import Stored

PAGE = wire.MAX_BATCH
DELIVER_BYTES = 512 * 1024  # envelope bytes in one deliver frame (at least one envelope)
BUFFER_LIMIT = 4096  # envelopes an outlet buffers for its connection (then re-reads)
BUFFER_BYTES = 2 * DELIVER_BYTES  # ... and their bytes
UNACKED_LIMIT = 2048  # pushes a connection may have unacknowledged; then pushing waits
# Envelope bytes written straight from one commit's callback (Outlet.offer): past this,
# the other outlets' tasks write theirs, so one commit fanning out to many idle
# connections (encrypting each frame for TLS) never holds the event loop for long.
DIRECT_BYTES_PER_COMMIT = 1024 * 1024
# Envelope bytes one send may push early, counted per connection written (the rest wait
# for its commit): a send to many connections never holds the event loop for long.
EARLY_BYTES_PER_SEND = 512 * 1024


def _take(counts: dict[bytes, int], key: bytes, n: int = 1) -> None:
    """Count ``n`` off ``key``, which goes at zero (counts stay bounded by what is live)."""
    left = counts.get(key, 0) - n
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def _within(items: list[Stored]) -> list[Stored]:
    """The longest prefix of ``items`` whose blobs fit in one deliver frame (never empty
    while ``items`` is not)."""
    total = 0
    for n, s in enumerate(items):
        total += len(s.blob)
        if total > DELIVER_BYTES and n:
            return items[:n]
    return items


class Outlet:
    """Pending pushes for one connection of one device."""

    def __init__(self, device_id: bytes, shared: bool = False) -> None:
        self.device_id = device_id
        # Several processes share the store: another one may commit an envelope for this
        # device with a lower seq than one this outlet pushes after it (its notice comes
        # later), so a re-read starts where the last one ended, not at the last push.
        self._shared = shared
        self._floor = 0  # where the last mailbox read ended (shared stores)
        self._pending: list[Stored] = []
        self._pending_bytes = 0
        self._refill = True  # start by reading the backlog from the mailbox
        self._announced = False  # the first deliver (sent even when empty) has gone
        self._wake = trio.Event()
        self._last_seq = 0
        # Envelopes pushed on this connection and not yet acknowledged: only these may be
        # acknowledged on it, so an ack costs the relay work only for real deliveries.
        # Pushing waits while UNACKED_LIMIT are outstanding (flow control: a connection
        # that does not acknowledge stops receiving, and holds no more than that).
        self.unacked: dict[bytes, None] = {}
        self._acked = trio.Event()
        # Writes a frame at once if the connection can take it now (False: it did not);
        # set by the relay (relay/connection.py). Fresh mail for an outlet that is idle
        # then goes out from ``offer`` itself, without a trip through its task.
        self.send_now: Callable[[wire.Frame], bool] | None = None
        self._idle = False  # the task waits for news, with nothing pending
        # Envelopes pushed here before their commit, whose send is not done yet: by eid,
        # with how many sends not yet done carry it (so that no commit pushes it again),
        # and the sum of those (the order rule: Router.push_early).
        self._early: dict[bytes, int] = {}
        self.early_awaiting = 0
        # Sequence numbers of envelopes pushed early whose commit came while this outlet
        # was behind (its cursor could not pass them): a mailbox re-read skips them, even
        # once acknowledged (their delete may not be committed yet).
        self._skip: dict[int, None] = {}

    def acknowledged(self, eids: list[bytes]) -> list[bytes]:
        """Of ``eids``, those pushed here and not acknowledged before (now they are)."""
        known = [e for e in dict.fromkeys(eids) if e in self.unacked]
        for e in known:
            del self.unacked[e]
        if known:
            self._acked.set()
            self._acked = trio.Event()
        return known

    async def _room_to_push(self) -> None:
        while len(self.unacked) > UNACKED_LIMIT - PAGE:
            await self._acked.wait()

    def _pushed(self, eids: list[bytes]) -> None:
        self.unacked.update(dict.fromkeys(eids))
        # Never more than the limit (pushing waits before it); should that change, the
        # oldest is forgotten: an ack for it then deletes nothing, and it comes again.
        while len(self.unacked) > UNACKED_LIMIT:
            del self.unacked[next(iter(self.unacked))]

    def push_early(self, items: list[wire.Mail]) -> bool:
        """Write envelopes whose send is not committed yet, if this connection is idle and
        caught up and can take the frame now; False: nothing was written."""
        if not (self._idle and self.send_now is not None and not self._refill and not self._pending
                and len(self.unacked) <= UNACKED_LIMIT - PAGE):
            return False
        fresh = [m for m in items if m.eid not in self.unacked and m.eid not in self._early]
        if fresh and not self.send_now(wire.Deliver(items=fresh, synced=True)):
            return False
        self._pushed([m.eid for m in fresh])
        for m in items:
            self._early[m.eid] = self._early.get(m.eid, 0) + 1
        self.early_awaiting += len(items)
        return True

    def forget_early(self, eids: list[bytes]) -> None:
        """The send that pushed these early is done (its commit was offered here, or it
        failed)."""
        for eid in eids:
            _take(self._early, eid)
        self.early_awaiting -= len(eids)

    def poke(self) -> None:
        """New mail was stored elsewhere (another process): read the mailbox again."""
        self._pending.clear()
        self._pending_bytes = 0
        self._refill = True
        self._wake.set()

    def offer(self, items: list[Stored], direct: bool = True) -> int:
        """Take fresh mail for this connection; the envelope bytes written at once (0:
        it went to the task). ``direct=False``: never write from here."""
        if self._early:
            kept = [s for s in items if s.eid not in self._early]
            if len(kept) < len(items):
                if not kept and not self._pending and not self._refill:
                    # Only envelopes pushed already: the cursor passes them (nothing
                    # queued here is older: see the module's note on order).
                    self._last_seq = max(self._last_seq, max(s.seq for s in items))
                else:
                    for s in items:
                        if s.eid in self._early and s.seq > self._last_seq:
                            self._skip[s.seq] = None
                    while len(self._skip) > UNACKED_LIMIT:  # then one may come twice
                        del self._skip[next(iter(self._skip))]
            items = kept
            if not items:
                return 0
        size = sum(len(s.blob) for s in items)
        if direct and self._idle and self.send_now is not None and not self._refill and not self._pending:
            fresh = [s for s in items if s.seq > self._last_seq]
            if not fresh:
                return 0
            if (len(fresh) <= PAGE and size <= DELIVER_BYTES and len(self.unacked) <= UNACKED_LIMIT - PAGE
                    and self.send_now(wire.Deliver(items=[wire.Mail(s.eid, s.blob) for s in fresh], synced=True))):
                # What the task would have sent, as it would have (see run).
                self._last_seq = max(s.seq for s in fresh)
                self._pushed([s.eid for s in fresh])
                return max(size, 1)
        if self._refill:
            pass  # the next mailbox read will include them
        elif len(self._pending) + len(items) > BUFFER_LIMIT or self._pending_bytes + size > BUFFER_BYTES:
            # A connection that reads slowly: what it has not taken yet is in the mailbox.
            self._pending.clear()
            self._pending_bytes = 0
            self._refill = True
        else:
            self._pending.extend(items)
            self._pending_bytes += size
        self._wake.set()
        return 0

    async def run(
        self,
        fetch: Callable[[bytes, int, int], Awaitable[list[Stored]]],
        send: Callable[[wire.Frame], Awaitable[None]],
    ) -> None:
        """Push envelopes until cancelled. ``send`` blocks while the peer is slow."""
        while True:
            if self._refill:
                self._refill = False
                self._pending.clear()
                self._pending_bytes = 0
                first_page = True
                if self._shared:
                    self._last_seq = min(self._last_seq, self._floor)
                while True:
                    await self._room_to_push()
                    rows = await fetch(self.device_id, self._last_seq, PAGE)
                    batch = _within(rows)
                    if batch:
                        self._last_seq = batch[-1].seq
                    synced = len(rows) < PAGE and len(batch) == len(rows)
                    del rows  # what did not fit is read again: not held while the send waits
                    if self._early or self.unacked or self._skip:
                        # Pushed here before their commit (and perhaps acknowledged, but
                        # not deleted yet): not again.
                        batch = [r for r in batch if r.eid not in self.unacked and r.eid not in self._early
                                 and r.seq not in self._skip]
                        if self._skip:
                            self._skip = {q: None for q in self._skip if q > self._last_seq}
                    self._pushed([r.eid for r in batch])
                    # A re-read that finds nothing new (another process's notice for mail
                    # this connection already has) sends nothing; the first deliver, and
                    # the empty one that closes a backlog of whole pages, are sent.
                    if batch or not self._announced or (not first_page and synced):
                        await send(wire.Deliver(items=[wire.Mail(r.eid, r.blob) for r in batch], synced=synced))
                        self._announced = True
                    first_page = False
                    if synced or self._refill:
                        if synced:
                            self._floor = self._last_seq
                        break
            elif self._pending:
                await self._room_to_push()
                if self._refill or not self._pending:
                    continue  # dropped meanwhile (the connection fell behind)
                batch = []
                total = taken = 0
                for item in self._pending:
                    if len(batch) == PAGE or (batch and total + len(item.blob) > DELIVER_BYTES):
                        break
                    taken += 1
                    if item.seq > self._last_seq and item.eid not in self._early:  # already sent
                        batch.append(item)
                        total += len(item.blob)
                self._pending_bytes -= sum(len(s.blob) for s in self._pending[:taken])
                del self._pending[:taken]
                if batch:
                    self._last_seq = max(s.seq for s in batch)
                    synced = not self._pending and not self._refill
                    self._pushed([s.eid for s in batch])
                    await send(wire.Deliver(items=[wire.Mail(s.eid, s.blob) for s in batch], synced=synced))
            else:
                self._idle = True
                try:
                    await self._wake.wait()
                finally:
                    self._idle = False
                self._wake = trio.Event()


@dataclass
class Early:
    """What one send pushed before its commit (Router.push_early), until it is done."""

    counts: dict[bytes, int]  # envelopes for each device in the send
    pushed: list[tuple[Outlet, list[bytes]]] = field(default_factory=list)  # and their eids

    @property
    def devices(self) -> set[bytes]:
        """The devices that got some of the send before its commit."""
        return {o.device_id for o, _ in self.pushed}


class Router:
    """Which connections are online for which device."""

    def __init__(self) -> None:
        self._outlets: dict[bytes, set[Outlet]] = {}
        # For each device: envelopes whose send awaits its commit (of those, each of its
        # connections counts how many went early to it: the order rule, module docstring).
        self._awaiting: dict[bytes, int] = {}
        self._held: dict[bytes, int] = {}  # devices being removed: nothing goes early to them

    def push_early(self, items: Sequence[tuple[bytes, bytes, bytes]]) -> Early:
        """A send was taken: push its envelopes to each connection of their devices that
        may have them now. ``settled`` must follow once the send is done (committed or
        failed)."""
        by_device: dict[bytes, dict[bytes, bytes]] = {}
        for device_id, eid, blob in items:
            by_device.setdefault(device_id, {}).setdefault(eid, blob)
        early = Early({d: len(m) for d, m in by_device.items()})
        budget = EARLY_BYTES_PER_SEND
        for device_id, mail in by_device.items():
            n = len(mail)
            outlets = self._outlets.get(device_id)
            if outlets and device_id not in self._held:
                waiting = self._awaiting.get(device_id, 0)
                mails = None
                size = 0
                for outlet in outlets:
                    if budget <= 0:
                        break
                    if outlet.early_awaiting != waiting:
                        continue  # something older for the device waits for its commit
                    if mails is None:
                        mails = [wire.Mail(eid, blob) for eid, blob in mail.items()]
                        size = sum(len(b) for b in mail.values())
                    budget -= size
                    if outlet.push_early(mails):
                        early.pushed.append((outlet, list(mail)))
            self._awaiting[device_id] = self._awaiting.get(device_id, 0) + n
        return early

    @contextmanager
    def holding(self, device_id: bytes) -> Iterator[None]:
        """While a device is being removed or revoked (and until its connections are
        unbound), nothing goes to it before a commit: a send taken after the removal's
        commit fails for it, and must not have reached it."""
        self._held[device_id] = self._held.get(device_id, 0) + 1
        try:
            yield
        finally:
            _take(self._held, device_id)

    def settled(self, early: Early) -> None:
        """The send of ``early`` is done (after its commit was offered to the outlets)."""
        for device_id, n in early.counts.items():
            _take(self._awaiting, device_id, n)
        for outlet, eids in early.pushed:
            outlet.forget_early(eids)

    def attach(self, outlet: Outlet) -> None:
        self._outlets.setdefault(outlet.device_id, set()).add(outlet)

    def detach(self, outlet: Outlet) -> None:
        outlets = self._outlets.get(outlet.device_id)
        if outlets is not None:
            outlets.discard(outlet)
            if not outlets:
                del self._outlets[outlet.device_id]

    def online(self) -> int:
        return len(self._outlets)

    def poke(self, device_ids: list[bytes]) -> None:
        """Mail for these devices was stored by another process."""
        for device_id in device_ids:
            for outlet in self._outlets.get(device_id, ()):
                outlet.poke()

    def on_stored(self, stored: list[Stored]) -> None:
        """Called after each group commit with the envelopes it stored."""
        by_device: dict[bytes, list[Stored]] = {}
        for s in stored:
            if s.device_id in self._outlets:
                by_device.setdefault(s.device_id, []).append(s)
        direct = 0
        for device_id, items in by_device.items():
            for outlet in self._outlets.get(device_id, ()):
                direct += outlet.offer(items, direct < DIRECT_BYTES_PER_COMMIT)
