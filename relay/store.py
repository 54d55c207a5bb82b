"""The relay's storage: every SQL statement the relay runs lives in this module.

A narrow, synchronous interface (accounts, devices, sessions, mailboxes) over one
SQLCipher connection. It is called from one worker thread at a time (see
``relay.mailroom``), never from the event loop. Minimal by design: account names are
stored only as an HMAC, mailboxes have no sender column, and no column holds an IP
address or a time finer than a day.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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


_ACCOUNT_COLS = (
    "id, salt, kdf_t, kdf_m, kdf_p, auth_pub, enc_pub, identity_pub, dh_pub, keys_sig, bundle,"
    " recovery_auth_pub, recovery_bundle, name_mac, totp_secret, totp_last_step"
)


def _account(row: Sequence[object]) -> Account:
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
    """Synchronous relay storage on one SQLCipher connection."""

    def __init__(self, path: Path, key: bytes, *, durable: bool = True) -> None:
        self.db = open_encrypted(path, key, durable=durable)
        self.conn = self.db.conn
        migrations.apply(self.db)

    def close(self) -> None:
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()

    # ---- relay metadata ----------------------------------------------------------
    def meta(self, key: str) -> bytes | None:
        row = self.conn.execute("SELECT value FROM relay_meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def set_meta(self, key: str, value: bytes) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO relay_meta (key, value) VALUES (?, ?)", (key, value)
        )

    # ---- accounts and devices ----------------------------------------------------
    def create_account(self, new: NewAccount, device_id: bytes, device_sig: bytes) -> int:
        """Create an account with its first device; NameTaken if the name exists."""
        with self.db.atomic():
            try:
                cur = self.conn.execute(
                    "INSERT INTO accounts (name_mac, salt, kdf_t, kdf_m, kdf_p, auth_pub,"
                    " enc_pub, identity_pub, dh_pub, keys_sig, bundle, recovery_auth_pub,"
                    " recovery_bundle, created_day) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        new.name_mac, new.salt, *new.kdf, new.auth_pub, new.enc_pub,
                        new.identity_pub, new.dh_pub, new.keys_sig, new.bundle, new.recovery_auth_pub,
                        new.recovery_bundle, today(),
                    ),
                )
            except IntegrityError:
                raise NameTaken() from None
            assert cur.lastrowid is not None
            account_id = int(cur.lastrowid)
            self._insert_device(account_id, device_id, device_sig)
        return account_id

    def account(self, name_mac: bytes) -> Account | None:
        row = self.conn.execute(
            f"SELECT {_ACCOUNT_COLS} FROM accounts WHERE name_mac = ?", (name_mac,)
        ).fetchone()
        return None if row is None else _account(row)

    def account_by_id(self, account_id: int) -> Account | None:
        row = self.conn.execute(
            f"SELECT {_ACCOUNT_COLS} FROM accounts WHERE id = ?", (account_id,)
        ).fetchone()
        return None if row is None else _account(row)

    def identity_of(self, account_id: int) -> bytes:
        (ident,) = self.conn.execute("SELECT identity_pub FROM accounts WHERE id = ?", (account_id,)).fetchone()
        return bytes(ident)

    def _insert_device(self, account_id: int, device_id: bytes, sig: bytes) -> None:
        if self._revoked(device_id):
            raise DeviceRevoked()
        try:
            self.conn.execute(
                "INSERT INTO devices (device_id, account_id, sig, created_day) VALUES (?,?,?,?)",
                (device_id, account_id, sig, today()),
            )
        except IntegrityError:
            raise UnknownDevice() from None  # the id belongs to another account

    def _revoked(self, device_id: bytes) -> bool:
        row = self.conn.execute("SELECT 1 FROM revoked_devices WHERE device_id = ?", (device_id,)).fetchone()
        return row is not None

    def _ensure_device(self, account_id: int, device_id: bytes, sig: bytes, limit: int) -> None:
        """Register ``device_id`` for the account unless it is known; raises
        DeviceRevoked, UnknownDevice (another account's) or TooManyDevices."""
        if self._revoked(device_id):
            raise DeviceRevoked()
        row = self.conn.execute("SELECT account_id FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        if row is not None:
            if row[0] != account_id:
                raise UnknownDevice()
            return
        (count,) = self.conn.execute(
            "SELECT count(*) FROM devices WHERE account_id = ?", (account_id,)
        ).fetchone()
        if count >= limit:
            raise TooManyDevices()
        self._insert_device(account_id, device_id, sig)

    def ensure_device(self, account_id: int, device_id: bytes, sig: bytes, limit: int) -> bool:
        """Register ``device_id`` for the account unless it is known; False if over limit
        (UnknownDevice for another account's id, DeviceRevoked for a revoked one)."""
        with self.db.atomic():
            try:
                self._ensure_device(account_id, device_id, sig, limit)
            except TooManyDevices:
                return False
            return True

    def devices(self, account_id: int) -> list[tuple[bytes, bytes, int]]:
        """(device_id, signature, created_day) of each device, oldest first."""
        return [
            (bytes(r[0]), bytes(r[1]), int(r[2]))
            for r in self.conn.execute(
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
            for r in self.conn.execute(
                "SELECT d.device_id, d.sig, d.created_day, d.label, d.last_seen_day, EXISTS ("
                " SELECT 1 FROM sessions s WHERE s.device_id = d.device_id"
                " AND s.idle_day + ? >= ? AND s.expires_day >= ?)"
                " FROM devices d WHERE d.account_id = ? ORDER BY d.created_day, d.rowid",
                (SESSION_IDLE_DAYS, day, day, account_id),
            )
        ]

    def rename_device(self, account_id: int, device_id: bytes, label: bytes) -> bool:
        """Store a device's (encrypted) name; False if it is not one of the account's."""
        cur = self.conn.execute(
            "UPDATE devices SET label = ? WHERE device_id = ? AND account_id = ?",
            (label, device_id, account_id),
        )
        return int(cur.rowcount) == 1

    def remove_device(self, device_id: bytes) -> None:
        """Forget a device, its sessions and its mailbox."""
        with self.db.atomic():
            self.conn.execute("DELETE FROM devices WHERE device_id = ?", (device_id,))

    def _revocable(self, account_id: int, device_id: bytes, allow_last: bool) -> None:
        row = self.conn.execute(
            "SELECT 1 FROM revoked_devices WHERE device_id = ? AND account_id = ?", (device_id, account_id)
        ).fetchone()
        if row is not None:
            raise DeviceRevoked()
        row = self.conn.execute(
            "SELECT 1 FROM devices WHERE device_id = ? AND account_id = ?", (device_id, account_id)
        ).fetchone()
        if row is None:
            raise UnknownDevice()
        (count,) = self.conn.execute(
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
        with self.db.atomic():
            self._check_proved(account_id, token_hash, auth_pub)
            self._revocable(account_id, device_id, allow_last)
            self.conn.execute(
                "INSERT OR REPLACE INTO revoked_devices (device_id, account_id, day) VALUES (?,?,?)",
                (device_id, account_id, day),
            )
            self.conn.execute(
                "INSERT OR IGNORE INTO revoked_tokens (token_hash, expires_day)"
                " SELECT token_hash, min(expires_day, idle_day + ?) FROM sessions"
                " WHERE device_id = ? AND min(expires_day, idle_day + ?) >= ?",
                (SESSION_IDLE_DAYS, device_id, SESSION_IDLE_DAYS, day),
            )
            self.conn.execute("DELETE FROM devices WHERE device_id = ?", (device_id,))
            self.conn.execute(
                "DELETE FROM revoked_devices WHERE account_id = ? AND rowid NOT IN"
                " (SELECT rowid FROM revoked_devices WHERE account_id = ?"
                " ORDER BY day DESC, rowid DESC LIMIT ?)",
                (account_id, account_id, MAX_REVOKED),
            )

    # ---- credentials and the second factor ----------------------------------------
    def _set_credentials(self, account_id: int, creds: Credentials) -> None:
        self.conn.execute(
            # A new password: the wrong codes counted against the old one are forgotten.
            "UPDATE accounts SET salt = ?, kdf_t = ?, kdf_m = ?, kdf_p = ?, auth_pub = ?, bundle = ?,"
            " code_failures = 0 WHERE id = ?",
            (creds.salt, *creds.kdf, creds.auth_pub, creds.bundle, account_id),
        )
        if creds.recovery is not None:
            self.conn.execute(
                "UPDATE accounts SET recovery_auth_pub = ?, recovery_bundle = ? WHERE id = ?",
                (*creds.recovery, account_id),
            )

    def change_password(self, account_id: int, creds: Credentials, token_hash: bytes, end_sessions: bool,
                        auth_pub: bytes | None = None) -> None:
        """Replace the password's credentials, in one transaction with, if
        ``end_sessions``, the end of every session of the account but ``token_hash``'s.
        NoSession or CredentialsChanged (nothing changed) as ``_check_proved``."""
        with self.db.atomic():
            self._check_proved(account_id, token_hash, auth_pub)
            self._set_credentials(account_id, creds)
            if end_sessions:
                self.conn.execute(
                    "DELETE FROM sessions WHERE account_id = ? AND token_hash != ?", (account_id, token_hash)
                )

    def recover(
        self,
        account_id: int,
        creds: Credentials,
        device: tuple[bytes, bytes],
        device_limit: int,
        prekeys: tuple[tuple[int, bytes, bytes] | None, Sequence[tuple[int, bytes]]] | None,
        prekey_limit: int,
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
        with self.db.atomic():
            if proved is not None:
                row = self.conn.execute(
                    "SELECT recovery_auth_pub, totp_secret FROM accounts WHERE id = ?", (account_id,)
                ).fetchone()
                now = None if row is None else (bytes(row[0]), None if row[1] is None else bytes(row[1]))
                if now != proved:
                    raise CredentialsChanged()
            self._set_credentials(account_id, creds)
            self.conn.execute("DELETE FROM sessions WHERE account_id = ?", (account_id,))
            device_id, sig = device
            self._ensure_device(account_id, device_id, sig, device_limit)
            if prekeys is not None and self.publish_prekeys(device_id, *prekeys, prekey_limit) is None:
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
        with self.db.atomic():
            row = self.conn.execute(f"SELECT {cols[0]}, {cols[1]} FROM {table} WHERE {where}", (key,)).fetchone()
            locked = row is None or (row[0] == day and row[1] >= MAX_CODE_FAILURES)
            if step is not None and not locked:
                cur = self.conn.execute(
                    "UPDATE accounts SET totp_last_step = ? WHERE id = ? AND totp_secret IS NOT NULL"
                    " AND totp_secret = ? AND (totp_last_step IS NULL OR totp_last_step < ?)",
                    (step, account_id, secret, step),
                )
                if int(cur.rowcount) == 1:
                    return True
            self.conn.execute(
                f"UPDATE {table} SET {cols[1]} = CASE WHEN {cols[0]} = ? THEN {cols[1]} + 1"
                f" ELSE 1 END, {cols[0]} = ? WHERE {where}",
                (day, day, key),
            )
            return False

    def touch_account(self, account_id: int) -> None:
        """A write of nothing, in a transaction: what a failed password proof does for an
        account with MFA, so that it takes as long as a right password with a wrong code
        (which writes its count), and the time does not tell the two apart."""
        with self.db.atomic():
            self.conn.execute("UPDATE accounts SET code_failures = code_failures WHERE id = ?", (account_id,))

    def _check_proved(self, account_id: int, token_hash: bytes | None, auth_pub: bytes | None) -> None:
        """Inside a transaction: the session a change was asked on still exists
        (NoSession), and the auth key it was proved with is still the account's
        (CredentialsChanged): a recovery or password change that came first wins."""
        if token_hash is not None and self.conn.execute(
            "SELECT 1 FROM sessions WHERE token_hash = ? AND account_id = ?", (token_hash, account_id)
        ).fetchone() is None:
            raise NoSession()
        if auth_pub is not None:
            row = self.conn.execute("SELECT auth_pub FROM accounts WHERE id = ?", (account_id,)).fetchone()
            if row is None or bytes(row[0]) != auth_pub:
                raise CredentialsChanged()

    def enable_totp(self, account_id: int, secret: bytes, step: int, token_hash: bytes | None = None,
                    auth_pub: bytes | None = None) -> bool:
        """Turn TOTP on with the step of the code that proved the secret; False if it is
        on already. (``token_hash``, ``auth_pub``: as ``_check_proved``.)"""
        with self.db.atomic():
            self._check_proved(account_id, token_hash, auth_pub)
            cur = self.conn.execute(
                "UPDATE accounts SET totp_secret = ?, totp_last_step = ? WHERE id = ? AND totp_secret IS NULL",
                (secret, step, account_id),
            )
            return int(cur.rowcount) == 1

    def disable_totp(self, account_id: int, secret: bytes, token_hash: bytes | None = None,
                     auth_pub: bytes | None = None) -> bool:
        """Turn TOTP off; False if it is not on with ``secret`` (off, or changed)."""
        with self.db.atomic():
            self._check_proved(account_id, token_hash, auth_pub)
            cur = self.conn.execute(
                "UPDATE accounts SET totp_secret = NULL, totp_last_step = NULL WHERE id = ? AND totp_secret = ?",
                (account_id, secret),
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
        with self.db.atomic():
            self._check_proved(account_id, None, auth_pub)
            try:
                self.conn.execute(
                    "INSERT INTO sessions (token_hash, account_id, device_id, idle_day, expires_day)"
                    " VALUES (?,?,?,?,?)",
                    (token_hash, account_id, device_id, day, expires),
                )
            except IntegrityError:  # the device went (removed or revoked) since it was checked
                raise DeviceRevoked() if self._revoked(device_id) else UnknownDevice() from None
            self.conn.execute("UPDATE devices SET last_seen_day = ? WHERE device_id = ?", (day, device_id))
        return expires

    def session(self, token_hash: bytes) -> Session | None:
        """The live session with this token hash (refreshing its idle day), or None."""
        day = today()
        row = self.conn.execute(
            "SELECT account_id, device_id, idle_day, expires_day FROM sessions"
            " WHERE token_hash = ?",
            (token_hash,),
        ).fetchone()
        if row is None:
            return None
        if row[2] + SESSION_IDLE_DAYS < day or row[3] < day:
            self.conn.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash,))
            return None
        if row[2] != day:
            with self.db.atomic():
                self.conn.execute(
                    "UPDATE sessions SET idle_day = ? WHERE token_hash = ?", (day, token_hash)
                )
                self.conn.execute("UPDATE devices SET last_seen_day = ? WHERE device_id = ?", (day, row[1]))
        return Session(account_id=int(row[0]), device_id=bytes(row[1]))

    def delete_session(self, token_hash: bytes) -> None:
        self.conn.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash,))

    def token_revoked(self, token_hash: bytes) -> bool:
        """Whether the token's session was ended by a revocation of its device."""
        row = self.conn.execute("SELECT 1 FROM revoked_tokens WHERE token_hash = ?", (token_hash,)).fetchone()
        return row is not None

    # ---- mailboxes ----------------------------------------------------------------
    # These run inside the caller's transaction (relay.mailroom's group commit).
    def existing_devices(self, device_ids: Iterable[bytes]) -> set[bytes]:
        ids = list(set(device_ids))
        found: set[bytes] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(
                bytes(r[0])
                for r in self.conn.execute(f"SELECT device_id FROM devices WHERE device_id IN ({marks})", chunk)
            )
        return found

    def _present(self, column: str, keys: Sequence[tuple[bytes, object]]) -> set[tuple[bytes, object]]:
        # One statement per 400 keys: the commit thread releases the GIL around every
        # statement step, and under load getting it back is what costs.
        found: set[tuple[bytes, object]] = set()
        for start in range(0, len(keys), 400):
            chunk = keys[start : start + 400]
            values = ",".join(["(?,?)"] * len(chunk))
            found.update(
                (bytes(r[0]), r[1] if column == "seq" else bytes(r[1]))
                for r in self.conn.execute(
                    f"SELECT device_id, {column} FROM mailbox WHERE (device_id, {column}) IN (VALUES {values})",
                    [x for key in chunk for x in key],
                )
            )
        return found

    def stored_pairs(self, pairs: Sequence[tuple[bytes, bytes]]) -> set[tuple[bytes, bytes]]:
        """Which of these (device_id, eid) pairs a mailbox already holds (retried sends)."""
        return self._present("eid", pairs)  # type: ignore[return-value]

    def present_seqs(self, keys: Sequence[tuple[bytes, int]]) -> set[tuple[bytes, int]]:
        """Which of these (device_id, seq) a mailbox holds."""
        return self._present("seq", keys)  # type: ignore[return-value]

    def mailbox_state(self, device_id: bytes) -> tuple[int, int]:
        """(number of envelopes, highest seq) of one device's mailbox."""
        row = self.conn.execute(
            "SELECT count(*), coalesce(max(seq), 0) FROM mailbox WHERE device_id = ?", (device_id,)
        ).fetchone()
        return int(row[0]), int(row[1])

    def insert_mail(self, rows: Sequence[tuple[bytes, int, bytes, bytes]]) -> int:
        """Insert (device_id, seq, eid, blob) rows (the caller has left out envelopes the
        mailboxes already hold); returns how many were inserted."""
        expires = today() + MAIL_TTL_DAYS
        stored = 0
        for start in range(0, len(rows), 200):
            chunk = rows[start : start + 200]
            values = ",".join(["(?,?,?,?,?)"] * len(chunk))
            params = [x for d, seq, eid, blob in chunk for x in (d, seq, eid, blob, expires)]
            cur = self.conn.execute(
                f"INSERT OR IGNORE INTO mailbox (device_id, seq, eid, blob, expires_day) VALUES {values}",
                params,
            )
            stored += int(cur.rowcount)
        return stored

    def fetch(self, device_id: bytes, after_seq: int, limit: int) -> list[Stored]:
        return [
            Stored(device_id, int(r[0]), bytes(r[1]), bytes(r[2]))
            for r in self.conn.execute(
                "SELECT seq, eid, blob FROM mailbox WHERE device_id = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (device_id, after_seq, limit),
            )
        ]

    def ack(self, pairs: Sequence[tuple[bytes, bytes]]) -> int:
        """Delete delivered envelopes, given as (device_id, eid); returns how many went."""
        deleted = 0
        for start in range(0, len(pairs), 400):
            chunk = pairs[start : start + 400]
            values = ",".join(["(?,?)"] * len(chunk))
            cur = self.conn.execute(
                f"DELETE FROM mailbox WHERE (device_id, eid) IN (VALUES {values})",
                [x for pair in chunk for x in pair],
            )
            deleted += int(cur.rowcount)
        return deleted

    # ---- prekeys -------------------------------------------------------------------
    def prekey_status(self, device_id: bytes) -> tuple[int | None, int]:
        """(signed prekey id or None, one-time prekeys held) of a device."""
        row = self.conn.execute("SELECT key_id FROM signed_prekeys WHERE device_id = ?", (device_id,)).fetchone()
        (count,) = self.conn.execute(
            "SELECT count(*) FROM one_time_prekeys WHERE device_id = ?", (device_id,)
        ).fetchone()
        return (None if row is None else int(row[0])), int(count)

    def publish_prekeys(
        self,
        device_id: bytes,
        signed: tuple[int, bytes, bytes] | None,
        one_time: Sequence[tuple[int, bytes]],
        limit: int,
    ) -> tuple[int | None, int] | None:
        """Store a device's prekeys; None (nothing stored) if it would hold over ``limit``
        one-time prekeys. A repeated one-time key id replaces nothing (it is ignored)."""
        with self.db.atomic():
            _, held = self.prekey_status(device_id)
            if held + len(one_time) > limit:
                return None
            if signed is not None:
                self.conn.execute(
                    "INSERT OR REPLACE INTO signed_prekeys (device_id, key_id, public, sig) VALUES (?,?,?,?)",
                    (device_id, *signed),
                )
            self.conn.executemany(
                "INSERT OR IGNORE INTO one_time_prekeys (device_id, key_id, public) VALUES (?,?,?)",
                [(device_id, k, pub) for k, pub in one_time],
            )
            return self.prekey_status(device_id)

    def claim_prekeys(
        self, account_id: int, device_ids: Sequence[bytes], one_time: Collection[bytes] | None = None
    ) -> list[tuple[bytes, int, bytes, bytes, int | None, bytes | None]]:
        """Bundles for the account's listed devices, taking one one-time prekey (the
        oldest) from each device in ``one_time`` (all of them if None); devices of other
        accounts or without a signed prekey are left out."""
        out: list[tuple[bytes, int, bytes, bytes, int | None, bytes | None]] = []
        with self.db.atomic():
            for device_id in dict.fromkeys(device_ids):
                row = self.conn.execute(
                    "SELECT s.key_id, s.public, s.sig FROM signed_prekeys s JOIN devices d"
                    " ON d.device_id = s.device_id WHERE s.device_id = ? AND d.account_id = ?",
                    (device_id, account_id),
                ).fetchone()
                if row is None:
                    continue
                opk = None if one_time is not None and device_id not in one_time else self.conn.execute(
                    "DELETE FROM one_time_prekeys WHERE device_id = ? AND key_id ="
                    " (SELECT min(key_id) FROM one_time_prekeys WHERE device_id = ?)"
                    " RETURNING key_id, public",
                    (device_id, device_id),
                ).fetchone()
                out.append((
                    device_id, int(row[0]), bytes(row[1]), bytes(row[2]),
                    None if opk is None else int(opk[0]), None if opk is None else bytes(opk[1]),
                ))
        return out

    def expire(self) -> int:
        """Drop undelivered mail past its expiry day, dead sessions, and the revoked
        tokens of sessions that would have died by now."""
        day = today()
        with self.db.atomic():
            n = self.conn.execute("DELETE FROM mailbox WHERE expires_day < ?", (day,)).rowcount
            self.conn.execute(
                "DELETE FROM sessions WHERE expires_day < ? OR idle_day + ? < ?",
                (day, SESSION_IDLE_DAYS, day),
            )
            self.conn.execute("DELETE FROM revoked_tokens WHERE expires_day < ?", (day,))
        return int(n)
