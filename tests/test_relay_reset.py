"""A client that resets its TCP connection while answers to its sends are still to come
(found by an attacker's review): the answers are written to the socket from the commit's
callback, and the write fails there. It must end that connection only, not the relay
(it did: the error went up through the commit loop), with TLS and without."""

from __future__ import annotations

import secrets
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

import wire
from node.node import Node
from tests.conftest import Accounts, RelayRunner
from tests.test_relay_support import (
    DEADLINE,
    RawClient,
    envelope,
    insecure_context,
    plain_url,
    raw_client,
)

ROUNDS = 8  # the reset wins the race most of the time; a few rounds make it all but sure
SENDS = 600


@pytest.fixture(params=["wss", "ws"])
async def relay(request: pytest.FixtureRequest, nursery: trio.Nursery, tmp_path: Path,
                store_dsn: str | None) -> AsyncIterator[RelayRunner]:
    runner = RelayRunner(nursery, tmp_path / "relay", store=store_dsn, tls=request.param == "wss")
    await runner.start()
    yield runner
    if runner._scope is not None:
        runner._scope.cancel()


async def _send_and_reset(relay: RelayRunner, node: Node) -> None:
    ctx = insecure_context() if relay.url.startswith("wss://") else None
    async with open_websocket_url(plain_url(relay.url) + wire.PATH, ssl_context=ctx,
                                  max_message_size=wire.WS_MAX_MESSAGE, message_queue_size=10_000) as ws:
        c = RawClient(ws)
        await c.resume(node)
        await c.mail_until_synced()
        answered = trio.Event()

        async def drain() -> None:
            try:
                while True:
                    await ws.get_message()
                    answered.set()
            except ConnectionClosed:
                pass

        async with trio.open_nursery() as n:
            n.start_soon(drain)
            # Sends to made-up devices: each is answered from its commit's callback.
            for _ in range(SENDS):
                f = wire.Send(id=c.next_id(), envelopes=[envelope(secrets.token_bytes(16),
                                                                  blob=secrets.token_bytes(2000))])
                await ws.send_message(wire.encode(f))
            await answered.wait()  # answers are flowing: reset the TCP connection under them
            stream = getattr(ws._stream, "transport_stream", ws._stream)
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await trio.aclose_forcefully(ws._stream)
            n.cancel_scope.cancel()


async def test_a_reset_under_answers_ends_only_that_connection(accounts: Accounts) -> None:
    relay = accounts.relay
    with trio.fail_after(DEADLINE * 3):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        for _ in range(ROUNDS):
            await _send_and_reset(relay, bob)
        async with raw_client(relay.url) as a:
            await a.resume(alice)
            # A send answered after every commit before it: their callbacks have run.
            f = wire.Send(id=a.next_id(), envelopes=[envelope(secrets.token_bytes(16))])
            answer = await a.ask(f)
            assert answer.id == f.id  # type: ignore[attr-defined]
            await a.assert_alive()
