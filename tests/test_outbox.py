"""What waits in a device's outbox never holds up the rest: a recipient whose mailbox is
full at the relay delays only the messages to that recipient."""

from __future__ import annotations

import secrets
from pathlib import Path

import trio

from keyvault.keys import AccountKeys
from node.control import ControlService
from node.node import Node, Received
from node.session import LiveSession
from node.store import StoredMessage
from tests.conftest import Accounts, RelayRunner

DEADLINE = 60


async def test_a_full_mailbox_delays_only_the_messages_to_it(
    nursery: trio.Nursery, key_pool: list[AccountKeys], tmp_path: Path
) -> None:
    relay = RelayRunner(nursery, tmp_path / "relay", mailbox_limit=3)
    await relay.start()
    accounts = Accounts(key_pool, tmp_path, relay)
    try:
        with trio.fail_after(DEADLINE):
            alice = await accounts.register("alice")
            mallory = await accounts.register("mallory")
            carol = await accounts.register("carol")
            warnings: list[str] = []
            alice.events.append(warnings.append)
            for i in range(3):  # mallory never reads: her mailbox fills up
                msg, why = await alice.send_or_queue("mallory", f"to mallory {i}")
                assert (msg.state, why) == ("sent", None)
            msg, why = await alice.send_or_queue("mallory", "one too many")
            assert msg.state == "pending" and why == "a device of mallory has a full mailbox at the relay"
            assert any("a device of mallory has a full mailbox" in w for w in warnings)
            # Everyone else is unaffected: alice sends to carol, and receives from her.
            msg, why = await alice.send_or_queue("carol", "hello carol")
            assert (msg.state, why) == ("sent", None)
            await _send(carol, "alice", "hello alice")
            assert [r.message.body for r in await _receive(alice)] == ["hello alice"]
            assert [r.message.body for r in await _receive(carol)] == ["hello carol"]
            # Mallory reads; alice's next connection delivers what waited, once.
            got = [r.message.body for r in await _receive(mallory)]
            assert got == ["to mallory 0", "to mallory 1", "to mallory 2"]
            await _receive(alice, wait=0)
            assert alice.store.pending_count() == 0
            assert [r.message.body for r in await _receive(mallory)] == ["one too many"]
            assert await _receive(mallory, wait=0) == []
    finally:
        accounts.close()


async def _send(node: Node, peer: str, text: str) -> None:
    msg, why = await node.send_or_queue(peer, text)
    assert msg.state == "sent", why


async def _receive(node: Node, wait: float = 5.0) -> list[Received]:
    async with node.connected() as link:
        return await node.receive(link, wait=wait)


async def test_recv_hands_out_a_backlog_larger_than_one_batch(accounts: Accounts) -> None:
    """More stored messages than one store query returns all reach `veil recv`, in order."""
    with trio.fail_after(DEADLINE):
        bob = await accounts.register("bob")
        with bob.store.transaction():
            for i in range(510):
                bob.store.add_message(StoredMessage(secrets.token_bytes(16), "alice", "alice", False,
                                                    f"m{i}", i, i, "received", 0))
        service = ControlService(bob, LiveSession(bob), "a test")
        got: list[str] = []

        async def emit(m: StoredMessage) -> None:
            got.append(m.body)

        await service.hand_out(emit)
        assert got == [f"m{i}" for i in range(510)]
        assert bob.unprinted() == []


async def test_a_link_that_dies_as_the_session_is_cancelled_ends_only_the_session() -> None:
    """A cut link and a cancelled run at the same moment (a device going offline as the
    relay drops it): the run ends quietly, no ConnectionLost escapes its cancel scope."""
    from types import SimpleNamespace

    from node.errors import ConnectionLost

    node = SimpleNamespace(events=[], sent_listeners=[], received_listeners=[])
    session = LiveSession(node)  # type: ignore[arg-type]
    entered = trio.Event()

    async def online() -> None:
        async def lost() -> None:
            try:
                await trio.sleep_forever()
            finally:
                raise ConnectionLost()  # the link's reader, as the cancellation reaches it

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lost)
            nursery.start_soon(trio.sleep_forever)
            entered.set()
            await trio.sleep_forever()

    session._online = online  # type: ignore[method-assign]
    with trio.fail_after(10):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.run)
                await entered.wait()
                scope.cancel()
    assert scope.cancelled_caught and session.link is None
