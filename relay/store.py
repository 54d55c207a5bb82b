"""The relay's storage: every SQL statement the relay runs lives in this module.

A narrow, synchronous interface (accounts, devices, sessions, mailboxes) over an
``Engine``: the SQLCipher file (``SqliteEngine``, here, the default: one process, one
worker thread at a time) or PostgreSQL (``relay.pgstore``, shared by many relay
processes). It runs in worker threads (see ``relay.mailroom``), never on the event loop.
Minimal by design: account names are stored only as an HMAC, mailboxes have no sender
column, and no column holds an IP address or a time finer than a day.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from cipherdb import IntegrityError, open_encrypted

MAIL_TTL_DAYS = 30
SESSION_IDLE_DAYS = 30
SESSION_MAX_DAYS = 180

migrations = Migrations("veil-relay")


@migrations(name="0001_initial")
def _m0001(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE accounts (
            id INTEGER PRIMARY KEY,
            name_mac BLOB NOT NULL UNIQUE,
            salt BLOB NOT NULL,
            kdf_t INTEGER NOT NULL, kdf_m INTEGER NOT NULL, kdf_p INTEGER NOT NULL,
            auth_pub BLOB NOT NULL,
            enc_pub BLOB NOT NULL,
            identity_pub BLOB NOT NULL,
            dh_pub BLOB NOT NULL,
            keys_sig BLOB NOT NULL,
            bundle BLOB NOT NULL,
            recovery_auth_pub BLOB NOT NULL,
            recovery_bundle BLOB NOT NULL,
            totp_secret BLOB,
            totp_last_step INTEGER,
            created_day INTEGER NOT NULL
        )"""
    )
    db.execute(
        """
        CREATE TABLE devices (
            device_id BLOB PRIMARY KEY,
            account_id INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
            sig BLOB NOT NULL,
            created_day INTEGER NOT NULL
        )"""
    )
    db.execute("CREATE INDEX devices_account ON devices(account_id)")
    db.execute(
        """
        CREATE TABLE sessions (
            token_hash BLOB PRIMARY KEY,
            account_id INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
            device_id BLOB NOT NULL REFERENCES devices(device_id) ON DELETE CASCADE,
            idle_day INTEGER NOT NULL,
            expires_day INTEGER NOT NULL
        )"""
    )
    db.execute("CREATE INDEX sessions_device ON sessions(device_id)")
    # No rowid: a global insertion order would tie together the envelopes of one send
    # (a message to bob's devices and its copies to alice's own). ``seq`` counts per device.
    db.execute(
        """
        CREATE TABLE mailbox (
            device_id BLOB NOT NULL REFERENCES devices(device_id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            eid BLOB NOT NULL,
            blob BLOB NOT NULL,
            expires_day INTEGER NOT NULL,
            PRIMARY KEY (device_id, seq),
            UNIQUE (device_id, eid)
        ) WITHOUT ROWID"""
    )
    db.execute("CREATE INDEX mailbox_expiry ON mailbox(expires_day)")
    db.execute("CREATE TABLE relay_meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)")


@migrations(name="0002_prekeys")
def _m0002(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE signed_prekeys (
            device_id BLOB PRIMARY KEY REFERENCES devices(device_id) ON DELETE CASCADE,
            key_id INTEGER NOT NULL,
            public BLOB NOT NULL,
            sig BLOB NOT NULL
        )"""
    )
    db.execute(
        """
        CREATE TABLE one_time_prekeys (
            device_id BLOB NOT NULL REFERENCES devices(device_id) ON DELETE CASCADE,
            key_id INTEGER NOT NULL,
            public BLOB NOT NULL,
            PRIMARY KEY (device_id, key_id)
        ) WITHOUT ROWID"""
    )


@migrations(name="0003_accounts")
def _m0003(db: Database) -> None:
    db.execute("ALTER TABLE devices ADD COLUMN label BLOB")  # encrypted by the devices
    db.execute("ALTER TABLE devices ADD COLUMN last_seen_day INTEGER")
    db.execute(
        "UPDATE devices SET last_seen_day ="
        " (SELECT max(idle_day) FROM sessions WHERE sessions.device_id = devices.device_id)"
    )
    # Revoked device ids, at most MAX_REVOKED per account (the oldest go): such an id is
    # refused (device_revoked) instead of being registered again.
    db.execute(
        """
        CREATE TABLE revoked_devices (
            device_id BLOB PRIMARY KEY,
            account_id INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
            day INTEGER NOT NULL
        )"""
    )
    db.execute("CREATE INDEX revoked_devices_account ON revoked_devices(account_id)")
    # The sessions a revocation ended, until they would have ended anyway: a resume with
    # one is told why it fails.
    db.execute(
        """
        CREATE TABLE revoked_tokens (
            token_hash BLOB PRIMARY KEY,
            expires_day INTEGER NOT NULL
        )"""
    )


@migrations(name="0004_code_failures")
def _m0004(db: Database) -> None:
    # Wrong TOTP codes that came with a right password (or recovery code), per day: past
    # MAX_CODE_FAILURES in one day, no code is accepted until the next (online guessing
    # of a code by someone who has the password is then about 30 guesses a day at most).
    db.execute("ALTER TABLE accounts ADD COLUMN code_fail_day INTEGER")
    db.execute("ALTER TABLE accounts ADD COLUMN code_failures INTEGER NOT NULL DEFAULT 0")


@migrations(name="0005_code_failures_apart")
def _m0005(db: Database) -> None:
    # Wrong codes counted apart by who can make them: with the password and no session
    # (accounts.code_*), with the recovery code (accounts.recovery_*), and on a session
    # (sessions.code_*), so that a thief of the password alone cannot use up the
    # allowance the owner needs to change the password or recover.
    db.execute("ALTER TABLE accounts ADD COLUMN recovery_fail_day INTEGER")
    db.execute("ALTER TABLE accounts ADD COLUMN recovery_failures INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE sessions ADD COLUMN code_fail_day INTEGER")
    db.execute("ALTER TABLE sessions ADD COLUMN code_failures INTEGER NOT NULL DEFAULT 0")


@migrations(name="0006_mail_heads")
def _m0006(db: Database) -> None:
    # Each device's mailbox count and last sequence number, in its row (they were in the
    # relay's memory, which only one process can have): the group commit reads them under
    # a row lock, so the mailbox limit and the order of seqs hold for any number of writers.
    db.execute("ALTER TABLE devices ADD COLUMN mail_count INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE devices ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0")
    db.execute(
        "UPDATE devices SET mail_count = (SELECT count(*) FROM mailbox m WHERE m.device_id = devices.device_id),"
        " last_seq = (SELECT coalesce(max(seq), 0) FROM mailbox m WHERE m.device_id = devices.device_id)"
    )


@migrations(name="0007_kem_prekeys")
def _m0007(db: Database) -> None:
    # A device's ML-KEM-768 keys (post-quantum), public halves with their identity-key
    # signatures, as published: ``use`` 1 one-time KEM prekeys (deleted when claimed),
    # 2 the last-resort KEM prekey and 3 the envelope key (one of each per device, a new
    # one replaces it).
    db.execute(
        """
        CREATE TABLE kem_prekeys (
            device_id BLOB NOT NULL REFERENCES devices(device_id) ON DELETE CASCADE,
            use INTEGER NOT NULL,
            key_id INTEGER NOT NULL,
            public BLOB NOT NULL,
            sig BLOB NOT NULL,
            PRIMARY KEY (device_id, use, key_id)
        ) WITHOUT ROWID"""
    )


MAX_REVOKED = 64  # revoked device ids remembered per account
MAX_CODE_FAILURES = 10  # wrong codes a day after a right password, per account


def today() -> int:
    """Days since the epoch (UTC): the only clock granularity the relay stores."""
    return int(time.time() // 86400)


class NameTaken(Exception):
    pass


class UnknownDevice(Exception):
    pass


class DeviceRevoked(Exception):
    """The device id was revoked (it may not come back)."""


class TooManyDevices(Exception):
    pass


class PrekeyLimit(Exception):
    pass


class MailboxFull(Exception):
    pass


class StoreError(Exception):
    """The store cannot be opened or used (the message says why, for the operator)."""


class LastDevice(Exception):
    """Revoking this device would leave its account with none."""


class CredentialsChanged(Exception):
    """The credentials a proof was checked against were replaced meanwhile."""


class NoSession(Exception):
    """The session the request came with has ended meanwhile."""


@dataclass(frozen=True)
class Account:
    id: int
    name_mac: bytes
    salt: bytes
    kdf: tuple[int, int, int]
    auth_pub: bytes
    enc_pub: bytes
    identity_pub: bytes
    dh_pub: bytes
    keys_sig: bytes
    bundle: bytes
    recovery_auth_pub: bytes
    recovery_bundle: bytes
    totp_secret: bytes | None = field(default=None, repr=False)
    totp_last_step: int | None = None


@dataclass(frozen=True)
class NewAccount:
    name_mac: bytes
    salt: bytes
    kdf: tuple[int, int, int]
    auth_pub: bytes
    enc_pub: bytes
    identity_pub: bytes
    dh_pub: bytes
    keys_sig: bytes
    bundle: bytes
    recovery_auth_pub: bytes
    recovery_bundle: bytes


@dataclass(frozen=True)
class Session:
    account_id: int
    device_id: bytes


@dataclass(frozen=True)
class DeviceRow:
    """One device as its account's devices see it."""

    device_id: bytes
    sig: bytes
    created_day: int
    label: bytes | None
    last_seen_day: int | None
    active: bool  # it has a session still valid today


@dataclass(frozen=True)
class Credentials:
    """What a password (or recovery code) change replaces: the salt and KDF parameters,
    the auth key and the wrapped bundle; and the recovery pair, if given."""

    salt: bytes
    kdf: tuple[int, int, int]
    auth_pub: bytes
    bundle: bytes
    recovery: tuple[bytes, bytes] | None = None  # (recovery_auth_pub, recovery_bundle)


@dataclass(frozen=True)
class Stored:
    """An envelope newly committed to a mailbox."""

    device_id: bytes
    seq: int
    eid: bytes
    blob: bytes


@dataclass
class Posting:
    """The envelopes of one send, for a group commit: all stored, or none (``error``)."""

    items: Sequence[tuple[bytes, bytes, bytes]]  # (device_id, eid, blob)
    stored: list[Stored] = field(default_factory=list)
    error: Exception | None = None


# kem_prekeys.use: keyvault.kem.KemUse, the use each key's signature is for.
KEM_ONE_TIME = 1
KEM_LAST_RESORT = 2
KEM_ENVELOPE = 3


@dataclass(frozen=True)
class KemPrekey:
    """A device's ML-KEM-768 public key as the device published it."""

    use: int  # KEM_ONE_TIME, KEM_LAST_RESORT or KEM_ENVELOPE
    key_id: int
    public: bytes
    sig: bytes


@dataclass(frozen=True)
class Prekeys:
    """What a device publishes, all optional: its signed prekey (key_id, public, sig),
    one-time prekeys (key_id, public), one-time KEM prekeys (key_id, public, sig), and its
    last-resort KEM prekey and envelope key (key_id, public, sig; each replaces the one
    held). Signatures are checked by the service, not here."""

    signed: tuple[int, bytes, bytes] | None = None
    one_time: Sequence[tuple[int, bytes]] = ()
    kem_one_time: Sequence[tuple[int, bytes, bytes]] = ()
    kem_last_resort: tuple[int, bytes, bytes] | None = None
    envelope_key: tuple[int, bytes, bytes] | None = None


@dataclass(frozen=True)
class PrekeyCounts:
    """A device's prekeys at the relay: the ids of the single ones (None: none held) and
    how many one-time ones are left."""

    signed_id: int | None
    one_time_left: int
    kem_one_time_left: int
    kem_last_resort_id: int | None
    envelope_key_id: int | None


@dataclass(frozen=True)
class Bundle:
    """One device's claimed prekeys: its signed prekey, a one-time prekey (or None), and a
    KEM prekey (one-time, else the last-resort one; None if it has published neither)."""

    device_id: bytes
    spk_id: int
    spk: bytes
    spk_sig: bytes
    opk_id: int | None
    opk: bytes | None
    kem: KemPrekey | None = None

    @property
    def took_one_time(self) -> bool:
        """Whether the claim took a one-time key of this device (X25519 or KEM)."""
        return self.opk_id is not None or (self.kem is not None and self.kem.use == KEM_ONE_TIME)


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Engine(Protocol):
    """What RelayStore needs of a database."""

    name: str
    shared: bool  # other processes may write too
    threads: int  # worker threads that may use it at once
    lock_rows: str  # appended to a SELECT that locks its rows until the commit
    IntegrityError: type[Exception]

    def execute(self, sql: str, params: Sequence[object] = ()) -> Cursor: ...
    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None: ...
    def atomic(self) -> AbstractContextManager[object]:
        """A transaction (a savepoint inside one): committed, or rolled back on an exception."""
        ...
    def write(self) -> AbstractContextManager[object]:
        """The group commit's transaction (SQLite: BEGIN IMMEDIATE)."""
        ...
    def bound(self) -> AbstractContextManager[object]:
        """One connection for every statement of a whole store call."""
        ...
    def seal(self, column: str, account_id: int, value: bytes) -> bytes: ...
    def unseal(self, column: str, account_id: int, value: bytes) -> bytes: ...
    def announce(self, kind: str, values: Sequence[bytes]) -> None:
        """Tell the other processes (in the current transaction: on its commit)."""
        ...
    def transient(self, exc: BaseException) -> bool:
        """An error after which the same transaction may simply be tried again."""
        ...
    def close(self) -> None: ...


class SqliteEngine:
    """The SQLCipher file: the whole file is encrypted, and one process owns it."""

    name = "sqlite"
    shared = False
    threads = 1
    lock_rows = ""  # BEGIN IMMEDIATE holds the only write lock there is
    IntegrityError = IntegrityError

    def __init__(self, path: Path, key: bytes, *, durable: bool = True) -> None:
        self.db = open_encrypted(path, key, durable=durable)
        self.conn = self.db.conn
        migrations.apply(self.db)

    def execute(self, sql: str, params: Sequence[object] = ()) -> Cursor:
        cur: Cursor = self.conn.execute(sql, params)
        return cur

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self.conn.executemany(sql, rows)

    def atomic(self) -> AbstractContextManager[object]:
        return self.db.atomic()

    @contextmanager
    def write(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    @contextmanager
    def bound(self) -> Iterator[None]:
        yield

    def seal(self, column: str, account_id: int, value: bytes) -> bytes:
        return value  # the file is encrypted whole

    def unseal(self, column: str, account_id: int, value: bytes) -> bytes:
        return value

    def announce(self, kind: str, values: Sequence[bytes]) -> None:
        pass  # no other process

    def transient(self, exc: BaseException) -> bool:
        return False  # one writer: no deadlock, no serialization failure

    def close(self) -> None:
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()


def open_sqlite(path: Path, key: bytes, *, durable: bool = True) -> RelayStore:
    return RelayStore(SqliteEngine(path, key, durable=durable))


# When a session would end anyway (its idle limit or its fixed expiry, whichever is first).
_SESSION_END = "CASE WHEN expires_day < idle_day + ? THEN expires_day ELSE idle_day + ? END"


_ACCOUNT_COLS = (
    "id, salt, kdf_t, kdf_m, kdf_p, auth_pub, enc_pub, identity_pub, dh_pub, keys_sig, bundle,"
    " recovery_auth_pub, recovery_bundle, name_mac, totp_secret, totp_last_step"
)


def _account_row(row: Sequence[object]) -> Account:
    r = list(row)
    return Account(
        id=int(r[0]),  # type: ignore[call-overload]
        salt=r[1],  # type: ignore[arg-type]
        kdf=(r[2], r[3], r[4]),  # type: ignore[arg-type]
        auth_pub=r[5],  # type: ignore[arg-type]
        enc_pub=r[6],  # type: ignore[arg-type]
        identity_pub=r[7],  # type: ignore[arg-type]
        dh_pub=r[8],  # type: ignore[arg-type]
        keys_sig=r[9],  # type: ignore[arg-type]
        bundle=r[10],  # type: ignore[arg-type]
        recovery_auth_pub=r[11],  # type: ignore[arg-type]
        recovery_bundle=r[12],  # type: ignore[arg-type]
        name_mac=bytes(r[13]),  # type: ignore[call-overload]
        totp_secret=None if r[14] is None else bytes(r[14]),  # type: ignore[call-overload]
        totp_last_step=None if r[15] is None else int(r[15]),  # type: ignore[call-overload]
    )


class RelayStore:
    """Synchronous relay storage over one engine (SQLite or PostgreSQL): every method runs
    in a worker thread, never on the event loop. The SQL is written once, in what both
    engines understand (``?`` placeholders, ``ON CONFLICT``, ``RETURNING``)."""

    def __init__(self, engine: Engine) -> None:
        self.e = engine
        self.x = engine.execute

    @property
    def conn(self) -> Any:
        """The SQLite connection (tests and tools of the file store)."""
        return self.e.conn  # type: ignore[attr-defined]

    @property
    def shared(self) -> bool:
        """Whether other relay processes may share this store (PostgreSQL)."""
        return self.e.shared

    def close(self) -> None:
        self.e.close()

    def _account(self, row: Sequence[object]) -> Account:
        a = _account_row(row)
        e = self.e
        return dataclasses.replace(
            a, bundle=e.unseal("bundle", a.id, a.bundle),
            recovery_bundle=e.unseal("recovery_bundle", a.id, a.recovery_bundle),
            totp_secret=None if a.totp_secret is None else e.unseal("totp_secret", a.id, a.totp_secret),
        )

    def query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        """Rows of a query (for tests and tools)."""
        cur = self.x(sql, args)
        return [tuple(r) for r in cur.fetchall()] if getattr(cur, "description", None) is not None else []

    # ---- relay metadata ----------------------------------------------------------
    def meta(self, key: str) -> bytes | None:
        row = self.x("SELECT value FROM relay_meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def set_meta(self, key: str, value: bytes) -> None:
        self.x(
            "INSERT INTO relay_meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # ---- accounts and devices ----------------------------------------------------
    def create_account(self, new: NewAccount, device_id: bytes, device_sig: bytes) -> int:
        """Create an account with its first device; NameTaken if the name exists."""
        e = self.e
        with e.atomic():
            try:
                with e.atomic():
                    (account_id,) = self.x(
                        "INSERT INTO accounts (name_mac, salt, kdf_t, kdf_m, kdf_p, auth_pub,"
                        " enc_pub, identity_pub, dh_pub, keys_sig, bundle, recovery_auth_pub,"
                        " recovery_bundle, created_day) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
                        (
                            new.name_mac, new.salt, *new.kdf, new.auth_pub, new.enc_pub,
                            new.identity_pub, new.dh_pub, new.keys_sig, b"", new.recovery_auth_pub,
                            b"", today(),
                        ),
                    ).fetchone()
            except e.IntegrityError:
                raise NameTaken() from None
            # Sealed under the relay key (bound to the account's id) where the engine
            # does not encrypt the whole file.
            self.x(
                "UPDATE accounts SET bundle = ?, recovery_bundle = ? WHERE id = ?",
                (e.seal("bundle", account_id, new.bundle), e.seal("recovery_bundle", account_id, new.recovery_bundle),
                 account_id),
            )
            self._insert_device(account_id, device_id, device_sig)
        return int(account_id)

    def account(self, name_mac: bytes) -> Account | None:
        row = self.x(
            f"SELECT {_ACCOUNT_COLS} FROM accounts WHERE name_mac = ?", (name_mac,)
        ).fetchone()
        return None if row is None else self._account(row)

    def account_by_id(self, account_id: int) -> Account | None:
        row = self.x(
            f"SELECT {_ACCOUNT_COLS} FROM accounts WHERE id = ?", (account_id,)
        ).fetchone()
        return None if row is None else self._account(row)

    def identity_of(self, account_id: int) -> bytes:
        (ident,) = self.x("SELECT identity_pub FROM accounts WHERE id = ?", (account_id,)).fetchone()
        return bytes(ident)

    def _insert_device(self, account_id: int, device_id: bytes, sig: bytes) -> None:
        if self._revoked(device_id):
            raise DeviceRevoked()
        try:
            with self.e.atomic():
                # last_seq starts anywhere: it tells nobody how much mail a device has had.
                self.x(
                    "INSERT INTO devices (device_id, account_id, sig, created_day, last_seq)"
                    " VALUES (?,?,?,?,?)",
                    (device_id, account_id, sig, today(), secrets.randbelow(1 << 40)),
                )
        except self.e.IntegrityError:
            raise UnknownDevice() from None  # the id belongs to another account

    def _revoked(self, device_id: bytes) -> bool:
        row = self.x("SELECT 1 FROM revoked_devices WHERE device_id = ?", (device_id,)).fetchone()
        return row is not None

    def _ensure_device(self, account_id: int, device_id: bytes, sig: bytes, limit: int) -> None:
        """Register ``device_id`` for the account unless it is known; raises
        DeviceRevoked, UnknownDevice (another account's) or TooManyDevices. The account's
        row is locked first (PostgreSQL): concurrent logins elsewhere cannot both pass the
        count."""
        self.x(f"SELECT 1 FROM accounts WHERE id = ?{self.e.lock_rows}", (account_id,))
        if self._revoked(device_id):
            raise DeviceRevoked()
        row = self.x("SELECT account_id FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        if row is not None:
            if row[0] != account_id:
                raise UnknownDevice()
            return
        (count,) = self.x(
            "SELECT count(*) FROM devices WHERE account_id = ?", (account_id,)
        ).fetchone()
        if count >= limit:
            raise TooManyDevices()
        self._insert_device(account_id, device_id, sig)

    def ensure_device(self, account_id: int, device_id: bytes, sig: bytes, limit: int) -> bool:
        """Register ``device_id`` for the account unless it is known; False if over limit
        (UnknownDevice for another account's id, DeviceRevoked for a revoked one)."""
        with self.e.atomic():
            try:
                self._ensure_device(account_id, device_id, sig, limit)
            except TooManyDevices:
                return False
            return True

    def devices(self, account_id: int) -> list[tuple[bytes, bytes, int]]:
        """(device_id, signature, created_day) of each device, oldest first."""
        return [
            (bytes(r[0]), bytes(r[1]), int(r[2]))
            for r in self.x(
                "SELECT device_id, sig, created_day FROM devices WHERE account_id = ?"
                " ORDER BY created_day, rowid",
                (account_id,),
            )
        ]

    def device_list(self, account_id: int) -> list[DeviceRow]:
        """Each device of the account as its devices see it, oldest first."""
        day = today()
        return [
            DeviceRow(
                device_id=bytes(r[0]), sig=bytes(r[1]), created_day=int(r[2]),
                label=None if r[3] is None else bytes(r[3]),
                last_seen_day=None if r[4] is None else int(r[4]), active=bool(r[5]),
            )
            for r in self.x(
                "SELECT d.device_id, d.sig, d.created_day, d.label, d.last_seen_day, EXISTS ("
                " SELECT 1 FROM sessions s WHERE s.device_id = d.device_id"
                " AND s.idle_day + ? >= ? AND s.expires_day >= ?)"
                " FROM devices d WHERE d.account_id = ? ORDER BY d.created_day, d.rowid",
                (SESSION_IDLE_DAYS, day, day, account_id),
            )
        ]

    def rename_device(self, account_id: int, device_id: bytes, label: bytes) -> bool:
        """Store a device's (encrypted) name; False if it is not one of the account's."""
        cur = self.x(
            "UPDATE devices SET label = ? WHERE device_id = ? AND account_id = ?",
            (label, device_id, account_id),
        )
        return int(cur.rowcount) == 1

    def remove_device(self, device_id: bytes) -> None:
        """Forget a device, its sessions and its mailbox (announced as "device")."""
        with self.e.atomic():
            self.x("DELETE FROM devices WHERE device_id = ?", (device_id,))
            self.e.announce("device", [device_id])

    def _revocable(self, account_id: int, device_id: bytes, allow_last: bool) -> None:
        row = self.x(
            "SELECT 1 FROM revoked_devices WHERE device_id = ? AND account_id = ?", (device_id, account_id)
        ).fetchone()
        if row is not None:
            raise DeviceRevoked()
        row = self.x(
            "SELECT 1 FROM devices WHERE device_id = ? AND account_id = ?", (device_id, account_id)
        ).fetchone()
        if row is None:
            raise UnknownDevice()
        (count,) = self.x(
            "SELECT count(*) FROM devices WHERE account_id = ?", (account_id,)
        ).fetchone()
        if count <= 1 and not allow_last:
            raise LastDevice()

    def check_revocable(self, account_id: int, device_id: bytes, allow_last: bool) -> None:
        """Raise DeviceRevoked, UnknownDevice or LastDevice if ``revoke_device`` would."""
        self._revocable(account_id, device_id, allow_last)

    def revoke_device(self, account_id: int, device_id: bytes, allow_last: bool,
                      token_hash: bytes | None = None, auth_pub: bytes | None = None) -> None:
        """Revoke one of the account's devices, in one transaction: remember its id (at
        most MAX_REVOKED per account, the oldest go) and its sessions' token hashes (until
        the sessions would have ended), and delete it (its sessions, mailbox and prekeys
        go with it). Raises as ``check_revocable`` does, changing nothing."""
        day = today()
        with self.e.atomic():
            self._check_proved(account_id, token_hash, auth_pub)
            self._revocable(account_id, device_id, allow_last)
            self.x(
                "INSERT INTO revoked_devices (device_id, account_id, day) VALUES (?,?,?)"
                " ON CONFLICT (device_id) DO UPDATE SET account_id = excluded.account_id, day = excluded.day",
                (device_id, account_id, day),
            )
            self.x(
                "INSERT INTO revoked_tokens (token_hash, expires_day)"
                f" SELECT token_hash, {_SESSION_END} FROM sessions"
                f" WHERE device_id = ? AND {_SESSION_END} >= ? ON CONFLICT DO NOTHING",
                (SESSION_IDLE_DAYS, SESSION_IDLE_DAYS, device_id, SESSION_IDLE_DAYS, SESSION_IDLE_DAYS, day),
            )
            self.x("DELETE FROM devices WHERE device_id = ?", (device_id,))
            self.e.announce("revoked", [device_id])
            self.x(
                "DELETE FROM revoked_devices WHERE account_id = ? AND rowid NOT IN"
                " (SELECT rowid FROM revoked_devices WHERE account_id = ?"
                " ORDER BY day DESC, rowid DESC LIMIT ?)",
                (account_id, account_id, MAX_REVOKED),
            )

    # ---- credentials and the second factor ----------------------------------------
    def _set_credentials(self, account_id: int, creds: Credentials) -> None:
        self.x(
            # A new password: the wrong codes counted against the old one are forgotten.
            "UPDATE accounts SET salt = ?, kdf_t = ?, kdf_m = ?, kdf_p = ?, auth_pub = ?, bundle = ?,"
            " code_failures = 0 WHERE id = ?",
            (creds.salt, *creds.kdf, creds.auth_pub, self.e.seal("bundle", account_id, creds.bundle), account_id),
        )
        if creds.recovery is not None:
            self.x(
                "UPDATE accounts SET recovery_auth_pub = ?, recovery_bundle = ? WHERE id = ?",
                (creds.recovery[0], self.e.seal("recovery_bundle", account_id, creds.recovery[1]), account_id),
            )

    def change_password(self, account_id: int, creds: Credentials, token_hash: bytes, end_sessions: bool,
                        auth_pub: bytes | None = None) -> None:
        """Replace the password's credentials, in one transaction with, if
        ``end_sessions``, the end of every session of the account but ``token_hash``'s.
        NoSession or CredentialsChanged (nothing changed) as ``_check_proved``."""
        with self.e.atomic():
            self._check_proved(account_id, token_hash, auth_pub)
            self._set_credentials(account_id, creds)
            if end_sessions:
                self.x(
                    "DELETE FROM sessions WHERE account_id = ? AND token_hash != ?", (account_id, token_hash)
                )
                self.e.announce("account", [account_id.to_bytes(8, "big"), token_hash])

    def recover(
        self,
        account_id: int,
        creds: Credentials,
        device: tuple[bytes, bytes],
        device_limit: int,
        prekeys: Prekeys | None,
        prekey_limits: tuple[int, int],
        token_hash: bytes,
        proved: tuple[bytes, bytes | None] | None = None,
    ) -> int:
        """A recovery, in one transaction: the new credentials, the end of every session
        of the account, ``device`` (id, certificate) registered unless known, its prekeys
        stored, and a session for it (its expiry day is returned). Raises DeviceRevoked,
        UnknownDevice, TooManyDevices or PrekeyLimit, and then nothing has changed.
        ``proved``: the recovery auth key and TOTP secret the recovery proof was checked
        against; CredentialsChanged if either is not the account's now (a newer recovery
        code, or MFA turned on or changed, since)."""
        with self.e.atomic():
            if proved is not None:
                row = self.x(
                    f"SELECT recovery_auth_pub, totp_secret FROM accounts WHERE id = ?{self.e.lock_rows}",
                    (account_id,),
                ).fetchone()
                now = None if row is None else (
                    bytes(row[0]), None if row[1] is None else self.e.unseal("totp_secret", account_id, bytes(row[1])))
                if now != proved:
                    raise CredentialsChanged()
            self._set_credentials(account_id, creds)
            self.x("DELETE FROM sessions WHERE account_id = ?", (account_id,))
            self.e.announce("account", [account_id.to_bytes(8, "big"), token_hash])
            device_id, sig = device
            self._ensure_device(account_id, device_id, sig, device_limit)
            if prekeys is not None and self.publish_prekeys(device_id, prekeys, prekey_limits) is None:
                raise PrekeyLimit()
            return self.create_session(token_hash, account_id, device_id)

    def advance_totp(
        self, account_id: int, secret: bytes, step: int | None, counter: str = "password",
        token_hash: bytes | None = None,
    ) -> bool:
        """Record ``step`` as the last accepted TOTP step of the account, if it is later
        than the one recorded and the secret is still ``secret`` (compare-and-set: a code
        is accepted once, whoever presents it), and the ``counter`` has not had
        MAX_CODE_FAILURES wrong codes today. False if not (``step`` None: the code was
        wrong), and then a wrong code is counted. One transaction. ``counter``:
        "password" (a proof without a session), "recovery", or "session" (the session
        ``token_hash``'s own count)."""
        day = today()
        key: object
        if counter == "session":
            table, cols, key = "sessions", ("code_fail_day", "code_failures"), token_hash
            where = "token_hash = ?"
        else:
            table, key, where = "accounts", account_id, "id = ?"
            cols = ("recovery_fail_day", "recovery_failures") if counter == "recovery" else (
                "code_fail_day", "code_failures")
        with self.e.atomic():
            row = self.x(f"SELECT {cols[0]}, {cols[1]} FROM {table} WHERE {where}{self.e.lock_rows}", (key,)).fetchone()
            locked = row is None or (row[0] == day and row[1] >= MAX_CODE_FAILURES)
            if step is not None and not locked:
                cur = self.x(
                    "UPDATE accounts SET totp_last_step = ? WHERE id = ? AND totp_secret IS NOT NULL"
                    " AND totp_secret = ? AND (totp_last_step IS NULL OR totp_last_step < ?)",
                    (step, account_id, self.e.seal("totp_secret", account_id, secret), step),
                )
                if int(cur.rowcount) == 1:
                    return True
            self.x(
                f"UPDATE {table} SET {cols[1]} = CASE WHEN {cols[0]} = ? THEN {cols[1]} + 1"
                f" ELSE 1 END, {cols[0]} = ? WHERE {where}",
                (day, day, key),
            )
            return False

    def touch_account(self, account_id: int) -> None:
        """A write of nothing, in a transaction: what a failed password proof does for an
        account with MFA, so that it takes as long as a right password with a wrong code
        (which writes its count), and the time does not tell the two apart."""
        with self.e.atomic():
            self.x("UPDATE accounts SET code_failures = code_failures WHERE id = ?", (account_id,))

    def _check_proved(self, account_id: int, token_hash: bytes | None, auth_pub: bytes | None) -> None:
        """Inside a transaction: the session a change was asked on still exists
        (NoSession), and the auth key it was proved with is still the account's
        (CredentialsChanged): a recovery or password change that came first wins."""
        if token_hash is not None and self.x(
            "SELECT 1 FROM sessions WHERE token_hash = ? AND account_id = ?", (token_hash, account_id)
        ).fetchone() is None:
            raise NoSession()
        if auth_pub is not None:
            row = self.x(f"SELECT auth_pub FROM accounts WHERE id = ?{self.e.lock_rows}", (account_id,)).fetchone()
            if row is None or bytes(row[0]) != auth_pub:
                raise CredentialsChanged()

    def enable_totp(self, account_id: int, secret: bytes, step: int, token_hash: bytes | None = None,
                    auth_pub: bytes | None = None) -> bool:
        """Turn TOTP on with the step of the code that proved the secret; False if it is
        on already. (``token_hash``, ``auth_pub``: as ``_check_proved``.)"""
        with self.e.atomic():
            self._check_proved(account_id, token_hash, auth_pub)
            cur = self.x(
                "UPDATE accounts SET totp_secret = ?, totp_last_step = ? WHERE id = ? AND totp_secret IS NULL",
                (self.e.seal("totp_secret", account_id, secret), step, account_id),
            )
            return int(cur.rowcount) == 1

    def disable_totp(self, account_id: int, secret: bytes, token_hash: bytes | None = None,
                     auth_pub: bytes | None = None) -> bool:
        """Turn TOTP off; False if it is not on with ``secret`` (off, or changed)."""
        with self.e.atomic():
            self._check_proved(account_id, token_hash, auth_pub)
            cur = self.x(
                "UPDATE accounts SET totp_secret = NULL, totp_last_step = NULL WHERE id = ? AND totp_secret = ?",
                (account_id, self.e.seal("totp_secret", account_id, secret)),
            )
            return int(cur.rowcount) == 1

    # ---- sessions -----------------------------------------------------------------
    def create_session(
        self, token_hash: bytes, account_id: int, device_id: bytes, auth_pub: bytes | None = None
    ) -> int:
        """Open a session; with ``auth_pub``, only if that is still the account's auth key
        (the one the login was proved with: CredentialsChanged if a password change or a
        recovery replaced it meanwhile, since that ended every session it meant to)."""
        day = today()
        expires = day + SESSION_MAX_DAYS
        with self.e.atomic():
            self._check_proved(account_id, None, auth_pub)
            try:
                with self.e.atomic():
                    self.x(
                        "INSERT INTO sessions (token_hash, account_id, device_id, idle_day, expires_day)"
                        " VALUES (?,?,?,?,?)",
                        (token_hash, account_id, device_id, day, expires),
                    )
            except self.e.IntegrityError:  # the device went (removed or revoked) since it was checked
                raise DeviceRevoked() if self._revoked(device_id) else UnknownDevice() from None
            self.x("UPDATE devices SET last_seen_day = ? WHERE device_id = ?", (day, device_id))
        return expires

    def session(self, token_hash: bytes) -> Session | None:
        """The live session with this token hash (refreshing its idle day), or None."""
        day = today()
        row = self.x(
            "SELECT account_id, device_id, idle_day, expires_day FROM sessions"
            " WHERE token_hash = ?",
            (token_hash,),
        ).fetchone()
        if row is None:
            return None
        if row[2] + SESSION_IDLE_DAYS < day or row[3] < day:
            self.x("DELETE FROM sessions WHERE token_hash = ?", (token_hash,))
            return None
        if row[2] != day:
            with self.e.atomic():
                self.x(
                    "UPDATE sessions SET idle_day = ? WHERE token_hash = ?", (day, token_hash)
                )
                self.x("UPDATE devices SET last_seen_day = ? WHERE device_id = ?", (day, row[1]))
        return Session(account_id=int(row[0]), device_id=bytes(row[1]))

    def delete_session(self, token_hash: bytes) -> None:
        """End one session (its connections elsewhere close: announced as "token")."""
        with self.e.atomic():
            row = self.x("DELETE FROM sessions WHERE token_hash = ? RETURNING device_id", (token_hash,)).fetchone()
            if row is not None:
                self.e.announce("token", [token_hash, bytes(row[0])])

    def token_revoked(self, token_hash: bytes) -> bool:
        """Whether the token's session was ended by a revocation of its device."""
        row = self.x("SELECT 1 FROM revoked_tokens WHERE token_hash = ?", (token_hash,)).fetchone()
        return row is not None

    # ---- mailboxes ----------------------------------------------------------------
    def commit_mail(self, postings: Sequence[Posting], acks: Sequence[tuple[bytes, Sequence[bytes]]],
                    limit: int) -> None:
        """One group commit, in one write transaction: store each posting's envelopes
        (all or none of a posting: ``error`` UnknownDevice or MailboxFull, else ``stored``),
        delete the acknowledged (device_id, eids). Each device's envelope count and last
        sequence number live in its row, read under a row lock (PostgreSQL: FOR NO KEY
        UPDATE, in device-id order, so that processes sharing the database never deadlock
        and never give two envelopes one seq): the mailbox limit holds across processes.
        Few statements per batch, whatever its size: the commit thread gives up the GIL
        around each, and getting it back from a busy event loop is what costs under load."""
        e = self.e
        with e.write():
            heads = self._lock_heads({d for w in postings for d, _, _ in w.items} | {d for d, _ in acks})
            before = {d: tuple(h) for d, h in heads.items()}
            rows: list[tuple[bytes, int, bytes, bytes]] = []
            seen: set[tuple[bytes, bytes]] = set()
            for w in postings:
                if any(d not in heads for d, _, _ in w.items):
                    w.error = UnknownDevice()
                    continue
                fresh: dict[tuple[bytes, bytes], bytes] = {}
                for d, eid, blob in w.items:
                    if (d, eid) not in seen and (d, eid) not in fresh:
                        fresh[(d, eid)] = blob
                adding = Counter(d for d, _ in fresh)
                if limit and any(heads[d][0] + n > limit for d, n in adding.items()):
                    # Perhaps a retry of envelopes already stored: those do not count.
                    taken = self._stored_pairs(list(fresh))
                    for pair in taken:
                        del fresh[pair]
                    seen.update(taken)
                    adding = Counter(d for d, _ in fresh)
                    if any(heads[d][0] + n > limit for d, n in adding.items()):
                        w.error = MailboxFull()
                        continue
                for (d, eid), blob in fresh.items():
                    head = heads[d]
                    head[0] += 1
                    head[1] += 1
                    rows.append((d, head[1], eid, blob))
                    w.stored.append(Stored(d, head[1], eid, blob))
                seen.update(fresh)  # a later posting in this batch with the same envelope
            if rows:
                inserted = self._insert_mail(rows)
                if len(inserted) != len(rows):
                    # Retried sends: envelopes a mailbox already held were not inserted again
                    # (their fresh sequence numbers are absent), so that they are neither
                    # counted nor pushed twice. Rare: a lost answer to a send.
                    for d, seq, _, _ in rows:
                        if (d, seq) not in inserted:
                            heads[d][0] -= 1
                    for w in postings:
                        w.stored = [st for st in w.stored if (st.device_id, st.seq) in inserted]
            if acks:
                pairs = [(d, eid) for d, eids in acks if d in heads for eid in dict.fromkeys(eids)]
                for d, n in self._delete_mail(pairs).items():
                    heads[d][0] = max(0, heads[d][0] - n)
            self._save_heads({d: h for d, h in heads.items() if tuple(h) != before[d]})
            e.announce("mail", list(dict.fromkeys(st.device_id for w in postings for st in w.stored)))

    def _lock_heads(self, device_ids: set[bytes]) -> dict[bytes, list[int]]:
        """[envelopes held, last seq] of each of these devices that exists, locked."""
        ids = sorted(device_ids)
        heads: dict[bytes, list[int]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for r in self.x(
                f"SELECT device_id, mail_count, last_seq FROM devices WHERE device_id IN ({marks})"
                f" ORDER BY device_id{self.e.lock_rows}",
                chunk,
            ):
                heads[bytes(r[0])] = [int(r[1]), int(r[2])]
        return heads

    def _save_heads(self, heads: dict[bytes, list[int]]) -> None:
        items = list(heads.items())
        for start in range(0, len(items), 300):
            chunk = items[start : start + 300]
            values = ",".join(["(?, CAST(? AS BIGINT), CAST(? AS BIGINT))"] * len(chunk))
            self.x(
                f"UPDATE devices SET mail_count = v.column2, last_seq = v.column3 FROM (VALUES {values}) AS v"
                " WHERE devices.device_id = v.column1",
                [x for d, (count, seq) in chunk for x in (d, count, seq)],
            )

    def _stored_pairs(self, pairs: Sequence[tuple[bytes, bytes]]) -> set[tuple[bytes, bytes]]:
        """Which of these (device_id, eid) pairs a mailbox already holds (retried sends)."""
        found: set[tuple[bytes, bytes]] = set()
        for start in range(0, len(pairs), 400):
            chunk = pairs[start : start + 400]
            values = ",".join(["(?,?)"] * len(chunk))
            found.update(
                (bytes(r[0]), bytes(r[1]))
                for r in self.x(
                    f"SELECT device_id, eid FROM mailbox WHERE (device_id, eid) IN (VALUES {values})",
                    [x for key in chunk for x in key],
                )
            )
        return found

    def _insert_mail(self, rows: Sequence[tuple[bytes, int, bytes, bytes]]) -> set[tuple[bytes, int]]:
        """Insert (device_id, seq, eid, blob) rows; the (device_id, seq) of those inserted
        (an envelope a mailbox holds already is not)."""
        expires = today() + MAIL_TTL_DAYS
        inserted: set[tuple[bytes, int]] = set()
        for start in range(0, len(rows), 200):
            chunk = rows[start : start + 200]
            values = ",".join(["(?,?,?,?,?)"] * len(chunk))
            params = [x for d, seq, eid, blob in chunk for x in (d, seq, eid, blob, expires)]
            inserted.update(
                (bytes(r[0]), int(r[1]))
                for r in self.x(
                    f"INSERT INTO mailbox (device_id, seq, eid, blob, expires_day) VALUES {values}"
                    " ON CONFLICT DO NOTHING RETURNING device_id, seq",
                    params,
                )
            )
        return inserted

    def _delete_mail(self, pairs: Sequence[tuple[bytes, bytes]]) -> Counter[bytes]:
        """Delete delivered envelopes, given as (device_id, eid); how many went per device."""
        deleted: Counter[bytes] = Counter()
        for start in range(0, len(pairs), 400):
            chunk = pairs[start : start + 400]
            values = ",".join(["(?,?)"] * len(chunk))
            deleted.update(
                bytes(r[0])
                for r in self.x(
                    f"DELETE FROM mailbox WHERE (device_id, eid) IN (VALUES {values}) RETURNING device_id",
                    [x for pair in chunk for x in pair],
                )
            )
        return deleted

    def fetch(self, device_id: bytes, after_seq: int, limit: int) -> list[Stored]:
        return [
            Stored(device_id, int(r[0]), bytes(r[1]), bytes(r[2]))
            for r in self.x(
                "SELECT seq, eid, blob FROM mailbox WHERE device_id = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (device_id, after_seq, limit),
            )
        ]

    # ---- prekeys -------------------------------------------------------------------
    def prekey_status(self, device_id: bytes) -> PrekeyCounts:
        """What the relay holds of a device's prekeys (all None and 0 for an unknown device)."""
        row = self.x(
            "SELECT (SELECT key_id FROM signed_prekeys WHERE device_id = ?),"
            " (SELECT count(*) FROM one_time_prekeys WHERE device_id = ?),"
            " (SELECT count(*) FROM kem_prekeys WHERE device_id = ? AND use = ?),"
            " (SELECT max(key_id) FROM kem_prekeys WHERE device_id = ? AND use = ?),"
            " (SELECT max(key_id) FROM kem_prekeys WHERE device_id = ? AND use = ?)",
            (device_id, device_id, device_id, KEM_ONE_TIME, device_id, KEM_LAST_RESORT, device_id, KEM_ENVELOPE),
        ).fetchone()
        return PrekeyCounts(
            signed_id=None if row[0] is None else int(row[0]), one_time_left=int(row[1]),
            kem_one_time_left=int(row[2]), kem_last_resort_id=None if row[3] is None else int(row[3]),
            envelope_key_id=None if row[4] is None else int(row[4]),
        )

    def publish_prekeys(self, device_id: bytes, prekeys: Prekeys, limits: tuple[int, int]) -> PrekeyCounts | None:
        """Store a device's prekeys, in one transaction under the device's row lock; None
        (nothing stored) if it would hold more than ``limits`` = (one-time prekeys,
        one-time KEM prekeys), counting every key of the upload (repeated ids too). A
        one-time key id the device holds already replaces nothing (it is ignored); a
        signed prekey, last-resort KEM prekey or envelope key replaces the one held."""
        with self.e.atomic():
            self.x(f"SELECT 1 FROM devices WHERE device_id = ?{self.e.lock_rows}", (device_id,))
            held = self.prekey_status(device_id)
            if (held.one_time_left + len(prekeys.one_time) > limits[0]
                    or held.kem_one_time_left + len(prekeys.kem_one_time) > limits[1]):
                return None
            if prekeys.signed is not None:
                self.x(
                    "INSERT INTO signed_prekeys (device_id, key_id, public, sig) VALUES (?,?,?,?)"
                    " ON CONFLICT (device_id) DO UPDATE SET key_id = excluded.key_id,"
                    " public = excluded.public, sig = excluded.sig",
                    (device_id, *prekeys.signed),
                )
            if prekeys.one_time:
                self.e.executemany(
                    "INSERT INTO one_time_prekeys (device_id, key_id, public) VALUES (?,?,?) ON CONFLICT DO NOTHING",
                    [(device_id, k, pub) for k, pub in prekeys.one_time],
                )
            kem = [(device_id, KEM_ONE_TIME, *k) for k in prekeys.kem_one_time]
            for use, single in ((KEM_LAST_RESORT, prekeys.kem_last_resort), (KEM_ENVELOPE, prekeys.envelope_key)):
                if single is not None:
                    self.x("DELETE FROM kem_prekeys WHERE device_id = ? AND use = ?", (device_id, use))
                    kem.append((device_id, use, *single))
            if kem:
                self.e.executemany(
                    "INSERT INTO kem_prekeys (device_id, use, key_id, public, sig) VALUES (?,?,?,?,?)"
                    " ON CONFLICT DO NOTHING",
                    kem,
                )
            return self.prekey_status(device_id)

    def claim_prekeys(
        self, account_id: int, device_ids: Sequence[bytes], one_time: Collection[bytes] | None = None
    ) -> list[Bundle]:
        """Bundles for the account's listed devices, taking from each device in
        ``one_time`` (all of them if None) its oldest (lowest id) one-time prekey and
        one-time KEM prekey, deleted as they are handed out; a device that gives no
        one-time KEM prekey (none left, or not in ``one_time``) gives its last-resort KEM
        prekey, which stays. Devices of other accounts or without a signed prekey are left
        out (and give nothing)."""
        out: list[Bundle] = []
        wanted = list(dict.fromkeys(device_ids))
        with self.e.atomic():
            if self.e.lock_rows and wanted:
                # The devices' rows first, in id order (PostgreSQL): concurrent claims
                # neither deadlock on the order a claimer chose nor miss a prekey that
                # another claim took meanwhile (each waits, then sees what is left).
                self.x(f"SELECT 1 FROM devices WHERE device_id IN ({','.join('?' * len(wanted))})"
                       f" ORDER BY device_id{self.e.lock_rows}", wanted)
            for device_id in wanted:
                row = self.x(
                    "SELECT s.key_id, s.public, s.sig FROM signed_prekeys s JOIN devices d"
                    " ON d.device_id = s.device_id WHERE s.device_id = ? AND d.account_id = ?",
                    (device_id, account_id),
                ).fetchone()
                if row is None:
                    continue
                opk: Any = None
                kem: Any = None
                if one_time is None or device_id in one_time:
                    opk = self.x(
                        "DELETE FROM one_time_prekeys WHERE device_id = ? AND key_id ="
                        " (SELECT min(key_id) FROM one_time_prekeys WHERE device_id = ?)"
                        " RETURNING key_id, public",
                        (device_id, device_id),
                    ).fetchone()
                    kem = self.x(
                        "DELETE FROM kem_prekeys WHERE device_id = ? AND use = ? AND key_id ="
                        " (SELECT min(key_id) FROM kem_prekeys WHERE device_id = ? AND use = ?)"
                        " RETURNING use, key_id, public, sig",
                        (device_id, KEM_ONE_TIME, device_id, KEM_ONE_TIME),
                    ).fetchone()
                if kem is None:
                    kem = self.x(
                        "SELECT use, key_id, public, sig FROM kem_prekeys WHERE device_id = ? AND use = ?"
                        " ORDER BY key_id DESC LIMIT 1",
                        (device_id, KEM_LAST_RESORT),
                    ).fetchone()
                out.append(Bundle(
                    device_id, int(row[0]), bytes(row[1]), bytes(row[2]),
                    None if opk is None else int(opk[0]), None if opk is None else bytes(opk[1]),
                    None if kem is None else KemPrekey(int(kem[0]), int(kem[1]), bytes(kem[2]), bytes(kem[3])),
                ))
        return out

    def envelope_keys(self, account_id: int) -> list[tuple[bytes, int, bytes, bytes]]:
        """(device_id, key_id, public, sig) of the envelope key of each of the account's
        devices that has published one, oldest device first."""
        return [
            (bytes(r[0]), int(r[1]), bytes(r[2]), bytes(r[3]))
            for r in self.x(
                "SELECT k.device_id, k.key_id, k.public, k.sig FROM kem_prekeys k JOIN devices d"
                " ON d.device_id = k.device_id WHERE d.account_id = ? AND k.use = ?"
                " ORDER BY d.created_day, d.rowid",
                (account_id, KEM_ENVELOPE),
            )
        ]

    def expire(self) -> int:
        """Drop undelivered mail past its expiry day (keeping the devices' counts right),
        dead sessions, and the revoked tokens of sessions that would have died by now."""
        day = today()
        with self.e.write():
            due = {bytes(r[0]) for r in self.x("SELECT DISTINCT device_id FROM mailbox WHERE expires_day < ?", (day,))}
            heads = self._lock_heads(due)
            gone: Counter[bytes] = Counter(
                bytes(r[0]) for r in self.x("DELETE FROM mailbox WHERE expires_day < ? RETURNING device_id", (day,))
            )
            for d, n in gone.items():
                if d in heads:
                    heads[d][0] = max(0, heads[d][0] - n)
            self._save_heads({d: heads[d] for d in gone if d in heads})
            self.x(
                "DELETE FROM sessions WHERE expires_day < ? OR idle_day + ? < ?",
                (day, SESSION_IDLE_DAYS, day),
            )
            self.x("DELETE FROM revoked_tokens WHERE expires_day < ?", (day,))
        return sum(gone.values())
