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
- Levels. Each addition has a level: the creator's 0, the creation's subjects' 1, an
  add's subjects' the depth of the add + 1 (the depth of a change: the longest path to it
  from the root). A member's level in a past is that of the lowest addition of theirs
  that counts there. A member may remove only members of a higher level (who joined
  after them), and anyone may leave: so no two members can ever remove each other.
- Removal wins (`effective`). A kept change takes effect unless its author is not a
  member in the state of its effective ancestors, it removes someone it may not, or an
  effective removal of its author crossed it (neither is an ancestor of the other). So
  whatever a removed member signs with parents from before the removal (made while
  unaware of it, or backdated on purpose after it) changes nothing: it crosses the
  removal, and the remover joined before it, so no removal of its own can undo that.
  A removal is judged per subject. Whether a change takes effect can depend on itself
  through others only when someone is a member at different levels in different pasts;
  what the rules decide is decided first (`_Resolution`, one outcome in any order);
  what is left (a cycle) is settled by the first way of deciding it that every rule
  agrees with, if there are few enough to try them all, else by putting in the first
  undecided removal, in canonical order, whose author's membership is certain
  (PROTOCOL.md 20, rule 4). Descendants of a change that does not take effect are judged
  on their own: parents need only be kept.
- Members. Someone is a member if an effective change added them (the create adds its
  author and its subjects) and no effective removal of them has that addition among its
  ancestors. So two members who add someone at once both add them; a removal and an
  addition by a third member that cross keep the person in (the addition was not seen by
  the removal); a person added again after a removal is back, at the new level; of two
  members who remove each other at once, the earlier joiner's removal stands; what a
  member adds while being removed does not stand.
- Name. Of the effective create and renames that no other effective one follows, the
  one whose author had the lowest level, then the smallest author's name, then the last
  in the canonical order (the changes sorted topologically, ties broken by hash,
  smallest first): not something a member can grind by trying hashes.
- Version. The number of kept changes.

Nothing here is I/O: the node stores the changes and checks their signatures with the
authors' identity keys (`verify_change`) before `fold`.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import heapq
import itertools
import operator
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
    if action == Action.CREATE and author_b in subs:
        raise ValueError("a creation's subjects are its members besides its author")
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


def added_by(change: Change) -> tuple[str, ...]:
    """Whom a change adds: a creation, its author and its subjects; an add, its subjects."""
    if change.action == Action.CREATE:
        return (change.author, *change.subjects)
    return change.subjects if change.action == Action.ADD else ()


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
    levels: tuple[tuple[str, int], ...] = ()  # each member's level, lowest (joined first) first

    def level(self, who: str) -> int | None:
        """A member's level (None: not a member): a member may remove only members of a
        higher level, and anyone may leave."""
        return dict(self.levels).get(who)

    def parents(self) -> tuple[bytes, ...]:
        """The parents for a new change: every head, or, if there are more than
        MAX_PARENTS, the heads that take effect first, then the rest, the latest in the
        canonical order first. (Whatever a removed member signs stays a head, since no
        member builds on it; it must not stop the members from making changes.)"""
        if len(self.heads) <= MAX_PARENTS:
            return self.heads
        position = {h: n for n, h in enumerate(self.order)}
        ranked = sorted(self.heads, key=lambda h: (h not in self.effective, -position.get(h, -1)))
        return tuple(sorted(ranked[:MAX_PARENTS]))

    def may_remove(self, author: str, subject: str) -> bool:
        mine, theirs = self.level(author), self.level(subject)
        return mine is not None and theirs is not None and (author == subject or mine < theirs)


Item = tuple[int, "str | None"]  # a change's position, and the subject for a removal
NOT_IN = -1  # a standing: not a member there
MAX_SETTLE_RETRIES = 4  # folds again when a settle turns out to contradict the rules
_FEW, _BLOCK = 16, 16  # `_lowest`: walk a mask of up to _FEW; else search blocks of _BLOCK
MAX_UNDONE_MEMO = 1 << 14  # remembered `_undone` results (cleared when full)
MAX_SEARCHED = 12  # undecided items for which every way to decide them is tried (2**12)
SEARCH_BUDGET = 1 << 20  # ... when trying them all looks at no more than this many changes


def _bits(mask: int) -> list[int]:
    """The positions of the set bits of ``mask``, ascending."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


class _Resolution:
    """Which kept changes take effect (the rules in the module docstring, "Removal
    wins"). Decided per *item*: a create, add or rename is one item; a removal is one
    item per subject, so that a removal may remove one subject and not another. Each item
    is in (takes effect), out, or undecided:

    - an item is out if its author is certainly not a member of its past, it is a removal
      of someone who is not a member there at a higher level than its author, or an item
      that is in removes its author and crosses it;
    - it is in if its author is certainly a member of its past, it is not such a removal,
      and every item that removes its author and crosses it is out.

    Deciding only ever adds to "in" and "out", so this part has one outcome, whatever the
    order of evaluation (a worklist). What it leaves undecided depends on itself in a
    cycle (only possible when someone is a member at different levels in different
    pasts). If it is small, every way to decide it is tried, nearest first to "removals
    in, the rest out", and the first the rules agree with stands (`_search`). Else, or if
    there is none: the first undecided removal item, in canonical order, whose author is
    certainly a member of its past is put in, and deciding goes on; if there is none, the
    first undecided item is put out; a choice the finished outcome contradicts is barred
    and the whole tried again, a few times (`fold`). Every member comes to the same
    result. Ancestry is kept as bit strings and integers (one bit per change), and who is
    a member where, who strikes whom, and which items wait on what, are worked out with
    masks over the changes: what a fold weighs grows with its items, not their square."""

    def __init__(self, order: list[Change], anc: list[bytes], root: int, depth: list[int],
                 parents: list[list[int]]) -> None:
        self.order = order
        self.anc = anc
        self.root = root
        self.adds: dict[str, list[int]] = {}
        self.removes: dict[str, list[int]] = {}
        self.items: list[Item] = []
        # The level of each addition (who, change): the creator's 0, the creation's
        # subjects' 1, an add's subjects' its depth + 1 (the depth of a change: the
        # longest path to it from the root).
        self.levels: dict[tuple[str, int], int] = {}
        for i, c in enumerate(order):
            if c.action == Action.CREATE:
                self.adds.setdefault(c.author, []).append(i)
                self.levels[(c.author, i)] = 0
            if c.action in (Action.CREATE, Action.ADD):
                for who in c.subjects:
                    self.adds.setdefault(who, []).append(i)
                    self.levels.setdefault((who, i), depth[i] + 1)
            if c.action == Action.REMOVE:
                for who in c.subjects:
                    self.removes.setdefault(who, []).append(i)
                    self._item(i, who)
            else:
                self._item(i, None)
        # Ancestry as integers too (bit j of past[i]: change j is an ancestor of change i),
        # and each name's additions and removals as masks over the changes: who is a
        # member where is a few operations on them (`_counting`).
        self.past = [int.from_bytes(bits, "little") for bits in anc]
        self.everything = (1 << len(order)) - 1
        self.add_mask = {who: functools.reduce(operator.or_, (1 << a for a in added), 0)
                         for who, added in self.adds.items()}
        self.remove_mask = {who: functools.reduce(operator.or_, (1 << r for r in removed), 0)
                            for who, removed in self.removes.items()}
        # Descendants, the same way (from the last change back: a change's descendants
        # are its children and theirs).
        future = self.future = [0] * len(order)
        for i in range(len(order) - 1, -1, -1):
            for p in parents[i]:
                future[p] |= future[i] | 1 << i
        # Who strikes whom, as one mask per change (its strikers are the same for each of
        # its items, but an item of its author leaving, which is never struck): the
        # removals of its author that cross it. (A list per item would be quadratic: a
        # removal of 256 names crossing a thousand others is a quarter of a billion.)
        self.striker_mask = [
            self.remove_mask.get(c.author, 0) & ~(self.past[i] | future[i] | 1 << i) for i, c in enumerate(order)
        ]
        self.position = {item: n for n, item in enumerate(self.items)}
        # `_undone` of the same removals is asked for again and again (every parked item
        # of one name, in the past of the same removals): remembered, bounded.
        self._undone_memo: dict[int, int] = {}
        self._level_index: dict[str, tuple[list[int], list[int], list[int]]] = {}  # `_by_level`

    def _reset(self) -> None:
        """The state of one run (decided items, and what follows from them)."""
        self.status: dict[Item, bool] = {(self.root, None): True}
        # Per name: its additions and removal items that are in, and those undecided.
        self.adds_in: dict[str, int] = {who: 0 for who in self.adds}
        self.adds_open = dict(self.add_mask)
        self.removes_in: dict[str, int] = {who: 0 for who in self.removes}
        self.removes_open = dict(self.remove_mask)
        # Items looked at and left undecided ("parked"): they are looked at again only
        # when something they depend on is decided (`_decide`). By change, and as masks
        # over the changes by author and by whom they remove.
        self.parked: dict[int, set[Item]] = {}
        self.parked_by_author: dict[str, int] = {}
        self.parked_removing: dict[str, int] = {}
        # Names whose membership (or level) may have changed in the future of what was
        # decided (a mask of changes per name), and a heap of (earliest such change with
        # parked items, name): once the worklist is empty, one name at a time, the one
        # whose parked items come first, up to where another's begin (`_wake_dirty`). Not after every decision: a
        # member with many parked changes, in the future of many removals decided one by
        # one, would be looked at once per removal; and not every name at once: a chain
        # decided link by link, each link adding that member, would have them looked at
        # once per link.
        self.dirty: dict[str, int] = {}
        self.dirty_heap: list[tuple[int, str]] = []
        self.dirty_at: dict[str, int] = {}  # each name's one live entry in the heap
        root_names = (self.order[self.root].author, *self.order[self.root].subjects)
        for who in root_names:
            self.adds_in[who] |= 1 << self.root
            self.adds_open[who] &= ~(1 << self.root)
        self._members: dict[tuple[str, int], bool] = {}  # member() once it is decided
        self._standings: dict[tuple[str, int], int] = {}  # standing() once it is decided

    def _item(self, i: int, subject: str | None) -> None:
        self.items.append((i, subject))

    def _has(self, i: int, j: int) -> bool:
        """Whether change j is an ancestor of change i."""
        return bool(self.anc[i][j >> 3] >> (j & 7) & 1)

    def _undone(self, removals: int) -> int:
        """The changes that are ancestors of any of ``removals`` (a mask): from the latest
        down, each one's ancestors at once (an ancestor of a removal has no ancestor that
        the removal lacks)."""
        if not removals:
            return 0
        known = self._undone_memo.get(removals)
        if known is not None:
            return known
        key, undone = removals, 0
        while removals:
            r = removals.bit_length() - 1
            undone |= self.past[r]
            removals &= ~self.past[r] & ~(1 << r)
        if len(self._undone_memo) >= MAX_UNDONE_MEMO:
            self._undone_memo.clear()
        self._undone_memo[key] = undone
        return undone

    def _counting(self, who: str, i: int | None) -> tuple[int, int]:
        """The additions of ``who`` that count in the past of change i (None: of every
        kept change), as two masks: those that certainly do, and those that may (an
        addition counts if it is in and no removal item of ``who`` in that past that
        descends from it is in)."""
        past = self.everything if i is None else self.past[i]
        undone = self._undone(self.removes_in.get(who, 0) & past)
        maybe_undone = self._undone(self.removes_open.get(who, 0) & past)
        certain = self.adds_in[who] & past & ~undone
        maybe = ((self.adds_open[who] & past) | (certain & maybe_undone)) & ~undone
        return certain & ~maybe_undone, maybe

    def member(self, who: str, i: int | None) -> bool | None:
        """Whether ``who`` is a member of the past of change i (None: of every kept
        change): True, False, or None while that is undecided."""
        if i is not None:
            known = self._members.get((who, i))
            if known is not None:
                return known
        if who not in self.adds:
            return False
        certain, maybe = self._counting(who, i)
        result = True if certain else None if maybe else False
        if i is not None and result is not None:
            self._members[(who, i)] = result
        return result

    def _lowest(self, who: str, mask: int) -> int | None:
        """The lowest level of the additions of ``who`` in ``mask`` (None: none)."""
        if not mask:
            return None
        if mask.bit_count() <= _FEW:
            return min(self.levels[(who, a)] for a in _bits(mask))
        levels, changes, prefix = self._by_level(who)
        lo, hi = 0, len(prefix) - 1  # the first block with one of them: a binary search
        while lo < hi:
            mid = (lo + hi) // 2
            if mask & prefix[mid]:
                hi = mid
            else:
                lo = mid + 1
        for k in range(lo * _BLOCK, min(len(changes), (lo + 1) * _BLOCK)):
            if mask >> changes[k] & 1:
                return levels[k]
        raise AssertionError("not additions of theirs")

    def _highest(self, who: str, mask: int) -> int | None:
        """The highest level of the additions of ``who`` in ``mask`` (None: none)."""
        if not mask:
            return None
        if mask.bit_count() <= _FEW:
            return max(self.levels[(who, a)] for a in _bits(mask))
        levels, changes, prefix = self._by_level(who)
        lo, hi = 0, len(prefix) - 1  # the first block by which all of them are in
        while lo < hi:
            mid = (lo + hi) // 2
            if mask & ~prefix[mid]:
                lo = mid + 1
            else:
                hi = mid
        for k in range(min(len(changes), (lo + 1) * _BLOCK) - 1, lo * _BLOCK - 1, -1):
            if mask >> changes[k] & 1:
                return levels[k]
        raise AssertionError("not additions of theirs")

    def _by_level(self, who: str) -> tuple[list[int], list[int], list[int]]:
        """The additions of ``who`` by level (levels, changes), and the mask of those in
        each block of _BLOCK and all before it: the lowest (or highest) level in a mask
        of many is a binary search, not a walk over every one."""
        index = self._level_index.get(who)
        if index is None:
            ranked = sorted((self.levels[(who, a)], a) for a in self.adds[who])
            levels, changes = [lv for lv, _ in ranked], [a for _, a in ranked]
            prefix, acc = [], 0
            for k, a in enumerate(changes):
                acc |= 1 << a
                if k % _BLOCK == _BLOCK - 1 or k == len(changes) - 1:
                    prefix.append(acc)
            index = self._level_index[who] = (levels, changes, prefix)
        return index

    def standing(self, who: str, i: int | None) -> int | None:
        """The level at which ``who`` is a member of the past of change i (None: of every
        kept change): the lowest level of their additions that count there (as in
        `member`); NOT_IN if none can; None while that is undecided."""
        if i is not None:
            known = self._standings.get((who, i))
            if known is not None:
                return known
        if who not in self.adds:
            return NOT_IN
        certain, maybe = self._counting(who, i)
        low, unsure = self._lowest(who, certain), self._lowest(who, maybe)
        result = (NOT_IN if unsure is None else None) if low is None else (
            None if unsure is not None and unsure < low else low)
        if i is not None and result is not None:
            self._standings[(who, i)] = result
        return result

    def _authorized(self, item: Item) -> bool | None:
        """Whether a removal item may remove its subject: leaving always may; else only
        if the subject is a member of the change's past at a level above the author's
        there (a higher number: joined later). Other items: True."""
        i, subject = item
        author = self.order[i].author
        if subject is None or subject == author:
            return True
        theirs = self.standing(subject, i)
        mine = self.standing(author, i)
        if theirs == NOT_IN or mine == NOT_IN:
            return False
        if theirs is not None and mine is not None:
            return mine < theirs
        # Undecided: what the levels can still come to may decide it already (nobody can
        # remove the creator, whatever else is undecided).
        my_low = self._bounds(author, i)[0]
        their_high = self._bounds(subject, i)[1]
        if my_low >= their_high:
            return False
        return None

    def _bounds(self, who: str, i: int) -> tuple[int, int]:
        """The lowest and the highest level ``who`` can still come to be a member at in
        the past of change i (whether a member there at all may be undecided)."""
        certain, maybe = self._counting(who, i)
        low = self._lowest(who, certain | maybe)
        if certain:
            high = self._lowest(who, certain)
        else:
            high = self._highest(who, maybe)
        return (NOT_IN if low is None else low), (NOT_IN if high is None else high)

    def _strikers(self, item: Item) -> int:
        """The changes whose removal of this item's author strikes it (a mask)."""
        i, subject = item
        author = self.order[i].author
        return 0 if subject == author else self.striker_mask[i]

    def _struck(self, item: Item) -> bool | None:
        strikers = self._strikers(item)
        if not strikers:
            return False
        author = self.order[item[0]].author
        if strikers & self.removes_in.get(author, 0):
            return True
        return None if strikers & self.removes_open.get(author, 0) else False

    def _evaluate(self, item: Item) -> bool | None:
        i = item[0]
        author = self.order[i].author
        m = self.member(author, i)
        if m is False:
            return False
        allowed = self._authorized(item)
        if allowed is False:
            return False
        s = self._struck(item)
        if s:
            return False
        return True if m and allowed and s is False else None

    def run(self, vetoed: frozenset[tuple[Item, bool]] = frozenset()) -> None:
        """Decide every item; a cycle is settled as the class docstring says, except that
        no item is settled as ``vetoed`` says (item, in or out) while another can be
        (see `fold`)."""
        self._reset()
        self.forced: list[tuple[Item, bool]] = []
        # The worklist by canonical position: an item is looked at after the items before
        # it that it may depend on, so that it is mostly decided the first time.
        work = list(range(len(self.items)))
        queued = set(self.items)
        first = 0  # every item before this one is decided
        while True:
            while work:
                item = self.items[heapq.heappop(work)]
                queued.discard(item)
                if item in self.status:
                    continue
                v = self._evaluate(item)
                if v is not None:
                    self._decide(item, v, work, queued)
                else:
                    self._park(item)
            if self.dirty_heap:
                self._wake_dirty(work, queued)
                if work or self.dirty_heap:
                    continue
            while first < len(self.items) and self.items[first] in self.status:
                first += 1
            if first == len(self.items):
                return
            undecided = [it for it in self.items[first:] if it not in self.status]
            if not self.forced and len(undecided) <= MAX_SEARCHED:
                found = self._search(undecided)
                if found is not None:  # an outcome every rule agrees with: it stands
                    for it, v in zip(undecided, found, strict=True):
                        self._decide(it, v, work, queued)
                    work.clear()
                    return
            chosen = next((it for it in undecided if it[1] is not None and (it, True) not in vetoed
                           and self.member(self.order[it[0]].author, it[0]) is True), None)
            if chosen is not None:
                self.forced.append((chosen, True))
                self._decide(chosen, True, work, queued)
            else:
                out = next((it for it in undecided if (it, False) not in vetoed), undecided[0])
                self.forced.append((out, False))
                self._decide(out, False, work, queued)

    def _search(self, undecided: list[Item]) -> list[bool] | None:
        """Of the ways to decide ``undecided`` (few), the first that every rule agrees
        with, nearest first to "removals in, the rest out" (fewest changes from it, the
        earliest items changed first); None if there is none (a ring)."""
        default = [it[1] is not None for it in undecided]
        n = len(undecided)
        # The cost of one try, bounded in all (the search gives up past SEARCH_BUDGET).
        cost = sum(1 + len(self.adds.get(self.order[it[0]].author, ())) + len(self.adds.get(it[1] or "", ()))
                   + self._strikers(it).bit_count() for it in undecided)
        if cost << n > SEARCH_BUDGET:
            return None
        # Each try is a few operations on masks: the decided items' (as they stand) and
        # the tried ones' (few) on top; nothing as large as the status is copied.
        for flips in range(n + 1):
            for chosen in itertools.combinations(range(n), flips):
                values = list(default)
                for k in chosen:
                    values[k] = not values[k]
                adds_in: dict[str, int] = {}
                removes_in: dict[str, int] = {}
                for (j, subject), v in zip(undecided, values, strict=True):
                    if not v:
                        continue
                    if subject is not None:
                        removes_in[subject] = removes_in.get(subject, 0) | 1 << j
                    else:
                        for who in added_by(self.order[j]):
                            adds_in[who] = adds_in.get(who, 0) | 1 << j
                if all(self._holds(it, v, adds_in, removes_in) for it, v in zip(undecided, values, strict=True)):
                    return values
        return None

    def _holds(self, item: Item, value: bool, adds_in: dict[str, int], removes_in: dict[str, int]) -> bool:
        """Whether the rules give ``item`` ``value`` when the undecided items are as
        tried: ``adds_in`` and ``removes_in``, by name, the tried items that are in."""
        i, subject = item
        who = self.order[i].author
        if i == self.root:
            return value
        mine = self._standing_in(who, i, adds_in, removes_in)
        allowed = True
        if subject is not None and subject != who:
            theirs = self._standing_in(subject, i, adds_in, removes_in)
            allowed = mine is not None and theirs is not None and mine < theirs
        struck = bool(self._strikers(item) & (self.removes_in.get(who, 0) | removes_in.get(who, 0)))
        return (mine is not None and allowed and not struck) is value

    def _standing_in(self, who: str, i: int, adds_in: dict[str, int], removes_in: dict[str, int]) -> int | None:
        """`standing` when the undecided items are as tried (None: not a member)."""
        if who not in self.adds:
            return None
        past = self.past[i]
        undone = self._undone(self.removes_in.get(who, 0) & past)  # (remembered: the same every try)
        tried = removes_in.get(who, 0) & past
        if tried:
            undone |= self._undone(tried)
        counting = (self.adds_in[who] | adds_in.get(who, 0)) & past & ~undone
        return self._lowest(who, counting)

    def _park(self, item: Item) -> None:
        i, subject = item
        bit = 1 << i
        self.parked.setdefault(i, set()).add(item)
        author = self.order[i].author
        self.parked_by_author[author] = self.parked_by_author.get(author, 0) | bit
        if subject is not None:
            self.parked_removing[subject] = self.parked_removing.get(subject, 0) | bit

    def _unpark(self, item: Item) -> None:
        i, subject = item
        here = self.parked.get(i)
        if not here or item not in here:
            return
        here.discard(item)
        bit = 1 << i
        author = self.order[i].author
        if not here:
            del self.parked[i]
            self.parked_by_author[author] &= ~bit
        if subject is not None:
            self.parked_removing[subject] &= ~bit

    def _decide(self, item: Item, value: bool, work: list[int], queued: set[Item]) -> None:
        self.status[item] = value
        self._unpark(item)
        # Who this item adds or removes: the items of theirs may be decidable now.
        i, subject = item
        c = self.order[i]
        bit = 1 << i

        if subject is not None:
            touched: tuple[str, ...] = (subject,)
            self.removes_open[subject] &= ~bit
            if value:
                self.removes_in[subject] |= bit
            # The parked items this removal strikes (those of its subject's changes that
            # cross it, but their author's leaving): struck now if it is in; if it is
            # out, decidable once no other striker of theirs is undecided.
            crossing = self.parked_by_author.get(subject, 0) & ~(self.past[i] | self.future[i] | bit)
            open_strikers = self.removes_open[subject]
            for j in _bits(crossing):
                if value or not self.striker_mask[j] & open_strikers:
                    for it in [it for it in self.parked[j] if it[1] != subject]:
                        self._again(it, work, queued)
        else:
            touched = added_by(c)
        if subject is None:
            for who in touched:
                self.adds_open[who] &= ~bit
                if value:
                    self.adds_in[who] |= bit
        # Whether someone is a member, and at which level, in the past of a change that
        # descends from this one may be decided now: the parked items by them or
        # removing them there are looked at again, once the worklist is empty
        # (`_wake_dirty`).
        future = self.future[i]
        if future:
            for who in touched:
                self.dirty[who] = self.dirty.get(who, 0) | future
                later = (self.parked_by_author.get(who, 0) | self.parked_removing.get(who, 0)) & future
                if later:
                    self._dirty_entry(who, (later & -later).bit_length() - 1)

    def _again(self, it: Item, work: list[int], queued: set[Item]) -> None:
        if it not in self.status and it not in queued:
            self._unpark(it)
            queued.add(it)
            heapq.heappush(work, self.position[it])

    def _dirty_entry(self, who: str, first: int) -> None:
        at = self.dirty_at.get(who)
        if at is None or first < at:
            self.dirty_at[who] = first
            heapq.heappush(self.dirty_heap, (first, who))

    def _wake_dirty(self, work: list[int], queued: set[Item]) -> None:
        """Look again at parked items of one dirty name: the one whose earliest parked
        change comes first (what those wait on mostly comes before them, so they are
        mostly decidable then), and only those that come before any other dirty name's
        (which may decide them first); or find that there are none left."""
        heap = self.dirty_heap
        while heap:
            j, who = heapq.heappop(heap)
            if self.dirty_at.get(who) != j:
                continue  # an entry from before
            del self.dirty_at[who]
            later = (self.parked_by_author.get(who, 0) | self.parked_removing.get(who, 0)) & self.dirty.get(who, 0)
            if not later:
                self.dirty.pop(who, None)
                continue
            first = (later & -later).bit_length() - 1
            if first != j:  # that change was looked at, or went: its next
                self._dirty_entry(who, first)
                continue
            while heap and self.dirty_at.get(heap[0][1]) != heap[0][0]:
                heapq.heappop(heap)
            segment = later & ((1 << (heap[0][0] + 1)) - 1) if heap else later
            rest = later & ~segment
            self.dirty[who] &= ~segment
            if rest:
                self._dirty_entry(who, (rest & -rest).bit_length() - 1)
            self._wake(who, segment, work, queued)
            if work:
                return

    def _wake(self, who: str, changes: int, work: list[int], queued: set[Item]) -> None:
        """Look again at the parked items by or removing ``who`` in ``changes`` (a mask)."""
        for j in _bits(changes):
            by_them = self.order[j].author == who
            for it in [it for it in self.parked.get(j, ()) if by_them or it[1] == who]:
                self._again(it, work, queued)

    def broken(self) -> tuple[Item, bool] | None:
        """The first settle that the rules, once everything is decided, contradict: an
        item put in that a striker that came in later strikes (or whose author's
        membership went), or one put out that they say is in."""
        for item, value in self.forced:
            if self._evaluate(item) is not value:
                return item, value
        return None

    def effective(self) -> set[int]:
        """The changes with an item that takes effect."""
        return {i for (i, _), v in self.status.items() if v}

    def members(self) -> set[str]:
        return {who for who in self.adds if self.member(who, None)}


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
    # Kept, as in the module docstring: parents kept, author added by an ancestor. In
    # canonical order a change comes after its parents, so one pass decides it; kept
    # changes are numbered as they come, and their ancestry is a bit string over those
    # numbers (an ancestor of a kept change is kept).
    at: dict[bytes, int] = {}
    adders: dict[str, int] = {}
    bit_sets: list[int] = []
    depth: list[int] = []  # the longest path from the root
    kept_order: list[Change] = []
    for c in order:
        if c is not root and not (c.parents and all(p in at for p in c.parents)):
            continue
        bits = 0
        for p in c.parents:
            j = at[p]
            bits |= bit_sets[j] | 1 << j
        if c is not root and not adders.get(c.author, 0) & bits:
            continue
        i = len(kept_order)
        at[c.hash] = i
        kept_order.append(c)
        bit_sets.append(bits)
        depth.append(1 + max(depth[at[p]] for p in c.parents) if c.parents else 0)
        for who in added_by(c):
            adders[who] = adders.get(who, 0) | 1 << i
    size = (len(kept_order) + 7) // 8
    anc = [bits.to_bytes(size, "little") for bits in bit_sets]
    del bit_sets
    kept = set(at)
    # A settle that the rules contradict once everything is decided is tried again with
    # that choice barred, a few times at most (the last try stands, for everyone alike).
    vetoed: frozenset[tuple[Item, bool]] = frozenset()
    resolution = _Resolution(kept_order, anc, at[root.hash], depth, [[at[p] for p in c.parents] for c in kept_order])
    for _ in range(MAX_SETTLE_RETRIES + 1):
        resolution.run(vetoed)
        bad = resolution.broken()
        if bad is None:
            break
        vetoed |= {bad}
    order = kept_order
    in_effect = resolution.effective()
    effective = {order[i].hash for i in in_effect}
    members = resolution.members()
    levels = {who: resolution.standing(who, None) or 0 for who in members}
    # The name: of the effective create and renames, those no other effective one
    # follows; of those, the one whose author had the lowest level (joined first), then
    # the smallest author's name (neither can be ground by trying hashes), then the last
    # in canonical order.
    naming = [i for i in sorted(in_effect) if order[i].action in (Action.CREATE, Action.RENAME)]
    followed_mask = 0
    for i in naming:
        followed_mask |= int.from_bytes(anc[i], "little")
    latest = [i for i in naming if not followed_mask >> i & 1]

    def precedence(i: int) -> tuple[int, str, int]:
        return (resolution.standing(order[i].author, i) or 0, order[i].author, -i)

    name = order[min(latest, key=precedence)].name if latest else root.name
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
        levels=tuple(sorted(levels.items(), key=lambda x: (x[1], x[0]))),
    )
