"""The relay's bounds on what peers can make it do: token buckets for rates, byte budgets
for memory held on a peer's behalf. Pure bookkeeping on the trio clock."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)


class Bucket:
    """A token bucket on the trio clock: ``rate`` tokens a second, at most ``burst``."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp: float | None = None  # set at the first take (made outside trio, it may be)

    def take(self, n: float = 1.0) -> bool:
        if self.ready(n):
            self.tokens -= n
            return True
        return False

    def ready(self, n: float = 1.0) -> bool:
        """Whether ``take(n)`` would succeed now (nothing is taken)."""
        now = trio.current_time()
        if self.stamp is None:
            self.stamp = now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens >= n


class KeyedBuckets(Generic[K]):
    """A token bucket per key, for at most ``max_keys`` keys, in memory only.

    Keys are kept in order of last use. Keys whose buckets have refilled hold nothing a
    fresh one would not, and are dropped from the oldest end as new keys come (amortised
    O(1)). When the table is full of keys that have not refilled, a new key either pushes
    out the least recently used one (which then starts full again), or, with
    ``fail_closed``, is refused: then whoever owns the table cannot reset a spent bucket by
    touching many new keys."""

    def __init__(self, rate: float, burst: float, max_keys: int, *, fail_closed: bool = False) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self.fail_closed = fail_closed
        self._buckets: OrderedDict[K, tuple[float, float]] = OrderedDict()  # key -> (tokens, when)

    def __len__(self) -> int:
        return len(self._buckets)

    def available(self, key: K) -> float:
        got = self._buckets.get(key)
        if got is None:
            return self.burst
        tokens, stamp = got
        return min(self.burst, tokens + (trio.current_time() - stamp) * self.rate)

    def _prune(self, now: float) -> None:
        while self._buckets:
            tokens, stamp = next(iter(self._buckets.values()))
            if tokens + (now - stamp) * self.rate < self.burst:
                return
            self._buckets.popitem(last=False)

    def can_take(self, wants: dict[K, float]) -> bool:
        """Whether every ``key: n`` in ``wants`` could be taken at once."""
        if self.fail_closed:
            self._prune(trio.current_time())  # first: a pruned key counts as new below
        new = 0
        for k, n in wants.items():
            if k not in self._buckets:
                new += 1
                if n > self.burst:
                    return False
            elif self.available(k) < n:
                return False
        return not (self.fail_closed and new and self.max_keys - len(self._buckets) < new)

    def spend(self, key: K, n: float) -> None:
        """Take ``n`` tokens (the caller checked ``can_take``; a fail-closed table never
        pushes a key out for a new one)."""
        now = trio.current_time()
        left = self.available(key) - n
        self._buckets[key] = (left, now)
        self._buckets.move_to_end(key)
        self._prune(now)
        if not self.fail_closed:
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)

    def give_back(self, key: K, n: float) -> None:
        """Return ``n`` tokens taken for a key (its send failed): the key keeps its place,
        and goes once full again; a key already forgotten has refilled and gets nothing."""
        got = self._buckets.get(key)
        if got is None:
            return
        now = trio.current_time()
        tokens = min(self.burst, got[0] + (now - got[1]) * self.rate + n)
        if tokens >= self.burst:
            del self._buckets[key]
        else:
            self._buckets[key] = (tokens, now)  # assignment to an existing key keeps its place

    def take(self, key: K, n: float = 1.0) -> bool:
        if not self.can_take({key: n}):
            return False
        self.spend(key, n)
        return True


class AccountBuckets(Generic[K]):
    """Token buckets per (account, key), kept account by account: one account holds at
    most ``per_account`` keys and cannot push its own spent buckets out (its table fails
    closed: a new key is refused until old ones refill), and all accounts together at
    most ``max_keys`` (past that, the least recently active account's whole table goes,
    which gives that account a fresh start: filling the tables that far takes real sends to
    that many distinct devices, since keys of failed sends are given back and forgotten)."""

    def __init__(self, rate: float, burst: float, per_account: int, max_keys: int) -> None:
        self.rate, self.burst = rate, burst
        self.per_account, self.max_keys = per_account, max_keys
        self._accounts: OrderedDict[int, KeyedBuckets[K]] = OrderedDict()
        self._total = 0

    def __len__(self) -> int:
        return self._total

    def _table(self, account: int) -> KeyedBuckets[K] | None:
        return self._accounts.get(account)

    def available(self, account: int, key: K) -> float:
        table = self._table(account)
        return self.burst if table is None else table.available(key)

    def can_take(self, account: int, wants: dict[K, float]) -> bool:
        table = self._table(account)
        if table is None:
            return all(n <= self.burst for n in wants.values()) and len(wants) <= self.per_account
        before = len(table)
        ok = table.can_take(wants)  # may drop refilled keys
        self._total += len(table) - before
        if not table:
            del self._accounts[account]
        return ok

    def spend(self, account: int, key: K, n: float) -> None:
        table = self._accounts.get(account)
        if table is None:
            table = self._accounts[account] = KeyedBuckets(self.rate, self.burst, self.per_account, fail_closed=True)
        self._accounts.move_to_end(account)
        before = len(table)
        table.spend(key, n)
        self._total += len(table) - before
        while (self._total > self.max_keys or len(self._accounts) > self.max_keys) and len(self._accounts) > 1:
            _, oldest = self._accounts.popitem(last=False)
            self._total -= len(oldest)

    def give_back(self, account: int, key: K, n: float) -> None:
        table = self._accounts.get(account)
        if table is None:
            return
        before = len(table)
        table.give_back(key, n)
        self._total += len(table) - before
        if not table:
            del self._accounts[account]

    def take(self, account: int, key: K, n: float = 1.0) -> bool:
        if not self.can_take(account, {key: n}):
            return False
        self.spend(account, key, n)
        return True


class ByteBudget:
    """Bytes that may be held at once. ``acquire(n)`` waits until ``n`` more fit; a frame
    larger than the whole budget goes when nothing else is held, so nothing waits for
    ever."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = trio.Event()

    async def acquire(self, n: int) -> None:
        while self.used and self.used + n > self.limit:
            await self._changed.wait()
        self.used += n

    def fits(self, n: int) -> bool:
        """Whether ``acquire(n)`` would not wait now."""
        return not self.used or self.used + n <= self.limit

    def charge(self, n: int) -> None:
        """Take ``n`` without waiting (the caller checked ``fits``)."""
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        if self._changed.statistics().tasks_waiting:  # a fresh event only when it was used
            self._changed.set()
            self._changed = trio.Event()
