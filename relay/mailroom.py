"""The store, off the event loop: one worker thread owns the connection, with group commit.

Every store call runs in a worker thread under ``CapacityLimiter(1)``, so exactly one
thread touches the SQLite connection at a time. Mailbox writes (envelopes in, acks) are
not committed one by one: they queue up while the previous transaction runs, then the
whole queue is committed as one transaction (each request in its own savepoint, so one
bad request cannot undo the others). A request is answered only after its commit.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from relay.store import RelayStore, Stored, UnknownDevice

log = logging.getLogger("veil.relay")

T = TypeVar("T")

MAILBOX_LIMIT = 10_000


class MailboxFull(Exception):
    pass


@dataclass
class _Write:
    kind: str  # "enqueue" or "ack"
    device_id: bytes = b""
    items: Sequence[tuple[bytes, bytes, bytes]] = ()
    eids: Sequence[bytes] = ()
    done: trio.Event = field(default_factory=trio.Event)
    stored: list[Stored] = field(default_factory=list)
    error: Exception | None = None


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
        self._limiter = trio.CapacityLimiter(1)
        self._queue: list[_Write] = []
        self._wake = trio.Event()
        self.mailbox_limit = mailbox_limit
        self.commits = 0
        self.writes = 0

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one store method in the store's thread."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def close(self) -> None:
        """Checkpoint and close the database (after the commit loop has stopped)."""
        await self.call(self.store.close)

    async def enqueue(self, items: Sequence[tuple[bytes, bytes, bytes]]) -> list[Stored]:
        """Store (device_id, eid, blob) envelopes; returns once they are committed."""
        return (await self._submit(_Write("enqueue", items=items))).stored

    async def ack(self, device_id: bytes, eids: Sequence[bytes]) -> None:
        """Delete delivered envelopes; returns once the deletion is committed."""
        await self._submit(_Write("ack", device_id=device_id, eids=eids))

    async def _submit(self, write: _Write) -> _Write:
        self._queue.append(write)
        self._wake.set()
        await write.done.wait()
        if write.error is not None:
            raise write.error
        return write

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The group-commit loop. On cancellation the batch in flight still commits
        (a worker thread is not abandoned), so nothing acknowledged is ever lost."""
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            try:
                await trio.to_thread.run_sync(self._commit, batch, limiter=self._limiter)
            except Exception as exc:  # the whole transaction failed: fail every request
                log.error("group commit failed: %s", type(exc).__name__)
                for w in batch:
                    w.error = exc if w.error is None else w.error
                    w.stored = []
            self.commits += 1
            self.writes += len(batch)
            stored = [s for w in batch if w.error is None for s in w.stored]
            if stored:
                self._on_stored(stored)
            for w in batch:
                w.done.set()

    def _commit(self, batch: list[_Write]) -> None:
        store = self.store
        with store.db.atomic():
            counts = store.mailbox_counts(
                d for w in batch if w.kind == "enqueue" for d, _, _ in w.items
            ) if self.mailbox_limit else {}
            for w in batch:
                try:
                    with store.db.atomic():  # a savepoint per request
                        if w.kind == "enqueue":
                            adding = Counter(d for d, _, _ in w.items)
                            limit = self.mailbox_limit
                            if limit and any(counts.get(d, 0) + n > limit for d, n in adding.items()):
                                raise MailboxFull()
                            w.stored = store.enqueue(w.items)
                            for d, n in adding.items():
                                counts[d] = counts.get(d, 0) + n
                        else:
                            store.ack(w.device_id, w.eids)
                except (UnknownDevice, MailboxFull) as exc:
                    w.error = exc
                    w.stored = []
