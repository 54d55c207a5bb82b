"""The letter and the payload: encodings, malformations, and a whole message end to end."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyvault import (
    BUCKETS,
    MAX_NAME_BYTES,
    PAYLOAD_HEADER_MAX,
    AccountKeys,
    DecryptionFailed,
    Letter,
    MessageTooLarge,
    Payload,
    PrekeyBundle,
    PrekeyInit,
    Sealed,
    decode_letter,
    decode_payload,
    encode_letter,
    encode_payload,
    max_body_bytes,
    max_payload_bytes,
    new_one_time_prekeys,
    new_signed_prekey,
    open_envelope,
    ratchet,
    seal,
    verify_sealed,
    x3dh,
)
from keyvault.kem import KemUse, new_kem_key
from keyvault.payload import KemInit
from keyvault.x3dh import KemPrekey

MSG_ID = bytes(range(16))
RATCHET = bytes(range(100))  # opaque here: at least ratchet.OVERHEAD bytes
INIT = PrekeyInit(identity_dh=bytes([1]) * 32, ephemeral=bytes([2]) * 32, spk_id=7, opk_id=42)
CT = bytes([3]) * 1088
PQ_INIT = dataclasses.replace(INIT, kem=KemInit(KemUse.LAST_RESORT, 9, CT))
utf8_text = st.text(st.characters(codec="utf-8"))


def letter(body: str = "hello, bob", **kw: object) -> Letter:
    base = Letter(to="bob", msg_id=MSG_ID, sent_at=1_700_000_000_000, body=body)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def lp(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


# Letter -----------------------------------------------------------------------------------


def test_letter_layout() -> None:
    msg = letter("h\u00e9")
    raw = encode_letter(msg)
    assert raw == b"\x01" + lp(b"bob") + MSG_ID + (1_700_000_000_000).to_bytes(8, "big") + lp(
        "h\u00e9".encode()
    )
    assert decode_letter(raw) == msg


def test_letter_edge_values() -> None:
    for msg in (
        letter(""),
        letter(to=""),
        letter("\U0001f510 \u00e9\u0301 \x00 nul"),
        letter(sent_at=0),
        letter(sent_at=2**64 - 1),
        letter(to="b" * MAX_NAME_BYTES, body="x" * 70000),  # no size limit at this layer
    ):
        assert decode_letter(encode_letter(msg)) == msg


@settings(max_examples=200, deadline=None, database=None)
@given(
    to=utf8_text,
    msg_id=st.binary(min_size=16, max_size=16),
    sent_at=st.integers(0, 2**64 - 1),
    body=utf8_text,
)
def test_letter_round_trip(to: str, msg_id: bytes, sent_at: int, body: str) -> None:
    msg = Letter(to=to, msg_id=msg_id, sent_at=sent_at, body=body)
    assert decode_letter(encode_letter(msg)) == msg


def test_encode_letter_rejects_bad_fields() -> None:
    for bad in (
        letter(msg_id=bytes(15)),
        letter(msg_id=bytes(17)),
        letter(sent_at=-1),
        letter(sent_at=2**64),
        letter(body="\ud800"),
        letter(to="\udfff"),
    ):
        with pytest.raises(ValueError):
            encode_letter(bad)


def _letter_malformations() -> list[bytes]:
    good = encode_letter(letter("body"))
    to_at, body_len_at = 1, 1 + 4 + 3 + 16 + 8
    return [
        b"",
        b"\x00" + good[1:],
        b"\x02" + good[1:],
        good + b"\x00",
        *(good[:n] for n in range(len(good))),
        good[:to_at] + (4).to_bytes(4, "big") + good[to_at + 4 :],  # to swallows a byte
        good[:to_at] + (2**32 - 1).to_bytes(4, "big") + good[to_at + 4 :],
        good[:body_len_at] + (3).to_bytes(4, "big") + good[body_len_at + 4 :],  # trailing
        good[:body_len_at] + (5).to_bytes(4, "big") + good[body_len_at + 4 :],  # overrun
        b"\x01" + lp(b"\xff") + good[8:],  # bad UTF-8 in to
        good[:body_len_at] + lp(b"\xc3\x28\xed\xa0"),  # bad UTF-8 in body
        good[:body_len_at] + lp("\ud800".encode("utf-8", "surrogatepass")),  # surrogate
    ]


@pytest.mark.parametrize("bad", _letter_malformations())
def test_letter_malformations(bad: bytes) -> None:
    with pytest.raises(DecryptionFailed):
        decode_letter(bad)


# Payload ----------------------------------------------------------------------------------


def test_payload_layout() -> None:
    assert PAYLOAD_HEADER_MAX == 74 + 1 + 4 + 1088
    assert encode_payload(Payload(None, RATCHET)) == b"\x01\x00" + RATCHET
    no_opk = dataclasses.replace(INIT, opk_id=None)
    assert (
        encode_payload(Payload(no_opk, RATCHET))
        == b"\x01\x01" + INIT.identity_dh + INIT.ephemeral + (7).to_bytes(4, "big") + RATCHET
    )
    full = encode_payload(Payload(INIT, RATCHET))
    assert full == (
        b"\x01\x03"
        + INIT.identity_dh
        + INIT.ephemeral
        + (7).to_bytes(4, "big")
        + (42).to_bytes(4, "big")
        + RATCHET
    )
    assert len(full) == 74 + len(RATCHET)
    pq = encode_payload(Payload(PQ_INIT, RATCHET))
    assert pq == b"\x01\x07" + full[2:74] + b"\x02" + (9).to_bytes(4, "big") + CT + RATCHET
    assert len(pq) == PAYLOAD_HEADER_MAX + len(RATCHET)
    for p in (Payload(None, RATCHET), Payload(no_opk, RATCHET), Payload(INIT, RATCHET), Payload(PQ_INIT, RATCHET)):
        assert decode_payload(encode_payload(p)) == p


@settings(max_examples=200, deadline=None, database=None)
@given(
    identity_dh=st.binary(min_size=32, max_size=32),
    ephemeral=st.binary(min_size=32, max_size=32),
    spk_id=st.integers(0, 2**32 - 1),
    opk_id=st.none() | st.integers(0, 2**32 - 1),
    with_init=st.booleans(),
    message=st.binary(min_size=ratchet.OVERHEAD, max_size=500),
)
def test_payload_round_trip(
    identity_dh: bytes,
    ephemeral: bytes,
    spk_id: int,
    opk_id: int | None,
    with_init: bool,
    message: bytes,
) -> None:
    init = PrekeyInit(identity_dh, ephemeral, spk_id, opk_id) if with_init else None
    p = Payload(init, message)
    raw = encode_payload(p)
    assert decode_payload(raw) == p
    assert len(raw) <= PAYLOAD_HEADER_MAX + len(message)


def test_encode_payload_rejects_bad_fields() -> None:
    for bad in (
        Payload(None, RATCHET[: ratchet.OVERHEAD - 1]),
        Payload(dataclasses.replace(INIT, identity_dh=bytes(31)), RATCHET),
        Payload(dataclasses.replace(INIT, ephemeral=bytes(33)), RATCHET),
        Payload(dataclasses.replace(INIT, spk_id=-1), RATCHET),
        Payload(dataclasses.replace(INIT, spk_id=2**32), RATCHET),
        Payload(dataclasses.replace(INIT, opk_id=2**32), RATCHET),
        Payload(dataclasses.replace(INIT, opk_id=True), RATCHET),
        Payload(dataclasses.replace(INIT, kem=KemInit(KemUse.ENVELOPE, 9, CT)), RATCHET),
        Payload(dataclasses.replace(INIT, kem=KemInit(KemUse.ONE_TIME, 2**32, CT)), RATCHET),
        Payload(dataclasses.replace(INIT, kem=KemInit(KemUse.ONE_TIME, 1, CT[1:])), RATCHET),
    ):
        with pytest.raises(ValueError):
            encode_payload(bad)


def _payload_malformations() -> list[bytes]:
    full = encode_payload(Payload(INIT, RATCHET))
    plain = encode_payload(Payload(None, RATCHET))
    pq = encode_payload(Payload(PQ_INIT, RATCHET))
    return [
        b"\x01\x05" + pq[2:74] + b"\x03" + pq[75:],  # a KEM init naming an envelope key
        b"\x01\x05" + pq[2:74] + b"\x00" + pq[75:],
        pq[: PAYLOAD_HEADER_MAX + ratchet.OVERHEAD - 1],
        b"\x01\x04" + pq[2:],  # kem without init
        b"",
        b"\x01",
        b"\x00" + plain[1:],
        b"\x02" + plain[1:],
        b"\x01\x02" + plain[2:],  # opk without init
        b"\x01\x08" + plain[2:],  # unknown flag
        b"\x01\x80" + plain[2:],
        b"\x01\x07" + full[2:],
        plain[: 2 + ratchet.OVERHEAD - 1],  # ratchet message too short
        full[: 74 + ratchet.OVERHEAD - 1],
        full[:74],
        full[:40],
    ]


@pytest.mark.parametrize("bad", _payload_malformations())
def test_payload_malformations(bad: bytes) -> None:
    with pytest.raises(DecryptionFailed):
        decode_payload(bad)


# End to end -------------------------------------------------------------------------------


def test_max_body_bytes_value() -> None:
    overhead = 1 + 4 + MAX_NAME_BYTES + 16 + 8 + 4 + 17  # a group letter: id and kind
    assert ratchet.OVERHEAD == 85
    assert max_body_bytes() == (
        max_payload_bytes() - PAYLOAD_HEADER_MAX - ratchet.MAX_OVERHEAD - overhead
    )
    assert (max_payload_bytes(), max_body_bytes()) == (61220, 57518)


@pytest.fixture(scope="module")
def alice() -> AccountKeys:
    return AccountKeys.generate()


@pytest.fixture(scope="module")
def bob() -> AccountKeys:
    return AccountKeys.generate()


def test_end_to_end(alice: AccountKeys, bob: AccountKeys) -> None:
    """X3DH + ratchet + letter + payload + envelope, worst case sizes, both directions."""
    a_name, b_name = "a" * MAX_NAME_BYTES, "b" * MAX_NAME_BYTES
    dev_a, dev_b = bytes([0xA1]) * 16, bytes([0xB1]) * 16
    spk = new_signed_prekey(bob, 7, 1_700_000_000)
    (opk,) = new_one_time_prekeys(42, 1)
    kem = new_kem_key(bob, KemUse.ONE_TIME, 5, 1_700_000_000, device_id=dev_b)
    bpub = bob.public()
    bundle = PrekeyBundle(
        bpub.identity, bpub.dh, spk.key_id, spk.public, spk.signature, 42, opk.public,
        KemPrekey(kem.use, kem.key_id, kem.public, kem.signature),
    )

    # Alice's side.
    xa = x3dh.initiate(
        alice, bundle, me_name=a_name, me_device=dev_a, them_name=b_name, them_device=dev_b
    )
    state_a = ratchet.init_initiator(xa, bundle.spk)
    msg = Letter(to=b_name, msg_id=MSG_ID, sent_at=1_700_000_000_123, body="x" * max_body_bytes(),
                 group=bytes(16))  # the largest letter: a group's text letter
    state_a, message = ratchet.encrypt(state_a, encode_letter(msg), xa.associated_data)
    assert xa.post_quantum
    init = PrekeyInit(alice.public().dh, xa.ephemeral, spk.key_id, opk.key_id,
                      KemInit(KemUse.ONE_TIME, kem.key_id, xa.kem_ciphertext))
    payload = encode_payload(Payload(init, message))
    # The initiator's first chain carries no KEM ciphertext (a version 2 ratchet message):
    # the limit leaves room for one all the same (a body must fit whatever the chain).
    assert len(payload) == max_payload_bytes() - 1088
    blob = seal(Sealed(a_name, dev_a, payload), alice, bpub.enc, dev_b)
    assert len(blob) == 1 + 384 + 12 + BUCKETS[-1] + 16

    # 1,089 bytes more of body do not fit (nor 1,106 in a one-to-one letter).
    _, longer = ratchet.encrypt(
        state_a, encode_letter(dataclasses.replace(msg, body=msg.body + "x" * 1089)), xa.associated_data
    )
    with pytest.raises(MessageTooLarge):
        seal(Sealed(a_name, dev_a, encode_payload(Payload(init, longer))), alice, bpub.enc, dev_b)

    # Bob's side: open, verify against the pinned identity, then X3DH and the ratchet.
    sealed = verify_sealed(open_envelope(blob, bob, dev_b), alice.public().identity)
    assert (sealed.sender, sealed.sender_device) == (a_name, dev_a)
    got = decode_payload(sealed.payload)
    assert got.init is not None and got.init.identity_dh == alice.public().dh  # pinned key
    assert (got.init.spk_id, got.init.opk_id) == (spk.key_id, opk.key_id)
    xb = x3dh.respond(
        bob,
        spk,
        opk,
        their_identity_dh=got.init.identity_dh,
        their_ephemeral=got.init.ephemeral,
        me_name=b_name,
        me_device=dev_b,
        them_name=sealed.sender,
        them_device=sealed.sender_device,
        kem=kem if got.init.kem is not None and got.init.kem.key_id == kem.key_id else None,
        kem_ciphertext=got.init.kem.ciphertext if got.init.kem is not None else None,
    )
    assert xb.post_quantum and xb.root_key == xa.root_key
    state_b = ratchet.init_responder(xb, (spk.private, spk.public))
    state_b, plain = ratchet.decrypt(state_b, got.ratchet, xb.associated_data)
    assert decode_letter(plain) == msg
    assert state_b.established

    # The reply needs no init; it establishes alice's session.
    reply = Letter(to=a_name, msg_id=bytes(16), sent_at=1_700_000_000_456, body="hi alice")
    state_b, message = ratchet.encrypt(state_b, encode_letter(reply), xb.associated_data)
    blob = seal(
        Sealed(b_name, dev_b, encode_payload(Payload(None, message))),
        bob,
        alice.public().enc,
        dev_a,
    )
    sealed = verify_sealed(open_envelope(blob, alice, dev_a), bpub.identity)
    got = decode_payload(sealed.payload)
    assert got.init is None
    state_a, plain = ratchet.decrypt(state_a, got.ratchet, xa.associated_data)
    assert decode_letter(plain) == reply
    assert state_a.established


def test_group_letters_round_trip_and_refuse_malformations() -> None:
    from keyvault.letter import KIND_CHANGES, KIND_TEXT, letter_overhead

    gid = bytes(range(16))
    text = Letter("bob", MSG_ID, 5, "hi all", group=gid, kind=KIND_TEXT)
    changes = Letter("bob", MSG_ID, 5, "", group=gid, kind=KIND_CHANGES, changes=(b"c1", b"change two"))
    for letter in (text, changes):
        raw = encode_letter(letter)
        assert raw[0] == 2 and decode_letter(raw) == letter
        for cut in range(len(raw)):
            with pytest.raises(DecryptionFailed):
                decode_letter(raw[:cut])
        with pytest.raises(DecryptionFailed):
            decode_letter(raw + b"\x00")
    assert len(encode_letter(text)) == letter_overhead(3, group=True) + len("hi all")
    raw = bytearray(encode_letter(text))
    raw[1 + 4 + 3 + 16 + 8 + 16] = 3  # an unknown kind
    with pytest.raises(DecryptionFailed):
        decode_letter(bytes(raw))
    for bad in (
        Letter("bob", MSG_ID, 5, "x", kind=KIND_CHANGES),  # a kind without a group
        Letter("bob", MSG_ID, 5, "x", group=gid, kind=KIND_CHANGES, changes=(b"c",)),  # body too
        Letter("bob", MSG_ID, 5, "", group=gid, kind=KIND_CHANGES),  # no changes
        Letter("bob", MSG_ID, 5, "x", group=gid[:15]),
    ):
        with pytest.raises(ValueError):
            encode_letter(bad)
