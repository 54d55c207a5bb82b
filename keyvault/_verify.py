"""Ed25519 verification that answers yes or no: never raises on hostile input."""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def ed25519_verifies(public: bytes, signature: bytes, message: bytes) -> bool:
    """True if ``signature`` is ``public``'s signature of ``message``; False for a bad
    signature and for any malformed key or signature."""
    try:
        if len(public) != 32 or len(signature) != 64:
            return False
        Ed25519PublicKey.from_public_bytes(bytes(public)).verify(bytes(signature), message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
