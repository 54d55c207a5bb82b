"""Groups: the signed changes that make a group, and the state they come to.

A group has a 128-bit random id, known only to its members, and a state (its name and its
members) that every member keeps. The state is stored nowhere as such: it is what a set of
signed *changes* comes to. Each change names the changes its author had already applied
(its parents, by hash), so the changes of a group form a DAG with one root, the creation.
Two members who hold the same changes compute the same state, in whatever order the
changes reached them; a change whose parents are not all known yet waits (`pending`).

Layout of a change (integers big-endian; lp(x) = u32 len(x) || x)::

    body   = 0x01 || group_id (16) || lp(utf8 author) || u64 sent_at || u8 action
             || u8 len(parents) || parents (32 each, ascending, distinct)
             || u16 len(subjects) || lp(utf8 subject) ... (ascending, distinct)
             || lp(utf8 name) [|| salt (32): a create only, random]
    change = body || Ed25519(author's identity key, GROUP_CHANGE || body) (64)
    hash   = SHA-256(change)

    group_id = SHA-256(GROUP_ID || the create's body with its group_id as 16 zero bytes)[:16]

The id commits to the creation (random, by its salt): nobody, member or not, can make
another creation of the same group, so the root of the DAG is fixed by the id itself.

    action 1 create  subjects: the first members besides the author; name: the group's
           2 add     subjects: who joins                               (name empty)
           3 remove  subjects: who goes; the author alone = leaving    (name empty)
           4 rename  name: the new name                                (no subjects)

A create has no parents; every other change has at least one. The state:

- Kept (`valid`). The root is the create that the group id commits to. Any other change
  is kept if its parents are kept and a change among its ancestors (the changes it
  names, and theirs, and so on) added its author. This depends only on a change's own
  past, so every member decides it alike, once: a change by someone never added is not
  kept (`invalid`). Kept changes are stored and passed on; not all take effect. (Whether
  the author was still a member is not a question of the past alone: a removal signed
  by a removed member, backdated, must not count against whoever builds on it.)
- Removal wins (`effective`). A kept change takes effect unless its author is not a
  member in the state of its effective ancestors, or an effective removal of its author
  crossed it (neither is an ancestor of the other). So whatever a removed member signs
  with parents from before the removal (made while unaware of it, or backdated on
  purpose after it) changes nothing. One exception, so that two removals that cross
  have one outcome: a removal of exactly the remover (subjects = the remover alone) is
  not undone by the removal it crossed; both take effect, and both people are out.
  Whether a removal is effective depends on the removals that cross it, so the effective
  set is computed to a fixed point, from "every kept change" on, at most `MAX_ROUNDS`
  rounds (a ring of three or more members each removing the next at once has none; the
  last round's set stands, the same for everyone). Descendants of a change that does not
  take effect are judged on their own: parents need only be kept.
- Members. Someone is a member if an effective change added them (the create adds its
  author and its subjects) and no effective removal of them has that addition among its
  ancestors. So two members who add someone at once both add them; a removal and an
  addition by a third member that cross keep the person in (the addition was not seen by
  the removal); a person added again after a removal is back; two members who remove
  each other at once are both out; what a member adds while being removed does not stand.
- Name. That of the last effective create or rename in the canonical order: the changes
  sorted topologically, ties broken by hash (smallest first).
- Version. The number of kept changes.

Nothing here is I/O: the node stores the changes and checks their signatures with the
authors' identity keys (`verify_change`) before `fold`.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import heapq
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from keyvault import labels
from keyvault._codec import Reader, lp
from keyvault._verify import ed25519_verifies
from keyvault.errors import DecryptionFailed
from keyvault.keys import AccountKeys

CHANGE_VERSION = 1
GROUP_ID_LEN = 16
HASH_LEN = 32
SIG_LEN = 64
MAX_PARENTS = 16
MAX_MEMBERS = 256  # the sender seals each group message for every device of every member
MAX_NAME_BYTES = 128  # an author's or subject's name (as keyvault.envelope's names)
MAX_GROUP_NAME_BYTES = 256
MAX_ROUNDS = 16  # of the removal-wins fixed point (two or three in any real history)
_MAX_U64 = 2**64 - 1


class Action(enum.IntEnum):
    CREATE = 1
    ADD = 2
    REMOVE = 3
    RENAME = 4


@dataclass(frozen=True)
class Change:
    """One signed change of a group."""

    group_id: bytes
    author: str
    sent_at: int  # ms since the epoch, by the author's clock (not used for ordering)
    action: Action
    parents: tuple[bytes, ...]
    subjects: tuple[str, ...]
    name: str
    signature: bytes
    salt: bytes = b""  # a create's 32 random bytes; empty otherwise

    def body(self) -> bytes:
        return _body(self.group_id, self.author, self.sent_at, self.action, self.parents, self.subjects, self.name,
                     self.salt)

    def to_bytes(self) -> bytes:
        return self.body() + self.signature

    @functools.cached_property
    def hash(self) -> bytes:
        return hashlib.sha256(self.to_bytes()).digest()


# Authors and subjects are account names in their one canonical form (the username
# grammar of the relay: wire.USERNAME_RE), so that "Alice" or " alice" cannot stand for an
# account as a member no one can name to remove.
_USERNAME = re.compile(r"^[a-z][a-z0-9_.-]{2,31}\Z")


def _names(values: Iterable[str], limit: int) -> list[bytes]:
    out = sorted({v.encode("utf-8") for v in values})
    if any(not v or len(v) > limit or not _USERNAME.match(v.decode("utf-8")) for v in out):
        raise ValueError("a name is not a username in its canonical form")
    return out


def _body(
    group_id: bytes, author: str, sent_at: int, action: Action, parents: tuple[bytes, ...],
    subjects: tuple[str, ...], name: str, salt: bytes,
) -> bytes:
    if len(group_id) != GROUP_ID_LEN:
        raise ValueError("a group id is 16 bytes")
    if not isinstance(sent_at, int) or not 0 <= sent_at <= _MAX_U64:
        raise ValueError("sent_at out of range")
    (author_b,) = _names([author], MAX_NAME_BYTES)
    subs = _names(subjects, MAX_NAME_BYTES)
    if len(subs) != len(subjects) or list(subjects) != [s.decode("utf-8") for s in subs]:
        raise ValueError("subjects are sorted and distinct")
    if list(parents) != sorted(set(parents)) or any(len(p) != HASH_LEN for p in parents):
        raise ValueError("parents are distinct 32-byte hashes, sorted")
    if len(parents) > MAX_PARENTS or len(subs) > MAX_MEMBERS:
        raise ValueError("too many parents or subjects")
    name_b = name.encode("utf-8")
    if len(name_b) > MAX_GROUP_NAME_BYTES:
        raise ValueError("the group's name is too long")
    action = Action(action)
    shape_ok = {
        Action.CREATE: not parents and bool(name_b) and len(salt) == HASH_LEN,
        Action.ADD: bool(parents) and bool(subs) and not name_b,
        Action.REMOVE: bool(parents) and bool(subs) and not name_b,
        Action.RENAME: bool(parents) and not subs and bool(name_b),
    }[action]
    if not shape_ok or (action != Action.CREATE and salt):
        raise ValueError(f"a malformed {action.name.lower()}")
    return (
        bytes([CHANGE_VERSION])
        + bytes(group_id)
        + lp(author_b)
        + sent_at.to_bytes(8, "big")
        + bytes([int(action)])
        + bytes([len(parents)])
        + b"".join(parents)
        + len(subs).to_bytes(2, "big")
        + b"".join(lp(s) for s in subs)
        + lp(name_b)
        + bytes(salt)
    )


def group_id_of(create: Change) -> bytes:
    """The id a creation commits to (see the module docstring)."""
    body = _body(bytes(GROUP_ID_LEN), create.author, create.sent_at, create.action, create.parents,
                 create.subjects, create.name, create.salt)
    return hashlib.sha256(labels.GROUP_ID + body).digest()[:GROUP_ID_LEN]


def create_group(
    keys: AccountKeys, author: str, name: str, members: Iterable[str], *, sent_at: int, salt: bytes | None = None
) -> Change:
    """A new group's creation, signed by ``author``, with ``members`` besides the author.
    (``salt``: tests only.)"""
    salt = secrets.token_bytes(HASH_LEN) if salt is None else salt
    subs = tuple(sorted(set(members) - {author}))
    unsigned = Change(bytes(GROUP_ID_LEN), author, sent_at, Action.CREATE, (), subs, name, b"", salt)
    group_id = group_id_of(unsigned)
    body = _body(group_id, author, sent_at, Action.CREATE, (), subs, name, salt)
    signature = keys.identity_private.sign(labels.GROUP_CHANGE + body)
    return Change(group_id, author, sent_at, Action.CREATE, (), subs, name, signature, salt)


def make_change(
    keys: AccountKeys, group_id: bytes, author: str, action: Action, *, parents: Iterable[bytes] = (),
    subjects: Iterable[str] = (), name: str = "", sent_at: int,
) -> Change:
    """Sign a change (not a creation: `create_group`) as ``author``, whose account ``keys``
    are. ValueError if malformed."""
    if Action(action) == Action.CREATE:
        raise ValueError("a group is created with create_group")
    ps = tuple(sorted(set(parents)))
    subs = tuple(sorted(set(subjects)))
    body = _body(group_id, author, sent_at, Action(action), ps, subs, name, b"")
    signature = keys.identity_private.sign(labels.GROUP_CHANGE + body)
    return Change(group_id, author, sent_at, Action(action), ps, subs, name, signature)


def decode_change(data: bytes) -> Change:
    """Parse `Change.to_bytes` output (the signature is not checked: `verify_change`);
    DecryptionFailed on any malformation."""
    try:
        r = Reader(data)
        if r.take(1) != bytes([CHANGE_VERSION]):
            raise ValueError("version")
        group_id = r.take(GROUP_ID_LEN)
        author = r.lp().decode("utf-8")
        sent_at = int.from_bytes(r.take(8), "big")
        action = Action(r.take(1)[0])
        parents = tuple(r.take(HASH_LEN) for _ in range(r.take(1)[0]))
        subjects = tuple(r.lp().decode("utf-8") for _ in range(int.from_bytes(r.take(2), "big")))
        name = r.lp().decode("utf-8")
        salt = r.take(HASH_LEN) if action == Action.CREATE else b""
        signature = r.take(SIG_LEN)
        r.end()
        change = Change(group_id, author, sent_at, action, parents, subjects, name, signature, salt)
        if change.body() + signature != bytes(data):
            raise ValueError("not in canonical form")
    except ValueError:  # UnicodeDecodeError and a bad action included
        raise DecryptionFailed() from None
    return change


def verify_change(change: Change, author_identity: bytes) -> bool:
    """True if ``author_identity`` (the author's Ed25519 identity key) signed ``change``."""
    try:
        body = change.body()
    except ValueError:
        return False
    return ed25519_verifies(author_identity, change.signature, labels.GROUP_CHANGE + body)


@dataclass(frozen=True)
class GroupState:
    group_id: bytes
    name: str
    members: frozenset[str]
    version: int  # kept changes
    heads: tuple[bytes, ...]  # hashes of the kept changes nothing kept follows yet (sorted)
    creator: str
    valid: frozenset[bytes]  # hashes of the kept changes (stored and passed on)
    invalid: frozenset[bytes]  # known, every parent known, and not kept
    pending: frozenset[bytes]  # waiting for a parent not known yet
    order: tuple[bytes, ...] = ()  # the kept changes in canonical order (parents first)
    effective: frozenset[bytes] = frozenset()  # the kept changes that take effect


def _members(by_hash: dict[bytes, Change], among: Iterable[bytes], ancestors: dict[bytes, frozenset[bytes]]) -> set[str]:
    """Members after the changes ``among`` (closed under ancestors), per the rules."""
    adds, removes = _index(by_hash, among)
    out = set()
    for who, added in adds.items():
        gone = removes.get(who, [])
        if any(all(a not in ancestors[r] for r in gone) for a in added):
            out.add(who)
    return out


def _index(by_hash: dict[bytes, Change], among: Iterable[bytes]) -> tuple[dict[str, list[bytes]], dict[str, list[bytes]]]:
    """The changes among ``among`` that add, and that remove, each name."""
    adds: dict[str, list[bytes]] = {}
    removes: dict[str, list[bytes]] = {}
    for h in among:
        c = by_hash[h]
        if c.action == Action.CREATE:
            adds.setdefault(c.author, []).append(h)
        if c.action in (Action.CREATE, Action.ADD):
            for who in c.subjects:
                adds.setdefault(who, []).append(h)
        elif c.action == Action.REMOVE:
            for who in c.subjects:
                removes.setdefault(who, []).append(h)
    return adds, removes


def _effective(
    by_hash: dict[bytes, Change], order: list[Change], ancestors: dict[bytes, frozenset[bytes]],
    index: tuple[dict[str, list[bytes]], dict[str, list[bytes]]], strikers: frozenset[bytes],
) -> set[bytes]:
    """The changes of ``order`` (the kept ones) that take effect when the removals
    ``strikers`` are the effective ones: author a member in the effective past, and no
    striker of the author crossing. (``index``: `_index` of the changes.)"""
    removals_of: dict[str, list[Change]] = {}
    for h in strikers:
        for who in by_hash[h].subjects:
            removals_of.setdefault(who, []).append(by_hash[h])
    adds, removes = index
    effective: set[bytes] = set()
    for c in order:
        h = c.hash
        if c.parents:  # (the root, alone without parents, always takes effect)
            anc = ancestors[h]
            # The author is a member of the effective past (rule of _members, for one name).
            gone = [r for r in removes.get(c.author, ()) if r in anc and r in effective]
            if not any(a in anc and a in effective and all(a not in ancestors[r] for r in gone)
                       for a in adds.get(c.author, ())):
                continue
            if any(h not in ancestors[r.hash] and r.hash not in ancestors[h]
                   and not (c.action == Action.REMOVE and c.subjects == (r.author,))
                   for r in removals_of.get(c.author, ())):
                continue  # removal wins
        effective.add(h)
    return effective


def fold(group_id: bytes, changes: Iterable[Change]) -> GroupState:
    """The state that ``changes`` (signatures already verified) come to. ValueError if
    there is no valid creation of ``group_id`` among them."""
    by_hash: dict[bytes, Change] = {}
    for c in changes:
        if c.group_id == group_id:
            by_hash.setdefault(c.hash, c)
    # Changes whose ancestry is complete, in canonical order (Kahn, smallest hash first).
    children: dict[bytes, list[bytes]] = {}
    waiting: dict[bytes, int] = {}
    ready: list[bytes] = []
    for h, c in by_hash.items():
        missing = [p for p in c.parents if p not in by_hash]
        if missing:
            continue
        waiting[h] = len(c.parents)
        for p in c.parents:
            children.setdefault(p, []).append(h)
        if not c.parents:
            heapq.heappush(ready, h)
    order: list[Change] = []
    while ready:
        h = heapq.heappop(ready)
        order.append(by_hash[h])
        for k in children.get(h, []):
            if k in waiting:
                waiting[k] -= 1
                if waiting[k] == 0:
                    heapq.heappush(ready, k)
    placed = {c.hash for c in order}
    pending = frozenset(by_hash) - placed
    roots = [c for c in order if c.action == Action.CREATE and group_id_of(c) == group_id]
    if not roots:
        raise ValueError("no creation of this group among its changes")
    root = roots[0]  # (two would take a SHA-256 collision)
    ancestors: dict[bytes, frozenset[bytes]] = {}
    kept: set[bytes] = set()
    index = _index(by_hash, placed)
    adders = index[0]
    for c in order:
        h = c.hash
        anc: set[bytes] = set()
        for p in c.parents:
            anc |= ancestors[p]
            anc.add(p)
        ancestors[h] = frozenset(anc)
        if c is root:
            kept.add(h)
        elif c.parents and all(p in kept for p in c.parents) and any(a in anc for a in adders.get(c.author, ())):
            kept.add(h)
    order = [c for c in order if c.hash in kept]
    strikers: frozenset[bytes] = frozenset()
    effective = kept
    for _ in range(MAX_ROUNDS):
        effective = _effective(by_hash, order, ancestors, index, strikers)
        now = frozenset(h for h in effective if by_hash[h].action == Action.REMOVE)
        if now == strikers:
            break
        strikers = now
    members = _members(by_hash, effective, ancestors)
    name = root.name
    for c in order:
        if c.hash in effective and c.action in (Action.CREATE, Action.RENAME):
            name = c.name
    followed = {p for h in kept for p in by_hash[h].parents}
    return GroupState(
        group_id=group_id,
        name=name,
        members=frozenset(members),
        version=len(kept),
        heads=tuple(sorted(kept - followed)),
        creator=root.author,
        valid=frozenset(kept),
        invalid=frozenset(placed - kept),
        pending=pending,
        order=tuple(c.hash for c in order),
        effective=frozenset(effective),
    )
