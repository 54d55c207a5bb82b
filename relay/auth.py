"""Authentication state the relay keeps in memory: challenges and failure throttling.

Challenges are 32 random bytes, single use, valid for 60 s, bound to one account name
(its HMAC) and one purpose. They are never written to disk. Failed attempts slow down
the account they name and the connection that made them, with delays that double per
failure; every failure gets the same answer (``auth_failed``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

import trio

CHALLENGE_TTL = 60.0
MAX_CHALLENGES = 100_000
FIRST_DELAY = 0.2
MAX_DELAY = 10.0
FORGET_AFTER = 900.0


def name_mac(key: bytes, name: str) -> bytes:
    """How an account name is stored: HMAC-SHA256 under the relay's key."""
    return hmac.new(key, name.encode(), hashlib.sha256).digest()


def token_hash(token: bytes) -> bytes:
    """How a session token is stored: only its SHA-256."""
    return hashlib.sha256(token).digest()


def new_token() -> bytes:
    return secrets.token_bytes(32)


@dataclass
class _Pending:
    name_mac: bytes
    purpose: str
    expires: float


class Challenges:
    """Outstanding single-use challenges."""

    def __init__(self) -> None:
        self._pending: dict[bytes, _Pending] = {}

    def issue(self, mac: bytes, purpose: str) -> bytes:
        now = trio.current_time()
        if len(self._pending) >= MAX_CHALLENGES:
            self._pending = {c: p for c, p in self._pending.items() if p.expires > now}
            while len(self._pending) >= MAX_CHALLENGES:  # still full: drop the oldest
                del self._pending[next(iter(self._pending))]
        challenge = secrets.token_bytes(32)
        self._pending[challenge] = _Pending(mac, purpose, now + CHALLENGE_TTL)
        return challenge

    def redeem(self, challenge: bytes, mac: bytes, purpose: str) -> bool:
        """True once for a live challenge issued for this account and purpose."""
        pending = self._pending.pop(challenge, None)
        if pending is None:
            return False
        return (
            pending.expires > trio.current_time()
            and hmac.compare_digest(pending.name_mac, mac)
            and pending.purpose == purpose
        )


class Throttle:
    """Growing delays after failures, per key (an account's name HMAC)."""

    def __init__(self) -> None:
        self._failures: dict[bytes, tuple[int, float]] = {}  # key -> (count, blocked until)

    def blocked(self, key: bytes) -> bool:
        entry = self._failures.get(key)
        return entry is not None and entry[1] > trio.current_time()

    def fail(self, key: bytes) -> float:
        """Record a failure; returns how long the failing caller should wait."""
        now = trio.current_time()
        count, until = self._failures.get(key, (0, 0.0))
        if until + FORGET_AFTER < now:
            count = 0
        if len(self._failures) > MAX_CHALLENGES:
            self._failures = {k: v for k, v in self._failures.items() if v[1] + FORGET_AFTER > now}
        delay = float(min(FIRST_DELAY * 2.0**count, MAX_DELAY))
        self._failures[key] = (count + 1, now + delay)
        return delay

    def succeed(self, key: bytes) -> None:
        self._failures.pop(key, None)


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
