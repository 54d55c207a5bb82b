"""`veil relay invite --new-client` and `veil relay clients`: who may reach a private onion relay.

These run beside the relay, on its data directory, and tell a running relay through
SIGHUP (its process id is in ``DATA_DIR/relay.lock``, whose lock it holds while it runs);
it re-reads ``DATA_DIR/onion_clients`` and re-publishes its onion service. With no relay
running, a change takes effect at its next start.

``new_client_invite`` prints one line on standard output, the relay's address with the
new client's private key (``ws://<56 letters>.onion#client=<52 letters>``): the only place
that key is ever shown. Everything else goes to standard error.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import signal
import sys
from pathlib import Path

from cli.errors import CliError
from cli.text import inert, qr_code
from wire.address import parse_address

DEFAULT_LABEL = "client"


def _data_dir(args: argparse.Namespace) -> Path:
    path = Path(args.data_dir)
    if not path.is_dir():
        raise CliError(f"no relay data directory at {path} (give --data-dir)")
    return path


def signal_relay(data_dir: Path) -> int | None:
    """SIGHUP the relay running on ``data_dir``; its process id, or None if none runs.

    Whether one runs is told by its lock, not by the id alone (a stale id may belong to
    another process by now): the lock is tried for a moment, shared, and let go at once."""
    from relay.server import LOCK_FILE

    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if not text.isdigit() or int(text) <= 1:
        raise CliError(f"a relay runs on {data_dir} but {LOCK_FILE} holds no process id (an older veil?):"
                       " restart it for the change to take effect")
    pid = int(text)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return None
    except PermissionError:
        raise CliError(f"the relay on {data_dir} (pid {pid}) belongs to another user: run this as that user,"
                       " or send it SIGHUP") from None
    return pid


def _told(data_dir: Path, pid: int | None) -> str:
    if pid is None:
        return f"no relay runs on {data_dir} now: this takes effect when it starts (--onion --private)"
    return (f"told the running relay (pid {pid}): if it runs with --private it re-publishes its onion service"
            " and prints `relay onion clients N` when done (a failure is in its log; a relay without --private"
            " keeps its service public and only logs a warning)")


def new_client_invite(args: argparse.Namespace) -> None:
    """A new client key for this private onion relay: the public half stored, the relay
    told, and the relay's address carrying the private half printed (once, on stdout;
    with ``args.qr`` also as a QR code)."""
    from relay.onion import KEY_FILE, OnionError, load_key
    from relay.onion_clients import (
        ClientError,
        ClientKeyPair,
        add_client,
        is_private,
        service_id_of_key,
        utc_day,
    )

    data_dir = _data_dir(args)
    try:
        key = load_key(data_dir / KEY_FILE)
        if key is None:
            raise CliError(f"{data_dir} has no onion key yet: start the relay once with"
                           f" `veil relay serve --onion --private --data-dir {data_dir}`")
        service_id = service_id_of_key(key)
        was_private = is_private(data_dir)
        pair = ClientKeyPair.generate()
        expires = None if args.expires is None else utc_day(args.expires)
        client = add_client(data_dir, args.name or DEFAULT_LABEL, pair.public, expires=expires)
    except (OnionError, ClientError) as exc:
        raise CliError(str(exc)) from None
    link = f"ws://{service_id}.onion#client={pair.private_link}"
    assert parse_address(link).client_key == pair.private_link  # the grammar of wire/address.py
    if not was_private:
        print(f"{data_dir} is now a private onion relay: start it with --onion --private", file=sys.stderr)
    pid = signal_relay(data_dir)
    until = f", works until {client.expires} (UTC)" if client.expires else ""
    print(f"client {client.id} ({inert(client.label, keep_newlines=False)}) added{until}; {_told(data_dir, pid)}",
          file=sys.stderr, flush=True)
    if args.qr:
        print(qr_code(link), end="")
    print(link, flush=True)


async def cmd_relay_clients(args: argparse.Namespace) -> None:
    from relay.onion_clients import ClientError, read_clients, remove_client

    data_dir = _data_dir(args)
    try:
        if args.clients_command == "revoke":
            client = remove_client(data_dir, args.id)
            pid = signal_relay(data_dir)
            print(f"revoked client {client.id} ({inert(client.label, keep_newlines=False)}); {_told(data_dir, pid)}")
            return
        clients = read_clients(data_dir)
    except ClientError as exc:
        raise CliError(str(exc)) from None
    for c in clients:
        if args.json:
            print(json.dumps({"id": c.id, "label": c.label, "added": c.added, "expires": c.expires,
                              "expired": c.expired()}))
        else:
            until = "" if c.expires is None else ("  EXPIRED" if c.expired() else f"  until {c.expires}")
            print(f"{c.id}  {c.added}  {inert(c.label, keep_newlines=False)}{until}")
    if not clients and not args.json:
        print("no onion clients" + ("" if (data_dir / "onion_clients").is_dir() else " (not a private relay)"))
