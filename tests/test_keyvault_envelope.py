"""The sealed envelope: round trips, tamper resistance, retargeting, padding, size limits."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyvault import (
    BUCKETS,
    MAX_ENVELOPE,
    AccountKeys,
    BadKey,
    DecryptionFailed,
    Letter,
    MessageTooLarge,
    Unverified,
    envelope_size,
    labels,
    max_body_bytes,
    open_envelope,
    seal,
    verify_letter,
)

DEV_A = bytes([0xA1]) * 16
DEV_B = bytes([0xB1]) * 16
DEV_B2 = bytes([0xB2]) * 16
HEADER = 1 + 384 + 12
TAG = 16


@pytest.fixture(scope="module")
def alice() -> AccountKeys:
    return AccountKeys.generate()


@pytest.fixture(scope="module")
def bob() -> AccountKeys:
    return AccountKeys.generate()


@pytest.fixture(scope="module")
def carol() -> AccountKeys:
    return AccountKeys.generate()


def letter(body: str = "hello, bob", **kw: object) -> Letter:
    base = Letter(
        sender="alice",
        sender_device=DEV_A,
        to="bob",
        msg_id=bytes(range(16)),
        sent_at=1_700_000_000_000,
        body=body,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def open_verified(blob: bytes, rcpt: AccountKeys, device: bytes, sender: AccountKeys) -> Letter:
    return verify_letter(open_envelope(blob, rcpt, device), sender.public().identity)


def test_round_trip(alice: AccountKeys, bob: AccountKeys) -> None:
    msg = letter()
    blob = seal(msg, alice, bob.public().enc, DEV_B)
    assert blob[0] == 1
    assert len(blob) == HEADER + BUCKETS[0] + TAG == envelope_size(len(msg.body))
    un = open_envelope(blob, bob, DEV_B)
    assert isinstance(un, Unverified)
    assert un.letter == msg
    assert un.signed.startswith(labels.ENVELOPE_SIGNATURE) and un.signed.endswith(DEV_B)
    assert len(un.signature) == 64
    assert verify_letter(un, alice.public().identity) == msg


def test_round_trip_edge_values(alice: AccountKeys, bob: AccountKeys) -> None:
    for msg in (
        letter(body=""),
        letter(body="\U0001f510 \u00e9\u0301 \x00 nul"),
        letter(sent_at=0),
        letter(sent_at=2**64 - 1),
        letter(sender="", to=""),
    ):
        blob = seal(msg, alice, bob.public().enc, DEV_B)
        assert open_verified(blob, bob, DEV_B, alice) == msg


def test_fresh_key_and_nonce_each_time(alice: AccountKeys, bob: AccountKeys) -> None:
    a = seal(letter(), alice, bob.public().enc, DEV_B)
    b = seal(letter(), alice, bob.public().enc, DEV_B)
    assert a != b
    assert a[1:HEADER] != b[1:HEADER]


def test_fixed_key_and_nonce_are_used(alice: AccountKeys, bob: AccountKeys) -> None:
    kw = {"aes_key": bytes(32), "nonce": bytes(12)}
    a = seal(letter(), alice, bob.public().enc, DEV_B, **kw)
    b = seal(letter(), alice, bob.public().enc, DEV_B, **kw)
    assert a[HEADER - 12 : HEADER] == bytes(12)
    # OAEP is randomised, but the AES-GCM part is then fully determined.
    assert a[1 : 1 + 384] != b[1 : 1 + 384]
    assert a[HEADER - 12 :] == b[HEADER - 12 :]
    assert open_verified(a, bob, DEV_B, alice) == letter()


@pytest.fixture(scope="module")
def sealed(alice: AccountKeys, bob: AccountKeys) -> bytes:
    return seal(letter("x" * 300), alice, bob.public().enc, DEV_B)


def _positions(n: int) -> dict[str, list[int]]:
    return {
        "version": [0],
        "rsa": [1, 2, 100, 200, 384],
        "nonce": [385, 390, 396],
        "ciphertext": [397, 398, 500, n - TAG - 1],
        "tag": [n - TAG, n - 8, n - 1],
    }


@pytest.mark.parametrize("part", ["version", "rsa", "nonce", "ciphertext", "tag"])
def test_every_single_byte_flip_fails(part: str, sealed: bytes, bob: AccountKeys) -> None:
    for pos in _positions(len(sealed))[part]:
        for mask in (0x01, 0x80, 0xFF):
            bad = sealed[:pos] + bytes([sealed[pos] ^ mask]) + sealed[pos + 1 :]
            with pytest.raises(DecryptionFailed):
                open_envelope(bad, bob, DEV_B)
    open_envelope(sealed, bob, DEV_B)  # the original still opens


def test_truncated_or_extended_fails(sealed: bytes, bob: AccountKeys) -> None:
    for bad in (b"", sealed[:1], sealed[:HEADER], sealed[:-1], sealed + b"\x00", sealed * 2):
        with pytest.raises(DecryptionFailed):
            open_envelope(bad, bob, DEV_B)


def test_wrong_account_or_device_fails(sealed: bytes, bob: AccountKeys, carol: AccountKeys) -> None:
    with pytest.raises(DecryptionFailed):
        open_envelope(sealed, carol, DEV_B)
    with pytest.raises(DecryptionFailed):
        open_envelope(sealed, bob, DEV_B2)
    with pytest.raises(DecryptionFailed):
        open_envelope(sealed, bob, DEV_B[:15])


def test_signature_by_another_identity_fails_at_verify(
    alice: AccountKeys, bob: AccountKeys, carol: AccountKeys
) -> None:
    # Carol claims to be alice: the envelope opens, but alice's key does not verify it.
    forged = seal(letter(), carol, bob.public().enc, DEV_B)
    un = open_envelope(forged, bob, DEV_B)
    assert un.letter.sender == "alice"
    with pytest.raises(DecryptionFailed):
        verify_letter(un, alice.public().identity)
    assert verify_letter(un, carol.public().identity) == letter()
    for bad_key in (b"", alice.public().identity[:31], bytes(33)):
        with pytest.raises(DecryptionFailed):
            verify_letter(un, bad_key)


def test_tampered_unverified_fails_at_verify(
    alice: AccountKeys, bob: AccountKeys, sealed: bytes
) -> None:
    un = open_envelope(sealed, bob, DEV_B)
    ident = alice.public().identity
    for bad in (
        dataclasses.replace(un, signed=un.signed[:-1] + b"\x00"),
        dataclasses.replace(un, signature=bytes(64)),
        dataclasses.replace(un, signature=un.signature[:63]),
    ):
        with pytest.raises(DecryptionFailed):
            verify_letter(bad, ident)


def test_signature_binds_recipient_device(alice: AccountKeys, bob: AccountKeys) -> None:
    # Bob re-seals alice's signed inner content to his own device DEV_B2: the signed bytes
    # name DEV_B, so the recomputed signed bytes for DEV_B2 do not verify.
    un = open_envelope(seal(letter(), alice, bob.public().enc, DEV_B), bob, DEV_B)
    retargeted = Unverified(un.letter, un.signed[: -len(DEV_B)] + DEV_B2, un.signature)
    with pytest.raises(DecryptionFailed):
        verify_letter(retargeted, alice.public().identity)


def test_padding_hides_length(alice: AccountKeys, bob: AccountKeys) -> None:
    # With the 256-byte first bucket, 128 bytes go to the length prefix, the fields for
    # "alice" -> "bob" and the signature, so bodies of 0..128 bytes all look alike, and
    # bodies of 129..896 bytes (such as 200) share the next bucket.
    enc = bob.public().enc
    first = {len(seal(letter("a" * n), alice, enc, DEV_B)) for n in (0, 1, 50, 128)}
    assert first == {HEADER + 256 + TAG}
    second = {len(seal(letter("a" * n), alice, enc, DEV_B)) for n in (129, 200, 896)}
    assert second == {HEADER + 1024 + TAG}
    assert len(seal(letter("a" * 897), alice, enc, DEV_B)) == HEADER + 4096 + TAG


def test_bucket_sizes(alice: AccountKeys, bob: AccountKeys) -> None:
    enc = bob.public().enc
    sizes = set()
    for n in (0, 300, 2000, 10000, 30000, max_body_bytes()):
        blob = seal(letter("z" * n), alice, enc, DEV_B)
        assert len(blob) - HEADER - TAG in BUCKETS
        assert len(blob) <= MAX_ENVELOPE
        assert len(blob) == envelope_size(n, len("alice"), len("bob"))
        sizes.add(len(blob))
    assert len(sizes) == len(BUCKETS)


def test_too_large(alice: AccountKeys, bob: AccountKeys) -> None:
    enc = bob.public().enc
    long_names = letter(sender="a" * 128, to="b" * 128)
    # max_body_bytes() fits even with the longest supported names...
    seal(dataclasses.replace(long_names, body="x" * max_body_bytes()), alice, enc, DEV_B)
    with pytest.raises(MessageTooLarge):
        seal(dataclasses.replace(long_names, body="x" * (max_body_bytes() + 1)), alice, enc, DEV_B)
    with pytest.raises(MessageTooLarge):
        seal(letter("x" * 61440), alice, enc, DEV_B)
    with pytest.raises(MessageTooLarge):
        seal(letter("\U0001f510" * (max_body_bytes() // 2)), alice, enc, DEV_B)
    with pytest.raises(MessageTooLarge):
        envelope_size(61440)


def test_seal_rejects_bad_arguments(alice: AccountKeys, bob: AccountKeys) -> None:
    enc = bob.public().enc
    with pytest.raises(BadKey):
        seal(letter(), alice, enc[:-1], DEV_B)
    with pytest.raises(BadKey):
        seal(letter(), alice, b"", DEV_B)
    with pytest.raises(BadKey):
        seal(letter(), alice, enc, DEV_B[:15])
    for bad in (
        letter(sender_device=bytes(15)),
        letter(msg_id=bytes(17)),
        letter(sent_at=-1),
        letter(sent_at=2**64),
    ):
        with pytest.raises(ValueError):
            seal(bad, alice, enc, DEV_B)
    with pytest.raises(ValueError):
        seal(letter(), alice, enc, DEV_B, aes_key=bytes(16))
    with pytest.raises(ValueError):
        seal(letter(), alice, enc, DEV_B, nonce=bytes(8))


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(body=st.text(max_size=3000), sender=st.text(max_size=40), to=st.text(max_size=40))
def test_round_trip_any_text(
    alice: AccountKeys, bob: AccountKeys, body: str, sender: str, to: str
) -> None:
    msg = letter(body=body, sender=sender, to=to)
    try:
        blob = seal(msg, alice, bob.public().enc, DEV_B)
    except UnicodeEncodeError:
        # Lone surrogates cannot be UTF-8; refusing them at seal is the right answer.
        return
    assert len(blob) - HEADER - TAG in BUCKETS
    assert open_verified(blob, bob, DEV_B, alice) == msg
