"""The relay's bounds on what peers can make it do: token buckets for rates, byte budgets
for memory held on a peer's behalf. Pure bookkeeping on the trio clock."""

from __future__ import annotations

import trio


class Bucket:
    """A token bucket on the trio clock: ``rate`` tokens a second, at most ``burst``."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp: float | None = None  # set at the first take (made outside trio, it may be)

    def take(self) -> bool:
        now = trio.current_time()
        if self.stamp is None:
            self.stamp = now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


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
