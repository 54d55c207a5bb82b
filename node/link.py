"""The node's connection to a relay: requests with answers, and pushed deliveries.

``open_link`` connects (directly, or through a SOCKS5 proxy: always for a ``.onion``
relay, which is never resolved or dialled directly), starts one reader task, and
yields a ``RelayLink``. ``request`` sends a frame and waits for the answer
with the same id; an ``Error`` answer raises ``RelayRefused`` (or a more specific error).
Deliveries pushed by the relay arrive on ``link.deliveries``.
"""

from __future__ import annotations

import itertools
import ssl
import urllib.parse
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
    connect_websocket_url,
    wrap_client_stream,
)

import wire
from node.errors import ConnectionLost, RelayRefused, RelayUnreachable
from node.onion_auth import OnionAuthRefused, add_client_auth, refused

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


def is_onion(url: str) -> bool:
    """True if the relay address is a Tor onion service (checked without any lookup)."""
    try:
        host = urllib.parse.urlsplit(url.strip()).hostname or ""
    except ValueError:
        return False
    return host.rstrip(".").endswith(".onion")


async def _connect_socks(nursery: trio.Nursery, target: str, socks: str) -> WebSocketConnection:
    """The WebSocket handshake over a stream from the SOCKS5 proxy (which resolves the name)."""
    from node.socks import open_socks_stream

    parts = urllib.parse.urlsplit(target)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("not a ws:// or wss:// URL")
    host, secure = parts.hostname, parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
    stream = await open_socks_stream(socks, host, port)
    if secure:
        stream = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=host, https_compatible=True)
    name = f"[{host}]" if ":" in host else host
    resource = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            return await wrap_client_stream(
                nursery, stream, name if port in (80, 443) else f"{name}:{port}", resource,
                max_message_size=wire.WS_MAX_MESSAGE, message_queue_size=16,
            )
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


def _split_client_key(url: str) -> tuple[str, str | None]:
    """The address without a private onion relay's ``#client=KEY``, and the key."""
    if "#" not in url:
        return url, None
    from wire.address import AddressError, parse_address

    try:
        address = parse_address(url)
    except AddressError as exc:
        raise RelayUnreachable(str(exc)) from None
    return address.url, address.client_key


@asynccontextmanager
async def open_link(url: str, socks: str | None = None, tor_control: str | None = None) -> AsyncIterator[RelayLink]:
    """Connect to the relay at ``url`` (ws://host:port), through the SOCKS5 proxy
    ``socks`` (HOST:PORT) if given, and close when done. A ``.onion`` relay without a
    proxy is refused before any lookup or connection. A private onion relay's client
    key (``#client=KEY``) goes to the tor at ``tor_control`` first (node/onion_auth.py)."""
    url, client_key = _split_client_key(url)
    target = url.rstrip("/") + wire.PATH
    if socks is None and is_onion(url):
        raise RelayUnreachable(
            f"{url} is an onion address: reach it through Tor with --socks HOST:PORT (or "
            "VEIL_SOCKS), e.g. --socks 127.0.0.1:9050; it is never resolved or dialled directly"
        )
    try:
        with collapse_groups():
            async with _open_link(url, target, socks, tor_control, client_key) as link:
                yield link
    except ConnectionRejected as exc:
        # The HTTP upgrade was refused (raised from trio-websocket's reader task, so it
        # crosses the nursery): most often a URL with a path, or not a Veil relay at all.
        raise RelayUnreachable(
            f"the server at {url} refused the WebSocket connection (HTTP {exc.status_code}):"
            " is it a Veil relay? give its address as ws://HOST:PORT, without a path"
        ) from None


@asynccontextmanager
async def _open_link(
    url: str, target: str, socks: str | None, tor_control: str | None, client_key: str | None,
) -> AsyncIterator[RelayLink]:
    with collapse_groups():
        async with trio.open_nursery() as nursery:
            try:
                if socks is not None:
                    if client_key is not None and tor_control is not None:
                        await add_client_auth(tor_control, urllib.parse.urlsplit(url).hostname or "", client_key)
                    ws = await _connect_socks(nursery, target, socks)
                else:
                    with trio.fail_after(CONNECT_TIMEOUT):
                        ws = await connect_websocket_url(
                            nursery, target, max_message_size=wire.WS_MAX_MESSAGE, message_queue_size=16
                        )
            except OnionAuthRefused as exc:
                raise refused(exc.code, exc.host, has_key=client_key is not None, control=tor_control) from None
            except (OSError, HandshakeError, trio.TooSlowError, ConnectionClosed) as exc:
                raise RelayUnreachable(f"cannot reach the relay at {url}") from exc
            except ValueError as exc:
                raise RelayUnreachable(f"bad relay address {url!r}: use ws://HOST:PORT") from exc
            link = RelayLink(ws, url)
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
