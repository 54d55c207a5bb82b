"""Shared fixtures: a real relay on 127.0.0.1 port 0, real SQLite files (and, for the
relay's own tests, a real PostgreSQL cluster too: tests/pgcluster.py), real nodes.

Every test in a ``tests/test_relay_*.py`` module that uses the ``relay`` fixture runs
twice: on the SQLCipher file store and on a fresh database of one PostgreSQL cluster
started for the session (skipped where PostgreSQL is not installed; .ci/run installs it).
A test about the file itself is marked ``file_store`` and runs on the file store only.

RSA-3072 keys are slow to make, so a pool is generated once per test session and handed
out to accounts; Argon2 uses the explicit test profile (TEST_KDF).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from keyvault.kdf import TEST_KDF
from keyvault.keys import AccountKeys
from node.home import Home
from node.node import Node
from relay.connection import Limits
from relay.mailroom import MAILBOX_LIMIT
from relay.server import RelayConfig, RelayInfo, RelayState, serve
from tests.pgcluster import PgCluster, pg_bindir

if TYPE_CHECKING:
    from tests.test_cli import RelayProcess

STORES = ("sqlite", "postgresql")
_databases = itertools.count(1)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The relay's own tests run on both stores (see the module's docstring)."""
    if "store_kind" not in metafunc.fixturenames:
        return
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if not module.startswith("test_relay_") or metafunc.definition.get_closest_marker("file_store"):
        return
    metafunc.parametrize("store_kind", STORES)


@pytest.fixture
def store_kind() -> str:
    return "sqlite"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One throwaway PostgreSQL cluster for the whole session (fsync off: tests)."""
    if pg_bindir() is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs it)")
    with PgCluster.start(fsync=False) as cluster:
        yield cluster


@pytest.fixture
def store_dsn(request: pytest.FixtureRequest, store_kind: str) -> str | None:
    """None for the file store; a fresh PostgreSQL database's connection string."""
    if store_kind == "sqlite":
        return None
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    return cluster.create_database(f"veil_test_{next(_databases)}")

KEY_POOL_SIZE = 8
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="session")
def key_pool() -> list[AccountKeys]:
    return [AccountKeys.generate() for _ in range(KEY_POOL_SIZE)]


@dataclass
class RelayRunner:
    """A relay in the test's nursery that can be stopped and started again."""

    nursery: trio.Nursery
    data_dir: Path
    port: int = 0
    mailbox_limit: int = MAILBOX_LIMIT
    limits: Limits = field(default_factory=Limits)
    store: str | None = None  # a PostgreSQL connection string; None: the file store
    tls: bool = True
    info: RelayInfo | None = None
    state: RelayState | None = None
    _scope: trio.CancelScope | None = None
    _stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        assert self.info is not None
        return self.info.url

    async def start(self) -> RelayInfo:
        config = RelayConfig(data_dir=self.data_dir, port=self.port, mailbox_limit=self.mailbox_limit,
                             limits=self.limits, store=self.store, tls=self.tls)
        self.state = RelayState(config)
        self._stopped = trio.Event()

        async def run(task_status: trio.TaskStatus[RelayInfo]) -> None:
            with trio.CancelScope() as scope:
                self._scope = scope
                await serve(config, state=self.state, task_status=task_status)
            self._stopped.set()

        self.info = await self.nursery.start(run)
        self.port = self.info.port  # a restart comes back on the same port
        return self.info

    async def stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()
        with trio.fail_after(10):
            await self._stopped.wait()


@pytest.fixture
async def relay(nursery: trio.Nursery, tmp_path: Path, store_dsn: str | None) -> AsyncIterator[RelayRunner]:
    runner = RelayRunner(nursery, tmp_path / "relay", store=store_dsn)
    await runner.start()
    yield runner
    if runner._scope is not None:
        runner._scope.cancel()


class Accounts:
    """Registers nodes with pooled keys and the test KDF profile."""

    def __init__(self, pool: list[AccountKeys], tmp: Path, relay: RelayRunner) -> None:
        self._pool = iter(pool)
        self.tmp = tmp
        self.relay = relay
        self.nodes: list[Node] = []

    async def register(self, name: str, password: str = PASSWORD) -> Node:
        node, _ = await Node.register(
            Home(self.tmp / f"home-{name}"), name, password, self.relay.url, kdf=TEST_KDF,
            keys=next(self._pool),
        )
        self.nodes.append(node)
        return node

    async def login(self, name: str, device: str, password: str = PASSWORD) -> Node:
        node = await Node.login(
            Home(self.tmp / f"home-{name}-{device}"), name, password, self.relay.url, min_kdf=TEST_KDF
        )
        self.nodes.append(node)
        return node

    def close(self) -> None:
        for n in self.nodes:
            try:
                n.close()
            except Exception:
                pass


@pytest.fixture
def accounts(key_pool: list[AccountKeys], tmp_path: Path, relay: RelayRunner) -> Iterator[Accounts]:
    acc = Accounts(key_pool, tmp_path, relay)
    yield acc
    acc.close()


@pytest.fixture
def relay_proc(tmp_path: Path) -> Iterator[RelayProcess]:
    """A real `veil relay serve` process on a free port of 127.0.0.1 (tests/test_cli.py)."""
    from tests.test_cli import start_relay, stop_relay

    rp = start_relay(tmp_path)
    yield rp
    stop_relay(rp)
