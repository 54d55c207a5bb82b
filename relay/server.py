"""The relay process: open the store, start the group-commit loop, serve WebSockets."""

from __future__ import annotations

import fcntl
import logging
import math
import os
import resource
import secrets
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from trio_websocket import WebSocketServer

import wire
from cipherdb import WrongKey
from relay.connection import (
    COMMIT_BYTES,
    MAX_CONNECTIONS,
    RELAY_WAITING_BYTES,
    UNAUTHENTICATED_MAX_MESSAGE,
    Limits,
    RelayConnections,
)
from relay.delivery import BUFFER_BYTES, DELIVER_BYTES, UNACKED_LIMIT, Router
from relay.keyfile import ENV_KEY, KEY_FILE, RelayKeyError, RelayKeys, load_root_key
from relay.mailroom import MAILBOX_LIMIT, Mailroom
from relay.service import RelayService
from relay.store import StoreError, open_sqlite
from relay.tls import RelayTls, TlsError
from relay.tlsstream import TlsListener

log = logging.getLogger("veil.relay")

DB_FILE = "relay.db"
LOCK_FILE = "relay.lock"  # flock held while the relay runs; holds its process id
SWITCH_INTERVAL = 0.0005
EXPIRE_EVERY = 3600.0
# Pending messages per connection inside trio-websocket before its reader stops reading;
# above 1 so that pings and close frames are answered while a request is handled, small
# because each may be a frame of up to WS_MAX_REQUEST bytes.
WS_QUEUE = 4


@dataclass
class RelayConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    mailbox_limit: int = MAILBOX_LIMIT
    limits: Limits = field(default_factory=Limits)
    tls: bool = True  # False: plain ws:// (--insecure-no-tls, or an onion relay behind tor)
    tls_cert: Path | None = None  # a certificate (chain) from a public authority, with tls_key
    tls_key: Path | None = None
    # Every answered send on disk before its answer (SQLite synchronous=FULL); False: it
    # survives a crash of the relay, not a power loss (--relaxed-durability).
    durable: bool = True
    # A PostgreSQL connection string (--store, VEIL_RELAY_STORE): several relay processes
    # over one database act as one relay. None: the SQLCipher file in data_dir.
    store: str | None = None
    reuse_port: bool = False  # listen with SO_REUSEPORT (the processes of --workers)


@dataclass(frozen=True)
class RelayInfo:
    """What a started relay reports: where it listens, and the pin of its own key."""

    host: str
    port: int
    relay_id: bytes
    pin: str | None = None  # None with a public certificate (or without TLS)
    tls_state: RelayTls | None = field(default=None, compare=False, repr=False)  # None: no TLS
    # The running relay's connections (to end them all after an onion client is revoked).
    connections: RelayConnections | None = field(default=None, compare=False, repr=False)

    @property
    def tls(self) -> bool:
        return self.tls_state is not None

    @property
    def url(self) -> str:
        """The relay's address for nodes (wire.address): wss://HOST:PORT#PIN with its own
        key, wss://HOST:PORT with a public certificate, ws://HOST:PORT without TLS."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if not self.tls:
            return f"ws://{host}:{self.port}"
        return f"wss://{host}:{self.port}" + (f"#{self.pin}" if self.pin else "")


class RelayStartError(Exception):
    """The relay cannot start (the message says why, for the operator)."""


class RelayState:
    """Everything a running relay holds (exposed for tests and the benchmark)."""

    def __init__(self, config: RelayConfig) -> None:
        try:
            config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            mode = config.data_dir.stat().st_mode
        except OSError as exc:
            raise RelayStartError(f"cannot use data directory {config.data_dir}: {exc.strerror}") from None
        if mode & 0o022:
            # Whoever can write in it could swap the keys or plant files the relay writes through.
            raise RelayStartError(
                f"data directory {config.data_dir} is writable by other users (mode {mode & 0o777:o}): chmod 700 it"
            )
        # A file store is this process's alone; the processes of a PostgreSQL service may
        # share one data directory (its keys), but not with a file-store relay.
        self._lock = _lock_data_dir(config.data_dir, shared=config.store is not None)
        try:
            self._open(config)
        except BaseException:
            os.close(self._lock)
            raise

    def _open(self, config: RelayConfig) -> None:
        try:
            self.keys = RelayKeys.from_root(load_root_key(config.data_dir))
            self.tls = RelayTls(config.data_dir, config.tls_cert, config.tls_key) if config.tls else None
            if config.store is not None:
                from relay.pgstore import open_postgresql

                self.store = open_postgresql(config.store, self.keys.column_key, self.keys.key_check)
            else:
                self.store = open_sqlite(config.data_dir / DB_FILE, self.keys.db_key, durable=config.durable)
        except WrongKey:
            raise RelayStartError(
                f"the relay key does not open {config.data_dir / DB_FILE} (wrong {ENV_KEY} or {KEY_FILE}?)"
            ) from None
        except (RelayKeyError, TlsError, StoreError) as exc:
            raise RelayStartError(str(exc)) from None
        except OSError as exc:
            raise RelayStartError(f"cannot use data directory {config.data_dir}: {exc.strerror}") from None
        with self.store.e.atomic():  # processes starting together agree on one id
            relay_id = self.store.meta("relay_id")
            if relay_id is None:
                relay_id = secrets.token_bytes(16)
                self.store.x("INSERT INTO relay_meta (key, value) VALUES ('relay_id', ?) ON CONFLICT DO NOTHING",
                             (relay_id,))
                relay_id = self.store.meta("relay_id")
                assert relay_id is not None
        self.relay_id = relay_id
        self.router = Router()
        self.mailroom = Mailroom(self.store, self.router.on_stored, mailbox_limit=config.mailbox_limit)
        self.service = RelayService(self.keys, relay_id, self.mailroom, self.router, config.limits.rations)
        self.connections = RelayConnections(self.service, config.limits)
        self.listener: Any = None  # relay.pgstore.Listener, with a shared store


def _lock_data_dir(data_dir: Path, *, shared: bool = False) -> int:
    """Hold an exclusive lock on the data directory for the life of the process: two
    relays on one database file would each miss the other's deliveries. The lock file
    holds this process's id, for commands that signal the relay (``veil relay invite``).
    ``shared`` (a PostgreSQL store): a shared lock, which any number of processes of the
    service hold together, and which keeps a file-store relay out."""
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise RelayStartError(f"cannot use data directory {data_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RelayStartError(f"another relay is running on {data_dir}") from None
    if not shared:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


async def _expire_loop(mailroom: Mailroom) -> None:
    while True:
        n = await mailroom.expire()
        if n:
            log.info("expired %d undelivered envelopes", n)
        await trio.sleep(EXPIRE_EVERY)


FD_RESERVE = 256  # open files kept for the database, logs, tor and accepting
HANDSHAKE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0
# What one connection with a session can make the relay hold at worst (docs/THREAT_MODEL.md,
# section 7): incoming messages (WS_QUEUE queued, one assembled, one handled, one joined),
# the ids of pushes it has not acknowledged, its outlet's buffer, and a deliver frame
# being encoded and written (and the library's copy of it).
WORST_PER_CONNECTION = ((WS_QUEUE + 3) * wire.WS_MAX_REQUEST + UNACKED_LIMIT * 160 + BUFFER_BYTES
                        + 3 * DELIVER_BYTES)
# What the relay holds whatever the connections: the relay-wide budgets and tables.
FIXED_BYTES = RELAY_WAITING_BYTES + COMMIT_BYTES + 512 * 1024 * 1024
MIN_CONNECTIONS = 64


def _memory_bytes() -> int | None:
    """The memory this process may use: the machine's, or its cgroup's limit if lower."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return int(total)


def _memory_room() -> int:
    """Connections whose worst case fits, with the fixed part, in half the memory."""
    total = _memory_bytes()
    if total is None:
        return MAX_CONNECTIONS
    return max(MIN_CONNECTIONS, (total // 2 - FIXED_BYTES) // WORST_PER_CONNECTION)


def _open_file_room() -> int:
    """Raise the open-file limit as far as allowed; how many connections fit under it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return max(16, soft - FD_RESERVE)


class _OncePerMinute(logging.Filter):
    """trio logs a traceback every 0.1 s while accept() fails for lack of file
    descriptors: keep one line a minute, without the traceback."""

    def __init__(self) -> None:
        super().__init__()
        self.last = -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self.last < 60:
            return False
        self.last = now
        record.exc_info = None
        record.exc_text = None
        return True


def _quiet_accept_errors() -> None:
    logger = logging.getLogger("trio.serve_listeners")
    if not any(isinstance(f, _OncePerMinute) for f in logger.filters):
        logger.addFilter(_OncePerMinute())


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound with SO_REUSEPORT (not listening yet): processes that each bind
    one on a port share its connections, which the kernel spreads among them."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(info[4])
    except BaseException:
        sock.close()
        raise
    return sock


async def _listen(host: str, port: int, reuse_port: bool = False) -> list[trio.SocketListener]:
    if not 0 <= port <= 65535:
        raise RelayStartError(f"port {port} is out of range (0 to 65535; 0 picks a free port)")
    try:
        if reuse_port:
            sock = reuse_port_socket(host, port)
            sock.listen(socket.SOMAXCONN)
            return [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise RelayStartError(f"cannot listen on {where}: {exc.strerror or exc}") from None


async def serve(
    config: RelayConfig,
    *,
    state: RelayState | None = None,
    task_status: trio.TaskStatus[RelayInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a relay until cancelled; reports a RelayInfo once it accepts connections.
    (``state`` lets a test or benchmark look inside the relay it runs.)"""
    # The commit thread gives up the GIL around every SQLite call and must get it back
    # from a busy event loop: with the default 5 ms switch interval that wait, not SQLite,
    # dominated commits under load (measured: 13.6 ms mean commit at 9.7k msgs/s).
    sys.setswitchinterval(SWITCH_INTERVAL)
    # Listen before touching the data directory: a port that is taken (or not ours to
    # use) must not leave a fresh data directory, key file and database behind.
    listeners = await _listen(config.host, config.port, config.reuse_port)
    _quiet_accept_errors()
    limits = config.limits
    if limits.max_connections is None:
        limits.max_connections = min(MAX_CONNECTIONS, _memory_room())
    limits.max_connections = min(limits.max_connections, _open_file_room())
    # Connections without a session never take more than half the room.
    limits.max_unauthenticated = max(1, min(limits.max_unauthenticated, limits.max_connections // 2))
    try:
        state = state or RelayState(config)
    except BaseException:
        for listener in listeners:
            await listener.aclose()
        raise
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(state.mailroom.run)
            state.service._nursery = nursery
            if state.store.shared:
                from relay.pgstore import Listener, PgEngine

                assert isinstance(state.store.e, PgEngine)
                state.listener = Listener(state.store.e, state.service.on_notice)
                await nursery.start(state.listener.run)
            nursery.start_soon(_expire_loop, state.mailroom)
            await nursery.start(state.connections.heartbeat)
            await nursery.start(state.connections.collector)
            served: list[trio.abc.Listener[Any]] = list(listeners)
            if state.tls is not None:
                # The TLS handshake runs inside the WebSocket handshake, under its timeout.
                # relay/tlsstream.py, not trio.SSLListener: the cheaper stream per frame.
                served = [TlsListener(lst, state.tls.context) for lst in listeners]
            server = WebSocketServer(
                state.connections.handle,
                # Any trio Listener serves (trio-websocket's annotation names its own two;
                # only its `port` and `listeners` properties look closer, and we use neither).
                served,  # type: ignore[arg-type]
                message_queue_size=WS_QUEUE,
                # Until a connection has a session (relay/connection.py raises it then),
                # from its first message on: one may come before the handler runs.
                max_message_size=UNAUTHENTICATED_MAX_MESSAGE,
                # A socket that never completes the handshake, or never finishes closing,
                # holds a file descriptor outside the connection counts: briefly.
                connect_timeout=HANDSHAKE_TIMEOUT,
                disconnect_timeout=CLOSE_TIMEOUT,
            )
            await nursery.start(server.run)
            tls = state.tls
            port = listeners[0].socket.getsockname()[1]
            info = RelayInfo(config.host, port, state.relay_id, tls.pin if tls else None, tls, state.connections)
            log.info("relay listening on port %d (pid %d)", port, os.getpid())
            task_status.started(info)
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:  # already closed if the server ran; closing is idempotent
                await listener.aclose()
            await state.mailroom.close()
        os.close(state._lock)
        log.info("relay stopped; store closed")
