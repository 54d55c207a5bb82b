"""A line typed in ``veil chat``: parsed, and the command it names carried out.

Plain lines go to the current peer, ``@NAME text`` picks the peer and sends, ``//text``
sends a line that starts with '/', and ``/word ...`` runs the command in ``HANDLERS``.
Runs on the trio side; shows things only through the ``Chat``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import trio

from cli.chat.formatting import local_time
from cli.text import inert
from keyvault.group import Action
from keyvault.safety import format_safety_number
from node.errors import UnknownUser, VeilError
from node.groups import conversation, group_of
from node.store import StoredMessage

if TYPE_CHECKING:
    from cli.chat.live import Chat

LINK_TIMEOUT = 15.0  # for commands that ask the relay (lookups, /devices)
DEFAULT_HISTORY = 20

HELP = [
    ("/to NAME", "talk to NAME: plain lines go to them (the prompt shows who); /to #GROUP, to a group"),
    ("@NAME text", "send one line to NAME and make them the current peer"),
    ("/history [NAME] [N]", f"the last N messages of the conversation (default {DEFAULT_HISTORY})"),
    ("/inbox", "conversations and groups, with unread counts"),
    ("/group create NAME A,B", "a group with A and B (and you); /group add|remove GROUP NAME..., /group rename GROUP NAME, /group leave GROUP"),
    ("/group list|show [GROUP]", "your groups; a group's members in the order they joined, verified or not"),
    ("/contacts", "contacts: verified or not, devices, key changes"),
    ("/verify [NAME] [yes]", "show the safety number; 'yes' marks NAME verified"),
    ("/trust NAME", "accept NAME's changed identity key (releases held messages)"),
    ("/add LINK [replace]", "add a verified contact from their invite link (veil:contact?...)"),
    ("/invite", "your own invite link, to give to someone"),
    ("/devices", "this account's devices (needs the relay)"),
    ("/status", "relay, connection, outbox"),
    ("/reconnect", "try the relay now instead of waiting for the backoff"),
    ("/bell [on|off]", "ring the terminal bell for messages outside the current conversation"),
    ("/help", "this list"),
    ("/quit", "leave (also Ctrl-D or Ctrl-C)"),
    ("//text", "send a line that starts with '/'"),
]
COMMANDS = sorted({h[0].split()[0][1:] for h in HELP if h[0].startswith("/") and h[0][1] != "/"} | {"exit"})
QUIT_WORDS = {"/quit", "/exit", "/q"}
NAME_ARG = re.compile(r"^/(to|verify|trust|history)\s+(\S*)$")


async def handle(chat: Chat, line: str) -> None:
    """Carry out one typed line."""
    if not line.strip():
        return
    if line.startswith("//"):
        send_line(chat, line[1:])
    elif line.startswith("@"):
        name, _, text = line[1:].partition(" ")
        if not name:
            raise VeilError("write @NAME text")
        if await switch(chat, name, quiet=bool(text.strip())) and text.strip():
            send_line(chat, text)
    elif line.startswith("/"):
        word, _, rest = line[1:].partition(" ")
        handler = HANDLERS.get(word.lower())
        if handler is None:
            raise VeilError(f"unknown command /{inert(word, keep_newlines=False)}: /help lists the commands")
        await handler(chat, rest.strip())
    else:
        send_line(chat, line)


def send_line(chat: Chat, text: str) -> None:
    """Send a line to the current peer; with none, to whoever wrote last (who becomes the
    current peer), and with nobody yet, keep the line in the input."""
    assert chat.session is not None
    peer, why = chat.conv.peer, ""
    if peer is None:
        peer = chat.conv.last_writer
        if peer is None:
            chat.keep_input(text)
            chat.error("not sent: nobody has written to you yet; pick who gets it with /to NAME"
                       " or @NAME text (the line is kept)")
            return
        why = "who wrote last"
    msg = chat.session.send(peer, text)
    if chat.conv.peer is None:
        chat.conv.peer = peer
        chat.refresh_prompt()
    chat.tracked[msg.msg_id] = why
    state = chat.state_of(msg)
    if state == "pending":
        chat.show_pending(msg, why)
    else:
        chat.show(msg, state=state, why=why)
    chat.conv.shown(peer, msg.seq)
    if state == "held":
        chat.error(f"sending to {inert(msg.peer)} is held: their identity key changed since you verified it"
                   f" (/verify {inert(msg.peer)}, then /trust {inert(msg.peer)})")


async def switch(chat: Chat, raw: str, *, quiet: bool = False) -> bool:
    """Make ``raw`` the current peer (checked at the relay when online), or "#GROUP" the
    current group, and show what is unread there. False if there is no such user."""
    if raw.startswith("#"):
        gid = chat.node.groups.find(raw)
        peer = conversation(gid)
        chat.conv.peer = peer
        msgs = chat.conv.unread_messages(peer)
        state = chat.node.groups.state(gid)
        where = chat.shown(peer)
        if msgs:
            chat.note(f"in {inert(where)}; {len(msgs)} unread:")
            for m in msgs:
                chat.show(m, state=chat.state_of(m))
            chat.conv.shown(peer, msgs[-1].seq)
        elif not quiet:
            chat.note(f"in {inert(where)} ({len(state.members)} members)"
                      + ("" if chat.node.name in state.members else "; you are no longer a member"))
        chat.refresh_prompt()
        return True
    name = chat.username(raw)
    if name != chat.node.name:
        known = chat.node.store.contact(name) is not None
        try:
            online = await chat.lookup(name)
        except UnknownUser:
            chat.error(f"no such user: {name}")
            return False
        except VeilError as exc:
            if not known:
                raise
            online = False
            chat.log.debug("lookup failed: %s", exc)
        if not online and not known:
            chat.note(f"offline: {name} is not checked yet; messages to {name} are queued")
    changed = name != chat.conv.peer
    chat.conv.peer = name
    unread = chat.conv.unread.get(name, 0)
    msgs = chat.conv.unread_messages(name)
    if msgs:
        chat.note(f"talking to {name}; {unread} unread:")
        for m in msgs:
            chat.show(m, state=chat.state_of(m))
        chat.conv.shown(name, msgs[-1].seq)
    elif changed or not quiet:
        chat.note(f"talking to {name}" + (" (notes to yourself and your other devices)"
                                          if name == chat.node.name else ""))
    contact = chat.node.store.contact(name)
    if contact is not None and contact.key_changed:
        chat.key_warning(name, contact.verified)
    chat.refresh_prompt()
    return True


async def cmd_to(chat: Chat, rest: str) -> None:
    if not rest:
        if chat.conv.peer:
            chat.note(f"talking to {chat.conv.peer}")
        else:
            raise VeilError("write /to NAME")
        return
    await switch(chat, rest.split()[0])


async def cmd_history(chat: Chat, rest: str) -> None:
    peer, n = chat.conv.peer, DEFAULT_HISTORY
    for arg in rest.split():
        if arg.isdigit():
            n = max(1, min(int(arg), 1000))
        elif arg.startswith("#"):
            peer = conversation(chat.node.groups.find(arg))
        else:
            peer = chat.username(arg)
    if peer is None:
        raise VeilError("no conversation yet: /history NAME, or pick one with /to NAME")
    msgs = chat.node.store.history(peer, n)
    where = inert(chat.shown(peer))
    if not msgs:
        chat.note(f"no messages with {where} yet")
        return
    chat.note(f"history with {where} (last {len(msgs)}, local time):")
    for m in msgs:
        chat.show(m, state=chat.state_of(m))
    chat.conv.shown(peer, msgs[-1].seq)
    chat.refresh_prompt()
    contact = chat.node.store.contact(peer)
    if contact is not None and contact.key_changed:
        chat.key_warning(peer, contact.verified)


def _conversations(chat: Chat) -> dict[str, StoredMessage | None]:
    convs: dict[str, StoredMessage | None] = {c.name: None for c in chat.node.store.contacts()}
    for m in chat.node.store.last_messages():
        convs[m.peer] = m
    for p in chat.conv.unread:
        convs.setdefault(p, None)
    return convs


async def cmd_inbox(chat: Chat, rest: str) -> None:
    convs = _conversations(chat)
    if not convs:
        chat.note("no conversations yet: /to NAME starts one")
        return

    def rank(p: str) -> tuple[int, int, str]:
        last = convs[p]
        return (-chat.conv.unread.get(p, 0), -(last.seq if last is not None else 0), p)

    order = sorted(convs, key=rank)
    chat.note("conversations (unread: not yet shown on this device):")
    width = max(len(chat.shown(p)) for p in order)
    for p in order:
        last = convs[p]
        n = chat.conv.unread.get(p, 0)
        count = f"{n} unread" if n else "no unread"
        when = f"  last [{local_time(last.sent_at)}]" if last else ""
        mark = "  <- current" if p == chat.conv.peer else ""
        chat.say(f"  {inert(chat.shown(p)).ljust(width)}  {count}{when}{mark}", 4)


async def cmd_group(chat: Chat, rest: str) -> None:
    words = rest.split()
    verb = words[0].lower() if words else "list"
    node = chat.node
    if verb == "list":
        groups = node.store.group_ids()
        if not groups:
            chat.note("no groups yet: /group create NAME A,B")
            return
        for gid, label in groups:
            state = node.groups.state(gid)
            n = chat.conv.unread.get(conversation(gid), 0)
            out = "" if node.name in state.members else ", you are no longer a member"
            chat.say(f"  #{inert(label)}  {len(state.members)} members, {n} unread{out}", 4)
        return
    if verb == "show":
        peer = conversation(node.groups.find(words[1])) if len(words) > 1 else chat.conv.peer
        shown = group_of(peer or "")
        if shown is None:
            raise VeilError("write /group show GROUP")
        state = node.groups.state(shown)
        gid = shown
        chat.note(f"#{inert(node.groups.label(gid))}: {inert(state.name)!r}, created by {state.creator}")
        chat.note("members, in the order they joined (a member can remove those who joined after them):")
        for name, level in state.levels:
            c = node.store.contact(name)
            tag = "you" if name == node.name else ("verified" if c is not None and c.verified else "unverified")
            if name != node.name and state.may_remove(node.name, name):
                tag += ", you can remove them"
            chat.say(f"  {level:>3}  {inert(name, keep_newlines=False)}  {tag}", 4)
        return
    if verb == "create" and len(words) >= 2:
        members = [n for w in words[2:] for n in w.split(",") if n]
        label = node.group_create(words[1], members)
        chat.note(f"group #{inert(label)} created with {', '.join(members) or 'nobody else yet'}")
    elif verb in ("add", "remove") and len(words) >= 3:
        names = [n for w in words[2:] for n in w.split(",") if n]
        node.group_change(words[1], Action.ADD if verb == "add" else Action.REMOVE, names)
        chat.note(f"{', '.join(names)} {'added to' if verb == 'add' else 'removed from'} {inert(words[1])}")
    elif verb == "rename" and len(words) >= 3:
        name = rest.split(None, 2)[2].strip()
        node.group_change(words[1], Action.RENAME, name=name)
        chat.note(f"{inert(words[1])} renamed {inert(name)!r}")
    elif verb == "leave" and len(words) == 2:
        node.group_change(words[1], Action.REMOVE, [node.name])
        chat.note(f"you left {inert(words[1])}")
    else:
        raise VeilError("write /group create NAME A,B | add GROUP NAME... | remove GROUP NAME... | rename GROUP NAME"
                        " | leave GROUP | list | show [GROUP]")
    if chat.session is not None:
        chat.session.retry_held()  # seal and send it now if online


async def cmd_contacts(chat: Chat, rest: str) -> None:
    contacts = chat.node.store.contacts()
    if not contacts:
        chat.note("no contacts yet: /to NAME or @NAME text adds one")
        return
    width = max(len(c.name) for c in contacts)
    for c in contacts:
        state = "verified" if c.verified else "unverified"
        flag = "  KEY CHANGED" if c.key_changed else ""
        n = chat.conv.unread.get(c.name, 0)
        unread = f"  {n} unread" if n else ""
        chat.say(f"  {inert(c.name).ljust(width)}  {state}  {len(c.devices)} device(s){flag}{unread}", 4)


async def cmd_verify(chat: Chat, rest: str) -> None:
    assert chat.session is not None
    args = rest.split()
    mark = bool(args) and args[-1].lower() in ("yes", "y", "--mark")
    if mark:
        args = args[:-1]
    if args:
        name = chat.username(args[0])
    elif chat.conv.peer:
        name = chat.conv.peer
    else:
        raise VeilError("write /verify NAME")
    if name == chat.node.name:
        raise VeilError("that is you: verify a contact")
    contact = chat.node.store.contact(name)
    if contact is None:
        if not await chat.lookup(name):
            raise VeilError(f"offline: {name} is not a contact yet and the relay is needed to fetch their key")
        contact = chat.node.store.contact(name)
        assert contact is not None
    chat.say(f"safety number for you ({chat.node.name}) and {name}:")
    for row in format_safety_number(chat.node.safety_number(contact)).splitlines():
        chat.say("    " + row)
    if contact.key_changed:
        chat.error(f"note: {name}'s identity key changed since it was first seen")
    if mark:
        with chat.node.store.transaction():
            chat.node.store.set_verified(name, True)
        chat.check_keys()
        chat.session.retry_held()
        chat.note(f"{name} is now verified")
    elif contact.verified:
        chat.note(f"{name} is verified")
    else:
        chat.note(f"compare it with {name} (in person or on a call); if it is the same: /verify {name} yes")


async def cmd_trust(chat: Chat, rest: str) -> None:
    assert chat.session is not None
    args = rest.split()
    name = chat.username(args[0]) if args else chat.conv.peer
    if name is None:
        raise VeilError("write /trust NAME")
    contact = chat.node.store.contact(name)
    if contact is None:
        raise VeilError(f"{name} is not a contact")
    if not contact.key_changed:
        chat.note(f"{name}'s identity key has not changed: nothing to accept")
        return
    with chat.node.store.transaction():
        chat.node.store.accept_key(name)
    chat.check_keys()
    chat.session.retry_held()
    chat.note(f"accepted {name}'s new identity key; held messages go out now"
              f" ({name} is not verified any more: /verify {name})")


async def cmd_add(chat: Chat, rest: str) -> None:
    from cli.errors import CliError
    from cli.invites import add_contact

    assert chat.session is not None
    words = rest.split()
    replace = len(words) > 1 and words[-1].lower() == "replace"
    if replace:
        rest = " ".join(words[:-1])
    if not rest:
        raise VeilError("write /add LINK, with the link `veil invite` (or /invite) printed for them")
    link = chat.session.link
    if link is None:
        raise VeilError("offline: /add needs the relay (to check the link against the keys it has); try again when online")
    try:
        with trio.fail_after(LINK_TIMEOUT):
            said = await add_contact(chat.node, rest, link, replace=replace, how="/add LINK replace")
    except CliError as exc:
        raise VeilError(str(exc)) from None
    chat.check_keys()
    chat.session.retry_held()
    chat.note(said)


async def cmd_invite(chat: Chat, rest: str) -> None:
    from cli.invites import contact_link

    chat.note("your invite link (give it over a channel you trust; whoever adds it pins your key):")
    chat.say(str(contact_link(chat.node)), 0)


async def cmd_devices(chat: Chat, rest: str) -> None:
    assert chat.session is not None
    link = chat.session.link
    if link is None:
        raise VeilError("offline: /devices needs the relay; try again when online")
    with trio.fail_after(LINK_TIMEOUT):
        devices = await chat.node.devices(link)
    chat.note(f"devices of {chat.node.name}:")
    for d in devices:
        this = "  (this device)" if d.device_id == chat.node.device_id else ""
        try:
            added = datetime.fromtimestamp(d.created_day * 86400, tz=UTC).strftime("%Y-%m-%d")
        except (OverflowError, OSError, ValueError):
            added = "?"
        chat.say(f"  {d.device_id.hex()[:8]}  added {added}{this}", 4)


async def cmd_status(chat: Chat, rest: str) -> None:
    assert chat.session is not None
    s = chat.session
    if chat.status == "online":
        conn = "connected"
    elif chat.status == "connecting":
        conn = "connecting"
    else:
        left = "" if chat.retry_at is None else f", next try in {max(0, math.ceil(chat.retry_at - time.monotonic()))}s"
        conn = f"not connected (attempt {s.attempts}{left}; /reconnect tries now)"
    chat.say(f"account {chat.node.name}, this device {chat.node.device_id.hex()[:8]}")
    chat.say(f"relay {chat.node.relay}: {conn}")
    chat.say(f"outbox: {chat.node.store.pending_count()} pending")
    chat.say(f"talking to: {chat.conv.peer or 'nobody (/to NAME)'}")


async def cmd_reconnect(chat: Chat, rest: str) -> None:
    assert chat.session is not None
    if chat.status == "online":
        chat.note("already online")
        return
    chat.session.reconnect_now()
    chat.note("reconnecting now")


async def cmd_bell(chat: Chat, rest: str) -> None:
    word = rest.lower()
    if word not in ("", "on", "off"):
        raise VeilError("write /bell on or /bell off")
    if word:
        chat.set_bell(word == "on")
    if chat.bell:
        chat.note("bell on: a message outside the conversation you are in rings the terminal bell"
                  " (/bell off; remembered on this device)")
    else:
        chat.note("bell off: messages outside the conversation you are in are announced without it"
                  " (/bell on; remembered on this device)")


async def cmd_help(chat: Chat, rest: str) -> None:
    width = max(len(h[0]) for h in HELP)
    for cmd, text in HELP:
        chat.say(f"  {cmd.ljust(width)}  {text}", width + 4)
    chat.say("  Plain lines go to the current peer. Tab completes commands and names.", 2)


HANDLERS: dict[str, Callable[[Chat, str], Awaitable[None]]] = {
    "to": cmd_to, "history": cmd_history, "inbox": cmd_inbox, "contacts": cmd_contacts,
    "verify": cmd_verify, "trust": cmd_trust, "devices": cmd_devices, "status": cmd_status,
    "reconnect": cmd_reconnect, "bell": cmd_bell, "help": cmd_help, "add": cmd_add, "invite": cmd_invite,
    "group": cmd_group,
}
