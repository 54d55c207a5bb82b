"""The ``veil`` command: scriptable subcommands for people, scripts, tests and operators.

Errors are one line on stderr (``veil: error: ...``) with a non-zero exit; a traceback is
a bug (set ``VEIL_DEBUG=1`` to see one anyway). This module parses the command line and
reports errors; each command lives in the module of its step (``cli.account``,
``cli.messages``, ``cli.chat``, ``cli.relay_serve``, ``cli.simulate``), imported only when
it runs, so ``veil --help`` is quick and Ctrl-C at any point ends in one line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

PROG = "veil"
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("veil")
    except PackageNotFoundError:
        return "unknown (not installed)"


def positive_number(text: str) -> float:
    """A number above 0 for argparse (a rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number above 0 for argparse."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def port_number(text: str) -> int:
    """A TCP port for argparse: 0 (pick a free one) to 65535."""
    try:
        port = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range (0 to 65535; 0 picks a free port)")
    return port


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        fail(message, EXIT_USAGE)


RELAY_HELP = ("the relay's address as `veil relay serve` prints it: wss://HOST:PORT#PIN (its own key,"
              " pinned), wss://HOST (a public certificate), ws://HOST:PORT (loopback or onion only)")
INSECURE_HELP = "accept a plain ws:// address off loopback (anyone on the path can read the traffic)"


def _device_options(p: argparse.ArgumentParser, default: Any) -> None:
    """--home, --password-file and --socks: before the command, or after it (where the
    default is SUPPRESS, so that an option given before is not reset)."""
    p.add_argument("--home", type=Path, default=default, help="this device's state directory (also VEIL_HOME)")
    p.add_argument("--password-file", default=default,
                   help="read the master password from this file (also VEIL_PASSWORD_FILE)")
    p.add_argument("--code", default=default, metavar="CODE",
                   help="a current code from your authenticator app, for an account with"
                        " two-factor authentication (also VEIL_CODE; asked at a terminal otherwise)")
    p.add_argument("--socks", default=default, metavar="HOST:PORT",
                   help="reach the relay through this SOCKS5 proxy, e.g. tor's 127.0.0.1:9050 "
                        "(also VEIL_SOCKS; remembered by register and login)")


def _tor_control_option(p: argparse.ArgumentParser) -> None:
    """For the commands that set up a device (remembered in its home)."""
    p.add_argument("--tor-control", default=None, metavar="HOST:PORT",
                   help="tor's control port (or its socket's path), to hand it a private onion relay's"
                        " client key (an address ending in #client=...); also VEIL_TOR_CONTROL")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Veil: end-to-end encrypted chat.")
    p.add_argument("--version", action="version", version=f"{PROG} {version()}")
    _device_options(p, None)
    later = Parser(add_help=False)
    _device_options(later, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    def command(name: str, target: str, help: str, *, device: bool = True) -> argparse.ArgumentParser:
        cp = sub.add_parser(name, help=help, description=help, parents=[later] if device else [])
        cp.set_defaults(target=target)
        return cp

    relay = sub.add_parser("relay", help="run a relay")
    rsub = relay.add_subparsers(dest="relay_command", metavar="COMMAND", parser_class=Parser)
    rsub.required = True
    rinvite = rsub.add_parser("invite", help="print the relay's address (with its key pin) for people to register")
    rinvite.set_defaults(target="cli.invites:cmd_relay_invite")
    rinvite.add_argument("--data-dir", default="veil-relay", help="the relay's data directory")
    rinvite.add_argument("--host", default=None, metavar="NAME",
                         help="the name or address people reach the relay by (default: what it listens on)")
    rinvite.add_argument("--qr", action="store_true", help="also draw each address as a QR code")
    rinvite.add_argument("--json", action="store_true", help="one JSON object: {\"addresses\": [...]}")
    rinvite.add_argument("--new-client", action="store_true",
                         help="a private onion relay: make a client key and print the address that carries it")
    rinvite.add_argument("--name", default=None, metavar="LABEL",
                         help="with --new-client: the client's label, for `veil relay clients`")
    rinvite.add_argument("--expires", type=positive_int, default=None, metavar="DAYS",
                         help="with --new-client: the key stops working after this many days (UTC)")
    # No abbreviated options: --workers passes every other option on to its processes.
    serve = rsub.add_parser("serve", help="serve until Ctrl-C or SIGTERM", allow_abbrev=False)
    serve.set_defaults(target="cli.relay_serve:cmd_relay_serve")
    serve.add_argument("--host", default=None, help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=port_number, default=8765, help="0 picks a free port (8765)")
    serve.add_argument("--data-dir", default="veil-relay", help="database and key file directory")
    serve.add_argument("--onion", action="store_true",
                       help="also serve as a Tor onion service (key kept in the data directory)")
    serve.add_argument("--tls-cert", default=None, metavar="FILE",
                       help="a certificate (chain, PEM) from a public authority, e.g. Let's Encrypt's"
                            " fullchain.pem; with --tls-key. Default: the relay's own key, pinned by"
                            " its address. SIGHUP reads both files again")
    serve.add_argument("--tls-key", default=None, metavar="FILE", help="the private key (PEM) of --tls-cert")
    serve.add_argument("--insecure-no-tls", action="store_true",
                       help="plain ws:// without TLS (behind a TLS front end of your own; an --onion"
                            " relay needs no TLS and has none)")
    serve.add_argument("--private", action="store_true",
                       help="with --onion: only clients with a key (`veil relay invite --new-client`)"
                            " can reach the onion service (Tor v3 client authorization)")
    serve.add_argument("--store", default=None, metavar="URL",
                       help="keep the relay's data in PostgreSQL (postgresql://...; default"
                            " $VEIL_RELAY_STORE, else the encrypted SQLite file in the data dir)."
                            " Processes over one database act as one relay; give the password in"
                            " PGPASSWORD or ~/.pgpass, not in the URL")
    serve.add_argument("--workers", type=positive_int, default=None, metavar="N",
                       help="with --store: run N relay processes sharing the port (SO_REUSEPORT)")
    serve.add_argument("--relaxed-durability", action="store_true",
                       help="file store: commit without waiting for the disk (SQLite synchronous=NORMAL): an answered"
                            " send survives a crash of the relay but not a power loss; faster")
    serve.add_argument("--max-connections", type=positive_int, default=None, metavar="N",
                       help="connections held at once (default: what half the memory holds at"
                            " ~4.7 MiB each, the worst case; at most 20000)")
    serve.add_argument("--registrations-per-hour", type=positive_number, default=None, metavar="N",
                       help="new accounts the relay takes an hour, from everyone together (600)")
    serve.add_argument("--sender-rate", type=positive_number, default=None, metavar="N",
                       help="envelopes a second one account may send one device, after a burst"
                            " of 300 (1; raise it for load tests only)")
    tor = serve.add_mutually_exclusive_group()
    tor.add_argument("--tor-control", default=None, metavar="HOST:PORT",
                     help="a running tor's control port (or control socket path), cookie "
                          "authentication (also TOR_CONTROL; default 127.0.0.1:9051)")
    tor.add_argument("--launch-tor", action="store_true", help="start a tor of its own (data in DATA_DIR/tor)")
    serve.add_argument("--torrc", default=None, metavar="FILE",
                       help="more torrc lines for the tor that --launch-tor starts")

    clients = rsub.add_parser("clients", help="a private onion relay's clients: list, or revoke one")
    clients.set_defaults(target="cli.relay_admin:cmd_relay_clients")
    clients.add_argument("--json", action="store_true", help="one JSON object per client per line")
    clients.add_argument("--data-dir", default="veil-relay", help="the relay's data directory")
    csub = clients.add_subparsers(dest="clients_command", metavar="ACTION", parser_class=Parser)
    crevoke = csub.add_parser("revoke", help="remove a client's key; the running relay locks it out")
    crevoke.add_argument("id", metavar="ID", help="the client's id, as `veil relay clients` shows it")
    crevoke.add_argument("--data-dir", default=argparse.SUPPRESS, help="the relay's data directory")

    reg = command("register", "cli.account:cmd_register", "create an account; this becomes its first device")
    reg.add_argument("name")
    reg.add_argument("--relay", required=True, help=RELAY_HELP)
    reg.add_argument("--insecure-no-tls", action="store_true", help=INSECURE_HELP)
    _tor_control_option(reg)
    reg.add_argument("--allow-weak-password", action="store_true",
                     help="accept a master password that is very easy to guess")

    login = command("login", "cli.account:cmd_login", "add this device to an account, with the master password")
    login.add_argument("name")
    login.add_argument("--relay", required=True, help=RELAY_HELP)
    login.add_argument("--insecure-no-tls", action="store_true", help=INSECURE_HELP)
    _tor_control_option(login)

    send = command("send", "cli.messages:cmd_send",
                   "send a message (the words after NAME; a lone '-' reads standard input)")
    send.add_argument("name", metavar="NAME")
    send.add_argument("text", nargs="*", metavar="TEXT")
    send.add_argument("--group", default=None, metavar="GROUP",
                      help="send to a group's members (then every word is the text)")

    recv = command("recv", "cli.messages:cmd_recv", "print messages that arrived")
    recv.add_argument("--json", action="store_true", help="one JSON object per message per line")
    recv.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                      help="wait up to this long for a message when none is queued")
    recv.add_argument("--follow", "-f", action="store_true",
                      help="stay online and print messages as they arrive, until interrupted")

    group = command("group", "cli.groups:cmd_group", "conversations among several people")
    gsub = group.add_subparsers(dest="group_command", metavar="ACTION", parser_class=Parser)
    gsub.required = True
    gcreate = gsub.add_parser("create", parents=[later], help="create a group (you are in it)")
    gcreate.add_argument("name", metavar="NAME")
    gcreate.add_argument("--members", action="append", metavar="A,B,...", help="its first members besides you")
    for verb, what in (("add", "add members"), ("remove", "remove members")):
        g = gsub.add_parser(verb, parents=[later], help=what)
        g.add_argument("group", metavar="GROUP")
        g.add_argument("names", nargs="+", metavar="NAME")
    gren = gsub.add_parser("rename", parents=[later], help="give a group a new name (for every member)")
    gren.add_argument("group", metavar="GROUP")
    gren.add_argument("new_name", nargs="+", metavar="NAME", help="the new name (the words after GROUP)")
    gleave = gsub.add_parser("leave", parents=[later], help="leave a group")
    gleave.add_argument("group", metavar="GROUP")
    glist = gsub.add_parser("list", parents=[later], help="the groups this device knows")
    glist.add_argument("--json", action="store_true", help="one JSON object per group per line")
    gshow = gsub.add_parser("show", parents=[later], help="a group's members, each verified or not")
    gshow.add_argument("group", metavar="GROUP")
    gshow.add_argument("--json", action="store_true", help="one JSON object")

    invite = command("invite", "cli.invites:cmd_invite",
                     "print this account's invite link (relay, name and identity key fingerprint)")
    invite.add_argument("--qr", action="store_true", help="also draw it as a QR code")

    contact = command("contact", "cli.invites:cmd_contact", "add a contact from an invite link")
    csub = contact.add_subparsers(dest="contact_command", metavar="ACTION", parser_class=Parser)
    csub.required = True
    cadd = csub.add_parser("add", parents=[later],
                           help="pin the identity key an invite link names; the contact starts out verified")
    cadd.add_argument("link", metavar="LINK", help="veil:contact?... as `veil invite` prints it (quote it)")
    cadd.add_argument("--replace-key", action="store_true",
                      help="the link's key replaces another key pinned (or verified) for that contact here")

    moved = command("relay-address", "cli.invites:cmd_relay_address",
                    "reach this device's relay at another address (its new #pin, or a new name)")
    moved.add_argument("address", metavar="ADDRESS", help=RELAY_HELP)
    moved.add_argument("--insecure-no-tls", action="store_true", help=INSECURE_HELP)
    moved.add_argument("--yes", action="store_true", help="do not ask at a terminal")

    contacts = command("contacts", "cli.account:cmd_contacts", "list contacts")
    contacts.add_argument("--json", action="store_true", help="one JSON object per contact per line")

    verify = command("verify", "cli.account:cmd_verify", "show the safety number with a contact")
    verify.add_argument("name")
    verify.add_argument("--mark", action="store_true", help="mark the contact verified")

    trust = command("trust", "cli.account:cmd_trust", "accept a contact's changed identity key")
    trust.add_argument("name")

    devices = command("devices", "cli.security:cmd_devices",
                      "list this account's devices; rename or revoke one")
    devices.add_argument("--json", action="store_true", help="one JSON object per device per line")
    dsub = devices.add_subparsers(dest="devices_command", metavar="ACTION", parser_class=Parser)
    rename = dsub.add_parser("rename", help="give a device a name (only the account's devices can read it)",
                             parents=[later])
    rename.add_argument("device", metavar="ID", help="the device's id, as `veil devices` shows it")
    rename.add_argument("new_name", metavar="NAME")
    revoke = dsub.add_parser("revoke", parents=[later],
                             help="cut a device off the account at once (asks for the password, and a code with MFA)")
    revoke.add_argument("device", metavar="ID", help="the device's id, as `veil devices` shows it")
    revoke.add_argument("--last-device", action="store_true",
                        help="revoke it even if it is the account's only device")

    mfa = command("mfa", "cli.security:cmd_mfa", "two-factor authentication (TOTP) on or off")
    msub = mfa.add_subparsers(dest="mfa_command", metavar="ACTION", parser_class=Parser)
    msub.required = True
    enable = msub.add_parser("enable", parents=[later],
                             help="show a QR code for an authenticator app; on after its first code")
    enable.add_argument("--no-qr", action="store_true", help="print only the otpauth:// address")
    msub.add_parser("disable", parents=[later], help="turn it off (needs a current code)")

    passwd = command("passwd", "cli.security:cmd_passwd",
                     "change the master password (asks for the current one, then the new one twice)")
    passwd.add_argument("--new-password-file", default=None, metavar="FILE",
                        help="read the new password from this file")
    passwd.add_argument("--end-sessions", action="store_true",
                        help="also log out every other device of the account")
    passwd.add_argument("--allow-weak-password", action="store_true",
                        help="accept a new master password that is very easy to guess")

    rec = command("recover", "cli.security:cmd_recover",
                  "regain an account with its recovery code and set a new master password")
    rec.add_argument("name")
    rec.add_argument("--relay", required=True, help=RELAY_HELP)
    rec.add_argument("--insecure-no-tls", action="store_true", help=INSECURE_HELP)
    _tor_control_option(rec)
    rec.add_argument("--recovery-code-file", default=None, metavar="FILE",
                     help="read the recovery code from this file (asked at the terminal otherwise)")
    rec.add_argument("--keep-recovery-code", action="store_true",
                     help="keep the old recovery code instead of printing a new one")
    rec.add_argument("--allow-weak-password", action="store_true",
                     help="accept a master password that is very easy to guess")

    logout = command("logout", "cli.account:cmd_logout",
                     "remove this device from the account and delete its keys and history here")
    logout.add_argument("--keep-device", action="store_true",
                        help="only end the session: the device stays and logs in again with the password")
    logout.add_argument("--local", action="store_true",
                        help="only delete this device's keys and history here, without the relay"
                             " (for a relay that is gone or no longer knows this account)")

    command("chat", "cli.main:cmd_chat", "the interactive chat (REPL)")
    command("daemon", "cli.messages:cmd_daemon",
            "keep this device online; `veil send` and `veil recv` then go through it")

    sim = command("simulate", "cli.simulate:cmd_simulate",
                  "many real nodes against one relay (or several), every message checked", device=False)
    sim.add_argument("--nodes", type=int, default=20)
    sim.add_argument("--messages", type=int, default=10, help="messages each node sends")
    sim.add_argument("--relay", default=None, help="use this relay instead of an embedded one")
    sim.add_argument("--procs", type=int, default=1, help="spread the nodes over this many processes")
    sim.add_argument("--relays", type=positive_int, default=1, metavar="N",
                     help="spread the nodes over N relay processes (N > 1 needs --store)")
    sim.add_argument("--store", default=None, metavar="URL",
                     help="the relays keep their data in this PostgreSQL database (an empty one;"
                          " also VEIL_RELAY_STORE)")
    sim.add_argument("--chaos", action="store_true",
                     help="cut connections and kill and restart relay processes")
    sim.add_argument("--groups", type=int, default=0, metavar="N",
                     help="also N groups among the nodes; about half of the messages of a node that knows a group then go to one")
    sim.add_argument("--group-size", type=int, default=5, metavar="M", help="members of each group (5)")
    sim.add_argument("--json", action="store_true", help="end with the report as one JSON line")
    sim.add_argument("--seed", type=int, default=1)
    sim.add_argument("--timeout", type=float, default=300.0, help="give up (count the rest as lost) after this")
    sim.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def cmd_chat(args: argparse.Namespace) -> None:
    """The REPL hosts its own loops (prompt-toolkit on asyncio, trio as its guest)."""
    from cli.chat import run_chat  # prompt-toolkit is imported only to chat
    from cli.device import unlock

    run_chat(args, unlock)


SELF_HOSTED = {"cli.main:cmd_chat"}  # commands that run their own event loops


def _run(args: argparse.Namespace) -> None:
    """Import the command's module and run it: on trio, or (the REPL) as it hosts itself."""
    import trio

    from node.link import collapse_groups

    module, _, name = args.target.partition(":")
    func = getattr(importlib.import_module(module), name)
    if args.target in SELF_HOSTED:
        with collapse_groups():
            func(args)
        return

    async def main() -> None:
        with collapse_groups():
            await func(args)

    trio.run(main)


def main(argv: list[str] | None = None) -> None:
    debug = bool(os.environ.get("VEIL_DEBUG"))
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "home", None) is None:
            from cli.device import default_home

            args.home = default_home()
        if not getattr(args, "socks", None):
            args.socks = os.environ.get("VEIL_SOCKS") or None
        _run(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        fail("interrupted", EXIT_INTERRUPTED)
    except SystemExit:
        raise
    except BaseException as exc:
        if debug:
            raise
        fail(describe(exc))


def describe(exc: BaseException) -> str:
    """The one line for an error that reached the top."""
    from keyvault.errors import KeyvaultError
    from node.errors import VeilError

    if isinstance(exc, VeilError | KeyvaultError):
        return str(exc)
    if isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, KeyboardInterrupt)]
        if len(inner) == 1:
            return describe(inner[0])
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return f"internal error ({type(exc).__name__}); run with VEIL_DEBUG=1 for details"


if __name__ == "__main__":
    main()
