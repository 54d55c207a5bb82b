"""Password-derived auth key and challenge signatures."""

from __future__ import annotations

import pytest

from keyvault import BadKey, auth_public_key, challenge_message, sign_challenge, verify_challenge

SEED = bytes(range(32))
RELAY = b"relay-id-0123456"
CHALLENGE = bytes(32)
ARGS = ("login", RELAY, "alice", CHALLENGE)


def test_public_key_from_seed() -> None:
    pub = auth_public_key(SEED)
    assert len(pub) == 32
    assert auth_public_key(SEED) == pub
    assert auth_public_key(bytes(32)) != pub
    with pytest.raises(BadKey):
        auth_public_key(b"short")


def test_sign_verify_round_trip() -> None:
    sig = sign_challenge(SEED, *ARGS)
    assert len(sig) == 64
    assert verify_challenge(auth_public_key(SEED), sig, *ARGS)


@pytest.mark.parametrize(
    "args",
    [
        ("register", RELAY, "alice", CHALLENGE),
        ("login", b"other-relay-id-0", "alice", CHALLENGE),
        ("login", RELAY, "alicf", CHALLENGE),
        ("login", RELAY, "alice", b"\x01" + CHALLENGE[1:]),
    ],
)
def test_verify_rejects_any_changed_field(args: tuple[str, bytes, str, bytes]) -> None:
    sig = sign_challenge(SEED, *ARGS)
    assert not verify_challenge(auth_public_key(SEED), sig, *args)


def test_verify_rejects_other_key_and_never_raises() -> None:
    sig = sign_challenge(SEED, *ARGS)
    pub = auth_public_key(SEED)
    assert not verify_challenge(auth_public_key(bytes(32)), sig, *ARGS)
    assert not verify_challenge(pub[:31], sig, *ARGS)
    assert not verify_challenge(pub, sig[:63], *ARGS)
    assert not verify_challenge(pub, b"", *ARGS)
    assert not verify_challenge(b"", b"", "", b"", "", b"")
    assert not verify_challenge(pub, sig, "login", RELAY, "\udc80", CHALLENGE)
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    assert not verify_challenge(pub, flipped, *ARGS)


def test_challenge_message_is_unambiguous() -> None:
    # Moving bytes between adjacent fields must change the message.
    a = challenge_message("ab", b"c", "d", b"e")
    b = challenge_message("a", b"bc", "d", b"e")
    c = challenge_message("ab", b"", "cd", b"e")
    assert len({a, b, c}) == 3
    assert a.startswith(b"veil/v1/auth-challenge")
