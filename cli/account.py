"""The account and this device: register, login, logout; contacts, verify, trust.

``--json`` on `contacts` (and `devices`, in ``cli.security``) prints one JSON object per line, as `recv --json`
does, so scripts read every command's output the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cli.device import new_home, relay_address, tor_control, unlock, username
from cli.errors import CliError
from cli.messages import warn
from cli.passwords import TRIES, code_asker, confirm, new_password, password_source, read_password
from keyvault.kdf import DEFAULT_KDF, TEST_KDF, KdfParams
from keyvault.safety import format_safety_number
from node.errors import LoginFailed, NameTaken
from node.link import shown_address
from node.node import Node

PROG = "veil"


def kdf_profile() -> KdfParams:
    profile = os.environ.get("VEIL_KDF_PROFILE", "default")
    if profile == "test":
        warn("using the weak test KDF profile (VEIL_KDF_PROFILE=test)")
        return TEST_KDF
    if profile != "default":
        raise CliError("VEIL_KDF_PROFILE is 'default' or 'test'")
    return DEFAULT_KDF


async def cmd_register(args: argparse.Namespace) -> None:
    name = username(args.name)
    relay = relay_address(args.relay, args.insecure_no_tls)
    control = tor_control(args)
    kdf = kdf_profile()
    home = new_home(args)
    try:
        # Before the password and the slow work: is the relay there, is the name free?
        if not await Node.name_free(relay, name, socks=args.socks, insecure=args.insecure_no_tls,
                                    tor_control=control):
            raise NameTaken(f"the name {name} is taken on {shown_address(relay)}: choose another")
        password, weak = new_password(args, name)
        if weak:
            warn(weak)
        node, code = await Node.register(home, name, password, relay, kdf=kdf, socks=args.socks,
                                         insecure=args.insecure_no_tls, tor_control=control)
    except BaseException:
        home.release()
        raise
    try:
        print(f"registered {node.name} on {node.relay}; this device is {node.device_id.hex()[:8]}")
        print(f"recovery code: {code}")
        print("write the recovery code down and keep it safe: it is shown only this once")
    finally:
        node.close()


async def cmd_login(args: argparse.Namespace) -> None:
    name = username(args.name)
    relay = relay_address(args.relay, args.insecure_no_tls)
    control = tor_control(args)
    min_kdf = kdf_profile()
    home = new_home(args)
    try:
        # Each try asks the relay (whose throttle slows repeated failures further).
        tries = 1 if password_source(args) else TRIES
        for left in range(tries - 1, -1, -1):
            password = read_password(args)
            try:
                node = await Node.login(home, name, password, relay, socks=args.socks,
                                        insecure=args.insecure_no_tls, min_kdf=min_kdf,
                                        code=code_asker(args), tor_control=control)
                break
            except LoginFailed as exc:
                if not left:
                    raise
                print(f"{str(exc).rstrip('.')}; try again", file=sys.stderr)
        else:
            raise AssertionError("unreachable")
    except BaseException:
        home.release()
        raise
    try:
        print(f"logged in as {node.name}; this device is {node.device_id.hex()[:8]}")
    finally:
        node.close()


async def cmd_logout(args: argparse.Namespace) -> None:
    if args.local and args.keep_device:
        raise CliError("--local and --keep-device do not go together")
    node = unlock(args)
    try:
        if args.local:
            # For a relay that is gone, or no longer knows this account: nothing to tell it.
            if sys.stdin.isatty() and not confirm(
                f"delete this device's keys and history from {args.home} without telling the relay"
                " (it stays listed among the account's devices)? [y/N] "
            ):
                raise CliError("nothing deleted")
            node.store.close()
            node.home.wipe()
            print(f"deleted this device's keys and history from {args.home}, without the relay; it stays"
                  " listed in the account until removed (`veil login` can set this home up again)")
            return
        if node.removed:
            # Left its account earlier (by an older veil that kept the home): clear it.
            node.store.close()
            node.home.wipe()
            print(f"cleared this home ({args.home}); `veil login NAME --relay URL` can use it again")
            return
        async with node.connected() as link:
            await node.logout(link, remove_device=not args.keep_device)
        if args.keep_device:
            print("logged out; this device stays in the account and logs in again with the master"
                  " password the next time it is used")
            return
        node.store.close()
        node.home.wipe()
        print("logged out; this device is removed from the account and its keys and history are"
              f" deleted from {args.home} (`veil login` can set it up again)")
    finally:
        node.close()


async def cmd_contacts(args: argparse.Namespace) -> None:
    node = unlock(args)
    try:
        contacts = node.store.contacts()
        if args.json:
            for c in contacts:
                print(json.dumps({
                    "name": c.name,
                    "verified": c.verified,
                    "key_changed": c.key_changed,
                    "devices": len(c.devices),
                    "safety_number": node.safety_number(c),
                }))
            return
        if not contacts:
            print("no contacts yet")
        for c in contacts:
            state = "verified" if c.verified else "unverified"
            flag = "  KEY CHANGED" if c.key_changed else ""
            print(f"{c.name}  {state}  {len(c.devices)} device(s){flag}")
    finally:
        node.close()


async def cmd_verify(args: argparse.Namespace) -> None:
    name = username(args.name)
    node = unlock(args)
    try:
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
            mark = confirm(f"does {contact.name} see the same number? mark verified [y/N] ")
        if mark:
            with node.store.transaction():
                node.store.set_verified(contact.name, True)
            print(f"{contact.name} is now verified")
    finally:
        node.close()


async def cmd_trust(args: argparse.Namespace) -> None:
    name = username(args.name)
    node = unlock(args)
    try:
        contact = node.store.contact(name)
        if contact is None:
            raise CliError(f"{name} is not a contact")
        with node.store.transaction():
            node.store.accept_key(contact.name)
        print(f"accepted {contact.name}'s current key (not verified: run `veil verify {contact.name}`)")
    finally:
        node.close()
