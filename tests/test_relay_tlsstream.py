"""The relay's TLS stream (relay/tlsstream.py): OpenSSL on a non-blocking socket under
trio, against trio's own client-side SSLStream on real loopback sockets."""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from relay.tls import RelayTls
from relay.tlsstream import TlsListener, TlsStream

DEADLINE = 30
BIG = 8 * 1024 * 1024  # far more than the sockets buffer: OpenSSL must wait to write


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@asynccontextmanager
async def pair(tmp_path: Path) -> AsyncIterator[tuple[TlsStream, trio.SSLStream[trio.SocketStream], TlsListener]]:
    """A server TlsStream and the client stream connected to it."""
    tls = RelayTls(tmp_path)
    (raw,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = TlsListener(raw, tls.context)
    port = listener.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        accepted: list[TlsStream] = []

        async def accept() -> None:
            accepted.append(await listener.accept())

        nursery.start_soon(accept)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        client = trio.SSLStream(tcp, client_context(), server_hostname="veil-relay", https_compatible=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(accepted[0].do_handshake)
        nursery.start_soon(client.do_handshake)
    try:
        yield accepted[0], client, listener
    finally:
        await listener.aclose()
        await trio.aclose_forcefully(client)
        await accepted[0].aclose()


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        got += chunk
    return bytes(got)


async def test_large_writes_both_ways_at_once_arrive_whole(tmp_path: Path) -> None:
    up, down = os.urandom(BIG), os.urandom(BIG)
    with trio.fail_after(DEADLINE):
        async with pair(tmp_path) as (server, client, _):
            results: dict[str, bytes] = {}

            async def server_reads() -> None:
                results["up"] = await receive_exactly(server, BIG)

            async def client_reads() -> None:
                results["down"] = await receive_exactly(client, BIG)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(server_reads)
                nursery.start_soon(client_reads)
                nursery.start_soon(server.send_all, down)
                nursery.start_soon(client.send_all, up)
            assert results["up"] == up
            assert results["down"] == down


async def test_a_send_cut_off_midway_leaves_the_stream_broken(tmp_path: Path) -> None:
    with trio.fail_after(DEADLINE):
        async with pair(tmp_path) as (server, client, _):
            await client.send_all(b"hello")  # the handshake, and something to read
            assert await server.receive_some(100) == b"hello"
            # The client reads nothing: the write fills the socket, then waits.
            with trio.move_on_after(0.5) as scope:
                await server.send_all(os.urandom(BIG))
            assert scope.cancelled_caught
            with pytest.raises(trio.BrokenResourceError):
                await server.send_all(b"more")


async def test_two_sends_at_once_are_refused(tmp_path: Path) -> None:
    with trio.fail_after(DEADLINE):
        async with pair(tmp_path) as (server, client, _):
            await client.send_all(b"x")
            assert await server.receive_some(10) == b"x"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.send_all, os.urandom(BIG))
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    await server.send_all(b"second")
                nursery.cancel_scope.cancel()


async def test_close_ends_the_peers_reads_and_later_calls_fail(tmp_path: Path) -> None:
    with trio.fail_after(DEADLINE):
        async with pair(tmp_path) as (server, client, _):
            await server.send_all(b"bye")
            assert await receive_exactly(client, 3) == b"bye"
            await server.aclose()
            assert await client.receive_some(10) == b""
            with pytest.raises(trio.ClosedResourceError):
                await server.send_all(b"x")
            with pytest.raises(trio.ClosedResourceError):
                await server.receive_some(10)
            await server.aclose()  # twice is fine


async def test_garbage_instead_of_a_handshake_breaks_that_stream_only(tmp_path: Path) -> None:
    tls = RelayTls(tmp_path)
    (raw,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = TlsListener(raw, tls.context)
    port = listener.socket.getsockname()[1]
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            streams: list[TlsStream] = []

            async def accept() -> None:
                streams.append(await listener.accept())

            nursery.start_soon(accept)
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
        await tcp.send_all(b"GET / HTTP/1.1\r\n\r\n" * 4)
        with pytest.raises(trio.BrokenResourceError):
            await streams[0].receive_some(100)
        await streams[0].aclose()
        await tcp.aclose()
        # The listener goes on: a real client gets through.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            good = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), client_context(),
                                  server_hostname="veil-relay")
        got: list[bytes] = []

        async def server_reads() -> None:
            got.append(await streams[1].receive_some(10))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_reads)
            await good.send_all(b"fine")
        assert got == [b"fine"]
        await streams[1].aclose()
        await trio.aclose_forcefully(good)
        await listener.aclose()


async def test_a_peer_that_vanishes_mid_handshake_is_a_broken_stream(tmp_path: Path) -> None:
    tls = RelayTls(tmp_path)
    (raw,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = TlsListener(raw, tls.context)
    port = listener.socket.getsockname()[1]
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            streams: list[TlsStream] = []

            async def accept() -> None:
                streams.append(await listener.accept())

            nursery.start_soon(accept)
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
        await tcp.aclose()
        with pytest.raises(trio.BrokenResourceError):
            await streams[0].do_handshake()
        await streams[0].aclose()
        await listener.aclose()
