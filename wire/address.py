"""Relay addresses: the exact grammar (docs/PROTOCOL.md, section 1), parsed without I/O.

    address    = scheme "://" host [ ":" port ] [ "/" | "/v1" ] [ "#" fragment ]
    scheme     = "wss" / "ws"
    host       = dns-name / IPv4 / "[" IPv6 "]"
    fragment   = pin / "client=" client-key      (a pin with wss only; a client key
                                                  with ws to an onion address only)
    pin        = 52 base32 letters: SHA-256 of the relay certificate's DER
                 SubjectPublicKeyInfo, RFC 4648 base32, lower case, no padding
    client-key = 52 base32 letters: a Tor v3 client authorization key (x25519 private)

Examples: ``wss://relay.example:4433#3q2k...`` (a relay's own key, pinned),
``wss://chat.example.org`` (a certificate from a public authority, port 443),
``ws://127.0.0.1:8765`` (plain, loopback only), ``ws://<56 letters>.onion`` (Tor
authenticates the service) and ``ws://<56 letters>.onion#client=...`` (a private onion
relay, with the client key that opens its descriptor).

Whether plain ``ws://`` may be used is ``plain_allowed``: loopback and onion hosts only,
unless the user said ``--insecure-no-tls``.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import urllib.parse
from dataclasses import dataclass, replace

PIN_LENGTH = 52  # base32 of 32 bytes, no padding
_B32 = re.compile(r"[a-z2-7]{52}")
_ONION = re.compile(r"[a-z2-7]{56}\.onion")
_DNS = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\.?")
CLIENT_PREFIX = "client="


class AddressError(ValueError):
    """A relay address that does not follow the grammar (the message says what is wrong)."""


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP address (127.0.0.0/8, ::1): no network in between."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=").lower()


def unb32(text: str) -> bytes:
    return base64.b32decode(text.upper() + "=" * (-len(text) % 8))


@dataclass(frozen=True)
class RelayAddress:
    scheme: str  # "wss" or "ws"
    host: str  # lower case; an IPv6 address without brackets
    port: int
    pin: str | None = None  # base32 SPKI SHA-256, wss only
    client_key: str | None = None  # base32 Tor client authorization key, onion only

    @property
    def secure(self) -> bool:
        return self.scheme == "wss"

    @property
    def onion(self) -> bool:
        return self.host.endswith(".onion")

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def plain_allowed(self) -> bool:
        """Plain ws:// needs no flag for loopback (nothing crosses a network) and for an
        onion address (Tor authenticates the service by its address and encrypts)."""
        return self.loopback or self.onion

    @property
    def hostport(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.secure else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """Where to connect, without the fragment (no pin, no client key)."""
        return f"{self.scheme}://{self.hostport}"

    @property
    def public(self) -> RelayAddress:
        """This address without a client key: what may be shown to others."""
        return replace(self, client_key=None)

    def __str__(self) -> str:
        if self.pin:
            return f"{self.url}#{self.pin}"
        if self.client_key:
            return f"{self.url}#{CLIENT_PREFIX}{self.client_key}"
        return self.url

    def same_relay(self, other: RelayAddress) -> bool:
        """The same service: the same key if both addresses pin one (whatever name or port
        each reaches it by), else the same scheme, host and port."""
        if self.pin is not None and other.pin is not None:
            return self.pin == other.pin
        return (self.scheme, self.host, self.port) == (other.scheme, other.host, other.port)


def parse_address(text: str) -> RelayAddress:
    """Parse a relay address; AddressError (one line, saying what is wrong) if it is not one.
    An error never repeats a client key the text carries."""
    try:
        return _parse(text.strip())
    except AddressError as exc:
        shown = text.strip()
        head, sep, fragment = shown.partition("#")
        if sep and fragment.lower().startswith(CLIENT_PREFIX):
            message = str(exc).replace(shown, f"{head}#{CLIENT_PREFIX}...").replace(repr(shown), repr(f"{head}#{CLIENT_PREFIX}..."))
            raise AddressError(message) from None
        raise


def _parse(text: str) -> RelayAddress:
    if not text:
        raise AddressError("the relay address is empty")
    if "://" not in text:
        raise AddressError(f"{text!r} is not a relay address: use wss://HOST:PORT#PIN, wss://HOST or ws://HOST:PORT")
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise AddressError(f"bad relay address {text!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss"):
        raise AddressError(f"bad relay address {text!r}: the scheme must be wss:// or ws://")
    if parts.username is not None or parts.password is not None:
        raise AddressError(f"bad relay address {text!r}: no user name or password in a relay address")
    if parts.path not in ("", "/", "/v1", "/v1/") or parts.query:
        raise AddressError(f"bad relay address {text!r}: give it without a path or query (wss://HOST:PORT)")
    host = (parts.hostname or "").lower()
    if host.endswith(".") and ":" not in host:
        host = host[:-1]  # the root label: the same name (and classified as such)
    if not host:
        raise AddressError(f"bad relay address {text!r}: no host")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"bad relay address {text!r}: {host} is not an IPv6 address") from None
    elif host.endswith(".onion"):
        if not _ONION.fullmatch(host):
            raise AddressError(f"bad relay address {text!r}: an onion address is 56 letters and digits before .onion")
    elif not _DNS.fullmatch(host):
        raise AddressError(f"bad relay address {text!r}: {host!r} is not a host name or IP address")
    if port == 0:
        raise AddressError(f"bad relay address {text!r}: port 0")
    secure = scheme == "wss"
    port = port if port is not None else (443 if secure else 80)
    fragment = parts.fragment
    pin = client_key = None
    if fragment:
        if fragment.lower().startswith(CLIENT_PREFIX):
            client_key = fragment[len(CLIENT_PREFIX):].lower()
            if not host.endswith(".onion") or secure:
                raise AddressError(f"bad relay address {text!r}: a client key goes only with ws:// to an onion address")
            if not _B32.fullmatch(client_key):
                raise AddressError(f"bad relay address {text!r}: a client key is {PIN_LENGTH} base32 letters")
        else:
            pin = fragment.lower()
            if not secure:
                raise AddressError(f"bad relay address {text!r}: a key pin (#...) goes only with wss://")
            if not _B32.fullmatch(pin):
                raise AddressError(
                    f"bad relay address {text!r}: the key pin after # is {PIN_LENGTH} base32 letters (a-z, 2-7)"
                )
    return RelayAddress(scheme, host, port, pin, client_key)
