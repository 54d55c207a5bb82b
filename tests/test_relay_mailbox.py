"""Mailboxes over a real relay: who may delete what, retried and duplicate envelopes,
all-or-nothing sends, and delivery of a backlog exactly once and in order."""

from __future__ import annotations

import secrets

import trio

import wire
from tests.conftest import Accounts, RelayRunner
from tests.test_relay_support import (
    DEADLINE,
    RawClient,
    envelope,
    mailbox_eids,
    raw_client,
    sql,
)

E = wire.ErrorCode


async def send(c: RawClient, *envelopes: wire.Envelope) -> wire.Frame:
    return await c.ask(wire.Send(id=c.next_id(), envelopes=list(envelopes)))


async def mailbox_total(relay: RelayRunner) -> int:
    return int((await sql(relay, "SELECT count(*) FROM mailbox"))[0][0])


async def test_a_session_can_only_ack_its_own_mailbox(accounts: Accounts) -> None:
    relay = accounts.relay
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        phone = await accounts.login("alice", "phone")  # alice's second device
        eid = secrets.token_bytes(16)
        to_alice = envelope(alice.device_id, eid, b"for alice's laptop")
        to_phone = envelope(phone.device_id, eid, b"for alice's phone")  # the same eid
        async with raw_client(relay.url) as b:
            await b.resume(bob)
            assert isinstance(await send(b, to_alice, to_phone), wire.Ok)
            # bob knows the eid (he made it) and tries to delete alice's copy.
            await b.ack([eid])
        async with raw_client(relay.url) as p:
            await p.resume(phone)
            assert await p.mail_until_synced() == [wire.Mail(eid, b"for alice's phone")]
            # alice's other device acknowledges the laptop's envelope: only its own goes.
            await p.ack([eid])
        assert await mailbox_eids(relay, alice.device_id) == [eid]
        assert await mailbox_eids(relay, phone.device_id) == []
        async with raw_client(relay.url) as a:
            await a.resume(alice)
            mail = await a.mail_until_synced()
            assert mail == [wire.Mail(eid, b"for alice's laptop")]
            await a.ack([eid])  # the owner's ack works
        assert await mailbox_total(relay) == 0
        async with raw_client(relay.url) as a:
            await a.resume(alice)
            assert await a.mail_until_synced() == []


async def test_the_same_envelope_sent_twice_is_stored_and_delivered_once(accounts: Accounts) -> None:
    relay = accounts.relay
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        retried = envelope(alice.device_id)
        async with raw_client(relay.url) as b:
            await b.resume(bob)
            # A retry of the same Send, and the same envelope twice in one Send.
            for _ in range(3):
                assert isinstance(await send(b, retried), wire.Ok)
            assert isinstance(await send(b, retried, retried), wire.Ok)
            assert await mailbox_eids(relay, alice.device_id) == [retried.eid]
            async with raw_client(relay.url) as a:
                await a.resume(alice)
                assert await a.mail_until_synced() == [wire.Mail(retried.eid, retried.blob)]
                # Now alice is online: live pushes are not duplicated either.
                live = envelope(alice.device_id)
                marker = envelope(alice.device_id)
                for _ in range(3):
                    assert isinstance(await send(b, live), wire.Ok)
                assert isinstance(await send(b, live, marker), wire.Ok)
                got: list[bytes] = []
                while marker.eid not in got:
                    got += [m.eid for m in await a.mail_until_synced()]
                assert got == [live.eid, marker.eid]
                # Nothing more was pushed: the next frame is the answer to a ping.
                await a.assert_alive()
                assert a.delivered == []


async def test_send_to_an_unknown_device_stores_nothing(accounts: Accounts) -> None:
    relay = accounts.relay
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        good1, good2 = envelope(alice.device_id), envelope(bob.device_id)
        unknown = envelope(secrets.token_bytes(16))
        async with raw_client(relay.url) as b:
            await b.resume(bob)
            for order in ((good1, unknown, good2), (unknown, good1, good2), (good1, good2, unknown)):
                ans = await send(b, *order)
                assert isinstance(ans, wire.Error) and ans.code == E.UNKNOWN_DEVICE, ans
                assert await mailbox_total(relay) == 0
            # bob's own device is connected, idle and caught up, so its envelope went to
            # it before the commit that then failed (PROTOCOL 12.3): once, and nothing else.
            await b.assert_alive()
            assert [m for d in b.delivered for m in d.items] == [wire.Mail(good2.eid, good2.blob)]
        async with raw_client(relay.url) as a:
            await a.resume(alice)
            assert await a.mail_until_synced() == []
            # The same envelopes without the bad one go through (the eids are not spoilt).
            async with raw_client(relay.url) as b:
                await b.resume(bob)
                assert isinstance(await send(b, good1, good2), wire.Ok)
            assert await a.mail_until_synced() == [wire.Mail(good1.eid, good1.blob)]


async def test_a_refused_send_does_not_undo_others_committed_with_it(accounts: Accounts) -> None:
    """Pipelined sends share group commits; each is all-or-nothing on its own."""
    relay = accounts.relay
    n = 60
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        frames: dict[int, wire.Send] = {}
        async with raw_client(relay.url) as b:
            await b.resume(bob)
            for i in range(1, n + 1):
                envs = [envelope(alice.device_id)]
                if i % 3 == 0:
                    envs.append(envelope(secrets.token_bytes(16)))  # spoils this send
                frames[i] = wire.Send(id=i, envelopes=envs)
            for frame in frames.values():
                await b.send(wire.encode(frame))
            answers = {}
            for _ in range(n):
                ans = await b.answer()
                answers[ans.id] = ans  # type: ignore[attr-defined]
        assert sorted(answers) == list(range(1, n + 1))
        expected = set()
        for i, ans in answers.items():
            if i % 3 == 0:
                assert isinstance(ans, wire.Error) and ans.code == E.UNKNOWN_DEVICE, ans
            else:
                assert ans == wire.Ok(id=i)
                expected.add(frames[i].envelopes[0].eid)
        stored = await mailbox_eids(relay, alice.device_id)
        assert len(stored) == len(set(stored)) and set(stored) == expected
        assert await mailbox_total(relay) == len(expected)


async def test_removed_device_cannot_receive_or_resume(accounts: Accounts) -> None:
    relay = accounts.relay
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        phone = await accounts.login("alice", "phone")
        waiting = envelope(phone.device_id)
        async with raw_client(relay.url) as b:
            await b.resume(bob)
            assert isinstance(await send(b, waiting), wire.Ok)
        async with raw_client(relay.url) as p:
            await p.resume(phone)
            await p.ok(wire.Logout(id=p.next_id(), remove_device=True))
            await p.refused(wire.ListDevices(id=p.next_id()), E.NOT_AUTHENTICATED)
        # Its mailbox went with it, new mail for it is refused, and its token is dead.
        assert await mailbox_eids(relay, phone.device_id) == []
        async with raw_client(relay.url) as b:
            await b.resume(bob)
            ans = await send(b, envelope(phone.device_id))
            assert isinstance(ans, wire.Error) and ans.code == E.UNKNOWN_DEVICE
        async with raw_client(relay.url) as p:
            token = phone.store.get("token")
            assert token
            await p.refused(wire.Resume(id=1, token=token), E.AUTH_FAILED)
        async with raw_client(relay.url) as a:
            await a.resume(alice)
            devices = await a.ok(wire.ListDevices(id=a.next_id()))
            assert isinstance(devices, wire.DevicesOk)
            assert [d.device_id for d in devices.devices] == [alice.device_id]


async def test_backlog_is_delivered_in_pages_in_order_exactly_once(accounts: Accounts) -> None:
    relay = accounts.relay
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        sent: list[wire.Envelope] = []
        async with raw_client(relay.url) as b:
            await b.resume(bob)
            for _ in range(3):  # 150 envelopes: more than two pages of MAX_BATCH
                batch = [envelope(alice.device_id) for _ in range(50)]
                assert isinstance(await send(b, *batch), wire.Ok)
                sent += batch
        async with raw_client(relay.url) as a:
            await a.resume(alice)
            frames: list[wire.Deliver] = []
            while not (frames and frames[-1].synced):
                frame = await a.frame()
                assert isinstance(frame, wire.Deliver), frame
                frames.append(frame)
            assert all(len(f.items) <= wire.MAX_BATCH for f in frames)
            assert [f.synced for f in frames[:-1]] == [False] * (len(frames) - 1)
            assert [m.eid for f in frames for m in f.items] == [e.eid for e in sent]
            assert [m.blob for f in frames for m in f.items] == [e.blob for e in sent]
            # Unacknowledged mail comes again on the next connection, all of it.
            async with raw_client(relay.url) as again:
                await again.resume(alice)
                assert [m.eid for m in await again.mail_until_synced()] == [e.eid for e in sent]
            await a.ack([e.eid for e in sent])
        async with raw_client(relay.url) as a:
            await a.resume(alice)
            assert await a.mail_until_synced() == []


async def test_mail_arriving_while_the_backlog_is_read_comes_exactly_once(accounts: Accounts) -> None:
    relay = accounts.relay
    n = 200
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        envs = [envelope(alice.device_id) for _ in range(n)]
        marker = envelope(alice.device_id)
        async with raw_client(relay.url) as b, raw_client(relay.url) as a:
            await b.resume(bob)
            for i, env in enumerate(envs[: n // 2]):
                await b.send(wire.encode(wire.Send(id=i + 1, envelopes=[env])))
            # alice comes online while bob's sends are still being committed.
            await a.send(wire.encode(wire.Resume(id=1, token=alice.store.get("token") or b"")))
            for i, env in enumerate(envs[n // 2 :], start=n // 2):
                await b.send(wire.encode(wire.Send(id=i + 1, envelopes=[env])))
            answers = [await b.answer() for _ in range(n)]
            assert all(isinstance(x, wire.Ok) for x in answers), answers
            # Everything is committed now; the marker is stored after all of it.
            assert isinstance(await send(b, marker), wire.Ok)
            assert await a.answer() == wire.ResumeOk(id=1, device_id=alice.device_id)
            got: list[bytes] = []
            while marker.eid not in got:
                got += [m.eid for m in await a.mail_until_synced()]
            assert len(got) == len(set(got)), "an envelope was pushed twice"
            assert set(got) == {e.eid for e in envs} | {marker.eid}
            assert got[-1] == marker.eid
            # ...in the order the relay stored them.
            assert got == await mailbox_eids(relay, alice.device_id)


async def test_mailbox_limit_refuses_whole_sends(accounts: Accounts) -> None:
    relay = accounts.relay
    state = relay.state
    assert state is not None
    state.mailroom.mailbox_limit = 3
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        async with raw_client(relay.url) as b:
            await b.resume(bob)
            first = [envelope(alice.device_id) for _ in range(2)]
            assert isinstance(await send(b, *first), wire.Ok)
            # Two more would make four: the whole send is refused, nothing of it stored.
            ans = await send(b, envelope(alice.device_id), envelope(alice.device_id))
            assert isinstance(ans, wire.Error) and ans.code == E.MAILBOX_FULL, ans
            assert await mailbox_eids(relay, alice.device_id) == [e.eid for e in first]
            # Other mailboxes are not affected.
            assert isinstance(await send(b, *[envelope(bob.device_id) for _ in range(3)]), wire.Ok)
            last = envelope(alice.device_id)
            assert isinstance(await send(b, last), wire.Ok)
            assert await mailbox_eids(relay, alice.device_id) == [e.eid for e in [*first, last]]


async def test_retry_into_a_full_mailbox_is_ok(accounts: Accounts) -> None:
    """A retried send stores nothing new, so a full mailbox must not refuse it."""
    relay = accounts.relay
    state = relay.state
    assert state is not None
    state.mailroom.mailbox_limit = 2
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        async with raw_client(relay.url) as b:
            await b.resume(bob)
            stored = [envelope(alice.device_id), envelope(alice.device_id)]
            assert isinstance(await send(b, *stored), wire.Ok)
            ans = await send(b, stored[0])  # the answer to the first try was lost
            assert ans == wire.Ok(id=ans.id), ans  # type: ignore[attr-defined]
            assert await mailbox_eids(relay, alice.device_id) == [e.eid for e in stored]


async def test_a_duplicate_inside_a_send_counts_once_toward_the_limit(accounts: Accounts) -> None:
    relay = accounts.relay
    state = relay.state
    assert state is not None
    state.mailroom.mailbox_limit = 3
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        async with raw_client(relay.url) as b:
            await b.resume(bob)
            e, f = envelope(alice.device_id), envelope(alice.device_id)
            assert isinstance(await send(b, e, f, e), wire.Ok)
            assert await mailbox_eids(relay, alice.device_id) == [e.eid, f.eid]
            third = envelope(alice.device_id)
            ans = await send(b, third)  # 2 stored + 1 = 3: within the limit
            assert isinstance(ans, wire.Ok), ans
            assert await mailbox_eids(relay, alice.device_id) == [e.eid, f.eid, third.eid]


async def test_duplicates_inside_sends_are_pushed_once_while_the_backlog_is_read(
    accounts: Accounts,
) -> None:
    relay = accounts.relay
    assert relay.state is not None
    relay.state.service.sender_budget.burst = 1e9  # 1,200 envelopes from bob to alice
    n = 100
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        token = alice.store.get("token")
        assert token
        async with raw_client(relay.url) as b:
            await b.resume(bob)
            # The race window (alice's backlog read vs bob's commits) is hit nearly every
            # round; several rounds make a miss practically impossible.
            for _ in range(6):
                pairs = [(envelope(alice.device_id), envelope(alice.device_id)) for _ in range(n)]
                marker = envelope(alice.device_id)
                async with raw_client(relay.url) as a:
                    for e, f in pairs[: n // 2]:
                        await b.send(wire.encode(wire.Send(id=b.next_id(), envelopes=[e, f, e])))
                    await a.send(wire.encode(wire.Resume(id=1, token=token)))
                    for e, f in pairs[n // 2 :]:
                        await b.send(wire.encode(wire.Send(id=b.next_id(), envelopes=[e, f, e])))
                    answers = [await b.answer() for _ in range(n)]
                    assert all(isinstance(x, wire.Ok) for x in answers), answers
                    assert isinstance(await send(b, marker), wire.Ok)
                    assert await a.answer() == wire.ResumeOk(id=1, device_id=alice.device_id)
                    got: list[bytes] = []
                    while marker.eid not in got:
                        got += [m.eid for m in await a.mail_until_synced()]
                    assert len(got) == len(set(got)), f"{len(got) - len(set(got))} pushed twice"
                    assert set(got) == {x.eid for p in pairs for x in p} | {marker.eid}
                    await a.ack(got)
