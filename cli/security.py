"""Keeping the account safe: `veil mfa`, `veil passwd`, `veil recover` and `veil devices`.

Each of these proves the master password afresh at the relay (and, with two-factor
authentication on, a current code: `--code`, VEIL_CODE, or asked at the terminal).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime

from cli.device import new_home, relay_address, tor_control, unlock, username
from cli.errors import CliError
from cli.messages import warn
from cli.passwords import code_asker, confirm, new_password, read_secret_line
from cli.text import inert, qr_code
from node.account import (
    Device,
    change_password,
    check_first_code,
    disable_mfa,
    enable_mfa,
    list_devices,
    mfa_on,
    mfa_uri,
    new_mfa_secret,
    pick_device,
    recover,
    rename_device,
    revoke_device,
)
from node.errors import VeilError
from node.home import Home


def _day(day: int | None) -> str:
    return "never" if day is None else f"{datetime.fromtimestamp(day * 86400, tz=UTC):%Y-%m-%d}"


# ---- veil mfa ------------------------------------------------------------------------------


async def cmd_mfa(args: argparse.Namespace) -> None:
    node = unlock(args)
    try:
        async with node.connected() as link:
            if args.mfa_command == "disable":
                await disable_mfa(node, link)
                print("two-factor authentication is off: the password alone opens the account again")
                return
            if await mfa_on(node, link):
                raise CliError("two-factor authentication is on already (`veil mfa disable` turns it off)")
            secret = new_mfa_secret()
            uri = mfa_uri(node, secret)
            print("add this account to your authenticator app: scan the code, or enter the address by hand")
            if not args.no_qr:
                print(qr_code(uri), end="")
            print(uri, flush=True)
            code = _first_code(args, secret)
            await enable_mfa(node, link, secret, code)
        print("two-factor authentication is on: logging in on a new device, recovery, a new"
              " password and revoking a device now need a code from the app as well")
    finally:
        node.close()


def _first_code(args: argparse.Namespace, secret: bytes) -> str:
    """The first code of the new secret: from --code, a line of standard input (a script),
    or typed at the terminal, where a typo is asked again (up to three times)."""
    if args.code:
        return check_first_code(secret, args.code, time.time())
    if not sys.stdin.isatty():
        given = sys.stdin.readline().strip()  # a script answers on standard input
        if not given:
            raise CliError("no code given: two-factor authentication stays off")
        return check_first_code(secret, given, time.time())
    for left in (2, 1, 0):
        try:
            given = input("the code the app shows now: ")
        except EOFError:
            raise CliError("no code given: two-factor authentication stays off") from None
        try:
            return check_first_code(secret, given, time.time())
        except VeilError as exc:
            if not left:
                raise
            print(f"{str(exc).rstrip('.')}; try again", file=sys.stderr)
    raise AssertionError("unreachable")


# ---- veil passwd ---------------------------------------------------------------------------


async def cmd_passwd(args: argparse.Namespace) -> None:
    node = unlock(args)  # with the current password
    try:
        password, weak = new_password(args, node.name, args.new_password_file)
        if weak:
            warn(weak)
        if password == node.password:
            raise CliError("the new password is the same as the old one")
        async with node.connected() as link:
            await change_password(node, link, password, end_sessions=args.end_sessions)
            others = [d for d in await list_devices(node, link) if not d.this]
        print("the master password is changed: the old one works nowhere now, and this device"
              " opens with the new one")
        if args.end_sessions:
            print("every other device of the account was logged out; each logs in again with the new password")
        elif others:
            listed = ", ".join(_label(d) for d in others)
            print(f"your other devices stay logged in ({listed}): their sessions do not come from the"
                  " password; each asks for the new one when it next has to log in"
                  " (`veil passwd --end-sessions` or `veil devices revoke` end them now)")
    finally:
        node.close()


def _label(d: Device) -> str:
    return f"{d.short} {inert(d.name)!r}" if d.name else d.short


# ---- veil recover --------------------------------------------------------------------------


async def cmd_recover(args: argparse.Namespace) -> None:
    name = username(args.name)
    relay = relay_address(args.relay, args.insecure_no_tls)
    control = tor_control(args)
    from cli.account import kdf_profile

    kdf = kdf_profile()
    home = Home(args.home)
    reuse = home.exists()
    if reuse:
        home.hold(f"veil {args.command}")
        if not confirm(f"{args.home} holds a device already: set it up again as a new device, revoking"
                        " the old one (its history here opens only with the lost password, and is"
                        " deleted)? [y/N] "):
            home.release()
            raise CliError("nothing changed")
    else:
        home = new_home(args)
    try:
        code = read_secret_line(args, args.recovery_code_file, "recovery code: ", "recovery code")
        password, weak = new_password(args, name)
        if weak:
            warn(weak)
        keep = args.keep_recovery_code
        if not keep and sys.stdin.isatty():
            keep = not confirm("print a new recovery code, so that the old one stops working? [Y/n] ", default=True)
        node, fresh = await recover(
            home, name, code, password, relay, kdf=kdf, min_kdf=kdf,
            socks=args.socks, insecure=args.insecure_no_tls, new_code=not keep, code=code_asker(args),
            tor_control=control,
        )
    except BaseException:
        home.release()
        raise
    try:
        print(f"recovered {node.name} on {node.relay} with a new master password; this device is"
              f" {node.device_id.hex()[:8]}; every other session of the account has ended")
        if reuse:
            print("the device this home held before is revoked: this is a new device in its place")
        if fresh:
            print(f"new recovery code: {fresh}")
            print("write it down and keep it safe: the old recovery code works no more")
        else:
            print("the recovery code stays the same")
    finally:
        node.close()


# ---- veil devices --------------------------------------------------------------------------


async def cmd_devices(args: argparse.Namespace) -> None:
    node = unlock(args)
    try:
        async with node.connected() as link:
            devices = await list_devices(node, link)
            action = getattr(args, "devices_command", None)
            if action == "rename":
                target = pick_device(devices, args.device)
                await rename_device(node, link, target.device_id, args.new_name)
                print(f"device {target.short} is now called {inert(' '.join(args.new_name.split()))!r}")
                return
            if action == "revoke":
                target = pick_device(devices, args.device)
                if target.this and not confirm("revoke this very device (it leaves the account)? [y/N] "):
                    raise CliError("nothing changed")
                await revoke_device(node, link, target.device_id, last=args.last_device)
                print(f"device {_label(target)} is revoked: its sessions ended, its connections closed,"
                      " and it receives nothing more")
                print("if it was lost or stolen, change the master password as well (`veil passwd`):"
                      " it held the account's keys")
                return
        for d in devices:
            if args.json:
                print(json.dumps({
                    "device": d.device_id.hex(), "name": d.name, "added": _day(d.added_day),
                    "last_seen": _day(d.last_seen_day), "active": d.active, "certified": d.certified,
                    "this_device": d.this,
                }))
                continue
            state = "active" if d.active else "signed out"
            flags = ("  (this device)" if d.this else "") + ("" if d.certified else "  NOT CERTIFIED")
            label = inert(d.name) if d.name else "(no name)"
            print(f"{d.short}  {label}  added {_day(d.added_day)}  last seen {_day(d.last_seen_day)}"
                  f"  {state}{flags}")
    finally:
        node.close()
