"""The local control socket: `veil send` and `veil recv` while another process holds the home.

One process at a time holds a home (``Home.hold``). A process that stays online (`veil
chat`, `veil daemon`, `veil recv --follow`) also listens on ``control.sock`` in the home, a
Unix socket of mode 0600 in a directory of mode 0700, and checks that every caller runs as
the same user (``SO_PEERCRED``); callers check in turn that the socket is served by that
user and by the process named in the home's lock file. A later `veil send` or `veil recv`
that finds the home in use asks the holder through it instead of failing: it needs no
password, since the holder has unlocked the device already and anything running as this
user could read the holder's memory anyway.

The protocol is JSON, one object per line, at most ``MAX_LINE`` bytes a line; the first
line must arrive within ``FIRST_LINE_TIMEOUT`` seconds:

- ``{"op": "send", "to": NAME, "text": TEXT}`` -> ``{"ok": true, "peer": NAME, "state":
  "sent" | "pending", "id": HEX}`` once the relay holds the message, or (state "pending":
  it stays in the outbox and goes out later) after ``SEND_WAIT`` seconds, or at once when
  the holder is offline. A name that is not a valid username, a text too large, or a
  verified contact whose key changed are refused as the direct `veil send` refuses them.
- ``{"op": "recv", "wait": SECONDS, "follow": BOOL}`` -> one ``{"message": {...}, "seq": N}``
  line per message not yet handed to any `veil recv` (the same fields as `veil recv
  --json`), each of which the caller must answer with ``{"ack": N}`` once it has printed it
  (within ``ACK_WAIT`` seconds); only an acknowledged message counts as handed out. Then
  ``{"ok": true}``. With ``wait`` the holder waits that long for the first message; with
  ``follow`` it goes on until the caller hangs up.
- ``{"op": "status"}`` -> ``{"ok": true, "holder": ..., "status": ..., "pending": N}``;
- anything else, or a failure -> ``{"ok": false, "error": ONE_LINE}``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from node.errors import VeilError
from node.groups import group_of
from node.home import Home
from node.link import collapse_groups
from node.node import Node
from node.session import LiveSession
from node.store import StoredMessage

log = logging.getLogger("veil.node")

CONTROL_FILE = "control.sock"
MAX_LINE = 256 * 1024  # a message is at most about 64 KiB; JSON escaping can triple it
MAX_CLIENTS = 16
SEND_WAIT = 10.0  # seconds a `send` waits for the relay before answering "pending"
FIRST_LINE_TIMEOUT = 5.0  # a caller's request must arrive within this
ACK_WAIT = 30.0  # a recv caller must acknowledge each message within this
WRITE_WAIT = 30.0  # a caller that does not read for this long is dropped
ANSWER_MARGIN = 30.0
LOCK_WAIT = 2.0  # how long a recv waits for the previous recv stream to let go  # how much longer than the holder's own waits a caller waits
UNIX_PATH_MAX = 107


class ControlError(VeilError):
    """The process holding this device did not answer as expected."""


class _Gone(Exception):
    """The caller hung up, stopped reading, or broke the protocol: drop it quietly."""


def message_json(node: Node, m: StoredMessage) -> dict[str, Any]:
    """A stored message as `veil recv --json` prints it. In a group, ``group`` is the
    group's name on this device (``to`` and ``conversation`` are "#" and that name), and
    ``change`` is true for a line that records a change (who added whom)."""
    gid = group_of(m.peer)
    if gid is not None:
        label = node.groups.label(gid)
        out: dict[str, Any] = {"from": m.sender, "to": "#" + label, "conversation": "#" + label, "group": label,
                               "text": m.body, "id": m.msg_id.hex(), "sent_at": m.sent_at, "outgoing": m.outgoing}
        if node.store.is_group_event(m.msg_id):
            out["change"] = True
        return out
    return {
        "from": m.sender,
        "to": node.name if not m.outgoing else m.peer,
        "conversation": m.peer,
        "text": m.body,
        "id": m.msg_id.hex(),
        "sent_at": m.sent_at,
        "outgoing": m.outgoing,
    }


def _socket_path(home: Path) -> tuple[str, int | None]:
    """The address to bind or connect to. A path longer than a Unix socket address allows
    is reached through the home's directory descriptor (/proc/self/fd/N/...)."""
    path = str(home / CONTROL_FILE)
    if len(path.encode()) <= UNIX_PATH_MAX:
        return path, None
    fd = os.open(home, os.O_PATH | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{CONTROL_FILE}", fd


class _Lines:
    """Newline-delimited reading from a stream, each line bounded (linear in the input)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.scanned = 0  # no newline before this offset

    async def next(self) -> bytes | None:
        """The next line, or None at the end of the stream; ControlError if too long."""
        while True:
            end = self.buf.find(b"\n", self.scanned)
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 1]
                self.scanned = 0
                return line
            self.scanned = len(self.buf)
            if self.scanned > MAX_LINE:
                raise ControlError("a control line is too long")
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return None
            self.buf += chunk


def _decode(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested deeply
        raise ValueError("a request is one JSON object per line") from None
    if not isinstance(obj, dict):
        raise ValueError("a request is one JSON object per line")
    return obj


async def _write(stream: trio.abc.SendStream, obj: dict[str, Any]) -> None:
    with trio.move_on_after(WRITE_WAIT) as waited:
        await stream.send_all(json.dumps(obj).encode() + b"\n")
    if waited.cancelled_caught:
        raise _Gone()


def _peer_ids(stream: trio.SocketStream) -> tuple[int, int]:
    """The pid and uid of the process at the other end of a Unix socket."""
    creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return int(pid), int(uid)


class ControlService:
    """Answers control requests for the node held by this process."""

    def __init__(self, node: Node, live: LiveSession, holder: str) -> None:
        self.node = node
        self.live = live
        self.holder = holder
        self._changed = trio.Event()
        self._recv_lock = trio.Lock()  # one recv stream at a time hands out messages
        # A message another process asked us to send was stored (`veil chat` shows it).
        self.composed: list[Callable[[StoredMessage], None]] = []
        live.on.message.append(self._wake)
        live.on.sent.append(self._wake)
        live.on.problem.append(self._wake)

    def _wake(self, *_: object) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on the home's control socket until cancelled (the home must be held)."""
        home = self.node.home
        assert home.held, "only the process holding the home may serve its control socket"
        address, dir_fd = _socket_path(home.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                os.unlink(address)  # left by a holder that died: we hold the lock now
            except FileNotFoundError:
                pass
            # A plain, synchronous bind: the umask that keeps the socket 0600 from its
            # first moment is process-wide, and no other thread runs in between.
            old_umask = os.umask(0o177)
            try:
                sock.bind(address)
            finally:
                os.umask(old_umask)
            sock.listen(MAX_CLIENTS)
        except BaseException:
            sock.close()
            if dir_fd is not None:
                os.close(dir_fd)
            raise
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        limit = trio.CapacityLimiter(MAX_CLIENTS)
        try:
            task_status.started(home.path / CONTROL_FILE)
            async with trio.open_nursery() as nursery:
                while True:
                    stream = await listener.accept()
                    if limit.available_tokens == 0:
                        await stream.aclose()  # too many callers at once
                        continue
                    nursery.start_soon(self._client, stream, limit)
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            try:
                os.unlink(address)
            except OSError:
                pass
            if dir_fd is not None:
                os.close(dir_fd)

    async def _client(self, stream: trio.SocketStream, limit: trio.CapacityLimiter) -> None:
        async with limit, stream:
            try:
                lines = _Lines(stream)
                with trio.fail_after(FIRST_LINE_TIMEOUT):
                    line = await lines.next()  # read first, so the refusal below is seen
                if line is None:
                    return
                if _peer_ids(stream)[1] != os.getuid():
                    await _write(stream, {"ok": False, "error": "not this device's user"})
                    return
                with collapse_groups():
                    await self._answer(stream, lines, _decode(line))
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, ControlError, _Gone):
                return  # the caller went away, or misbehaved: nothing of ours is lost
            except (VeilError, ValueError) as exc:
                await _try_write(stream, {"ok": False, "error": str(exc)})
            except Exception as exc:  # a bug, or the store failing: the holder carries on
                log.warning("a control request failed (%s)", type(exc).__name__)
                await _try_write(stream, {"ok": False, "error": f"internal error ({type(exc).__name__})"})

    async def _answer(self, stream: trio.SocketStream, lines: _Lines, request: dict[str, Any]) -> None:
        op = request.get("op")
        if op == "send":
            to, text = request.get("to"), request.get("text")
            if not isinstance(to, str) or not isinstance(text, str):
                raise ValueError("send needs a name `to` and a `text`")
            await _write(stream, await self._send(to, text))
        elif op == "recv":
            wait = request.get("wait", 0)
            if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= 86400:
                raise ValueError("recv's `wait` is a number of seconds, 0 to 86400")
            await self._recv(stream, lines, float(wait), bool(request.get("follow")))
        elif op == "status":
            await _write(stream, {"ok": True, "holder": self.holder, "status": self.live.status,
                                  "pending": self.node.store.pending_count()})
        else:
            raise ValueError(f"unknown request {str(op)[:40]!r}: send, recv or status")

    async def _send(self, to: str, text: str) -> dict[str, Any]:
        if to.startswith("#"):  # a group, by its name on this device
            self.node.groups.find(to)
            peer = to
        else:
            peer = self.node.recipient(to)  # refuses a bad name, and a held contact, as `veil send` does
        msg = self.live.send(peer, text)  # stored at once; raises for a bad text
        for fn in self.composed:
            fn(msg)
        # Offline (waiting out a backoff), there is nothing to wait for: it stays queued.
        with trio.move_on_after(SEND_WAIT if self.live.status != "offline" else 0):
            while True:
                changed = self._changed
                now = self.node.store.message(msg.msg_id) or msg
                if now.state == "failed":
                    raise VeilError(f"the message to {now.peer} could not be sent (see the holder's warnings)")
                if now.state == "sent":
                    break
                await changed.wait()
        now = self.node.store.message(msg.msg_id) or msg
        gid = group_of(now.peer)
        shown = now.peer if gid is None else "#" + self.node.groups.label(gid)
        return {"ok": True, "peer": shown, "state": now.state, "id": now.msg_id.hex()}

    async def _recv(self, stream: trio.SocketStream, lines: _Lines, wait: float, follow: bool) -> None:
        """Hand out messages to a caller that acknowledges each one; a caller that hangs
        up (even while nothing arrives) ends it at once."""
        acked = 0
        ack_changed = trio.Event()

        async def emit(m: StoredMessage) -> None:
            await _write(stream, {"message": message_json(self.node, m), "seq": m.seq})
            with trio.fail_after(ACK_WAIT):
                while acked < m.seq:
                    await ack_changed.wait()

        async def read_acks(cancel: trio.CancelScope) -> None:
            nonlocal acked, ack_changed
            try:
                while (line := await lines.next()) is not None:
                    ack = _decode(line).get("ack")
                    if isinstance(ack, bool) or not isinstance(ack, int):
                        break
                    acked = max(acked, ack)
                    ack_changed.set()
                    ack_changed = trio.Event()
            except (ValueError, ControlError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            cancel.cancel()  # hung up (or garbage): stop handing out to this caller

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_acks, nursery.cancel_scope)
            await self.hand_out(emit, wait=wait, follow=follow)
            await _write(stream, {"ok": True})
            nursery.cancel_scope.cancel()

    async def hand_out(self, emit: Callable[[StoredMessage], Awaitable[None]], *, wait: float = 0.0,
                       follow: bool = False) -> None:
        """Pass each message not yet handed to any `veil recv` to ``emit``, in store order,
        marking it handed out once ``emit`` returns (so one that could not be printed is
        handed out again). Without ``follow``: wait up to ``wait`` seconds for the first
        one, then return. One consumer at a time."""
        # A consumer that has just hung up lets go within moments; a live one does not.
        acquired = False
        with trio.move_on_after(LOCK_WAIT):
            await self._recv_lock.acquire()
            acquired = True
        if not acquired:
            raise VeilError(f"this device's messages are already being printed by {self.holder}")
        try:
            deadline = trio.current_time() + wait
            sent_any = False
            while True:
                changed = self._changed  # taken before looking, so no wake-up falls between
                while batch := self.node.unprinted():
                    for m in batch:
                        await emit(m)
                        self.node.mark_printed(m.seq)
                        sent_any = True
                if not follow and (sent_any or trio.current_time() >= deadline):
                    return
                with trio.move_on_at(math.inf if follow else deadline):
                    await changed.wait()
        finally:
            self._recv_lock.release()


async def _try_write(stream: trio.abc.SendStream, obj: dict[str, Any]) -> None:
    try:
        await _write(stream, obj)
    except (trio.BrokenResourceError, trio.ClosedResourceError, _Gone):
        pass


# ---- the caller's side ---------------------------------------------------------------------


def _holder_pid(home: Home) -> int | None:
    try:
        text = home.lock_path.read_text(errors="replace")
    except OSError:
        return None
    pid = text.split(" ", 1)[0].strip()
    return int(pid) if pid.isdigit() else None


@asynccontextmanager
async def _connect(home: Home) -> AsyncIterator[trio.SocketStream]:
    address, dir_fd = _socket_path(home.path)
    try:
        stream = await trio.open_unix_socket(address)
    except OSError as exc:
        raise ControlError("the process holding this device takes no requests") from exc
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    async with stream:
        # Whoever answers must be this user's process, and the one that holds the home.
        pid, uid = _peer_ids(stream)
        if uid != os.getuid() or pid != _holder_pid(home):
            raise ControlError(
                f"the control socket in {home.path} is not served by the process holding the home;"
                " refusing to talk to it"
            )
        yield stream


def serving(home: Home) -> bool:
    """Whether the home has a control socket to try (its holder may still refuse)."""
    return (home.path / CONTROL_FILE).exists()


async def request(
    home: Home, obj: dict[str, Any], on_message: Callable[[dict[str, Any]], None] | None = None,
    *, timeout: float | None = None,
) -> dict[str, Any]:
    """Send one request to the holder and return its final answer (``ok`` true), or raise
    VeilError with the holder's reason. Each message of a recv goes to ``on_message`` and is
    acknowledged once that returns (if it raises, the message stays for the next recv).
    ``timeout``: give up (ControlError) after that many seconds."""
    with trio.move_on_after(math.inf if timeout is None else timeout) as waited:
        try:
            return await _request(home, obj, on_message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ControlError("the process holding this device hung up (it may be busy: try again)") from None
    assert waited.cancelled_caught
    raise ControlError("the process holding this device did not answer in time")


async def _request(home: Home, obj: dict[str, Any], on_message: Callable[[dict[str, Any]], None] | None
                   ) -> dict[str, Any]:
    async with _connect(home) as stream:
        await stream.send_all(json.dumps(obj).encode() + b"\n")
        lines = _Lines(stream)
        while True:
            line = await lines.next()
            if line is None:
                raise ControlError("the process holding this device hung up")
            try:
                answer = _decode(line)
            except ValueError:
                raise ControlError("the process holding this device answered garbage") from None
            if "message" in answer:
                if on_message is not None:
                    on_message(answer)
                await stream.send_all(json.dumps({"ack": answer.get("seq")}).encode() + b"\n")
                continue
            if answer.get("ok") is True:
                return answer
            raise VeilError(str(answer.get("error") or "the process holding this device refused"))
