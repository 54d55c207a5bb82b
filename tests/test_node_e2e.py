"""End to end through a real relay on 127.0.0.1 with real SQLCipher files."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import trio

import wire
from keyvault.kdf import DEFAULT_KDF, TEST_KDF
from keyvault.keys import AccountKeys
from node.errors import IdentityChanged, LoginFailed, UnknownUser, VeilError, WrongPassword
from node.home import Home
from node.node import Node, Received
from node.store import OutboxEntry
from tests.conftest import PASSWORD, Accounts, RelayRunner

DEADLINE = 30


def texts(items: list[Received]) -> list[str]:
    return [r.message.body for r in items]


async def receive_all(node: Node, wait: float = 5.0) -> list[Received]:
    async with node.connected() as link:
        return await node.receive(link, wait=wait)


async def send(node: Node, peer: str, text: str) -> None:
    async with node.connected() as link:
        await node.send(link, peer, text)


async def test_offline_exchange_both_ways(accounts: Accounts) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        await send(alice, "bob", "hello bob")
        await send(alice, "bob", "second")
        got = await receive_all(bob)
        assert texts(got) == ["hello bob", "second"]
        assert {r.message.sender for r in got} == {"alice"}
        assert all(not r.message.outgoing and r.message.peer == "alice" for r in got)
        await send(bob, "alice", "hi alice")
        assert texts(await receive_all(alice)) == ["hi alice"]
        # Acknowledged mail is gone from the relay: nothing comes twice.
        assert await receive_all(bob, wait=0) == []
        history = [(m.sender, m.body) for m in alice.store.history("bob")]
        assert history == [("alice", "hello bob"), ("alice", "second"), ("bob", "hi alice")]


async def test_live_push_to_connected_device(accounts: Accounts) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        received: list[Received] = []
        bob_ready = trio.Event()

        async def bob_listens() -> None:
            async with bob.connected() as link:
                # The first delivery frame (empty backlog, synced) means bob is online.
                frame = await link.deliveries.receive()
                assert frame.synced and frame.items == []
                bob_ready.set()
                frame = await link.deliveries.receive()
                received.extend(await bob.accept(link, frame))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bob_listens)
            await bob_ready.wait()
            await send(alice, "bob", "live")
        assert texts(received) == ["live"]


async def test_second_device_gets_later_messages_and_sees_own_sent(accounts: Accounts) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        await send(bob, "alice", "before the second device")
        alice2 = await accounts.login("alice", "phone")
        assert alice2.keys.public() == alice.keys.public()
        assert alice2.device_id != alice.device_id
        await send(bob, "alice", "after")
        assert texts(await receive_all(alice)) == ["before the second device", "after"]
        assert texts(await receive_all(alice2)) == ["after"]
        # A message from the phone reaches bob, and alice's first device as her own.
        await send(alice2, "bob", "from the phone")
        own = await receive_all(alice)
        assert texts(own) == ["from the phone"]
        assert own[0].message.outgoing and own[0].message.peer == "bob"
        assert own[0].message.sender == "alice"
        assert texts(await receive_all(bob)) == ["from the phone"]
        async with alice.connected() as link:
            devices = {d.device_id for d in await alice.devices(link)}
        assert devices == {alice.device_id, alice2.device_id}


async def test_removed_device_gets_nothing_more(accounts: Accounts) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        alice2 = await accounts.login("alice", "old-phone")
        async with alice2.connected() as link:
            await alice2.logout(link, remove_device=True)
        await send(bob, "alice", "only the first device")
        assert texts(await receive_all(alice)) == ["only the first device"]
        state = accounts.relay.state
        assert state is not None
        rows = await state.mailroom.call(state.store.fetch, alice2.device_id, 0, 10)
        assert rows == []


async def test_wrong_password_changes_nothing(accounts: Accounts, tmp_path: Path) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        home = alice.home
        alice.close()
        before = home.store_path.read_bytes()
        with pytest.raises(WrongPassword):
            Node.unlock(home, "not the password")
        assert home.store_path.read_bytes() == before
        new_home = Home(tmp_path / "new-device")
        with pytest.raises(LoginFailed):
            await Node.login(new_home, "alice", "not the password", accounts.relay.url, min_kdf=TEST_KDF)
        assert not new_home.exists() and not new_home.store_path.exists()
        with pytest.raises(LoginFailed):
            await Node.login(new_home, "nobody", PASSWORD, accounts.relay.url, min_kdf=TEST_KDF)
        state = accounts.relay.state
        assert state is not None
        account = state.store.account(state.service.mac("alice"))
        assert account is not None
        assert len(state.store.devices(account.id)) == 1
        # The right password still works afterwards.
        again = Node.unlock(home, PASSWORD)
        again.close()


async def test_local_store_holds_nothing_in_the_clear(accounts: Accounts) -> None:
    # Names long enough that ciphertext cannot contain them by chance ("bob", three
    # bytes, turns up in ~100 KB of random bytes about once in 150 runs).
    a_name, b_name = "alice-cleartext-probe", "bob-cleartext-probe"
    with trio.fail_after(DEADLINE):
        alice = await accounts.register(a_name)
        bob = await accounts.register(b_name)
        secret = "the eagle lands at midnight " + secrets.token_hex(8)
        await send(alice, b_name, secret)
        await receive_all(bob)
        for node in (alice, bob):
            node.store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            blobs = b"".join(p.read_bytes() for p in node.home.path.iterdir() if p.name.startswith("store.db"))
            assert secret.encode() not in blobs
            assert a_name.encode() not in blobs and b_name.encode() not in blobs
            assert alice.keys.public().identity not in blobs
            assert alice.keys.identity_seed not in blobs


async def test_replayed_envelope_is_dropped(accounts: Accounts) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        await send(alice, "bob", "only once")
        state = accounts.relay.state
        assert state is not None
        captured = await state.mailroom.call(state.store.fetch, bob.device_id, 0, 10)
        assert len(captured) == 1
        assert texts(await receive_all(bob)) == ["only once"]
        # Someone who captured the envelope hands it to the relay again, under a new id.
        async with alice.connected() as link:
            await link.request(
                wire.Send, envelopes=[wire.Envelope(bob.device_id, secrets.token_bytes(16), captured[0].blob)]
            )
        assert await receive_all(bob, wait=0) == []
        assert texts([Received(m) for m in bob.store.history("alice")]) == ["only once"]
        # ...and the relay no longer holds it (the node acknowledged the drop).
        while True:
            seen = state.mailroom.commits
            if not await state.mailroom.call(state.store.fetch, bob.device_id, 0, 10):
                break
            await state.mailroom.wait_commit_after(seen)


async def test_composed_offline_then_sent_once_even_when_acks_are_lost(accounts: Accounts) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        msg = alice.compose("bob", "queued")  # no link at all: as when typed offline
        assert msg.state == "pending" and alice.store.pending_count() == 1
        # The next connection seals and hands it over.
        async with alice.connected():
            pass
        assert alice.store.outbox() == [] and alice.store.unsealed() == []
        assert alice.store.message(msg.msg_id).state == "sent"  # type: ignore[union-attr]
        state = accounts.relay.state
        assert state is not None
        held = await state.mailroom.call(state.store.fetch, bob.device_id, 0, 10)
        assert len(held) == 1
        lost_ack = [OutboxEntry(h.eid, msg.msg_id, bob.device_id, h.blob) for h in held]
        # The relay stored it, but its acknowledgement was lost: the same envelope again.
        alice.store.add_outbox(lost_ack)
        async with alice.connected():
            pass
        assert len(await state.mailroom.call(state.store.fetch, bob.device_id, 0, 10)) == 1
        assert texts(await receive_all(bob)) == ["queued"]
        # Even after bob acknowledged it (the relay forgot it), a retry is not shown twice.
        alice.store.add_outbox(lost_ack)
        async with alice.connected():
            pass
        assert await receive_all(bob, wait=0) == []


async def test_unknown_user(accounts: Accounts) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        with pytest.raises(UnknownUser):
            await send(alice, "nobody", "hello?")
        assert alice.store.outbox() == []


async def test_changed_identity_key_is_reported_and_blocks_verified(
    accounts: Accounts, key_pool: list[AccountKeys]
) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        await accounts.register("bob")
        warnings: list[str] = []
        alice.events.append(warnings.append)
        await send(alice, "bob", "first")
        assert alice.store.contact("bob") is not None
        # Pretend alice had pinned a different key for bob (as after a key change).
        other = key_pool[-1].public()
        with alice.store.transaction():
            alice.store.conn.execute(
                "UPDATE contacts SET identity_pub = ?, enc_pub = ? WHERE name = 'bob'",
                (other.identity, other.enc),
            )
            alice.store.set_verified("bob", True)
        with pytest.raises(IdentityChanged):
            await send(alice, "bob", "held")
        assert warnings and "bob" in warnings[0]
        contact = alice.store.contact("bob")
        assert contact is not None and contact.key_changed and contact.verified
        with pytest.raises(IdentityChanged):
            await send(alice, "bob", "still held")
        with alice.store.transaction():
            alice.store.accept_key("bob")
        await send(alice, "bob", "accepted")


async def test_relay_restart_keeps_sessions(accounts: Accounts, relay: RelayRunner) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        await send(alice, "bob", "before restart")
        await relay.stop()
        await relay.start()
        await send(alice, "bob", "after restart")
        assert texts(await receive_all(bob)) == ["before restart", "after restart"]


async def test_device_refuses_weak_kdf_from_relay(accounts: Accounts, tmp_path: Path) -> None:
    with trio.fail_after(DEADLINE):
        await accounts.register("alice")  # registered with the test profile
        home = Home(tmp_path / "strict-device")
        with pytest.raises(VeilError, match="weaker password hashing"):
            await Node.login(home, "alice", PASSWORD, accounts.relay.url, min_kdf=DEFAULT_KDF)
        assert not home.exists()


async def test_relay_cannot_substitute_the_sealing_key(
    accounts: Accounts, key_pool: list[AccountKeys]
) -> None:
    """The identity key vouches for the RSA key; a relay that swaps it is caught."""
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        await accounts.register("bob")
        state = accounts.relay.state
        assert state is not None
        mallory = key_pool[-1].public()
        state.store.conn.execute(
            "UPDATE accounts SET enc_pub = ? WHERE name_mac = ?", (mallory.enc, state.service.mac("bob"))
        )
        with pytest.raises(VeilError, match="does not vouch"):
            await send(alice, "bob", "for bob's eyes only")
        assert alice.store.contact("bob") is None


async def test_logged_out_device_stays_out(accounts: Accounts) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        phone = await accounts.login("alice", "phone")
        async with phone.connected() as link:
            await phone.logout(link)
        with pytest.raises(LoginFailed, match="logged out"):
            async with phone.connected():
                pass
        async with alice.connected() as link:
            assert [d.device_id for d in await alice.devices(link)] == [alice.device_id]


async def test_a_sender_name_that_is_not_canonical_is_refused(accounts: Accounts) -> None:
    """An envelope from "mallory\\r" would look up (and verify) as mallory's, then print as
    someone else: the node refuses any name not in its one canonical form."""
    with trio.fail_after(DEADLINE):
        mallory = await accounts.register("mallory")
        bob = await accounts.register("bob")
        async with mallory.connected() as link:
            own = await mallory.own_devices(link)
            # What a hostile client can put in its envelopes, consistently (X3DH included).
            mallory.name = mallory.sessions.name = "mallory\r"
            try:
                m = mallory.compose("bob", "please send me the door code")
                targets, bundles = await mallory._prepare(link, m, own, {})
                mallory._seal(m, targets, bundles)
            finally:
                mallory.name = mallory.sessions.name = "mallory"
            await mallory.flush_outbox(link)
        assert await receive_all(bob) == []
        assert bob.store.history(None) == []
