"""Groups on real devices and a real relay: changes reach every member, texts go to the
members of the sender's state, the relay sees nothing of the group."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import trio

from keyvault.group import Action
from keyvault.letter import decode_letter
from node.errors import VeilError
from node.node import Node
from tests.conftest import Accounts, RelayRunner

DEADLINE = 60


async def sync(*nodes: Node) -> None:
    """Each node connects: sends what it composed, and takes what came (twice over, so
    that what one sent on the way is in too)."""
    for _ in range(2):
        for n in nodes:
            async with n.connected() as link:
                await n.receive(link, wait=0.2)


def lines(node: Node, label: str) -> list[tuple[str, str]]:
    gid = node.groups.find(label)
    return [(m.sender, m.body) for m in node.store.history("#" + gid.hex(), limit=100)]


async def test_a_group_of_three_talks_changes_and_removes(accounts: Accounts, relay: RelayRunner) -> None:
    with trio.fail_after(DEADLINE):
        alice, bob, carol, dave = [await accounts.register(n) for n in ("alice", "bob", "carol", "dave")]
        label = alice.group_create("friends", ["bob", "carol"])
        await sync(alice, bob, carol)
        for n in (bob, carol):
            assert n.groups.state(n.groups.find("friends")).members == {"alice", "bob", "carol"}
            assert lines(n, "friends") == [("alice", "created the group 'friends' with bob, carol")]
        _, why = await alice.send_or_queue("#" + label, "hello, friends")
        assert why is None
        await sync(bob, carol)
        assert lines(bob, "friends")[-1] == ("alice", "hello, friends")
        assert lines(carol, "friends")[-1] == ("alice", "hello, friends")
        # bob adds dave: dave learns the group (all of its changes) and its next messages.
        bob.group_change("friends", Action.ADD, ["dave"])
        await sync(bob, alice, carol, dave)
        assert dave.groups.state(dave.groups.find("friends")).members == {"alice", "bob", "carol", "dave"}
        await carol.send_or_queue("#friends", "welcome dave")
        await sync(alice, bob, dave)
        for n in (alice, bob, dave):
            assert lines(n, "friends")[-1] == ("carol", "welcome dave"), n.name
        assert ("carol", "welcome dave") not in lines(alice, "friends")[:-1]
        # alice removes bob: bob hears of it, and of nothing after it.
        alice.group_change("friends", Action.REMOVE, ["bob"])
        await sync(alice, bob, carol, dave)
        assert "bob" not in bob.groups.state(bob.groups.find("friends")).members
        assert lines(bob, "friends")[-1] == ("alice", "removed bob")
        await carol.send_or_queue("#friends", "bob is gone")
        await sync(alice, bob, dave)
        assert lines(bob, "friends")[-1] == ("alice", "removed bob")
        assert lines(dave, "friends")[-1] == ("carol", "bob is gone")
        # bob (removed) can no longer write to it. (That the relay holds no group id or
        # name: tests/test_cli_groups.py, which reads its whole database.)
        with pytest.raises(VeilError, match="no longer a member"):
            bob.compose_group("friends", "still here?")


async def test_two_members_add_at_once_and_everyone_converges(accounts: Accounts, relay: RelayRunner) -> None:
    with trio.fail_after(DEADLINE):
        alice, bob, carol, dave, erin = [await accounts.register(n) for n in ("alice", "bob", "carol", "dave", "erin")]
        alice.group_create("team", ["bob"])
        await sync(alice, bob)
        alice.group_change("team", Action.ADD, ["carol"])  # both before hearing of the other
        bob.group_change("team", Action.ADD, ["dave"])
        await sync(alice, bob, carol, dave)
        await sync(alice, bob, carol, dave)
        states = [n.groups.state(n.groups.find("team")) for n in (alice, bob, carol, dave)]
        assert all(s.members == {"alice", "bob", "carol", "dave"} for s in states)
        assert len({s.valid for s in states}) == 1
        # erin, never added, writes into the group by its id: dropped with a warning.
        warnings: list[str] = []
        alice.events.append(warnings.append)
        gid = alice.groups.find("team")
        # erin knows the group's id (somehow) and writes into it as if she were in: her
        # node is made to seal a group text for alice.
        erin.store.add_group(gid, "team")
        with erin.store.transaction():
            erin.store.add_group_changes(gid, list(alice.store.group_changes(gid).items()))
        erin.groups.state = lambda g: replace(alice.groups.state(g), members=frozenset({"alice", "erin"}))  # type: ignore[method-assign]
        await erin.send_or_queue("#team", "let me in")
        await sync(alice)
        assert ("erin", "let me in") not in lines(alice, "team")
        assert any("erin, who is not a member" in w for w in warnings), warnings


async def test_a_device_added_to_a_members_account_later_is_included(accounts: Accounts, relay: RelayRunner) -> None:
    with trio.fail_after(DEADLINE):
        alice, bob = await accounts.register("alice"), await accounts.register("bob")
        alice.group_create("pair", ["bob"])
        await alice.send_or_queue("#pair", "before the laptop")
        await sync(bob)
        laptop = await accounts.login("bob", "laptop")  # bob's new device knows no group
        await alice.send_or_queue("#pair", "after the laptop")
        await sync(laptop, bob)
        assert laptop.groups.state(laptop.groups.find("pair")).members == {"alice", "bob"}
        got = lines(laptop, "pair")
        assert got[-1] == ("alice", "after the laptop") and ("alice", "before the laptop") not in got
        assert lines(bob, "pair")[-1] == ("alice", "after the laptop")
        # What the laptop writes reaches alice, and bob's other device (as a copy).
        await laptop.send_or_queue("#pair", "from the laptop")
        await sync(alice, bob)
        assert lines(alice, "pair")[-1] == ("bob", "from the laptop")
        assert lines(bob, "pair")[-1] == ("bob", "from the laptop")


async def test_a_long_history_reaches_a_new_member_in_several_letters(accounts: Accounts, relay: RelayRunner) -> None:
    """More changes than one envelope holds: they go in several letters, parents first."""
    with trio.fail_after(DEADLINE):
        alice, bob = await accounts.register("alice"), await accounts.register("bob")
        alice.group_create("long", [])
        for i in range(400):  # about 60 KB of changes
            alice.group_change("long", Action.RENAME, name=f"name number {i:04d} of the group")
        alice.group_change("long", Action.ADD, ["bob"])
        await sync(alice, bob)
        want = alice.groups.state(alice.groups.find("long"))
        got = bob.groups.state(bob.groups.find("name-number-0399-of-the-group"))
        assert got.valid == want.valid and got.members == {"alice", "bob"} and got.version == 402


async def test_a_removal_wins_over_what_the_removed_member_did_at_the_same_time(
    accounts: Accounts, relay: RelayRunner
) -> None:
    """bob adds dave while alice, not having heard of it, removes bob: everyone ends with
    bob and dave out; carol, who saw dave come in first, is told it does not stand, and
    tells dave."""
    with trio.fail_after(DEADLINE):
        alice, bob, carol, dave = [await accounts.register(n) for n in ("alice", "bob", "carol", "dave")]
        alice.group_create("club", ["bob", "carol"])
        await sync(alice, bob, carol)
        bob.group_change("club", Action.ADD, ["dave"])
        await sync(bob, carol, dave)  # alice is away
        assert carol.groups.state(carol.groups.find("club")).members == {"alice", "bob", "carol", "dave"}
        alice.group_change("club", Action.REMOVE, ["bob"])  # before hearing of dave
        await sync(alice, carol, bob)
        await sync(alice, carol, bob)
        states = {n.name: n.groups.state(n.groups.find("club")) for n in (alice, bob, carol)}
        assert all(s.members == {"alice", "carol"} for s in states.values()), states
        assert len({(s.valid, s.effective) for s in states.values()}) == 1
        assert ("bob", "added dave: does not stand (a removal crossed it)") in lines(carol, "club")
        assert ("bob", "added dave") in lines(carol, "club")  # what she had been told, kept
        # carol, who had told dave he was in, tells him he is not: he hears of the removal.
        await sync(carol, dave)
        dave_state = dave.groups.state(dave.groups.find("club"))
        assert dave_state.members == {"alice", "carol"} and dave_state.effective == states["carol"].effective
        assert ("bob", "added dave: does not stand (a removal crossed it)") in lines(dave, "club")
        with pytest.raises(VeilError, match="no longer a member"):
            dave.compose_group("club", "am I in?")
        # Were he to write anyway, his texts are not taken.
        warnings: list[str] = []
        carol.events.append(warnings.append)
        dave.groups.state = lambda g: replace(dave_state, members=frozenset({"alice", "carol", "dave"}))  # type: ignore[method-assign]
        await dave.send_or_queue("#club", "am I in?")
        await sync(dave, carol)
        assert ("dave", "am I in?") not in lines(carol, "club")
        assert any("dave, who is not a member" in w for w in warnings), warnings


async def test_a_group_takes_and_makes_no_more_changes_than_its_bound(
    accounts: Accounts, relay: RelayRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_GROUP_CHANGES (here 4), a device keeps no more of a group's changes and
    makes none, in one line: what one fold costs stays bounded whatever members send."""
    import node.groups

    monkeypatch.setattr(node.groups, "MAX_GROUP_CHANGES", 4)
    with trio.fail_after(DEADLINE):
        alice, bob = [await accounts.register(n) for n in ("alice", "bob")]
        alice.group_create("friends", ["bob"])
        await sync(alice, bob)
        for name in ("one", "two", "three"):
            alice.group_change("friends", Action.RENAME, name=name)
        with pytest.raises(VeilError, match="has had 4 changes, the most a group can"):
            alice.group_change("friends", Action.RENAME, name="four")
        monkeypatch.setattr(node.groups, "MAX_GROUP_CHANGES", 3)  # bob's bound is lower
        await sync(alice, bob)
        gid = bob.groups.find("friends")
        assert len(bob.store.group_changes(gid)) == 3
        assert bob.groups.state(gid).name == "two"


async def test_a_device_that_holds_the_group_gets_a_long_history_oldest_first(
    accounts: Accounts, relay: RelayRunner, tmp_path: Path
) -> None:
    """While carol is away, alice renames the group 700 times (more changes than a device
    keeps waiting for their parents: MAX_PENDING) and then removes bob. The letters of one
    text to carol, who holds the group, bring all of it, bob's removal included; so do
    those to a device that may not hold the group yet, its addition's letter first."""
    from node.node import _GroupSealing
    from node.sessions import Peer
    from node.store import StoredMessage

    with trio.fail_after(DEADLINE):
        alice, bob, carol = [await accounts.register(n) for n in ("alice", "bob", "carol")]
        alice.group_create("friends", ["bob", "carol"])
        await sync(alice, bob, carol)
        gid = alice.groups.find("friends")
        for i in range(700):
            alice.group_change("friends", Action.RENAME, name=f"name {i}")
        alice.group_change("friends", Action.REMOVE, ["bob"])
        state = alice.groups.state(gid)
        text = StoredMessage(b"m" * 16, "#" + gid.hex(), "alice", True, "hello", 1, 1, "pending", 0)
        sealing = _GroupSealing(alice.store, gid, text, state)
        assert len(sealing.chunks) > 2
        to = Peer("carol", carol.device_id, b"", b"")
        letters = [decode_letter(b) for b in sealing.letters(to)]
        assert letters[0].changes[0] == alice.store.group_changes(gid)[state.order[0]]  # oldest first
        with carol.store.transaction():
            for letter in letters[:-1]:
                got, _, _ = carol.groups.merge(gid, letter.changes, lambda n: accounts_identity(alice, n))
        assert got is not None and got.members == {"alice", "carol"} and got.name == "name 699" and not got.pending
        # A device the group was never sent to (a new device of carol's, who was in the
        # creation): the letter with its account's latest addition first (here the
        # creation's, the oldest), then the rest oldest first; it takes in all of it.
        from node.groups import Groups
        from node.store import NodeStore

        fresh = NodeStore(tmp_path / "carol-new.db", b"n" * 32)
        newdev = Groups(fresh, carol.keys, "carol")
        for letter in [decode_letter(b) for b in sealing.letters(Peer("carol", b"n" * 16, b"", b""))][:-1]:
            with fresh.transaction():
                got, _, _ = newdev.merge(gid, letter.changes, lambda n: accounts_identity(alice, n))
        assert got is not None and got.members == {"alice", "carol"} and got.name == "name 699"
        assert len(fresh.group_changes(gid)) == len(state.valid)
        # To someone added last, the letter with the addition (the newest) comes first.
        alice.group_change("friends", Action.ADD, ["dave"])
        state = alice.groups.state(gid)
        sealing = _GroupSealing(alice.store, gid, text, state)
        first = decode_letter(sealing.letters(Peer("dave", b"d" * 16, b"", b""))[0])
        assert alice.store.group_changes(gid)[state.order[-1]] in first.changes


def accounts_identity(node: Node, name: str) -> bytes | None:
    return node.keys.public().identity if name == node.name else None


def test_strangers_cannot_push_a_group_out_of_limbo(key_pool: list, tmp_path: Path) -> None:
    """carol is being brought a group in several letters (the first names her, the rest
    wait in limbo with it). eve, who can write to carol, sends made-up groups that add
    carol, more than limbo holds: they push out only eve's own, and carol joins."""
    import os

    from keyvault.group import create_group, make_change
    from node.groups import MAX_LIMBO_GROUPS, MAX_LIMBO_PER_SENDER, Groups
    from node.node import _GroupSealing
    from node.sessions import Peer
    from node.store import NodeStore, StoredMessage

    alice_keys, carol_keys, eve_keys = key_pool[:3]
    keys = {"alice": alice_keys, "carol": carol_keys, "eve": eve_keys}
    alice = NodeStore(tmp_path / "alice.db", b"a" * 32)
    root = create_group(alice_keys, "alice", "friends", ["bob"], sent_at=1)
    prev = root
    changes = [root]
    for i in range(600):
        prev = make_change(alice_keys, root.group_id, "alice", Action.RENAME, parents=[prev.hash], name=f"t{i}",
                           sent_at=2 + i)
        changes.append(prev)
    changes.append(make_change(alice_keys, root.group_id, "alice", Action.ADD, parents=[prev.hash],
                               subjects=["carol"], sent_at=700))
    with alice.transaction():
        alice.add_group(root.group_id, "friends")
        alice.add_group_changes(root.group_id, [(c.hash, c.to_bytes()) for c in changes])
    alice_groups = Groups(alice, alice_keys, "alice")
    state = alice_groups.state(root.group_id)
    text = StoredMessage(b"m" * 16, "#" + root.group_id.hex(), "alice", True, "hi", 1, 1, "pending", 0)
    pieces = [decode_letter(b).changes for b in
              _GroupSealing(alice, root.group_id, text, state).letters(Peer("carol", b"c" * 16, b"", b""))[:-1]]
    assert len(pieces) > 1

    carol = NodeStore(tmp_path / "carol.db", b"c" * 32)
    groups = Groups(carol, carol_keys, "carol")

    def identity(name: str) -> bytes | None:
        return keys[name].public().identity if name in keys else None

    with carol.transaction():
        assert groups.merge(root.group_id, pieces[0], identity, "alice")[0] is None  # in limbo
    for _ in range(MAX_LIMBO_GROUPS + 4):
        fake = make_change(eve_keys, os.urandom(16), "eve", Action.ADD, parents=[os.urandom(32)],
                           subjects=["carol"], sent_at=1)
        with carol.transaction():
            groups.merge(fake.group_id, [fake.to_bytes()], identity, "eve")
    held = {bytes(r[0]) for r in carol.conn.execute("SELECT DISTINCT group_id FROM group_limbo")}
    assert root.group_id in held and len(held) == 1 + MAX_LIMBO_PER_SENDER
    for piece in pieces[1:]:
        with carol.transaction():
            got, _, _ = groups.merge(root.group_id, piece, identity, "alice")
    assert got is not None and "carol" in got.members and got.name == "t599"


async def test_many_changes_made_offline_go_out_once(accounts: Accounts, relay: RelayRunner) -> None:
    """alice renames the group 300 times while offline; her next connection sends carol
    the group's changes once (a few letters), not once per change."""
    from tests.test_forward_secrecy import captured

    with trio.fail_after(DEADLINE):
        alice, carol = [await accounts.register(n) for n in ("alice", "carol")]
        alice.group_create("friends", ["carol"])
        await sync(alice, carol)
        for i in range(300):
            alice.group_change("friends", Action.RENAME, name=f"name {i}")
        async with alice.connected():
            pass
        held = await captured(relay, carol)
        assert 1 <= len(held) <= 4, len(held)
        await sync(carol)
        assert carol.groups.state(carol.groups.find("friends")).name == "name 299"


def test_nobody_can_fill_the_room_for_changes_waiting_for_their_parents(
    key_pool: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changes whose parents never come must not take the room a member's change needs
    while its parent is on the way. eve, never added (or added only by a change that
    waits), gets none of hers kept; bob and
    carol, members, at most MAX_PENDING_PER_AUTHOR each; and once they fill the room
    (here 64), dave's change that came before its parent still finds room, in place of
    one of theirs, and takes effect when its parent comes."""
    import os

    import node.groups
    from keyvault.group import make_change
    from node.groups import MAX_PENDING_PER_AUTHOR, Groups
    from node.store import NodeStore

    monkeypatch.setattr(node.groups, "MAX_PENDING", 2 * MAX_PENDING_PER_AUTHOR)
    names = ("alice", "bob", "carol", "dave", "eve")
    keys = dict(zip(names, key_pool, strict=False))
    store = NodeStore(tmp_path / "alice.db", b"a" * 32)
    groups = Groups(store, keys["alice"], "alice")
    with store.transaction():
        gid, root = groups.create("friends", ["bob", "carol", "dave"])

    def identity(name: str) -> bytes | None:
        return keys[name].public().identity if name in keys else None

    def orphans(author: str, n: int) -> list[bytes]:
        return [make_change(keys[author], gid, author, Action.RENAME, parents=[os.urandom(32)], name=f"{author} {i}",
                            sent_at=i).to_bytes() for i in range(n)]

    def waiting() -> int:
        return len(groups.state(gid).pending)

    with store.transaction():
        groups.merge(gid, orphans("eve", 50), identity, "eve")
    assert waiting() == 0 and len(store.group_changes(gid)) == 1
    # Named by a change that only waits (its author could name anyone), eve is no better off.
    names_eve = make_change(keys["bob"], gid, "bob", Action.ADD, parents=[os.urandom(32)], subjects=["eve"],
                            sent_at=3)
    with store.transaction():
        groups.merge(gid, [names_eve.to_bytes(), *orphans("eve", 10)], identity, "bob")
    assert groups.state(gid).pending == {names_eve.hash}
    for author in ("bob", "carol"):
        with store.transaction():
            groups.merge(gid, orphans(author, MAX_PENDING_PER_AUTHOR + 8), identity, author)
    assert waiting() == 2 * MAX_PENDING_PER_AUTHOR  # the room is full
    parent = make_change(keys["dave"], gid, "dave", Action.ADD, parents=[root.hash], subjects=["erin"], sent_at=1)
    child = make_change(keys["dave"], gid, "dave", Action.RENAME, parents=[parent.hash], name="dave's", sent_at=2)
    with store.transaction():
        groups.merge(gid, [child.to_bytes()], identity, "dave")
    state = groups.state(gid)
    assert child.hash in state.pending and len(state.pending) == 2 * MAX_PENDING_PER_AUTHOR
    with store.transaction():
        state, became, _ = groups.merge(gid, [parent.to_bytes()], identity, "dave")
    assert state is not None and state.name == "dave's" and "erin" in state.members
    assert {c.hash for c in became} == {parent.hash, child.hash}


def test_a_group_holds_changes_naming_no_more_people_than_its_bound(
    key_pool: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removal is judged per name, so what a fold weighs grows with the names in the
    changes, not only with their number: past MAX_GROUP_NAMES (here 4) a device keeps and
    makes no change that names more."""
    import node.groups
    from keyvault.group import make_change
    from node.groups import Groups
    from node.store import NodeStore

    monkeypatch.setattr(node.groups, "MAX_GROUP_NAMES", 4)
    keys = dict(zip(("alice", "bob"), key_pool, strict=False))
    store = NodeStore(tmp_path / "alice.db", b"a" * 32)
    groups = Groups(store, keys["alice"], "alice")
    with store.transaction():
        gid, _ = groups.create("friends", ["bob", "carol"])  # 2 names
        with pytest.raises(VeilError, match="naming 4 people in all, the most a group can"):
            groups.change(gid, Action.ADD, ["dave", "erin", "frank"])
        groups.change(gid, Action.ADD, ["dave"])  # 3
    wide = make_change(keys["bob"], gid, "bob", Action.ADD, parents=list(groups.state(gid).heads),
                       subjects=["gina", "hank"], sent_at=5)
    with store.transaction():
        state, became, _ = groups.merge(gid, [wide.to_bytes()], lambda n: keys[n].public().identity, "bob")
    assert state is not None and wide.hash not in store.group_changes(gid) and not became
    assert state.members == {"alice", "bob", "carol", "dave"}


def test_a_change_that_waited_and_turns_out_invalid_is_not_kept(key_pool: list, tmp_path: Path) -> None:
    """yann, added on one branch, signs a change on another: it arrives before its parent
    and waits; once the parent comes it is invalid (its author's addition is not in its
    past), and it goes, as if it had come last: two devices end with the same changes."""
    from keyvault.group import make_change
    from node.groups import Groups
    from node.store import NodeStore

    keys = dict(zip(("alice", "bob", "yann"), key_pool, strict=False))

    def identity(name: str) -> bytes | None:
        return keys[name].public().identity if name in keys else None

    maker = NodeStore(tmp_path / "alice.db", b"a" * 32)
    with maker.transaction():
        gid, root = Groups(maker, keys["alice"], "alice").create("friends", ["bob"])
    add = make_change(keys["alice"], gid, "alice", Action.ADD, parents=[root.hash], subjects=["yann"], sent_at=2)
    other = make_change(keys["alice"], gid, "alice", Action.RENAME, parents=[root.hash], name="p", sent_at=3)
    junk = make_change(keys["yann"], gid, "yann", Action.RENAME, parents=[other.hash], name="junk", sent_at=4)
    held = []
    for n, letters in enumerate(([[root, add], [junk], [other]], [[root, add], [other], [junk]])):
        store = NodeStore(tmp_path / f"bob{n}.db", b"b" * 32)
        groups = Groups(store, keys["bob"], "bob")
        for letter in letters:
            with store.transaction():
                groups.merge(gid, [c.to_bytes() for c in letter], identity, "alice")
        held.append(set(store.group_changes(gid)))
        assert not groups.state(gid).invalid
    assert held[0] == held[1] == {root.hash, add.hash, other.hash}


def test_a_member_added_again_catches_up_on_a_device_that_holds_the_group_from_before(
    key_pool: list, tmp_path: Path
) -> None:
    """dave's device holds the group from before alice removed him; alice renames it 400
    times, erin adds dave again and renames 20 times. erin never sent the group to that
    device: the letter with dave's new addition comes first (its parents are not there:
    little of it can wait), then all of them oldest first, so it takes in everything."""
    from keyvault.group import Change, make_change
    from node.groups import Groups
    from node.node import _GroupSealing
    from node.sessions import Peer
    from node.store import NodeStore, StoredMessage

    keys = dict(zip(("alice", "bob", "dave", "erin"), key_pool, strict=False))

    def identity(name: str) -> bytes | None:
        return keys[name].public().identity if name in keys else None

    def make(author: str, action: Action, prev: Change, **kw: object) -> Change:
        return make_change(keys[author], gid, author, action, parents=[prev.hash], sent_at=len(changes),
                           **kw)  # type: ignore[arg-type]

    erin_store = NodeStore(tmp_path / "erin.db", b"e" * 32)
    erin = Groups(erin_store, keys["erin"], "erin")
    with erin_store.transaction():
        gid, root = Groups(erin_store, keys["alice"], "alice").create("friends", ["bob", "dave", "erin"])
    changes: list[Change] = [root]
    changes.append(make("alice", Action.RENAME, root, name="before"))
    dave_store = NodeStore(tmp_path / "dave-old.db", b"d" * 32)
    dave = Groups(dave_store, keys["dave"], "dave")
    with dave_store.transaction():
        dave.merge(gid, [c.to_bytes() for c in changes], identity, "alice")
    changes.append(make("alice", Action.REMOVE, changes[-1], subjects=["dave"]))
    for k in range(400):
        changes.append(make("alice", Action.RENAME, changes[-1], name=f"week {k}"))
    changes.append(make("erin", Action.ADD, changes[-1], subjects=["dave"]))
    for k in range(20):
        changes.append(make("erin", Action.RENAME, changes[-1], name=f"back {k}"))
    with erin_store.transaction():
        erin.merge(gid, [c.to_bytes() for c in changes], identity, "alice")
    state = erin.state(gid)
    assert "dave" in state.members and len(state.valid) == len(changes)
    text = StoredMessage(b"m" * 16, "#" + gid.hex(), "erin", True, "hello", 1, 1, "pending", 0)
    sealing = _GroupSealing(erin_store, gid, text, state)
    letters = [decode_letter(b) for b in sealing.letters(Peer("dave", b"D" * 16, b"", b""))][:-1]
    assert len(letters) == len(sealing.chunks) + 1  # the addition's letter, then all of them
    for letter in letters:
        with dave_store.transaction():
            got, _, _ = dave.merge(gid, letter.changes, identity, "erin")
    assert got is not None and got.valid == state.valid and got.name == "back 19"
    assert got.members == {"alice", "bob", "dave", "erin"}
