"""The node's local store: one SQLCipher file per device; every SQL statement of the node.

Holds the account's private keys, the session token, contacts and their pinned keys,
the message history (plaintext, which is why the whole file is encrypted under a key
derived from the master password), the outbox and the ids of messages already seen, and
what ``veil chat`` keeps between runs: how far each conversation has been read, and the
commands typed (its input history).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from cipherdb import open_encrypted, rekey

migrations = Migrations("veil-node")


@migrations(name="0001_initial")
def _m0001(db: Database) -> None:
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
    db.execute(
        """
        CREATE TABLE contacts (
            name TEXT PRIMARY KEY,
            enc_pub BLOB NOT NULL,
            identity_pub BLOB NOT NULL,
            dh_pub BLOB NOT NULL,
            verified INTEGER NOT NULL DEFAULT 0,
            key_changed INTEGER NOT NULL DEFAULT 0,
            previous_identity BLOB
        )"""
    )
    db.execute(
        """
        CREATE TABLE contact_devices (
            name TEXT NOT NULL REFERENCES contacts(name) ON DELETE CASCADE,
            device_id BLOB NOT NULL,
            PRIMARY KEY (name, device_id)
        )"""
    )
    db.execute(
        """
        CREATE TABLE messages (
            msg_id BLOB PRIMARY KEY,
            peer TEXT NOT NULL,
            sender TEXT NOT NULL,
            outgoing INTEGER NOT NULL,
            body TEXT NOT NULL,
            sent_at INTEGER NOT NULL,
            received_at INTEGER NOT NULL,
            state TEXT NOT NULL,
            seq INTEGER NOT NULL
        )"""
    )
    db.execute("CREATE INDEX messages_peer ON messages(peer, seq)")
    db.execute(
        """
        CREATE TABLE outbox (
            eid BLOB PRIMARY KEY,
            msg_id BLOB NOT NULL,
            device_id BLOB NOT NULL,
            blob BLOB NOT NULL
        )"""
    )
    db.execute("CREATE INDEX outbox_msg ON outbox(msg_id)")
    # Messages composed but not yet sealed (composed offline, or held for a key change).
    db.execute("CREATE TABLE unsealed (msg_id BLOB PRIMARY KEY REFERENCES messages(msg_id))")


@migrations(name="0002_sessions_and_prekeys")
def _m0002(db: Database) -> None:
    # Ratchet sessions with each device of each peer (several per device: when both sides
    # start a session at once, the one the peer keeps using wins).
    db.execute(
        """
        CREATE TABLE sessions (
            peer TEXT NOT NULL,
            device_id BLOB NOT NULL,
            sid INTEGER NOT NULL,
            state BLOB NOT NULL,
            ad BLOB NOT NULL,
            init BLOB,
            used INTEGER NOT NULL,
            PRIMARY KEY (peer, device_id, sid)
        )"""
    )
    db.execute(
        "CREATE TABLE signed_prekeys (key_id INTEGER PRIMARY KEY, blob BLOB NOT NULL,"
        " created_at INTEGER NOT NULL)"
    )
    db.execute("CREATE TABLE one_time_prekeys (key_id INTEGER PRIMARY KEY, blob BLOB NOT NULL)")


@migrations(name="0003_read_marks_and_input_history")
def _m0003(db: Database) -> None:
    # How far each conversation has been shown on this device: messages with a larger
    # seq are unread. What was stored before this migration counts as read, as it did.
    db.execute("CREATE TABLE read_marks (peer TEXT PRIMARY KEY, up_to_seq INTEGER NOT NULL)")
    db.execute("INSERT INTO read_marks (peer, up_to_seq) SELECT peer, max(seq) FROM messages GROUP BY peer")
    # Commands typed in `veil chat`, oldest first (never message text: see cli/chat/host.py).
    db.execute("CREATE TABLE input_history (id INTEGER PRIMARY KEY, line TEXT NOT NULL)")


@migrations(name="0004_post_quantum")
def _m0004(db: Database) -> None:
    # This device's ML-KEM-768 keys (keyvault.kem: one-time and last-resort KEM prekeys,
    # envelope keys), private halves included.
    db.execute(
        "CREATE TABLE kem_keys (use INTEGER NOT NULL, key_id INTEGER NOT NULL, blob BLOB NOT NULL,"
        " created_at INTEGER NOT NULL, PRIMARY KEY (use, key_id))"
    )
    # Envelope keys of other devices (and of this account's others), signature checked.
    # Kept when a lookup no longer lists one: a relay must not be able to make a device
    # fall back to envelopes without the KEM layer by leaving a key out.
    db.execute(
        "CREATE TABLE envelope_keys (name TEXT NOT NULL, device_id BLOB NOT NULL,"
        " key_id INTEGER NOT NULL, public BLOB NOT NULL, PRIMARY KEY (name, device_id))"
    )
    # Devices seen with post-quantum keys: never again a session with them without PQXDH.
    # Neither table forgets a device the relay stops listing (it may list it again).
    db.execute(
        "CREATE TABLE pq_devices (name TEXT NOT NULL, device_id BLOB NOT NULL,"
        " PRIMARY KEY (name, device_id))"
    )


@migrations(name="0005_groups")
def _m0005(db: Database) -> None:
    # Groups this device knows: the name it shows them by (unique here), and every change
    # of each (keyvault.group: the state is their fold). Messages in a group have peer
    # "#" + the group id in hex.
    db.execute("CREATE TABLE groups (group_id BLOB PRIMARY KEY, label TEXT NOT NULL UNIQUE)")
    db.execute(
        "CREATE TABLE group_changes (group_id BLOB NOT NULL REFERENCES groups(group_id) ON DELETE CASCADE,"
        " hash BLOB NOT NULL, blob BLOB NOT NULL, PRIMARY KEY (group_id, hash))"
    )
    # The group's version last sent to each device of each member: a device behind gets
    # the group's changes with the next message (a new member, a new device, one offline).
    db.execute(
        "CREATE TABLE group_sent (group_id BLOB NOT NULL, name TEXT NOT NULL, device_id BLOB NOT NULL,"
        " version INTEGER NOT NULL, PRIMARY KEY (group_id, name, device_id))"
    )
    # Messages that announce this device's own changes (not text), and who else hears of
    # them (those the change removes).
    db.execute("CREATE TABLE group_notices (msg_id BLOB PRIMARY KEY, also TEXT NOT NULL)")
    # Messages in a group's history that are changes (who added whom), not text.
    # (Their own message ids: a change's hash is known to its author before it sends it,
    # so an id derived from it could be taken first by a text and hide the change.)
    db.execute("CREATE TABLE group_events (msg_id BLOB PRIMARY KEY, hash BLOB NOT NULL UNIQUE)")
    # Groups whose changes this device should pass on to every member (a change of others
    # crossed one of ours: not every member may have both).
    db.execute("CREATE TABLE group_resync (group_id BLOB PRIMARY KEY)")
    # Changes of groups not held yet that add this account, while the rest comes.
    db.execute(
        "CREATE TABLE group_limbo (group_id BLOB NOT NULL, hash BLOB NOT NULL, blob BLOB NOT NULL,"
        " PRIMARY KEY (group_id, hash))"
    )


@migrations(name="0006_group_resync_also")
def _m0006(db: Database) -> None:
    # Those who hear of a group's changes besides its members: someone whose addition no
    # longer stands (it crossed a removal of whoever added them) learns they are not in.
    db.execute("ALTER TABLE group_resync ADD COLUMN also TEXT NOT NULL DEFAULT ''")


@migrations(name="0007_group_limbo_sender")
def _m0007(db: Database) -> None:
    # Who sent the letters that put a group in limbo: each sender has room for only a few
    # groups there, so that nobody can push out the group another member is bringing.
    db.execute("ALTER TABLE group_limbo ADD COLUMN sender TEXT NOT NULL DEFAULT ''")


@dataclass(frozen=True)
class SessionRow:
    sid: int
    state: bytes
    ad: bytes
    init: bytes | None  # our X3DH data, sent until the peer has answered


MAX_SESSIONS_PER_DEVICE = 4
INPUT_HISTORY_MAX = 500  # commands kept for `veil chat`'s up arrow


@dataclass(frozen=True)
class Contact:
    name: str
    enc_pub: bytes
    identity_pub: bytes
    dh_pub: bytes
    verified: bool
    key_changed: bool
    devices: tuple[bytes, ...]


@dataclass(frozen=True)
class StoredMessage:
    msg_id: bytes
    peer: str
    sender: str
    outgoing: bool
    body: str
    sent_at: int
    received_at: int
    state: str  # "pending" (not yet at the relay), "sent" (the relay holds it), "received", "failed"
    seq: int


@dataclass(frozen=True)
class OutboxEntry:
    eid: bytes
    msg_id: bytes
    device_id: bytes
    blob: bytes


_MSG_COLS = "msg_id, peer, sender, outgoing, body, sent_at, received_at, state, seq"


def _message(r: Sequence[Any]) -> StoredMessage:
    return StoredMessage(
        bytes(r[0]), str(r[1]), str(r[2]), bool(r[3]), str(r[4]), int(r[5]), int(r[6]), str(r[7]), int(r[8])
    )


class NodeStore:
    def __init__(self, path: Path, key: bytes) -> None:
        self.db = open_encrypted(path, key)
        self.conn = self.db.conn
        migrations.apply(self.db)

    def close(self) -> None:
        self.conn.close()

    def rekey(self, key: bytes) -> None:
        """Encrypt the whole file under a new key (SQLCipher re-writes every page)."""
        rekey(self.conn, key)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.db.atomic():
            yield

    # ---- meta ------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def put(self, key: str, value: bytes) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def delete(self, key: str) -> None:
        self.conn.execute("DELETE FROM meta WHERE key = ?", (key,))

    # ---- contacts --------------------------------------------------------------------
    def contact(self, name: str) -> Contact | None:
        row = self.conn.execute(
            "SELECT name, enc_pub, identity_pub, dh_pub, verified, key_changed FROM contacts"
            " WHERE name = ?",
            (name,),
        ).fetchone()
        if row is None:
            return None
        devices = tuple(
            bytes(r[0])
            for r in self.conn.execute(
                "SELECT device_id FROM contact_devices WHERE name = ? ORDER BY rowid", (name,)
            )
        )
        return Contact(
            str(row[0]), bytes(row[1]), bytes(row[2]), bytes(row[3]), bool(row[4]), bool(row[5]), devices
        )

    def contacts(self) -> list[Contact]:
        names = [r[0] for r in self.conn.execute("SELECT name FROM contacts ORDER BY name")]
        return [c for n in names if (c := self.contact(n)) is not None]

    def pin(self, name: str, enc_pub: bytes, identity_pub: bytes, dh_pub: bytes) -> None:
        """Pin keys seen for the first time."""
        self.conn.execute(
            "INSERT INTO contacts (name, enc_pub, identity_pub, dh_pub) VALUES (?,?,?,?)",
            (name, enc_pub, identity_pub, dh_pub),
        )

    def replace_keys(self, name: str, enc_pub: bytes, identity_pub: bytes, dh_pub: bytes) -> None:
        """Record a changed key: the new key is used, and the change is flagged."""
        self.conn.execute(
            "UPDATE contacts SET previous_identity = identity_pub, enc_pub = ?, identity_pub = ?,"
            " dh_pub = ?, key_changed = 1 WHERE name = ?",
            (enc_pub, identity_pub, dh_pub, name),
        )

    def set_devices(self, name: str, devices: Sequence[bytes]) -> None:
        self.conn.execute("DELETE FROM contact_devices WHERE name = ?", (name,))
        self.conn.executemany(
            "INSERT OR IGNORE INTO contact_devices (name, device_id) VALUES (?, ?)",
            [(name, d) for d in devices],
        )

    def set_verified(self, name: str, verified: bool) -> None:
        self.conn.execute(
            "UPDATE contacts SET verified = ?, key_changed = 0 WHERE name = ?", (int(verified), name)
        )

    def accept_key(self, name: str) -> None:
        """Accept a changed key: no longer flagged, and no longer verified."""
        self.conn.execute(
            "UPDATE contacts SET key_changed = 0, verified = 0 WHERE name = ?", (name,)
        )

    # ---- messages ----------------------------------------------------------------------
    def has_message(self, msg_id: bytes) -> bool:
        return self.conn.execute("SELECT 1 FROM messages WHERE msg_id = ?", (msg_id,)).fetchone() is not None

    def add_message(self, m: StoredMessage) -> StoredMessage:
        """Insert a message; its ``seq`` is assigned here (store order)."""
        (seq,) = self.conn.execute("SELECT coalesce(max(seq), 0) + 1 FROM messages").fetchone()
        self.conn.execute(
            f"INSERT INTO messages ({_MSG_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
            (m.msg_id, m.peer, m.sender, int(m.outgoing), m.body, m.sent_at, m.received_at, m.state, seq),
        )
        return StoredMessage(**{**m.__dict__, "seq": int(seq)})

    def message(self, msg_id: bytes) -> StoredMessage | None:
        row = self.conn.execute(f"SELECT {_MSG_COLS} FROM messages WHERE msg_id = ?", (msg_id,)).fetchone()
        return None if row is None else _message(row)

    def set_state(self, msg_id: bytes, state: str) -> None:
        self.conn.execute("UPDATE messages SET state = ? WHERE msg_id = ?", (state, msg_id))

    def history(self, peer: str | None = None, limit: int = 50) -> list[StoredMessage]:
        """The last ``limit`` messages (of one conversation), oldest first."""
        if peer is None:
            rows = self.conn.execute(
                f"SELECT {_MSG_COLS} FROM messages ORDER BY seq DESC LIMIT ?", (limit,)
            )
        else:
            rows = self.conn.execute(
                f"SELECT {_MSG_COLS} FROM messages WHERE peer = ? ORDER BY seq DESC LIMIT ?",
                (peer, limit),
            )
        return [_message(r) for r in rows][::-1]

    def received_after(self, seq: int, limit: int) -> list[StoredMessage]:
        """Messages this device received (from others, or copies from our other devices)
        stored after ``seq``, oldest first: what `veil recv` has not printed yet."""
        rows = self.conn.execute(
            f"SELECT {_MSG_COLS} FROM messages WHERE state = 'received' AND seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        )
        return [_message(r) for r in rows]

    def last_seq(self) -> int:
        (seq,) = self.conn.execute("SELECT coalesce(max(seq), 0) FROM messages").fetchone()
        return int(seq)

    def last_messages(self) -> list[StoredMessage]:
        """The newest message of each conversation, newest first."""
        rows = self.conn.execute(
            f"SELECT {_MSG_COLS} FROM messages WHERE seq IN (SELECT max(seq) FROM messages GROUP BY peer)"
            " ORDER BY seq DESC"
        )
        return [_message(r) for r in rows]

    # ---- read marks --------------------------------------------------------------------
    def mark_read(self, peer: str, up_to_seq: int) -> None:
        """Messages of the conversation with ``peer`` up to ``up_to_seq`` have been shown.
        A mark only moves forward."""
        self.conn.execute(
            "INSERT INTO read_marks (peer, up_to_seq) VALUES (?, ?) ON CONFLICT (peer)"
            " DO UPDATE SET up_to_seq = max(up_to_seq, excluded.up_to_seq)",
            (peer, up_to_seq),
        )

    def read_mark(self, peer: str) -> int:
        """The seq up to which the conversation with ``peer`` has been read (0: none)."""
        row = self.conn.execute("SELECT up_to_seq FROM read_marks WHERE peer = ?", (peer,)).fetchone()
        return 0 if row is None else int(row[0])

    def unread_counts(self, peer: str | None = None) -> dict[str, int]:
        """Received messages past each conversation's read mark (of one conversation, with
        ``peer``); conversations with none are left out."""
        sql = (
            "SELECT m.peer, count(*) FROM messages AS m LEFT JOIN read_marks AS r ON r.peer = m.peer"
            " WHERE m.outgoing = 0 AND m.seq > coalesce(r.up_to_seq, 0)"
        )
        if peer is None:
            rows = self.conn.execute(sql + " GROUP BY m.peer")
        else:
            rows = self.conn.execute(sql + " AND m.peer = ? GROUP BY m.peer", (peer,))
        return {str(r[0]): int(r[1]) for r in rows}

    # ---- input history of `veil chat` ----------------------------------------------------
    def add_input(self, line: str) -> None:
        """Remember a command typed in the chat, keeping the newest INPUT_HISTORY_MAX."""
        self.conn.execute("INSERT INTO input_history (line) VALUES (?)", (line,))
        self.conn.execute(
            "DELETE FROM input_history WHERE id NOT IN"
            " (SELECT id FROM input_history ORDER BY id DESC LIMIT ?)",
            (INPUT_HISTORY_MAX,),
        )

    def input_history(self) -> list[str]:
        """The remembered commands, newest first."""
        return [str(r[0]) for r in self.conn.execute("SELECT line FROM input_history ORDER BY id DESC")]

    # ---- ratchet sessions ------------------------------------------------------------
    def sessions(self, peer: str, device_id: bytes) -> list[SessionRow]:
        """Sessions with one device, the one used last first."""
        return [
            SessionRow(int(r[0]), bytes(r[1]), bytes(r[2]), None if r[3] is None else bytes(r[3]))
            for r in self.conn.execute(
                "SELECT sid, state, ad, init FROM sessions WHERE peer = ? AND device_id = ?"
                " ORDER BY used DESC",
                (peer, device_id),
            )
        ]

    def save_session(
        self, peer: str, device_id: bytes, sid: int | None, state: bytes, ad: bytes, init: bytes | None
    ) -> int:
        """Store a session's new state and make it the current one; returns its sid."""
        (used,) = self.conn.execute("SELECT coalesce(max(used), 0) + 1 FROM sessions").fetchone()
        if sid is None:
            (sid,) = self.conn.execute(
                "SELECT coalesce(max(sid), 0) + 1 FROM sessions WHERE peer = ? AND device_id = ?",
                (peer, device_id),
            ).fetchone()
        self.conn.execute(
            "INSERT OR REPLACE INTO sessions (peer, device_id, sid, state, ad, init, used)"
            " VALUES (?,?,?,?,?,?,?)",
            (peer, device_id, sid, state, ad, init, used),
        )
        self.conn.execute(
            "DELETE FROM sessions WHERE peer = ? AND device_id = ? AND sid NOT IN"
            " (SELECT sid FROM sessions WHERE peer = ? AND device_id = ? ORDER BY used DESC LIMIT ?)",
            (peer, device_id, peer, device_id, MAX_SESSIONS_PER_DEVICE),
        )
        return int(sid)

    def forget_sessions(self, peer: str, keep_devices: Sequence[bytes]) -> None:
        """Drop sessions with devices the peer no longer has."""
        marks = ",".join("?" * len(keep_devices))
        self.conn.execute(
            f"DELETE FROM sessions WHERE peer = ? AND device_id NOT IN ({marks})", (peer, *keep_devices)
        )

    # ---- our prekeys -----------------------------------------------------------------
    def next_prekey_ids(self, count: int) -> int:
        """Reserve ``count`` fresh prekey ids; returns the first."""
        raw = self.get("next_prekey_id")
        first = int.from_bytes(raw, "big") if raw else 1
        self.put("next_prekey_id", (first + count).to_bytes(8, "big"))
        return first

    def add_signed_prekey(self, key_id: int, blob: bytes, created_at: int) -> None:
        self.conn.execute(
            "INSERT INTO signed_prekeys (key_id, blob, created_at) VALUES (?,?,?)", (key_id, blob, created_at)
        )

    def signed_prekey(self, key_id: int) -> bytes | None:
        row = self.conn.execute("SELECT blob FROM signed_prekeys WHERE key_id = ?", (key_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def newest_signed_prekey(self) -> tuple[int, int] | None:
        """(key_id, created_at) of the signed prekey published last."""
        row = self.conn.execute(
            "SELECT key_id, created_at FROM signed_prekeys ORDER BY created_at DESC, key_id DESC LIMIT 1"
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def drop_signed_prekeys_retired_before(self, cutoff: int) -> None:
        """Forget signed prekeys that a newer one replaced before ``cutoff`` (the newest
        is never replaced, so never dropped)."""
        self.conn.execute(
            "DELETE FROM signed_prekeys WHERE EXISTS (SELECT 1 FROM signed_prekeys AS newer"
            " WHERE (newer.created_at, newer.key_id) > (signed_prekeys.created_at, signed_prekeys.key_id)"
            " AND newer.created_at < ?)",
            (cutoff,),
        )

    def add_one_time_prekeys(self, keys: Sequence[tuple[int, bytes]]) -> None:
        self.conn.executemany("INSERT INTO one_time_prekeys (key_id, blob) VALUES (?,?)", keys)

    def one_time_prekey(self, key_id: int) -> bytes | None:
        row = self.conn.execute("SELECT blob FROM one_time_prekeys WHERE key_id = ?", (key_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def delete_one_time_prekey(self, key_id: int) -> None:
        self.conn.execute("DELETE FROM one_time_prekeys WHERE key_id = ?", (key_id,))

    # ---- post-quantum keys ---------------------------------------------------------------
    def add_kem_keys(self, keys: Sequence[tuple[int, int, bytes, int]]) -> None:
        """(use, key_id, KemKey bytes, created_at) of this device's new KEM keys."""
        self.conn.executemany(
            "INSERT INTO kem_keys (use, key_id, blob, created_at) VALUES (?,?,?,?)", keys
        )

    def kem_key(self, use: int, key_id: int) -> bytes | None:
        row = self.conn.execute(
            "SELECT blob FROM kem_keys WHERE use = ? AND key_id = ?", (use, key_id)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def newest_kem_key(self, use: int) -> tuple[int, int, bytes] | None:
        """(key_id, created_at, KemKey bytes) of this device's newest key of ``use``."""
        row = self.conn.execute(
            "SELECT key_id, created_at, blob FROM kem_keys WHERE use = ?"
            " ORDER BY created_at DESC, key_id DESC LIMIT 1",
            (use,),
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]), bytes(row[2]))

    def delete_kem_key(self, use: int, key_id: int) -> None:
        self.conn.execute("DELETE FROM kem_keys WHERE use = ? AND key_id = ?", (use, key_id))

    def drop_kem_keys_retired_before(self, use: int, cutoff: int) -> None:
        """Forget keys of ``use`` that a newer one replaced before ``cutoff``."""
        self.conn.execute(
            "DELETE FROM kem_keys WHERE use = ? AND EXISTS (SELECT 1 FROM kem_keys AS newer"
            " WHERE newer.use = kem_keys.use AND (newer.created_at, newer.key_id) >"
            " (kem_keys.created_at, kem_keys.key_id) AND newer.created_at < ?)",
            (use, cutoff),
        )

    def put_envelope_keys(self, name: str, keys: Sequence[tuple[bytes, int, bytes]]) -> None:
        """Record (device_id, key_id, public) of ``name``'s devices (each signed for its
        device by ``name``'s identity key: what a lookup shows replaces what was kept)."""
        self.conn.executemany(
            "INSERT INTO envelope_keys (name, device_id, key_id, public) VALUES (?,?,?,?)"
            " ON CONFLICT (name, device_id) DO UPDATE SET key_id = excluded.key_id,"
            " public = excluded.public",
            [(name, d, k, pub) for d, k, pub in keys],
        )
        self.conn.executemany(
            "INSERT OR IGNORE INTO pq_devices (name, device_id) VALUES (?,?)", [(name, d) for d, _, _ in keys]
        )

    def envelope_key(self, name: str, device_id: bytes) -> tuple[int, bytes] | None:
        row = self.conn.execute(
            "SELECT key_id, public FROM envelope_keys WHERE name = ? AND device_id = ?", (name, device_id)
        ).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def forget_post_quantum(self, name: str) -> None:
        """``name``'s identity key changed: what its old key signed is not kept."""
        self.conn.execute("DELETE FROM envelope_keys WHERE name = ?", (name,))
        self.conn.execute("DELETE FROM pq_devices WHERE name = ?", (name,))

    def mark_post_quantum(self, name: str, device_id: bytes) -> None:
        self.conn.execute("INSERT OR IGNORE INTO pq_devices (name, device_id) VALUES (?,?)", (name, device_id))

    def is_post_quantum(self, name: str, device_id: bytes) -> bool:
        return self.conn.execute(
            "SELECT 1 FROM pq_devices WHERE name = ? AND device_id = ?", (name, device_id)
        ).fetchone() is not None

    # ---- groups ---------------------------------------------------------------------------
    def add_group(self, group_id: bytes, label: str) -> None:
        self.conn.execute("INSERT INTO groups (group_id, label) VALUES (?,?)", (group_id, label))

    def group_ids(self) -> list[tuple[bytes, str]]:
        return [(bytes(r[0]), str(r[1])) for r in self.conn.execute("SELECT group_id, label FROM groups ORDER BY label")]

    def group_label(self, group_id: bytes) -> str | None:
        row = self.conn.execute("SELECT label FROM groups WHERE group_id = ?", (group_id,)).fetchone()
        return None if row is None else str(row[0])

    def group_by_label(self, label: str) -> bytes | None:
        row = self.conn.execute("SELECT group_id FROM groups WHERE label = ?", (label,)).fetchone()
        return None if row is None else bytes(row[0])

    def add_group_changes(self, group_id: bytes, changes: Sequence[tuple[bytes, bytes]]) -> None:
        """(hash, encoded change) pairs; one already held is ignored."""
        self.conn.executemany(
            "INSERT OR IGNORE INTO group_changes (group_id, hash, blob) VALUES (?,?,?)",
            [(group_id, h, b) for h, b in changes],
        )

    def drop_group_changes(self, group_id: bytes, hashes: Sequence[bytes]) -> None:
        """Forget changes (only ever ones waiting for their parents: node/groups.py)."""
        self.conn.executemany("DELETE FROM group_changes WHERE group_id = ? AND hash = ?",
                              [(group_id, h) for h in hashes])

    def group_changes(self, group_id: bytes) -> dict[bytes, bytes]:
        """The group's changes held here, by hash."""
        return {bytes(r[0]): bytes(r[1]) for r in self.conn.execute(
            "SELECT hash, blob FROM group_changes WHERE group_id = ? ORDER BY hash", (group_id,))}

    def group_sent(self, group_id: bytes, name: str, device_id: bytes) -> int:
        row = self.conn.execute(
            "SELECT version FROM group_sent WHERE group_id = ? AND name = ? AND device_id = ?",
            (group_id, name, device_id),
        ).fetchone()
        return 0 if row is None else int(row[0])

    def set_group_sent(self, group_id: bytes, name: str, device_id: bytes, version: int) -> None:
        self.conn.execute(
            "INSERT INTO group_sent (group_id, name, device_id, version) VALUES (?,?,?,?)"
            " ON CONFLICT (group_id, name, device_id) DO UPDATE SET version = excluded.version",
            (group_id, name, device_id, version),
        )

    def add_group_notice(self, msg_id: bytes, also: Sequence[str]) -> None:
        self.conn.execute("INSERT INTO group_notices (msg_id, also) VALUES (?,?)", (msg_id, ",".join(also)))

    def group_limbo(self, group_id: bytes) -> dict[bytes, bytes]:
        """Changes kept of a group not held yet, by hash."""
        return {bytes(r[0]): bytes(r[1]) for r in self.conn.execute(
            "SELECT hash, blob FROM group_limbo WHERE group_id = ?", (group_id,))}

    def add_group_limbo(self, group_id: bytes, changes: Sequence[tuple[bytes, bytes]], sender: str,
                        per_group: int, groups: int, per_sender: int) -> None:
        """Keep changes of a group not held yet, that ``sender``'s letter brought: at most
        ``per_group`` of one group, of at most ``groups`` groups, at most ``per_sender`` of
        them brought first by one sender. A group that does not fit pushes out the oldest
        group of its own sender if that one is at its share, else the oldest group of
        whoever holds the most."""
        held = [(bytes(r[0]), str(r[1])) for r in self.conn.execute(
            "SELECT group_id, (SELECT l2.sender FROM group_limbo l2 WHERE l2.group_id = l.group_id"
            " ORDER BY l2.rowid LIMIT 1) FROM group_limbo l GROUP BY group_id ORDER BY min(rowid)")]
        if group_id not in {g for g, _ in held}:
            own = [g for g, s in held if s == sender]
            if len(own) >= per_sender:
                self.drop_group_limbo(own[0])
            elif len(held) >= groups:
                counts = Counter(s for _, s in held)
                most = max(counts.values())
                self.drop_group_limbo(next(g for g, s in held if counts[s] == most))
        (count,) = self.conn.execute("SELECT count(*) FROM group_limbo WHERE group_id = ?", (group_id,)).fetchone()
        self.conn.executemany(
            "INSERT OR IGNORE INTO group_limbo (group_id, hash, blob, sender) VALUES (?,?,?,?)",
            [(group_id, h, b, sender) for h, b in changes[: max(0, per_group - int(count))]],
        )

    def drop_group_limbo(self, group_id: bytes) -> None:
        self.conn.execute("DELETE FROM group_limbo WHERE group_id = ?", (group_id,))

    def add_group_resync(self, group_id: bytes, also: Sequence[str] = ()) -> None:
        """Pass the group's changes on to every member (and to ``also``) when next online."""
        row = self.conn.execute("SELECT also FROM group_resync WHERE group_id = ?", (group_id,)).fetchone()
        names = sorted({n for n in str(row[0]).split(",") if n} | set(also)) if row else sorted(set(also))
        self.conn.execute(
            "INSERT INTO group_resync (group_id, also) VALUES (?,?)"
            " ON CONFLICT (group_id) DO UPDATE SET also = excluded.also", (group_id, ",".join(names)))

    def group_resyncs(self) -> list[tuple[bytes, list[str]]]:
        return [(bytes(r[0]), [n for n in str(r[1]).split(",") if n])
                for r in self.conn.execute("SELECT group_id, also FROM group_resync")]

    def drop_group_resync(self, group_id: bytes) -> None:
        self.conn.execute("DELETE FROM group_resync WHERE group_id = ?", (group_id,))

    def add_group_event(self, msg_id: bytes, change_hash: bytes) -> None:
        self.conn.execute("INSERT INTO group_events (msg_id, hash) VALUES (?,?)", (msg_id, change_hash))

    def has_group_event(self, change_hash: bytes) -> bool:
        return self.conn.execute("SELECT 1 FROM group_events WHERE hash = ?", (change_hash,)).fetchone() is not None

    def is_group_event(self, msg_id: bytes) -> bool:
        return self.conn.execute("SELECT 1 FROM group_events WHERE msg_id = ?", (msg_id,)).fetchone() is not None

    def group_notice(self, msg_id: bytes) -> list[str] | None:
        """Who else hears of this notice (None: the message is not a notice)."""
        row = self.conn.execute("SELECT also FROM group_notices WHERE msg_id = ?", (msg_id,)).fetchone()
        return None if row is None else [n for n in str(row[0]).split(",") if n]

    # ---- composed, not yet sealed -------------------------------------------------------
    def add_unsealed(self, msg_id: bytes) -> None:
        self.conn.execute("INSERT INTO unsealed (msg_id) VALUES (?)", (msg_id,))

    def unsealed(self) -> list[bytes]:
        return [bytes(r[0]) for r in self.conn.execute("SELECT msg_id FROM unsealed ORDER BY rowid")]

    def remove_unsealed(self, msg_id: bytes) -> None:
        self.conn.execute("DELETE FROM unsealed WHERE msg_id = ?", (msg_id,))

    # ---- outbox ------------------------------------------------------------------------
    def add_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        self.conn.executemany(
            "INSERT INTO outbox (eid, msg_id, device_id, blob) VALUES (?,?,?,?)",
            [(e.eid, e.msg_id, e.device_id, e.blob) for e in entries],
        )

    def outbox(self) -> list[OutboxEntry]:
        return [
            OutboxEntry(bytes(r[0]), bytes(r[1]), bytes(r[2]), bytes(r[3]))
            for r in self.conn.execute("SELECT eid, msg_id, device_id, blob FROM outbox ORDER BY rowid")
        ]

    def outbox_count(self) -> int:
        """Sealed envelopes waiting for the relay."""
        (n,) = self.conn.execute("SELECT count(*) FROM outbox").fetchone()
        return int(n)

    def pending_count(self) -> int:
        """Messages not yet held by the relay (composed or in the outbox)."""
        (n,) = self.conn.execute("SELECT count(*) FROM messages WHERE state = 'pending'").fetchone()
        return int(n)

    def remove_outbox(self, eids: Sequence[bytes]) -> None:
        self.conn.executemany("DELETE FROM outbox WHERE eid = ?", [(e,) for e in eids])
