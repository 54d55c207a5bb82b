"""The PostgreSQL engine of the relay's store: many relay processes, one service.

``veil relay serve --store postgresql://...`` (or ``VEIL_RELAY_STORE``; libpq reads the
password from ``PGPASSWORD`` or ``~/.pgpass``) runs the same ``RelayStore`` SQL over
psycopg 3's synchronous API, in trio worker threads, with a connection pool
(psycopg_pool). What differs from the SQLCipher file:

- Nothing encrypts the database as a whole, so the columns SQLCipher protected that are
  not end-to-end encrypted or hashed already (the password-wrapped bundles and the TOTP
  secret) are sealed under the relay key before they leave the process: AES-SIV
  (deterministic, so that a compare-and-set on the TOTP secret still works in SQL), with
  the column's name and the account's id as associated data (a sealed value moved to
  another row or column does not open).
- The database records a check value of the relay key (``relay_meta.key_check``): a
  process started with another key refuses to start instead of writing records that no
  other process can read.
- Schema changes are numbered migrations, applied by the first process to start (under an
  advisory lock, so that processes starting together do not race).
- New mail and ended sessions are announced to the other processes with NOTIFY (sent on
  commit, so never before the rows are visible); each process LISTENs on its own
  connection (``Listener``). Payloads carry device ids and token hashes, never envelopes,
  and stay under PostgreSQL's 8,000-byte cap.
- Login throttling per account is shared (``SharedThrottle``, an UNLOGGED table on the
  database's clock): a password guesser gains nothing by spreading attempts over the
  service's processes.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from relay.auth import FORGET_AFTER, MAX_DELAY, MAX_THROTTLED, failure_delay
from relay.store import Cursor, RelayStore, StoreError

try:  # the postgresql extra: the SQLite store needs none of this
    import psycopg
    import psycopg.errors
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError:  # pragma: no cover
    psycopg = None  # type: ignore[assignment]

log = logging.getLogger("veil.relay")

CHANNELS = ("veil_mail", "veil_session")
NOTIFY_BYTES = 7900  # PostgreSQL refuses a payload of 8,000 bytes or more
MIGRATION_LOCK = 0x7665696C  # pg_advisory_lock key ("veil") while migrating
CONNECT_TIMEOUT = 10.0

# Numbered migrations, applied in order, each once (table veil_migrations). 0001 is the
# SQLite store's 0001-0006 at once; later changes get their own number here and there
# (0002 is the SQLite store's 0007).
MIGRATIONS: tuple[tuple[str, str], ...] = (
    ("0001_initial", """
CREATE TABLE accounts (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name_mac BYTEA NOT NULL UNIQUE,
    salt BYTEA NOT NULL,
    kdf_t INTEGER NOT NULL, kdf_m INTEGER NOT NULL, kdf_p INTEGER NOT NULL,
    auth_pub BYTEA NOT NULL,
    enc_pub BYTEA NOT NULL,
    identity_pub BYTEA NOT NULL,
    dh_pub BYTEA NOT NULL,
    keys_sig BYTEA NOT NULL,
    bundle BYTEA NOT NULL,              -- sealed under the relay key
    recovery_auth_pub BYTEA NOT NULL,
    recovery_bundle BYTEA NOT NULL,     -- sealed under the relay key
    totp_secret BYTEA,                  -- sealed under the relay key
    totp_last_step BIGINT,
    created_day INTEGER NOT NULL,
    code_fail_day INTEGER, code_failures INTEGER NOT NULL DEFAULT 0,
    recovery_fail_day INTEGER, recovery_failures INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE devices (
    rowid BIGINT GENERATED ALWAYS AS IDENTITY,  -- creation order, as SQLite's rowid
    device_id BYTEA PRIMARY KEY,
    account_id BIGINT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    sig BYTEA NOT NULL,
    created_day INTEGER NOT NULL,
    label BYTEA,                        -- encrypted by the account's devices
    last_seen_day INTEGER,
    mail_count INTEGER NOT NULL DEFAULT 0,
    last_seq BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX devices_account ON devices(account_id);
CREATE TABLE sessions (
    token_hash BYTEA PRIMARY KEY,
    account_id BIGINT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    device_id BYTEA NOT NULL REFERENCES devices(device_id) ON DELETE CASCADE,
    idle_day INTEGER NOT NULL,
    expires_day INTEGER NOT NULL,
    code_fail_day INTEGER, code_failures INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX sessions_device ON sessions(device_id);
CREATE INDEX sessions_account ON sessions(account_id);
CREATE TABLE mailbox (
    device_id BYTEA NOT NULL REFERENCES devices(device_id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    eid BYTEA NOT NULL,
    blob BYTEA NOT NULL,
    expires_day INTEGER NOT NULL,
    PRIMARY KEY (device_id, seq),
    UNIQUE (device_id, eid)
);
CREATE INDEX mailbox_expiry ON mailbox(expires_day);
CREATE TABLE relay_meta (key TEXT PRIMARY KEY, value BYTEA NOT NULL);
CREATE TABLE signed_prekeys (
    device_id BYTEA PRIMARY KEY REFERENCES devices(device_id) ON DELETE CASCADE,
    key_id BIGINT NOT NULL,
    public BYTEA NOT NULL,
    sig BYTEA NOT NULL
);
CREATE TABLE one_time_prekeys (
    device_id BYTEA NOT NULL REFERENCES devices(device_id) ON DELETE CASCADE,
    key_id BIGINT NOT NULL,
    public BYTEA NOT NULL,
    PRIMARY KEY (device_id, key_id)
);
CREATE TABLE revoked_devices (
    rowid BIGINT GENERATED ALWAYS AS IDENTITY,
    device_id BYTEA PRIMARY KEY,
    account_id BIGINT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    day INTEGER NOT NULL
);
CREATE INDEX revoked_devices_account ON revoked_devices(account_id);
CREATE TABLE revoked_tokens (token_hash BYTEA PRIMARY KEY, expires_day INTEGER NOT NULL);
-- The one table with a time finer than a day: failed logins of the last minutes, per
-- account name HMAC, on the database's clock. UNLOGGED (not in the WAL, not replicated,
-- emptied by a crash); a row goes once its account has been quiet for FORGET_AFTER.
CREATE UNLOGGED TABLE login_throttle (
    name_mac BYTEA PRIMARY KEY,
    failures INTEGER NOT NULL,
    blocked_until DOUBLE PRECISION NOT NULL,
    touched DOUBLE PRECISION NOT NULL
);
CREATE INDEX login_throttle_touched ON login_throttle(touched);
"""),
    ("0002_kem_prekeys", """
-- A device's ML-KEM-768 keys: use 1 one-time KEM prekeys (deleted when claimed), 2 the
-- last-resort KEM prekey, 3 the envelope key (one of each per device). Public data.
CREATE TABLE kem_prekeys (
    device_id BYTEA NOT NULL REFERENCES devices(device_id) ON DELETE CASCADE,
    use SMALLINT NOT NULL,
    key_id BIGINT NOT NULL,
    public BYTEA NOT NULL,
    sig BYTEA NOT NULL,
    PRIMARY KEY (device_id, use, key_id)
);
"""),
)


@functools.cache
def _sql(query: str) -> str:
    """The store's SQL (``?`` placeholders) in psycopg's (``%s``)."""
    return query.replace("%", "%%").replace("?", "%s")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class PgEngine:
    """RelayStore's engine over a psycopg connection pool."""

    name = "postgresql"
    shared = True
    threads = 8
    lock_rows = " FOR NO KEY UPDATE"
    IntegrityError: type[Exception] = Exception  # set in __init__ (psycopg is optional)

    def __init__(self, dsn: str, column_key: bytes, key_check: bytes, *, stop_before: str | None = None) -> None:
        """``stop_before`` (tests: a database as an older relay left it) applies the
        migrations before the one of that name only."""
        if psycopg is None:  # pragma: no cover
            raise StoreError("the PostgreSQL store needs psycopg: install veil with its postgresql extra")
        type(self).IntegrityError = psycopg.IntegrityError
        self.dsn = dsn
        self.instance = secrets.token_bytes(8)  # this process, in what it announces
        self._siv = AESSIV(column_key)
        self._local = threading.local()
        # One plain connection first: a wrong address or password fails at once, in one
        # line (the pool would retry, and log each try, until its timeout).
        why = self._why()
        if why is not None:
            raise StoreError(f"cannot connect to the PostgreSQL store: {why}")
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)  # its retries: ours to report
        self.pool = ConnectionPool(
            dsn, min_size=1, max_size=self.threads + 2, kwargs={"autocommit": True},
            open=False, name="veil-relay", timeout=CONNECT_TIMEOUT,
        )
        try:
            self.pool.open(wait=True, timeout=CONNECT_TIMEOUT)
        except PoolTimeout:
            self.pool.close()
            raise StoreError(f"cannot connect to the PostgreSQL store: {self._why() or 'timed out'}") from None
        try:
            with self.bound():
                self._migrate(key_check, stop_before)
        except BaseException:
            self.pool.close()
            raise

    def _why(self) -> str | None:
        """Why a connection fails (one line, without the password); None if it works."""
        try:
            psycopg.connect(self.dsn, connect_timeout=int(CONNECT_TIMEOUT)).close()
        except psycopg.ProgrammingError:  # libpq quotes the part it cannot parse: perhaps the password
            return "the connection string is not valid"
        except psycopg.Error as exc:
            return _one_line(exc)
        return None

    def _migrate(self, key_check: bytes, stop_before: str | None = None) -> None:
        if stop_before is not None and stop_before not in {name for name, _ in MIGRATIONS}:
            raise ValueError(f"no migration {stop_before}")
        x = self.execute
        x("SELECT pg_advisory_lock(?)", (MIGRATION_LOCK,))
        try:
            x("CREATE TABLE IF NOT EXISTS veil_migrations (name TEXT PRIMARY KEY)")
            done = {r[0] for r in x("SELECT name FROM veil_migrations")}
            for name, script in MIGRATIONS:
                if name == stop_before:
                    if name in done:
                        raise ValueError(f"cannot stop before {name}: it is applied already")
                    break
                if name not in done:
                    with self.atomic():
                        self._conn().execute(script)
                        x("INSERT INTO veil_migrations (name) VALUES (?)", (name,))
                    log.info("store: applied migration %s", name)
            row = x("SELECT value FROM relay_meta WHERE key = 'key_check'").fetchone()
            if row is None:
                x("INSERT INTO relay_meta (key, value) VALUES ('key_check', ?)", (key_check,))
            elif bytes(row[0]) != key_check:
                raise StoreError(
                    "this PostgreSQL database was created with another relay key: start every relay"
                    " process of the service with the same key (VEIL_RELAY_KEY or relay.key)"
                )
        finally:
            x("SELECT pg_advisory_unlock(?)", (MIGRATION_LOCK,))

    # ---- connections ---------------------------------------------------------------
    def _conn(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None:
            raise RuntimeError("no connection bound to this thread")
        return conn

    @contextmanager
    def bound(self) -> Iterator[None]:
        if getattr(self._local, "conn", None) is not None:
            yield
            return
        with self.pool.connection() as conn:
            self._local.conn = conn
            try:
                yield
            finally:
                self._local.conn = None

    def execute(self, sql: str, params: Sequence[object] = ()) -> Cursor:
        conn = getattr(self._local, "conn", None)
        if conn is None:  # a single statement outside a store call (tests, tools)
            with self.pool.connection() as conn:
                cur = conn.execute(_sql(sql), params)
                return _Rows(cur.fetchall() if cur.description is not None else None, cur.rowcount)
        return conn.execute(_sql(sql), params)  # type: ignore[no-any-return]

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        with self.bound(), self._conn().cursor() as cur:
            cur.executemany(_sql(sql), rows)

    @contextmanager
    def atomic(self) -> Iterator[None]:
        with self.bound(), self._conn().transaction():
            yield

    write = atomic

    def transient(self, exc: BaseException) -> bool:
        """An error after which the same transaction may simply be tried again."""
        return isinstance(exc, psycopg.errors.DeadlockDetected | psycopg.errors.SerializationFailure)

    # ---- sealed columns --------------------------------------------------------------
    @staticmethod
    def _aad(column: str, account_id: int) -> list[bytes]:
        return [b"veil/v1/pg-column/" + column.encode(), account_id.to_bytes(8, "big")]

    def seal(self, column: str, account_id: int, value: bytes) -> bytes:
        return self._siv.encrypt(value, self._aad(column, account_id))

    def unseal(self, column: str, account_id: int, value: bytes) -> bytes:
        try:
            return self._siv.decrypt(value, self._aad(column, account_id))
        except InvalidTag:
            raise StoreError(f"a sealed {column} does not open with this relay key") from None

    # ---- announcements -----------------------------------------------------------------
    def announce(self, kind: str, values: Sequence[bytes]) -> None:
        if not values:
            return
        channel = "veil_mail" if kind == "mail" else "veil_session"
        # Mail names many devices: several to a notification, each under the cap. (A
        # session's two or three values always fit in one.)
        head = self.instance.hex() + " " + kind
        parts = [v.hex() for v in values]
        chunk: list[str] = []
        size = len(head)
        for p in parts:
            if chunk and size + 1 + len(p) > NOTIFY_BYTES:
                self.execute("SELECT pg_notify(?, ?)", (channel, " ".join([head, *chunk])))
                chunk, size = [], len(head)
            chunk.append(p)
            size += 1 + len(p)
        self.execute("SELECT pg_notify(?, ?)", (channel, " ".join([head, *chunk])))

    def close(self) -> None:
        self.pool.close()


class _Rows:
    """The rows of a statement run on a connection already given back to the pool."""

    def __init__(self, rows: list[Any] | None, rowcount: int) -> None:
        self.description = None if rows is None else ()
        self._rows = rows or []
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        return self._rows.pop(0) if self._rows else None

    def fetchall(self) -> list[Any]:
        rows, self._rows = self._rows, []
        return rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


def open_postgresql(dsn: str, column_key: bytes, key_check: bytes) -> RelayStore:
    try:
        return RelayStore(PgEngine(dsn, column_key, key_check))
    except psycopg.Error as exc:
        raise StoreError(f"the PostgreSQL store failed: {_one_line(exc)}") from None


Notice = Callable[[str, list[bytes]], None]


class Listener:
    """This process's LISTEN connection: calls ``on_notice(kind, values)`` on the trio
    thread for what other processes announce, and ``on_notice("resync", [])`` after every
    (re)connection, when announcements may have been missed."""

    RETRY = 1.0

    def __init__(self, engine: PgEngine, on_notice: Notice) -> None:
        self.engine = engine
        self.on_notice = on_notice
        self.connected = trio.Event()  # set while listening (tests wait on it)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            try:
                conn = await trio.to_thread.run_sync(self._connect)
            except psycopg.Error as exc:
                log.warning("store: cannot listen for other processes: %s", _one_line(exc))
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(self.RETRY)
                continue
            try:
                self.on_notice("resync", [])
                self.connected.set()
                if not started:
                    task_status.started()
                    started = True
                await self._listen(conn)
            except psycopg.Error as exc:
                log.warning("store: lost the listening connection: %s", _one_line(exc))
            finally:
                self.connected = trio.Event()
                conn.close()
            await trio.sleep(self.RETRY)

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.engine.dsn, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT))
        for channel in CHANNELS:
            conn.execute(f"LISTEN {channel}")
        return conn

    async def _listen(self, conn: psycopg.Connection[Any]) -> None:
        mine = self.engine.instance.hex()
        while True:
            await trio.lowlevel.wait_readable(conn.fileno())
            for n in conn.notifies(timeout=0):
                words = n.payload.split(" ")
                if len(words) < 2 or words[0] == mine:
                    continue
                try:
                    values = [bytes.fromhex(w) for w in words[2:]]
                except ValueError:
                    continue
                self.on_notice(words[1], values)


class SharedThrottle:
    """relay.auth.Throttle's rules, in the shared database (on its clock), for all the
    service's processes. Synchronous: the service runs it in the store's threads."""

    def __init__(self, store: RelayStore) -> None:
        self.store = store
        self._calls = 0

    def _entry(self, key: bytes) -> tuple[float, int, float]:
        """Inside a transaction: (now, failures, blocked_until) of ``key``, its row
        created if absent and locked; an entry quiet for FORGET_AFTER starts again."""
        x = self.store.x
        (now,) = x("SELECT extract(epoch from clock_timestamp())::float8").fetchone()
        # One statement that creates the row or locks the one there, and returns it (a
        # SELECT after an INSERT could find it deleted meanwhile by a concurrent success).
        failures, blocked = x(
            "INSERT INTO login_throttle (name_mac, failures, blocked_until, touched) VALUES (?, 0, 0, ?)"
            " ON CONFLICT (name_mac) DO UPDATE SET name_mac = excluded.name_mac"
            " RETURNING failures, blocked_until", (key, now)
        ).fetchone()
        if blocked + FORGET_AFTER < now:
            failures, blocked = 0, 0.0
        return float(now), int(failures), float(blocked)

    def _set(self, key: bytes, now: float, failures: int, blocked: float) -> None:
        self.store.x("UPDATE login_throttle SET failures = ?, blocked_until = ?, touched = ? WHERE name_mac = ?",
                     (failures, blocked, now, key))

    def _prune(self) -> None:
        self._calls += 1
        if self._calls % 64:
            return
        x = self.store.x
        x("DELETE FROM login_throttle WHERE touched < extract(epoch from clock_timestamp()) - ?",
          (FORGET_AFTER + MAX_DELAY,))
        x("DELETE FROM login_throttle WHERE name_mac IN (SELECT name_mac FROM login_throttle"
          " ORDER BY touched DESC OFFSET ?)", (MAX_THROTTLED,))

    def attempt(self, key: bytes) -> bool:
        with self.store.e.atomic():
            now, failures, blocked = self._entry(key)
            if blocked > now:
                self._set(key, now, failures, blocked)
                return False
            self._set(key, now, failures, now + failure_delay(failures))
        self._prune()
        return True

    def fail(self, key: bytes) -> float:
        with self.store.e.atomic():
            now, failures, blocked = self._entry(key)
            delay = failure_delay(failures)
            self._set(key, now, failures + 1, max(blocked, now + delay))
        return delay

    def succeed(self, key: bytes) -> None:
        self.store.x("DELETE FROM login_throttle WHERE name_mac = ?", (key,))

    def failures(self, key: bytes) -> int:
        row = self.store.x(
            "SELECT failures, blocked_until, extract(epoch from clock_timestamp())::float8 FROM login_throttle"
            " WHERE name_mac = ?", (key,)
        ).fetchone()
        return 0 if row is None or row[1] + FORGET_AFTER < row[2] else int(row[0])
