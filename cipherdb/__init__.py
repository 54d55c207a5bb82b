"""Open an SQLCipher-encrypted SQLite file as a sqlite-utils Database.

Shared by the relay's store and the node's local store. sqlite-utils prefers
``pysqlite3`` when it can import it, so pointing that name at ``sqlcipher3`` before
sqlite-utils is imported makes it use SQLCipher's driver and catch the right exception
classes. Keys are raw 256-bit keys (no passphrase KDF inside SQLCipher: ours is Argon2id,
done once, outside).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import sqlcipher3.dbapi2 as sqlcipher  # type: ignore[import-untyped]

sys.modules.setdefault("pysqlite3", sys.modules["sqlcipher3"])
sys.modules.setdefault("pysqlite3.dbapi2", sqlcipher)

import sqlite_utils  # noqa: E402  (must come after the module alias above)

DatabaseError = sqlcipher.DatabaseError
IntegrityError = sqlcipher.IntegrityError


class WrongKey(Exception):
    """The database key does not open this file."""


def open_encrypted(path: Path, key: bytes, *, wal: bool = True, durable: bool = True) -> sqlite_utils.Database:
    """Open (or create, mode 0600) an encrypted database; WrongKey if the key is wrong.

    ``durable`` (the default): ``synchronous = FULL``, so that every commit is on disk
    (WAL fsynced) before it returns, and survives a power loss or an operating-system crash;
    ``False``: ``NORMAL``, which survives a crash of the process only (the last commits
    before a power loss may be lost), for less fsync."""
    if len(key) != 32:
        raise ValueError("database key must be 32 bytes")
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    # Owned by one worker thread at a time (callers serialise access), so the
    # connection may move between threads.
    conn: Any = sqlcipher.connect(str(path), check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA cipher_log_level = NONE")  # a wrong key is our error to report
    conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlcipher.DatabaseError:
        conn.close()
        raise WrongKey(str(path)) from None
    if wal:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA secure_delete = ON")
    return sqlite_utils.Database(conn)


def rekey(conn: Any, key: bytes) -> None:
    """Re-encrypt an open database under a new raw 256-bit key."""
    if len(key) != 32:
        raise ValueError("database key must be 32 bytes")
    conn.execute(f"PRAGMA rekey = \"x'{key.hex()}'\"")
