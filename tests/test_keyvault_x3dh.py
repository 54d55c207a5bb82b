"""Prekeys and X3DH: signatures, serialisation, agreement, and a first ratchet message."""

from __future__ import annotations

import dataclasses
import functools
import secrets

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from keyvault import labels, ratchet
from keyvault.errors import BadKey, BadPrekey, DecryptionFailed
from keyvault.keys import AccountKeys
from keyvault.prekeys import (
    ONE_TIME_PREKEY_LEN,
    SIGNED_PREKEY_LEN,
    OneTimePrekey,
    SignedPrekey,
    new_one_time_prekeys,
    new_signed_prekey,
    verify_signed_prekey,
)
from keyvault.x3dh import PrekeyBundle, X3DHResult, initiate, respond

DEV_A, DEV_B = bytes([0xA1]) * 16, bytes([0xB1]) * 16


@functools.cache
def _rsa() -> rsa.RSAPrivateKey:
    # X3DH never touches the RSA key, so every test account shares one (RSA keygen is slow).
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


def account(identity_seed: bytes | None = None, dh_private: bytes | None = None) -> AccountKeys:
    """Return account keys, with fixed Ed25519 / X25519 identity keys if given."""
    return AccountKeys(
        _rsa(),
        Ed25519PrivateKey.from_private_bytes(identity_seed or secrets.token_bytes(32)),
        X25519PrivateKey.from_private_bytes(dh_private or secrets.token_bytes(32)),
    )


def bundle_of(
    keys: AccountKeys, spk: SignedPrekey, opk: OneTimePrekey | None = None
) -> PrekeyBundle:
    pub = keys.public()
    return PrekeyBundle(
        identity=pub.identity,
        identity_dh=pub.dh,
        spk_id=spk.key_id,
        spk=spk.public,
        spk_sig=spk.signature,
        opk_id=None if opk is None else opk.key_id,
        opk=None if opk is None else opk.public,
    )


def agree(
    alice: AccountKeys,
    bob: AccountKeys,
    spk: SignedPrekey,
    opk: OneTimePrekey | None,
    *,
    names: tuple[str, str] = ("alice", "bob"),
    devices: tuple[bytes, bytes] = (DEV_A, DEV_B),
) -> tuple[X3DHResult, X3DHResult]:
    xa = initiate(
        alice,
        bundle_of(bob, spk, opk),
        me_name=names[0],
        me_device=devices[0],
        them_name=names[1],
        them_device=devices[1],
    )
    xb = respond(
        bob,
        spk,
        opk,
        their_identity_dh=alice.public().dh,
        their_ephemeral=xa.ephemeral,
        me_name=names[1],
        me_device=devices[1],
        them_name=names[0],
        them_device=devices[0],
    )
    return xa, xb


# Prekeys ----------------------------------------------------------------------------------


def test_signed_prekey_signature() -> None:
    keys = account()
    spk = new_signed_prekey(keys, 7, 1_700_000_000)
    ident = keys.public().identity
    assert verify_signed_prekey(ident, 7, spk.public, spk.signature)
    assert not verify_signed_prekey(ident, 8, spk.public, spk.signature)
    assert not verify_signed_prekey(ident, 7, bytes(32), spk.signature)
    assert not verify_signed_prekey(account().public().identity, 7, spk.public, spk.signature)
    # Never raises, whatever it is given.
    for args in [
        (ident[:31], 7, spk.public, spk.signature),
        (ident, 7, spk.public[:31], spk.signature),
        (ident, 7, spk.public, spk.signature[:63]),
        (ident, -1, spk.public, spk.signature),
        (ident, 2**32, spk.public, spk.signature),
        (ident, True, spk.public, spk.signature),
        (b"\xff" * 32, 7, spk.public, spk.signature),
    ]:
        assert verify_signed_prekey(*args) is False  # type: ignore[arg-type]
    # The signature is over the label, so a device signature can never pass as a prekey one.
    assert not verify_signed_prekey(ident, 7, spk.public, keys.identity_private.sign(spk.public))


def test_signed_prekey_fixed_and_serialised() -> None:
    keys = account()
    priv = bytes(range(32))
    spk = new_signed_prekey(keys, 3, 42, private=priv)
    assert spk.public == X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes_raw()
    assert spk.private == priv and spk.key_id == 3 and spk.created_at == 42
    raw = spk.to_bytes()
    assert len(raw) == SIGNED_PREKEY_LEN == 141 and raw[0] == 1
    assert raw[1:5] == (3).to_bytes(4, "big") and raw[5:13] == (42).to_bytes(8, "big")
    assert SignedPrekey.from_bytes(raw) == spk
    assert priv.hex() not in repr(spk)
    for bad in (raw[:-1], raw + b"\x00", b"\x02" + raw[1:], raw[:45] + bytes(32) + raw[77:]):
        with pytest.raises(BadKey):
            SignedPrekey.from_bytes(bad)
    with pytest.raises(ValueError):
        new_signed_prekey(keys, 2**32, 0)
    with pytest.raises(ValueError):
        new_signed_prekey(keys, 1, -1)


def test_one_time_prekeys() -> None:
    opks = new_one_time_prekeys(100, 5)
    assert [k.key_id for k in opks] == [100, 101, 102, 103, 104]
    assert len({k.public for k in opks}) == 5
    for k in opks:
        raw = k.to_bytes()
        assert len(raw) == ONE_TIME_PREKEY_LEN == 69
        assert OneTimePrekey.from_bytes(raw) == k
    fixed = new_one_time_prekeys(0, 2, privates=[bytes(32), bytes([1]) * 32])
    assert fixed == new_one_time_prekeys(0, 2, privates=[bytes(32), bytes([1]) * 32])
    assert new_one_time_prekeys(2**32 - 1, 1)[0].key_id == 2**32 - 1
    assert new_one_time_prekeys(5, 0) == []
    with pytest.raises(ValueError):
        new_one_time_prekeys(2**32 - 1, 2)
    with pytest.raises(ValueError):
        new_one_time_prekeys(0, 2, privates=[bytes(32)])
    raw = opks[0].to_bytes()
    for bad in (raw[:-1], b"\x00" + raw[1:], raw[:37] + opks[1].public):
        with pytest.raises(BadKey):
            OneTimePrekey.from_bytes(bad)


# X3DH -------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_opk", [True, False])
def test_both_sides_agree(with_opk: bool) -> None:
    alice, bob = account(), account()
    spk = new_signed_prekey(bob, 1, 0)
    opk = new_one_time_prekeys(1, 1)[0] if with_opk else None
    xa, xb = agree(alice, bob, spk, opk)
    assert xa.root_key == xb.root_key
    assert xa.header_key_send == xb.next_header_key_recv  # shared_hka
    assert xa.next_header_key_recv == xb.header_key_send  # shared_nhkb
    assert len({xa.root_key, xa.header_key_send, xa.next_header_key_recv}) == 3
    assert xa.associated_data == xb.associated_data
    assert xa.initiator and len(xa.ephemeral) == 32
    assert not xb.initiator and xb.ephemeral == b""
    assert "secret" in repr(xa) and xa.root_key.hex() not in repr(xa)


def test_one_time_prekey_changes_the_keys() -> None:
    alice, bob = account(), account()
    spk = new_signed_prekey(bob, 1, 0)
    opk = new_one_time_prekeys(1, 1)[0]
    eph = bytes([9]) * 32
    with_opk = initiate(
        alice,
        bundle_of(bob, spk, opk),
        me_name="a",
        me_device=DEV_A,
        them_name="b",
        them_device=DEV_B,
        ephemeral_private=eph,
    )
    without = initiate(
        alice,
        bundle_of(bob, spk),
        me_name="a",
        me_device=DEV_A,
        them_name="b",
        them_device=DEV_B,
        ephemeral_private=eph,
    )
    assert with_opk.ephemeral == without.ephemeral
    assert with_opk.root_key != without.root_key
    # A responder that does not use the one-time prekey the initiator used disagrees.
    wrong = respond(
        bob,
        spk,
        None,
        their_identity_dh=alice.public().dh,
        their_ephemeral=with_opk.ephemeral,
        me_name="b",
        me_device=DEV_B,
        them_name="a",
        them_device=DEV_A,
    )
    assert wrong.root_key != with_opk.root_key


def test_bad_signature_or_malformed_bundle_is_refused() -> None:
    alice, bob, mallory = account(), account(), account()
    spk = new_signed_prekey(bob, 1, 0)
    opk = new_one_time_prekeys(1, 1)[0]
    good = bundle_of(bob, spk, opk)
    forged_spk = new_signed_prekey(mallory, 1, 0)  # signed by someone else
    bad_bundles = [
        dataclasses.replace(good, spk_sig=forged_spk.signature),
        dataclasses.replace(good, spk=forged_spk.public),
        dataclasses.replace(good, spk_id=2),
        dataclasses.replace(good, identity=mallory.public().identity),
        dataclasses.replace(good, spk_sig=good.spk_sig[:63]),
        dataclasses.replace(good, identity_dh=good.identity_dh[:31]),
        dataclasses.replace(good, opk=None),  # an id without a key
        dataclasses.replace(good, opk_id=None),  # a key without an id
        dataclasses.replace(good, opk=b"short"),
    ]
    for b in bad_bundles:
        with pytest.raises(BadPrekey):
            initiate(alice, b, me_name="a", me_device=DEV_A, them_name="b", them_device=DEV_B)
    # A low-order identity DH key passes the signature check (it is not signed) but fails DH.
    with pytest.raises(BadPrekey):
        initiate(
            alice,
            dataclasses.replace(good, identity_dh=bytes(32)),
            me_name="a",
            me_device=DEV_A,
            them_name="b",
            them_device=DEV_B,
        )


def test_respond_refuses_malformed_initial_keys() -> None:
    bob = account()
    spk = new_signed_prekey(bob, 1, 0)
    for ik, ek in [(bytes(31), bytes([9]) * 32), (bytes([9]) * 32, bytes(32))]:
        with pytest.raises(DecryptionFailed):
            respond(
                bob,
                spk,
                None,
                their_identity_dh=ik,
                their_ephemeral=ek,
                me_name="b",
                me_device=DEV_B,
                them_name="a",
                them_device=DEV_A,
            )


def test_associated_data_layout_and_binding() -> None:
    alice, bob = account(), account()
    spk = new_signed_prekey(bob, 1, 0)
    xa, _ = agree(alice, bob, spk, None)
    expected = (
        labels.X3DH_AD
        + alice.public().dh
        + bob.public().dh
        + (5).to_bytes(4, "big")
        + b"alice"
        + (16).to_bytes(4, "big")
        + DEV_A
        + (3).to_bytes(4, "big")
        + b"bob"
        + (16).to_bytes(4, "big")
        + DEV_B
    )
    assert xa.associated_data == expected
    ads = {xa.associated_data}
    for names, devices in [
        (("alicf", "bob"), (DEV_A, DEV_B)),
        (("alice", "bob2"), (DEV_A, DEV_B)),
        (("alice", "bob"), (DEV_B, DEV_B)),
        (("alice", "bob"), (DEV_A, DEV_A)),
        (("bob", "alice"), (DEV_A, DEV_B)),
        (("alic", "ebob"), (DEV_A, DEV_B)),  # the length prefixes keep the split unambiguous
    ]:
        x1, x2 = agree(alice, bob, spk, None, names=names, devices=devices)
        assert x1.associated_data == x2.associated_data
        ads.add(x1.associated_data)
    assert len(ads) == 7


def test_names_mismatch_breaks_the_session() -> None:
    # If the two sides disagree on who is who, the first message does not decrypt.
    alice, bob = account(), account()
    spk = new_signed_prekey(bob, 1, 0)
    xa = initiate(
        alice,
        bundle_of(bob, spk),
        me_name="alice",
        me_device=DEV_A,
        them_name="bob",
        them_device=DEV_B,
    )
    xb = respond(
        bob,
        spk,
        None,
        their_identity_dh=alice.public().dh,
        their_ephemeral=xa.ephemeral,
        me_name="bob",
        me_device=DEV_B,
        them_name="mallory",
        them_device=DEV_A,
    )
    a = ratchet.init_initiator(xa, spk.public)
    b = ratchet.init_responder(xb, (spk.private, spk.public))
    a, m = ratchet.encrypt(a, b"hi", xa.associated_data)
    with pytest.raises(DecryptionFailed):
        ratchet.decrypt(b, m, xb.associated_data)


@pytest.mark.parametrize("with_opk", [True, False])
def test_x3dh_then_ratchet(with_opk: bool) -> None:
    alice, bob = account(), account()
    spk = new_signed_prekey(bob, 1, 0)
    opk = new_one_time_prekeys(1, 1)[0] if with_opk else None
    xa, xb = agree(alice, bob, spk, opk)
    a = ratchet.init_initiator(xa, spk.public)
    b = ratchet.init_responder(xb, (spk.private, spk.public))
    a, m = ratchet.encrypt(a, b"first", xa.associated_data)
    b, p = ratchet.decrypt(b, m, xb.associated_data)
    assert p == b"first"
    b, m = ratchet.encrypt(b, b"reply", xb.associated_data)
    a, p = ratchet.decrypt(a, m, xa.associated_data)
    assert p == b"reply"
