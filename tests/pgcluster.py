"""A throwaway PostgreSQL cluster for tests and the benchmark: initdb in a temporary
directory, listening only on a Unix socket inside it (no TCP port at all), stopped and
deleted at the end. PostgreSQL refuses to run as root: as root, the cluster runs as the
``postgres`` user (Debian's package makes it) or ``nobody``.

    with PgCluster.start() as cluster:
        dsn = cluster.create_database("t1")   # postgresql:///t1?host=...&user=veil
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

SUPERUSER = "veil"


def pg_bindir() -> Path | None:
    """Where initdb, pg_ctl and postgres are: on PATH, or Debian's versioned directory."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: p.parent.parent.name)
    return debian[-1].parent if debian else None


def _run_as() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    for user in ("postgres", "nobody"):
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            continue
        return pw.pw_uid, pw.pw_gid
    raise RuntimeError("PostgreSQL cannot run as root, and there is no postgres or nobody user")


class PgCluster:
    def __init__(self, base: Path, bindir: Path, ids: tuple[int, int] | None) -> None:
        self.base = base
        self.bindir = bindir
        self.ids = ids
        self.data = base / "data"
        self.socket_dir = base / "sock"
        self.log = base / "postgres.log"

    def _cmd(self, *args: str) -> subprocess.CompletedProcess[str]:
        def drop() -> None:
            if self.ids is not None:
                os.setgid(self.ids[1])
                os.setgroups([])
                os.setuid(self.ids[0])

        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]], preexec_fn=drop, capture_output=True, text=True,
            check=True, timeout=120, env={**os.environ, "LC_ALL": "C"},
        )

    @classmethod
    @contextmanager
    def start(cls, *, fsync: bool = True) -> Iterator[PgCluster]:
        """``fsync=False`` for tests (nothing there must survive a power loss); the
        benchmark keeps PostgreSQL's durable default."""
        bindir = pg_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (initdb, pg_ctl); .ci/run installs it")
        ids = _run_as()
        base = Path(tempfile.mkdtemp(prefix="veil-pg-"))
        cluster = cls(base, bindir, ids)
        try:
            cluster.socket_dir.mkdir()
            if ids is not None:
                for p in (base, cluster.socket_dir):
                    os.chown(p, *ids)
            cluster._cmd("initdb", "-D", str(cluster.data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
                         "--no-sync")
            settings = {
                "listen_addresses": "''",
                "unix_socket_directories": f"'{cluster.socket_dir}'",
                "max_connections": "200",
                "fsync": "on" if fsync else "off",
                "synchronous_commit": "on" if fsync else "off",
                "full_page_writes": "on" if fsync else "off",
                "shared_buffers": "128MB",
            }
            with open(cluster.data / "postgresql.conf", "a") as conf:
                conf.write("".join(f"{k} = {v}\n" for k, v in settings.items()))
            cluster._cmd("pg_ctl", "-D", str(cluster.data), "-l", str(cluster.log), "-w", "-t", "60", "start")
            try:
                yield cluster
            finally:
                # A test cluster is thrown away: no need to wait for its clients to go.
                mode = "fast" if fsync else "immediate"
                cluster._cmd("pg_ctl", "-D", str(cluster.data), "-m", mode, "-w", "-t", "60", "stop")
        finally:
            shutil.rmtree(base, ignore_errors=True)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql:///{database}?host={quote(str(self.socket_dir), safe='')}&user={SUPERUSER}"

    def create_database(self, name: str) -> str:
        """A new, empty database; its connection string."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return self.dsn(name)
