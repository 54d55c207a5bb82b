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
        now = trio.current_time()
        if self.stamp is None:
            self.stamp = now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


class KeyedBuckets(Generic[K]):
    """A token bucket per key, for at most ``max_keys`` keys, in memory only.

    Keys are kept in order of last use; past the cap the least recently used one is
    forgotten (O(1)), and a forgotten key starts full again. A key whose bucket has
    refilled is forgotten at once, as it holds nothing a fresh one would not."""

    def __init__(self, rate: float, burst: float, max_keys: int) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[K, tuple[float, float]] = OrderedDict()  # key -> (tokens, when)

    def __len__(self) -> int:
        return len(self._buckets)

    def available(self, key: K) -> float:
        got = self._buckets.get(key)
        if got is None:
            return self.burst
        tokens, stamp = got
        return min(self.burst, tokens + (trio.current_time() - stamp) * self.rate)

    def spend(self, key: K, n: float) -> None:
        """Take ``n`` tokens (the caller checked ``available``)."""
        now = trio.current_time()
        left = self.available(key) - n
        self._buckets[key] = (left, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        # Forget, from the oldest end, keys that have refilled: a few per call at most.
        for _ in range(2):
            oldest = next(iter(self._buckets.items()))
            tokens, stamp = oldest[1]
            if oldest[0] == key or tokens + (now - stamp) * self.rate < self.burst:
                break
            self._buckets.popitem(last=False)

    def take(self, key: K, n: float = 1.0) -> bool:
        if self.available(key) < n:
            return False
        self.spend(key, n)
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

    def release(self, n: int) -> None:
        self.used -= n
        self._changed.set()
        self._changed = trio.Event()
