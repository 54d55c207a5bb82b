"""TLS for the relay's connections: the ssl module's own socket, driven by trio.

trio's ``SSLStream`` runs OpenSSL over memory buffers and moves every record between
them and the socket in Python, under two locks, on every read and write. On the relay
that was the largest cost per frame (measured: 37-41 % of the event loop's time under
load, and another 20 % in the socket calls it makes). Here OpenSSL reads and writes the
(non-blocking) socket itself, in one C call per frame; trio only waits for the socket
when OpenSSL says it must (``SSLWantReadError`` / ``SSLWantWriteError``).

The stream keeps trio's contract: every call is a checkpoint, a send and a receive may
run at once (in two tasks), two sends or two receives at once are an error, and a send
cut off mid-way (cancelled while OpenSSL holds part of a record) leaves the stream
broken, as trio's ``SSLStream`` does. Closing sends TLS's close_notify when the socket
takes it at once and does not wait for the peer's (like ``https_compatible=True``).
"""

from __future__ import annotations

import socket
import ssl

import trio

__all__ = ["TlsListener", "TlsStream"]

RECEIVE_SIZE = 65536

_GONE = (ssl.SSLError, OSError)


class TlsStream(trio.abc.Stream):
    """A server-side TLS connection over a non-blocking ``ssl.SSLSocket``."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.socket = sock
        self._handshake_done = False
        self._handshake_lock = trio.Lock()
        self._sending = False
        self._receiving = False
        self._broken = False
        self._closed = False

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this TLS stream is closed")
        if self._broken:
            raise trio.BrokenResourceError("this TLS stream is broken")

    async def _wait(self, want: ssl.SSLError) -> None:
        if isinstance(want, ssl.SSLWantWriteError):
            await trio.lowlevel.wait_writable(self.socket)
        else:
            await trio.lowlevel.wait_readable(self.socket)

    async def do_handshake(self) -> None:
        """Run the handshake (once; later calls return at once)."""
        async with self._handshake_lock:
            while not self._handshake_done:
                self._check()
                try:
                    self.socket.do_handshake()
                    self._handshake_done = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as want:
                    try:
                        await self._wait(want)
                    except BaseException:
                        self._broken = True
                        raise
                except _GONE as exc:
                    self._broken = True
                    raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this TLS stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check()
            if not self._handshake_done:
                await self.do_handshake()
            view = memoryview(data)
            while view:
                try:
                    sent = self.socket.send(view)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as want:
                    # OpenSSL holds part of this write: it must be retried with the same
                    # bytes, so a send cut off here leaves the stream unusable.
                    try:
                        await self._wait(want)
                    except BaseException:
                        self._broken = True
                        raise
                    continue
                except _GONE as exc:
                    self._broken = True
                    raise trio.BrokenResourceError(f"TLS send failed: {exc}") from exc
                view = view[sent:]
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.socket)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this TLS stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check()
            if not self._handshake_done:
                await self.do_handshake()
            size = max_bytes or RECEIVE_SIZE
            while True:
                try:
                    # b"" at the peer's close_notify, and at a bare TCP close too
                    # (suppress_ragged_eofs): the WebSocket layer tells a clean end.
                    data = self.socket.recv(size)
                    break
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as want:
                    await self._wait(want)  # nothing was consumed: safe to cancel here
                except _GONE as exc:
                    self._broken = True
                    raise trio.BrokenResourceError(f"TLS receive failed: {exc}") from exc
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        sock = self.socket
        try:
            if self._handshake_done and not self._broken:
                try:
                    sock.unwrap()  # sends close_notify; the peer's is not awaited
                except _GONE:
                    pass
        finally:
            trio.lowlevel.notify_closing(sock)
            sock.close()
        await trio.lowlevel.checkpoint()


class TlsListener(trio.abc.Listener[TlsStream]):
    """Accepts TCP connections from ``transport`` and wraps each in a TlsStream (the
    handshake runs on its first read or write, under the WebSocket handshake's timeout)."""

    def __init__(self, transport: trio.SocketListener, context: ssl.SSLContext) -> None:
        self.transport_listener = transport
        self.context = context

    @property
    def socket(self) -> trio.socket.SocketType:
        return self.transport_listener.socket

    async def accept(self) -> TlsStream:
        while True:
            stream = await self.transport_listener.accept()
            fd = stream.socket.detach()  # TCP_NODELAY, set by SocketStream, stays with it
            sock = socket.socket(fileno=fd)
            try:
                sock.setblocking(False)
                tls = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except OSError:  # gone already (reset before we got to it): the next one
                sock.close()
                continue
            except BaseException:
                sock.close()
                raise
            return TlsStream(tls)

    async def aclose(self) -> None:
        await self.transport_listener.aclose()
