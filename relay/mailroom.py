"""The store, off the event loop: worker threads, and group commit.

Every store call runs in a worker thread: one at a time for the SQLite file (a
``CapacityLimiter(1)``: exactly one thread touches its connection), a few at once for
PostgreSQL (each on a pooled connection). Mailbox writes (envelopes in, acks) are not
committed one by one: they queue up while the previous transaction runs, then the whole
queue is committed as one transaction (``RelayStore.commit_mail``), with one multi-row
INSERT for all the envelopes in it. A ``Send`` is answered only after its commit (its
``on_done`` callback runs on the trio thread once the transaction is durable: SQLite's
WAL fsynced with ``synchronous=FULL``, the default; PostgreSQL's commit with its default
``synchronous_commit``. It survives a crash or kill of the relay process, and a power
loss; with --relaxed-durability (SQLite ``NORMAL``) a power loss or operating-system crash
may lose the last commits, see docs/OPERATIONS.md). One fsync serves a whole group commit.

A send is all-or-nothing: if any of its devices does not exist, or its mailbox is full,
none of its envelopes is stored and it fails alone; the rest of the batch commits.
Per-device envelope counts (for the mailbox limit) and sequence numbers live in the
devices' rows, read under a row lock in the commit: any number of processes may write.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from relay.store import MailboxFull, Posting, RelayStore, Stored

log = logging.getLogger("veil.relay")

T = TypeVar("T")

MAILBOX_LIMIT = 10_000
ACKS_PER_COMMIT = 8192  # eids deleted in one group commit at most
MAX_PENDING_ACKS = 65536  # eids queued relay-wide before an ack waits

Done = Callable[[Exception | None], None]


__all__ = ["MAILBOX_LIMIT", "MailboxFull", "Mailroom"]
COMMIT_TRIES = 3  # a deadlock or serialization failure (PostgreSQL) is tried again


@dataclass
class _Enqueue(Posting):
    on_done: Done = lambda error: None


@dataclass
class _Ack:
    device_id: bytes
    eids: Sequence[bytes]


class Mailroom:
    """Async front of the RelayStore: single-thread access and group commit."""

    def __init__(
        self,
        store: RelayStore,
        on_stored: Callable[[list[Stored]], None],
        *,
        mailbox_limit: int = MAILBOX_LIMIT,
    ) -> None:
        self.store = store
        self._on_stored = on_stored
        self._limiter = trio.CapacityLimiter(store.e.threads)
        self._enqueues: list[_Enqueue] = []
        self._acks: deque[_Ack] = deque()
        self._wake = trio.Event()
        self.mailbox_limit = mailbox_limit
        self._pending_acks = 0  # eids queued in _acks
        self.commits = 0
        self.envelopes = 0
        self._committed = trio.Event()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one store method in a store thread (on one connection throughout)."""
        bound = self.store.e.bound

        def run() -> T:
            with bound():
                return fn(*args)

        return await trio.to_thread.run_sync(run, limiter=self._limiter)

    async def close(self) -> None:
        """Checkpoint and close the database (after the commit loop has stopped)."""
        await self.call(self.store.close)

    # ---- writes --------------------------------------------------------------------
    def submit(self, items: Sequence[tuple[bytes, bytes, bytes]], on_done: Done) -> None:
        """Queue (device_id, eid, blob) envelopes; ``on_done(None)`` once committed, or
        ``on_done(error)`` (UnknownDevice, MailboxFull, or a storage failure)."""
        self._enqueues.append(_Enqueue(items, on_done=on_done))
        self._wake.set()

    async def ack(self, device_id: bytes, eids: Sequence[bytes]) -> None:
        """Queue the deletion of delivered envelopes (committed with the next batches, at
        most ACKS_PER_COMMIT a commit); waits first while MAX_PENDING_ACKS are queued."""
        while not self.ack_fits():
            await self._committed.wait()
        self.ack_nowait(device_id, eids)

    def ack_nowait(self, device_id: bytes, eids: Sequence[bytes]) -> None:
        """``ack`` when ``ack_fits`` (the caller checked)."""
        self._acks.append(_Ack(device_id, eids))
        self._pending_acks += len(eids)
        self._wake.set()

    def ack_fits(self) -> bool:
        """Whether ``ack`` would not wait now."""
        return self._pending_acks < MAX_PENDING_ACKS

    async def wait_commit_after(self, count: int) -> None:
        """Wait until more than ``count`` group commits have finished (tests wait on
        this instead of on time: read ``commits``, check, then wait for the next)."""
        while self.commits <= count:
            await self._committed.wait()

    async def expire(self) -> int:
        return await self.call(self.store.expire)

    async def remove_device(self, device_id: bytes) -> None:
        await self.call(self.store.remove_device, device_id)

    async def revoke_device(self, account_id: int, device_id: bytes, allow_last: bool,
                            token_hash: bytes | None = None, auth_pub: bytes | None = None) -> None:
        """RelayStore.revoke_device in a store thread (a send to the device then fails as
        to an unknown device)."""
        await self.call(self.store.revoke_device, account_id, device_id, allow_last, token_hash, auth_pub)

    # ---- the commit loop -------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The group-commit loop. On cancellation the batch in flight still commits
        (a worker thread is not abandoned), so nothing acknowledged is ever lost."""
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            enqueues, self._enqueues = self._enqueues, []
            acks = self._take_acks()
            if not enqueues and not acks:
                continue
            try:
                await self.call(self._commit, enqueues, acks)
            except Exception as exc:  # the whole transaction failed: fail every send in it
                log.error("group commit failed: %s", type(exc).__name__)
                for failed in enqueues:
                    failed.error, failed.stored = exc, []
            self.commits += 1
            self._report(enqueues)
            # Not kept while waiting for the next batch: they hold the envelopes, and
            # through their callbacks the connections that sent them.
            del enqueues, acks
            self._committed.set()
            self._committed = trio.Event()

    def _report(self, enqueues: list[_Enqueue]) -> None:
        """After a commit: push what it stored, and answer every send in it."""
        stored = [s for w in enqueues for s in w.stored]
        self.envelopes += len(stored)
        # A callback that fails (a bug: the connections' own writes catch what a peer can
        # cause) must not stop this loop, nor the answers to the other sends of the batch.
        if stored:
            try:
                self._on_stored(stored)
            except Exception as exc:
                log.error("pushing stored mail failed: %s", type(exc).__name__)
        for w in enqueues:
            try:
                w.on_done(w.error)
            except Exception as exc:
                log.error("answering a send failed: %s", type(exc).__name__)

    def _take_acks(self) -> list[_Ack]:
        """The acks for this commit: the oldest, up to ACKS_PER_COMMIT eids (a flood of
        acks makes commits neither slower nor bigger than that)."""
        taken: list[_Ack] = []
        count = 0
        while self._acks and count < ACKS_PER_COMMIT:
            a = self._acks[0]
            room = ACKS_PER_COMMIT - count
            if len(a.eids) <= room:
                taken.append(self._acks.popleft())
                count += len(a.eids)
            else:
                taken.append(_Ack(a.device_id, a.eids[:room]))
                self._acks[0] = _Ack(a.device_id, a.eids[room:])
                count += room
        self._pending_acks -= count
        if self._acks:
            self._wake.set()  # more next time
        return taken

    def _commit(self, enqueues: list[_Enqueue], acks: list[_Ack]) -> None:
        transient = self.store.e.transient
        pairs = [(a.device_id, a.eids) for a in acks]
        for attempt in range(COMMIT_TRIES):
            try:
                self.store.commit_mail(enqueues, pairs, self.mailbox_limit)
                return
            except Exception as exc:
                for w in enqueues:
                    w.stored, w.error = [], None
                if not transient(exc) or attempt == COMMIT_TRIES - 1:
                    raise
