"""An outlet's fast path (relay/delivery.py): fresh mail for an idle outlet is written at
once from ``offer``, as the outlet's task would have sent it; when the connection cannot
take it at once, the task sends it; nothing is pushed twice or out of order; one commit
writes no more than DIRECT_BYTES_PER_COMMIT at once, the tasks write the rest."""

from __future__ import annotations

import secrets

import trio
import trio.testing

import wire
from relay.delivery import DIRECT_BYTES_PER_COMMIT, Outlet, Router
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
