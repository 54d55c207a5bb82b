"""Invite links: `veil invite`, `veil contact add LINK` and `veil relay invite`.

A contact link (wire/invite.py) carries the relay's address with its pin, the account
name and the fingerprint of the account's identity key: the person who adds it pins that
key, and the contact starts out verified. `veil relay invite` prints the relay's own
address for people who want to register there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli.device import unlock
from cli.errors import CliError
from cli.text import qr_code
from keyvault.safety import format_safety_number, identity_fingerprint
from node.errors import KeyDiffers
from node.link import RelayLink
from node.node import Node
from wire.address import parse_address
from wire.invite import ContactLink, LinkError, parse_link

ADDRESS_FILE = "relay.address"  # the addresses a running relay printed (cli/relay_serve.py)


def contact_link(node: Node) -> ContactLink:
    """This account's invite link (never with a client key of a private relay)."""
    return ContactLink(parse_address(node.relay).public, node.name, identity_fingerprint(node.keys.public().identity))


async def cmd_invite(args: argparse.Namespace) -> None:
    node = unlock(args)
    try:
        link = str(contact_link(node))
    finally:
        node.close()
    if args.qr:
        print(qr_code(link), end="")
    print(link)


def read_link(text: str) -> ContactLink:
    try:
        return parse_link(text)
    except LinkError as exc:
        raise CliError(str(exc)) from None


async def add_contact(node: Node, text: str, link: RelayLink | None = None, *, replace: bool = False,
                      how: str = "--replace-key") -> str:
    """Add the contact of a link; the line that says what happened."""
    try:
        contact, new = await node.add_from_link(read_link(text), link, replace=replace)
    except KeyDiffers as exc:
        raise CliError(f"{exc} ({how})") from None
    what = "added" if new else "updated"
    return (f"{what} {contact.name} as a verified contact (the relay's keys match the link);"
            f" safety number {' '.join(format_safety_number(node.safety_number(contact)).split())}")


async def cmd_contact(args: argparse.Namespace) -> None:
    link = read_link(args.link)  # before the password: a malformed link costs nothing
    node = unlock(args)
    try:
        print(await add_contact(node, str(link), replace=args.replace_key))
    finally:
        node.close()


def relay_addresses(data_dir: Path) -> list[str]:
    """The addresses the relay on ``data_dir`` printed when it last started."""
    try:
        lines = (data_dir / ADDRESS_FILE).read_text().split()
    except FileNotFoundError:
        raise CliError(
            f"no relay has started on {data_dir} yet: start it (`veil relay serve --data-dir {data_dir}`), then ask again"
        ) from None
    except OSError as exc:
        raise CliError(f"cannot read {data_dir / ADDRESS_FILE}: {exc.strerror}") from None
    return [line for line in lines if line]


def write_relay_addresses(data_dir: Path, addresses: list[str]) -> None:
    path = data_dir / ADDRESS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(a + "\n" for a in addresses))
    tmp.replace(path)


async def cmd_relay_invite(args: argparse.Namespace) -> None:
    if args.new_client:
        from cli.relay_admin import new_client_invite

        new_client_invite(args)
        return
    if args.name or args.expires:
        raise CliError("--name and --expires go with --new-client")
    from relay.onion_clients import is_private

    if is_private(Path(args.data_dir)):
        raise CliError("this is a private onion relay: its address alone reaches nothing; make each person"
                       " an address with a key of their own, `veil relay invite --new-client`")
    addresses = relay_addresses(Path(args.data_dir))
    if args.host:
        addresses = [_with_host(a, args.host) for a in addresses]
    if args.json:
        print(json.dumps({"addresses": addresses}))
        return
    for address in addresses:
        if args.qr:
            print(qr_code(address), end="")
        print(address)


def _with_host(address: str, host: str) -> str:
    """The address with another host (what people reach the relay by), onion ones unchanged."""
    parsed = parse_address(address)
    if parsed.onion:
        return address
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    try:
        hosted = parse_address(f"{parsed.scheme}://{host}:{parsed.port}" + (f"#{parsed.pin}" if parsed.pin else ""))
    except ValueError as exc:
        raise CliError(f"--host: {exc}") from None
    return str(hosted)


async def cmd_relay_address(args: argparse.Namespace) -> None:
    """`veil relay-address ADDRESS`: this device reaches its relay at another address."""
    import sys

    from cli.device import relay_address
    from cli.passwords import confirm
    from node.errors import VeilError

    new = relay_address(args.address, args.insecure_no_tls)  # before the password: one line if malformed
    node = unlock(args)
    try:
        print(f"this device reaches its relay at {node.relay}; the new address: {parse_address(new).public}",
              flush=True)
        if sys.stdin.isatty() and not args.yes and not confirm(
            "did you check the new address (its #pin) with the relay's operator? use it [y/N] "
        ):
            raise CliError("nothing changed")
        try:
            shown = await node.move_relay(new, insecure=args.insecure_no_tls)
        except VeilError as exc:
            raise CliError(f"{exc} (nothing changed)") from None
        print(f"this device now reaches its relay at {shown}")
    finally:
        node.close()
