"""Reaching a relay through a SOCKS5 proxy (Tor's SocksPort): python-socks, trio backend.

The proxy resolves the relay's name (``rdns=True``): a name given here, and above all a
``.onion`` address, is never looked up on this machine. Tor answers a connection to an
onion service whose descriptor it cannot find (yet) with SOCKS error 0xF0, and a failed
introduction or rendezvous with 0xF2/0xF3/0xF7 (or 0x04/0x06 when the SocksPort lacks
``ExtendedErrors``): those are retried with a bounded backoff, the rest fail at once.
A private onion service's refusals (0xF4 no client key, 0xF5 a key it does not accept)
raise ``OnionAuthRefused`` (node/onion_auth.py).
"""

from __future__ import annotations

import re
from typing import Any

import trio

from node.errors import RelayUnreachable, VeilError
from node.onion_auth import MISSING, WRONG, OnionAuthRefused

CONNECT_TIMEOUT = 120.0  # all attempts together
ATTEMPT_TIMEOUT = 60.0  # one attempt: tor builds the circuits within this
MAX_ATTEMPTS = 12
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 8.0

RETRY_CODES = {0x04, 0x06, 0xF0, 0xF2, 0xF3, 0xF7}
REPLIES = {
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by the proxy's rules",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused by the relay's host",
    0x06: "TTL expired (tor: the circuit timed out)",
    0x07: "command not supported",
    0x08: "address type not supported",
    0xF0: "onion service descriptor not found (not published yet, or a wrong address)",
    0xF1: "onion service descriptor is invalid",
    0xF2: "introduction to the onion service failed",
    0xF3: "rendezvous with the onion service failed",
    0xF4: "the onion service is private and this tor has no client key for it",
    0xF5: "the onion service is private and refused this tor's client key (wrong, or revoked)",
    0xF6: "invalid onion address",
    0xF7: "introduction to the onion service timed out",
}


class BadProxy(VeilError):
    """Bad SOCKS proxy address: use HOST:PORT, e.g. 127.0.0.1:9050."""


def parse_proxy(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadProxy(f"bad SOCKS proxy address {text!r}: use HOST:PORT, e.g. 127.0.0.1:9050")
    return host, int(port)


def reply_code(exc: Exception) -> int | None:
    """The SOCKS reply code of a python-socks ProxyError. Codes outside RFC 1928 (tor's
    0xF0-0xF7) come without ``error_code``, only in the message ("Invalid reply code: 0XF0")."""
    code = getattr(exc, "error_code", None)
    if isinstance(code, int):
        return code
    match = re.search(r"reply code: 0X([0-9A-F]{2})", str(exc), re.IGNORECASE)
    return int(match.group(1), 16) if match else None


def describe(code: int | None) -> str:
    if code is None:
        return "the proxy failed"
    return f"{REPLIES.get(code, 'unknown error')} (SOCKS 0x{code:02X})"


def _python_socks() -> Any:
    try:
        from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
        from python_socks.async_.trio.v2 import Proxy
    except ImportError:
        raise VeilError("reaching a relay through SOCKS needs python-socks: pip install 'veil[tor]'") from None
    return Proxy, ProxyType, ProxyError, ProxyConnectionError, ProxyTimeoutError


async def open_socks_stream(
    proxy: str, host: str, port: int, *, timeout: float = CONNECT_TIMEOUT
) -> trio.SocketStream:
    """A stream to ``host``:``port`` through the SOCKS5 proxy at ``proxy`` (HOST:PORT), the
    name resolved by the proxy. Raises ``RelayUnreachable`` with the reason."""
    Proxy, ProxyType, ProxyError, ProxyConnectionError, ProxyTimeoutError = _python_socks()
    proxy_host, proxy_port = parse_proxy(proxy)
    socks = Proxy(ProxyType.SOCKS5, proxy_host, proxy_port, rdns=True)
    start = trio.current_time()
    deadline = start + timeout
    delay = BACKOFF_FIRST
    last = "no attempt"
    for attempt in range(1, MAX_ATTEMPTS + 1):
        left = deadline - trio.current_time()
        if left <= 0:
            break
        try:
            s = await socks.connect(host, port, timeout=min(left, ATTEMPT_TIMEOUT))
            stream: trio.SocketStream = s.trio_stream
            return stream
        except ProxyConnectionError:
            raise RelayUnreachable(
                f"cannot connect to the SOCKS proxy at {proxy}: is tor running there?"
            ) from None
        except ProxyTimeoutError:
            last = "timed out"
        except ProxyError as exc:
            code = reply_code(exc)
            if code in (MISSING, WRONG):  # a private onion service: worded by the caller, who knows the key
                raise OnionAuthRefused(f"cannot reach {host}: {describe(code)}", code, host) from None
            if code not in RETRY_CODES:
                raise RelayUnreachable(f"cannot reach {host} through the SOCKS proxy at {proxy}: {describe(code)}") from None
            last = describe(code)
        if attempt == MAX_ATTEMPTS or trio.current_time() + delay >= deadline:
            break
        await trio.sleep(delay)  # backoff: tor may not have the descriptor or circuits yet
        delay = min(delay * 2, BACKOFF_MAX)
    raise RelayUnreachable(
        f"cannot reach {host} through the SOCKS proxy at {proxy} "
        f"(gave up after {trio.current_time() - start:.0f}s; last: {last})"
    )
