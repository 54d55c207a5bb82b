"""The store, off the event loop: one worker thread owns the connection, with group commit.

Every store call runs in a worker thread under ``CapacityLimiter(1)``, so exactly one
thread touches the SQLite connection at a time. Mailbox writes (envelopes in, acks) are
not committed one by one: they queue up while the previous transaction runs, then the
whole queue is committed as one transaction, with one multi-row INSERT for all the
envelopes in it. A ``Send`` is answered only after its commit (its ``on_done`` callback
runs on the trio thread once the transaction is in the WAL and, with ``synchronous=FULL``
(the default), fsynced: it survives a crash or kill of the relay process, and a power loss;
with --relaxed-durability (``NORMAL``) a power loss or operating-system crash may lose the
last commits, see docs/OPERATIONS.md). One fsync serves a whole group commit.

A send is all-or-nothing: if any of its devices does not exist, or its mailbox is full,
none of its envelopes is stored and it fails alone; the rest of the batch commits.

Per-device envelope counts (for the mailbox limit) and sequence numbers are kept in
memory by the commit thread, loaded from the database the first time a device is seen:
this process is the only writer.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from relay.store import RelayStore, Stored, UnknownDevice

log = logging.getLogger("veil.relay")

T = TypeVar("T")

MAILBOX_LIMIT = 10_000
ACKS_PER_COMMIT = 8192  # eids deleted in one group commit at most
MAX_PENDING_ACKS = 65536  # eids queued relay-wide before an ack waits

Done = Callable[[Exception | None], None]


class MailboxFull(Exception):
    pass


@dataclass
class _Enqueue:
    items: Sequence[tuple[bytes, bytes, bytes]]  # (device_id, eid, blob)
    on_done: Done
    stored: list[Stored] = field(default_factory=list)
    error: Exception | None = None


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
        self._limiter = trio.CapacityLimiter(1)
        self._enqueues: list[_Enqueue] = []
        self._acks: deque[_Ack] = deque()
        self._wake = trio.Event()
        self.mailbox_limit = mailbox_limit
        # Owned by the commit thread (always under self._limiter):
        self._counts: dict[bytes, int] = {}
        self._last_seq: dict[bytes, int] = {}
        self._known: set[bytes] = set()  # devices known to exist
        self._pending_acks = 0  # eids queued in _acks
        self.commits = 0
        self.envelopes = 0
        self._committed = trio.Event()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one store method in the store's thread."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def close(self) -> None:
        """Checkpoint and close the database (after the commit loop has stopped)."""
        await self.call(self.store.close)

    # ---- writes --------------------------------------------------------------------
    def submit(self, items: Sequence[tuple[bytes, bytes, bytes]], on_done: Done) -> None:
        """Queue (device_id, eid, blob) envelopes; ``on_done(None)`` once committed, or
        ``on_done(error)`` (UnknownDevice, MailboxFull, or a storage failure)."""
        self._enqueues.append(_Enqueue(items, on_done))
        self._wake.set()

    async def ack(self, device_id: bytes, eids: Sequence[bytes]) -> None:
        """Queue the deletion of delivered envelopes (committed with the next batches, at
        most ACKS_PER_COMMIT a commit); waits first while MAX_PENDING_ACKS are queued."""
        while self._pending_acks >= MAX_PENDING_ACKS:
            await self._committed.wait()
        self._acks.append(_Ack(device_id, eids))
        self._pending_acks += len(eids)
        self._wake.set()

    async def wait_commit_after(self, count: int) -> None:
        """Wait until more than ``count`` group commits have finished (tests wait on
        this instead of on time: read ``commits``, check, then wait for the next)."""
        while self.commits <= count:
            await self._committed.wait()

    async def expire(self) -> int:
        def run() -> int:
            self._counts.clear()  # expiry deletes behind the counts' back
            return self.store.expire()

        return await self.call(run)

    async def remove_device(self, device_id: bytes) -> None:
        def run() -> None:
            self._counts.pop(device_id, None)
            self._known.discard(device_id)
            self.store.remove_device(device_id)

        await self.call(run)

    async def revoke_device(self, account_id: int, device_id: bytes, allow_last: bool,
                            token_hash: bytes | None = None, auth_pub: bytes | None = None) -> None:
        """RelayStore.revoke_device in the store's thread, forgetting what the commit
        thread knows of the device (a send to it then fails as to an unknown device)."""

        def run() -> None:
            self._counts.pop(device_id, None)
            self._known.discard(device_id)
            self.store.revoke_device(account_id, device_id, allow_last, token_hash, auth_pub)

        await self.call(run)

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
                await trio.to_thread.run_sync(self._commit, enqueues, acks, limiter=self._limiter)
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
        if stored:
            self._on_stored(stored)
        for w in enqueues:
            w.on_done(w.error)

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

    def _device_state(self, device_id: bytes) -> None:
        if device_id not in self._counts or device_id not in self._last_seq:
            count, last = self.store.mailbox_state(device_id)
            self._counts[device_id] = count
            # Sequence numbers only grow while this process runs (a live outlet may have
            # seen higher ones than the mailbox now holds).
            self._last_seq[device_id] = max(last, self._last_seq.get(device_id, 0))

    def _commit(self, enqueues: list[_Enqueue], acks: list[_Ack]) -> None:
        # Few statements per batch, whatever its size: the commit thread gives up the GIL
        # around every statement step, and getting it back from a busy event loop is
        # what a commit under load spends most of its time on.
        store, conn = self.store, self.store.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            devices = {d for w in enqueues for d, _, _ in w.items}
            unknown = devices - self._known
            if unknown:
                self._known |= store.existing_devices(unknown)
            rows: list[tuple[bytes, int, bytes, bytes]] = []
            seen: set[tuple[bytes, bytes]] = set()
            for w in enqueues:
                if any(d not in self._known for d, _, _ in w.items):
                    w.error = UnknownDevice()
                    continue
                fresh: dict[tuple[bytes, bytes], bytes] = {}
                for d, eid, blob in w.items:
                    if (d, eid) not in seen and (d, eid) not in fresh:
                        fresh[(d, eid)] = blob
                adding = Counter(d for d, _ in fresh)
                for d in adding:
                    self._device_state(d)
                limit = self.mailbox_limit
                if limit and any(self._counts[d] + n > limit for d, n in adding.items()):
                    # Perhaps a retry of envelopes already stored: those do not count.
                    taken = store.stored_pairs(list(fresh))
                    for pair in taken:
                        del fresh[pair]
                    seen.update(taken)
                    adding = Counter(d for d, _ in fresh)
                    if any(self._counts[d] + n > limit for d, n in adding.items()):
                        w.error = MailboxFull()
                        continue
                for (d, eid), blob in fresh.items():
                    self._counts[d] += 1
                    self._last_seq[d] += 1
                    rows.append((d, self._last_seq[d], eid, blob))
                    w.stored.append(Stored(d, self._last_seq[d], eid, blob))
                seen.update(fresh)  # a later send in this batch with the same envelope
            if rows and store.insert_mail(rows) != len(rows):
                # Retried sends: envelopes a mailbox already held were not inserted again;
                # find which (their fresh sequence numbers are absent), so that they are
                # neither counted nor pushed twice. Rare: a lost answer to a send.
                inserted = store.present_seqs([(d, seq) for d, seq, _, _ in rows])
                for d, seq, _, _ in rows:
                    if (d, seq) not in inserted:
                        self._counts[d] -= 1
                for w in enqueues:
                    w.stored = [st for st in w.stored if (st.device_id, st.seq) in inserted]
            if acks:
                acked = [(a.device_id, eid) for a in acks for eid in dict.fromkeys(a.eids)]
                deleted = store.ack(acked)
                per_device = Counter(d for d, _ in acked)
                for d, n in per_device.items():
                    if d in self._counts:
                        if deleted == len(acked):
                            self._counts[d] = max(0, self._counts[d] - n)
                        else:  # some acks named nothing: count those mailboxes again
                            del self._counts[d]
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            for w in enqueues:
                w.stored = []
            self._counts.clear()
            raise
