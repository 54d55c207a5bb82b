"""Contact invite links: one line that carries a relay address, an account name and the
fingerprint of the account's identity key (docs/PROTOCOL.md, section 1.2). Pure parsing.

    link    = "veil:contact?" param *( "&" param )
    param   = "v=1" / "name=" username / "id=" 52base32 / "relay=" pct-encoded-address

Each of ``v``, ``name``, ``id`` and ``relay`` exactly once, in any order (parameters this
version does not know are ignored); ``relay`` is a relay address (wire/address.py), percent-encoded
as in a URL query, and never carries a client key. The canonical form, which ``veil
invite`` prints, has them in the order v, name, id, relay:

    veil:contact?v=1&name=alice&id=<52 letters>&relay=wss%3A%2F%2Frelay.example%3A8765%23<pin>
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

from wire import normalize_username
from wire.address import AddressError, RelayAddress, b32, parse_address, unb32

PREFIX = "veil:contact?"
VERSION = "1"
_B32 = re.compile(r"[a-z2-7]{52}")
MAX_LINK = 1024


class LinkError(ValueError):
    """Not a contact link (the message says what is wrong, in one line)."""


@dataclass(frozen=True)
class ContactLink:
    relay: RelayAddress
    name: str
    fingerprint: bytes  # identity_fingerprint of the account's identity key (32 bytes)

    def __str__(self) -> str:
        query = urllib.parse.urlencode(
            [("v", VERSION), ("name", self.name), ("id", b32(self.fingerprint)), ("relay", str(self.relay))],
            quote_via=urllib.parse.quote,
        )
        return PREFIX + query


def parse_link(text: str) -> ContactLink:
    """Parse a contact link; LinkError (one line) if it is not one. Whitespace anywhere is
    dropped: a link has none, and one wrapped over lines (a terminal, a mail) still reads."""
    text = "".join(text.split())
    if len(text) > MAX_LINK:
        raise LinkError("that is not a Veil contact link: it is far too long")
    if not text.lower().startswith(PREFIX):
        raise LinkError("that is not a Veil contact link: one starts with veil:contact? (as `veil invite` prints it)")
    try:
        pairs = urllib.parse.parse_qsl(text[len(PREFIX):], keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise LinkError("that Veil contact link is malformed: it may have been cut short when copied") from None
    seen: dict[str, str] = {}
    for key, value in pairs:
        if key in seen:
            raise LinkError(f"that Veil contact link is malformed: {key} appears twice")
        seen[key] = value
    missing = [k for k in ("v", "name", "id", "relay") if k not in seen]
    if missing:
        raise LinkError(f"that Veil contact link is incomplete (no {', '.join(missing)}): it may have been cut short")
    if seen["v"] != VERSION:
        raise LinkError(f"that Veil contact link is of version {seen['v'][:8]!r}, which this veil does not read")
    try:
        name = normalize_username(seen["name"])
    except ValueError as exc:
        raise LinkError(f"that Veil contact link has a bad name: {exc}") from None
    fp = seen["id"].lower()
    if not _B32.fullmatch(fp):
        raise LinkError("that Veil contact link has a bad key fingerprint (52 base32 letters): was it cut short?")
    try:
        relay = parse_address(seen["relay"])
    except AddressError as exc:
        raise LinkError(f"that Veil contact link has a bad relay address: {exc}") from None
    if relay.client_key is not None:
        raise LinkError("that Veil contact link carries a relay client key, which contact links never do")
    return ContactLink(relay, name, unb32(fp))
