"""The Double Ratchet with header encryption: behaviour, limits, forward secrecy.

Property tests are in test_keyvault_ratchet_props.py, known answers in
test_keyvault_ratchet_vectors.py. The helpers here build sessions without RSA keys (the
ratchet needs only an X3DH result), so they are cheap enough for hypothesis.
"""

from __future__ import annotations

import secrets

import pytest

from keyvault import ratchet
from keyvault.errors import (
    BadKey,
    BadPrekey,
    DecryptionFailed,
    DuplicateMessage,
    KeyvaultError,
    TooManySkipped,
)
from keyvault.prekeys import x25519_pair
from keyvault.ratchet import (
    MAX_SKIP,
    MAX_STORED_SKIPPED,
    RatchetState,
    decrypt,
    encrypt,
    init_initiator,
    init_responder,
)
from keyvault.x3dh import X3DHResult

AD = b"veil/test/ad"


def results(
    root: bytes | None = None, hka: bytes | None = None, nhkb: bytes | None = None
) -> tuple[X3DHResult, X3DHResult]:
    """Return (initiator, responder) X3DH results as both sides would derive them."""
    root = root or secrets.token_bytes(32)
    hka = hka or secrets.token_bytes(32)
    nhkb = nhkb or secrets.token_bytes(32)
    alice = X3DHResult(root, hka, nhkb, AD, ephemeral=secrets.token_bytes(32))
    bob = X3DHResult(root, nhkb, hka, AD, ephemeral=b"")
    return alice, bob


def session() -> tuple[RatchetState, RatchetState]:
    """Return fresh (alice, bob) ratchet states of one session."""
    xa, xb = results()
    spk_private, spk_public = x25519_pair()
    return init_initiator(xa, spk_public), init_responder(xb, (spk_private, spk_public))


def send(state: RatchetState, text: bytes) -> tuple[RatchetState, bytes]:
    return encrypt(state, text, AD)


def recv(state: RatchetState, message: bytes) -> tuple[RatchetState, bytes]:
    return decrypt(state, message, AD)


def established() -> tuple[RatchetState, RatchetState]:
    """A session where both sides have sent and received (so both have ratcheted)."""
    a, b = session()
    a, m = send(a, b"hello")
    b, _ = recv(b, m)
    b, m = send(b, b"hi")
    a, _ = recv(a, m)
    return a, b


def test_round_trip_both_directions() -> None:
    a, b = session()
    assert not b.can_send and not b.established and not a.established
    for i in range(5):
        a, m = send(a, b"a%d" % i)
        b, p = recv(b, m)
        assert p == b"a%d" % i
        b, m = send(b, b"b%d" % i)
        a, p = recv(a, m)
        assert p == b"b%d" % i
    assert a.established and b.established


def test_message_layout() -> None:
    a, _ = session()
    a, m = send(a, b"x" * 10)
    assert len(m) == ratchet.OVERHEAD + 10 == 1 + 68 + 16 + 10
    assert m[0] == ratchet.VERSION
    # The header is unreadable without the header key: no ratchet key or counter shows.
    assert a.dhs_public not in m


def test_responder_cannot_send_first() -> None:
    _, b = session()
    with pytest.raises(KeyvaultError):
        send(b, b"too early")


def test_inputs_never_mutated() -> None:
    a, b = session()
    before_a = a.to_bytes()
    a2, m = send(a, b"one")
    assert a.to_bytes() == before_a
    before_b = b.to_bytes()
    b2, _ = recv(b, m)
    assert b.to_bytes() == before_b
    # Decrypting from the old state again works (the caller did not commit).
    assert recv(b, m)[1] == b"one"
    assert a2.to_bytes() != before_a and b2.to_bytes() != before_b


def test_encrypt_is_deterministic_given_the_state() -> None:
    # Re-encrypting from an uncommitted state gives the same bytes (same one-use key):
    # the caller must commit the state before a message leaves the device.
    a, _ = session()
    assert send(a, b"same")[1] == send(a, b"same")[1]


def test_out_of_order_and_across_ratchet_steps() -> None:
    a, b = established()
    a, m0 = send(a, b"m0")
    a, m1 = send(a, b"m1")
    a, m2 = send(a, b"m2")
    b, p = recv(b, m2)
    assert p == b"m2"
    assert len(b.skipped) == 2
    b, r = send(b, b"reply")
    a, _ = recv(a, r)
    a, n0 = send(a, b"n0")  # a new chain
    b, p = recv(b, n0)
    assert p == b"n0"
    b, p = recv(b, m0)
    assert p == b"m0"
    b, p = recv(b, m1)
    assert p == b"m1"
    assert len(b.skipped) == 0


def test_ad_is_bound() -> None:
    a, b = session()
    a, m = send(a, b"x")
    with pytest.raises(DecryptionFailed):
        decrypt(b, m, AD + b"!")


def test_duplicates() -> None:
    a, b = established()
    msgs = []
    for i in range(3):
        a, m = send(a, b"%d" % i)
        msgs.append(m)
    b, _ = recv(b, msgs[1])  # 0 is skipped
    with pytest.raises(DuplicateMessage):
        recv(b, msgs[1])
    b, _ = recv(b, msgs[0])  # from the skipped store
    with pytest.raises(DuplicateMessage):
        recv(b, msgs[0])
    b, _ = recv(b, msgs[2])
    # After the chain is finished, its messages are still recognised as replays.
    b, r = send(b, b"r")
    a, _ = recv(a, r)
    a, n = send(a, b"n")
    b, _ = recv(b, n)
    for m in msgs:
        with pytest.raises(DuplicateMessage):
            recv(b, m)
    # The duplicate is detected as such, not as tampering, and never as plaintext.
    assert isinstance(DuplicateMessage(), KeyvaultError)
    assert not isinstance(DuplicateMessage(), DecryptionFailed)


def test_tampering_is_one_opaque_error() -> None:
    a, b = established()
    a, m = send(a, b"secret")
    for i in range(len(m)):
        bad = bytearray(m)
        bad[i] ^= 0x01
        with pytest.raises(DecryptionFailed):
            recv(b, bytes(bad))
    for bad_msg in (b"", m[:-1], m[: ratchet.OVERHEAD - 1], m + b"\x00", b"\x02" + m[1:]):
        with pytest.raises(DecryptionFailed):
            recv(b, bad_msg)
    assert recv(b, m)[1] == b"secret"


def test_message_for_another_session_fails() -> None:
    a, _ = established()
    _, other_b = established()
    a, m = send(a, b"x")
    with pytest.raises(DecryptionFailed):
        recv(other_b, m)


# Limits -----------------------------------------------------------------------------------


def _burst(state: RatchetState, count: int) -> tuple[RatchetState, list[bytes]]:
    out = []
    for i in range(count):
        state, m = send(state, b"%d" % i)
        out.append(m)
    return state, out


def test_jump_beyond_max_skip_is_refused() -> None:
    assert MAX_SKIP == 2000 and MAX_STORED_SKIPPED == 1000
    a, b = session()
    a, msgs = _burst(a, MAX_SKIP + 3)
    with pytest.raises(TooManySkipped):  # the first message of a chain (DH ratchet path)
        recv(b, msgs[MAX_SKIP + 1])
    b, _ = recv(b, msgs[0])
    with pytest.raises(TooManySkipped):  # within the current chain
        recv(b, msgs[1 + MAX_SKIP + 1])
    assert len(b.skipped) == 0


def test_a_jump_past_the_store_cap_keeps_the_newest_keys() -> None:
    a, b = established()
    a, msgs = _burst(a, MAX_STORED_SKIPPED + 2)
    b, p = recv(b, msgs[MAX_STORED_SKIPPED + 1])  # skips 1001: the oldest one is evicted
    assert p == b"%d" % (MAX_STORED_SKIPPED + 1)
    assert len(b.skipped) == MAX_STORED_SKIPPED
    with pytest.raises(DuplicateMessage):  # its key was evicted
        recv(b, msgs[0])
    b, p = recv(b, msgs[1])
    assert p == b"1"


def test_old_and_new_chain_both_bounded_by_max_skip() -> None:
    a, b = established()
    a, old = _burst(a, 600)
    b, _ = recv(b, old[0])
    b, r = send(b, b"r")
    a, _ = recv(a, r)
    a, new = _burst(a, 500)
    # 599 keys left in the old chain + 499 in the new one: kept are the newest 1000.
    b, p = recv(b, new[499])
    assert p == b"499"
    assert len(b.skipped) == MAX_STORED_SKIPPED
    b, _ = recv(b, new[400])
    b, _ = recv(b, old[599])  # among the newest of the old chain: still there
    with pytest.raises(DuplicateMessage):
        recv(b, old[1])  # evicted


def test_stored_keys_are_bounded_and_oldest_evicted_first() -> None:
    a, b = established()
    chains = []
    for _ in range(3):
        a, msgs = _burst(a, 601)
        chains.append(msgs)
        b, _ = recv(b, msgs[600])  # skips 600 each time
        assert len(b.skipped) <= MAX_STORED_SKIPPED
        b, r = send(b, b"r")
        a, _ = recv(a, r)
    assert len(b.skipped) == MAX_STORED_SKIPPED
    # The newest 1000 skipped keys survive: chain 2 whole (600) and the last 400 of chain 1.
    b, p = recv(b, chains[2][0])
    assert p == b"0"
    b, p = recv(b, chains[1][200])
    assert p == b"200"
    for evicted in (chains[0][0], chains[0][599], chains[1][199]):
        with pytest.raises(DuplicateMessage):
            recv(b, evicted)
    assert RatchetState.from_bytes(b.to_bytes()).to_bytes() == b.to_bytes()


def test_replays_from_long_finished_chains_are_plain_failures() -> None:
    a, b = established()
    a, first = send(a, b"first")
    b, _ = recv(b, first)
    for _ in range(ratchet.MAX_RETIRED_HEADER_KEYS - 1):
        b, m = send(b, b"b")
        a, _ = recv(a, m)
        a, m = send(a, b"a")
        b, _ = recv(b, m)
    assert len(b.retired) == ratchet.MAX_RETIRED_HEADER_KEYS
    with pytest.raises(DuplicateMessage):
        recv(b, first)
    for _ in range(2):  # the chain of `first` is the second oldest one kept
        b, m = send(b, b"b")
        a, _ = recv(a, m)
        a, m = send(a, b"a")
        b, _ = recv(b, m)
    assert len(b.retired) == ratchet.MAX_RETIRED_HEADER_KEYS
    with pytest.raises(DecryptionFailed):  # its header key has been forgotten too
        recv(b, first)


# Forward secrecy and post-compromise security ----------------------------------------------


def test_forward_secrecy_current_state_cannot_open_earlier_messages() -> None:
    a, b = session()
    captured = []
    for round_ in range(4):  # several DH ratchet steps
        for i in range(3):
            a, m = send(a, b"a%d-%d" % (round_, i))
            captured.append(m)
            b, _ = recv(b, m)
        b, m = send(b, b"b%d" % round_)
        captured.append(m)
        a, _ = recv(a, m)
    stolen_b, stolen_a = b, a  # copies of the CURRENT states
    for m in captured:
        for stolen in (stolen_a, stolen_b):
            with pytest.raises((DecryptionFailed, DuplicateMessage)):
                recv(stolen, m)
    # No message key or chain key that was used survives in the state.
    assert len(stolen_b.skipped) == 0 and len(stolen_a.skipped) == 0


def test_post_compromise_security() -> None:
    a, b = established()
    a, m = send(a, b"before")
    b, _ = recv(b, m)
    eve = b  # the attacker copies Bob's whole state
    a, m1 = send(a, b"alice 1")
    b, _ = recv(b, m1)
    eve, p = recv(eve, m1)  # the copy can still read the current chain...
    assert p == b"alice 1"
    b, r = send(b, b"bob 1")  # ...but Bob's fresh ratchet key heals the session
    a, _ = recv(a, r)
    a, m2 = send(a, b"alice 2")
    with pytest.raises(DecryptionFailed):
        recv(eve, m2)
    with pytest.raises(DecryptionFailed):  # Eve cannot read Bob's own message either
        recv(eve, r)
    assert recv(b, m2)[1] == b"alice 2"


# Initialisation and serialisation -----------------------------------------------------------


def test_init_checks_roles_and_keys() -> None:
    xa, xb = results()
    spk = x25519_pair()
    with pytest.raises(ValueError):
        init_initiator(xb, spk[1])
    with pytest.raises(ValueError):
        init_responder(xa, spk)
    with pytest.raises(ValueError):
        init_responder(xb, (spk[0], x25519_pair()[1]))
    with pytest.raises(BadPrekey):
        init_initiator(xa, bytes(32))  # a low-order point


def test_state_round_trip_and_repr() -> None:
    a, b = established()
    a, m = send(a, b"x")
    a, m2 = send(a, b"y")
    b, _ = recv(b, m2)
    for s in (a, b):
        raw = s.to_bytes()
        assert raw[0] == ratchet.STATE_VERSION
        back = RatchetState.from_bytes(raw)
        assert back == s and back.to_bytes() == raw
        assert s.rk.hex() not in repr(s) and "secret" in repr(s)
    b = RatchetState.from_bytes(b.to_bytes())
    assert recv(b, m)[1] == b"x"


def test_state_from_bytes_rejects_malformed() -> None:
    a, b = established()
    a, _ = send(a, b"x")
    a, m2 = send(a, b"y")
    b, _ = recv(b, m2)
    raw = b.to_bytes()
    for cut in range(len(raw)):
        with pytest.raises(BadKey):
            RatchetState.from_bytes(raw[:cut])
    for bad in (raw + b"\x00", b"\x02" + raw[1:], b"", b"garbage"):
        with pytest.raises(BadKey):
            RatchetState.from_bytes(bad)
    # A presence flag that is neither 0 nor 1.
    flag_at = 1 + 32
    with pytest.raises(BadKey):
        RatchetState.from_bytes(raw[:flag_at] + b"\x02" + raw[flag_at + 1 :])
