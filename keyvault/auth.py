"""Password-derived Ed25519 auth keys and the login challenge signature."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keyvault import labels
from keyvault._codec import lp
from keyvault._verify import ed25519_verifies
from keyvault.errors import BadKey

SEED_LEN = 32


def _private(seed: bytes) -> Ed25519PrivateKey:
    if len(seed) != SEED_LEN:
        raise BadKey("The auth seed must be 32 bytes.")
    return Ed25519PrivateKey.from_private_bytes(bytes(seed))


def auth_public_key(seed: bytes) -> bytes:
    """Return the raw 32-byte Ed25519 public key for an auth seed."""
    return _private(seed).public_key().public_bytes_raw()


def challenge_message(purpose: str, relay_id: bytes, username: str, challenge: bytes) -> bytes:
    """Return the exact bytes signed to answer a challenge.

    Each field is length-prefixed so no two different tuples give the same bytes, and the
    relay id and purpose stop a signature from being replayed to another relay or use.
    """
    return (
        labels.AUTH_CHALLENGE
        + lp(purpose.encode("utf-8"))
        + lp(bytes(relay_id))
        + lp(username.encode("utf-8"))
        + lp(bytes(challenge))
    )


def sign_challenge(
    seed: bytes, purpose: str, relay_id: bytes, username: str, challenge: bytes
) -> bytes:
    """Sign a relay's login challenge with the auth key derived from ``seed``."""
    return _private(seed).sign(challenge_message(purpose, relay_id, username, challenge))


def verify_challenge(
    public: bytes,
    signature: bytes,
    purpose: str,
    relay_id: bytes,
    username: str,
    challenge: bytes,
) -> bool:
    """Return True if ``signature`` answers the challenge; False for any bad input."""
    try:
        msg = challenge_message(purpose, relay_id, username, challenge)
    except (ValueError, TypeError):  # unencodable strings (lone surrogates), bad types
        return False
    return ed25519_verifies(public, signature, msg)
