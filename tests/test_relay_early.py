"""Mail pushed before its commit (relay/delivery.py, Router.push_early), over a real relay:
a connection that is idle and caught up gets a send's envelope while the commit that makes
it durable is still running, the sender's answer still waits for that commit, an ack that
comes before the commit deletes it after, and nothing is pushed twice. A send that then
fails keeps the sender's ration spent for the devices that got it."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

import wire
from keyvault.keys import AccountKeys
from relay.server import RelayState
from tests.conftest import Accounts, RelayRunner
from tests.test_relay_hostile import rationed
from tests.test_relay_support import (
    DEADLINE,
    ack_frame,
    envelope,
    mailbox_eids,
    raw_client,
)

E = wire.ErrorCode


@contextmanager
def commits_held(relay: RelayRunner) -> Iterator[threading.Event]:
    """Group commits wait (in the commit thread) until the block ends. Yields an event
    that is set once a commit has begun to wait."""
    state = relay.state
    assert isinstance(state, RelayState)
    store = state.mailroom.store
    release, entered = threading.Event(), threading.Event()
    real = store.commit_mail

    def held(*args: Any) -> None:
        entered.set()
        if not release.wait(DEADLINE):
            raise RuntimeError("the test never let the commit go")
        real(*args)

    store.commit_mail = held  # type: ignore[method-assign]
    try:
        yield entered
    finally:
        store.commit_mail = real  # type: ignore[method-assign]
        release.set()


async def test_an_idle_connection_gets_a_send_before_its_commit_and_only_once(accounts: Accounts) -> None:
    relay = accounts.relay
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        async with raw_client(relay.url) as a, raw_client(relay.url) as b:
            await a.resume(alice)
            assert await a.mail_until_synced() == []
            await b.resume(bob)
            await b.mail_until_synced()
            env = envelope(alice.device_id)
            req = wire.Send(id=b.next_id(), envelopes=[env])
            with commits_held(relay) as entered:
                await b.send(wire.encode(req))
                pushed = await a.frame()  # while no commit can finish
                assert pushed == wire.Deliver(items=[wire.Mail(env.eid, env.blob)], synced=True)
                await trio.to_thread.run_sync(entered.wait, DEADLINE)  # its commit waits
                # Acknowledged before its commit is done.
                await a.send(wire.encode(ack_frame([env.eid])))
            assert await b.answer() == wire.Ok(id=req.id)  # the answer came after the commit
            await a.barrier()
            assert await mailbox_eids(relay, alice.device_id) == []  # stored, then deleted
            await a.assert_alive()
            assert a.delivered == []  # its commit did not push it again
            # Not acknowledged before its commit: stored, pushed once, there until the ack.
            env2 = envelope(alice.device_id)
            assert await b.ask(wire.Send(id=b.next_id(), envelopes=[env2])) == wire.Ok(id=b._ids)
            assert await a.frame() == wire.Deliver(items=[wire.Mail(env2.eid, env2.blob)], synced=True)
            assert await mailbox_eids(relay, alice.device_id) == [env2.eid]
            await a.assert_alive()
            assert a.delivered == []
            await a.ack([env2.eid])
            assert await mailbox_eids(relay, alice.device_id) == []
        # A new connection gets nothing again: everything was acknowledged.
        async with raw_client(relay.url) as a:
            await a.resume(alice)
            assert await a.mail_until_synced() == []


async def test_a_send_that_fails_after_pushing_early_keeps_the_ration_spent(
    nursery: trio.Nursery, key_pool: list[AccountKeys], tmp_path: Path
) -> None:
    """A send made to fail (a made-up device beside a real one) gives its ration back
    when nothing of it reached anyone; when its envelope went early to the real device's
    connection it does not, so such sends push no more than the ration allows."""
    async with rationed(nursery, key_pool, tmp_path, sender_rate=0.001, sender_burst=3) as acc:
        with trio.fail_after(DEADLINE):
            mallory = await acc.register("mallory")
            bob = await acc.register("bob")

            def spoilt() -> wire.Send:
                return wire.Send(id=m.next_id(), envelopes=[envelope(bob.device_id), envelope(secrets.token_bytes(16))])

            async with raw_client(acc.relay.url) as m:
                await m.resume(mallory)
                await m.mail_until_synced()
                for _ in range(5):  # bob is offline: nothing reached him, each is given back
                    await m.refused(spoilt(), E.UNKNOWN_DEVICE)
                async with raw_client(acc.relay.url) as b:
                    await b.resume(bob)
                    assert await b.mail_until_synced() == []
                    for _ in range(3):  # bob is online: each reaches him first
                        await m.refused(spoilt(), E.UNKNOWN_DEVICE)
                    await m.refused(wire.Send(id=m.next_id(), envelopes=[envelope(bob.device_id)]),
                                    E.RECIPIENT_LIMITED)
                    await b.assert_alive()
                    assert len([item for d in b.delivered for item in d.items]) == 3
            assert await mailbox_eids(acc.relay, bob.device_id) == []
