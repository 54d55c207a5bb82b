"""Safety numbers: a 60-digit fingerprint of two accounts' identity keys (Signal style)."""

from __future__ import annotations

import hashlib

from keyvault import labels
from keyvault.errors import BadKey

ITERATIONS = 5200
DIGITS = 60


def _half(name: str, identity: bytes) -> str:
    if len(identity) != 32:
        raise BadKey("The identity key must be 32 bytes.")
    # The label is the version prefix; the key is fixed-length, so the name can be the tail.
    digest = labels.SAFETY_NUMBER + bytes(identity) + name.encode("utf-8")
    # Iterating makes finding a second key with the same number proportionally more costly.
    for _ in range(ITERATIONS):
        digest = hashlib.sha512(digest + identity).digest()
    return "".join(
        f"{int.from_bytes(digest[i : i + 5], 'big') % 100000:05d}" for i in range(0, 30, 5)
    )


def safety_number(name_a: str, identity_a: bytes, name_b: str, identity_b: bytes) -> str:
    """Return the 60-digit safety number of two accounts, the same whichever side asks."""
    halves = sorted([_half(name_a, identity_a), _half(name_b, identity_b)])
    return halves[0] + halves[1]


def identity_fingerprint(identity: bytes) -> bytes:
    """The 32-byte fingerprint of an identity key that invite links carry:
    SHA-256(label || key). Unlike the safety number it names one account, not a pair."""
    if len(identity) != 32:
        raise BadKey("The identity key must be 32 bytes.")
    return hashlib.sha256(labels.IDENTITY_FINGERPRINT + bytes(identity)).digest()


def format_safety_number(digits: str) -> str:
    """Format 60 digits as 3 lines of 4 groups of 5 digits, for reading aloud."""
    if len(digits) != DIGITS or not digits.isascii() or not digits.isdigit():
        raise ValueError("a safety number is 60 digits")
    groups = [digits[i : i + 5] for i in range(0, DIGITS, 5)]
    return "\n".join(" ".join(groups[i : i + 4]) for i in range(0, 12, 4))
