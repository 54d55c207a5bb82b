"""The ``veil`` command: scriptable subcommands for people, scripts, tests and operators.

Errors are one line on stderr (``veil: error: ...``) with a non-zero exit; a traceback is
a bug (set ``VEIL_DEBUG=1`` to see one anyway).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

import trio

import wire
from cli.text import inert
from keyvault.errors import KeyvaultError
from keyvault.kdf import DEFAULT_KDF, TEST_KDF, KdfParams
from keyvault.safety import format_safety_number
from node.errors import VeilError
from node.home import Home
from node.link import collapse_groups
from node.node import Node, Received

PROG = "veil"
EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(VeilError):
    pass


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def default_home() -> Path:
    env = os.environ.get("VEIL_HOME")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("veil", appauthor=False))


# ---- passwords ---------------------------------------------------------------------------


def read_password(args: argparse.Namespace, *, confirm: bool = False) -> str:
    """From --password-file, VEIL_PASSWORD_FILE, or the terminal."""
    path = args.password_file or os.environ.get("VEIL_PASSWORD_FILE")
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise CliError(f"cannot read password file {path}: {exc.strerror}") from None
        password = text.rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise CliError("no terminal to ask for the password: use --password-file or VEIL_PASSWORD_FILE")
        import getpass

        password = getpass.getpass("master password: ")
        if confirm and getpass.getpass("again: ") != password:
            raise CliError("the passwords do not match")
    if not password:
        raise CliError("the password is empty")
    return password


def kdf_profile() -> KdfParams:
    profile = os.environ.get("VEIL_KDF_PROFILE", "default")
    if profile == "test":
        print(f"{PROG}: warning: using the weak test KDF profile (VEIL_KDF_PROFILE=test)", file=sys.stderr)
        return TEST_KDF
    if profile != "default":
        raise CliError("VEIL_KDF_PROFILE is 'default' or 'test'")
    return DEFAULT_KDF


# ---- output ------------------------------------------------------------------------------


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
            print(f"{PROG}: warning: {inert(r.warning)}", file=sys.stderr)
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


# ---- commands ----------------------------------------------------------------------------


async def cmd_register(args: argparse.Namespace) -> None:
    password = read_password(args, confirm=True)
    kdf = kdf_profile()
    node, code = await Node.register(Home(args.home), args.name, password, args.relay, kdf=kdf, socks=args.socks)
    try:
        print(f"registered {node.name} on {node.relay}; this device is {node.device_id.hex()[:8]}")
        print(f"recovery code: {code}")
        print("write the recovery code down and keep it safe: it is shown only this once")
    finally:
        node.close()


async def cmd_login(args: argparse.Namespace) -> None:
    password = read_password(args)
    node = await Node.login(
        Home(args.home), args.name, password, args.relay, socks=args.socks, min_kdf=kdf_profile()
    )
    try:
        print(f"logged in as {node.name}; this device is {node.device_id.hex()[:8]}")
    finally:
        node.close()


def unlock(args: argparse.Namespace) -> Node:
    node = Node.unlock(Home(args.home), read_password(args))
    if args.socks:  # --socks / VEIL_SOCKS override the proxy remembered in the home
        node.socks = args.socks
    return node


async def cmd_send(args: argparse.Namespace) -> None:
    text = args.text if args.text != "-" else sys.stdin.read()
    if not text:
        raise CliError("nothing to send")
    node = unlock(args)
    node.events.append(lambda w: print(f"{PROG}: warning: {inert(w)}", file=sys.stderr))
    try:
        async with node.connected() as link:
            msg = await node.send(link, args.name, text)
        print(f"sent to {msg.peer} ({msg.state})")
    finally:
        node.close()


async def cmd_recv(args: argparse.Namespace) -> None:
    node = unlock(args)
    try:
        async with node.connected() as link:
            got = await node.receive(link, wait=args.wait)
        print_received(node, got, args.json)
        if not got and not args.json:
            print("no new messages", file=sys.stderr)
    finally:
        node.close()


async def cmd_contacts(args: argparse.Namespace) -> None:
    node = unlock(args)
    try:
        contacts = node.store.contacts()
        if not contacts:
            print("no contacts yet")
        for c in contacts:
            state = "verified" if c.verified else "unverified"
            flag = "  KEY CHANGED" if c.key_changed else ""
            print(f"{c.name}  {state}  {len(c.devices)} device(s){flag}")
    finally:
        node.close()


async def cmd_verify(args: argparse.Namespace) -> None:
    node = unlock(args)
    try:
        name = wire.normalize_username(args.name) if wire.USERNAME_RE.match(args.name.lower()) else args.name
        contact = node.store.contact(name)
        if contact is None:
            async with node.connected() as link:
                contact, _ = await node.lookup(link, name)
        print(f"safety number for you ({node.name}) and {contact.name}:")
        print(format_safety_number(node.safety_number(contact)))
        if contact.key_changed:
            print(f"note: {contact.name}'s identity key changed since it was first seen")
        mark = args.mark
        if not mark and sys.stdin.isatty():
            answer = input(f"does {contact.name} see the same number? mark verified [y/N] ")
            mark = answer.strip().lower() in ("y", "yes")
        if mark:
            with node.store.transaction():
                node.store.set_verified(contact.name, True)
            print(f"{contact.name} is now verified")
    finally:
        node.close()


async def cmd_trust(args: argparse.Namespace) -> None:
    node = unlock(args)
    try:
        contact = node.store.contact(args.name.strip().lower())
        if contact is None:
            raise CliError(f"{args.name} is not a contact")
        with node.store.transaction():
            node.store.accept_key(contact.name)
        print(f"accepted {contact.name}'s current key (not verified: run `veil verify {contact.name}`)")
    finally:
        node.close()


async def cmd_devices(args: argparse.Namespace) -> None:
    node = unlock(args)
    try:
        async with node.connected() as link:
            devices = await node.devices(link)
        for d in devices:
            this = "  (this device)" if d.device_id == node.device_id else ""
            print(f"{d.device_id.hex()[:8]}  added {datetime.fromtimestamp(d.created_day * 86400, tz=UTC):%Y-%m-%d}{this}")
    finally:
        node.close()


async def cmd_logout(args: argparse.Namespace) -> None:
    node = unlock(args)
    try:
        async with node.connected() as link:
            await node.logout(link, remove_device=not args.keep_device)
        print("logged out" + ("" if args.keep_device else "; this device is removed from the account"))
    finally:
        node.close()


def cmd_chat(args: argparse.Namespace) -> None:
    """The REPL hosts its own loops (prompt-toolkit on asyncio, trio as its guest)."""
    from cli.chat import run_chat  # prompt-toolkit is imported only to chat

    run_chat(args, unlock)


async def cmd_simulate(args: argparse.Namespace) -> None:
    from cli.simulate import coordinate, print_report

    if args.nodes < 2 or args.messages < 0:
        raise CliError("simulate needs at least 2 nodes")
    report = await coordinate(args)
    print_report(report, args.json)
    bad = report["lost"] + report["duplicates"] + report["misdelivered"]
    if bad:
        raise CliError(f"{report['lost']} lost, {report['duplicates']} duplicated, "
                       f"{report['misdelivered']} misdelivered")


async def cmd_relay_serve(args: argparse.Namespace) -> None:
    from relay.onion import OnionError
    from relay.server import RelayStartError

    try:
        with collapse_groups():
            await _relay_serve(args)
    except (OnionError, RelayStartError) as exc:
        raise CliError(str(exc)) from None


async def _relay_serve(args: argparse.Namespace) -> None:
    from relay import onion
    from relay.server import RelayConfig, serve

    control = args.tor_control or os.environ.get("TOR_CONTROL") or onion.DEFAULT_CONTROL
    if not args.onion and (args.tor_control or args.launch_tor or args.torrc):
        raise CliError("--tor-control, --launch-tor and --torrc go with --onion")
    if args.onion:
        if args.host not in (None, "127.0.0.1"):
            raise CliError("an onion relay listens on 127.0.0.1 only: drop --host")
        if args.torrc and not args.launch_tor:
            raise CliError("--torrc configures the tor that --launch-tor starts")
        onion.check_available(launch=args.launch_tor)  # before the relay starts: one clear line
        if not args.launch_tor:
            onion.control_target(control)
    logging.basicConfig(level=logging.DEBUG if os.environ.get("VEIL_DEBUG") else logging.INFO, format="%(asctime)s relay %(levelname)s %(message)s", stream=sys.stderr)
    config = RelayConfig(data_dir=Path(args.data_dir), host=args.host or "127.0.0.1", port=args.port)

    async def run_relay() -> None:
        async with trio.open_nursery() as inner:
            info = await inner.start(serve, config)
            print(f"relay listening on {info.url}", flush=True)

    async def run_onion_relay() -> None:
        async with onion.open_tor(
            control=None if args.launch_tor else control, launch=args.launch_tor,
            data_dir=config.data_dir, torrc=Path(args.torrc) if args.torrc else None,
        ) as tor:
            async with trio.open_nursery() as inner:
                info = await inner.start(serve, config)
                print(f"relay listening on {info.url}", flush=True)
                service = await tor.publish(config.data_dir / onion.KEY_FILE, info.port)
                print(f"relay onion address {service.url}", flush=True)

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_onion_relay if args.onion else run_relay)
            async for _ in signals:
                print("relay stopping", file=sys.stderr, flush=True)
                nursery.cancel_scope.cancel()
                break


# ---- argument parsing --------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        fail(message, EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Veil: end-to-end encrypted chat.")
    p.add_argument("--home", type=Path, default=None, help="this device's state directory")
    p.add_argument("--password-file", default=None, help="read the master password from this file")
    p.add_argument("--socks", default=None, metavar="HOST:PORT",
                   help="reach the relay through this SOCKS5 proxy, e.g. tor's 127.0.0.1:9050 "
                        "(also VEIL_SOCKS; remembered by register and login)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    relay = sub.add_parser("relay", help="run a relay")
    rsub = relay.add_subparsers(dest="relay_command", metavar="COMMAND", parser_class=Parser)
    rsub.required = True
    serve = rsub.add_parser("serve", help="serve until Ctrl-C or SIGTERM")
    serve.add_argument("--host", default=None, help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    serve.add_argument("--data-dir", default="veil-relay", help="database and key file directory")
    serve.add_argument("--onion", action="store_true",
                       help="also serve as a Tor onion service (key kept in the data directory)")
    tor = serve.add_mutually_exclusive_group()
    tor.add_argument("--tor-control", default=None, metavar="HOST:PORT",
                     help="a running tor's control port (or control socket path), cookie "
                          "authentication (also TOR_CONTROL; default 127.0.0.1:9051)")
    tor.add_argument("--launch-tor", action="store_true", help="start a tor of its own (data in DATA_DIR/tor)")
    serve.add_argument("--torrc", default=None, metavar="FILE",
                       help="more torrc lines for the tor that --launch-tor starts")
    serve.set_defaults(func=cmd_relay_serve)

    reg = sub.add_parser("register", help="create an account; this becomes its first device")
    reg.add_argument("name")
    reg.add_argument("--relay", required=True, help="ws://HOST:PORT")
    reg.add_argument("--socks", default=argparse.SUPPRESS, metavar="HOST:PORT", help="as the global --socks")
    reg.set_defaults(func=cmd_register)

    login = sub.add_parser("login", help="add this device to an account, with the master password")
    login.add_argument("name")
    login.add_argument("--relay", required=True, help="ws://HOST:PORT")
    login.add_argument("--socks", default=argparse.SUPPRESS, metavar="HOST:PORT", help="as the global --socks")
    login.set_defaults(func=cmd_login)

    send = sub.add_parser("send", help="send a message (TEXT '-' reads standard input)")
    send.add_argument("name")
    send.add_argument("text")
    send.set_defaults(func=cmd_send)

    recv = sub.add_parser("recv", help="print messages that arrived")
    recv.add_argument("--json", action="store_true", help="one JSON object per message per line")
    recv.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                      help="wait up to this long for a message when none is queued")
    recv.set_defaults(func=cmd_recv)

    sub.add_parser("contacts", help="list contacts").set_defaults(func=cmd_contacts)

    verify = sub.add_parser("verify", help="show the safety number with a contact")
    verify.add_argument("name")
    verify.add_argument("--mark", action="store_true", help="mark the contact verified")
    verify.set_defaults(func=cmd_verify)

    trust = sub.add_parser("trust", help="accept a contact's changed identity key")
    trust.add_argument("name")
    trust.set_defaults(func=cmd_trust)

    sub.add_parser("devices", help="list this account's devices").set_defaults(func=cmd_devices)

    logout = sub.add_parser("logout", help="end this device's session and remove it from the account")
    logout.add_argument("--keep-device", action="store_true", help="only end the session")
    logout.set_defaults(func=cmd_logout)

    sub.add_parser("chat", help="the interactive chat (REPL)").set_defaults(func=cmd_chat)

    sim = sub.add_parser("simulate", help="many real nodes against one relay, every message checked")
    sim.add_argument("--nodes", type=int, default=20)
    sim.add_argument("--messages", type=int, default=10, help="messages each node sends")
    sim.add_argument("--relay", default=None, help="use this relay instead of an embedded one")
    sim.add_argument("--procs", type=int, default=1, help="spread the nodes over this many processes")
    sim.add_argument("--chaos", action="store_true", help="cut connections and restart the relay")
    sim.add_argument("--json", action="store_true", help="end with the report as one JSON line")
    sim.add_argument("--seed", type=int, default=1)
    sim.add_argument("--timeout", type=float, default=300.0, help="give up (count the rest as lost) after this")
    sim.add_argument("--quiet", action="store_true", help="no progress lines")
    sim.set_defaults(func=cmd_simulate)
    return p


def run(func: Callable[[argparse.Namespace], Awaitable[None]], args: argparse.Namespace) -> None:
    if func is cmd_chat:  # type: ignore[comparison-overlap]
        with collapse_groups():
            cmd_chat(args)
        return

    async def main() -> None:
        with collapse_groups():
            await func(args)

    trio.run(main)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.home is None:
        args.home = default_home()
    if not args.socks:
        args.socks = os.environ.get("VEIL_SOCKS") or None
    debug = bool(os.environ.get("VEIL_DEBUG"))
    try:
        run(args.func, args)
    except (VeilError, KeyvaultError) as exc:
        if debug:
            raise
        fail(str(exc))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as exc:
        if debug:
            raise
        fail(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
    except Exception as exc:  # a bug; still one line
        if debug:
            raise
        fail(f"internal error ({type(exc).__name__}); run with VEIL_DEBUG=1 for details")


if __name__ == "__main__":
    main()
