"""ML-KEM-768 keys signed by the account's identity key (post-quantum, FIPS 203).

Three uses, each its own signature context byte so that a key signed for one cannot be
presented as another::

    use 1  one-time KEM prekey      claimed by one PQXDH, then deleted (like one-time prekeys)
    use 2  last-resort KEM prekey   used when the one-time ones run out; replaced with the
                                    signed prekey
    use 3  envelope key             the device's long-term key that sealed envelopes are
                                    encapsulated to (with the account's RSA key)

    signed    = KEM_KEY_SIGNATURE || u8 use || u32 key_id || device_id (16) || public (1184)
    signature = Ed25519(identity key, signed)                                    (64 bytes)

Serialised private form (it lives in the device store, never on the relay)::

    KemKey = 0x01 || u8 use || u32 key_id || u64 created_at || seed (64) || public (1184)
             || signature (64)                                                (1330 bytes)

``seed`` is FIPS 203's (d || z), from which the whole private key is derived. Why 768 and
not 1024: NIST category 3 (about AES-192) against the category 5 of -1024, at 1184-byte
keys and 1088-byte ciphertexts instead of 1568 and 1568; every envelope carries one
ciphertext and ratchet steps carry a key and a ciphertext, so the smaller set is what keeps
short messages in their size bucket. It is also what Signal's SPQR ratchet, Apple's PQ3
ratchet steps and the X-Wing hybrid KEM use. Classical X25519/RSA stays alongside it in
every use: breaking ML-KEM alone opens nothing either.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey

from keyvault import labels
from keyvault._verify import ed25519_verifies
from keyvault.errors import BadKey, DecryptionFailed
from keyvault.keys import AccountKeys

KEM_VERSION = 1
PUBLIC_LEN = 1184
CIPHERTEXT_LEN = 1088
SEED_LEN = 64
SECRET_LEN = 32
SIG_LEN = 64
MAX_KEY_ID = 2**32 - 1
_MAX_U64 = 2**64 - 1
KEM_KEY_LEN = 1 + 1 + 4 + 8 + SEED_LEN + PUBLIC_LEN + SIG_LEN


class KemUse(enum.IntEnum):
    ONE_TIME = 1
    LAST_RESORT = 2
    ENVELOPE = 3


def _check_id(key_id: int) -> None:
    if not isinstance(key_id, int) or isinstance(key_id, bool) or not 0 <= key_id <= MAX_KEY_ID:
        raise ValueError("a KEM key id is an integer from 0 to 2**32 - 1")


def kem_pair(seed: bytes | None = None) -> tuple[bytes, bytes]:
    """(seed, public) of an ML-KEM-768 key pair: fresh, or derived from a 64-byte seed."""
    if seed is None:
        key = MLKEM768PrivateKey.generate()
    else:
        if len(seed) != SEED_LEN:
            raise ValueError("an ML-KEM-768 seed is 64 bytes")
        key = MLKEM768PrivateKey.from_seed_bytes(bytes(seed))
    return key.private_bytes_raw(), key.public_key().public_bytes_raw()


DEVICE_ID_LEN = 16


def signed_message(use: KemUse, key_id: int, public: bytes, device_id: bytes) -> bytes:
    """What the identity key signs: the key is for one use of one device (a relay cannot
    present one device's key as another's: keyvault.kem's docstring)."""
    if len(device_id) != DEVICE_ID_LEN:
        raise ValueError("a device id is 16 bytes")
    return (labels.KEM_KEY_SIGNATURE + bytes([int(use)]) + key_id.to_bytes(4, "big") + bytes(device_id)
            + bytes(public))


@dataclass(frozen=True, repr=False)
class KemKey:
    """One of a device's ML-KEM-768 keys, with the identity key's signature over it."""

    use: KemUse
    key_id: int
    seed: bytes
    public: bytes
    signature: bytes
    created_at: int  # seconds since the epoch, as given by the caller

    def __repr__(self) -> str:
        return f"KemKey({self.use.name}, key_id={self.key_id})"

    def to_bytes(self) -> bytes:
        """Serialise, private half included (see the module docstring). Secret!"""
        return (
            bytes([KEM_VERSION, int(self.use)])
            + self.key_id.to_bytes(4, "big")
            + self.created_at.to_bytes(8, "big")
            + self.seed
            + self.public
            + self.signature
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> KemKey:
        """Parse `to_bytes` output (BadKey on any malformation)."""
        data = bytes(data)
        try:
            if len(data) != KEM_KEY_LEN or data[0] != KEM_VERSION:
                raise ValueError("length or version")
            use = KemUse(data[1])
            key_id = int.from_bytes(data[2:6], "big")
            created_at = int.from_bytes(data[6:14], "big")
            seed = data[14 : 14 + SEED_LEN]
            public = data[14 + SEED_LEN : 14 + SEED_LEN + PUBLIC_LEN]
            if kem_pair(seed)[1] != public:
                raise ValueError("public key does not match")
        except ValueError:
            raise BadKey("The KEM key is malformed.") from None
        return cls(use, key_id, seed, public, data[-SIG_LEN:], created_at)

    def decapsulate(self, ciphertext: bytes) -> bytes:
        """The shared secret of ``ciphertext``; DecryptionFailed if it is not one.

        (ML-KEM rejects implicitly: a wrong ciphertext of the right length gives a
        pseudorandom secret, which then fails the AEAD that follows.)"""
        return decapsulate(self.seed, ciphertext)


def new_kem_key(
    keys: AccountKeys, use: KemUse, key_id: int, created_at: int, *, device_id: bytes, seed: bytes | None = None
) -> KemKey:
    """Make a signed ML-KEM-768 key for ``use`` by the device ``device_id`` (fresh unless
    ``seed`` is given)."""
    _check_id(key_id)
    use = KemUse(use)
    if not isinstance(created_at, int) or not 0 <= created_at <= _MAX_U64:
        raise ValueError("created_at is a non-negative number of seconds")
    seed, public = kem_pair(seed)
    signature = keys.identity_private.sign(signed_message(use, key_id, public, device_id))
    return KemKey(use, key_id, seed, public, signature, created_at)


def new_one_time_kem_keys(
    keys: AccountKeys, first_id: int, count: int, created_at: int, *, device_id: bytes
) -> list[KemKey]:
    """``count`` signed one-time KEM prekeys with ids ``first_id, first_id + 1, ...``."""
    if not isinstance(count, int) or count < 0:
        raise ValueError("count must be a non-negative integer")
    _check_id(first_id)
    if count:
        _check_id(first_id + count - 1)
    return [new_kem_key(keys, KemUse.ONE_TIME, first_id + i, created_at, device_id=device_id) for i in range(count)]


def verify_kem_key(
    identity_public: bytes, use: KemUse, key_id: int, public: bytes, signature: bytes, *, device_id: bytes
) -> bool:
    """True if ``identity_public`` signed ``public`` as a KEM key for ``use`` of the device
    ``device_id`` with this id; False on any bad input (a well-formed key is checked too:
    ML-KEM's encoding check)."""
    try:
        _check_id(key_id)
        use = KemUse(use)
        if len(public) != PUBLIC_LEN:
            return False
        MLKEM768PublicKey.from_public_bytes(bytes(public))
        message = signed_message(use, key_id, public, device_id)
    except (ValueError, TypeError):
        return False
    return ed25519_verifies(identity_public, signature, message)


def encapsulate(public: bytes) -> tuple[bytes, bytes]:
    """(shared secret (32), ciphertext (1088)) to an ML-KEM-768 public key; BadKey if
    the key is malformed."""
    try:
        key = MLKEM768PublicKey.from_public_bytes(bytes(public))
    except (ValueError, TypeError):
        raise BadKey("The contact's post-quantum key is malformed.") from None
    secret, ciphertext = key.encapsulate()
    return secret, ciphertext


def decapsulate(seed: bytes, ciphertext: bytes) -> bytes:
    """The shared secret of ``ciphertext`` under the key of ``seed``; DecryptionFailed if
    the ciphertext has the wrong length."""
    if len(ciphertext) != CIPHERTEXT_LEN:
        raise DecryptionFailed("The post-quantum key exchange is malformed.")
    try:
        return MLKEM768PrivateKey.from_seed_bytes(bytes(seed)).decapsulate(bytes(ciphertext))
    except (ValueError, TypeError):
        raise DecryptionFailed("The post-quantum key exchange is malformed.") from None
