"""Helpers for the relay tests (raw WebSocket clients, crafted frames); no tests here.

The relay tests talk to a real relay over a real WebSocket. ``RawClient`` speaks the
wire format by hand, so a test can send any bytes and see every frame the relay
answers, including ``Deliver`` pushes (kept aside in ``delivered``).
"""

from __future__ import annotations

import base64
import secrets
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import msgspec
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

import wire
from keyvault.auth import sign_challenge
from keyvault.kdf import TEST_KDF, password_keys
from keyvault.kem import KemUse, new_kem_key
from keyvault.keys import sign_device
from node.node import Node
from tests.conftest import PASSWORD, RelayRunner

DEADLINE = 30


def pack(obj: Any) -> bytes:
    """Any Python value as MessagePack (for hand-made frames)."""
    return msgspec.msgpack.encode(obj)


def ping(rid: int) -> bytes:
    return wire.encode(wire.Ping(id=rid))


# Whether an Ack is a request (with an id, answered Ok) or a notification (no id, no
# answer): the protocol is moving from the first to the second; these tests take either.
ACK_IS_REQUEST = "id" in wire.Ack.__struct_fields__


def ack_frame(eids: list[bytes], rid: int = 1) -> wire.Ack:
    fields: dict[str, Any] = {"eids": eids}
    if ACK_IS_REQUEST:
        fields["id"] = rid
    return wire.Ack(**fields)


def envelope(device_id: bytes, eid: bytes | None = None, blob: bytes | None = None) -> wire.Envelope:
    return wire.Envelope(
        device_id=device_id,
        eid=eid if eid is not None else secrets.token_bytes(16),
        blob=blob if blob is not None else secrets.token_bytes(64),
    )


class RawClient:
    """One hand-driven WebSocket connection to a relay."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.delivered: list[wire.Deliver] = []
        self._ids = 1000

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    async def send(self, data: bytes | str) -> None:
        await self.ws.send_message(data)

    async def frame(self) -> wire.Frame:
        """The next frame from the relay, whatever it is."""
        data = await self.ws.get_message()
        assert isinstance(data, bytes), "the relay sent a text message"
        return wire.decode_answer(data)

    async def answer(self) -> wire.Frame:
        """The next frame that is not a Deliver push (pushes go to ``delivered``)."""
        while True:
            frame = await self.frame()
            if isinstance(frame, wire.Deliver):
                self.delivered.append(frame)
                continue
            return frame

    async def ask(self, frame: wire.Frame) -> wire.Frame:
        """Send one request and return its answer (which must carry the same id)."""
        await self.send(wire.encode(frame))
        ans = await self.answer()
        assert ans.id == frame.id, (frame, ans)  # type: ignore[attr-defined]
        return ans

    async def ok(self, frame: wire.Frame) -> wire.Frame:
        ans = await self.ask(frame)
        assert not isinstance(ans, wire.Error), ans
        return ans

    async def refused(self, frame: wire.Frame, code: str) -> wire.Error:
        ans = await self.ask(frame)
        assert isinstance(ans, wire.Error), ans
        assert ans.code == code, ans
        return ans

    async def expect_error(self, data: bytes | str, code: str, rid: int = 0) -> wire.Error:
        """Send raw bytes (or text); the answer must be Error(code) with id ``rid``."""
        await self.send(data)
        ans = await self.answer()
        assert isinstance(ans, wire.Error), ans
        assert (ans.code, ans.id) == (code, rid), ans
        assert ans.message, "an error carries a message for people"
        return ans

    async def assert_alive(self) -> None:
        """The connection still answers a Ping with Ok carrying the Ping's id."""
        rid = self.next_id()
        await self.send(ping(rid))
        assert await self.answer() == wire.Ok(id=rid)

    async def ack(self, eids: list[bytes]) -> None:
        """Acknowledge envelopes, and return once the relay has committed the deletion
        (or would have). A notification Ack gets no answer, so it is followed by a Send to
        a device that does not exist: acks queued before a send are committed no later
        than the send's own (failed) commit, whose answer is the barrier."""
        if ACK_IS_REQUEST:
            await self.ok(ack_frame(eids, self.next_id()))
            return
        await self.send(wire.encode(ack_frame(eids)))
        await self.barrier()

    async def barrier(self) -> None:
        """Return once everything this connection sent before has been committed: a Send
        to a made-up device fails in a commit no earlier than theirs (and pushes nothing)."""
        barrier = wire.Send(id=self.next_id(), envelopes=[envelope(secrets.token_bytes(16))])
        await self.refused(barrier, wire.ErrorCode.UNKNOWN_DEVICE)

    async def resume(self, node: Node) -> None:
        """Authenticate this connection with the node's stored session token."""
        token = node.store.get("token")
        assert token
        ans = await self.ok(wire.Resume(id=self.next_id(), token=token))
        assert isinstance(ans, wire.ResumeOk) and ans.device_id == node.device_id

    async def mail_until_synced(self) -> list[wire.Mail]:
        """Every envelope pushed until (and including) a Deliver marked ``synced``."""
        items: list[wire.Mail] = []
        while True:
            if self.delivered:
                frame: wire.Frame = self.delivered.pop(0)
            else:
                frame = await self.frame()
            assert isinstance(frame, wire.Deliver), frame
            items += frame.items
            if frame.synced:
                return items

    async def login_frame(
        self,
        node: Node,
        *,
        challenge_for: str | None = None,
        purpose: wire.Purpose = "login",
        password: str = PASSWORD,
        sign_as: str | None = None,
        relay_id: bytes | None = None,
    ) -> wire.Login:
        """A Login for ``node``'s account and device, built by hand: salt from
        auth_params, the password's auth key, a fresh challenge (by default for the
        same name and purpose "login"), and this device's certificate."""
        params = await self.ok(wire.AuthParams(id=self.next_id(), name=node.name))
        assert isinstance(params, wire.AuthParamsOk)
        kdf = params.kdf
        assert (kdf.t, kdf.m, kdf.p) == (TEST_KDF.time_cost, TEST_KDF.memory_kib, TEST_KDF.parallelism)
        seed = password_keys(password, params.salt, TEST_KDF).auth_seed
        ch = await self.ok(
            wire.Challenge(id=self.next_id(), name=challenge_for or node.name, purpose=purpose)
        )
        assert isinstance(ch, wire.ChallengeOk)
        assert len(ch.challenge) == 32
        signature = sign_challenge(
            seed, "login", relay_id or ch.relay_id, sign_as or node.name, ch.challenge
        )
        return wire.Login(
            id=self.next_id(),
            name=node.name,
            challenge=ch.challenge,
            signature=signature,
            device=wire.DeviceCert(node.device_id, sign_device(node.keys, node.name, node.device_id)),
        )


def insecure_context() -> ssl.SSLContext:
    """A client context that accepts the relay's self-signed certificate (these helpers talk
    to the test's own relay on loopback; the node's pin check is tested in test_tls.py)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def plain_url(url: str) -> str:
    """The relay address without its #pin: what a WebSocket library dials."""
    return url.split("#", 1)[0]


@asynccontextmanager
async def raw_client(url: str, path: str = wire.PATH) -> AsyncIterator[RawClient]:
    ws: WebSocketConnection | None = None
    ctx = insecure_context() if url.startswith("wss://") else None
    try:
        async with open_websocket_url(
            plain_url(url) + path, ssl_context=ctx, max_message_size=wire.WS_MAX_MESSAGE, message_queue_size=256
        ) as ws:
            yield RawClient(ws)
    finally:
        # trio-websocket 0.12 leaves the client's socket open when the *server* closes
        # the connection (then a ResourceWarning fails some later test): close it here.
        if ws is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(ws._stream)


async def handshake_status(url: str, path: str) -> int:
    """The HTTP status a WebSocket upgrade request for ``path`` gets (101 when accepted).
    Done by hand: trio-websocket leaks its socket when a handshake is rejected."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    stream: trio.abc.Stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    if parts.scheme == "wss":
        stream = trio.SSLStream(stream, insecure_context(), server_hostname=None, https_compatible=True)
    async with stream:
        await stream.send_all(request.encode())
        head = b""
        while b"\r\n" not in head:
            chunk = await stream.receive_some(4096)
            assert chunk, "the relay closed the connection without an HTTP answer"
            head += chunk
    status_line = head.split(b"\r\n", 1)[0].decode()
    assert status_line.startswith("HTTP/1.1 "), status_line
    return int(status_line.split()[1])


async def sql(relay: RelayRunner, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of a query run on the live relay database, in the store's own thread (the
    connection must not be used by two threads at once)."""
    state = relay.state
    assert state is not None
    return await state.mailroom.call(state.store.query, query, *args)


async def publish_kem_keys(relay: RelayRunner, node: Node) -> None:
    """Give the node's device a last-resort KEM prekey and an envelope key at the relay
    (replacing any it published), so that a test of the tables finds some."""
    keys = [new_kem_key(node.keys, use, 4_000_000_000 + use, 0, device_id=node.device_id)
            for use in (KemUse.LAST_RESORT, KemUse.ENVELOPE)]
    pubs = [wire.KemKeyPub(k.key_id, k.public, k.signature) for k in keys]
    async with raw_client(relay.url) as c:
        await c.resume(node)
        ans = await c.ok(wire.UploadPrekeys(id=c.next_id(), prekeys=wire.PrekeySet(
            kem_last_resort=pubs[0], envelope_key=pubs[1])))
        assert isinstance(ans, wire.PrekeyStatusOk) and ans.envelope_key_id == keys[1].key_id


async def mailbox_eids(relay: RelayRunner, device_id: bytes) -> list[bytes]:
    rows = await sql(relay, "SELECT eid FROM mailbox WHERE device_id = ? ORDER BY seq", device_id)
    return [bytes(r[0]) for r in rows]
