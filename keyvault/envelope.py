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

The relay sees only the recipient device and the bucket size. The signature covers the
recipient device, so a recipient cannot re-seal a payload to someone else as if it came
from the original sender.

Trade-off: the outer layer is opened with the recipient's long-term RSA key, so whoever
holds (or later steals) that key learns who sent each recorded envelope (sender and
sender_device). What was said stays protected: the payload's keys come from the ratchet
and are forward secret.
"""

from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyvault import labels
from keyvault._codec import LEN_BYTES, Reader, lp
from keyvault.errors import BadKey, DecryptionFailed, MessageTooLarge
from keyvault.keys import RSA_BITS, AccountKeys, load_rsa_public

VERSION = 2
ID_LEN = 16  # device ids
AES_KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
RSA_LEN = RSA_BITS // 8  # 384
SIG_LEN = 64
BUCKETS = (256, 1024, 4096, 16384, 61440)
MAX_ENVELOPE = 65536
HEADER_LEN = 1 + RSA_LEN + NONCE_LEN
#: Names longer than this (in UTF-8 bytes) eat into the allowance of max_payload_bytes().
MAX_NAME_BYTES = 128

assert HEADER_LEN + BUCKETS[-1] + TAG_LEN <= MAX_ENVELOPE

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


def _aad(recipient_device: bytes) -> bytes:
    return labels.ENVELOPE_AAD + bytes([VERSION]) + recipient_device


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


def envelope_size(payload_len: int, sender_len: int = 0) -> int:
    """Return the envelope size for a payload of ``payload_len`` bytes (and a sender name)."""
    need = _overhead(sender_len) + payload_len
    for size in BUCKETS:
        if need <= size:
            return HEADER_LEN + size + TAG_LEN
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


def _parse_inner(inner: bytes) -> tuple[Sealed, bytes, bytes]:
    r = Reader(inner)
    sender = r.lp().decode("utf-8")
    sender_device = r.take(ID_LEN)
    payload = r.lp()
    signature = r.take(SIG_LEN)
    r.end()
    fields = inner[: len(inner) - SIG_LEN]
    return Sealed(sender, sender_device, payload), fields, signature


def open_envelope(blob: bytes, recipient: AccountKeys, recipient_device: bytes) -> Unverified:
    """Decrypt an envelope addressed to ``recipient_device``; DecryptionFailed on any failure.

    The result is not yet trusted: pass it to `verify_sealed` with the sender's identity key.
    """
    try:
        blob = bytes(blob)
        recipient_device = bytes(recipient_device)
        if len(recipient_device) != ID_LEN:
            raise ValueError("device id")
        if len(blob) - HEADER_LEN - TAG_LEN not in BUCKETS or blob[0] != VERSION:
            raise ValueError("size or version")
        wrapped = blob[1 : 1 + RSA_LEN]
        nonce = blob[1 + RSA_LEN : HEADER_LEN]
        aes_key = recipient.rsa_private.decrypt(wrapped, _OAEP)
        if len(aes_key) != AES_KEY_LEN:
            raise ValueError("key length")
        padded = AESGCM(aes_key).decrypt(nonce, blob[HEADER_LEN:], _aad(recipient_device))
        sealed, fields, signature = _parse_inner(_unpad(padded))
    except (ValueError, TypeError, InvalidTag):
        # One opaque error for every cause: distinguishing them would help an attacker
        # probing the RSA padding or the AEAD (and the user could not act on it anyway).
        raise DecryptionFailed() from None
    return Unverified(sealed, _signed(fields, recipient_device), signature)


def verify_sealed(unverified: Unverified, sender_identity: bytes) -> Sealed:
    """Check the sender's signature and return the content; DecryptionFailed if forged."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes(sender_identity))
        key.verify(unverified.signature, unverified.signed)
    except (InvalidSignature, ValueError, TypeError):
        raise DecryptionFailed() from None
    return unverified.sealed
