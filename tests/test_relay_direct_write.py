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

from relay.connection import _Line

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
