"""Forward secrecy and post-compromise healing, tested on real devices and a real relay.

The attacker captures envelopes at the relay's database and later steals a copy of the
recipient device's key material and ratchet sessions (everything but the message history,
which holds plaintext by design and is what the master password protects).
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import time
from pathlib import Path

import pytest
import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import wire
from keyvault import kem, ratchet
from keyvault._codec import lp
from keyvault.envelope import HYBRID_VERSION, open_envelope
from keyvault.errors import DecryptionFailed, DuplicateMessage
from keyvault.kem import KemUse, new_kem_key
from keyvault.letter import decode_letter
from keyvault.payload import decode_payload
from keyvault.prekeys import new_one_time_prekeys, new_signed_prekey, x25519_pair
from keyvault.ratchet import RatchetState
from node.errors import VeilError
from node.home import Home
from node.node import Node
from tests.conftest import PASSWORD, Accounts, RelayRunner

DEADLINE = 30


async def send(node: Node, peer: str, text: str) -> None:
    async with node.connected() as link:
        await node.send(link, peer, text)


async def receive(node: Node) -> list[str]:
    async with node.connected() as link:
        return [r.message.body for r in await node.receive(link, wait=5)]


async def captured(relay: RelayRunner, node: Node) -> list[bytes]:
    """The envelopes the relay holds for a device, as an attacker copying its database."""
    state = relay.state
    assert state is not None
    return [m.blob for m in await state.mailroom.call(state.store.fetch, node.device_id, 0, 100)]


def stolen_copy(node: Node, tmp: Path) -> Node:
    """A copy of the device's keys and sessions, without its message history."""
    node.store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    target = tmp / f"stolen-{node.name}"
    target.mkdir(parents=True)
    for f in ("device.json", "store.db"):
        shutil.copy(node.home.path / f, target / f)
    copy = Node.unlock(Home(target), PASSWORD)
    with copy.store.transaction():
        copy.store.conn.execute("DELETE FROM messages")
    return copy


def cannot_open(copy: Node, blob: bytes) -> None:
    with pytest.raises((DecryptionFailed, DuplicateMessage)):
        copy.open_only(blob)


async def test_stolen_state_does_not_open_earlier_messages(
    accounts: Accounts, relay: RelayRunner, tmp_path: Path
) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        for i in range(3):
            await send(alice, "bob", f"secret {i}")
        early = await captured(relay, bob)
        assert len(early) == 3
        assert await receive(bob) == ["secret 0", "secret 1", "secret 2"]
        # The conversation moves on a few ratchet steps.
        for i in range(3):
            await send(bob, "alice", f"reply {i}")
            assert await receive(alice) == [f"reply {i}"]
            await send(alice, "bob", f"more {i}")
            assert await receive(bob) == [f"more {i}"]
        copy = stolen_copy(bob, tmp_path)
        try:
            for blob in early:
                # The long-term RSA key and envelope key still open the outer layer: the
                # sender shows (the documented trade-off), the content does not.
                assert blob[0] == HYBRID_VERSION
                outer = open_envelope(blob, copy.keys, copy.device_id, copy._envelope_key_for(blob))
                assert outer.sealed.sender == "alice"
                cannot_open(copy, blob)
            # The copy is a working state: what alice sends next, it can read (until
            # the ratchet heals, see below). So the refusals above are forward secrecy.
            await send(alice, "bob", "after the theft")
            (late,) = await captured(relay, bob)
            sender, plain = copy.open_only(late)
            assert (sender, decode_letter(plain).body) == ("alice", "after the theft")
        finally:
            copy.close()


async def test_stolen_state_stops_working_once_both_sides_have_sent(
    accounts: Accounts, relay: RelayRunner, tmp_path: Path
) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        await send(alice, "bob", "hello")
        assert await receive(bob) == ["hello"]
        await send(bob, "alice", "hi")
        assert await receive(alice) == ["hi"]
        copy = stolen_copy(bob, tmp_path)
        try:
            # Both sides send once more: new DH ratchet keys the copy never saw.
            await send(alice, "bob", "one")
            assert await receive(bob) == ["one"]
            await send(bob, "alice", "two")
            assert await receive(alice) == ["two"]
            await send(alice, "bob", "healed")
            (blob,) = await captured(relay, bob)
            cannot_open(copy, blob)
            assert await receive(bob) == ["healed"]
        finally:
            copy.close()


async def test_new_device_of_contact_is_picked_up_and_out_of_order_delivery(accounts: Accounts) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        await send(alice, "bob", "to one device")
        assert await receive(bob) == ["to one device"]
        bob2 = await accounts.login("bob", "laptop")
        # alice's next send finds the new device and starts a session with it.
        await send(alice, "bob", "to both")
        assert await receive(bob2) == ["to both"]
        assert await receive(bob) == ["to both"]
        # Several messages in flight at once, delivered in one batch: all decrypt once.
        async with alice.connected() as link:
            for i in range(5):
                await alice.send(link, "bob", f"burst {i}")
        assert await receive(bob2) == [f"burst {i}" for i in range(5)]


async def test_one_time_prekeys_are_used_once_and_refilled(accounts: Accounts, relay: RelayRunner) -> None:
    with trio.fail_after(DEADLINE):
        bob = await accounts.register("bob")
        state = relay.state
        assert state is not None
        counts = await state.mailroom.call(state.store.prekey_status, bob.device_id)
        assert counts.signed_id is not None and counts.one_time_left == 100
        senders = [await accounts.register(f"sender{i}") for i in range(3)]
        for s in senders:
            await send(s, "bob", f"from {s.name}")
        left = (await state.mailroom.call(state.store.prekey_status, bob.device_id)).one_time_left
        assert left == 97  # one per new session, never handed out twice
        assert sorted(await receive(bob)) == sorted(f"from {s.name}" for s in senders)
        # Bob's device deletes a one-time prekey once its first message decrypted.
        (count,) = bob.store.conn.execute("SELECT count(*) FROM one_time_prekeys").fetchone()
        assert count == 97
        # Drain the stock below the refill mark; the next connection tops it up.
        account = state.store.account(state.service.mac("bob"))
        assert account is not None
        for _ in range(85):
            await state.mailroom.call(state.store.claim_prekeys, account.id, [bob.device_id])
        left = (await state.mailroom.call(state.store.prekey_status, bob.device_id)).one_time_left
        assert left == 12
        async with bob.connected():
            pass
        left = (await state.mailroom.call(state.store.prekey_status, bob.device_id)).one_time_left
        assert left == 100


async def test_signed_prekey_rotates_weekly_and_old_one_opens_late_messages(
    accounts: Accounts, relay: RelayRunner
) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        state = relay.state
        assert state is not None
        first_spk = (await state.mailroom.call(state.store.prekey_status, bob.device_id)).signed_id
        first_kem = (await state.mailroom.call(state.store.prekey_status, bob.device_id)).kem_last_resort_id
        assert first_kem is not None and bob.store.kem_key(KemUse.LAST_RESORT, first_kem) is not None
        # alice starts a session on bob's current signed prekey; bob is away for a while.
        await send(alice, "bob", "sent before the rotation")
        week = 7 * 86400
        now = int(time.time())
        async with bob.connected() as link:
            await bob.maintain_prekeys(link, now=now + week - 60)  # not due yet
            assert (await state.mailroom.call(state.store.prekey_status, bob.device_id)).signed_id == first_spk
            await bob.maintain_prekeys(link, now=now + week + 60)  # due: a new one
        second_spk = (await state.mailroom.call(state.store.prekey_status, bob.device_id)).signed_id
        assert second_spk != first_spk
        # The last-resort KEM prekey rotates with it; the old one is kept as long.
        second_kem = (await state.mailroom.call(state.store.prekey_status, bob.device_id)).kem_last_resort_id
        assert second_kem is not None and second_kem != first_kem
        assert bob.store.kem_key(KemUse.LAST_RESORT, first_kem) is not None
        # The retired key still opens the late first message.
        assert await receive(bob) == ["sent before the rotation"]
        # New sessions use the new signed prekey.
        carol = await accounts.register("carol")
        await send(carol, "bob", "after the rotation")
        assert await receive(bob) == ["after the rotation"]
        # A month after its retirement the old private key is gone for good.
        async with bob.connected() as link:
            await bob.maintain_prekeys(link, now=now + week + 60 + 31 * 86400)
        assert bob.store.signed_prekey(first_spk) is None  # type: ignore[arg-type]
        assert bob.store.signed_prekey(second_spk) is not None  # type: ignore[arg-type]
        assert bob.store.kem_key(KemUse.LAST_RESORT, first_kem) is None
        assert bob.store.kem_key(KemUse.LAST_RESORT, second_kem) is not None


async def test_relay_answering_with_another_accounts_keys_is_caught(
    accounts: Accounts, relay: RelayRunner
) -> None:
    """A relay that answers a lookup of bob with mallory's (validly signed) keys."""
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        await accounts.register("bob")
        mallory = await accounts.register("mallory")
        state = relay.state
        assert state is not None
        honest = state.service.lookup_keys

        async def lying(peer, req):  # type: ignore[no-untyped-def]
            if req.name == "bob":
                req = wire.LookupKeys(id=req.id, name="mallory")
            return await honest(peer, req)

        state.service.lookup_keys = lying  # type: ignore[method-assign]
        with pytest.raises(VeilError, match="another account"):
            await send(alice, "bob", "secret for bob")
        assert await captured(relay, mallory) == []
        assert alice.store.contact("bob") is None


@pytest.mark.slow
async def test_replayed_first_message_does_not_fork_the_session(
    accounts: Accounts, relay: RelayRunner
) -> None:
    """A first message (X3DH data, no one-time prekey) replayed long after: dropped,
    and the conversation goes on in the session both sides use."""
    with trio.fail_after(120):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        state = relay.state
        assert state is not None
        account = state.store.account(state.service.mac("bob"))
        assert account is not None
        for _ in range(100):  # bob's one-time prekeys run out: X3DH on the signed prekey
            await state.mailroom.call(state.store.claim_prekeys, account.id, [bob.device_id])
        await send(alice, "bob", "first")
        (first,) = await captured(relay, bob)
        assert await receive(bob) == ["first"]
        for i in range(52):  # bob retires more than 50 receiving header keys
            await send(bob, "alice", f"b{i}")
            assert await receive(alice) == [f"b{i}"]
            await send(alice, "bob", f"a{i}")
            assert await receive(bob) == [f"a{i}"]
        async with alice.connected() as link:
            await link.request(wire.Send, envelopes=[wire.Envelope(bob.device_id, secrets.token_bytes(16), first)])
        assert await receive(bob) == []
        assert len(bob.store.sessions("alice", alice.device_id)) == 1
        await send(bob, "alice", "after the replay")
        assert await receive(alice) == ["after the replay"]


def without(copy: Node, sql: str, *args: object) -> None:
    with copy.store.transaction():
        copy.store.conn.execute(sql, args)


@pytest.mark.parametrize("missing", ["kem", "classic"])
async def test_a_first_message_needs_both_the_kem_and_the_classical_prekeys(
    accounts: Accounts, relay: RelayRunner, tmp_path: Path, missing: str
) -> None:
    """The attacker holds a copy of bob's device from before alice's first message: every
    X25519 and RSA private key (and the envelope key, so the outer layer opens), but not
    the KEM prekeys; or the KEM prekeys and not the X25519 ones. Neither opens the PQXDH
    message; the whole copy does (the control: the copy is a working state)."""
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        async with bob.connected() as link:
            await bob.lookup(link, "alice")  # so that the copies know alice's keys
        whole = stolen_copy(bob, tmp_path / "whole")
        part = stolen_copy(bob, tmp_path / "part")
        try:
            await send(alice, "bob", "first contact")
            (first,) = await captured(relay, bob)
            assert first[0] == HYBRID_VERSION
            assert decode_letter(whole.open_only(first)[1]).body == "first contact"
            # The missing keys are replaced by others of the same ids: the device tries
            # them, and the derivation, not a lookup, is what fails.
            conn = part.store.conn
            with part.store.transaction():
                if missing == "kem":
                    for use, key_id in conn.execute("SELECT use, key_id FROM kem_keys WHERE use IN (?, ?)",
                                                    (KemUse.ONE_TIME, KemUse.LAST_RESORT)).fetchall():
                        conn.execute("UPDATE kem_keys SET blob = ? WHERE use = ? AND key_id = ?",
                                     (new_kem_key(part.keys, KemUse(use), key_id, 0, device_id=part.device_id)
                                      .to_bytes(), use, key_id))
                else:
                    for (key_id,) in conn.execute("SELECT key_id FROM signed_prekeys").fetchall():
                        conn.execute("UPDATE signed_prekeys SET blob = ? WHERE key_id = ?",
                                     (new_signed_prekey(part.keys, key_id, 0).to_bytes(), key_id))
                    for (key_id,) in conn.execute("SELECT key_id FROM one_time_prekeys").fetchall():
                        (opk,) = new_one_time_prekeys(key_id, 1)
                        conn.execute("UPDATE one_time_prekeys SET blob = ? WHERE key_id = ?", (opk.to_bytes(), key_id))
            assert open_envelope(first, part.keys, part.device_id, part._envelope_key_for(first)).sealed.sender == "alice"
            cannot_open(part, first)
            # Without the envelope key, not even the sender shows.
            without(whole, "DELETE FROM kem_keys WHERE use = ?", KemUse.ENVELOPE)
            with pytest.raises(DecryptionFailed):
                open_envelope(first, whole.keys, whole.device_id, whole._envelope_key_for(first))
        finally:
            whole.close()
            part.close()


def session_state(node: Node, peer: Node) -> tuple[RatchetState, bytes]:
    """The device's ratchet state with the peer's device (its only session), and the AD."""
    (row,) = node.store.sessions(peer.name, peer.device_id)
    return RatchetState.from_bytes(row.state), row.ad


def rebuild(before: RatchetState, message: bytes, ad: bytes, dh_out: bytes, kem_secret: bytes) -> bytes | None:
    """The attacker's replay of the receiving side of a DH ratchet step with a KEM step:
    from the receiver's root key and next header key before it, the step's DH output and
    KEM secret as the attacker has them, the message key of the new chain's first message,
    and that message's body opened with it (None if it does not open)."""
    version = message[0]
    prefix_len = 1 + ratchet.NONCE_LEN + ratchet._HEADER_LENS[version] + ratchet.TAG_LEN
    assert before.nhkr is not None
    header = ratchet._open_header(before.nhkr, message[1:prefix_len], version)
    assert header is not None and header.n == 0 and header.kem_ciphertext is not None
    _rk, ck, _nhk = ratchet.kdf_rk_kem(before.rk, dh_out, kem_secret)
    _ck, mk = ratchet.kdf_ck(ck)
    key, nonce, _ = ratchet.message_keys(mk)
    try:
        return AESGCM(key).decrypt(nonce, message[prefix_len:], lp(ad) + message[:prefix_len])
    except InvalidTag:
        return None


async def test_later_kem_steps_need_both_the_kem_and_the_x25519_keys(
    accounts: Accounts, relay: RelayRunner
) -> None:
    """Four round trips after a PQXDH first message, between real devices: each message
    starts a new chain (a DH ratchet step with a KEM step). For each, the attacker holds
    the receiving device's whole ratchet state from just before it (so its root key, which
    stands for every earlier key: identity DH, prekeys, PQXDH) and the sender's ratchet DH
    private key as it was when it sent; the outer layer is opened for it (the hybrid
    envelope is tested on its own). With every X25519 private key but not the receiver's
    ML-KEM ratchet key, it does not open the message; with that KEM key but not the X25519
    ratchet keys, neither; with both it does (the control: the KEM secret is in the root
    key, and the replay is right)."""
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        await send(alice, "bob", "first contact")
        assert await receive(bob) == ["first contact"]
        steps = []
        for i, (sender, receiver) in enumerate([(bob, alice), (alice, bob)] * 2):
            before, ad = session_state(receiver, sender)
            text = f"step {i}"
            await send(sender, receiver.name, text)
            (blob,) = await captured(relay, receiver)
            sent, _ = session_state(sender, receiver)  # its DH key as it was when it sent
            assert await receive(receiver) == [text]
            p = decode_payload(open_envelope(blob, receiver.keys, receiver.device_id,
                                             receiver._envelope_key_for(blob)).sealed.payload)
            assert p.init is None and p.ratchet[0] == ratchet.PQ_CT_VERSION
            steps.append((before, ad, sent, p.ratchet, text))
        assert len({sent.dhs_public for _, _, sent, _, _ in steps}) == 4  # four DH steps
        for before, ad, sent, message, text in steps:
            assert before.kems_seed is not None and sent.kem_ct is not None
            dh_out = X25519PrivateKey.from_private_bytes(sent.dhs_private).exchange(
                X25519PublicKey.from_public_bytes(before.dhs_public))
            kem_secret = kem.decapsulate(before.kems_seed, sent.kem_ct)
            # Both halves: it opens (so the replay is the real key schedule).
            plain = rebuild(before, message, ad, dh_out, kem_secret)
            assert plain is not None and decode_letter(plain).body == text
            # Every X25519 key, no ML-KEM secret: the KEM secret guessed, or decapsulated
            # with another key (what ML-KEM gives for the wrong key).
            for guess in (bytes(32), kem.decapsulate(kem.kem_pair()[0], sent.kem_ct)):
                assert rebuild(before, message, ad, dh_out, guess) is None
            # The KEM secret, no X25519 private key: the DH output guessed from the
            # public keys alone.
            for guess in (bytes(32), before.dhs_public, sent.dhs_public):
                assert rebuild(before, message, ad, guess, kem_secret) is None
            # The same through the ratchet's own code: the receiver's state with its KEM
            # seed, or its DH private key, swapped for another does not decrypt.
            _, plain = ratchet.decrypt(before, message, ad)
            assert decode_letter(plain).body == text
            for stolen in (dataclasses.replace(before, kems_seed=kem.kem_pair()[0]),
                           dataclasses.replace(before, dhs_private=x25519_pair()[0])):
                with pytest.raises(DecryptionFailed):
                    ratchet.decrypt(stolen, message, ad)
