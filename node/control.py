"""The local control socket: `veil send` and `veil recv` while another process holds the home.

One process at a time holds a home (``Home.hold``). A process that stays online (`veil
chat`, `veil daemon`, `veil recv --follow`) also listens on ``control.sock`` in the home, a
Unix socket of mode 0600 in a directory of mode 0700, and checks that every caller runs as
the same user (``SO_PEERCRED``). A later `veil send` or `veil recv` that finds the home in
use asks the holder through it instead of failing: it needs no password, since the holder
has unlocked the device already and anything running as this user could read the
holder's memory anyway.

The protocol is JSON, one object per line, at most ``MAX_LINE`` bytes a line:

- ``{"op": "send", "to": NAME, "text": TEXT}`` -> ``{"ok": true, "peer": NAME, "state":
  "sent" | "pending", "id": HEX}`` once the relay holds the message, or after
  ``SEND_WAIT`` seconds with state "pending" (it stays in the outbox and goes out later);
- ``{"op": "recv", "wait": SECONDS, "follow": BOOL}`` -> one ``{"message": {...}}`` line per
  message not yet handed to any `veil recv` (the same fields as `veil recv --json`), then
  ``{"ok": true}``; with ``wait`` it waits that long for the first one, with ``follow`` it
  goes on until the caller hangs up;
- ``{"op": "status"}`` -> ``{"ok": true, "holder": ..., "status": ..., "pending": N}``;
- anything else, or a failure -> ``{"ok": false, "error": ONE_LINE}``.
"""

from __future__ import annotations

import json
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
from node.home import Home
from node.node import Node
from node.session import LiveSession
from node.store import StoredMessage

CONTROL_FILE = "control.sock"
MAX_LINE = 256 * 1024  # a message is at most about 64 KiB; JSON escaping can triple it
MAX_CLIENTS = 16
SEND_WAIT = 10.0  # seconds a `send` waits for the relay before answering "pending"
CLIENT_TIMEOUT = 30.0  # a caller's request must arrive within this
UNIX_PATH_MAX = 107


class ControlError(VeilError):
    """The process holding this device did not answer as expected."""


def message_json(node: Node, m: StoredMessage) -> dict[str, Any]:
    """A stored message as `veil recv --json` prints it."""
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
    """Newline-delimited reading from a stream, each line bounded."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = b""

    async def next(self) -> bytes | None:
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                raise ControlError("a control line is too long")
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        if len(line) > MAX_LINE:
            raise ControlError("a control line is too long")
        return line


async def _write(stream: trio.abc.SendStream, obj: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(obj).encode() + b"\n")


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
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                os.unlink(address)  # left by a holder that died: we hold the lock now
            except FileNotFoundError:
                pass
            old_umask = os.umask(0o177)
            try:
                await sock.bind(address)
            finally:
                os.umask(old_umask)
            os.chmod(address, 0o600)
            sock.listen(MAX_CLIENTS)
        except BaseException:
            sock.close()
            if dir_fd is not None:
                os.close(dir_fd)
            raise
        listener = trio.SocketListener(sock)
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
                with trio.fail_after(CLIENT_TIMEOUT):
                    line = await lines.next()  # read first, so the refusal below is seen
                if line is None:
                    return
                if not _same_user(stream):
                    await _write(stream, {"ok": False, "error": "not this device's user"})
                    return
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError
                except ValueError:
                    await _write(stream, {"ok": False, "error": "a request is one JSON object per line"})
                    return
                await self._answer(stream, request)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, ControlError):
                return  # the caller went away, or misbehaved: nothing of ours is lost
            except (VeilError, ValueError) as exc:
                try:
                    await _write(stream, {"ok": False, "error": str(exc)})
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    async def _answer(self, stream: trio.SocketStream, request: dict[str, Any]) -> None:
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
            await self._recv(stream, float(wait), bool(request.get("follow")))
        elif op == "status":
            await _write(stream, {"ok": True, "holder": self.holder, "status": self.live.status,
                                  "pending": self.node.store.pending_count()})
        else:
            raise ValueError(f"unknown request {str(op)[:40]!r}: send, recv or status")

    async def _send(self, to: str, text: str) -> dict[str, Any]:
        msg = self.live.send(to, text)  # stored at once; raises for a bad name or text
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
        return {"ok": True, "peer": now.peer, "state": now.state, "id": now.msg_id.hex()}

    async def _recv(self, stream: trio.SocketStream, wait: float, follow: bool) -> None:
        async def emit(m: StoredMessage) -> None:
            await _write(stream, {"message": message_json(self.node, m)})

        await self.hand_out(emit, wait=wait, follow=follow)
        await _write(stream, {"ok": True})

    async def hand_out(self, emit: Callable[[StoredMessage], Awaitable[None]], *, wait: float = 0.0,
                       follow: bool = False) -> None:
        """Pass each message not yet handed to any `veil recv` to ``emit``, in store order,
        marking it handed out once ``emit`` returns (so one that could not be written is
        handed out again). Without ``follow``: wait up to ``wait`` seconds for the first
        one, then return. One consumer at a time."""
        if self._recv_lock.locked():
            raise VeilError(f"this device's messages are already being printed by {self.holder}")
        async with self._recv_lock:
            deadline = trio.current_time() + wait
            sent_any = False
            while True:
                changed = self._changed  # taken before looking, so no wake-up falls between
                for m in self.node.unprinted():
                    await emit(m)
                    self.node.mark_printed(m.seq)
                    sent_any = True
                if not follow and (sent_any or trio.current_time() >= deadline):
                    return
                with trio.move_on_at(math.inf if follow else deadline):
                    await changed.wait()


def _same_user(stream: trio.SocketStream) -> bool:
    creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.getuid())


# ---- the caller's side ---------------------------------------------------------------------


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
        yield stream


def serving(home: Home) -> bool:
    """Whether the home has a control socket to try (its holder may still refuse)."""
    return (home.path / CONTROL_FILE).exists()


async def request(home: Home, obj: dict[str, Any], on_line: Callable[[dict[str, Any]], None] | None = None
                  ) -> dict[str, Any]:
    """Send one request to the holder; pass each intermediate line to ``on_line`` and
    return the final answer (``ok`` true), or raise VeilError with the holder's reason."""
    async with _connect(home) as stream:
        await _write(stream, obj)
        lines = _Lines(stream)
        while True:
            line = await lines.next()
            if line is None:
                raise ControlError("the process holding this device hung up")
            try:
                answer = json.loads(line)
            except ValueError:
                raise ControlError("the process holding this device answered garbage") from None
            if not isinstance(answer, dict):
                raise ControlError("the process holding this device answered garbage")
            if "message" in answer and on_line is not None:
                on_line(answer)
                continue
            if answer.get("ok") is True:
                return answer
            raise VeilError(str(answer.get("error") or "the process holding this device refused"))
