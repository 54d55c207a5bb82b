"""Post-quantum on real devices and a real relay: PQXDH sessions, version 3 envelopes,
devices from before publishing their keys at the next connection, and no downgrade."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest
import trio

import relay.service
import wire
from keyvault.envelope import HYBRID_VERSION, VERSION
from keyvault.kdf import store_key
from keyvault.kem import KemUse
from keyvault.ratchet import RatchetState
from node.errors import VeilError
from node.home import Home
from node.node import Node
from node.store import migrations as node_migrations
from tests.conftest import PASSWORD, Accounts, RelayRunner
from tests.test_forward_secrecy import captured as held
from tests.test_forward_secrecy import receive, send
from tests.test_node_store import rebuild_before, table_rows

DEADLINE = 30
# What a PrekeySet was before post-quantum keys (section 19): a relay from then refuses any
# other key in it, as its decoder forbade unknown fields.
OLD_PREKEY_FIELDS = {"signed", "one_time"}


@pytest.fixture
def old_relay(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The relay as one from before post-quantum keys: its prekey status has no KEM counts,
    and a PrekeySet with a key it does not know is refused as its decoder did. Returns the
    PrekeySets it was sent."""
    seen: list[dict[str, Any]] = []
    decode = wire.decode_request

    def old_decode(data: bytes) -> wire.Request:
        try:
            raw = msgspec.msgpack.decode(data)
        except Exception:
            raw = None
        prekeys = raw.get("prekeys") if isinstance(raw, dict) else None
        if isinstance(prekeys, dict):
            seen.append(prekeys)
            unknown = sorted(set(prekeys) - OLD_PREKEY_FIELDS)
            if unknown:
                raise wire.FrameError(wire.ErrorCode.BAD_FRAME, f"Object contains unknown field `{unknown[0]}`",
                                      wire.request_id(data))
        return decode(data)

    def old_status(rid: int, counts: Any) -> wire.PrekeyStatusOk:
        return wire.PrekeyStatusOk(id=rid, signed_id=counts.signed_id, one_time_left=counts.one_time_left)

    monkeypatch.setattr(wire, "decode_request", old_decode)
    monkeypatch.setattr(relay.service, "_status_ok", old_status)
    return seen


async def relay_rows(relay: RelayRunner, sql: str, *args: object) -> list[tuple[Any, ...]]:
    state = relay.state
    assert state is not None
    store = state.store
    return await state.mailroom.call(lambda: [tuple(r) for r in store.x(sql, args)])


async def relay_sql(relay: RelayRunner, sql: str, *args: object) -> None:
    """Change the relay's database behind its back: the relay as an attacker runs it."""
    state = relay.state
    assert state is not None
    store = state.store

    def run() -> None:
        with store.e.write():
            store.x(sql, args)

    await state.mailroom.call(run)


def session_is_pq(node: Node, peer: str, device_id: bytes) -> bool:
    (row,) = node.store.sessions(peer, device_id)[:1]
    return RatchetState.from_bytes(row.state).pq


def forget_pq_keys(node: Node) -> None:
    """Make the device one from before post-quantum keys (its store had none)."""
    with node.store.transaction():
        node.store.conn.execute("DELETE FROM kem_keys")
        node.store.conn.execute("DELETE FROM envelope_keys")
        node.store.conn.execute("DELETE FROM pq_devices")
        node.store.delete("pq_since_spk")


async def classical_pair(accounts: Accounts, relay: RelayRunner) -> tuple[Node, Node]:
    """alice and bob as from before post-quantum keys (none on either side, nor at the
    relay), and a first message "classic" from alice in an X3DH session."""
    alice = await accounts.register("alice")
    bob = await accounts.register("bob")
    forget_pq_keys(bob)
    await relay_sql(relay, "DELETE FROM kem_prekeys WHERE device_id = ?", bob.device_id)
    async with alice.connected() as link:
        await alice.lookup(link, "bob")
    forget_pq_keys(alice)  # alice looked bob up before his keys existed too
    await send(alice, "bob", "classic")
    return alice, bob


async def test_a_first_contact_is_pqxdh_and_every_envelope_is_hybrid(accounts: Accounts, relay: RelayRunner) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        await send(alice, "bob", "hello")
        (first,) = await held(relay, bob)
        assert first[0] == HYBRID_VERSION
        assert await receive(bob) == ["hello"]
        assert session_is_pq(alice, "bob", bob.device_id) and session_is_pq(bob, "alice", alice.device_id)
        await send(bob, "alice", "hi")
        assert await receive(alice) == ["hi"]
        # The one-time KEM prekey was used once and is gone from both sides.
        used = [r for r in bob.store.conn.execute("SELECT key_id FROM kem_keys WHERE use = ?", (KemUse.ONE_TIME,))]
        assert len(used) == 49


async def test_a_device_from_before_publishes_its_pq_keys_at_its_next_connection(
    accounts: Accounts, relay: RelayRunner
) -> None:
    """A device (and a relay) from before: no KEM keys on either side and a classical
    session. Its next connection publishes them; the old session, once answered, goes on
    as it was; new sessions with it are PQXDH."""
    with trio.fail_after(DEADLINE):
        alice, bob = await classical_pair(accounts, relay)
        (old,) = await held(relay, bob)
        assert old[0] == VERSION and not session_is_pq(alice, "bob", bob.device_id)
        assert await receive(bob) == ["classic"]  # bob connects: his keys go up now
        assert bob.store.newest_kem_key(KemUse.ENVELOPE) is not None
        await send(bob, "alice", "answered")  # the classical session is established now
        assert await receive(alice) == ["answered"]
        await send(alice, "bob", "still the old session")
        assert await receive(bob) == ["still the old session"]
        assert not session_is_pq(alice, "bob", bob.device_id)
        # A device of bob's account that starts now gets a PQXDH session with alice.
        carol = await accounts.register("carol")
        await send(carol, "bob", "new")
        (new,) = await held(relay, bob)
        assert new[0] == HYBRID_VERSION
        assert await receive(bob) == ["new"]
        assert session_is_pq(bob, "carol", carol.device_id)


async def test_a_bundle_stripped_of_its_kem_prekey_is_refused(accounts: Accounts, relay: RelayRunner) -> None:
    """The relay drops bob's KEM prekeys from what it hands out, after alice saw bob's
    device with post-quantum keys: alice does not fall back to X3DH."""
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        warnings: list[str] = []
        alice.events.append(warnings.append)
        async with alice.connected() as link:
            await alice.lookup(link, "bob")
        await relay_sql(relay, "DELETE FROM kem_prekeys WHERE device_id = ?", bob.device_id)
        async with alice.connected() as link:
            with pytest.raises(VeilError, match="no device of bob can receive"):
                await alice.send(link, "bob", "to be harvested")
        assert any("without its post-quantum prekey" in w for w in warnings), warnings
        assert await held(relay, bob) == []


async def test_a_classical_first_message_from_a_pq_device_is_refused(accounts: Accounts, relay: RelayRunner) -> None:
    """bob knows alice's device has post-quantum keys; a first message from it without
    PQXDH (the relay hid bob's keys from alice) is dropped with a warning, not opened."""
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        async with bob.connected() as link:
            await bob.lookup(link, "alice")
        assert bob.store.is_post_quantum("alice", alice.device_id)
        await relay_sql(relay, "DELETE FROM kem_prekeys WHERE device_id = ?", bob.device_id)
        await send(alice, "bob", "downgraded")
        (blob,) = await held(relay, bob)
        assert blob[0] == VERSION  # no envelope key of bob's either: what alice could do
        warnings: list[str] = []
        bob.events.append(warnings.append)
        assert await receive(bob) == []
        assert any("without post-quantum keys" in w for w in warnings), warnings


async def test_an_unanswered_classical_session_with_a_device_now_pq_is_replaced(
    accounts: Accounts, relay: RelayRunner
) -> None:
    """alice started an X3DH session with bob before his device had PQ keys, and bob has
    not answered; once alice sees his PQ keys, her next message starts a PQXDH session
    (bob would refuse more first messages of the classical one, PROTOCOL 19.6)."""
    with trio.fail_after(DEADLINE):
        alice, bob = await classical_pair(accounts, relay)
        assert not session_is_pq(alice, "bob", bob.device_id)
        assert await receive(bob) == ["classic"]  # bob's keys go up; he does not answer
        await send(alice, "bob", "now post-quantum")  # the lookup shows bob's PQ keys
        assert session_is_pq(alice, "bob", bob.device_id)
        assert await receive(bob) == ["now post-quantum"]
        assert session_is_pq(bob, "alice", alice.device_id)


async def test_a_relay_from_before_gets_only_frames_it_knows(
    accounts: Accounts, relay: RelayRunner, old_relay: list[dict[str, Any]]
) -> None:
    """Against a relay from before post-quantum keys, devices register, talk (classical
    sessions, version 2 envelopes), refill their one-time prekeys and rotate the signed
    one: every PrekeySet they send has only the keys that relay knew."""
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        await send(alice, "bob", "classic")
        (blob,) = await held(relay, bob)
        assert blob[0] == VERSION
        assert await receive(bob) == ["classic"]
        assert not session_is_pq(bob, "alice", alice.device_id)
        await send(bob, "alice", "answered")
        assert await receive(alice) == ["answered"]
        async with bob.connected() as link:
            before = await link.request(wire.PrekeyStatus)
            await relay_sql(relay, "DELETE FROM one_time_prekeys WHERE device_id = ?", bob.device_id)
            await bob.maintain_prekeys(link, now=int(time.time()) + 8 * 86400)
            after = await link.request(wire.PrekeyStatus)
        assert after.signed_id != before.signed_id and after.one_time_left > 0
        assert any("signed" in p for p in old_relay) and any(p.get("one_time") for p in old_relay)
        assert all(set(p) <= OLD_PREKEY_FIELDS for p in old_relay), old_relay
        assert await relay_rows(relay, "SELECT count(*) FROM kem_prekeys") == [(0,)]
        await send(bob, "alice", "after the rotation")
        assert await receive(alice) == ["after the rotation"]


async def test_a_refused_prekey_upload_does_not_keep_a_device_offline(
    accounts: Accounts, relay: RelayRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay that refuses a device's new prekeys (here: every upload) costs a warning;
    the device still connects, sends and receives."""
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        decode = wire.decode_request

        def refuse_uploads(data: bytes) -> wire.Request:
            req = decode(data)
            if isinstance(req, wire.UploadPrekeys):
                raise wire.FrameError(wire.ErrorCode.PREKEY_LIMIT, "too many prekeys", req.id)
            return req

        monkeypatch.setattr(wire, "decode_request", refuse_uploads)
        await relay_sql(relay, "DELETE FROM one_time_prekeys WHERE device_id = ?", bob.device_id)
        warnings: list[str] = []
        bob.events.append(warnings.append)
        await send(alice, "bob", "still here")
        assert await receive(bob) == ["still here"]
        assert any("did not take this device's new prekeys" in w for w in warnings), warnings


async def kem_counts(relay: RelayRunner, node: Node) -> list[tuple[Any, ...]]:
    """(use, how many) of the device's KEM keys the relay holds."""
    return await relay_rows(relay, "SELECT use, count(*) FROM kem_prekeys WHERE device_id = ? GROUP BY use"
                            " ORDER BY use", node.device_id)


PUBLISHED = [(KemUse.ONE_TIME, 50), (KemUse.LAST_RESORT, 1), (KemUse.ENVELOPE, 1)]


async def test_a_store_from_before_migration_0004_keeps_its_rows_and_publishes_kem_keys(
    accounts: Accounts, relay: RelayRunner
) -> None:
    """alice's store as the node before post-quantum keys wrote it (migrations 0001-0003
    only), holding what it held: her account keys, a contact, a classical session not yet
    answered, her prekeys, a message. The current node opens it: migration 0004 (and the
    later ones) leave every row as it was; her next connection publishes her KEM keys, and
    the old session goes on."""
    with trio.fail_after(DEADLINE):
        alice, bob = await classical_pair(accounts, relay)
        await relay_sql(relay, "DELETE FROM kem_prekeys WHERE device_id = ?", alice.device_id)
        home, config = alice.home, alice.config
        key = store_key(PASSWORD, bytes.fromhex(config.store_salt), config.kdf_params)
        alice.close()
        before = rebuild_before(home.store_path, key, node_migrations, "0004_post_quantum")
        assert all(before[t] for t in ("meta", "contacts", "contact_devices", "sessions", "signed_prekeys",
                                       "one_time_prekeys", "messages"))
        assert "kem_keys" not in before
        alice = Node.unlock(Home(home.path), PASSWORD)
        accounts.nodes.append(alice)
        assert [m.name for m in node_migrations.pending(alice.store.db)] == []
        for table, rows in before.items():
            assert table_rows(alice.store.conn, table) == rows, table
        assert alice.store.newest_kem_key(KemUse.ENVELOPE) is None
        assert not session_is_pq(alice, "bob", bob.device_id)
        assert await receive(alice) == []  # her first connection since: the keys go up
        assert alice.store.newest_kem_key(KemUse.ENVELOPE) is not None
        assert await kem_counts(relay, alice) == PUBLISHED
        assert await receive(bob) == ["classic"]
        await send(bob, "alice", "answered")
        (answer,) = await held(relay, alice)
        assert answer[0] == HYBRID_VERSION  # bob's lookup found her envelope key
        assert await receive(alice) == ["answered"]
        await send(alice, "bob", "the old session goes on")
        assert await receive(bob) == ["the old session goes on"]
        assert not session_is_pq(alice, "bob", bob.device_id)
