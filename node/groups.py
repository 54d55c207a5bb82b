"""Groups on a device: their changes in the store, their state, and what a change says.

A group message is sealed to every device of every member over the pairwise sessions, in
one `send` like any other message (the relay cannot tell it from one-to-one messages: no
group id, member list or name reaches it). Its letter (keyvault.letter version 2) carries
the group's id; a device that is behind on the group's changes (a new member, a new device
of a member, one that was offline) gets them all, as a changes letter, before the next
message to it. The state is the fold of the changes (keyvault.group); each change is
shown in the group's history as a line of its own.

Everything here is synchronous and runs inside the caller's store transaction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from keyvault.errors import DecryptionFailed
from keyvault.group import (
    Action,
    Change,
    GroupState,
    added_by,
    create_group,
    decode_change,
    fold,
    make_change,
    verify_change,
)
from keyvault.keys import AccountKeys
from node.errors import VeilError
from node.store import NodeStore

log = logging.getLogger("veil.node")

PREFIX = "#"  # a group conversation's peer: "#" + the group id in hex
MAX_LABEL = 64
MAX_PENDING = 256  # changes of one group kept while waiting for their parents
# ... of which one author's at most, and only of an author some change held names as
# added: nobody can fill the waiting room for good (their parents may never come).
MAX_PENDING_PER_AUTHOR = 32
# Changes of one group held here at most (kept ones and those waiting): what one fold costs
# is bounded by it and MAX_GROUP_NAMES (PROTOCOL.md 20, bounds: about 1.5 s here at
# most for the worst shapes found). Past it, no new change is taken or made: the group
# must be made anew.
MAX_GROUP_CHANGES = 4096
# The names in the changes held (their subjects, summed): a removal is judged per subject,
# so this bounds what a fold weighs too (4,096 removals of 256 names each would be a
# million; 65,536 fold in about 0.5 s here).
MAX_GROUP_NAMES = 65_536
MAX_LIMBO = 4096  # changes kept of a group not yet held here (see merge)
MAX_LIMBO_GROUPS = 16
MAX_LIMBO_PER_SENDER = 2  # groups in limbo that one sender's letters brought


def conversation(group_id: bytes) -> str:
    return PREFIX + group_id.hex()


def group_of(peer: str) -> bytes | None:
    """The group id of a conversation, or None for a one-to-one one."""
    if not peer.startswith(PREFIX):
        return None
    try:
        gid = bytes.fromhex(peer[1:])
    except ValueError:
        return None
    return gid if len(gid) == 16 else None


def describe(change: Change) -> str:
    """What a change did, as its line in the group's history."""
    who = ", ".join(change.subjects)
    if change.action == Action.CREATE:
        return f"created the group {change.name!r}" + (f" with {who}" if who else "")
    if change.action == Action.ADD:
        return f"added {who}"
    if change.action == Action.REMOVE:
        return "left the group" if change.subjects == (change.author,) else f"removed {who}"
    return f"renamed the group {change.name!r}"


def _clean_label(name: str) -> str:
    label = "".join(ch if ch.isprintable() and not ch.isspace() else "-" for ch in name.strip())[:MAX_LABEL]
    return label.strip("-#") or "group"


class Groups:
    """The groups of one device, in its store."""

    def __init__(self, store: NodeStore, keys: AccountKeys, name: str) -> None:
        self.store = store
        self.keys = keys
        self.name = name
        # Each group's last fold: of which changes, its state, and the names in them.
        self._states: dict[bytes, tuple[frozenset[bytes], GroupState, int]] = {}

    # ---- reading ---------------------------------------------------------------------
    def state(self, group_id: bytes) -> GroupState:
        """The group's state (folded again only when its stored changes changed)."""
        return self._fold(group_id)[0]

    def _fold(self, group_id: bytes) -> tuple[GroupState, int]:
        """The state, and the names in the changes held (MAX_GROUP_NAMES)."""
        held = self.store.group_changes(group_id)
        key = frozenset(held)
        cached = self._states.get(group_id)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        changes = []
        for blob in held.values():
            try:
                changes.append(decode_change(blob))
            except DecryptionFailed:
                continue  # (verified before it was stored: cannot happen)
        state = fold(group_id, changes)
        names = sum(len(c.subjects) for c in changes if c.hash in state.valid)
        self._states[group_id] = (key, state, names)
        return state, names

    def find(self, label: str) -> bytes:
        """A group by its conversation ("#" + hex id) or its name here ("#" optional)."""
        by_id = group_of(label)
        gid = by_id if by_id is not None and self.store.group_label(by_id) is not None else None
        if gid is None:
            gid = self.store.group_by_label(label.lstrip(PREFIX))
        if gid is None:
            raise VeilError(f"no group named {label!r} on this device (`veil group list` shows them)")
        return gid

    def label(self, group_id: bytes) -> str:
        return self.store.group_label(group_id) or group_id.hex()[:8]

    def _new_label(self, name: str) -> str:
        base = _clean_label(name)
        label, n = base, 1
        while self.store.group_by_label(label) is not None:
            n += 1
            label = f"{base}-{n}"
        return label

    # ---- this device's changes -----------------------------------------------------------
    def create(self, name: str, members: Iterable[str]) -> tuple[bytes, Change]:
        if not name.strip():
            raise VeilError("a group needs a name")
        try:
            change = create_group(self.keys, self.name, name, members, sent_at=int(time.time() * 1000))
        except ValueError as exc:
            raise VeilError(f"cannot create that group: {exc}") from None
        self.store.add_group(change.group_id, self._new_label(name))
        self.store.add_group_changes(change.group_id, [(change.hash, change.to_bytes())])
        return change.group_id, change

    def change(self, group_id: bytes, action: Action, subjects: Iterable[str] = (), name: str = "") -> Change:
        """A change by this account, after everything this device has of the group."""
        state, names = self._fold(group_id)
        if self.name not in state.members:
            raise VeilError(f"you are not a member of {self.label(group_id)!r}")
        subjects = tuple(subjects)
        if len(state.valid) + len(state.pending) >= MAX_GROUP_CHANGES:
            raise VeilError(f"{self.label(group_id)!r} has had {MAX_GROUP_CHANGES} changes, the most a group"
                            " can: create a new group for what comes next")
        if names + len(subjects) > MAX_GROUP_NAMES:
            raise VeilError(f"{self.label(group_id)!r} has had changes naming {MAX_GROUP_NAMES:,} people in all,"
                            " the most a group can: create a new group for what comes next")
        if action == Action.ADD:
            subjects = tuple(s for s in subjects if s not in state.members)
            if not subjects:
                raise VeilError("they are members already")
        if action == Action.RENAME:
            name = name.strip()
            if not name:
                raise VeilError("a group needs a name")
            if name == state.name:
                raise VeilError(f"it is named {name!r} already")
        if action == Action.REMOVE and not set(subjects) <= state.members:
            raise VeilError(f"not a member of {self.label(group_id)!r}: {', '.join(set(subjects) - state.members)}")
        if action == Action.REMOVE:
            above = sorted(s for s in subjects if not state.may_remove(self.name, s))
            if above:
                raise VeilError(f"you cannot remove {', '.join(above)}: only a member who joined before them can"
                                " (group show lists the members in the order they joined)")
        try:
            change = make_change(self.keys, group_id, self.name, action, parents=state.parents(), subjects=subjects,
                                 name=name, sent_at=int(time.time() * 1000))
        except ValueError as exc:
            raise VeilError(f"cannot make that change: {exc}") from None
        self.store.add_group_changes(group_id, [(change.hash, change.to_bytes())])
        return change

    # ---- others' changes -----------------------------------------------------------------
    def merge(
        self, group_id: bytes, blobs: Iterable[bytes], identity_of: Callable[[str], bytes | None],
        sender: str = "",
    ) -> tuple[GroupState | None, list[Change], list[Change]]:
        """Take in changes a letter carried: each must be of this group and signed by its
        author (``identity_of``: the author's identity key, None if unknown). Returns the
        new state (None if the group is still unknown here and this account is not in
        it), the changes that took effect, and those that had and no longer do (a
        removal of their author that crossed them came in: removal wins)."""
        is_new = self.store.group_label(group_id) is None
        limbo = self.store.group_limbo(group_id) if is_new else {}
        known = self.store.group_changes(group_id) | limbo
        seen = set(known.values())
        fresh: list[Change] = []
        for blob in blobs:
            if blob in seen:
                continue
            try:
                c = decode_change(blob)
            except DecryptionFailed:
                continue
            identity = identity_of(c.author)
            if c.group_id != group_id or identity is None:
                continue
            if verify_change(c, identity):
                fresh.append(c)
        if not fresh:  # nothing new (a letter again, say): no fold to pay for
            return (None if is_new else self.state(group_id)), [], []
        before = self._effective(group_id)
        everything = [decode_change(b) for b in known.values()] + fresh
        # A group this device does not hold yet, whose changes come in several letters:
        # they wait (bounded: MAX_LIMBO changes, of MAX_LIMBO_GROUPS groups) once one of
        # them adds this account, until the group's state has it as a member.
        names_us = bool(limbo) or any(
            c.action in (Action.CREATE, Action.ADD) and self.name in c.subjects for c in fresh)
        try:
            state = fold(group_id, everything)
        except ValueError:
            state = None  # no creation of it yet
        except Exception as exc:  # a bug the changes reach: keep none of them, go on
            log.error("the changes of a group could not be folded (%s); none was taken in", type(exc).__name__)
            return None, [], []
        if is_new and (state is None or self.name not in state.members):
            if names_us and fresh:
                self.store.add_group_limbo(group_id, [(c.hash, c.to_bytes()) for c in fresh], sender, MAX_LIMBO,
                                           MAX_LIMBO_GROUPS, MAX_LIMBO_PER_SENDER)
            return None, [], []  # not (yet) ours to keep
        if state is None:
            return None, [], []
        if is_new:
            self.store.add_group(group_id, self._new_label(state.name))
            fresh += [decode_change(b) for b in limbo.values()]  # they are kept as fresh ones are
            self.store.drop_group_limbo(group_id)
        # Kept: the valid changes (those that take effect and those that a removal of
        # their author undoes, which others may build on), and a bounded number waiting
        # for parents; not the invalid ones (by someone never added), which change
        # nothing and would only grow the store and what is passed on. Waiting: only
        # changes by someone an effective change adds (not one that only waits, whose
        # author could name anyone), MAX_PENDING_PER_AUTHOR of each; when the room is
        # full, one of whoever waits with the most goes. Names (MAX_GROUP_NAMES) count in
        # the kept changes only: those waiting are not folded, and have their own bound.
        by_hash = {c.hash: c for c in everything}
        stored = known.keys() - limbo.keys()
        named = {who for h in state.effective for who in added_by(by_hash[h])}
        waiting: dict[str, list[bytes]] = {}
        for h in sorted(state.pending & stored):
            waiting.setdefault(by_hash[h].author, []).append(h)
        room = MAX_PENDING - sum(map(len, waiting.values()))
        space = MAX_GROUP_CHANGES - len(stored)  # (parents first, should it run out)
        names = sum(len(by_hash[h].subjects) for h in stored if h in state.valid)
        position = {h: i for i, h in enumerate(state.order)}
        keep: dict[bytes, Change] = {}
        # A change that waited and turns out invalid (its parents came, its author's
        # addition is not among them) goes: invalid ones are not kept.
        dropped: list[bytes] = sorted(stored & state.invalid)
        for c in sorted(fresh, key=lambda c: (position.get(c.hash, len(position)), c.hash)):
            if c.hash in keep:
                continue
            if len(keep) >= space or (c.hash in state.valid and names + len(c.subjects) > MAX_GROUP_NAMES):
                break
            if c.hash in state.pending:
                mine = waiting.setdefault(c.author, [])
                if c.author not in named or len(mine) >= MAX_PENDING_PER_AUTHOR:
                    continue
                if room <= 0:
                    hog = max(waiting, key=lambda a: (len(waiting[a]), a))
                    if len(waiting[hog]) <= len(mine) + 1:
                        continue  # nobody waits with more than this author then would
                    out = waiting[hog].pop()
                    if keep.pop(out, None) is None:
                        dropped.append(out)
                    room += 1
                mine.append(c.hash)
                room -= 1
            elif c.hash not in state.valid:
                continue
            keep[c.hash] = c
            if c.hash in state.valid:
                names += len(c.subjects)
        self.store.drop_group_changes(group_id, dropped)
        self.store.add_group_changes(group_id, [(c.hash, c.to_bytes()) for c in keep.values()])
        if not dropped and stored | keep.keys() == by_hash.keys():
            # Everything folded is held now: that fold is the state (no second fold).
            self._states[group_id] = (frozenset(by_hash), state, names)
        state = self.state(group_id)
        def in_time(hashes: Iterable[bytes]) -> list[Change]:
            return sorted((by_hash[h] for h in hashes), key=lambda c: (c.sent_at, c.hash))

        return state, in_time(state.effective - before), in_time(before - state.effective)

    def _effective(self, group_id: bytes) -> frozenset[bytes]:
        if self.store.group_label(group_id) is None:
            return frozenset()
        try:
            return self.state(group_id).effective
        except ValueError:
            return frozenset()
