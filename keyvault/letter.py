"""The letter: the plaintext inside the ratchet, as the recipient sees it after decryption.

Layout (version 1; integers big-endian, lp(x) = u32 len(x) || x)::

    letter = 0x01 || lp(utf8 to) || msg_id (16) || u64 sent_at || lp(utf8 body)

``to`` names the conversation: the peer's account, also on the copies a sender sends to its
own other devices. Sender and sender device are not repeated here: they come from the
verified envelope (`keyvault.envelope.Sealed`) that carried the ratchet message.
"""

from __future__ import annotations

from dataclasses import dataclass

from keyvault import ratchet
from keyvault._codec import LEN_BYTES, Reader, lp
from keyvault.envelope import MAX_NAME_BYTES, max_payload_bytes
from keyvault.errors import DecryptionFailed
from keyvault.payload import PAYLOAD_HEADER_MAX

LETTER_VERSION = 1
ID_LEN = 16
_MAX_U64 = 2**64 - 1


@dataclass(frozen=True)
class Letter:
    """One message of a conversation."""

    to: str  # the conversation: the peer's account, even on a copy to the sender's devices
    msg_id: bytes  # 16 random bytes
    sent_at: int  # ms since the epoch, by the sender's clock (u64)
    body: str


def letter_overhead(to_len: int) -> int:
    """Return the bytes of an encoded letter that are not body, for a ``to`` of ``to_len``."""
    return 1 + LEN_BYTES + to_len + ID_LEN + 8 + LEN_BYTES


def encode_letter(letter: Letter) -> bytes:
    """Return the letter's bytes (ValueError if a field is out of range or not UTF-8)."""
    if len(letter.msg_id) != ID_LEN:
        raise ValueError("msg_id must be 16 bytes")
    if not isinstance(letter.sent_at, int) or not 0 <= letter.sent_at <= _MAX_U64:
        raise ValueError("sent_at out of range")
    return (
        bytes([LETTER_VERSION])
        + lp(letter.to.encode("utf-8"))
        + bytes(letter.msg_id)
        + letter.sent_at.to_bytes(8, "big")
        + lp(letter.body.encode("utf-8"))
    )


def decode_letter(data: bytes) -> Letter:
    """Parse `encode_letter` output; DecryptionFailed on any malformation."""
    try:
        r = Reader(data)
        if r.take(1) != bytes([LETTER_VERSION]):
            raise ValueError("version")
        to = r.lp().decode("utf-8")
        msg_id = r.take(ID_LEN)
        sent_at = int.from_bytes(r.take(8), "big")
        body = r.lp().decode("utf-8")
        r.end()
    except ValueError:  # UnicodeDecodeError included
        raise DecryptionFailed() from None
    return Letter(to, msg_id, sent_at, body)


def max_body_bytes() -> int:
    """Return the largest body (UTF-8 bytes) that always fits in one envelope.

    Assumes the worst case: sender and ``to`` names of MAX_NAME_BYTES and a payload that
    carries a prekey init with a one-time prekey id.
    """
    return (
        max_payload_bytes()
        - PAYLOAD_HEADER_MAX
        - ratchet.MAX_OVERHEAD
        - letter_overhead(MAX_NAME_BYTES)
    )
