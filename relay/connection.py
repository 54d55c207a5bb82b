"""One WebSocket connection to the relay: reader, sender, heartbeat.

The connection owns a nursery: the reader (this function's body), one sender task fed
by a bounded channel (the only writer of data frames), a heartbeat, and, once the peer
has a session, its delivery outlet. A send that times out or is cancelled half-way
closes the TCP stream at once: a half-written frame would corrupt everything after it.
Nothing escapes ``handle_connection``: trio-websocket stops the whole server when a
handler raises, so every exception ends only this connection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

import wire
from relay.auth import Bucket
from relay.service import Peer, Refused, RelayService

log = logging.getLogger("veil.relay")

SEND_TIMEOUT = 30.0
HEARTBEAT_INTERVAL = 20.0
HEARTBEAT_TIMEOUT = 20.0
OUTBOX_FRAMES = 1024
WAITING_FRAMES = 64  # of which frames that can wait (deliveries, error answers) may use
MAX_INFLIGHT = 32  # Sends awaiting their commit, per connection
# Frames per second per connection (a token bucket). A whole message to every device of
# a recipient is one frame, and acknowledgements are batched, so this is generous.
RATE = 500.0
BURST = 1000.0
MAX_VIOLATIONS = 100

# Requests that change who this connection is are handled one at a time, in order;
# the rest run concurrently (bounded), so one slow commit does not stall the reader.
_SERIAL = (wire.AuthParams, wire.Register, wire.Challenge, wire.FetchBundle, wire.Login,
           wire.Resume, wire.Logout)


@dataclass
class Limits:
    rate: float = RATE
    burst: float = BURST
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return type(exc).__name__


async def _abort(ws: WebSocketConnection) -> None:
    """Drop the TCP stream without a close frame (the stream may be mid-frame)."""
    stream = getattr(ws, "_stream", None)
    if stream is not None:
        await trio.aclose_forcefully(stream)


class RelayConnections:
    """The WebSocket handler: counts connections and serves each one."""

    def __init__(self, service: RelayService, limits: Limits | None = None) -> None:
        self.service = service
        self.limits = limits or Limits()
        self.open = 0
        self._live: dict[WebSocketConnection, trio.CancelScope] = {}
        self.heartbeats = 0  # rounds of pings sent (tests wait on next_heartbeat)
        self._heartbeat_sent = trio.Event()

    async def handle(self, request: WebSocketRequest) -> None:
        """trio-websocket's handler: must never raise."""
        try:
            if request.path.split("?")[0] != wire.PATH:
                await request.reject(404, body=b"this relay speaks /v1\n")
                return
            ws = await request.accept()
        except Exception:
            return
        self.open += 1
        try:
            await self._serve(ws)
        except ConnectionClosed:
            pass
        except Exception as exc:  # a bug: end this connection, keep the relay
            if isinstance(exc, ExceptionGroup):
                _, rest = exc.split(ConnectionClosed)
                if rest is None:
                    return
                exc = rest
            log.error("connection ended by %s", _describe(exc), exc_info=log.isEnabledFor(logging.DEBUG))
        finally:
            self.open -= 1

    async def _serve(self, ws: WebSocketConnection) -> None:
        # One queue to the sender task. Deliveries and other frames that can wait hold a
        # slot of ``waiting`` until the sender takes them, so they never fill the queue:
        # the answers to committed sends, which come from a callback and cannot wait,
        # always find room (their number is bounded by MAX_INFLIGHT per turn of the
        # reader; a peer that stops reading altogether is dropped once the queue is full).
        send_in, send_out = trio.open_memory_channel[tuple[wire.Frame, bool]](OUTBOX_FRAMES)
        waiting = trio.Semaphore(WAITING_FRAMES)
        peer = Peer()

        async def send(frame: wire.Frame) -> None:
            await waiting.acquire()
            await send_in.send((frame, True))

        def reply(frame: wire.Frame) -> None:
            try:
                send_in.send_nowait((frame, False))
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                if peer.nursery is not None:
                    peer.nursery.cancel_scope.cancel()

        peer.send = send
        peer.reply = reply
        try:
            async with trio.open_nursery() as nursery:
                peer.nursery = nursery
                nursery.start_soon(self._sender, ws, send_out, waiting, nursery.cancel_scope)
                self._live[ws] = nursery.cancel_scope
                await self._reader(ws, peer, nursery)
                nursery.cancel_scope.cancel()
        finally:
            self._live.pop(ws, None)
            self.service.unbind(peer)

    async def _sender(
        self, ws: WebSocketConnection, frames: trio.MemoryReceiveChannel[tuple[wire.Frame, bool]],
        waiting: trio.Semaphore, scope: trio.CancelScope,
    ) -> None:
        async for frame, holds_slot in frames:
            if holds_slot:
                waiting.release()
            data = wire.encode(frame)
            done = False
            try:
                with trio.move_on_after(SEND_TIMEOUT):
                    await ws.send_message(data)
                    done = True
            finally:
                if not done:  # timed out, cancelled or broken mid-frame
                    scope.cancel()
                    with trio.CancelScope(shield=True):
                        await _abort(ws)
            if not done:
                return

    async def heartbeat(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ping every connection every HEARTBEAT_INTERVAL; drop those that do not answer.

        One task for the whole relay, and a short-lived task per ping, instead of a
        sleeping task per connection: with 10,000 idle nodes that is memory saved."""
        task_status.started()
        async with trio.open_nursery() as pings:
            while True:
                await trio.sleep(self.limits.heartbeat_interval)
                for ws, scope in list(self._live.items()):
                    pings.start_soon(self._ping, ws, scope)
                self.heartbeats += 1
                self._heartbeat_sent.set()
                self._heartbeat_sent = trio.Event()

    async def next_heartbeat(self) -> None:
        """Wait for the next round of pings to go out."""
        await self._heartbeat_sent.wait()

    async def _ping(self, ws: WebSocketConnection, scope: trio.CancelScope) -> None:
        with trio.move_on_after(self.limits.heartbeat_timeout) as timeout:
            try:
                await ws.ping()
            except (ConnectionClosed, ValueError):
                return  # closing anyway (or a ping already in flight)
        if timeout.cancelled_caught:
            log.info("peer missed a heartbeat; closing")
            scope.cancel()
            with trio.CancelScope(shield=True):
                await _abort(ws)

    async def _reader(self, ws: WebSocketConnection, peer: Peer, nursery: trio.Nursery) -> None:
        bucket = Bucket(self.limits.rate, self.limits.burst)
        inflight = trio.Semaphore(MAX_INFLIGHT)
        violations = 0
        while True:
            try:
                data = await ws.get_message()
            except ConnectionClosed:
                return
            if isinstance(data, str):
                data = data.encode("utf-8", "surrogateescape")
            try:
                if not bucket.take():
                    raise wire.FrameError(
                        wire.ErrorCode.RATE_LIMITED, "too many frames; slow down", wire.request_id(data)
                    )
                try:
                    req = wire.decode_request(data)
                except wire.FrameError:
                    raise
                except Exception:  # a decoder surprise must not end the connection unanswered
                    raise wire.FrameError(wire.ErrorCode.MALFORMED, "frame could not be decoded") from None
            except wire.FrameError as exc:
                violations += 1
                await peer.send(exc.to_frame())
                if violations > MAX_VIOLATIONS:
                    return
                continue
            if isinstance(req, wire.Send):
                await inflight.acquire()
                try:
                    self.service.send(peer, req, inflight.release)
                except Refused as exc:
                    inflight.release()
                    await peer.send(wire.Error(id=req.id, code=exc.code, message=exc.message))
            elif isinstance(req, wire.Ack):
                try:
                    self.service.ack(peer, req)
                except Refused as exc:
                    await peer.send(wire.Error(id=0, code=exc.code, message=exc.message))
            elif isinstance(req, _SERIAL):
                await self._answer(peer, req)
            else:
                await inflight.acquire()
                nursery.start_soon(self._answer_then_release, peer, req, inflight)

    async def _answer_then_release(self, peer: Peer, req: wire.Request, inflight: trio.Semaphore) -> None:
        try:
            await self._answer(peer, req)
        finally:
            inflight.release()

    async def _answer(self, peer: Peer, req: wire.Request) -> None:
        assert not isinstance(req, wire.Ack | wire.Send)
        try:
            answer = await self.service.handle(peer, req)
        except Refused as exc:
            answer = wire.Error(id=req.id, code=exc.code, message=exc.message)
        except Exception as exc:
            log.error("request failed: %s", type(exc).__name__, exc_info=log.isEnabledFor(logging.DEBUG))
            answer = wire.Error(id=req.id, code=wire.ErrorCode.INTERNAL, message="internal error")
        await peer.send(answer)

