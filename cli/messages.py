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
import signal
import sys
from datetime import datetime

import trio

from cli.device import unlock, username
from cli.errors import CliError
from cli.text import inert
from node.node import Node, Received
from node.session import LiveSession

PROG = "veil"


def warn(text: str) -> None:
    print(f"{PROG}: warning: {inert(text)}", file=sys.stderr, flush=True)


def local_time(ms: int) -> str:
    """A sender's timestamp in local time (it is the peer's claim: guard absurd values)."""
    try:
        return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M")
    except (ValueError, OverflowError, OSError):
        return "????-??-?? ??:??"


def print_received(node: Node, items: list[Received], as_json: bool) -> None:
    for r in items:
        m = r.message
        if r.warning:
            warn(r.warning)
        if as_json:
            print(json.dumps({
                "from": m.sender,
                "to": node.name if not m.outgoing else m.peer,
                "conversation": m.peer,
                "text": m.body,
                "id": m.msg_id.hex(),
                "sent_at": m.sent_at,
                "outgoing": m.outgoing,
            }), flush=True)
        else:
            arrow = f"{m.sender} -> {m.peer}" if m.outgoing else m.sender
            print(f"[{local_time(m.sent_at)}] {arrow}: {inert(m.body)}", flush=True)


def message_text(args: argparse.Namespace) -> str:
    """The words after the name, joined by spaces; a lone '-' reads standard input."""
    words: list[str] = args.text
    text = sys.stdin.read() if words == ["-"] else " ".join(words)
    if not text.strip():
        raise CliError("nothing to send")
    return text


async def cmd_send(args: argparse.Namespace) -> None:
    peer = username(args.name)
    text = message_text(args)
    node = unlock(args)
    node.events.append(warn)
    try:
        msg = await node.send_or_queue(peer, text)
        if msg.state == "pending":
            print(f"queued for {msg.peer}: the relay at {node.relay} cannot be reached now;"
                  " it goes out the next time this device is online (veil send, recv or chat)")
        else:
            print(f"sent to {msg.peer} ({msg.state})")
    finally:
        node.close()


async def cmd_recv(args: argparse.Namespace) -> None:
    if args.follow and args.wait:
        raise CliError("--follow and --wait do not go together (--follow waits for ever)")
    node = unlock(args)
    try:
        if args.follow:
            await _follow(node, args.json)
            return
        node.events.append(warn)
        async with node.connected() as link:
            got = await node.receive(link, wait=args.wait)
        print_received(node, got, args.json)
        if not got and not args.json:
            print("no new messages", file=sys.stderr)
    finally:
        node.close()


async def _follow(node: Node, as_json: bool) -> None:
    """Stay online and print each message as it is stored, until SIGINT or SIGTERM."""
    live = LiveSession(node)
    live.on.message.append(lambda r: print_received(node, [r], as_json))
    live.on.problem.append(warn)  # the node's warnings, and a refused login

    def status(now: str) -> None:
        if now == "offline":
            print(f"{PROG}: offline: cannot reach the relay at {node.relay}; trying again",
                  file=sys.stderr, flush=True)
        elif now == "online":
            print(f"{PROG}: online; waiting for messages (Ctrl-C to stop)", file=sys.stderr, flush=True)

    live.on.status.append(status)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(live.run)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
