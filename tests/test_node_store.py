"""The node store's read marks and chat input history, on real SQLCipher files; and
`rebuild_before`, which turns a SQLCipher file into one from before a migration."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from sqlite_utils.migrations import Migrations

from cipherdb import open_encrypted
from node.store import INPUT_HISTORY_MAX, NodeStore, StoredMessage, migrations

KEY = bytes(range(32))


def table_rows(conn: Any, table: str) -> list[tuple[Any, ...]]:
    """A table's rows, in a set order (for comparing before and after)."""
    return sorted((tuple(r) for r in conn.execute(f"SELECT * FROM {table}")), key=repr)


def rebuild_before(path: Path, key: bytes, migrations: Migrations, stop_before: str) -> dict[str, list[tuple[Any, ...]]]:
    """Rewrite the SQLCipher file at ``path`` as the code before migration ``stop_before``
    left it: a new file made by the migrations before that one only, holding the rows of
    its tables that the file holds now (what a later migration added is left out).
    Returns those rows, by table."""
    db = open_encrypted(path, key)
    now = {t: table_rows(db.conn, t) for t in db.table_names() if not t.startswith(("sqlite_", "_sqlite"))}
    db.conn.close()
    for f in path.parent.glob(path.name + "*"):
        f.unlink()
    db = open_encrypted(path, key)
    migrations.apply(db, stop_before=stop_before)
    kept = {t: now[t] for t in db.table_names() if not t.startswith(("sqlite_", "_sqlite"))}
    with db.atomic():
        for t, rows in kept.items():
            for r in rows:
                db.conn.execute(f"INSERT INTO {t} VALUES ({', '.join('?' * len(r))})", r)
    assert next(m.name for m in migrations.pending(db)) == stop_before
    db.conn.close()
    return kept


def message(peer: str, outgoing: bool = False) -> StoredMessage:
    sender = "me" if outgoing else peer
    return StoredMessage(secrets.token_bytes(16), peer, sender, outgoing, "hi", 1, 1, "received", 0)


def test_messages_from_before_the_read_marks_count_as_read(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    db = open_encrypted(path, KEY)
    migrations.apply(db, stop_before="0003_read_marks_and_input_history")
    old = NodeStore.__new__(NodeStore)
    old.db, old.conn = db, db.conn
    for m in (message("alice"), message("alice"), message("bob", outgoing=True)):
        old.add_message(m)
    db.conn.close()

    store = NodeStore(path, KEY)
    try:
        assert store.unread_counts() == {}
        assert store.read_mark("alice") == 2 and store.read_mark("bob") == 3
        store.add_message(message("alice"))
        store.add_message(message("alice", outgoing=True))  # our own: never unread
        store.add_message(message("carol"))
        assert store.unread_counts() == {"alice": 1, "carol": 1}
        assert store.unread_counts("carol") == {"carol": 1}
        store.mark_read("alice", 4)
        store.mark_read("alice", 1)  # a mark only moves forward
        assert store.read_mark("alice") == 4
        assert store.unread_counts() == {"carol": 1}
    finally:
        store.close()


def test_input_history_keeps_the_newest_commands(tmp_path: Path) -> None:
    store = NodeStore(tmp_path / "store.db", KEY)
    try:
        for i in range(INPUT_HISTORY_MAX + 20):
            store.add_input(f"/history {i}")
        kept = store.input_history()
        assert len(kept) == INPUT_HISTORY_MAX
        assert kept[0] == f"/history {INPUT_HISTORY_MAX + 19}" and kept[-1] == "/history 20"
    finally:
        store.close()
