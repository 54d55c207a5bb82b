"""`veil group`: conversations among several people (node/groups.py).

A change (create, add, remove, rename, leave) is made on this device at once and goes to the
members the next time it is online: now, if the relay can be reached.
"""

from __future__ import annotations

import argparse
import json

from cli.device import unlock
from cli.errors import CliError
from cli.messages import warn
from cli.text import inert
from keyvault.group import Action
from node.errors import ConnectionLost, RelayRefused, RelayUnreachable
from node.node import Node


def _names(values: list[str]) -> list[str]:
    return [n for v in values for n in v.split(",") if n.strip()]


async def _deliver(node: Node) -> str:
    """Hand what is queued to the relay now if it can be reached; what that came to."""
    try:
        async with node.connected():
            pass
    except (RelayUnreachable, ConnectionLost, RelayRefused) as exc:
        return f"queued: it goes out the next time this device is online ({str(exc).rstrip('.')})"
    return "sent to the members"


def _show(node: Node, label: str) -> dict[str, object]:
    gid = node.groups.find(label)
    state = node.groups.state(gid)
    members = []
    for name, level in state.levels:  # in the order they joined
        contact = node.store.contact(name)
        members.append({"name": name, "you": name == node.name, "level": level,
                        "verified": name == node.name or bool(contact and contact.verified),
                        "you_can_remove": name != node.name and state.may_remove(node.name, name)})
    return {"group": node.groups.label(gid), "id": gid.hex(), "name": state.name, "members": members,
            "member": node.name in state.members, "version": state.version, "created_by": state.creator}


async def cmd_group(args: argparse.Namespace) -> None:
    node = unlock(args)
    node.events.append(warn)
    try:
        action = args.group_command
        if action == "create":
            members = _names(args.members or [])
            label = node.group_create(args.name, members)
            print(f"group {inert(label)} created with {', '.join(members) or 'nobody else yet'}; {await _deliver(node)}")
        elif action in ("add", "remove"):
            names = _names(args.names)
            node.group_change(args.group, Action.ADD if action == "add" else Action.REMOVE, names)
            done = "added to" if action == "add" else "removed from"
            print(f"{', '.join(names)} {done} {inert(args.group)}; {await _deliver(node)}")
        elif action == "rename":
            name = " ".join(args.new_name).strip()
            node.group_change(args.group, Action.RENAME, name=name)
            print(f"{inert(args.group)} renamed {inert(name)!r}; {await _deliver(node)}")
        elif action == "leave":
            node.group_change(args.group, Action.REMOVE, [node.name])
            print(f"you left {inert(args.group)}; {await _deliver(node)}")
        elif action == "list":
            for gid, label in node.store.group_ids():
                shown = _show(node, label)
                unread = node.store.unread_counts("#" + gid.hex()).get("#" + gid.hex(), 0)
                if args.json:
                    print(json.dumps({**shown, "unread": unread}))
                else:
                    state = "" if shown["member"] else " (you are no longer a member)"
                    count = len(shown["members"])  # type: ignore[arg-type]
                    named = "" if shown["name"] == label else f"  {inert(str(shown['name']), keep_newlines=False)!r}"
                    print(f"{inert(label)}{named}  {count} members, {unread} unread{state}")
        elif action == "show":
            shown = _show(node, args.group)
            if args.json:
                print(json.dumps(shown))
                return
            print(f"{inert(str(shown['group']))}: {inert(str(shown['name']))!r}, created by {shown['created_by']}")
            print("members, in the order they joined (a member can remove those who joined after them):")
            for m in shown["members"]:  # type: ignore[attr-defined]
                tag = "you" if m["you"] else ("verified" if m["verified"] else "unverified")
                if m["you_can_remove"]:
                    tag += ", you can remove them"
                print(f"  {m['level']:>3}  {inert(str(m['name']), keep_newlines=False)}  {tag}")
            if not shown["member"]:
                print("you are no longer a member")
        else:
            raise CliError("use `veil group create|add|remove|rename|leave|list|show`")
    finally:
        node.close()
