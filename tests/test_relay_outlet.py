"""An outlet's fast path (relay/delivery.py): fresh mail for an idle outlet is written at
once from ``offer``, as the outlet's task would have sent it; when the connection cannot
take it at once, the task sends it; nothing is pushed twice or out of order; one commit
writes no more than DIRECT_BYTES_PER_COMMIT at once, the tasks write the rest."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

import wire
from relay.delivery import DIRECT_BYTES_PER_COMMIT, EARLY_BYTES_PER_SEND, Outlet, Router
from relay.store import Stored

DEVICE = secrets.token_bytes(16)


def mail(seq: int) -> Stored:
    return Stored(DEVICE, seq, secrets.token_bytes(16), secrets.token_bytes(100))


async def test_fresh_mail_goes_out_at_once_or_through_the_task_never_twice() -> None:
    outlet = Outlet(DEVICE)
    at_once: list[wire.Deliver] = []
    by_task: list[wire.Deliver] = []
    can_write = [True]

    def send_now(frame: wire.Frame) -> bool:
        assert isinstance(frame, wire.Deliver)
        if can_write[0]:
            at_once.append(frame)
        return can_write[0]

    async def fetch(device_id: bytes, after: int, limit: int) -> list[Stored]:
        return []

    async def send(frame: wire.Frame) -> None:
        assert isinstance(frame, wire.Deliver)
        by_task.append(frame)

    outlet.send_now = send_now
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outlet.run, fetch, send)
            await trio.testing.wait_all_tasks_blocked()
            assert len(by_task) == 1 and not by_task[0].items  # the first, empty, deliver
            first, second, third = mail(1), mail(2), mail(3)
            outlet.offer([first, second])
            assert [m.eid for m in at_once[0].items] == [first.eid, second.eid] and at_once[0].synced
            assert set(outlet.unacked) == {first.eid, second.eid}
            outlet.offer([second])  # already pushed: not again
            can_write[0] = False  # the connection is busy: the task sends it
            outlet.offer([third])
            await trio.testing.wait_all_tasks_blocked()
            assert len(at_once) == 1
            assert [[m.eid for m in d.items] for d in by_task[1:]] == [[third.eid]]
            assert set(outlet.unacked) == {first.eid, second.eid, third.eid}
            nursery.cancel_scope.cancel()


async def test_one_commit_writes_a_bounded_amount_at_once_and_the_tasks_send_the_rest() -> None:
    size = 100 * 1024
    count = 3 * DIRECT_BYTES_PER_COMMIT // size  # three times what one commit may write
    router = Router()
    at_once: list[bytes] = []
    by_task: list[bytes] = []

    async def fetch(device_id: bytes, after: int, limit: int) -> list[Stored]:
        return []

    outlets = []
    for _ in range(count):
        outlet = Outlet(secrets.token_bytes(16))

        def send_now(frame: wire.Frame, device: bytes = outlet.device_id) -> bool:
            assert isinstance(frame, wire.Deliver)
            at_once.append(device)
            return True

        async def send(frame: wire.Frame, device: bytes = outlet.device_id) -> None:
            assert isinstance(frame, wire.Deliver)
            if frame.items:
                by_task.append(device)

        outlet.send_now = send_now
        outlets.append((outlet, send))
        router.attach(outlet)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for outlet, send in outlets:
                nursery.start_soon(outlet.run, fetch, send)
            await trio.testing.wait_all_tasks_blocked()
            router.on_stored([Stored(o.device_id, 1, secrets.token_bytes(16), bytes(size)) for o, _ in outlets])
            written = len(at_once) * size
            assert DIRECT_BYTES_PER_COMMIT <= written < DIRECT_BYTES_PER_COMMIT + size
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(at_once + by_task) == sorted(o.device_id for o, _ in outlets)  # each once
            nursery.cancel_scope.cancel()


class _Conn:
    """An outlet with a connection that takes frames at once while ``writable``."""

    def __init__(self, device_id: bytes = DEVICE, shared: bool = False) -> None:
        self.outlet = Outlet(device_id, shared=shared)
        self.writable = True
        self.frames: list[wire.Deliver] = []  # every deliver, however it was written
        self.mailbox: list[Stored] = []  # what a re-read finds
        self.outlet.send_now = self._send_now

    def _send_now(self, frame: wire.Frame) -> bool:
        assert isinstance(frame, wire.Deliver)
        if self.writable:
            self.frames.append(frame)
        return self.writable

    async def fetch(self, device_id: bytes, after: int, limit: int) -> list[Stored]:
        return [s for s in self.mailbox if s.seq > after][:limit]

    async def send(self, frame: wire.Frame) -> None:
        assert isinstance(frame, wire.Deliver)
        self.frames.append(frame)

    def eids(self) -> list[bytes]:
        return [m.eid for f in self.frames for m in f.items]


@asynccontextmanager
async def running(*conns: _Conn, router: Router | None = None) -> AsyncIterator[None]:
    """The outlets' tasks running (attached to ``router``, if given), past their first,
    empty, deliver (not kept in ``frames``); cancelled at the end."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for c in conns:
                if router is not None:
                    router.attach(c.outlet)
                nursery.start_soon(c.outlet.run, c.fetch, c.send)
            await trio.testing.wait_all_tasks_blocked()
            for c in conns:
                c.frames.clear()
            yield
            nursery.cancel_scope.cancel()


def posting(*stored: Stored) -> list[tuple[bytes, bytes, bytes]]:
    return [(s.device_id, s.eid, s.blob) for s in stored]


async def test_a_send_goes_early_to_an_idle_connection_and_its_commit_does_not_push_it_again() -> None:
    router = Router()
    conn = _Conn()
    async with running(conn, router=router):
        first, second = mail(1), mail(2)
        early = router.push_early(posting(first, second))
        assert conn.eids() == [first.eid, second.eid] and conn.frames[0].synced
        assert early.devices == {DEVICE}
        # Another process's notice makes the outlet read its mailbox again, which holds
        # them already (committed, not yet offered here): not pushed again.
        conn.mailbox = [first, second]
        conn.outlet.poke()
        await trio.testing.wait_all_tasks_blocked()
        assert conn.eids() == [first.eid, second.eid]
        # The commit: offered, then the send is done. Nothing more is written.
        router.on_stored([first, second])
        router.settled(early)
        await trio.testing.wait_all_tasks_blocked()
        assert conn.eids() == [first.eid, second.eid]
        # A re-read now does not push them again either.
        conn.outlet.poke()
        await trio.testing.wait_all_tasks_blocked()
        assert conn.eids() == [first.eid, second.eid]
        # Acknowledged before the commit: the commit does not push it again.
        third = mail(3)
        early = router.push_early(posting(third))
        assert conn.outlet.acknowledged([third.eid]) == [third.eid]
        router.on_stored([third])
        router.settled(early)
        await trio.testing.wait_all_tasks_blocked()
        assert conn.eids() == [first.eid, second.eid, third.eid]
        # Nothing is left of the bookkeeping.
        assert (router._awaiting, conn.outlet._early, conn.outlet.early_awaiting) == ({}, {}, 0)


async def test_mail_does_not_go_early_past_older_mail_that_waits_for_its_commit() -> None:
    router = Router()
    conn = _Conn()
    async with running(conn, router=router):
        older, newer, later = mail(1), mail(2), mail(3)
        conn.writable = False  # the connection is busy: the older send waits for its commit
        early_older = router.push_early(posting(older))
        conn.writable = True
        early_newer = router.push_early(posting(newer))  # would pass the older one: waits too
        assert conn.frames == [] and early_older.devices == early_newer.devices == set()
        router.on_stored([older, newer])
        router.settled(early_older)
        router.settled(early_newer)
        await trio.testing.wait_all_tasks_blocked()
        assert conn.eids() == [older.eid, newer.eid]
        # Everything committed: the next goes early again.
        assert router.push_early(posting(later)).devices == {DEVICE}
        assert conn.eids() == [older.eid, newer.eid, later.eid]


async def test_a_connection_that_came_after_a_send_gets_it_first() -> None:
    """A connection that was not there when a send was taken gets nothing early for its
    device until that send is done: the send's envelope is older."""
    router = Router()
    older, newer = mail(1), mail(2)
    early_older = router.push_early(posting(older))  # no connection yet
    conn = _Conn()
    async with running(conn, router=router):
        early_newer = router.push_early(posting(newer))
        assert early_newer.devices == set()
        router.on_stored([older, newer])
        router.settled(early_older)
        router.settled(early_newer)
        await trio.testing.wait_all_tasks_blocked()
        assert conn.eids() == [older.eid, newer.eid]


async def test_a_send_that_fails_leaves_nothing_behind_and_its_retry_is_pushed() -> None:
    router = Router()
    conn = _Conn()
    async with running(conn, router=router):
        one = mail(1)
        early = router.push_early(posting(one))
        conn.outlet.acknowledged([one.eid])
        router.settled(early)  # failed: nothing was stored, nothing offered
        assert (router._awaiting, conn.outlet._early, conn.outlet.early_awaiting) == ({}, {}, 0)
        # Sent again (the same envelope), and stored this time: the recipient had
        # acknowledged it, so it is pushed again (and acknowledged again: deleted).
        conn.writable = False
        early = router.push_early(posting(one))
        router.on_stored([one])
        router.settled(early)
        await trio.testing.wait_all_tasks_blocked()
        assert conn.eids() == [one.eid, one.eid]


async def test_one_send_pushes_a_bounded_amount_early() -> None:
    """A send that fits in a frame (5 devices of 48 KiB), to devices with 4 connections
    each: at most EARLY_BYTES_PER_SEND (and one envelope) is written before its commit,
    counted per connection; the commit pushes the rest, each envelope once per connection."""
    size = 48 * 1024
    router = Router()
    devices = [secrets.token_bytes(16) for _ in range(5)]
    conns = [_Conn(d) for d in devices for _ in range(4)]
    async with running(*conns, router=router):
        stored = {d: Stored(d, 1, secrets.token_bytes(16), bytes(size)) for d in devices}
        early = router.push_early(posting(*stored.values()))
        pushed = sum(1 for c in conns if c.frames)
        assert EARLY_BYTES_PER_SEND <= pushed * size < EARLY_BYTES_PER_SEND + size
        router.on_stored(list(stored.values()))
        router.settled(early)
        await trio.testing.wait_all_tasks_blocked()
        assert all(c.eids() == [stored[c.outlet.device_id].eid] for c in conns)  # each once


async def test_the_same_envelope_in_two_sends_is_pushed_once_when_the_first_fails() -> None:
    """Pipelined: a send with E and a made-up device (it fails), then E again; the first
    one's end must not make the second's commit push E a second time."""
    router = Router()
    conn = _Conn()
    async with running(conn, router=router):
        e = mail(1)
        bogus = (secrets.token_bytes(16), secrets.token_bytes(16), b"x")
        first = router.push_early([*posting(e), bogus])
        second = router.push_early(posting(e))
        router.settled(first)  # unknown device: nothing stored
        router.on_stored([e])  # the second, committed
        router.settled(second)
        await trio.testing.wait_all_tasks_blocked()
        assert conn.eids() == [e.eid]
        assert conn.outlet._early == {}


async def test_a_re_read_does_not_push_again_what_went_early_and_was_acknowledged() -> None:
    """Several processes: E goes early and is acknowledged at once; another process's
    notice makes the outlet re-read its mailbox before E's commit comes (so its cursor
    cannot pass E); the re-read finds E still there (its delete is in a later commit)."""
    router = Router()
    conn = _Conn()
    async with running(conn, router=router):
        x, e = mail(1), mail(2)
        early = router.push_early(posting(e))
        assert conn.outlet.acknowledged([e.eid]) == [e.eid]
        conn.mailbox = [x]
        router.poke([DEVICE])  # another process stored x
        router.on_stored([e])
        router.settled(early)
        conn.mailbox = [x, e]
        await trio.testing.wait_all_tasks_blocked()
        assert conn.eids() == [e.eid, x.eid]
        assert conn.outlet._skip == {}  # passed: forgotten


async def test_nothing_goes_early_to_a_device_being_removed() -> None:
    router = Router()
    conn = _Conn()
    async with running(conn, router=router):
        with router.holding(DEVICE):
            held = router.push_early(posting(mail(1)))
        assert held.devices == set() and conn.frames == []
        router.settled(held)
        assert router.push_early(posting(mail(2))).devices == {DEVICE}


async def test_several_processes_mail_committed_elsewhere_before_a_direct_push_is_not_skipped() -> None:
    """Another process commits seq 1 for the device, this one seq 2 right after and pushes
    it at once; the other's notice comes later. The re-read it causes must still find 1
    (it starts where the last read ended, not past the last push), and not push 2 again."""
    conn = _Conn(shared=True)
    async with running(conn):
        elsewhere, here = mail(1), mail(2)
        conn.mailbox = [elsewhere, here]
        conn.outlet.offer([here])  # this process's commit
        assert conn.eids() == [here.eid]
        conn.outlet.poke()  # the other process's notice
        await trio.testing.wait_all_tasks_blocked()
        assert conn.eids() == [here.eid, elsewhere.eid]
        # Once read, the next notice reads from there on.
        later = mail(3)
        conn.mailbox = [elsewhere, here, later]
        conn.outlet.poke()
        await trio.testing.wait_all_tasks_blocked()
        assert conn.eids() == [here.eid, elsewhere.eid, later.eid]
