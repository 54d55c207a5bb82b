"""The sealed envelope ("sealed sender"): the outer layer of every message.

Layout of an envelope (version 2)::

    version (1) || RSA-OAEP-SHA256(aes_key) (384) || nonce (12) || AES-256-GCM(padded) (+16 tag)

    aad    = ENVELOPE_AAD || version || recipient_device
    padded = u32 len(inner) || inner || zeros, to the smallest size in BUCKETS
    inner  = fields || Ed25519 signature (64)
    fields = lp(sender) || sender_device (16) || lp(payload)
    signed = ENVELOPE_SIGNATURE || fields || recipient_device

The payload is a `keyvault.payload` encoding: a Double Ratchet message (plus the X3DH data
while the session is being set up) whose plaintext is a `keyvault.letter` encoding.

The relay sees only the recipient device, the version and the bucket size. The signature
covers the recipient device, so a recipient cannot re-seal a payload to someone else as if
it came from the original sender.

Trade-off: the outer layer is opened with the recipient's long-term RSA key, so whoever
holds (or later steals) that key learns who sent each recorded envelope (sender and
sender_device). What was said stays protected: the payload's keys come from the ratchet
and are forward secret.

Version 3, the hybrid envelope (post-quantum): the content key depends on an RSA-OAEP
secret and on an ML-KEM-768 encapsulation to the recipient device's envelope key (a
`keyvault.kem` key of use ENVELOPE, signed by the recipient account's identity key), so
that opening a recorded envelope takes breaking both RSA and ML-KEM::

    version (1) = 0x03 || RSA-OAEP-SHA256(rsa_secret) (384) || u32 kem_key_id
                || ML-KEM-768 ciphertext (1088) || nonce (12) || AES-256-GCM(padded) (+16 tag)

    rsa_secret (32 random bytes); (kem_secret, ciphertext) = ML-KEM-768.Encaps(envelope key)
    aes_key = HKDF-SHA256(salt = 32 zero bytes, ikm = rsa_secret || kem_secret,
                          info = ENVELOPE_HYBRID || SHA-256(bytes 0 to 1476 of the envelope:
                          the version byte, the RSA ciphertext, the key id and the KEM
                          ciphertext), length 32)
    aad, padded, inner, fields, signed: as in version 2 (aad carries the version byte)

Its header is 1,489 bytes (version 2: 397), so the sizes the relay sees are 1,489 + 16 +
each bucket: 1,761 / 2,529 / 5,601 / 17,889 / 62,945 bytes (version 2: 669 / 1,437 /
4,509 / 16,797 / 61,853). Both versions are opened; which one was is in the result.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyvault import kem, labels
from keyvault._codec import LEN_BYTES, Reader, lp
from keyvault.errors import BadKey, DecryptionFailed, MessageTooLarge
from keyvault.keys import RSA_BITS, AccountKeys, load_rsa_public

VERSION = 2
HYBRID_VERSION = 3
ID_LEN = 16  # device ids
AES_KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
RSA_LEN = RSA_BITS // 8  # 384
SIG_LEN = 64
BUCKETS = (256, 1024, 4096, 16384, 61440)
MAX_ENVELOPE = 65536
HEADER_LEN = 1 + RSA_LEN + NONCE_LEN
HYBRID_HEADER_LEN = 1 + RSA_LEN + 4 + kem.CIPHERTEXT_LEN + NONCE_LEN  # 1489
_HYBRID_BOUND = 1 + RSA_LEN + 4 + kem.CIPHERTEXT_LEN  # the bytes the content key is bound to
#: Names longer than this (in UTF-8 bytes) eat into the allowance of max_payload_bytes().
MAX_NAME_BYTES = 128

assert HYBRID_HEADER_LEN + BUCKETS[-1] + TAG_LEN <= MAX_ENVELOPE

_OAEP = padding.OAEP(
    mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)


@dataclass(frozen=True)
class Sealed:
    """What the outer layer carries: who sent it, from which device, and the payload."""

    sender: str
    sender_device: bytes  # 16 bytes
    payload: bytes  # a keyvault.payload encoding (ratchet message, opaque here)


@dataclass(frozen=True)
class Unverified:
    """An opened but not yet verified envelope: check it against the sender's identity key."""

    sealed: Sealed
    signed: bytes
    signature: bytes
    post_quantum: bool = False  # a version 3 (hybrid) envelope


@functools.lru_cache(maxsize=256)
def _recipient_key(der: bytes) -> rsa.RSAPublicKey:
    # Parsing DER per message would dominate sending to a busy contact; keys rarely change.
    return load_rsa_public(der)


def _fields(sealed: Sealed) -> bytes:
    if len(sealed.sender_device) != ID_LEN:
        raise ValueError("sender_device must be 16 bytes")
    return (
        lp(sealed.sender.encode("utf-8")) + bytes(sealed.sender_device) + lp(bytes(sealed.payload))
    )


def _signed(fields: bytes, recipient_device: bytes) -> bytes:
    return labels.ENVELOPE_SIGNATURE + fields + recipient_device


def _aad(recipient_device: bytes, version: int = VERSION) -> bytes:
    return labels.ENVELOPE_AAD + bytes([version]) + recipient_device


def _hybrid_key(rsa_secret: bytes, kem_secret: bytes, bound: bytes) -> bytes:
    info = labels.ENVELOPE_HYBRID + hashlib.sha256(bound).digest()
    return HKDF(algorithm=hashes.SHA256(), length=AES_KEY_LEN, salt=bytes(32), info=info).derive(
        rsa_secret + kem_secret
    )


def _pad(inner: bytes) -> bytes:
    need = LEN_BYTES + len(inner)
    for size in BUCKETS:
        if need <= size:
            return len(inner).to_bytes(LEN_BYTES, "big") + inner + bytes(size - need)
    from keyvault.letter import max_body_bytes  # (keyvault.letter imports this module)

    raise MessageTooLarge(
        f"The message is too large to send (at most {max_body_bytes()} bytes of text)."
    )


def _unpad(padded: bytes) -> bytes:
    if len(padded) not in BUCKETS:
        raise ValueError("not a bucket size")
    n = int.from_bytes(padded[:LEN_BYTES], "big")
    if n > len(padded) - LEN_BYTES:
        raise ValueError("bad length")
    if any(padded[LEN_BYTES + n :]):
        raise ValueError("non-zero padding")
    return padded[LEN_BYTES : LEN_BYTES + n]


def _overhead(sender_len: int) -> int:
    # Bytes of padded plaintext that are not payload: padding prefix, fields, signature.
    return LEN_BYTES + (LEN_BYTES + sender_len) + ID_LEN + LEN_BYTES + SIG_LEN


def max_payload_bytes() -> int:
    """Return the largest payload that always fits, for sender names up to MAX_NAME_BYTES."""
    return BUCKETS[-1] - _overhead(MAX_NAME_BYTES)


def envelope_size(payload_len: int, sender_len: int = 0, *, hybrid: bool = False) -> int:
    """Return the envelope size for a payload of ``payload_len`` bytes (and a sender name)."""
    need = _overhead(sender_len) + payload_len
    for size in BUCKETS:
        if need <= size:
            return (HYBRID_HEADER_LEN if hybrid else HEADER_LEN) + size + TAG_LEN
    raise MessageTooLarge()


def seal(
    sealed: Sealed,
    sender: AccountKeys,
    recipient_enc: bytes,
    recipient_device: bytes,
    *,
    aes_key: bytes | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """Sign ``sealed`` as ``sender`` and encrypt it for one recipient device.

    MessageTooLarge if it does not fit the largest bucket.
    """
    if len(recipient_device) != ID_LEN:
        raise BadKey("The recipient device id is malformed.")
    recipient_device = bytes(recipient_device)
    rsa_key = _recipient_key(bytes(recipient_enc))
    fields = _fields(sealed)
    signature = sender.identity_private.sign(_signed(fields, recipient_device))
    padded = _pad(fields + signature)
    if aes_key is None:
        aes_key = secrets.token_bytes(AES_KEY_LEN)
    if nonce is None:
        nonce = secrets.token_bytes(NONCE_LEN)
    if len(aes_key) != AES_KEY_LEN or len(nonce) != NONCE_LEN:
        raise ValueError("aes_key must be 32 bytes and nonce 12 bytes")
    wrapped = rsa_key.encrypt(aes_key, _OAEP)
    ct = AESGCM(aes_key).encrypt(nonce, padded, _aad(recipient_device))
    return bytes([VERSION]) + wrapped + nonce + ct


def seal_hybrid(
    sealed: Sealed,
    sender: AccountKeys,
    recipient_enc: bytes,
    recipient_device: bytes,
    envelope_key: bytes,
    envelope_key_id: int,
    *,
    rsa_secret: bytes | None = None,
    nonce: bytes | None = None,
    kem_encapsulation: tuple[bytes, bytes] | None = None,
) -> bytes:
    """`seal`, as a version 3 (hybrid) envelope: also encapsulated to ``envelope_key``, the
    recipient device's ML-KEM-768 envelope key with id ``envelope_key_id`` (the caller has
    checked its signature with `keyvault.kem.verify_kem_key`). BadKey if that key is
    malformed; MessageTooLarge if the content does not fit the largest bucket.

    ``rsa_secret``, ``nonce`` and ``kem_encapsulation`` (tests only) fix the randomness."""
    if len(recipient_device) != ID_LEN:
        raise BadKey("The recipient device id is malformed.")
    if not isinstance(envelope_key_id, int) or not 0 <= envelope_key_id <= kem.MAX_KEY_ID:
        raise ValueError("an envelope key id is an integer from 0 to 2**32 - 1")
    recipient_device = bytes(recipient_device)
    rsa_key = _recipient_key(bytes(recipient_enc))
    fields = _fields(sealed)
    signature = sender.identity_private.sign(_signed(fields, recipient_device))
    padded = _pad(fields + signature)
    if rsa_secret is None:
        rsa_secret = secrets.token_bytes(AES_KEY_LEN)
    if nonce is None:
        nonce = secrets.token_bytes(NONCE_LEN)
    if len(rsa_secret) != AES_KEY_LEN or len(nonce) != NONCE_LEN:
        raise ValueError("rsa_secret must be 32 bytes and nonce 12 bytes")
    kem_secret, kem_ct = kem_encapsulation or kem.encapsulate(envelope_key)
    bound = bytes([HYBRID_VERSION]) + rsa_key.encrypt(rsa_secret, _OAEP) + envelope_key_id.to_bytes(4, "big") + kem_ct
    aes_key = _hybrid_key(rsa_secret, kem_secret, bound)
    return bound + nonce + AESGCM(aes_key).encrypt(nonce, padded, _aad(recipient_device, HYBRID_VERSION))


def _parse_inner(inner: bytes) -> tuple[Sealed, bytes, bytes]:
    r = Reader(inner)
    sender = r.lp().decode("utf-8")
    sender_device = r.take(ID_LEN)
    payload = r.lp()
    signature = r.take(SIG_LEN)
    r.end()
    fields = inner[: len(inner) - SIG_LEN]
    return Sealed(sender, sender_device, payload), fields, signature


def envelope_key_id(blob: bytes) -> int | None:
    """The recipient's envelope key id a version 3 envelope names; None for version 2 (or
    for anything that is not an envelope)."""
    if len(blob) < HYBRID_HEADER_LEN or blob[0] != HYBRID_VERSION:
        return None
    return int.from_bytes(blob[1 + RSA_LEN : 1 + RSA_LEN + 4], "big")


def open_envelope(
    blob: bytes, recipient: AccountKeys, recipient_device: bytes, envelope_key: kem.KemKey | None = None
) -> Unverified:
    """Decrypt an envelope addressed to ``recipient_device``; DecryptionFailed on any failure.

    Version 2, or version 3 with ``envelope_key``: this device's envelope key of the id the
    envelope names (`envelope_key_id`); a version 3 envelope without it does not open.
    The result is not yet trusted: pass it to `verify_sealed` with the sender's identity key.
    """
    try:
        blob = bytes(blob)
        recipient_device = bytes(recipient_device)
        if len(recipient_device) != ID_LEN or not blob:
            raise ValueError("device id")
        version = blob[0]
        header = HYBRID_HEADER_LEN if version == HYBRID_VERSION else HEADER_LEN
        if len(blob) - header - TAG_LEN not in BUCKETS or version not in (VERSION, HYBRID_VERSION):
            raise ValueError("size or version")
        secret = recipient.rsa_private.decrypt(blob[1 : 1 + RSA_LEN], _OAEP)
        if len(secret) != AES_KEY_LEN:
            raise ValueError("key length")
        if version == HYBRID_VERSION:
            if envelope_key is None or envelope_key.use is not kem.KemUse.ENVELOPE \
                    or envelope_key.key_id != envelope_key_id(blob):
                raise ValueError("no such envelope key")
            kem_secret = envelope_key.decapsulate(blob[1 + RSA_LEN + 4 : _HYBRID_BOUND])
            aes_key = _hybrid_key(secret, kem_secret, blob[:_HYBRID_BOUND])
        else:
            aes_key = secret
        nonce = blob[header - NONCE_LEN : header]
        padded = AESGCM(aes_key).decrypt(nonce, blob[header:], _aad(recipient_device, version))
        sealed, fields, signature = _parse_inner(_unpad(padded))
    except (ValueError, TypeError, InvalidTag, DecryptionFailed):
        # One opaque error for every cause: distinguishing them would help an attacker
        # probing the RSA padding or the AEAD (and the user could not act on it anyway).
        raise DecryptionFailed() from None
    return Unverified(sealed, _signed(fields, recipient_device), signature, version == HYBRID_VERSION)


def verify_sealed(unverified: Unverified, sender_identity: bytes) -> Sealed:
    """Check the sender's signature and return the content; DecryptionFailed if forged."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes(sender_identity))
        key.verify(unverified.signature, unverified.signed)
    except (InvalidSignature, ValueError, TypeError):
        raise DecryptionFailed() from None
    return unverified.sealed
