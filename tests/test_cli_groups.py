"""Groups through the `veil` command: real processes and a real relay process."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from cipherdb import open_encrypted
from relay.keyfile import RelayKeys, load_root_key
from relay.server import DB_FILE
from tests.test_cli import RelayProcess, User, assert_one_line_error, registered, stop_relay


def recv(u: User) -> list[dict[str, object]]:
    return [json.loads(line) for line in u.veil("recv", "--json").stdout.splitlines()]


def texts(msgs: list[dict[str, object]], group: str) -> list[tuple[object, object]]:
    return [(m["from"], m["text"]) for m in msgs if m.get("group") == group]


def test_groups_through_the_command(relay_proc: RelayProcess, tmp_path: Path) -> None:
    alice, bob, carol, dave, erin = registered(tmp_path, relay_proc, "alice", "bob", "carol", "dave", "erin")
    out = alice.veil("group", "create", "Book Club", "--members", "bob,carol").stdout
    assert "group Book-Club created with bob, carol; sent to the members" in out
    created = recv(bob)
    assert texts(created, "Book-Club") == [("alice", "created the group 'Book Club' with bob, carol")]
    assert created[0]["change"] is True and created[0]["to"] == "#Book-Club"
    alice.veil("send", "--group", "Book-Club", "chapter one", "tonight")
    assert texts(recv(bob), "Book-Club") == [("alice", "chapter one tonight")]
    carol_got = recv(carol)
    assert texts(carol_got, "Book-Club")[-1] == ("alice", "chapter one tonight")
    # One-to-one messages have no group key.
    bob.veil("send", "carol", "just us")
    (direct,) = recv(carol)
    assert "group" not in direct and direct["text"] == "just us"

    # dave is offline while bob adds him and carol writes; he catches up in order.
    bob.veil("group", "add", "Book-Club", "dave")
    carol.veil("recv")  # carol hears of dave
    carol.veil("send", "--group", "Book-Club", "hi dave")
    got = texts(recv(dave), "Book-Club")
    assert got[0] == ("alice", "created the group 'Book Club' with bob, carol")
    assert ("bob", "added dave") in got and got[-1] == ("carol", "hi dave")
    assert ("alice", "chapter one tonight") not in got  # from before he joined

    # Listing and showing.
    listed = [json.loads(line) for line in dave.veil("group", "list", "--json").stdout.splitlines()]
    assert [(g["group"], g["member"]) for g in listed] == [("Book-Club", True)]
    alice.veil("recv")
    shown = json.loads(alice.veil("group", "show", "Book-Club", "--json").stdout)
    assert {m["name"] for m in shown["members"]} == {"alice", "bob", "carol", "dave"}
    assert "verified" in alice.veil("group", "show", "Book-Club").stdout

    # Members in the order they joined; only one who joined before bob can remove him.
    shown_text = carol.veil("group", "show", "Book-Club").stdout
    lines = [line.split() for line in shown_text.splitlines()[2:]]
    assert [words[:2] for words in lines] == [["0", "alice"], ["1", "bob"], ["1", "carol"], ["2", "dave"]]
    assert "you can remove them" in shown_text.splitlines()[-1]  # carol can remove dave
    assert_one_line_error(carol.veil("group", "remove", "Book-Club", "bob", check=False),
                          "you cannot remove bob: only a member who joined before them can")
    # alice removes bob; bob hears of it and of nothing after; he cannot send.
    alice.veil("group", "remove", "Book-Club", "bob")
    assert texts(recv(bob), "Book-Club")[-1] == ("alice", "removed bob")
    for u in (carol, dave):
        u.veil("recv")
    dave.veil("send", "--group", "Book-Club", "after bob")
    assert texts(recv(bob), "Book-Club") == []
    assert texts(recv(alice), "Book-Club")[-1] == ("dave", "after bob")
    assert_one_line_error(bob.veil("send", "--group", "Book-Club", "still here?", check=False),
                          "no longer a member")
    # dave leaves.
    dave.veil("group", "leave", "Book-Club")
    assert texts(recv(alice), "Book-Club")[-1] == ("dave", "left the group")
    assert_one_line_error(erin.veil("send", "--group", "Book-Club", "hi", check=False), "no group named")

    # Crossing changes: alice adds erin while carol, who has not heard of it, adds bob back.
    alice.veil("group", "add", "Book-Club", "erin")
    carol.veil("group", "add", "Book-Club", "bob")
    for _ in range(2):
        for u in (alice, bob, carol, erin):
            u.veil("recv")
    states = [json.loads(u.veil("group", "show", "Book-Club", "--json").stdout) for u in (alice, bob, carol, erin)]
    for st in states:
        assert {m["name"] for m in st["members"]} == {"alice", "bob", "carol", "erin"}, st
    assert len({st["version"] for st in states}) == 1
    assert_one_line_error(alice.veil("group", "add", "Book-Club", "carol", check=False), "members already")

    # erin renames it: every member sees the new name; the label on each device stays.
    out = erin.veil("group", "rename", "Book-Club", "Reading", "Circle").stdout
    assert "Book-Club renamed 'Reading Circle'; sent to the members" in out
    assert texts(recv(alice), "Book-Club")[-1] == ("erin", "renamed the group 'Reading Circle'")
    assert json.loads(alice.veil("group", "show", "Book-Club", "--json").stdout)["name"] == "Reading Circle"
    assert "Book-Club  'Reading Circle'  4 members" in alice.veil("group", "list").stdout
    assert_one_line_error(alice.veil("group", "rename", "Book-Club", "Reading Circle", check=False),
                          "named 'Reading Circle' already")

    # The relay holds nothing of the group: no id, no name, in its database or its output.
    gid = bytes.fromhex(shown["id"])
    relay_proc.proc.send_signal(signal.SIGTERM)
    relay_proc.proc.wait(timeout=60)
    assert relay_proc.proc.stdout is not None and relay_proc.proc.stderr is not None
    output = relay_proc.proc.stdout.read() + relay_proc.proc.stderr.read()
    stop_relay(relay_proc)
    assert "Book" not in output and "Reading" not in output and gid.hex() not in output
    keys = RelayKeys.from_root(load_root_key(relay_proc.data_dir))
    db = open_encrypted(relay_proc.data_dir / DB_FILE, keys.db_key)
    try:
        tables = [r[0] for r in db.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert "mailbox" in tables
        for t in tables:
            for row in db.conn.execute(f"SELECT * FROM {t}"):
                for v in row:
                    raw = bytes(v) if isinstance(v, bytes | memoryview) else str(v).encode()
                    assert b"Book" not in raw and b"Reading" not in raw and gid not in raw, t
    finally:
        db.conn.close()
