"""The relay's in-memory tables stay bounded and cheap whatever outsiders do: challenges
and failure throttles are pruned from their oldest end (O(1) amortised), never rebuilt."""

from __future__ import annotations

import secrets

import trio
import trio.testing

import wire
from relay.auth import CHALLENGE_TTL, FORGET_AFTER, MAX_DELAY, Challenges, Throttle
from relay.delivery import BUFFER_BYTES, UNACKED_LIMIT, Outlet
from relay.limits import AccountBuckets, KeyedBuckets
from relay.store import Stored


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


async def test_keyed_buckets_are_bounded_and_forget_refilled_keys(autojump_clock: trio.abc.Clock) -> None:
    buckets: KeyedBuckets[int] = KeyedBuckets(rate=1.0, burst=3.0, max_keys=100)
    assert [buckets.take(7) for _ in range(4)] == [True, True, True, False]
    for k in range(1000):  # many keys: the table stays at its cap, oldest first out
        buckets.take(k + 10)
        assert len(buckets) <= 100
    assert buckets.available(7) == 3.0  # forgotten: full again (the cap's documented cost)
    buckets.spend(1, 2)
    await trio.sleep(10)  # everything has refilled
    buckets.take(2)
    buckets.take(3)
    assert len(buckets) < 100  # refilled keys are dropped from the oldest end as it goes


def test_an_outlet_remembers_a_bounded_number_of_unacknowledged_envelopes() -> None:
    outlet = Outlet(b"d" * 16)
    eids = [i.to_bytes(16, "big") for i in range(UNACKED_LIMIT + 10)]
    for k in range(0, len(eids), 64):
        outlet._pushed(eids[k : k + 64])
    assert len(outlet.unacked) == UNACKED_LIMIT
    assert outlet.acknowledged([eids[0], eids[-1], eids[-1]]) == [eids[-1]]  # the oldest is forgotten
    assert outlet.acknowledged([eids[-1]]) == []  # and nothing counts twice


async def test_an_account_cannot_reset_its_own_spent_buckets(autojump_clock: trio.abc.Clock) -> None:
    buckets: AccountBuckets[int] = AccountBuckets(rate=0.01, burst=2.0, per_account=4, max_keys=1000)
    assert buckets.take(1, 99, 2)  # account 1 spends its bucket for key 99
    for k in range(10):  # then names many other keys
        buckets.take(1, k)
    assert not buckets.take(1, 99)  # still spent: its table failed closed, nothing was pushed out
    assert not buckets.can_take(1, {500: 1})  # and new keys wait until old ones refill
    assert buckets.take(2, 99)  # another account is not affected
    await trio.sleep(200)  # everything refills
    assert buckets.take(1, 500) and buckets.take(1, 99)
    for account in range(3, 2000):  # many accounts: bounded in all
        buckets.take(account, 1)
        assert len(buckets) <= 1000


def test_an_outlet_buffers_a_bounded_number_of_bytes() -> None:
    outlet = Outlet(b"d" * 16)
    outlet._refill = False  # as after the first mailbox read
    blob = b"x" * 60_000
    for seq in range(1, 100):
        outlet.offer([Stored(b"d" * 16, seq, seq.to_bytes(16, "big"), blob)])
        assert outlet._pending_bytes <= BUFFER_BYTES
    assert outlet._refill  # it gave up buffering: the rest is read from the mailbox
    assert outlet._pending == [] and outlet._pending_bytes == 0


async def test_a_fail_closed_table_cannot_be_turned_over(autojump_clock: trio.abc.Clock) -> None:
    """The attack an earlier version let through: refill one key, fill the rest with
    made-up keys whose sends failed, then name one more key to push the spent one out."""
    buckets: AccountBuckets[str] = AccountBuckets(rate=0.5, burst=300.0, per_account=6, max_keys=1000)
    assert buckets.take(1, "A", 1)
    assert buckets.take(1, "V", 300)  # the victim's device: spent
    for k in range(4):  # made-up devices: taken, and given back when the send fails
        assert buckets.take(1, f"F{k}", 1)
        buckets.give_back(1, f"F{k}", 1)
    assert len(buckets) == 2  # given back in full: gone again, not filling the table
    await trio.sleep(10)  # "A" refills; "V" does not (5 of 300)
    for k in range(20):
        buckets.take(1, f"B{k}", 1)  # new keys until the table is full: refused then
    assert buckets.available(1, "V") < 10  # still spent: nothing pushed it out
    assert not buckets.take(1, "V", 10)


async def test_an_outlet_stops_pushing_while_too_much_is_unacknowledged() -> None:
    device = b"d" * 16
    stored = [Stored(device, seq, seq.to_bytes(16, "big"), b"x") for seq in range(1, UNACKED_LIMIT * 2)]
    sent: list[wire.Deliver] = []

    async def fetch(device_id: bytes, after: int, limit: int) -> list[Stored]:
        return [s for s in stored if s.seq > after][:limit]

    async def send(frame: wire.Frame) -> None:
        assert isinstance(frame, wire.Deliver)
        sent.append(frame)

    outlet = Outlet(device)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outlet.run, fetch, send)
        await trio.testing.wait_all_tasks_blocked()
        pushed = [m.eid for f in sent for m in f.items]
        assert UNACKED_LIMIT - 64 <= len(pushed) <= UNACKED_LIMIT  # then it waits
        assert outlet.acknowledged(pushed[:640]) == pushed[:640]
        await trio.testing.wait_all_tasks_blocked()
        more = [m.eid for f in sent for m in f.items]
        assert len(pushed) < len(more) <= UNACKED_LIMIT + 640
        assert len(outlet.unacked) <= UNACKED_LIMIT
        nursery.cancel_scope.cancel()
