"""The relay writes most frames straight to the socket (relay/connection.py, _Line):
when the socket takes only part of one, nothing may be written before its rest, not
even a frame of trio-websocket's own (a Pong, a Ping, a Close)."""

from __future__ import annotations

import secrets
import socket

import trio
import trio.testing
from trio_websocket import (
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

from relay.connection import WAITING_BYTES, RelayConnections, _Line
from relay.limits import ByteBudget

DEADLINE = 20.0


async def test_a_frame_half_written_goes_out_whole_before_any_other() -> None:
    big = secrets.token_bytes(4 * 1024 * 1024)  # more than the socket buffers hold
    read_now = trio.Event()
    checked: list[str] = []

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        sock = ws._stream.socket  # type: ignore[attr-defined]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        _in, queue = trio.open_memory_channel[tuple[bytes, int, bool]](8)
        line = _Line(ws, queue)
        rest = line.direct(big)
        assert rest, "the socket took the whole frame: the test did not get a half-written one"
        assert line.direct(b"next") is None  # nothing of ours either, until the rest is out
        pinged = trio.Event()

        async def ping() -> None:
            await ws.ping(b"p")  # through trio-websocket's own send: must wait for the rest
            pinged.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ping)
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            checked.append("ping held" if not pinged.is_set() and ws.veil_hold is not None else "ping not held")  # type: ignore[attr-defined]
            read_now.set()
            async with ws._stream_lock:
                await ws._stream.send_all(rest)
            line.release()
            await pinged.wait()  # the client answered the Ping: it came after the frame
        await ws.send_message(b"after")
        await trio.sleep_forever()

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(lambda task_status: serve_websocket(
                handler, "127.0.0.1", 0, ssl_context=None, max_message_size=len(big) + 1024,
                task_status=task_status))
            client: WebSocketConnection
            async with open_websocket_url(f"ws://127.0.0.1:{server.port}/",
                                          max_message_size=len(big) + 1024) as client:
                await read_now.wait()
                assert await client.get_message() == big  # whole: no Ping inside it
                assert await client.get_message() == b"after"
            nursery.cancel_scope.cancel()
    assert checked == ["ping held"]


async def _handed_over(second: bytes, small_buffer: bool) -> list[bytes]:
    """The sender task waits for a frame; trio-websocket's own send (a Pong) holds the
    stream, so an answer is queued, which the memory channel hands straight to the
    waiting sender (its buffer stays empty); the Pong ends and the next answer comes
    before the sender has run. It must not go first, nor, half-written, hold the sender."""
    got: list[bytes] = []

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        if small_buffer:
            ws._stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)  # type: ignore[attr-defined]
        conns = RelayConnections(None)  # type: ignore[arg-type]
        send_in, send_out = trio.open_memory_channel[tuple[bytes, int, bool]](8)
        line = _Line(ws, send_out, send_in)
        async with trio.open_nursery() as n:
            n.start_soon(conns._sender, ws, line, send_out, ByteBudget(WAITING_BYTES), n.cancel_scope)
            await trio.testing.wait_all_tasks_blocked()  # the sender waits in frames.receive()
            await ws._stream_lock.acquire()  # a Pong being sent
            assert line.direct(b"first") is None  # refused: the stream is busy
            line.put_nowait((b"first", 0, False))  # as an answer is queued
            assert not send_out.statistics().current_buffer_used  # handed over, not buffered
            ws._stream_lock.release()
            rest = line.direct(second)  # the next answer, before the sender has run
            assert rest is None  # it waits its turn
            line.put_nowait((second, 0, False))
            await trio.sleep_forever()

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(lambda task_status: serve_websocket(
                handler, "127.0.0.1", 0, ssl_context=None, max_message_size=8 << 20, task_status=task_status))
            client: WebSocketConnection
            async with open_websocket_url(f"ws://127.0.0.1:{server.port}/", max_message_size=8 << 20) as client:
                while len(got) < 2:
                    got.append(await client.get_message())  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()
    return got


async def test_a_frame_handed_to_the_waiting_sender_is_not_overtaken() -> None:
    assert await _handed_over(b"second", small_buffer=False) == [b"first", b"second"]
    big = secrets.token_bytes(4 << 20)  # would be half-written, and hold the sender behind it
    assert await _handed_over(big, small_buffer=True) == [b"first", big]
