"""The relay's files: nothing readable without the relay key, nothing kept that the relay
does not need (no sender, no fine-grained time, no token), and nothing lost on restart.
(The same for a PostgreSQL store: tests/test_relay_postgresql.py.)"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
from pathlib import Path

import pytest
import trio

import wire
from cipherdb import WrongKey, open_encrypted
from relay.keyfile import KEY_FILE
from relay.server import DB_FILE
from relay.store import MAIL_TTL_DAYS, today
from tests.conftest import Accounts, RelayRunner
from tests.test_relay_support import DEADLINE, envelope, publish_kem_keys, raw_client, sql

E = wire.ErrorCode
# Names and a text no other bytes in the data dir could contain by chance.
ALICE = "quokka_ardent7"
BOB = "wombat.umbral3"
SECRET = "the walrus hums at dawn: 4471-zq"


def data_dir(relay: RelayRunner) -> Path:
    return relay.data_dir


def all_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.file_store
async def test_data_dir_holds_nothing_in_the_clear(accounts: Accounts) -> None:
    relay = accounts.relay
    with trio.fail_after(DEADLINE):
        alice = await accounts.register(ALICE)
        bob = await accounts.register(BOB)
        async with alice.connected() as link:
            await alice.send(link, BOB, SECRET)  # bob stays offline: it is kept
        assert len(await sql(relay, "SELECT 1 FROM mailbox")) == 1
        tokens = [n.store.get("token") for n in (alice, bob)]
        secrets_ = {
            "alice's name": ALICE.encode(),
            "bob's name": BOB.encode(),
            "bob's name (utf-16)": BOB.encode("utf-16-le"),
            "the text": SECRET.encode(),
            "the text (utf-16)": SECRET.encode("utf-16-le"),
            "SQLite header": b"SQLite format 3\x00",
            "table name": b"CREATE TABLE",
        }
        for node in (alice, bob):
            pub = node.keys.public()
            secrets_[f"{node.name} identity key"] = pub.identity
            secrets_[f"{node.name} dh key"] = pub.dh
            secrets_[f"{node.name} rsa key"] = pub.enc
            secrets_[f"{node.name} device id"] = node.device_id
        for i, token in enumerate(tokens):
            assert token
            secrets_[f"session token {i}"] = token

        def check(files: dict[str, bytes]) -> None:
            assert files.get(DB_FILE)
            for fname, data in files.items():
                for what, needle in secrets_.items():
                    assert needle not in data, f"{what} in the clear in {fname}"

        # While the relay runs (the WAL holds the recent writes)...
        running = all_bytes(data_dir(relay))
        assert any(name.endswith("-wal") and data for name, data in running.items()), running.keys()
        check(running)
        for name in running:
            if name.startswith(DB_FILE):
                assert mode(data_dir(relay) / name) == 0o600, name
        # ...and after it stopped (checkpointed into the main file).
        await relay.stop()
        check(all_bytes(data_dir(relay)))
        assert mode(data_dir(relay) / KEY_FILE) == 0o600
        assert mode(data_dir(relay) / DB_FILE) == 0o600
        assert mode(data_dir(relay)) == 0o700


@pytest.mark.file_store
async def test_database_cannot_be_opened_without_the_key(accounts: Accounts) -> None:
    relay = accounts.relay
    with trio.fail_after(DEADLINE):
        await accounts.register(ALICE)
        state = relay.state
        assert state is not None
        db_key = state.keys.db_key
        await relay.stop()
        path = data_dir(relay) / DB_FILE
        before = path.read_bytes()
        for wrong in (bytes(32), bytes(31) + b"\x01", db_key[:-1] + bytes([db_key[-1] ^ 1])):
            with pytest.raises(WrongKey):
                open_encrypted(path, wrong)
        # The root key file itself is not the database key.
        with pytest.raises(WrongKey):
            open_encrypted(path, (data_dir(relay) / KEY_FILE).read_bytes())
        # Plain SQLite sees no database at all.
        plain = sqlite3.connect(path)
        try:
            with pytest.raises(sqlite3.DatabaseError):
                plain.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            plain.close()
        assert path.read_bytes() == before  # the failed opens changed nothing
        # The control: the right key opens it and finds the account.
        db = open_encrypted(path, db_key)
        try:
            assert db.conn.execute("SELECT count(*) FROM accounts").fetchone()[0] == 1
        finally:
            db.conn.close()


async def test_restart_loses_no_undelivered_message(accounts: Accounts) -> None:
    relay = accounts.relay
    texts = ["first before restart", "second before restart", "third before restart"]
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        async with alice.connected() as link:
            for text in texts:
                await alice.send(link, "bob", text)
        await relay.stop()
        await relay.start()
        async with raw_client(relay.url) as b:
            await b.resume(bob)  # the session survived the restart too
            mail = await b.mail_until_synced()
            eids = [m.eid for m in mail]
            assert len(eids) == 3 and len(set(eids)) == 3
            # Open them with bob's keys: they are alice's three texts, in order.
            async with bob.connected() as link:
                got = await bob.accept(link, wire.Deliver(items=mail, synced=True))
            assert [r.message.body for r in got] == texts
            await b.assert_alive()
            assert [m for d in b.delivered for m in d.items] == []  # no second copy
            # accept() acknowledged them too; this ack returns once the deletion is committed.
            await b.ack(eids)
        # Acknowledged: gone for good, also across another restart.
        await relay.stop()
        await relay.start()
        async with raw_client(relay.url) as b:
            await b.resume(bob)
            assert await b.mail_until_synced() == []


async def test_acknowledged_send_survives_restart_right_after(accounts: Accounts) -> None:
    """Ok to a Send means committed: a restart straight after loses nothing."""
    relay = accounts.relay
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        envs = [envelope(bob.device_id) for _ in range(40)]
        async with raw_client(relay.url) as a:
            await a.resume(alice)
            for i, env in enumerate(envs, start=1):
                await a.send(wire.encode(wire.Send(id=i, envelopes=[env])))
            for _ in envs:
                assert isinstance(await a.answer(), wire.Ok)
        await relay.stop()
        await relay.start()
        async with raw_client(relay.url) as b:
            await b.resume(bob)
            got = [m.eid for m in await b.mail_until_synced()]
        assert sorted(got) == sorted(e.eid for e in envs) and len(got) == len(envs)


@pytest.mark.file_store
async def test_schema_keeps_no_sender_and_no_fine_time(accounts: Accounts) -> None:
    relay = accounts.relay
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        await accounts.register("bob")
        async with alice.connected() as link:
            await alice.send(link, "bob", "kept for the schema test")
        await publish_kem_keys(relay, alice)
        tables = [r[0] for r in await sql(relay, "SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert {"accounts", "devices", "sessions", "mailbox", "relay_meta", "signed_prekeys", "one_time_prekeys",
                "kem_prekeys"} <= set(tables)
        columns = {
            t: [r[1] for r in await sql(relay, f"PRAGMA table_info({t})")]
            for t in tables
            if not t.startswith(("sqlite_", "_sqlite_migrations"))
        }
        assert set(columns["mailbox"]) == {"seq", "device_id", "eid", "blob", "expires_day"}
        assert set(columns["kem_prekeys"]) == {"device_id", "use", "key_id", "public", "sig"}
        assert "name" not in columns["accounts"]  # only name_mac
        forbidden = ("sender", "from", "ip", "addr", "host", "port", "time", "_at", "stamp", "ts")
        for table, cols in columns.items():
            for col in cols:
                assert not any(col == f or col.startswith(f) or col.endswith(f) for f in forbidden), (
                    f"{table}.{col}"
                )
        # Every time-like column is a day number, and holds one (the tables only a
        # revocation fills are checked in test_relay_accounts.py).
        for table, cols in columns.items():
            for col in cols:
                if col.endswith("_day"):
                    # (a day only set once something happened: empty until then)
                    values = [r[0] for r in await sql(relay, f"SELECT {col} FROM {table}")
                              if not (r[0] is None and col in ("code_fail_day", "recovery_fail_day"))]
                    assert values or table in {"revoked_devices", "revoked_tokens"} or col in ("code_fail_day", "recovery_fail_day"), (
                        f"{table}.{col} is empty")
                    assert all(isinstance(v, int) and today() - 1 <= v <= today() + 200 for v in values), (
                        f"{table}.{col}: {values}"
                    )
        (expiry,) = (await sql(relay, "SELECT expires_day FROM mailbox"))[0]
        assert expiry == today() + MAIL_TTL_DAYS


@pytest.mark.file_store
async def test_session_token_is_stored_only_as_its_hash(accounts: Accounts) -> None:
    relay = accounts.relay
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        async with raw_client(relay.url) as c:
            session = await c.ok(await c.login_frame(alice))
            assert isinstance(session, wire.SessionOk)
        token = session.token
        hashes = [bytes(r[0]) for r in await sql(relay, "SELECT token_hash FROM sessions")]
        assert hashlib.sha256(token).digest() in hashes
        # The token appears nowhere in the database, in any table or column.
        tables = [r[0] for r in await sql(relay, "SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for row in await sql(relay, f"SELECT * FROM {table}"):
                for cell in row:
                    if isinstance(cell, bytes | str):
                        raw = cell if isinstance(cell, bytes) else cell.encode()
                        assert token not in raw and token.hex().encode() not in raw, table
        # The stored hash is not itself a credential.
        async with raw_client(relay.url) as c:
            await c.refused(wire.Resume(id=1, token=hashlib.sha256(token).digest()), E.AUTH_FAILED)
        async with raw_client(relay.url) as c:
            await c.ok(wire.Resume(id=1, token=token))


@pytest.mark.file_store
async def test_an_answered_send_waits_for_the_disk_unless_told_not_to(accounts: Accounts, tmp_path: Path) -> None:
    """synchronous=FULL (2) by default, in the relay's store and a device's: a commit is
    fsynced before the send it carries is answered (or a message is acknowledged); only
    --relaxed-durability (RelayConfig.durable=False) makes it NORMAL (1)."""
    node = await accounts.register("alice")
    assert await sql(accounts.relay, "PRAGMA synchronous") == [(2,)]
    assert node.store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    from relay.server import RelayConfig, RelayState

    relaxed = RelayState(RelayConfig(data_dir=tmp_path / "relaxed", durable=False))
    try:
        assert relaxed.store.conn.execute("PRAGMA synchronous").fetchone()[0] == 1
    finally:
        relaxed.store.close()
        os.close(relaxed._lock)
