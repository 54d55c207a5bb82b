"""Post-quantum keyvault pieces: PQXDH (keyvault/x3dh.py) and the hybrid envelope
(keyvault/envelope.py, version 3): round trips, and that breaking one half opens nothing."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyvault import labels, ratchet, x3dh
from keyvault.envelope import (
    BUCKETS,
    HYBRID_HEADER_LEN,
    Sealed,
    envelope_key_id,
    envelope_size,
    open_envelope,
    seal,
    seal_hybrid,
    verify_sealed,
)
from keyvault.errors import BadKey, BadPrekey, DecryptionFailed
from keyvault.kem import KemKey, KemUse, new_kem_key
from keyvault.keys import AccountKeys
from keyvault.letter import Letter, encode_letter, letter_overhead, max_body_bytes
from keyvault.payload import PAYLOAD_HEADER_MAX, KemInit, Payload, PrekeyInit, encode_payload
from keyvault.prekeys import new_one_time_prekeys, new_signed_prekey
from keyvault.x3dh import KemPrekey, PrekeyBundle

DEV_A, DEV_B = bytes([0xA1]) * 16, bytes([0xB1]) * 16
DEV_B2 = bytes([0xB2]) * 16  # bob's other device
SEALED = Sealed("alice", DEV_A, b"\x01\x00" + b"r" * 100)
_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


@pytest.fixture(scope="module")
def alice() -> AccountKeys:
    return AccountKeys.generate()


@pytest.fixture(scope="module")
def bob() -> AccountKeys:
    return AccountKeys.generate()


@pytest.fixture(scope="module")
def bob_envelope_key(bob: AccountKeys) -> KemKey:
    return new_kem_key(bob, KemUse.ENVELOPE, 3, 0, device_id=DEV_B)


# The hybrid envelope ------------------------------------------------------------------------


def test_a_hybrid_envelope_opens_with_both_keys_and_says_so(alice: AccountKeys, bob: AccountKeys,
                                                            bob_envelope_key: KemKey) -> None:
    k = bob_envelope_key
    blob = seal_hybrid(SEALED, alice, bob.public().enc, DEV_B, k.public, k.key_id)
    assert blob[0] == 3 and envelope_key_id(blob) == 3
    assert len(blob) == HYBRID_HEADER_LEN + BUCKETS[0] + 16 == envelope_size(len(SEALED.payload), 5, hybrid=True)
    opened = open_envelope(blob, bob, DEV_B, k)
    assert opened.post_quantum
    assert verify_sealed(opened, alice.public().identity) == SEALED
    # Version 2 still opens (mail from before), and says it is not post-quantum.
    old = open_envelope(seal(SEALED, alice, bob.public().enc, DEV_B), bob, DEV_B, k)
    assert not old.post_quantum and verify_sealed(old, alice.public().identity) == SEALED
    assert envelope_key_id(seal(SEALED, alice, bob.public().enc, DEV_B)) is None


def test_the_rsa_key_alone_opens_nothing(alice: AccountKeys, bob: AccountKeys, bob_envelope_key: KemKey) -> None:
    """An attacker with every RSA key (and the right device, and any other KEM key) but not
    the device's envelope KEM key: no key, no open, and the content key cannot be had from
    the RSA secret alone."""
    k = bob_envelope_key
    blob = seal_hybrid(SEALED, alice, bob.public().enc, DEV_B, k.public, k.key_id)
    with pytest.raises(DecryptionFailed):
        open_envelope(blob, bob, DEV_B)  # no KEM key at all
    impostor = dataclasses.replace(new_kem_key(bob, KemUse.ENVELOPE, 3, 0, device_id=DEV_B), key_id=3)
    with pytest.raises(DecryptionFailed):
        open_envelope(blob, bob, DEV_B, impostor)
    # By hand: the RSA secret, and the AES key as if the KEM secret were anything else.
    rsa_secret = bob.rsa_private.decrypt(blob[1:385], _OAEP)
    nonce = blob[HYBRID_HEADER_LEN - 12 : HYBRID_HEADER_LEN]
    aad = labels.ENVELOPE_AAD + b"\x03" + DEV_B
    for guess in (rsa_secret, bytes(32)):
        with pytest.raises(InvalidTag):
            AESGCM(guess).decrypt(nonce, blob[HYBRID_HEADER_LEN:], aad)


def test_the_kem_key_alone_opens_nothing(alice: AccountKeys, bob: AccountKeys, bob_envelope_key: KemKey) -> None:
    """An attacker with the device's envelope KEM key but not the account's RSA key."""
    k = bob_envelope_key
    blob = seal_hybrid(SEALED, alice, bob.public().enc, DEV_B, k.public, k.key_id)
    with pytest.raises(DecryptionFailed):
        open_envelope(blob, alice, DEV_B, k)  # another account's RSA key, the right KEM key
    kem_secret = k.decapsulate(blob[389:1477])
    info = labels.ENVELOPE_HYBRID + hashlib.sha256(blob[:1477]).digest()
    for rsa_guess in (bytes(32), kem_secret):
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=bytes(32), info=info).derive(rsa_guess + kem_secret)
        with pytest.raises(InvalidTag):
            AESGCM(key).decrypt(blob[1477:1489], blob[1489:], labels.ENVELOPE_AAD + b"\x03" + DEV_B)


def test_the_content_key_is_the_documented_combination(alice: AccountKeys, bob: AccountKeys,
                                                       bob_envelope_key: KemKey) -> None:
    k = bob_envelope_key
    blob = seal_hybrid(SEALED, alice, bob.public().enc, DEV_B, k.public, k.key_id)
    rsa_secret = bob.rsa_private.decrypt(blob[1:385], _OAEP)
    kem_secret = k.decapsulate(blob[389:1477])
    info = labels.ENVELOPE_HYBRID + hashlib.sha256(blob[:1477]).digest()
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=bytes(32), info=info).derive(rsa_secret + kem_secret)
    padded = AESGCM(key).decrypt(blob[1477:1489], blob[1489:], labels.ENVELOPE_AAD + b"\x03" + DEV_B)
    assert len(padded) == BUCKETS[0] and SEALED.payload in padded


def test_every_header_byte_is_bound(alice: AccountKeys, bob: AccountKeys, bob_envelope_key: KemKey) -> None:
    k = bob_envelope_key
    blob = seal_hybrid(SEALED, alice, bob.public().enc, DEV_B, k.public, k.key_id)
    for at in (0, 1, 200, 385, 388, 389, 1000, 1476, 1477, 1488, 1489, len(blob) - 1):
        bad = bytearray(blob)
        bad[at] ^= 0x01
        with pytest.raises(DecryptionFailed):
            open_envelope(bytes(bad), bob, DEV_B, k)
    with pytest.raises(DecryptionFailed):
        open_envelope(blob, bob, bytes([0xB2]) * 16, k)  # another device of bob's
    with pytest.raises(DecryptionFailed):
        open_envelope(blob[:-1], bob, DEV_B, k)
    other_use = dataclasses.replace(k, use=KemUse.LAST_RESORT)
    with pytest.raises(DecryptionFailed):
        open_envelope(blob, bob, DEV_B, other_use)


def test_a_bad_envelope_key_is_refused_before_sealing(alice: AccountKeys, bob: AccountKeys) -> None:
    with pytest.raises(BadKey):
        seal_hybrid(SEALED, alice, bob.public().enc, DEV_B, b"\xff" * 1184, 1)
    envelope = new_kem_key(bob, KemUse.ENVELOPE, 1, 0, device_id=DEV_B)
    with pytest.raises(ValueError):
        seal_hybrid(SEALED, alice, bob.public().enc, DEV_B, envelope.public, -1)


# PQXDH ---------------------------------------------------------------------------------------


def _bundle(bob: AccountKeys, kem: KemKey | None, with_opk: bool = True) -> tuple[PrekeyBundle, object, object]:
    spk = new_signed_prekey(bob, 7, 0)
    opk = new_one_time_prekeys(42, 1)[0] if with_opk else None
    pub = bob.public()
    bundle = PrekeyBundle(
        pub.identity, pub.dh, spk.key_id, spk.public, spk.signature,
        opk.key_id if opk else None, opk.public if opk else None,
        None if kem is None else KemPrekey(kem.use, kem.key_id, kem.public, kem.signature),
    )
    return bundle, spk, opk


def _agree(alice: AccountKeys, bob: AccountKeys, kem: KemKey | None, *, responder_kem: KemKey | None = None,
           with_opk: bool = True) -> tuple[x3dh.X3DHResult, x3dh.X3DHResult]:
    bundle, spk, opk = _bundle(bob, kem, with_opk)
    xa = x3dh.initiate(alice, bundle, me_name="alice", me_device=DEV_A, them_name="bob", them_device=DEV_B)
    rk = responder_kem if responder_kem is not None else kem
    xb = x3dh.respond(
        bob, spk, opk, their_identity_dh=alice.public().dh, their_ephemeral=xa.ephemeral,  # type: ignore[arg-type]
        me_name="bob", me_device=DEV_B, them_name="alice", them_device=DEV_A,
        kem=rk, kem_ciphertext=xa.kem_ciphertext if rk is not None else None,
    )
    return xa, xb


@pytest.mark.parametrize("use", [KemUse.ONE_TIME, KemUse.LAST_RESORT])
@pytest.mark.parametrize("with_opk", [True, False])
def test_pqxdh_agrees(alice: AccountKeys, bob: AccountKeys, use: KemUse, with_opk: bool) -> None:
    kem = new_kem_key(bob, use, 5, 0, device_id=DEV_B)
    xa, xb = _agree(alice, bob, kem, with_opk=with_opk)
    assert xa.post_quantum and xb.post_quantum and len(xa.kem_ciphertext) == 1088
    assert (xa.root_key, xa.header_key_send, xa.next_header_key_recv) == (
        xb.root_key, xb.next_header_key_recv, xb.header_key_send)


def test_without_a_kem_prekey_it_is_plain_x3dh(alice: AccountKeys, bob: AccountKeys) -> None:
    xa, xb = _agree(alice, bob, None)
    assert not xa.post_quantum and not xb.post_quantum and xa.kem_ciphertext == b""
    assert xa.root_key == xb.root_key


def test_the_x25519_keys_alone_do_not_give_the_session(alice: AccountKeys, bob: AccountKeys) -> None:
    """A responder (or an attacker holding every X25519 private key of both sides) without
    the KEM key that was used derives another session: the KEM secret is in SK."""
    kem = new_kem_key(bob, KemUse.ONE_TIME, 5, 0, device_id=DEV_B)
    xa, xb = _agree(alice, bob, kem, responder_kem=new_kem_key(bob, KemUse.ONE_TIME, 5, 0, device_id=DEV_B))
    assert xb.post_quantum and xa.root_key != xb.root_key
    assert xa.header_key_send != xb.next_header_key_recv


def test_a_forged_or_misused_kem_prekey_is_refused(alice: AccountKeys, bob: AccountKeys) -> None:
    kem = new_kem_key(bob, KemUse.ONE_TIME, 5, 0, device_id=DEV_B)
    bundle, _, _ = _bundle(bob, kem)
    assert bundle.kem is not None
    forged = [
        dataclasses.replace(bundle, kem=dataclasses.replace(bundle.kem, key_id=6)),
        dataclasses.replace(bundle, kem=dataclasses.replace(bundle.kem, use=KemUse.LAST_RESORT)),
        dataclasses.replace(bundle, kem=dataclasses.replace(bundle.kem, signature=bytes(64))),
        dataclasses.replace(bundle, kem=dataclasses.replace(
            bundle.kem, public=new_kem_key(bob, KemUse.ONE_TIME, 5, 0, device_id=DEV_B).public)),
    ]
    envelope = new_kem_key(bob, KemUse.ENVELOPE, 5, 0, device_id=DEV_B)  # signed, but for envelopes
    forged.append(dataclasses.replace(bundle, kem=KemPrekey(KemUse.ENVELOPE, 5, envelope.public, envelope.signature)))
    other = new_kem_key(AccountKeys.generate(), KemUse.ONE_TIME, 5, 0, device_id=DEV_B)  # someone else's
    forged.append(dataclasses.replace(bundle, kem=KemPrekey(other.use, 5, other.public, other.signature)))
    for b in forged:
        with pytest.raises(BadPrekey):
            x3dh.initiate(alice, b, me_name="alice", me_device=DEV_A, them_name="bob", them_device=DEV_B)


@pytest.mark.parametrize("use", [KemUse.ONE_TIME, KemUse.LAST_RESORT])
def test_a_kem_prekey_signed_for_another_device_is_refused(alice: AccountKeys, bob: AccountKeys,
                                                           use: KemUse) -> None:
    """The signature binds the device: bob's key for his other device (or for a device of
    alice's), presented in a bundle for DEV_B, is refused; for DEV_B2 it is fine."""
    for_b2 = new_kem_key(bob, use, 5, 0, device_id=DEV_B2)
    bundle, _, _ = _bundle(bob, for_b2)
    with pytest.raises(BadPrekey):
        x3dh.initiate(alice, bundle, me_name="alice", me_device=DEV_A, them_name="bob", them_device=DEV_B)
    xa = x3dh.initiate(alice, bundle, me_name="alice", me_device=DEV_A, them_name="bob", them_device=DEV_B2)
    assert xa.post_quantum
    for_a = new_kem_key(bob, use, 5, 0, device_id=DEV_A)
    bundle, _, _ = _bundle(bob, for_a)
    with pytest.raises(BadPrekey):
        x3dh.initiate(alice, bundle, me_name="alice", me_device=DEV_A, them_name="bob", them_device=DEV_B)
    # Without the KEM prekey the same bundle is plain X3DH.
    plain = dataclasses.replace(bundle, kem=None)
    assert not x3dh.initiate(alice, plain, me_name="alice", me_device=DEV_A, them_name="bob",
                             them_device=DEV_B).post_quantum


def test_a_malformed_kem_ciphertext_fails_cleanly(alice: AccountKeys, bob: AccountKeys) -> None:
    kem = new_kem_key(bob, KemUse.ONE_TIME, 5, 0, device_id=DEV_B)
    bundle, spk, opk = _bundle(bob, kem)
    xa = x3dh.initiate(alice, bundle, me_name="alice", me_device=DEV_A, them_name="bob", them_device=DEV_B)
    with pytest.raises(DecryptionFailed):
        x3dh.respond(bob, spk, opk, their_identity_dh=alice.public().dh, their_ephemeral=xa.ephemeral,  # type: ignore[arg-type]
                     me_name="bob", me_device=DEV_B, them_name="alice", them_device=DEV_A,
                     kem=kem, kem_ciphertext=xa.kem_ciphertext[:-1])
    with pytest.raises(ValueError):
        x3dh.respond(bob, spk, opk, their_identity_dh=alice.public().dh, their_ephemeral=xa.ephemeral,  # type: ignore[arg-type]
                     me_name="bob", me_device=DEV_B, them_name="alice", them_device=DEV_A, kem=kem)


# What the envelope's size shows in a post-quantum session (PROTOCOL 19.3) -------------------


def test_in_a_pq_session_the_size_shows_neither_a_kem_step_nor_usually_a_first_message(
        alice: AccountKeys, bob: AccountKeys) -> None:
    """Real messages of a PQXDH session, sealed as version 3: every short text is a
    5,601-byte envelope whether it is a first message (init with PQXDH's part), starts a
    chain (a KEM step) or follows in one (the same ciphertext again). A first message is
    77 bytes longer than a later one, so only a body within 77 bytes of a bucket's edge
    goes one bucket up (the relay saw the claim of a bundle before it anyway)."""
    kem = new_kem_key(bob, KemUse.ONE_TIME, 5, 0, device_id=DEV_B)
    envelope = new_kem_key(bob, KemUse.ENVELOPE, 6, 0, device_id=DEV_B)
    bundle, spk, opk = _bundle(bob, kem)
    xa = x3dh.initiate(alice, bundle, me_name="alice", me_device=DEV_A, them_name="bob", them_device=DEV_B)
    xb = x3dh.respond(bob, spk, opk, their_identity_dh=alice.public().dh, their_ephemeral=xa.ephemeral,  # type: ignore[arg-type]
                      me_name="bob", me_device=DEV_B, them_name="alice", them_device=DEV_A,
                      kem=kem, kem_ciphertext=xa.kem_ciphertext)
    a = ratchet.init_initiator(xa, spk.public)  # type: ignore[attr-defined]
    b = ratchet.init_responder(xb, (spk.private, spk.public))  # type: ignore[attr-defined]
    init = PrekeyInit(alice.public().dh, xa.ephemeral, spk.key_id, opk.key_id,  # type: ignore[attr-defined]
                      KemInit(KemUse.ONE_TIME, kem.key_id, xa.kem_ciphertext))
    ad = xa.associated_data

    def text(to: str, body: str) -> bytes:
        return encode_letter(Letter(to, bytes(16), 0, body))

    def sealed_len(sender: AccountKeys, name: str, device: bytes, p: Payload) -> int:
        blob = seal_hybrid(Sealed(name, device, encode_payload(p)), sender, bob.public().enc, DEV_B,
                           envelope.public, envelope.key_id)
        return len(blob)

    a, first = ratchet.encrypt(a, text("bob", "hi"), ad)
    b, _ = ratchet.decrypt(b, first, ad)
    b, step = ratchet.encrypt(b, text("alice", "hi"), ad)  # a new chain: DH and KEM step
    b, same_chain = ratchet.encrypt(b, text("alice", "hi"), ad)  # no step: the chain's CT again
    a, _ = ratchet.decrypt(a, step, ad)
    a, next_step = ratchet.encrypt(a, text("bob", "hi"), ad)
    assert (first[0], step[0], same_chain[0], next_step[0]) == (2, 3, 3, 3)
    # A KEM step is invisible: the bytes are as long with and without one.
    assert len(step) == len(same_chain) and len(next_step) == len(step) - len("alice") + len("bob")
    first_payload = encode_payload(Payload(init, first))
    later_payload = encode_payload(Payload(None, next_step))
    assert len(first_payload) - len(later_payload) == 77
    sizes = {sealed_len(alice, "alice", DEV_A, Payload(init, first)),
             sealed_len(alice, "alice", DEV_A, Payload(None, next_step)),
             sealed_len(bob, "bob", DEV_A, Payload(None, step)),
             sealed_len(bob, "bob", DEV_A, Payload(None, same_chain))}
    assert sizes == {HYBRID_HEADER_LEN + BUCKETS[2] + 16} == {5601}
    # The edge: alice to bob, a later message holds up to 1,604 bytes of body in the 4,096
    # bucket, a first message 1,527; between them a first message goes to 16,384.
    later_need = envelope_size(len(later_payload) - 2 + 1604, 5, hybrid=True)
    assert later_need == 5601 == envelope_size(len(first_payload) - 2 + 1527, 5, hybrid=True)
    assert envelope_size(len(later_payload) - 2 + 1605, 5, hybrid=True) == 17889
    assert envelope_size(len(first_payload) - 2 + 1528, 5, hybrid=True) == 17889
    # The largest: 57,518 bytes of body, 128-byte names, a full init and a version 3 message
    # (more than any real message has) fill the largest bucket; an envelope is 62,945 bytes.
    worst = PAYLOAD_HEADER_MAX + ratchet.MAX_OVERHEAD + letter_overhead(128, group=True) + max_body_bytes()
    assert envelope_size(worst, 128, hybrid=True) == HYBRID_HEADER_LEN + BUCKETS[-1] + 16 == 62945
    assert max_body_bytes() == 57518
