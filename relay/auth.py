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
from collections import OrderedDict
from dataclasses import dataclass

import trio

CHALLENGE_TTL = 60.0
MAX_CHALLENGES = 100_000
FIRST_DELAY = 0.2
MAX_DELAY = 10.0
FORGET_AFTER = 900.0
MAX_THROTTLED = 100_000  # account names with recent failures


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
    """Outstanding single-use challenges.

    Every challenge lives CHALLENGE_TTL, so insertion order is expiry order: expired ones
    are dropped from the front as new ones come in, and when the table is full the oldest
    goes. Each operation costs O(1) amortised; nothing rebuilds the table."""

    def __init__(self, limit: int = MAX_CHALLENGES) -> None:
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()
        self.limit = limit

    def __len__(self) -> int:
        return len(self._pending)

    def issue(self, mac: bytes, purpose: str) -> bytes:
        now = trio.current_time()
        self._prune(now)
        while len(self._pending) >= self.limit:
            self._pending.popitem(last=False)
        challenge = secrets.token_bytes(32)
        self._pending[challenge] = _Pending(mac, purpose, now + CHALLENGE_TTL)
        return challenge

    def _prune(self, now: float) -> None:
        while self._pending:
            oldest = next(iter(self._pending.values()))
            if oldest.expires > now:
                return
            self._pending.popitem(last=False)

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


@dataclass
class _Failures:
    count: int
    blocked_until: float
    touched: float  # when last changed: the table is ordered by this


class Throttle:
    """Growing delays after failures, per key (an account's name HMAC).

    ``attempt`` is the gate: it refuses a key that is blocked and, in the same step (no
    await in between), blocks it for as long as a failure would, so concurrent attempts
    on one key cannot all pass the check before any failure is recorded. ``succeed``
    lifts the block; ``fail`` lengthens it. Entries are kept in the order they were last
    touched; those quiet for FORGET_AFTER are dropped from the front, and when the table
    is full the least recently touched goes: O(1) amortised per call."""

    def __init__(self, limit: int = MAX_THROTTLED) -> None:
        self._failures: OrderedDict[bytes, _Failures] = OrderedDict()
        self.limit = limit

    def __len__(self) -> int:
        return len(self._failures)

    def _entry(self, key: bytes, now: float) -> _Failures:
        self._prune(now)
        entry = self._failures.pop(key, None)
        if entry is None or entry.blocked_until + FORGET_AFTER < now:
            entry = _Failures(0, 0.0, now)
        while len(self._failures) >= self.limit:
            self._failures.popitem(last=False)
        entry.touched = now
        self._failures[key] = entry  # to the end: the most recently touched
        return entry

    def _prune(self, now: float) -> None:
        while self._failures:
            oldest = next(iter(self._failures.values()))
            if oldest.touched + FORGET_AFTER + MAX_DELAY > now:
                return
            self._failures.popitem(last=False)

    def failures(self, key: bytes) -> int:
        """How many failures of ``key`` are remembered (0 once forgotten or lifted)."""
        entry = self._failures.get(key)
        return 0 if entry is None or entry.blocked_until + FORGET_AFTER < trio.current_time() else entry.count

    def blocked(self, key: bytes) -> bool:
        entry = self._failures.get(key)
        return entry is not None and entry.blocked_until > trio.current_time()

    def attempt(self, key: bytes) -> bool:
        """Whether an attempt on ``key`` may go ahead now; if so, the key is blocked until
        the attempt ends in ``succeed`` or ``fail``."""
        now = trio.current_time()
        entry = self._entry(key, now)
        if entry.blocked_until > now:
            return False
        entry.blocked_until = now + failure_delay(entry.count)
        return True

    def fail(self, key: bytes) -> float:
        """Record a failure; returns how long the failing caller should wait."""
        now = trio.current_time()
        entry = self._entry(key, now)
        delay = failure_delay(entry.count)
        entry.count += 1
        entry.blocked_until = max(entry.blocked_until, now + delay)
        return delay

    def succeed(self, key: bytes) -> None:
        self._failures.pop(key, None)


def failure_delay(failures: int) -> float:
    return float(min(FIRST_DELAY * 2.0**failures, MAX_DELAY))
