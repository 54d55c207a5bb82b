"""Prekeys for X3DH: the signed prekey and the one-time prekeys of a device.

Both are X25519 key pairs. The signed prekey is signed by the account's Ed25519 identity key,
so that a relay handing out prekey bundles cannot substitute its own::

    signed = PREKEY_SIGNATURE || u32 key_id || public (32)
    signature = Ed25519(identity key, signed)                          (64 bytes)

Serialised forms (private halves: they live in the device store, never on the relay)::

    SignedPrekey  = 0x01 || u32 key_id || u64 created_at || private (32) || public (32)
                    || signature (64)                                  (141 bytes)
    OneTimePrekey = 0x01 || u32 key_id || private (32) || public (32)  (69 bytes)

All integers are big-endian. ``created_at`` is in seconds since the epoch and is passed in by
the caller (there is no clock in keyvault); it decides when the prekey is rotated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from keyvault import labels
from keyvault._verify import ed25519_verifies
from keyvault.errors import BadKey
from keyvault.keys import AccountKeys

PREKEY_VERSION = 1
KEY_LEN = 32
SIG_LEN = 64
MAX_KEY_ID = 2**32 - 1
_MAX_U64 = 2**64 - 1
SIGNED_PREKEY_LEN = 1 + 4 + 8 + KEY_LEN + KEY_LEN + SIG_LEN
ONE_TIME_PREKEY_LEN = 1 + 4 + KEY_LEN + KEY_LEN


def _check_id(key_id: int) -> None:
    if not isinstance(key_id, int) or isinstance(key_id, bool) or not 0 <= key_id <= MAX_KEY_ID:
        raise ValueError("a prekey id is an integer from 0 to 2**32 - 1")


def x25519_pair(private: bytes | None = None) -> tuple[bytes, bytes]:
    """Return (private, public) raw X25519 keys: fresh, or for the given 32-byte private key."""
    if private is None:
        key = X25519PrivateKey.generate()
    else:
        if len(private) != KEY_LEN:
            raise ValueError("an X25519 private key is 32 bytes")
        key = X25519PrivateKey.from_private_bytes(bytes(private))
    return key.private_bytes_raw(), key.public_key().public_bytes_raw()


def _signed_message(key_id: int, public: bytes) -> bytes:
    return labels.PREKEY_SIGNATURE + key_id.to_bytes(4, "big") + bytes(public)


@dataclass(frozen=True, repr=False)
class SignedPrekey:
    """A device's signed prekey (X25519) with the identity key's signature over it."""

    key_id: int
    private: bytes
    public: bytes
    signature: bytes
    created_at: int  # seconds since the epoch, as given by the caller

    def __repr__(self) -> str:
        return f"SignedPrekey(key_id={self.key_id}, public={self.public.hex()})"

    def to_bytes(self) -> bytes:
        """Serialise, private half included (see the module docstring). Secret!"""
        return (
            bytes([PREKEY_VERSION])
            + self.key_id.to_bytes(4, "big")
            + self.created_at.to_bytes(8, "big")
            + self.private
            + self.public
            + self.signature
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedPrekey:
        """Parse `to_bytes` output (BadKey on any malformation)."""
        data = bytes(data)
        if len(data) != SIGNED_PREKEY_LEN or data[0] != PREKEY_VERSION:
            raise BadKey("The signed prekey is malformed.")
        key_id = int.from_bytes(data[1:5], "big")
        created_at = int.from_bytes(data[5:13], "big")
        private, public = data[13:45], data[45:77]
        if x25519_pair(private)[1] != public:
            raise BadKey("The signed prekey is malformed.")
        return cls(key_id, private, public, data[77:], created_at)


def new_signed_prekey(
    keys: AccountKeys, key_id: int, created_at: int, *, private: bytes | None = None
) -> SignedPrekey:
    """Make a signed prekey with id ``key_id`` (fresh X25519 unless ``private`` is given)."""
    _check_id(key_id)
    if not isinstance(created_at, int) or not 0 <= created_at <= _MAX_U64:
        raise ValueError("created_at is a non-negative number of seconds")
    priv, pub = x25519_pair(private)
    signature = keys.identity_private.sign(_signed_message(key_id, pub))
    return SignedPrekey(key_id, priv, pub, signature, created_at)


def verify_signed_prekey(
    identity_public: bytes, key_id: int, public: bytes, signature: bytes
) -> bool:
    """Return True if ``identity_public`` signed this prekey; False on any bad input."""
    try:
        _check_id(key_id)
        if len(public) != KEY_LEN:
            return False
        message = _signed_message(key_id, public)
    except (ValueError, TypeError):
        return False
    return ed25519_verifies(identity_public, signature, message)


@dataclass(frozen=True, repr=False)
class OneTimePrekey:
    """A one-time prekey (X25519): used by at most one X3DH, then deleted."""

    key_id: int
    private: bytes
    public: bytes

    def __repr__(self) -> str:
        return f"OneTimePrekey(key_id={self.key_id}, public={self.public.hex()})"

    def to_bytes(self) -> bytes:
        """Serialise, private half included (see the module docstring). Secret!"""
        return bytes([PREKEY_VERSION]) + self.key_id.to_bytes(4, "big") + self.private + self.public

    @classmethod
    def from_bytes(cls, data: bytes) -> OneTimePrekey:
        """Parse `to_bytes` output (BadKey on any malformation)."""
        data = bytes(data)
        if len(data) != ONE_TIME_PREKEY_LEN or data[0] != PREKEY_VERSION:
            raise BadKey("The one-time prekey is malformed.")
        private, public = data[5:37], data[37:]
        if x25519_pair(private)[1] != public:
            raise BadKey("The one-time prekey is malformed.")
        return cls(int.from_bytes(data[1:5], "big"), private, public)


def new_one_time_prekeys(
    first_id: int, count: int, *, privates: Sequence[bytes] | None = None
) -> list[OneTimePrekey]:
    """Make ``count`` one-time prekeys with ids ``first_id, first_id + 1, ...``.

    ``privates`` (tests only) fixes the private keys; otherwise they are fresh.
    """
    if not isinstance(count, int) or count < 0:
        raise ValueError("count must be a non-negative integer")
    _check_id(first_id)
    if count:
        _check_id(first_id + count - 1)
    if privates is not None and len(privates) != count:
        raise ValueError("privates must hold count keys")
    out = []
    for i in range(count):
        priv, pub = x25519_pair(None if privates is None else privates[i])
        out.append(OneTimePrekey(first_id + i, priv, pub))
    return out
