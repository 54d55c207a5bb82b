"""The node's connection to a relay: requests with answers, and pushed deliveries.

``open_link`` connects (directly, or through a SOCKS5 proxy: always for a ``.onion``
relay, which is never resolved or dialled directly), starts one reader task, and
yields a ``RelayLink``. ``request`` sends a frame and waits for the answer
with the same id; an ``Error`` answer raises ``RelayRefused`` (or a more specific error).
Deliveries pushed by the relay arrive on ``link.deliveries``.
"""

from __future__ import annotations

import ipaddress
import itertools
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import msgspec
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

import wire
from keyvault.pins import certificate_pin
from node.errors import (
    ConnectionLost,
    PlainRefused,
    RelayKeyMismatch,
    RelayRefused,
    RelayUnreachable,
    VeilError,
)
from node.onion_auth import OnionAuthRefused, add_client_auth, refused
from wire.address import AddressError, RelayAddress, is_loopback, parse_address
from wire.websocket import guard as _guard_websocket

_guard_websocket()  # a Ping after our Close must not end the whole server (wire/websocket.py)

CONNECT_TIMEOUT = 15.0
HANDSHAKE_TIMEOUT = 30.0  # the WebSocket handshake over a SOCKS stream (Tor is slower)
REQUEST_TIMEOUT = 60.0
DELIVERY_QUEUE = 64
ACK_DELAY = 0.02
ACK_BATCH = 1024

F = TypeVar("F", bound=wire.Frame)


class RelayLink:
    """One open connection to a relay."""

    def __init__(self, ws: WebSocketConnection, url: str) -> None:
        self.ws = ws
        self.url = url
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[wire.Frame]] = {}
        self._send_lock = trio.Lock()
        self._deliver_in, self.deliveries = trio.open_memory_channel[wire.Deliver](DELIVERY_QUEUE)
        self.closed = trio.Event()
        self.device_id: bytes | None = None
        self.revoked = False  # the relay said, before closing, that this device was revoked
        self._acks: list[bytes] = []
        self._ack_wake = trio.Event()
        self._deferred: dict[bytes, tuple[float, str]] = {}  # device id -> (when to try again, why)

    def defer(self, device_id: bytes, seconds: float, reason: str) -> None:
        """Send nothing more to this device's mailbox on this link for a while (it is
        full, or takes no more from this account for now)."""
        self._deferred[device_id] = (trio.current_time() + seconds, reason)

    def why_deferred(self, device_id: bytes) -> str | None:
        got = self._deferred.get(device_id)
        return None if got is None else got[1]

    def deferred(self, device_id: bytes) -> bool:
        got = self._deferred.get(device_id)
        if got is None:
            return False
        if trio.current_time() >= got[0]:
            del self._deferred[device_id]
            return False
        return True

    def ack_soon(self, eids: list[bytes]) -> None:
        """Acknowledge delivered envelopes within ACK_DELAY: acks from a busy stretch go
        out together, one frame instead of one per delivery (they are not urgent: a lost
        ack only means a redelivery that the node drops as already seen)."""
        self._acks.extend(eids)
        self._ack_wake.set()

    async def flush_acks(self) -> None:
        while self._acks:
            batch, self._acks = self._acks[:ACK_BATCH], self._acks[ACK_BATCH:]
            await self.notify(wire.Ack(eids=batch))

    async def acker(self) -> None:
        """Sends pending acks, at most one frame per ACK_DELAY (unless many are waiting)."""
        while True:
            await self._ack_wake.wait()
            self._ack_wake = trio.Event()
            if len(self._acks) < ACK_BATCH:
                await trio.sleep(ACK_DELAY)
            await self.flush_acks()

    async def request(self, kind: type[wire.Frame], **fields: Any) -> Any:
        """Send one request and return its answer frame (raises on an error answer)."""
        rid = next(self._ids)
        frame = kind(id=rid, **fields)
        send, recv = trio.open_memory_channel[wire.Frame](1)
        self._waiting[rid] = send
        try:
            await self._send(wire.encode(frame))
            with trio.fail_after(REQUEST_TIMEOUT):
                try:
                    answer = await recv.receive()
                except trio.EndOfChannel:
                    raise ConnectionLost() from None
        except trio.TooSlowError:
            raise ConnectionLost("the relay did not answer in time") from None
        finally:
            self._waiting.pop(rid, None)
        if isinstance(answer, wire.Error):
            raise RelayRefused(answer.code, answer.message)
        return answer

    async def notify(self, frame: wire.Frame) -> None:
        """Send a frame that gets no answer (an Ack)."""
        await self._send(wire.encode(frame))

    async def _send(self, data: bytes) -> None:
        # One writer at a time; a cancelled half-sent frame would corrupt the stream,
        # so the send itself is shielded and bounded instead of cancellable.
        async with self._send_lock:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(REQUEST_TIMEOUT) as scope:
                    try:
                        await self.ws.send_message(data)
                    except ConnectionClosed:
                        raise ConnectionLost() from None
                if scope.cancelled_caught:
                    await trio.aclose_forcefully(self.ws._stream)
                    raise ConnectionLost("sending to the relay timed out")

    async def reader(self) -> None:
        """Route answers to their requests and deliveries to ``deliveries``."""
        try:
            while True:
                try:
                    data = await self.ws.get_message()
                except ConnectionClosed:
                    return
                try:
                    frame = wire.decode_answer(data if isinstance(data, bytes) else data.encode())
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue  # a newer relay's frame we do not know: ignore it
                if isinstance(frame, wire.Deliver):
                    await self._deliver_in.send(frame)
                    continue
                if isinstance(frame, wire.Error) and frame.id == 0 and frame.code == wire.ErrorCode.DEVICE_REVOKED:
                    self.revoked = True
                    continue
                waiter = self._waiting.pop(frame.id, None)
                if waiter is not None:
                    waiter.send_nowait(frame)
        finally:
            self.closed.set()
            self._deliver_in.close()
            for waiter in self._waiting.values():
                waiter.close()
            self._waiting.clear()

    async def aclose(self) -> None:
        with trio.move_on_after(2):
            await self.ws.aclose()
        # trio-websocket 0.12 leaves the client's socket open when the relay closed the
        # connection first (a relay ending its connections, say): close it here.
        await trio.aclose_forcefully(self.ws._stream)


def _single(exc: BaseException) -> BaseException | None:
    """The one exception inside (nested) groups, or None if there are several."""
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


@contextmanager
def collapse_groups() -> Iterator[None]:
    """Re-raise a group holding a single exception as that exception, so callers can
    catch ``VeilError`` and friends that crossed a nursery."""
    try:
        yield
    except BaseExceptionGroup as group:
        single = _single(group)
        if single is None:
            raise
        raise single from single.__cause__


def shown_address(url: str) -> str:
    """A relay address as shown to people: with its pin, never with a client key."""
    try:
        return str(parse_address(url).public)
    except AddressError:
        return url


def check_address(url: str, *, insecure: bool = False) -> RelayAddress:
    """The parsed relay address, if this node may use it: plain ws:// only for loopback,
    an onion address, or when the user said --insecure-no-tls (one-line errors)."""
    try:
        address = parse_address(url)
    except AddressError as exc:
        raise RelayUnreachable(str(exc)) from None
    if not address.secure and not address.plain_allowed and not insecure:
        raise PlainRefused(
            f"{address.url} is plain ws:// to a host that is neither loopback nor an onion address:"
            " anyone on the path could read and change the traffic; use the relay's wss:// address"
            " (with its #pin), or --insecure-no-tls if you really mean it"
        )
    return address


def _client_context(address: RelayAddress) -> ssl.SSLContext:
    """A pinned address: the certificate's name, dates and issuer are not checked (the
    relay's own certificate is self-signed); its key is, against the pin, after the
    handshake and before anything is sent. Otherwise the system's CA store and the host
    name, as a browser does."""
    if address.pin is None:
        ctx = ssl.create_default_context()
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def _secure(stream: trio.SocketStream, address: RelayAddress) -> trio.SSLStream[trio.SocketStream]:
    """TLS over ``stream``; with a pin, the relay's key checked before returning."""
    server_hostname = None if address.pin is not None and _is_ip(address.host) else address.host
    tls = trio.SSLStream(stream, _client_context(address), server_hostname=server_hostname, https_compatible=True)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        reason = exc.__cause__
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise RelayUnreachable(
                f"the relay at {address.url} has a certificate this system does not trust"
                f" ({reason.verify_message}); if it uses its own key, ask for its address with the #pin"
            ) from None
        raise RelayUnreachable(f"cannot reach the relay at {address.url}: the TLS handshake failed") from None
    if address.pin is not None:
        der = tls.getpeercert(binary_form=True)
        try:
            got = certificate_pin(der) if der else None
        except ValueError:
            got = None
        if got != address.pin:
            await trio.aclose_forcefully(tls)
            raise RelayKeyMismatch(
                f"the relay at {address.url} presented a key that does not match the pin in its"
                " address: refused, nothing was sent (someone may be impersonating it, or it has a new"
                " key: check the address with its operator)"
            )
    return tls


def _loopback_proxy(socks: str) -> bool:
    from node.socks import parse_proxy

    try:
        host, _ = parse_proxy(socks)
    except VeilError:
        return False
    return is_loopback(host)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _connect(nursery: trio.Nursery, address: RelayAddress, socks: str | None) -> WebSocketConnection:
    """A TCP stream (direct, or from the SOCKS5 proxy, which then resolves the name), TLS
    if the address says wss://, and the WebSocket handshake over it."""
    tcp: trio.SocketStream
    if socks is not None:
        from node.socks import open_socks_stream

        tcp = await open_socks_stream(socks, address.host, address.port)
    else:
        # "localhost" is dialled as 127.0.0.1, not looked up: a resolver that answers for it
        # with another address would carry plain ws:// off the machine.
        host = "127.0.0.1" if address.host == "localhost" else address.host
        with trio.fail_after(CONNECT_TIMEOUT):
            tcp = await trio.open_tcp_stream(host, address.port)
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = tcp
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT if socks is not None else CONNECT_TIMEOUT):
            if address.secure:
                stream = await _secure(tcp, address)
            return await wrap_client_stream(
                nursery, stream, address.hostport, wire.PATH,
                max_message_size=wire.WS_MAX_MESSAGE, message_queue_size=16,
            )
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


@asynccontextmanager
async def open_link(
    url: str, socks: str | None = None, *, insecure: bool = False, tor_control: str | None = None,
) -> AsyncIterator[RelayLink]:
    """Connect to the relay at ``url`` (an address of wire.address's grammar), through the
    SOCKS5 proxy ``socks`` (HOST:PORT) if given, and close when done. A ``.onion`` relay
    without a proxy is refused before any lookup or connection; so is plain ws:// off
    loopback (unless ``insecure``); a pinned relay with another key, before anything is sent.
    A private onion relay's client key (``#client=KEY``) goes to the tor at ``tor_control``
    first (node/onion_auth.py)."""
    address = check_address(url, insecure=insecure)
    if socks is not None and not address.secure and not address.onion and not insecure and not _loopback_proxy(socks):
        raise PlainRefused(
            f"{address.url} is plain ws://, and the SOCKS proxy {socks} is not on this machine: the traffic"
            " would cross the network in the clear; use the relay's wss:// address, or --insecure-no-tls"
        )
    if socks is None and address.onion:
        raise RelayUnreachable(
            f"{address.url} is an onion address: reach it through Tor with --socks HOST:PORT (or "
            "VEIL_SOCKS), e.g. --socks 127.0.0.1:9050; it is never resolved or dialled directly"
        )
    try:
        with collapse_groups():
            async with _open_link(address, socks, tor_control) as link:
                yield link
    except ConnectionRejected as exc:
        # The HTTP upgrade was refused (raised from trio-websocket's reader task, so it
        # crosses the nursery): most often not a Veil relay at all.
        raise RelayUnreachable(
            f"the server at {address.url} refused the WebSocket connection (HTTP {exc.status_code}):"
            " is it a Veil relay?"
        ) from None


@asynccontextmanager
async def _open_link(address: RelayAddress, socks: str | None, tor_control: str | None) -> AsyncIterator[RelayLink]:
    with collapse_groups():
        async with trio.open_nursery() as nursery:
            try:
                if socks is not None and address.client_key is not None and tor_control is not None:
                    await add_client_auth(tor_control, address.host, address.client_key)
                ws = await _connect(nursery, address, socks)
            except OnionAuthRefused as exc:
                raise refused(exc.code, exc.host, has_key=address.client_key is not None, control=tor_control) from None
            except (OSError, HandshakeError, trio.TooSlowError, ConnectionClosed, trio.BrokenResourceError) as exc:
                raise RelayUnreachable(f"cannot reach the relay at {address.url}") from exc
            link = RelayLink(ws, str(address.public))
            nursery.start_soon(link.reader)
            nursery.start_soon(link.acker)
            try:
                yield link
            finally:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(2):
                        try:
                            await link.flush_acks()
                        except ConnectionLost:
                            pass
                    await link.aclose()
                nursery.cancel_scope.cancel()
