"""The payload of a sealed envelope: a ratchet message, with X3DH data until established.

Layout (version 1; integers big-endian)::

    payload = 0x01 || flags (1) || [init] || ratchet message (the rest)
    flags   = bit 0: init present, bit 1: opk_id present, bit 2: kem present (bits 1 and 2
              only with bit 0); others zero
    init    = identity_dh (32) || ephemeral (32) || u32 spk_id || [u32 opk_id] || [kem]
    kem     = u8 use (1 one-time, 2 last-resort) || u32 kem_id || ciphertext (1088)

``kem`` is PQXDH's: which of the recipient's KEM prekeys the initiator encapsulated to, and
the ciphertext (`keyvault.x3dh`).

An initiator attaches `PrekeyInit` to every message until its session is established (it
has decrypted a reply), since any of them may be the first to arrive. ``identity_dh`` is the
sender account's X25519 identity key: the responder checks it against the pinned key of the
account named in the envelope before running `keyvault.x3dh.respond`.
"""

from __future__ import annotations

from dataclasses import dataclass

from keyvault import ratchet
from keyvault._codec import Reader
from keyvault.errors import DecryptionFailed
from keyvault.kem import CIPHERTEXT_LEN, KemUse

PAYLOAD_VERSION = 1
KEY_LEN = 32
MAX_KEY_ID = 2**32 - 1
FLAG_INIT = 0x01
FLAG_OPK = 0x02
FLAG_KEM = 0x04
KEM_INIT_LEN = 1 + 4 + CIPHERTEXT_LEN
#: The longest payload header: version, flags, and an init with a one-time prekey id and
#: PQXDH's KEM part.
PAYLOAD_HEADER_MAX = 1 + 1 + KEY_LEN + KEY_LEN + 4 + 4 + KEM_INIT_LEN  # 1167


@dataclass(frozen=True)
class KemInit:
    """PQXDH's part of the first messages: the KEM prekey used and the ciphertext."""

    use: KemUse  # ONE_TIME or LAST_RESORT
    key_id: int  # u32
    ciphertext: bytes  # ML-KEM-768 (1088)


@dataclass(frozen=True)
class PrekeyInit:
    """The X3DH data an initiator attaches until the session is established."""

    identity_dh: bytes  # the sender account's X25519 identity public key (32)
    ephemeral: bytes  # the initiator's ephemeral X25519 public key (32)
    spk_id: int  # u32: the recipient's signed prekey used
    opk_id: int | None  # u32: the recipient's one-time prekey used, if any
    kem: KemInit | None = None  # PQXDH's KEM prekey and ciphertext, if the bundle had one


@dataclass(frozen=True)
class Payload:
    """What the envelope's payload holds."""

    init: PrekeyInit | None
    ratchet: bytes  # a keyvault.ratchet message


def _check_id(key_id: object) -> int:
    if not isinstance(key_id, int) or isinstance(key_id, bool) or not 0 <= key_id <= MAX_KEY_ID:
        raise ValueError("a prekey id is an integer from 0 to 2**32 - 1")
    return key_id


def encode_payload(p: Payload) -> bytes:
    """Return the payload bytes (ValueError if a field is out of range)."""
    if len(p.ratchet) < ratchet.OVERHEAD:
        raise ValueError("the ratchet message is too short")
    init = p.init
    if init is None:
        return bytes([PAYLOAD_VERSION, 0]) + bytes(p.ratchet)
    if len(init.identity_dh) != KEY_LEN or len(init.ephemeral) != KEY_LEN:
        raise ValueError("identity_dh and ephemeral must be 32 bytes")
    flags = FLAG_INIT
    out = (
        bytes(init.identity_dh) + bytes(init.ephemeral) + _check_id(init.spk_id).to_bytes(4, "big")
    )
    if init.opk_id is not None:
        flags |= FLAG_OPK
        out += _check_id(init.opk_id).to_bytes(4, "big")
    if init.kem is not None:
        kem = init.kem
        if kem.use not in (KemUse.ONE_TIME, KemUse.LAST_RESORT) or len(kem.ciphertext) != CIPHERTEXT_LEN:
            raise ValueError("a KEM init names a one-time or last-resort prekey, with 1088 bytes")
        flags |= FLAG_KEM
        out += bytes([int(kem.use)]) + _check_id(kem.key_id).to_bytes(4, "big") + bytes(kem.ciphertext)
    return bytes([PAYLOAD_VERSION, flags]) + out + bytes(p.ratchet)


def decode_payload(data: bytes) -> Payload:
    """Parse `encode_payload` output; DecryptionFailed on any malformation."""
    try:
        r = Reader(data)
        version, flags = r.take(2)
        if version != PAYLOAD_VERSION or flags & ~(FLAG_INIT | FLAG_OPK | FLAG_KEM):
            raise ValueError("version or flags")
        init = None
        if flags & FLAG_INIT:
            identity_dh, ephemeral = r.take(KEY_LEN), r.take(KEY_LEN)
            spk_id = int.from_bytes(r.take(4), "big")
            opk_id = int.from_bytes(r.take(4), "big") if flags & FLAG_OPK else None
            kem = None
            if flags & FLAG_KEM:
                use = KemUse(r.take(1)[0])
                if use not in (KemUse.ONE_TIME, KemUse.LAST_RESORT):
                    raise ValueError("KEM use")
                kem = KemInit(use, int.from_bytes(r.take(4), "big"), r.take(CIPHERTEXT_LEN))
            init = PrekeyInit(identity_dh, ephemeral, spk_id, opk_id, kem)
        elif flags & (FLAG_OPK | FLAG_KEM):
            raise ValueError("opk_id or kem without init")
        message = r.rest()
        if len(message) < ratchet.OVERHEAD:
            raise ValueError("ratchet message too short")
    except ValueError:
        raise DecryptionFailed() from None
    return Payload(init, message)
