"""The sealed envelope: round trips, tamper resistance, retargeting, padding, size limits."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyvault import (
    BUCKETS,
    MAX_ENVELOPE,
    MAX_NAME_BYTES,
    AccountKeys,
    BadKey,
    DecryptionFailed,
    MessageTooLarge,
    Sealed,
    Unverified,
    envelope_size,
    labels,
    max_payload_bytes,
    open_envelope,
    seal,
    verify_sealed,
)

DEV_A = bytes([0xA1]) * 16
DEV_B = bytes([0xB1]) * 16
DEV_B2 = bytes([0xB2]) * 16
HEADER = 1 + 384 + 12
TAG = 16
# Padded bytes that are not payload for sender "alice": u32 len, lp(sender), device,
# u32 payload length, signature.
ALICE_OVERHEAD = 4 + 4 + 5 + 16 + 4 + 64


@pytest.fixture(scope="module")
def alice() -> AccountKeys:
    return AccountKeys.generate()


@pytest.fixture(scope="module")
def bob() -> AccountKeys:
    return AccountKeys.generate()


@pytest.fixture(scope="module")
def carol() -> AccountKeys:
    return AccountKeys.generate()


def sealed_(payload: bytes = b"\x01\x00ratchet message", **kw: object) -> Sealed:
    base = Sealed(sender="alice", sender_device=DEV_A, payload=payload)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def open_verified(blob: bytes, rcpt: AccountKeys, device: bytes, sender: AccountKeys) -> Sealed:
    return verify_sealed(open_envelope(blob, rcpt, device), sender.public().identity)


def test_round_trip(alice: AccountKeys, bob: AccountKeys) -> None:
    msg = sealed_()
    blob = seal(msg, alice, bob.public().enc, DEV_B)
    assert blob[0] == 2
    assert len(blob) == HEADER + BUCKETS[0] + TAG == envelope_size(len(msg.payload))
    un = open_envelope(blob, bob, DEV_B)
    assert isinstance(un, Unverified)
    assert un.sealed == msg
    assert un.signed.startswith(labels.ENVELOPE_SIGNATURE) and un.signed.endswith(DEV_B)
    assert len(un.signature) == 64
    assert verify_sealed(un, alice.public().identity) == msg


def test_round_trip_edge_values(alice: AccountKeys, bob: AccountKeys) -> None:
    for msg in (
        sealed_(b""),
        sealed_(bytes(range(256))),
        sealed_(sender="\U0001f510 \u00e9\u0301 \x00 nul"),
        sealed_(sender=""),
        sealed_(sender="a" * MAX_NAME_BYTES),
    ):
        blob = seal(msg, alice, bob.public().enc, DEV_B)
        assert open_verified(blob, bob, DEV_B, alice) == msg


def test_fresh_key_and_nonce_each_time(alice: AccountKeys, bob: AccountKeys) -> None:
    a = seal(sealed_(), alice, bob.public().enc, DEV_B)
    b = seal(sealed_(), alice, bob.public().enc, DEV_B)
    assert a != b
    assert a[1:HEADER] != b[1:HEADER]


def test_fixed_key_and_nonce_are_used(alice: AccountKeys, bob: AccountKeys) -> None:
    kw = {"aes_key": bytes(32), "nonce": bytes(12)}
    a = seal(sealed_(), alice, bob.public().enc, DEV_B, **kw)
    b = seal(sealed_(), alice, bob.public().enc, DEV_B, **kw)
    assert a[HEADER - 12 : HEADER] == bytes(12)
    # OAEP is randomised, but the AES-GCM part is then fully determined.
    assert a[1 : 1 + 384] != b[1 : 1 + 384]
    assert a[HEADER - 12 :] == b[HEADER - 12 :]
    assert open_verified(a, bob, DEV_B, alice) == sealed_()


@pytest.fixture(scope="module")
def blob300(alice: AccountKeys, bob: AccountKeys) -> bytes:
    return seal(sealed_(b"x" * 300), alice, bob.public().enc, DEV_B)


def _positions(n: int) -> dict[str, list[int]]:
    return {
        "version": [0],
        "rsa": [1, 2, 100, 200, 384],
        "nonce": [385, 390, 396],
        "ciphertext": [397, 398, 500, n - TAG - 1],
        "tag": [n - TAG, n - 8, n - 1],
    }


@pytest.mark.parametrize("part", ["version", "rsa", "nonce", "ciphertext", "tag"])
def test_every_single_byte_flip_fails(part: str, blob300: bytes, bob: AccountKeys) -> None:
    for pos in _positions(len(blob300))[part]:
        for mask in (0x01, 0x80, 0xFF):
            bad = blob300[:pos] + bytes([blob300[pos] ^ mask]) + blob300[pos + 1 :]
            with pytest.raises(DecryptionFailed):
                open_envelope(bad, bob, DEV_B)
    open_envelope(blob300, bob, DEV_B)  # the original still opens


def test_version_1_is_refused(blob300: bytes, bob: AccountKeys) -> None:
    with pytest.raises(DecryptionFailed):
        open_envelope(b"\x01" + blob300[1:], bob, DEV_B)


def test_truncated_or_extended_fails(blob300: bytes, bob: AccountKeys) -> None:
    for bad in (b"", blob300[:1], blob300[:HEADER], blob300[:-1], blob300 + b"\x00", blob300 * 2):
        with pytest.raises(DecryptionFailed):
            open_envelope(bad, bob, DEV_B)


def test_wrong_account_or_device_fails(
    blob300: bytes, bob: AccountKeys, carol: AccountKeys
) -> None:
    with pytest.raises(DecryptionFailed):
        open_envelope(blob300, carol, DEV_B)
    with pytest.raises(DecryptionFailed):
        open_envelope(blob300, bob, DEV_B2)
    with pytest.raises(DecryptionFailed):
        open_envelope(blob300, bob, DEV_B[:15])


def test_signature_by_another_identity_fails_at_verify(
    alice: AccountKeys, bob: AccountKeys, carol: AccountKeys
) -> None:
    # Carol claims to be alice: the envelope opens, but alice's key does not verify it.
    forged = seal(sealed_(), carol, bob.public().enc, DEV_B)
    un = open_envelope(forged, bob, DEV_B)
    assert un.sealed.sender == "alice"
    with pytest.raises(DecryptionFailed):
        verify_sealed(un, alice.public().identity)
    assert verify_sealed(un, carol.public().identity) == sealed_()
    for bad_key in (b"", alice.public().identity[:31], bytes(33)):
        with pytest.raises(DecryptionFailed):
            verify_sealed(un, bad_key)


def test_tampered_unverified_fails_at_verify(
    alice: AccountKeys, bob: AccountKeys, blob300: bytes
) -> None:
    un = open_envelope(blob300, bob, DEV_B)
    ident = alice.public().identity
    for bad in (
        dataclasses.replace(un, signed=un.signed[:-1] + b"\x00"),
        dataclasses.replace(un, signature=bytes(64)),
        dataclasses.replace(un, signature=un.signature[:63]),
    ):
        with pytest.raises(DecryptionFailed):
            verify_sealed(bad, ident)


def test_signature_binds_recipient_device(alice: AccountKeys, bob: AccountKeys) -> None:
    # Bob re-seals alice's signed inner content to his own device DEV_B2: the signed bytes
    # name DEV_B, so the recomputed signed bytes for DEV_B2 do not verify.
    un = open_envelope(seal(sealed_(), alice, bob.public().enc, DEV_B), bob, DEV_B)
    retargeted = Unverified(un.sealed, un.signed[: -len(DEV_B)] + DEV_B2, un.signature)
    with pytest.raises(DecryptionFailed):
        verify_sealed(retargeted, alice.public().identity)


def test_padding_hides_length(alice: AccountKeys, bob: AccountKeys) -> None:
    # With the 256-byte first bucket, 97 bytes go to the length prefix, the fields for
    # "alice" and the signature, so payloads of 0..159 bytes all look alike, and payloads
    # of 160..927 bytes share the next bucket.
    enc = bob.public().enc
    first_max = 256 - ALICE_OVERHEAD
    second_max = 1024 - ALICE_OVERHEAD
    assert (first_max, second_max) == (159, 927)
    first = {len(seal(sealed_(b"a" * n), alice, enc, DEV_B)) for n in (0, 1, 85, first_max)}
    assert first == {HEADER + 256 + TAG}
    second = {
        len(seal(sealed_(b"a" * n), alice, enc, DEV_B)) for n in (first_max + 1, 500, second_max)
    }
    assert second == {HEADER + 1024 + TAG}
    assert len(seal(sealed_(b"a" * (second_max + 1)), alice, enc, DEV_B)) == HEADER + 4096 + TAG


def test_bucket_sizes(alice: AccountKeys, bob: AccountKeys) -> None:
    enc = bob.public().enc
    sizes = set()
    for n in (0, 300, 2000, 10000, 30000, max_payload_bytes()):
        blob = seal(sealed_(b"z" * n), alice, enc, DEV_B)
        assert len(blob) - HEADER - TAG in BUCKETS
        assert len(blob) <= MAX_ENVELOPE
        assert len(blob) == envelope_size(n, len("alice"))
        sizes.add(len(blob))
    assert len(sizes) == len(BUCKETS)


def test_max_payload_bytes_fits_exactly(alice: AccountKeys, bob: AccountKeys) -> None:
    enc = bob.public().enc
    long_name = sealed_(sender="a" * MAX_NAME_BYTES)
    assert max_payload_bytes() == BUCKETS[-1] - (4 + 4 + MAX_NAME_BYTES + 16 + 4 + 64) == 61220
    blob = seal(
        dataclasses.replace(long_name, payload=bytes(max_payload_bytes())), alice, enc, DEV_B
    )
    assert len(blob) == HEADER + BUCKETS[-1] + TAG
    assert open_verified(blob, bob, DEV_B, alice).payload == bytes(max_payload_bytes())
    too_big = dataclasses.replace(long_name, payload=bytes(max_payload_bytes() + 1))
    with pytest.raises(MessageTooLarge):
        seal(too_big, alice, enc, DEV_B)


def test_too_large(alice: AccountKeys, bob: AccountKeys) -> None:
    enc = bob.public().enc
    with pytest.raises(MessageTooLarge):
        seal(sealed_(bytes(61440)), alice, enc, DEV_B)
    with pytest.raises(MessageTooLarge):
        envelope_size(61440)
    with pytest.raises(MessageTooLarge):
        envelope_size(max_payload_bytes() + 1, MAX_NAME_BYTES)


def test_seal_rejects_bad_arguments(alice: AccountKeys, bob: AccountKeys) -> None:
    enc = bob.public().enc
    with pytest.raises(BadKey):
        seal(sealed_(), alice, enc[:-1], DEV_B)
    with pytest.raises(BadKey):
        seal(sealed_(), alice, b"", DEV_B)
    with pytest.raises(BadKey):
        seal(sealed_(), alice, enc, DEV_B[:15])
    for bad in (sealed_(sender_device=bytes(15)), sealed_(sender_device=bytes(17))):
        with pytest.raises(ValueError):
            seal(bad, alice, enc, DEV_B)
    with pytest.raises(ValueError):
        seal(sealed_(), alice, enc, DEV_B, aes_key=bytes(16))
    with pytest.raises(ValueError):
        seal(sealed_(), alice, enc, DEV_B, nonce=bytes(8))
    with pytest.raises(UnicodeEncodeError):
        seal(sealed_(sender="\ud800"), alice, enc, DEV_B)


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(payload=st.binary(max_size=3000), sender=st.text(max_size=40))
def test_round_trip_any_payload(
    alice: AccountKeys, bob: AccountKeys, payload: bytes, sender: str
) -> None:
    msg = sealed_(payload, sender=sender)
    try:
        blob = seal(msg, alice, bob.public().enc, DEV_B)
    except UnicodeEncodeError:
        # Lone surrogates cannot be UTF-8; refusing them at seal is the right answer.
        return
    assert len(blob) - HEADER - TAG in BUCKETS
    assert len(blob) == envelope_size(len(payload), len(sender.encode()))
    assert open_verified(blob, bob, DEV_B, alice) == msg
