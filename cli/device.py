"""Opening this device for a command: the cheap checks first, then the password.

Everything that can be told without the password is checked before it is asked for: that
the home holds an account (or, to set one up, that it does not), that no other process is
using it, that a name and a relay address are well formed. Only then is the password read,
and at a terminal a mistyped one is asked again.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import wire
from cli.errors import CliError
from cli.passwords import code_asker, password_asker, with_password
from node.errors import AlreadySetUp, NotSetUp, WrongPassword
from node.home import Home
from node.node import Node


def default_home() -> Path:
    env = os.environ.get("VEIL_HOME")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("veil", appauthor=False))


def command_name(args: argparse.Namespace) -> str:
    """How other processes see this one when it holds the home: `veil send` and so on."""
    return f"veil {args.command}"


def username(raw: str) -> str:
    """A canonical username, or a one-line error with the rules."""
    try:
        return wire.normalize_username(raw)
    except ValueError as exc:
        raise CliError(f"{raw!r} is not a valid name: {exc}") from None


def relay_address(raw: str, insecure: bool = False) -> str:
    """A relay address as the node keeps it (wire.address's grammar, canonical form), or a
    one-line error: a malformed address, or plain ws:// off loopback without the flag."""
    from node.errors import VeilError
    from node.link import check_address

    try:
        return str(check_address(raw, insecure=insecure))
    except VeilError as exc:
        raise CliError(str(exc)) from None


def tor_control(args: argparse.Namespace) -> str | None:
    """tor's control port for a private onion relay's client key: --tor-control or VEIL_TOR_CONTROL."""
    from node.onion_auth import ENV_CONTROL, check_control

    raw = getattr(args, "tor_control", None) or os.environ.get(ENV_CONTROL)
    return check_control(raw) if raw else None


def new_home(args: argparse.Namespace) -> Home:
    """The home for a new account or device: empty, and held for this process."""
    home = Home(args.home)
    if home.exists():
        raise AlreadySetUp(f"{args.home} already holds an account; use another --home")
    home.hold(command_name(args))
    return home


def held_home(args: argparse.Namespace) -> Home:
    """This device's home, which must hold an account, held for this process."""
    home = Home(args.home)
    if not home.exists():
        raise NotSetUp(
            f"no account on this device ({args.home}): run `veil register NAME --relay URL`,"
            " or `veil login NAME --relay URL` for an account you have"
        )
    home.hold(command_name(args))
    return home


def unlock(args: argparse.Namespace) -> Node:
    """Open this device with the master password (asked again after a typo)."""
    home = held_home(args)
    try:
        node = with_password(args, lambda pw: Node.unlock(home, pw), retry_on=WrongPassword)
    except BaseException:
        home.release()
        raise
    if args.socks:  # --socks / VEIL_SOCKS override the proxy remembered in the home
        node.socks = args.socks
    control = tor_control(args)  # and VEIL_TOR_CONTROL the remembered control port
    if control:
        node.tor_control = control
    node.ask_code = code_asker(args)
    node.ask_password = password_asker(args)
    return node
