"""Heartbeats: a peer that stops answering pings is dropped; a live one is kept."""

from __future__ import annotations

import base64
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

import wire
from relay.connection import Limits
from relay.server import RelayConfig, RelayInfo, RelayState, serve
from tests.test_relay_support import insecure_context, raw_client

DEADLINE = 20


@pytest.fixture
async def fast_heartbeat(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[tuple[RelayInfo, RelayState]]:
    config = RelayConfig(data_dir=tmp_path / "relay", limits=Limits(heartbeat_interval=0.1, heartbeat_timeout=1.0))
    state = RelayState(config)
    info = await nursery.start(lambda task_status: serve(config, state=state, task_status=task_status))
    yield info, state


async def test_a_peer_that_does_not_answer_pings_is_dropped(
    fast_heartbeat: tuple[RelayInfo, RelayState],
) -> None:
    info, state = fast_heartbeat
    with trio.fail_after(DEADLINE):
        # A WebSocket handshake by hand, then silence: no pong will ever come.
        tcp = await trio.open_tcp_stream(info.host, info.port)
        stream = trio.SSLStream(tcp, insecure_context(), https_compatible=True)
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        await stream.send_all(
            f"GET {wire.PATH} HTTP/1.1\r\nHost: {info.host}:{info.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        received = b""
        while True:  # the relay's pings arrive, then the connection ends
            try:
                chunk = await stream.receive_some(4096)
            except trio.BrokenResourceError:  # closed without TLS's close_notify
                break
            if not chunk:
                break
            received += chunk
        assert received.startswith(b"HTTP/1.1 101")
        assert b"\x89" in received  # a ping frame (FIN + opcode 9)
        await trio.aclose_forcefully(stream)
        while state.connections.open:
            await state.connections.next_heartbeat()


async def test_a_live_peer_survives_heartbeats(fast_heartbeat: tuple[RelayInfo, RelayState]) -> None:
    info, state = fast_heartbeat
    with trio.fail_after(DEADLINE):
        async with raw_client(info.url) as client:
            start = state.connections.heartbeats
            while state.connections.heartbeats < start + 5:
                await state.connections.next_heartbeat()
            await client.assert_alive()
