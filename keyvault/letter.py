"""The letter: the plaintext inside the ratchet, as the recipient sees it after decryption.

Layout (version 1; integers big-endian, lp(x) = u32 len(x) || x)::

    letter = 0x01 || lp(utf8 to) || msg_id (16) || u64 sent_at || lp(utf8 body)

``to`` names the conversation: the peer's account, also on the copies a sender sends to its
own other devices. Sender and sender device are not repeated here: they come from the
verified envelope (`keyvault.envelope.Sealed`) that carried the ratchet message.

Version 2, a letter in a group (keyvault.group)::

    letter = 0x02 || lp(utf8 to) || msg_id (16) || u64 sent_at || group_id (16) || u8 kind
             || lp(utf8 body)

    kind 1  text:     body is the message
    kind 2  changes:  body is empty; the changes of the group the sender holds follow it:
                      u16 count || lp(change) ... (keyvault.group encodings)

``to`` is the recipient's account (each member gets a letter of its own; the sender's
other devices get one with the sender's name): as in version 1, a letter is for the
account it names, and a recipient refuses one that names another.
"""

from __future__ import annotations

from dataclasses import dataclass

from keyvault import ratchet
from keyvault._codec import LEN_BYTES, Reader, lp
from keyvault.envelope import MAX_NAME_BYTES, max_payload_bytes
from keyvault.errors import DecryptionFailed
from keyvault.payload import PAYLOAD_HEADER_MAX

LETTER_VERSION = 1
GROUP_LETTER_VERSION = 2
ID_LEN = 16
GROUP_ID_LEN = 16
KIND_TEXT = 1
KIND_CHANGES = 2
MAX_CHANGES = 1024  # changes in one letter
_MAX_U64 = 2**64 - 1


@dataclass(frozen=True)
class Letter:
    """One message of a conversation."""

    to: str  # the conversation: the peer's account, even on a copy to the sender's devices
    msg_id: bytes  # 16 random bytes
    sent_at: int  # ms since the epoch, by the sender's clock (u64)
    body: str
    group: bytes | None = None  # version 2: the group's id
    kind: int = KIND_TEXT  # version 2: KIND_TEXT or KIND_CHANGES
    changes: tuple[bytes, ...] = ()  # version 2, KIND_CHANGES: encoded group changes


def letter_overhead(to_len: int, *, group: bool = False) -> int:
    """Return the bytes of an encoded letter that are not body, for a ``to`` of ``to_len``
    (a group's text letter with ``group``)."""
    return 1 + LEN_BYTES + to_len + ID_LEN + 8 + LEN_BYTES + (GROUP_ID_LEN + 1 if group else 0)


def encode_letter(letter: Letter) -> bytes:
    """Return the letter's bytes (ValueError if a field is out of range or not UTF-8)."""
    if len(letter.msg_id) != ID_LEN:
        raise ValueError("msg_id must be 16 bytes")
    if not isinstance(letter.sent_at, int) or not 0 <= letter.sent_at <= _MAX_U64:
        raise ValueError("sent_at out of range")
    head = lp(letter.to.encode("utf-8")) + bytes(letter.msg_id) + letter.sent_at.to_bytes(8, "big")
    if letter.group is None:
        if letter.kind != KIND_TEXT or letter.changes:
            raise ValueError("only a group's letter has a kind or changes")
        return bytes([LETTER_VERSION]) + head + lp(letter.body.encode("utf-8"))
    if len(letter.group) != GROUP_ID_LEN:
        raise ValueError("a group id is 16 bytes")
    if letter.kind == KIND_TEXT:
        if letter.changes:
            raise ValueError("a text letter carries no changes")
        tail = lp(letter.body.encode("utf-8"))
    elif letter.kind == KIND_CHANGES:
        if letter.body or not letter.changes or len(letter.changes) > MAX_CHANGES:
            raise ValueError("a changes letter has no body and 1 to 1024 changes")
        tail = lp(b"") + len(letter.changes).to_bytes(2, "big") + b"".join(lp(c) for c in letter.changes)
    else:
        raise ValueError("unknown kind")
    return bytes([GROUP_LETTER_VERSION]) + head + bytes(letter.group) + bytes([letter.kind]) + tail


def decode_letter(data: bytes) -> Letter:
    """Parse `encode_letter` output; DecryptionFailed on any malformation."""
    try:
        r = Reader(data)
        version = r.take(1)[0]
        if version not in (LETTER_VERSION, GROUP_LETTER_VERSION):
            raise ValueError("version")
        to = r.lp().decode("utf-8")
        msg_id = r.take(ID_LEN)
        sent_at = int.from_bytes(r.take(8), "big")
        if version == LETTER_VERSION:
            body = r.lp().decode("utf-8")
            r.end()
            return Letter(to, msg_id, sent_at, body)
        group = r.take(GROUP_ID_LEN)
        kind = r.take(1)[0]
        body = r.lp().decode("utf-8")
        changes: tuple[bytes, ...] = ()
        if kind == KIND_CHANGES:
            n = int.from_bytes(r.take(2), "big")
            changes = tuple(r.lp() for _ in range(n))
            if body or not 1 <= n <= MAX_CHANGES:
                raise ValueError("changes")
        elif kind != KIND_TEXT:
            raise ValueError("kind")
        r.end()
    except ValueError:  # UnicodeDecodeError included
        raise DecryptionFailed() from None
    return Letter(to, msg_id, sent_at, body, group, kind, changes)


def max_body_bytes() -> int:
    """Return the largest body (UTF-8 bytes) that always fits in one envelope.

    Assumes the worst case: sender and ``to`` names of MAX_NAME_BYTES, a payload that
    carries a prekey init with a one-time prekey id, and a letter in a group.
    """
    return (
        max_payload_bytes()
        - PAYLOAD_HEADER_MAX
        - ratchet.MAX_OVERHEAD
        - letter_overhead(MAX_NAME_BYTES, group=True)
    )
