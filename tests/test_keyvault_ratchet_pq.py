"""The post-quantum ratchet (keyvault/ratchet.py, versions 2 and 3): KEM steps, healing
against an attacker who holds every X25519 key but no KEM key (and the reverse), no
downgrade within a session, and the state's serialisation."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyvault import kem, labels, ratchet
from keyvault._codec import lp
from keyvault.errors import BadKey, DecryptionFailed, KeyvaultError
from keyvault.prekeys import x25519_pair
from keyvault.ratchet import RatchetState, decrypt, encrypt, init_initiator, init_responder
from keyvault.x3dh import X3DHResult

AD = b"veil/test/pq-ratchet"
ROOT, HKA, NHKB = bytes([1]) * 32, bytes([2]) * 32, bytes([3]) * 32
SPK = x25519_pair(bytes([4]) * 32)


def dh_key(i: int) -> bytes:
    return hashlib.sha256(b"dh %d" % i).digest()


def kem_seed(i: int) -> bytes:
    return hashlib.sha512(b"kem %d" % i).digest()


def start(pq: bool = True) -> tuple[RatchetState, RatchetState]:
    a = X3DHResult(ROOT, HKA, NHKB, AD, ephemeral=bytes([6]) * 32, post_quantum=pq)
    b = X3DHResult(ROOT, NHKB, HKA, AD, ephemeral=b"", post_quantum=pq)
    return (init_initiator(a, SPK[1], dh_private=dh_key(0), kem_seed=kem_seed(0) if pq else None),
            init_responder(b, SPK))


def test_every_chain_after_the_first_carries_a_kem_step_and_the_sizes_are_as_documented() -> None:
    alice, bob = start()
    assert alice.pq and bob.pq
    alice, m1 = encrypt(alice, b"hello", AD)
    assert m1[0] == ratchet.PQ_VERSION and len(m1) == 1 + 12 + 1224 + 16 + 5 + 16
    bob, got = decrypt(bob, m1, AD)
    assert got == b"hello" and bob.kemr == alice.kems_public
    bob, m2 = encrypt(bob, b"hi", AD)
    assert m2[0] == ratchet.PQ_CT_VERSION and len(m2) == 2 + ratchet.MAX_OVERHEAD
    bob, m3 = encrypt(bob, b"again", AD)  # the same chain: the same key and ciphertext
    assert m3[0] == ratchet.PQ_CT_VERSION
    alice, got = decrypt(alice, m3, AD)  # out of order
    assert got == b"again"
    alice, got = decrypt(alice, m2, AD)
    assert got == b"hi"
    alice, m4 = encrypt(alice, b"and on", AD)
    assert m4[0] == ratchet.PQ_CT_VERSION
    bob, got = decrypt(bob, m4, AD)
    assert got == b"and on"
    for state in (alice, bob):
        assert RatchetState.from_bytes(state.to_bytes()) == state
        assert state.to_bytes()[0] == ratchet.PQ_STATE_VERSION
    assert ratchet.MAX_OVERHEAD == 2357 and ratchet.OVERHEAD == 85


def test_a_classic_session_is_unchanged() -> None:
    alice, bob = start(pq=False)
    alice, m = encrypt(alice, b"x", AD)
    assert m[0] == ratchet.VERSION and len(m) == ratchet.OVERHEAD + 1
    assert alice.to_bytes()[0] == ratchet.STATE_VERSION
    bob, got = decrypt(bob, m, AD)
    assert got == b"x"


def _conversation() -> tuple[list[bytes], list[bytes]]:
    """Alice, Bob, Alice, Bob: one message each, ratchet keys fixed; returns the messages
    and the KEM secrets of the three steps after the first (fixed too)."""
    alice, bob = start()
    messages, secrets_ = [], []
    alice, m = encrypt(alice, b"a1", AD)
    messages.append(m)
    bob, _ = decrypt(bob, m, AD)
    for i, sender in enumerate(("bob", "alice", "bob"), start=1):
        state, peer = (bob, alice) if sender == "bob" else (alice, bob)
        assert state.kemr is not None
        secret, ct = kem.encapsulate(state.kemr)
        secrets_.append(secret)
        state, m = encrypt(state, b"m%d" % i, AD, dh_private=dh_key(i), kem_seed=kem_seed(i),
                           kem_encapsulation=(secret, ct))
        peer, _ = decrypt(peer, m, AD)
        messages.append(m)
        alice, bob = (peer, state) if sender == "bob" else (state, peer)
    return messages, secrets_


def _attack(messages: list[bytes], kem_secrets: list[bytes | None]) -> list[bool]:
    """An attacker who knows the root key and every X25519 private key of both sides
    (and ``kem_secrets``: None where it does not know that step's KEM secret) replays the
    key schedule and tries to open each message; which it opened."""
    opened = []
    # Alice's first chain: an ordinary DH step against the signed prekey; then chain i
    # (Bob 1, Alice 2, Bob 3) is DH(ratchet key i, ratchet key i - 1) with a KEM secret.
    rk, ck, _ = ratchet.kdf_rk(ROOT, _x25519(dh_key(0), SPK[1]))
    chains = [ck]
    for i in range(1, 4):
        secret = kem_secrets[i - 1]
        dh_out = _x25519(dh_key(i), x25519_pair(dh_key(i - 1))[1])
        rk, ck, _ = ratchet.kdf_rk_kem(rk, dh_out, secret if secret is not None else bytes(32))
        chains.append(ck)
    for m, ck in zip(messages, chains, strict=True):
        _, mk = ratchet.kdf_ck(ck)
        key, nonce, _ = ratchet.message_keys(mk)
        prefix_len = 1 + 12 + ratchet._HEADER_LENS[m[0]] + 16
        try:
            AESGCM(key).decrypt(nonce, m[prefix_len:], lp(AD) + m[:prefix_len])
            opened.append(True)
        except InvalidTag:
            opened.append(False)
    return opened


def _x25519(private: bytes, public: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))


def test_every_x25519_key_without_the_kem_secrets_opens_only_the_first_chain() -> None:
    messages, secrets_ = _conversation()
    # The attack itself is right: with every KEM secret too, everything opens.
    assert _attack(messages, list(secrets_)) == [True, True, True, True]
    # Without them (a quantum attacker who broke X25519 and recorded everything, and even
    # knew the root key): only the initiator's first chain, which had no KEM step.
    assert _attack(messages, [None, None, None]) == [True, False, False, False]
    # Healing: one KEM secret unknown, every later chain stays closed.
    assert _attack(messages, [secrets_[0], None, secrets_[2]]) == [True, True, False, False]


def test_the_kem_secrets_without_the_x25519_keys_open_nothing_either() -> None:
    messages, secrets_ = _conversation()
    opened = []
    rk, _ck, _nhk = ratchet.kdf_rk(ROOT, bytes(32))  # DH outputs unknown: guessed
    for m, secret in zip(messages[1:], secrets_, strict=True):
        rk, ck, _nhk = ratchet.kdf_rk_kem(rk, bytes(32), secret)
        _, mk = ratchet.kdf_ck(ck)
        key, nonce, _ = ratchet.message_keys(mk)
        prefix_len = 1 + 12 + ratchet._HEADER_LENS[m[0]] + 16
        try:
            AESGCM(key).decrypt(nonce, m[prefix_len:], lp(AD) + m[:prefix_len])
            opened.append(True)
        except InvalidTag:
            opened.append(False)
    assert opened == [False, False, False]


def _classic_step_message(state: RatchetState, text: bytes, *, keep_kem_key: bool) -> bytes:
    """What an attacker who broke X25519 (or a downgraded peer) would send: a new chain
    with an ordinary DH step, as version 1 or as version 2 without a ciphertext."""
    assert state.cks is None and state.dhr is not None
    dhs_private, dhs_public = x25519_pair(dh_key(99))
    _rk, cks, _nhks = ratchet.kdf_rk(state.rk, _x25519(dhs_private, state.dhr))
    _, mk = ratchet.kdf_ck(cks)
    key, nonce, header_nonce = ratchet.message_keys(mk)
    header = ratchet.encode_header(dhs_public, state.pn, 0)
    version = ratchet.VERSION
    if keep_kem_key:
        header += kem.kem_pair(kem_seed(99))[1]
        version = ratchet.PQ_VERSION
    assert state.hks is not None
    prefix = bytes([version]) + header_nonce + AESGCM(state.hks).encrypt(
        header_nonce, header, labels.RATCHET_HEADER_AAD + bytes([version]))
    return prefix + AESGCM(key).encrypt(nonce, text, lp(AD) + prefix)


@pytest.mark.parametrize("keep_kem_key", [False, True], ids=["version 1", "version 2 without CT"])
def test_no_downgrade_within_a_post_quantum_session(keep_kem_key: bool) -> None:
    alice, bob = start()
    alice, m = encrypt(alice, b"a1", AD)
    bob, _ = decrypt(bob, m, AD)
    bob, m = encrypt(bob, b"b1", AD)
    alice, _ = decrypt(alice, m, AD)
    # Alice's next chain must carry a KEM step; one without is refused, state unchanged.
    forged = _classic_step_message(alice, b"no kem", keep_kem_key=keep_kem_key)
    before = bob.to_bytes()
    with pytest.raises(DecryptionFailed):
        decrypt(bob, forged, AD)
    assert bob.to_bytes() == before
    alice, m = encrypt(alice, b"a2", AD)
    bob, got = decrypt(bob, m, AD)
    assert got == b"a2"


def test_a_classic_step_message_is_what_a_classic_session_accepts() -> None:
    """The forgery above is well-made: the classic session takes the same construction."""
    alice, bob = start(pq=False)
    alice, m = encrypt(alice, b"a1", AD)
    bob, _ = decrypt(bob, m, AD)
    bob, m = encrypt(bob, b"b1", AD)
    alice, _ = decrypt(alice, m, AD)
    bob, got = decrypt(bob, _classic_step_message(alice, b"classic", keep_kem_key=False), AD)
    assert got == b"classic"


def test_a_post_quantum_message_in_a_classic_session_is_refused() -> None:
    alice_pq, _ = start(pq=True)
    _, bob = start(pq=False)
    _, m = encrypt(alice_pq, b"x", AD)
    with pytest.raises(DecryptionFailed):
        decrypt(bob, m, AD)


def test_a_tampered_kem_ciphertext_or_key_is_refused() -> None:
    alice, bob = start()
    alice, m = encrypt(alice, b"a1", AD)
    bob, _ = decrypt(bob, m, AD)
    bob, m = encrypt(bob, b"b1", AD)
    for at in (20, 13 + 40 + 5, 13 + 1224 + 100, len(m) - 1):
        bad = bytearray(m)
        bad[at] ^= 1
        with pytest.raises(DecryptionFailed):
            decrypt(alice, bytes(bad), AD)
    alice, got = decrypt(alice, m, AD)
    assert got == b"b1"


def test_a_session_without_the_peers_kem_key_cannot_send_a_new_chain() -> None:
    alice, bob = start()
    alice, m = encrypt(alice, b"a1", AD)
    bob, _ = decrypt(bob, m, AD)
    broken = dataclasses.replace(bob, kemr=None)
    with pytest.raises(KeyvaultError):
        encrypt(broken, b"b1", AD)


def test_state_serialisation_refuses_malformed_pq_parts() -> None:
    alice, _ = start()
    raw = alice.to_bytes()
    assert RatchetState.from_bytes(raw) == alice
    for bad in (raw[:-1], raw + b"\x00", raw[:-1] + b"\x02"):
        with pytest.raises(BadKey):
            RatchetState.from_bytes(bad)
