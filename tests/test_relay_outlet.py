"""An outlet's fast path (relay/delivery.py): fresh mail for an idle outlet is written at
once from ``offer``, as the outlet's task would have sent it; when the connection cannot
take it at once, the task sends it; nothing is pushed twice or out of order."""

from __future__ import annotations

import secrets

import trio
import trio.testing

import wire
from relay.delivery import Outlet
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
