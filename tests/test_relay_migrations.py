"""The relay's store migrations on data written before them: a database as the relay
before post-quantum keys left it (SQLite migrations 0001-0006, before 0007_kem_prekeys;
PostgreSQL 0001, before 0002_kem_prekeys), holding what real devices put there (accounts,
devices, prekeys, sessions, mail). A real relay started on it keeps every row; the devices
connect with their sessions, publish their KEM keys and send; a new device logs in. On
both stores (conftest)."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import trio

from keyvault.envelope import HYBRID_VERSION, VERSION
from relay.keyfile import RelayKeys
from relay.server import DB_FILE
from relay.store import migrations as relay_migrations
from tests.conftest import Accounts, RelayRunner
from tests.pgcluster import PgCluster
from tests.test_forward_secrecy import captured as held
from tests.test_forward_secrecy import receive, send
from tests.test_node_pq import (
    PUBLISHED,
    classical_pair,
    kem_counts,
    relay_rows,
    relay_sql,
    session_is_pq,
)
from tests.test_node_store import rebuild_before

DEADLINE = 60


def _plain(row: Any) -> tuple[Any, ...]:
    return tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)


def _sorted(rows: Any) -> list[tuple[Any, ...]]:
    return sorted((_plain(r) for r in rows), key=repr)


def rebuild_pg_before(cluster: PgCluster, dsn: str, keys: RelayKeys, stop_before: str) -> tuple[str, dict[str, Any]]:
    """A new database made by the PostgreSQL store's migrations before ``stop_before``
    only, holding the rows of its tables that the database at ``dsn`` holds now (identity
    columns and their sequences included). Its connection string, and those rows."""
    import psycopg

    from relay.pgstore import MIGRATIONS, PgEngine

    old = cluster.create_database(f"veil_old_{secrets.token_hex(4)}")
    PgEngine(old, keys.column_key, keys.key_check, stop_before=stop_before).close()
    kept: dict[str, Any] = {}
    with psycopg.connect(dsn) as src, psycopg.connect(old) as dst:
        names_before = [name for name, _ in MIGRATIONS[:[n for n, _ in MIGRATIONS].index(stop_before)]]
        assert [r[0] for r in dst.execute("SELECT name FROM veil_migrations")] == names_before
        tables = [r[0] for r in dst.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'veil_migrations'")]
        dst.execute("SET session_replication_role = replica")  # rows in any order: no FK checks
        for t in tables:
            cols = [r[0] for r in dst.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s ORDER BY ordinal_position",
                (t,))]
            names = ", ".join(cols)
            rows = [_plain(r) for r in src.execute(f"SELECT {names} FROM {t}")]  # type: ignore[arg-type]
            with dst.cursor() as cur:
                cur.executemany(f"INSERT INTO {t} ({names}) OVERRIDING SYSTEM VALUE VALUES"  # type: ignore[arg-type]
                                f" ({', '.join(['%s'] * len(cols))}) ON CONFLICT DO NOTHING", rows)
            kept[t] = sorted(rows, key=repr)
        for t, c in dst.execute("SELECT table_name, column_name FROM information_schema.columns"
                                " WHERE table_schema = 'public' AND is_identity = 'YES'").fetchall():
            dst.execute(f"SELECT setval(pg_get_serial_sequence('{t}', '{c}'), coalesce(max({c}), 0) + 1, false)"  # type: ignore[arg-type]
                        f" FROM {t}")
        dst.execute("SET session_replication_role = origin")
        dst.commit()
    return old, kept


async def test_a_relay_from_before_kem_prekeys_keeps_its_data_and_takes_them(
    accounts: Accounts, relay: RelayRunner, request: pytest.FixtureRequest
) -> None:
    with trio.fail_after(DEADLINE):
        # alice and bob as from before (no KEM keys anywhere); alice's first message to bob,
        # a version 2 envelope of an X3DH session, waits in his mailbox.
        alice, bob = await classical_pair(accounts, relay)
        await relay_sql(relay, "DELETE FROM kem_prekeys WHERE device_id = ?", alice.device_id)
        (mail,) = await held(relay, bob)
        assert mail[0] == VERSION
        state = relay.state
        assert state is not None
        keys = state.keys
        await relay.stop()
        if relay.store is None:
            before = rebuild_before(relay.data_dir / DB_FILE, keys.db_key, relay_migrations, "0007_kem_prekeys")
        else:
            cluster: PgCluster = request.getfixturevalue("pg_cluster")
            relay.store, before = rebuild_pg_before(cluster, relay.store, keys, "0002_kem_prekeys")
        assert "kem_prekeys" not in before
        assert all(before[t] for t in ("accounts", "devices", "sessions", "signed_prekeys", "one_time_prekeys",
                                       "mailbox", "relay_meta"))
        await relay.start()
        for table, rows in before.items():
            assert _sorted(await relay_rows(relay, f"SELECT * FROM {table}")) == rows, table
        assert await relay_rows(relay, "SELECT count(*) FROM kem_prekeys") == [(0,)]
        if relay.store is None:
            assert (await relay_rows(relay, "SELECT name FROM _sqlite_migrations ORDER BY id"))[-1] == ("0007_kem_prekeys",)
        else:
            assert ("0002_kem_prekeys",) in await relay_rows(relay, "SELECT name FROM veil_migrations")
        # Both devices resume their sessions; each connection publishes the device's keys.
        assert await receive(alice) == []
        assert await receive(bob) == ["classic"]  # the mail from before
        for node in (alice, bob):
            assert await kem_counts(relay, node) == PUBLISHED
        await send(bob, "alice", "answered")
        (answer,) = await held(relay, alice)
        assert answer[0] == HYBRID_VERSION
        assert await receive(alice) == ["answered"]
        # A new device logs in: its keys go up on that connection, and a session with it
        # is PQXDH, while the one from before stays classical.
        laptop = await accounts.login("bob", "laptop")
        assert await kem_counts(relay, laptop) == PUBLISHED
        await send(alice, "bob", "to both")
        assert await receive(bob) == ["to both"]
        assert await receive(laptop) == ["to both"]
        assert session_is_pq(alice, "bob", laptop.device_id)
        assert not session_is_pq(alice, "bob", bob.device_id)
