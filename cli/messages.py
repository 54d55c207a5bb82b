"""`veil send` and `veil recv`: messages for scripts and people at a shell.

``send`` hands the message to the relay now, or, when the relay cannot be reached, keeps it
in this device's outbox and says that it goes out on the next connection (any later
`veil send`, `veil recv` or `veil chat`). ``recv`` prints what is waiting; ``--wait``
waits for the first message, ``--follow`` stays online (reconnecting as needed) and
prints every message as it arrives until interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import trio

from cli.device import unlock, username
from cli.errors import CliError
from cli.text import inert, rows
from node import control
from node.control import message_json
from node.errors import DeviceRevoked, HomeInUse
from node.home import Home
from node.node import Node
from node.session import LiveSession
from node.store import StoredMessage

PROG = "veil"


def warn(text: str) -> None:
    print(f"{PROG}: warning: {inert(text)}", file=sys.stderr, flush=True)


def local_time(ms: int) -> str:
    """A sender's timestamp in local time (it is the peer's claim: guard absurd values)."""
    try:
        return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M")
    except (ValueError, OverflowError, OSError):
        return "????-??-?? ??:??"


INDENT = 4


def print_message(m: dict[str, Any], as_json: bool) -> None:
    """One message, as `recv` prints it (``m`` as ``node.control.message_json`` makes it)."""
    if as_json:
        print(json.dumps(m), flush=True)
        return
    arrow = f"{m['from']} -> {m['to']}" if m["outgoing"] else str(m["from"])
    if "group" in m:
        arrow = f"{m['from']} in #{m['group']}"
    head = f"[{local_time(int(m['sent_at']))}] {inert(arrow, keep_newlines=False)}: "
    # Every row after the first is indented, so a body cannot forge a line that looks like
    # another message (names are checked by the node; they are made inert here all the
    # same). On a terminal the rows are cut to its width, so that a line padded to wrap
    # cannot land at the left margin either.
    lines = inert(str(m["text"])).expandtabs(4).split("\n")
    if sys.stdout.isatty():
        try:
            cols = os.get_terminal_size(sys.stdout.fileno()).columns - 1  # not a stale $COLUMNS
        except (OSError, ValueError):
            cols = shutil.get_terminal_size().columns - 1
        cut = [rows(line, cols - (len(head) if i == 0 else INDENT), cols - INDENT) for i, line in enumerate(lines)]
        lines = [r for line_rows in cut for r in line_rows]
    print(head + ("\n" + " " * INDENT).join(lines), flush=True)


def print_unprinted(node: Node, as_json: bool) -> int:
    """Print what no `veil recv` has printed yet, marking each once printed."""
    count = 0
    while batch := node.unprinted():
        for m in batch:
            print_message(message_json(node, m), as_json)
            node.mark_printed(m.seq)
            count += 1
    return count


def message_text(args: argparse.Namespace) -> str:
    """The words after the name, joined by spaces; a lone '-' reads standard input."""
    words: list[str] = args.text
    text = sys.stdin.read() if words == ["-"] else " ".join(words)
    if not text.strip():
        raise CliError("nothing to send")
    return text


async def cmd_send(args: argparse.Namespace) -> None:
    if args.group is not None:
        # `veil send --group NAME TEXT...`: the first word is the text's, not a name.
        args.text = [args.name, *args.text]
        peer = "#" + args.group.lstrip("#")
    else:
        peer = username(args.name)
    text = message_text(args)
    try:
        node = unlock(args)
    except HomeInUse:
        home = Home(args.home)
        if not control.serving(home):
            raise
        answer = await control.request(home, {"op": "send", "to": peer, "text": text},
                                       timeout=control.SEND_WAIT + control.ANSWER_MARGIN)
        _report_send(str(answer["peer"]), str(answer["state"]),
                     "the process holding this device cannot reach the relay now")
        return
    node.events.append(warn)
    try:
        msg, why = await node.send_or_queue(peer, text)
        _report_send(peer if peer.startswith("#") else msg.peer, msg.state, why)
    finally:
        node.close()


def _report_send(peer: str, state: str, why: str | None) -> None:
    if state == "pending":
        print(f"queued for {peer}: {why or 'not sent yet'}; it goes out the next time this device is online")
    else:
        print(f"sent to {peer} ({state})")


async def cmd_recv(args: argparse.Namespace) -> None:
    if args.follow and args.wait:
        raise CliError("--follow and --wait do not go together (--follow waits for ever)")
    try:
        node = unlock(args)
    except HomeInUse:
        home = Home(args.home)
        if not control.serving(home):
            raise
        await _recv_through(home, args)
        return
    try:
        if args.follow:
            await _follow(node, args.json, holder=f"`veil recv --follow` (pid {os.getpid()})")
            return
        node.events.append(warn)
        # Messages that another process of this device stored (veil chat) come first;
        # only when there are none does --wait wait for new ones.
        wait = 0.0 if node.unprinted(limit=1) else args.wait
        async with node.connected() as link:
            got = await node.receive(link, wait=wait)
        for r in got:
            if r.warning:
                warn(r.warning)
        if not print_unprinted(node, args.json) and not args.json:
            print("no new messages", file=sys.stderr)
    finally:
        node.close()


async def _recv_through(home: Home, args: argparse.Namespace) -> None:
    """`veil recv` while another process holds the device: ask it."""
    count = 0

    def show(line: dict[str, Any]) -> None:
        nonlocal count
        message = line.get("message")
        if isinstance(message, dict):
            print_message(message, args.json)
            count += 1

    request = {"op": "recv", "wait": args.wait, "follow": args.follow}
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            await control.request(home, request, show)
            nursery.cancel_scope.cancel()
    if not count and not args.json and not args.follow:
        print("no new messages", file=sys.stderr)


async def stay_online(node: Node, *, holder: str, on_status: Callable[[str], None],
                      consume: Callable[[control.ControlService], Awaitable[None]] | None = None) -> None:
    """Keep the device online, answer its control socket, and (``consume``) print what
    arrives, until SIGINT or SIGTERM."""
    live = LiveSession(node)
    live.on.problem.append(warn)  # the node's warnings, and a refused login
    live.on.status.append(on_status)
    service = control.ControlService(node, live, holder)
    revoked = trio.Event()

    def gone(now: str) -> None:
        if now == "revoked":
            revoked.set()

    live.on.status.append(gone)

    async def end_when_revoked(scope: trio.CancelScope) -> None:
        await revoked.wait()
        scope.cancel()

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(live.run)
            await nursery.start(service.serve)
            nursery.start_soon(end_when_revoked, nursery.cancel_scope)
            if consume is not None:
                nursery.start_soon(consume, service)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    if revoked.is_set():
        raise DeviceRevoked()


def _status_line(node: Node, ready: str) -> Callable[[str], None]:
    def status(now: str) -> None:
        if now == "offline":
            print(f"{PROG}: offline: cannot reach the relay at {node.relay}; trying again",
                  file=sys.stderr, flush=True)
        elif now == "online":
            print(f"{PROG}: online; {ready}", file=sys.stderr, flush=True)

    return status


async def _follow(node: Node, as_json: bool, *, holder: str) -> None:
    """Stay online and print each message as it is stored, until SIGINT or SIGTERM."""

    async def emit(m: StoredMessage) -> None:
        # In a thread: a standard output that nobody drains (a full pipe, a paused
        # terminal) must not stop the event loop, the link, or Ctrl-C. A message whose
        # printing did not finish is not marked, so the next recv prints it.
        await trio.to_thread.run_sync(print_message, message_json(node, m), as_json, abandon_on_cancel=True)

    async def consume(service: control.ControlService) -> None:
        await service.hand_out(emit, follow=True)

    await stay_online(node, holder=holder, on_status=_status_line(node, "waiting for messages (Ctrl-C to stop)"),
                      consume=consume)


async def cmd_daemon(args: argparse.Namespace) -> None:
    """Hold this device online for other `veil` commands (send, recv) until interrupted."""
    node = unlock(args)
    try:
        print(f"{PROG}: daemon for {node.name} (device {node.device_id.hex()[:8]}); `veil send` and"
              f" `veil recv` on {args.home} now go through it", file=sys.stderr, flush=True)
        await stay_online(node, holder=f"`veil daemon` (pid {os.getpid()})",
                          on_status=_status_line(node, "holding this device (Ctrl-C to stop)"))
    finally:
        node.close()
