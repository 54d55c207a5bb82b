"""One WebSocket connection to the relay: reader, sender, heartbeat.

The connection owns a nursery: the reader (this function's body), one sender task fed
by a bounded channel, a heartbeat, and, once the peer has a session, its delivery outlet.
A frame with nothing queued before it is written at once by whoever made it (an answer
from the commit's callback, a delivery), as far as the socket takes it, and the rest goes
first through the queue (``_Line``); everything else waits in the queue for the sender
task, so frames leave in the order they were made. A send that times out or is cancelled half-way
closes the TCP stream at once: a half-written frame would corrupt everything after it.
Nothing escapes ``handle_connection``: trio-websocket stops the whole server when a
handler raises, so every exception ends only this connection.
"""

from __future__ import annotations

import gc
import logging
import math
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest
from trio_websocket import _impl as _ws_impl
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage

import wire
from relay.limits import Bucket, ByteBudget
from relay.service import Admitted, Peer, Rations, Refused, RelayService
from relay.tlsstream import TlsStream
from wire.websocket import guard as _guard_websocket

_guard_websocket()  # a Ping after our Close must not end the whole server (wire/websocket.py)


class _Inline:
    """A connection's requests handled where trio-websocket's reader task parses them.

    Normally each message goes from that task through a channel to the connection's own
    reader (``RelayConnections._reader``): two trips through the scheduler per request.
    A Send or an Ack that can be taken without waiting (room in every budget, a token in
    the bucket, nothing refused) is instead taken at once by ``handle``, in the reader
    task itself, but only while every message handed through the channel before it has
    been dealt with (``handed == done``): requests are still taken in the order they came.
    ``handle`` returns False (nothing taken) for anything else, which then goes the usual
    way; it never raises (an exception in that task would end the whole server)."""

    __slots__ = ("done", "handed", "handle")

    def __init__(self) -> None:
        self.handle: Callable[[bytes], bool] | None = None  # set once the peer has a session
        self.handed = 0  # messages passed to the channel
        self.done = 0  # ... of which the connection's reader has finished with


_original_message_event = _ws_impl.WebSocketConnection._handle_message_event


async def _message_event(self: WebSocketConnection, event: BytesMessage | Any) -> None:
    inline: _Inline | None = getattr(self, "veil_inline", None)
    if inline is None and not self.is_client:
        # A relay connection's first message may come before `_serve` runs (accept
        # yields after the handshake is out): it is counted all the same, from the first,
        # or `handed == done` would hold with one still in the channel (found in review).
        inline = self.veil_inline = _Inline()  # type: ignore[attr-defined]
    if inline is not None and event.message_finished:
        if (inline.handle is not None and inline.handed == inline.done and not self._message_parts
                and isinstance(event, BytesMessage) and isinstance(event.data, bytes)
                and len(event.data) <= self._max_message_size
                and inline.handle(event.data)):
            return
        inline.handed += 1
    await _original_message_event(self, event)


_ws_impl.WebSocketConnection._handle_message_event = _message_event  # type: ignore[method-assign]

log = logging.getLogger("veil.relay")

SEND_TIMEOUT = 30.0
CHECKPOINT_EVERY = 64  # frames the sender writes at most between two trips through the scheduler
HEARTBEAT_INTERVAL = 20.0
HEARTBEAT_TIMEOUT = 20.0
OUTBOX_FRAMES = 1024
WAITING_BYTES = 1024 * 1024  # per connection: deliveries and answers that can wait
RELAY_WAITING_BYTES = 256 * 1024 * 1024  # the same, for all connections together
COLLECT_AFTER_ABANDONED = 64 * 1024 * 1024
COLLECT_DELAY = 0.5
MAX_INFLIGHT = 32  # Sends awaiting their commit, per connection
INFLIGHT_SEND_BYTES = 8 * 1024 * 1024  # envelope bytes of those, per connection
COMMIT_BYTES = 256 * 1024 * 1024  # envelope bytes awaiting their commit, relay-wide
UNAUTHENTICATED_MAX_MESSAGE = 128 * 1024  # frames before a session (a register is ~10 KB, ~76 KB with KEM keys)
AUTH_DEADLINE = 60.0  # seconds a connection has to get a session
MAX_CONNECTIONS = 20_000  # relay-wide at most (also kept below the open-file limit, and by default
# to what half the machine's memory holds at the worst case per connection, server.py)
MAX_UNAUTHENTICATED = 1_000  # connections without a session, relay-wide
# Frames per second per connection (a token bucket). A whole message to every device of
# a recipient is one frame, and acknowledgements are batched, so this is generous.
RATE = 500.0
BURST = 1000.0
MAX_VIOLATIONS = 100
FINISH_TIMEOUT = 5.0  # a connection being ended (Peer.end) has this long to take its last frames
_FINISH = -1  # in the sender's queue instead of a size: end the connection here

# Requests that change who this connection is, or prove a password, are handled one at a
# time, in order; the rest run concurrently (bounded), so one slow commit does not stall
# the reader.
_SERIAL = (wire.AuthParams, wire.Register, wire.Challenge, wire.FetchBundle, wire.Login,
           wire.Resume, wire.Logout, wire.Recover, wire.ChangePassword, wire.MfaEnable,
           wire.MfaDisable, wire.RevokeDevice)


@dataclass
class Limits:
    rate: float = RATE
    burst: float = BURST
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    max_connections: int | None = None  # None: from the machine's memory (server.py)
    max_unauthenticated: int = MAX_UNAUTHENTICATED
    auth_deadline: float = AUTH_DEADLINE
    rations: Rations = field(default_factory=Rations)


@dataclass
class _ReaderState:
    """What one connection's reader keeps between frames."""

    bucket: Bucket
    inflight: trio.Semaphore
    send_bytes: ByteBudget = field(default_factory=lambda: ByteBudget(INFLIGHT_SEND_BYTES))
    violations: int = 0
    grown: bool = False  # frames of any size allowed (the connection has a session)


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return type(exc).__name__


def _drop_queued(ws: WebSocketConnection) -> None:
    """Free the messages trio-websocket still holds for a connection that has ended (the
    connection object can outlive it in a reference cycle of trio's, until a full garbage
    collection; its queue may hold megabytes)."""
    channel = getattr(ws, "_recv_channel", None)
    while channel is not None:
        try:
            channel.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError):
            break
    ws._message_parts = []


def _write_now(ws: WebSocketConnection, data: bytes) -> bytes | None:
    """Write one binary message to the socket at once, without waiting: what the socket
    did not take (b"" when it took all), to be sent the slow way under trio-websocket's
    lock; None when this cannot be tried (the stream is busy or closing, or of a kind
    not known here), and nothing was written. (trio-websocket's own send goes through
    its lock and the stream's send, two trips through the scheduler per frame.)"""
    stream = ws._stream
    if (ws._close_reason is not None or ws._stream_lock.locked() or getattr(ws, "veil_hold", None) is not None
            or ws._wsproto.state != ConnectionState.OPEN):
        return None
    if isinstance(stream, TlsStream):
        sock: Any = stream.socket
        if stream._sending or not stream._handshake_done or stream._broken or stream._closed:
            return None
        errors: tuple[type[BaseException], ...] = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
    elif isinstance(stream, trio.SocketStream):
        sock = stream.socket._sock  # type: ignore[attr-defined]  # the socket.socket within
        errors = (BlockingIOError, InterruptedError)
    else:
        return None
    frame = ws._wsproto.send(BytesMessage(data=data))
    view = memoryview(frame)
    while view:
        try:
            n = sock.send(view)
        except errors:
            break
        view = view[n:]
    return bytes(view)


class _Line:
    """Who may write to a connection now. A frame is written at once, by whoever made it
    (an answer from the commit's callback, a delivery from the outlet), when nothing is
    queued before it and the sender task is not in the middle of a frame: one trip
    through the scheduler less per frame, in the same order as through the queue. When
    the socket takes only part of it, the rest is queued first and trio-websocket's own
    frames (a Pong, a Close) wait for it (``veil_hold``, wire/websocket.py)."""

    def __init__(self, ws: WebSocketConnection, queue: trio.MemoryReceiveChannel[tuple[bytes, int, bool]],
                 into: trio.MemorySendChannel[tuple[bytes, int, bool]] | None = None,
                 broken: Callable[[], None] | None = None) -> None:
        self.ws = ws
        self.queue = queue
        self.into = into
        self.busy = False  # the sender task holds a frame it has not finished writing
        # Frames put in the queue that the sender has not finished. (Not the queue's own
        # count: a memory channel hands an item straight to a receiver already waiting,
        # before that task has run, and the buffer stays empty.)
        self.queued = 0
        self.broken = broken  # called when the socket fails under a direct write

    def put_nowait(self, item: tuple[bytes, int, bool]) -> None:
        """Queue a frame for the sender task (trio.WouldBlock when the queue is full)."""
        assert self.into is not None
        self.queued += 1
        try:
            self.into.send_nowait(item)
        except BaseException:
            self.queued -= 1
            raise

    async def put(self, item: tuple[bytes, int, bool]) -> None:
        """Queue a frame, waiting for room; while it waits, no one writes directly."""
        assert self.into is not None
        self.queued += 1
        try:
            await self.into.send(item)
        except BaseException:
            self.queued -= 1
            raise

    def finished(self) -> None:
        """The sender task is done with one queued frame."""
        self.busy = False
        self.queued -= 1

    def direct(self, data: bytes) -> bytes | None:
        """Write ``data`` now if it may go first: what the socket did not take (b"": all
        of it; else the rest must go next, whole, before anything else, and every other
        writer is held until ``release``), or None when it must be queued (nothing was
        written)."""
        if self.busy or self.queued or self.queue.statistics().current_buffer_used:
            return None
        try:
            rest = _write_now(self.ws, data)
        except OSError:  # the peer is gone (reset, EPIPE, a TLS failure): end it, quietly
            # (perhaps mid-frame: nothing more may be written; what it carried is stored
            # and unacknowledged, and goes again when the device reconnects)
            if isinstance(self.ws._stream, TlsStream):
                self.ws._stream._broken = True
            if self.broken is not None:
                self.broken()
            return b""
        if rest:
            self.ws.veil_hold = trio.Event()  # type: ignore[attr-defined]
        return rest

    def release(self) -> None:
        """The rest of a half-written frame is out (or never will be): others may write."""
        hold: trio.Event | None = getattr(self.ws, "veil_hold", None)
        if hold is not None:
            self.ws.veil_hold = None  # type: ignore[attr-defined]
            hold.set()


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
        self.unauthenticated = 0
        self.budget = ByteBudget(RELAY_WAITING_BYTES)
        self.commit_budget = ByteBudget(COMMIT_BYTES)
        self.abandoned = 0  # bytes of frames cut off mid-send since the last collection
        self.collect_after = COLLECT_AFTER_ABANDONED
        self.collections = 0
        self._collect = trio.Event()
        self._collected = trio.Event()
        self._live: dict[WebSocketConnection, trio.CancelScope] = {}
        self.heartbeats = 0  # rounds of pings sent (tests wait on next_heartbeat)
        self._heartbeat_sent = trio.Event()

    async def handle(self, request: WebSocketRequest) -> None:
        """trio-websocket's handler: must never raise."""
        try:
            if request.path.split("?")[0] != wire.PATH:
                await request.reject(404, body=b"this relay speaks /v1\n")
                return
            full = self.open >= (self.limits.max_connections or MAX_CONNECTIONS)
            if full or self.unauthenticated >= self.limits.max_unauthenticated:
                await request.reject(503, body=b"this relay is full; try again later\n")
                return
            ws = await request.accept()
        except Exception:
            return
        self.open += 1
        self.unauthenticated += 1
        ws._max_message_size = UNAUTHENTICATED_MAX_MESSAGE  # until it has a session (_reader)
        counted = [True]  # still counted as unauthenticated
        try:
            await self._serve(ws, counted)
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
            if counted[0]:
                self.unauthenticated -= 1
            _drop_queued(ws)
            if self.abandoned > self.collect_after:
                self._collect.set()  # see collector()

    async def _serve(self, ws: WebSocketConnection, counted: list[bool]) -> None:
        # One queue to the sender task, of frames already encoded. Deliveries and other
        # frames that can wait take their size from two byte budgets first, this
        # connection's and the relay's, and give it back once sent: a peer that reads
        # slowly holds at most WAITING_BYTES here (and is dropped when a frame takes more
        # than SEND_TIMEOUT). The answers to committed sends, which come from a callback
        # and cannot wait, skip the budgets and always find room (their number is bounded
        # by MAX_INFLIGHT per turn of the reader; a peer that stops reading altogether is
        # dropped once the queue is full).
        send_in, send_out = trio.open_memory_channel[tuple[bytes, int, bool]](OUTBOX_FRAMES)
        budget = ByteBudget(WAITING_BYTES)
        peer = Peer()

        def broken() -> None:
            if peer.nursery is not None:
                peer.nursery.cancel_scope.cancel()

        line = _Line(ws, send_out, send_in, broken)
        put_nowait = line.put_nowait
        inline = getattr(ws, "veil_inline", None)  # there already if a message came first
        if inline is None:
            inline = ws.veil_inline = _Inline()  # type: ignore[attr-defined]

        def queue_rest(rest: bytes, size: int) -> None:
            # Half a frame is out (the socket took no more): the rest goes next, before
            # anything else (the queue is empty, and _Line holds every other writer).
            try:
                put_nowait((rest, size, True))
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                line.release()
                if peer.nursery is not None:
                    peer.nursery.cancel_scope.cancel()
                raise trio.BrokenResourceError from None

        async def send(frame: wire.Frame) -> None:
            data = wire.encode(frame)
            size = len(data)
            held = 0  # of the two budgets
            try:
                await budget.acquire(size)
                held = 1
                await self.budget.acquire(size)
                held = 2
                rest = line.direct(data)
                if rest is None:
                    try:  # no trip through the scheduler when there is room (most of the time)
                        put_nowait((data, size, False))
                    except trio.WouldBlock:
                        await line.put((data, size, False))
                elif rest:
                    queue_rest(rest, size)
                else:  # written whole, at once: nothing waits
                    budget.release(size)
                    self.budget.release(size)
            except BaseException:  # not queued (cancelled, or the connection is closing)
                if held >= 1:
                    budget.release(size)
                if held == 2:
                    self.budget.release(size)
                del data  # this frame may stay in one of trio's reference cycles a while
                raise

        def send_now(frame: wire.Frame) -> bool:
            # A delivery written at once, if it can be (Outlet.send_now); False: nothing
            # was written, it goes the usual way.
            if peer.finished:
                return False
            data = wire.encode(frame)
            size = len(data)
            if not (budget.fits(size) and self.budget.fits(size)):
                return False
            rest = line.direct(data)
            if rest is None:
                return False
            if rest:
                budget.charge(size)
                self.budget.charge(size)
                try:
                    queue_rest(rest, size)
                except trio.BrokenResourceError:  # the connection ends (its mail stays stored)
                    budget.release(size)
                    self.budget.release(size)
            return True

        def reply(frame: wire.Frame) -> None:
            data = wire.encode(frame)
            rest = line.direct(data)
            try:
                if rest is None:
                    put_nowait((data, 0, False))
                elif rest:
                    queue_rest(rest, 0)
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                if peer.nursery is not None:
                    peer.nursery.cancel_scope.cancel()

        reading = trio.CancelScope()

        def finish(frame: wire.Frame) -> None:
            # No more requests are read; the frame and then the end go behind what is
            # queued (the sender ends the connection when it gets there), within
            # FINISH_TIMEOUT. If they cannot be queued now, the connection ends at once.
            reading.cancel()
            nursery = peer.nursery
            if nursery is None:
                return
            try:
                put_nowait((wire.encode(frame), 0, False))
                put_nowait((b"", _FINISH, False))
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                nursery.cancel_scope.cancel()
                return
            scope = nursery.cancel_scope
            scope.deadline = min(scope.deadline, trio.current_time() + FINISH_TIMEOUT)

        peer.send = send
        peer.send_now = send_now
        peer.reply = reply
        peer.finish = finish
        try:
            async with trio.open_nursery() as nursery:
                peer.nursery = nursery
                nursery.start_soon(self._sender, ws, line, send_out, budget, nursery.cancel_scope)
                self._live[ws] = nursery.cancel_scope
                with reading:
                    await self._reader(ws, peer, nursery, counted, inline)
                if not reading.cancel_called:
                    nursery.cancel_scope.cancel()
        finally:
            inline.handle = None  # nothing more is taken (and the cycle through it is gone)
            self._live.pop(ws, None)
            self.service.unbind(peer)
            # Break the cycles through this connection (the peer holds closures over
            # itself and its queue, the nursery holds tasks that hold the peer), and
            # drop whatever frames still wait, giving their bytes back: without a cycle,
            # all of it is freed the moment the connection ends, not at some later full
            # garbage collection (large blobs do not count towards triggering one).
            peer.detach()
            send_in.close()
            while True:
                try:
                    self.budget.release(max(0, send_out.receive_nowait()[1]))
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            send_out.close()
            line.release()

    async def _sender(
        self, ws: WebSocketConnection, line: _Line, frames: trio.MemoryReceiveChannel[tuple[bytes, int, bool]],
        budget: ByteBudget, scope: trio.CancelScope,
    ) -> None:
        sent = 0
        while True:
            # Frames are taken and written without a trip through the scheduler while
            # they come and the socket takes them (a checkpoint every CHECKPOINT_EVERY
            # frames keeps this task from starving the others).
            try:
                try:
                    data, size, raw = frames.receive_nowait()
                except trio.WouldBlock:
                    data, size, raw = await frames.receive()
            except trio.EndOfChannel:
                return
            line.busy = True  # until this frame is out, no one else writes (_Line.direct)
            if size == _FINISH:
                scope.cancel()
                return
            done = False
            try:
                with trio.move_on_after(SEND_TIMEOUT):
                    sent += 1
                    if sent % CHECKPOINT_EVERY == 0:
                        await trio.lowlevel.checkpoint()
                    rest = data if raw else _write_now(ws, data)
                    if rest is None:
                        await ws.send_message(data)  # the slow way: trio-websocket's own
                    elif rest:
                        async with ws._stream_lock:
                            await ws._stream.send_all(rest)
                    done = True
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the peer went (the stream is aborted below)
            finally:
                if not done:
                    # trio-websocket's frames for this send end up in one of trio's reference
                    # cycles (the cancellation's traceback), which hold the frame's bytes
                    # until a full collection: count them towards one.
                    self.abandoned += len(data)
                data = b""
                line.finished()
                if raw:
                    line.release()
                if size:
                    budget.release(size)
                    self.budget.release(size)
                if not done:  # timed out, cancelled or broken mid-frame
                    scope.cancel()
                    with trio.CancelScope(shield=True):
                        await _abort(ws)
            if not done:
                return

    def end_all(self) -> int:
        """End every live connection (their nodes reconnect on their own); how many. For a
        private onion relay after a client was revoked: the relay cannot tell which
        connection came through which client key (all arrive from tor on 127.0.0.1)."""
        scopes = list(self._live.values())
        for scope in scopes:
            scope.cancel()
        return len(scopes)

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

    async def collector(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """A backstop for memory that only a full garbage collection frees (see _sender):
        a collection once dropped connections have left collect_after bytes behind, a
        moment after the last of them ended (its own frames must be gone first)."""
        task_status.started()
        while True:
            await self._collect.wait()
            await trio.sleep(COLLECT_DELAY)
            self._collect = trio.Event()
            self.abandoned = 0
            gc.collect()
            self.collections += 1
            self._collected.set()
            self._collected = trio.Event()

    async def next_collection(self) -> None:
        """Wait for the collector's next collection (for tests)."""
        await self._collected.wait()

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

    async def _reader(self, ws: WebSocketConnection, peer: Peer, nursery: trio.Nursery, counted: list[bool],
                      inline: _Inline) -> None:
        state = _ReaderState(Bucket(self.limits.rate, self.limits.burst), trio.Semaphore(MAX_INFLIGHT))
        scope = nursery.cancel_scope

        def handle(data: bytes) -> bool:
            # In trio-websocket's reader task (see _Inline): never raises.
            if peer.finished or scope.cancel_called or not state.bucket.ready():
                return False
            try:
                req = wire.decode_request(data)
            except Exception:  # the reader answers it, the usual way
                return False
            try:
                if isinstance(req, wire.Send):
                    return self._send_nowait(peer, state, req)
                if isinstance(req, wire.Ack) and self.service.ack_nowait(peer, req):
                    state.bucket.take()
                    return True
                return False
            except Refused:  # before anything was taken: the reader refuses it, in order
                return False
            except Exception as exc:  # a bug: end this connection, keep the relay
                log.error("connection ended by %s", type(exc).__name__, exc_info=log.isEnabledFor(logging.DEBUG))
                scope.cancel()
                return True

        deadline = trio.current_time() + self.limits.auth_deadline
        while not peer.finished:
            # Until it has a session, a connection may send only small frames, and must
            # get its session within auth_deadline; then it may send frames of any size.
            with trio.move_on_at(deadline if peer.account_id is None else math.inf) as waiting:
                try:
                    data = await ws.get_message()
                except ConnectionClosed:
                    return
            if waiting.cancelled_caught:
                log.info("connection did not authenticate in time; closing")
                return
            # One frame at a time, in its own call: nothing of it stays referenced while
            # the next is awaited (a frame can be megabytes).
            if not await self._one_frame(ws, peer, nursery, state, data):
                return
            del data
            inline.done += 1
            if peer.account_id is not None and not state.grown:
                state.grown = True
                ws._max_message_size = wire.WS_MAX_REQUEST  # trio-websocket reads it per message
                inline.handle = handle
                if counted[0]:
                    counted[0] = False
                    self.unauthenticated -= 1

    async def _one_frame(self, ws: WebSocketConnection, peer: Peer, nursery: trio.Nursery,
                         state: _ReaderState, data: bytes | str) -> bool:
        """Handle one frame; False when the connection must end."""
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        try:
            if not state.bucket.take():
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
            state.violations += 1
            await peer.send(exc.to_frame())
            return state.violations <= MAX_VIOLATIONS
        if isinstance(req, wire.Send):
            try:
                admitted = self.service.admit(peer, req)
            except Refused as exc:
                await peer.send(wire.Error(id=req.id, code=exc.code, message=exc.message))
                return True
            size = sum(len(e.blob) for e in req.envelopes)
            # Per connection, per account, relay-wide: each waits (this reader stops).
            budgets = (state.send_bytes, self.service.send_budget(admitted.account), self.commit_budget)
            held: list[ByteBudget] = []
            try:
                try:
                    state.inflight.acquire_nowait()
                except trio.WouldBlock:
                    await state.inflight.acquire()
                try:
                    for budget in budgets:
                        await budget.acquire(size)
                        held.append(budget)
                except BaseException:
                    state.inflight.release()
                    raise
            except BaseException:
                for budget in held:
                    budget.release(size)
                admitted.refund()
                self.service.drop_send_budget(admitted.account)
                raise

            self._submit(peer, state, req, admitted, budgets, size)
        elif isinstance(req, wire.Ack):
            try:
                await self.service.ack(peer, req)
            except Refused as exc:
                await peer.send(wire.Error(id=0, code=exc.code, message=exc.message))
        elif isinstance(req, _SERIAL):
            await self._answer(peer, req)
        else:
            await state.inflight.acquire()
            nursery.start_soon(self._answer_then_release, peer, req, state.inflight)
        return True

    def _send_nowait(self, peer: Peer, state: _ReaderState, req: wire.Send) -> bool:
        """Take a Send as _one_frame would, if nothing has to wait (False: nothing was
        taken). Refused (from admit) before anything is taken."""
        if not state.inflight.value or peer.account_id is None:
            return False
        size = sum(len(e.blob) for e in req.envelopes)
        budgets = (state.send_bytes, self.service.send_budget(peer.account_id), self.commit_budget)
        if not all(budget.fits(size) for budget in budgets):
            return False
        admitted = self.service.admit(peer, req)
        state.bucket.take()
        state.inflight.acquire_nowait()
        for budget in budgets:
            budget.charge(size)
        self._submit(peer, state, req, admitted, budgets, size)
        return True

    def _submit(self, peer: Peer, state: _ReaderState, req: wire.Send, admitted: Admitted,
                budgets: tuple[ByteBudget, ...], size: int) -> None:
        def answered() -> None:
            for budget in budgets:
                budget.release(size)
            state.inflight.release()

        self.service.submit(peer, req, admitted, answered)

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
        if peer.finished:  # the connection is ending (its last frame is queued already)
            return
        await peer.send(answer)

