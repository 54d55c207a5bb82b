"""The relay's in-memory tables stay bounded and cheap whatever outsiders do: challenges
and failure throttles are pruned from their oldest end (O(1) amortised), never rebuilt."""

from __future__ import annotations

import secrets

import trio

from relay.auth import CHALLENGE_TTL, FORGET_AFTER, MAX_DELAY, Challenges, Throttle


async def test_the_throttle_table_is_bounded_and_forgets_quiet_names(autojump_clock: trio.abc.Clock) -> None:
    throttle = Throttle(limit=1000)
    victim = b"victim".ljust(32, b"\0")
    throttle.fail(victim)
    for i in range(5000):  # a flood of failures for made-up names
        throttle.fail(secrets.token_bytes(32))
        assert len(throttle) <= 1000
        if i % 100 == 0:
            await trio.sleep(0.01)
    await trio.sleep(FORGET_AFTER + MAX_DELAY + 1)
    throttle.fail(b"someone".ljust(32, b"\0"))
    assert len(throttle) == 1  # everything quiet for FORGET_AFTER went, from the front


async def test_an_attempt_blocks_the_key_until_it_ends(autojump_clock: trio.abc.Clock) -> None:
    throttle = Throttle()
    key = b"k" * 32
    assert throttle.attempt(key)
    assert not throttle.attempt(key)  # a second, concurrent attempt: refused at once
    throttle.succeed(key)
    assert throttle.attempt(key)
    throttle.fail(key)
    assert not throttle.attempt(key)
    await trio.sleep(MAX_DELAY)
    assert throttle.attempt(key)


async def test_the_challenge_table_is_bounded_and_drops_expired_ones(autojump_clock: trio.abc.Clock) -> None:
    challenges = Challenges(limit=500)
    mac = b"m" * 32
    kept = challenges.issue(mac, "login")
    for _ in range(2000):
        challenges.issue(secrets.token_bytes(32), "login")
        assert len(challenges) <= 500
    assert not challenges.redeem(kept, mac, "login")  # the oldest went first
    fresh = challenges.issue(mac, "login")
    assert challenges.redeem(fresh, mac, "login")
    await trio.sleep(CHALLENGE_TTL + 1)
    challenges.issue(mac, "bundle")
    assert len(challenges) == 1
