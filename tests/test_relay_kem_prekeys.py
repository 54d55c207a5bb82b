"""Post-quantum prekeys at the relay (issue 14): one-time KEM prekeys, the last-resort
KEM prekey and the envelope key, published, counted, claimed, listed and forgotten.

Against a real relay on 127.0.0.1 with hand-built frames (keys from the session's pool,
the test KDF), on both stores (conftest); the last test runs the store itself on both
engines and compares what they answer."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import trio

import wire
from keyvault.auth import auth_public_key
from keyvault.kdf import TEST_KDF, new_salt, password_keys
from keyvault.kem import KemUse, new_kem_key, signed_message, verify_kem_key
from keyvault.keys import (
    AccountKeys,
    new_recovery_code,
    parse_recovery_code,
    recovery_keys,
    sign_account_keys,
    unwrap_bundle,
    wrap_bundle,
)
from relay.connection import UNAUTHENTICATED_MAX_MESSAGE, Limits
from relay.limits import AccountBuckets
from relay.service import Rations
from relay.store import (
    KEM_ENVELOPE,
    KEM_LAST_RESORT,
    KEM_ONE_TIME,
    Bundle,
    KemPrekey,
    NewAccount,
    PrekeyCounts,
    Prekeys,
    RelayStore,
    open_sqlite,
)
from tests.conftest import PASSWORD, RelayRunner
from tests.pgcluster import PgCluster
from tests.test_relay_accounts import (
    KDF,
    T0,
    Acct,
    Clock,
    Env,
    credentials,
    fetch,
    login,
    prekey_set,
    proof,
    recover_frame,
    register,
    second_device,
)
from tests.test_relay_support import DEADLINE, RawClient, raw_client, sql

E = wire.ErrorCode


@pytest.fixture
def env(relay: RelayRunner, key_pool: list[AccountKeys]) -> Env:
    e = Env(relay, iter(key_pool), Clock(T0))
    e.service.clock = e.clock
    return e


def kem(keys: AccountKeys, use: KemUse, key_id: int, *, device: bytes, signed_as: KemUse | None = None,
        signed_id: int | None = None) -> wire.KemKeyPub:
    """A KEM public key of ``keys``'s account, signed for the device ``device`` (it verifies
    only when that device uploads it); ``signed_as``/``signed_id``: a signature made for
    another use or id (which must not verify for this one)."""
    k = new_kem_key(keys, signed_as or use, key_id if signed_id is None else signed_id, 0, device_id=device)
    return wire.KemKeyPub(key_id, k.public, k.signature)


def kem_set(keys: AccountKeys, one_time: Iterable[int] = (), last_resort: int | None = None,
            envelope: int | None = None, *, device: bytes, **kw: Any) -> wire.PrekeySet:
    """KEM keys of ``keys``'s account for the device ``device`` (``kw``: more of the set)."""
    return wire.PrekeySet(
        kem_one_time=[kem(keys, KemUse.ONE_TIME, i, device=device) for i in one_time],
        kem_last_resort=None if last_resort is None else kem(keys, KemUse.LAST_RESORT, last_resort, device=device),
        envelope_key=None if envelope is None else kem(keys, KemUse.ENVELOPE, envelope, device=device),
        **kw,
    )


async def upload(c: RawClient, prekeys: wire.PrekeySet) -> wire.PrekeyStatusOk:
    ans = await c.ok(wire.UploadPrekeys(id=c.next_id(), prekeys=prekeys))
    assert isinstance(ans, wire.PrekeyStatusOk)
    return ans


async def status(c: RawClient) -> wire.PrekeyStatusOk:
    ans = await c.ok(wire.PrekeyStatus(id=c.next_id()))
    assert isinstance(ans, wire.PrekeyStatusOk)
    return ans


async def claim(c: RawClient, acct: Acct, *device_ids: bytes) -> list[wire.DeviceBundle]:
    ans = await c.ok(wire.ClaimPrekeys(id=c.next_id(), name=acct.name, device_ids=list(device_ids or [acct.device_id])))
    assert isinstance(ans, wire.PrekeyBundles)
    return ans.bundles


async def lookup(c: RawClient, acct: Acct) -> wire.KeysOk:
    ans = await c.ok(wire.LookupKeys(id=c.next_id(), name=acct.name))
    assert isinstance(ans, wire.KeysOk)
    return ans


async def kem_rows(env: Env, device_id: bytes) -> list[tuple[int, int]]:
    """(use, key_id) of what the relay holds of the device's KEM keys."""
    rows = await sql(env.relay, "SELECT use, key_id FROM kem_prekeys WHERE device_id = ? ORDER BY use, key_id",
                     device_id)
    return [(int(u), int(k)) for u, k in rows]


def counts(ans: wire.PrekeyStatusOk) -> tuple[int | None, int, int | None, int | None, int | None]:
    return ans.signed_id, ans.one_time_left, ans.kem_one_time_left, ans.kem_last_resort_id, ans.envelope_key_id


async def test_upload_stores_kem_keys_and_status_counts_them(env: Env) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as c:
            alice = await register(env, c, "alice")  # a signed prekey (1) and 2 one-time prekeys
            # A relay that knows KEM keys says "none" with integers and nils, never leaves them out.
            assert counts(await status(c)) == (1, 2, 0, None, None)
            mine = alice.device_id
            first = kem_set(alice.keys, one_time=range(10, 15), last_resort=100, envelope=200, device=mine)
            assert counts(await upload(c, first)) == (1, 2, 5, 100, 200)
            assert counts(await status(c)) == (1, 2, 5, 100, 200)
            # Stored as published: public keys and signatures, nothing sealed.
            rows = await sql(env.relay, "SELECT use, key_id, public, sig FROM kem_prekeys WHERE device_id = ?"
                             " ORDER BY use, key_id", alice.device_id)
            published = [*first.kem_one_time, first.kem_last_resort, first.envelope_key]
            assert [(int(r[0]), int(r[1]), bytes(r[2]), bytes(r[3])) for r in rows] == [
                (use, k.key_id, k.public, k.sig) for use, k in zip([1] * 5 + [2, 3], published, strict=True)
                if k is not None
            ]
            # A new last-resort key and envelope key replace the old ones; one-time keys add up.
            again = kem_set(alice.keys, one_time=[15], last_resort=101, envelope=201, device=mine)
            assert counts(await upload(c, again)) == (1, 2, 6, 101, 201)
            assert await kem_rows(env, alice.device_id) == [(1, i) for i in range(10, 16)] + [(2, 101), (3, 201)]
            # A one-time key id held already replaces nothing.
            held = (await sql(env.relay, "SELECT public FROM kem_prekeys WHERE device_id = ? AND use = 1"
                              " AND key_id = 10", alice.device_id))[0][0]
            assert counts(await upload(c, kem_set(alice.keys, one_time=[10], device=mine))) == (1, 2, 6, 101, 201)
            assert (await sql(env.relay, "SELECT public FROM kem_prekeys WHERE device_id = ? AND use = 1"
                              " AND key_id = 10", alice.device_id))[0][0] == held
            # X25519 and KEM keys in one upload, and an empty one: still what it was.
            both = wire.PrekeySet(signed=prekey_set(alice.keys, first=2).signed,
                                  one_time=prekey_set(alice.keys, 3, first=3).one_time,
                                  kem_one_time=[kem(alice.keys, KemUse.ONE_TIME, 16, device=mine)])
            assert counts(await upload(c, both)) == (2, 5, 7, 101, 201)
            assert counts(await upload(c, wire.PrekeySet())) == (2, 5, 7, 101, 201)


async def test_claims_hand_out_one_time_kem_prekeys_oldest_first_once_then_the_last_resort(env: Env) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as a, raw_client(env.url) as b:
            alice = await register(env, a, "alice")
            await register(env, b, "bob")
            # No KEM key published yet: bundles carry none.
            (bundle,) = await claim(b, alice)
            assert bundle.kem is None and bundle.opk_id == 1
            published = kem_set(alice.keys, one_time=[7, 5, 6], last_resort=9, device=alice.device_id)
            await upload(a, published)
            by_id = {k.key_id: k for k in published.kem_one_time}
            taken = []
            for _ in range(3):
                (bundle,) = await claim(b, alice)
                assert bundle.kem is not None and bundle.kem.use == KemUse.ONE_TIME
                k = by_id[bundle.kem.key_id]
                assert (bundle.kem.public, bundle.kem.sig) == (k.public, k.sig)
                assert bundle.device_id == alice.device_id
                assert verify_kem_key(alice.keys.public().identity, KemUse.ONE_TIME, bundle.kem.key_id,
                                      bundle.kem.public, bundle.kem.sig, device_id=bundle.device_id)
                taken.append(bundle.kem.key_id)
            assert taken == [5, 6, 7]  # lowest id first, each once
            assert (await status(a)).kem_one_time_left == 0
            # None left: the last-resort one, every time, and it stays.
            assert published.kem_last_resort is not None
            for _ in range(2):
                (bundle,) = await claim(b, alice)
                assert bundle.kem == wire.BundleKem(2, 9, published.kem_last_resort.public,
                                                    published.kem_last_resort.sig)
            assert await kem_rows(env, alice.device_id) == [(2, 9)]
            # A new stock is handed out again, before the last-resort key.
            await upload(a, kem_set(alice.keys, one_time=[20], device=alice.device_id))
            (bundle,) = await claim(b, alice)
            assert bundle.kem is not None and (bundle.kem.use, bundle.kem.key_id) == (1, 20)


async def test_one_time_kem_prekeys_are_rationed_with_the_one_time_prekeys(env: Env) -> None:
    """The claimer who may take no more one-time prekeys of a device gets its last-resort
    KEM prekey; a device that gives a one-time key of either kind spends the ration, one
    that gives none spends nothing."""
    with trio.fail_after(DEADLINE):
        svc = env.service
        svc.prekey_requester_budget = AccountBuckets(1e-9, 2.0, 64, 1024)  # two per device, then none
        budget = svc.prekey_requester_budget
        async with raw_client(env.url) as a, raw_client(env.url) as b, raw_client(env.url) as c:
            alice = await register(env, a, "alice")  # 2 one-time X25519 prekeys each
            bob = await register(env, b, "bob")
            carol = await register(env, c, "carol")
            ids = {x.name: (await sql(env.relay, "SELECT id FROM accounts WHERE name_mac = ?", svc.mac(x.name)))[0][0]
                   for x in (alice, bob, carol)}
            await upload(a, kem_set(alice.keys, one_time=[1, 2, 3, 4], last_resort=50, device=alice.device_id))

            def what(x: wire.DeviceBundle) -> tuple[int | None, int, int]:
                assert x.kem is not None
                return x.opk_id, x.kem.use, x.kem.key_id

            # Bob's ration for alice's device: two one-time claims, then the last resort.
            assert [what((await claim(b, alice))[0]) for _ in range(3)] == [(1, 1, 1), (2, 1, 2), (None, 2, 50)]
            assert budget.available(ids["bob"], alice.device_id) < 0.01
            # Carol: no X25519 one-time prekey is left, KEM ones are: they spend her ration.
            assert what((await claim(c, alice))[0]) == (None, 1, 3)
            assert 0.99 < budget.available(ids["carol"], alice.device_id) < 1.01
            assert what((await claim(c, alice))[0]) == (None, 1, 4)
            assert what((await claim(c, alice))[0]) == (None, 2, 50)
            # A device with no one-time key of either kind left gives the ration back.
            await upload(b, kem_set(bob.keys, last_resort=7, device=bob.device_id))
            for _ in range(2):
                await claim(c, bob)  # bob's two X25519 one-time prekeys
            for _ in range(3):  # more than alice's ration: it spends nothing
                assert what((await claim(a, bob))[0]) == (None, 2, 7)
            assert budget.available(ids["alice"], bob.device_id) == 2.0


async def test_an_upload_over_the_limit_is_refused_whole_before_its_signatures_are_checked(env: Env) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as c:
            alice = await register(env, c, "alice")
            mine = alice.device_id
            full = kem_set(alice.keys, one_time=range(1, wire.MAX_KEM_ONE_TIME_PREKEYS + 1), device=mine)
            assert counts(await upload(c, full)) == (1, 2, 50, None, None)
            before = await kem_rows(env, alice.device_id)
            over = kem_set(alice.keys, one_time=[51], last_resort=60, envelope=61, device=mine)
            err = await c.refused(wire.UploadPrekeys(id=c.next_id(), prekeys=over), E.PREKEY_LIMIT)
            assert err.message == "a device holds at most 100 one-time prekeys and 50 one-time KEM prekeys"
            # Nothing of it is stored: not the one-time key, not the single keys that came with it.
            assert await kem_rows(env, alice.device_id) == before
            assert counts(await status(c)) == (1, 2, 50, None, None)
            # Refused for the count, not for its (bad) signatures: those were not even checked.
            bad = wire.PrekeySet(kem_one_time=[kem(alice.keys, KemUse.ONE_TIME, 52, device=mine,
                                                   signed_as=KemUse.ENVELOPE)])
            await c.refused(wire.UploadPrekeys(id=c.next_id(), prekeys=bad), E.PREKEY_LIMIT)
            # More than 50 in one frame does not decode at all.
            too_many = kem_set(alice.keys, one_time=range(100, 100 + wire.MAX_KEM_ONE_TIME_PREKEYS + 1), device=mine)
            await c.expect_error(wire.encode(wire.UploadPrekeys(id=7, prekeys=too_many)), E.BAD_FRAME, 7)
            # Claimed ones make room again.
            async with raw_client(env.url) as b:
                await register(env, b, "bob")
                await claim(b, alice)
            assert counts(await upload(c, kem_set(alice.keys, one_time=[51], device=mine))) == (1, 1, 50, None, None)


async def test_keys_with_bad_signatures_are_refused_with_bad_key(env: Env) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as c:
            alice = await register(env, c, "alice")
            stranger = next(env.pool)
            mine = alice.device_id
            await upload(c, kem_set(alice.keys, one_time=[1], last_resort=2, envelope=3, device=mine))
            before = await kem_rows(env, mine)
            lr, ek, ot = KemUse.LAST_RESORT, KemUse.ENVELOPE, KemUse.ONE_TIME
            refusals: list[tuple[str, wire.PrekeySet, str]] = [
                ("a last-resort key signed as a one-time one",
                 wire.PrekeySet(kem_last_resort=kem(alice.keys, lr, 10, device=mine, signed_as=ot)),
                 "last-resort KEM prekey"),
                ("a last-resort key signed as an envelope key",
                 wire.PrekeySet(kem_last_resort=kem(alice.keys, lr, 10, device=mine, signed_as=ek)),
                 "last-resort KEM prekey"),
                ("an envelope key signed as a last-resort one",
                 wire.PrekeySet(envelope_key=kem(alice.keys, ek, 10, device=mine, signed_as=lr)), "envelope key"),
                ("an envelope key signed for another id",
                 wire.PrekeySet(envelope_key=kem(alice.keys, ek, 10, device=mine, signed_id=11)), "envelope key"),
                ("an envelope key of another account",
                 wire.PrekeySet(envelope_key=kem(stranger, ek, 10, device=mine)), "envelope key"),
                ("a good envelope key with a bad last-resort one",
                 wire.PrekeySet(envelope_key=kem(alice.keys, ek, 10, device=mine),
                                kem_last_resort=kem(stranger, lr, 10, device=mine)), "last-resort KEM prekey"),
                ("a one-time key signed as a last-resort one",
                 wire.PrekeySet(kem_one_time=[kem(alice.keys, ot, 10, device=mine),
                                              kem(alice.keys, ot, 11, device=mine, signed_as=lr)]),
                 "one-time KEM prekey"),
                ("a public key that is not one (signed all the same)",
                 wire.PrekeySet(kem_last_resort=_not_a_key(alice.keys, lr, 10, mine)), "last-resort KEM prekey"),
            ]
            for what, prekeys, names in refusals:
                err = await c.refused(wire.UploadPrekeys(id=c.next_id(), prekeys=prekeys), E.BAD_KEY)
                assert names in err.message and "\n" not in err.message, what
                assert await kem_rows(env, alice.device_id) == before, what
            assert counts(await status(c)) == (1, 2, 1, 2, 3)


def _not_a_key(keys: AccountKeys, use: KemUse, key_id: int, device: bytes) -> wire.KemKeyPub:
    """1,184 bytes signed for ``use`` of ``device`` that ML-KEM's encoding check refuses
    (coefficients of 0xFFF, above the modulus)."""
    public = b"\xff" * 1184
    return wire.KemKeyPub(key_id, public, keys.identity_private.sign(signed_message(use, key_id, public, device)))


async def test_keys_signed_for_another_device_of_the_account_are_refused(env: Env) -> None:
    """A KEM key's signature names its device: keys alice's identity key signed for her
    laptop are refused (bad_key) when her first device uploads them, whole and storing
    nothing; the same keys are good from the laptop, and the first device's are not."""
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as c, raw_client(env.url) as c2:
            alice = await register(env, c, "alice")
            laptop, _ = await second_device(c2, alice, prekeys=prekey_set(alice.keys))
            mine = alice.device_id
            await upload(c, kem_set(alice.keys, one_time=[1], last_resort=2, envelope=3, device=mine))
            before = await kem_rows(env, mine)
            lr, ek, ot = KemUse.LAST_RESORT, KemUse.ENVELOPE, KemUse.ONE_TIME
            laptops = {use: kem(alice.keys, use, 10, device=laptop) for use in (lr, ek, ot)}
            refusals: list[tuple[str, wire.PrekeySet, str]] = [
                ("the laptop's last-resort key", wire.PrekeySet(kem_last_resort=laptops[lr]), "last-resort KEM prekey"),
                ("the laptop's envelope key", wire.PrekeySet(envelope_key=laptops[ek]), "envelope key"),
                ("the laptop's one-time key", wire.PrekeySet(kem_one_time=[laptops[ot]]), "one-time KEM prekey"),
                ("a good one-time key with one of the laptop's",
                 wire.PrekeySet(kem_one_time=[kem(alice.keys, ot, 11, device=mine), laptops[ot]]),
                 "one-time KEM prekey"),
                ("a good envelope key with the laptop's last-resort key",
                 wire.PrekeySet(envelope_key=kem(alice.keys, ek, 11, device=mine), kem_last_resort=laptops[lr]),
                 "last-resort KEM prekey"),
                ("a key signed for a device the account does not have",
                 wire.PrekeySet(envelope_key=kem(alice.keys, ek, 11, device=secrets.token_bytes(16))), "envelope key"),
            ]
            for what, prekeys, names in refusals:
                err = await c.refused(wire.UploadPrekeys(id=c.next_id(), prekeys=prekeys), E.BAD_KEY)
                assert names in err.message and "\n" not in err.message, what
                assert await kem_rows(env, mine) == before, what
                assert await kem_rows(env, laptop) == [], what
            assert counts(await status(c)) == (1, 2, 1, 2, 3)
            # The very same keys, from the laptop: its own.
            theirs = wire.PrekeySet(kem_one_time=[laptops[ot]], kem_last_resort=laptops[lr], envelope_key=laptops[ek])
            assert counts(await upload(c2, theirs)) == (1, 2, 1, 10, 10)
            assert await kem_rows(env, laptop) == [(1, 10), (2, 10), (3, 10)]
            # And the first device's keys are not the laptop's.
            for prekeys in (kem_set(alice.keys, envelope=12, device=mine), kem_set(alice.keys, [12], device=mine)):
                await c2.refused(wire.UploadPrekeys(id=c2.next_id(), prekeys=prekeys), E.BAD_KEY)
            assert await kem_rows(env, laptop) == [(1, 10), (2, 10), (3, 10)]
            assert await kem_rows(env, mine) == before


async def test_register_login_and_recover_refuse_keys_signed_for_another_device(env: Env) -> None:
    """The device a register, login or recovery brings in is the one its KEM keys must be
    signed for: keys of another device refuse it (bad_key), and nothing is created."""
    lr, ek, ot = KemUse.LAST_RESORT, KemUse.ENVELOPE, KemUse.ONE_TIME
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as c:
            keys = next(env.pool)
            first, other = secrets.token_bytes(16), secrets.token_bytes(16)
            for prekeys in (wire.PrekeySet(envelope_key=kem(keys, ek, 1, device=other)),
                            wire.PrekeySet(kem_last_resort=kem(keys, lr, 1, device=other)),
                            wire.PrekeySet(kem_one_time=[kem(keys, ot, 1, device=other)])):
                env.pool = iter([keys, *env.pool])
                _, ans = await _register(env, c, "alice", prekeys, device_id=first)
                assert isinstance(ans, wire.Error) and ans.code == E.BAD_KEY, prekeys
            assert await sql(env.relay, "SELECT 1 FROM accounts WHERE name_mac = ?", env.service.mac("alice")) == []
        async with raw_client(env.url) as c:  # (three registrations a connection)
            env.pool = iter([keys, *env.pool])
            alice, ans = await _register(env, c, "alice", kem_set(keys, [1], 2, 3, device=first), device_id=first)
            assert isinstance(ans, wire.SessionOk)
        # A new device logging in with the first device's keys.
        async with raw_client(env.url) as c:
            laptop = secrets.token_bytes(16)
            for prekeys in (kem_set(alice.keys, last_resort=4, device=first),
                            kem_set(alice.keys, envelope=4, device=first),
                            kem_set(alice.keys, one_time=[4], device=first)):
                ans = await login(c, alice, device_id=laptop, prekeys=prekeys)
                assert isinstance(ans, wire.Error) and ans.code == E.BAD_KEY, prekeys
            assert await sql(env.relay, "SELECT 1 FROM devices WHERE device_id = ?", laptop) == []
            ans = await login(c, alice, device_id=laptop, prekeys=kem_set(alice.keys, [4], 5, 6, device=laptop))
            assert isinstance(ans, wire.SessionOk)
        # A recovery onto a new device, with the laptop's keys.
        async with raw_client(env.url) as r:
            keys, fields = await recovering(r, alice)
            phone = secrets.token_bytes(16)
            err = await r.refused(recover_frame(r, alice, alice.cert(phone), fields, prekeys=kem_set(
                keys, [7], 8, 9, device=laptop)), E.BAD_KEY)
            assert "signature does not verify" in err.message
            assert await kem_rows(env, phone) == []
            assert await sql(env.relay, "SELECT 1 FROM devices WHERE device_id = ?", phone) == []
            session = await r.ok(recover_frame(r, alice, alice.cert(phone), fields, prekeys=kem_set(
                keys, [7], 8, 9, device=phone)))
            assert isinstance(session, wire.SessionOk)
            assert await kem_rows(env, phone) == [(1, 7), (2, 8), (3, 9)]


async def test_uploads_are_rationed_per_device(nursery: trio.Nursery, key_pool: list[AccountKeys], tmp_path: Path,
                                               store_dsn: str | None) -> None:
    """After ``uploads_per_device_hour`` uploads from one device (good or refused: it is
    spent before any signature is checked) the next is refused rate_limited, storing
    nothing, on any connection of that device; another device of the account has its own."""
    assert Rations().uploads_per_device_hour == 60
    relay = RelayRunner(nursery, tmp_path / "rationed", limits=Limits(rations=Rations(uploads_per_device_hour=3)),
                        store=store_dsn)
    await relay.start()
    env = Env(relay, iter(key_pool), Clock(T0))
    env.service.clock = env.clock
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as c, raw_client(env.url) as c2:
            alice = await register(env, c, "alice")  # a register is not an upload
            laptop, _ = await second_device(c2, alice, prekeys=prekey_set(alice.keys))  # nor is a login
            mine = alice.device_id
            await upload(c, kem_set(alice.keys, one_time=[1], last_resort=2, device=mine))
            bad = wire.PrekeySet(envelope_key=kem(alice.keys, KemUse.ENVELOPE, 3, device=mine, signed_as=KemUse.ONE_TIME))
            await c.refused(wire.UploadPrekeys(id=c.next_id(), prekeys=bad), E.BAD_KEY)
            await upload(c, wire.PrekeySet())
            before = await kem_rows(env, mine)
            err = await c.refused(wire.UploadPrekeys(id=c.next_id(), prekeys=kem_set(
                alice.keys, one_time=[4], envelope=5, device=mine)), E.RATE_LIMITED)
            assert "too many prekey uploads" in err.message
            assert await kem_rows(env, mine) == before == [(1, 1), (2, 2)]
            assert counts(await status(c)) == (1, 2, 1, 2, None)  # a status is not an upload
            # Another connection of the same device: the same budget.
            async with raw_client(env.url) as c3:
                await c3.ok(wire.Resume(id=c3.next_id(), token=alice.token))
                await c3.refused(wire.UploadPrekeys(id=c3.next_id(), prekeys=wire.PrekeySet()), E.RATE_LIMITED)
            # The laptop's own budget is untouched.
            for i in range(3):
                await upload(c2, kem_set(alice.keys, one_time=[10 + i], device=laptop))
            await c2.refused(wire.UploadPrekeys(id=c2.next_id(), prekeys=wire.PrekeySet()), E.RATE_LIMITED)
            assert await kem_rows(env, laptop) == [(1, 10), (1, 11), (1, 12)]


async def recovering(r: RawClient, alice: Acct) -> tuple[AccountKeys, Any]:
    """Prove alice's recovery code on ``r``: her account keys and new credentials' fields,
    for a recover frame."""
    ans = await fetch(r, alice, recovery=True)
    assert isinstance(ans, wire.BundleOk)
    keys = unwrap_bundle(ans.bundle, alice.rk.wrap_key, alice.name)
    _, _, fields = credentials(keys, alice.name)
    return keys, fields


async def _register(env: Env, c: RawClient, name: str, prekeys: wire.PrekeySet, *,
                    device_id: bytes | None = None) -> tuple[Acct, wire.Frame]:
    """Register ``name`` with ``prekeys`` for its first device (``device_id``, fresh by
    default: give it when the KEM keys are signed for it)."""
    keys = next(env.pool)
    salt = new_salt()
    pk = password_keys(PASSWORD, salt, TEST_KDF)
    rk = recovery_keys(parse_recovery_code(new_recovery_code()))
    acct = Acct(name, keys, salt, pk, rk, secrets.token_bytes(16) if device_id is None else device_id)
    pub = keys.public()
    frame = wire.Register(
        id=c.next_id(), name=name, salt=salt, kdf=KDF, auth_pub=auth_public_key(pk.auth_seed),
        enc_pub=pub.enc, identity_pub=pub.identity, dh_pub=pub.dh, keys_sig=sign_account_keys(keys, name),
        bundle=wrap_bundle(keys, pk.wrap_key, name), recovery_auth_pub=auth_public_key(rk.auth_seed),
        recovery_bundle=wrap_bundle(keys, rk.wrap_key, name), device=acct.cert(), prekeys=prekeys,
    )
    assert len(wire.encode(frame)) < UNAUTHENTICATED_MAX_MESSAGE
    ans = await c.ask(frame)
    if isinstance(ans, wire.SessionOk):
        acct.token = ans.token
    return acct, ans


async def test_register_login_and_recover_carry_kem_keys_too(env: Env) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as c:
            # The largest prekey set there is, before any session (under the 128 KiB cap).
            keys = next(env.pool)
            first = secrets.token_bytes(16)
            full = wire.PrekeySet(
                signed=prekey_set(keys).signed, one_time=prekey_set(keys, wire.MAX_ONE_TIME_PREKEYS).one_time,
                kem_one_time=kem_set(keys, one_time=range(1, 51), device=first).kem_one_time,
                kem_last_resort=kem(keys, KemUse.LAST_RESORT, 60, device=first),
                envelope_key=kem(keys, KemUse.ENVELOPE, 61, device=first),
            )
            env.pool = iter([keys, *env.pool])
            alice, ans = await _register(env, c, "alice", full, device_id=first)
            assert isinstance(ans, wire.SessionOk) and alice.device_id == first
            assert counts(await status(c)) == (1, 100, 50, 60, 61)
        # A bad signature at register: refused, and no account.
        async with raw_client(env.url) as c:
            keys = next(env.pool)
            env.pool = iter([keys, *env.pool])
            bobs = secrets.token_bytes(16)
            _, ans = await _register(env, c, "bob", wire.PrekeySet(
                envelope_key=kem(keys, KemUse.ENVELOPE, 2, device=bobs, signed_as=KemUse.ONE_TIME)), device_id=bobs)
            assert isinstance(ans, wire.Error) and ans.code == E.BAD_KEY
            _, ans = await _register(env, c, "bob", wire.PrekeySet(
                kem_one_time=[kem(keys, KemUse.ONE_TIME, 1, device=bobs, signed_id=2)]), device_id=bobs)
            assert isinstance(ans, wire.Error) and ans.code == E.BAD_KEY
            assert await sql(env.relay, "SELECT 1 FROM accounts WHERE name_mac = ?", env.service.mac("bob")) == []
        # A second device logs in with its KEM keys; a bad one-time key refuses the login first.
        async with raw_client(env.url) as c:
            laptop = secrets.token_bytes(16)
            bad = wire.PrekeySet(signed=prekey_set(alice.keys).signed,
                                 kem_one_time=[kem(alice.keys, KemUse.ONE_TIME, 1, device=laptop,
                                                   signed_as=KemUse.LAST_RESORT)])
            ans = await login(c, alice, device_id=laptop, prekeys=bad)
            assert isinstance(ans, wire.Error) and ans.code == E.BAD_KEY
            assert await sql(env.relay, "SELECT 1 FROM devices WHERE device_id = ?", laptop) == []
        async with raw_client(env.url) as c:
            laptop = secrets.token_bytes(16)
            await second_device(c, alice, device_id=laptop, prekeys=kem_set(
                alice.keys, one_time=[1, 2], last_resort=3, envelope=4, device=laptop,
                signed=prekey_set(alice.keys).signed))
            assert counts(await status(c)) == (1, 0, 2, 3, 4)
            assert await kem_rows(env, laptop) == [(1, 1), (1, 2), (2, 3), (3, 4)]
        # A recovery onto a new device, with its KEM keys, in the recovery's transaction.
        async with raw_client(env.url) as r:
            keys, fields = await recovering(r, alice)
            phone = secrets.token_bytes(16)
            session = await r.ok(recover_frame(r, alice, alice.cert(phone), fields, prekeys=kem_set(
                keys, one_time=[5, 6, 7], last_resort=8, envelope=9, device=phone, signed=prekey_set(keys).signed)))
            assert isinstance(session, wire.SessionOk)
            assert counts(await status(r)) == (1, 0, 3, 8, 9)
            assert await kem_rows(env, phone) == [(1, 5), (1, 6), (1, 7), (2, 8), (3, 9)]


async def test_lookup_lists_the_devices_envelope_keys(env: Env) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as a, raw_client(env.url) as a2, raw_client(env.url) as b:
            alice = await register(env, a, "alice")
            laptop, _ = await second_device(a2, alice, prekeys=prekey_set(alice.keys))
            await register(env, b, "bob")
            assert (await lookup(b, alice)).envelope_keys == []
            # Only the laptop has one: only the laptop's is listed.
            e1 = kem(alice.keys, KemUse.ENVELOPE, 1, device=laptop)
            await upload(a2, wire.PrekeySet(envelope_key=e1,
                                            kem_last_resort=kem(alice.keys, KemUse.LAST_RESORT, 2, device=laptop)))
            assert (await lookup(b, alice)).envelope_keys == [wire.EnvelopeKey(laptop, 1, e1.public, e1.sig)]
            # Both, in the order of the devices (oldest first).
            e2 = kem(alice.keys, KemUse.ENVELOPE, 5, device=alice.device_id)
            await upload(a, wire.PrekeySet(envelope_key=e2))
            keys = await lookup(b, alice)
            assert [d.device_id for d in keys.devices] == [alice.device_id, laptop]
            assert keys.envelope_keys == [wire.EnvelopeKey(alice.device_id, 5, e2.public, e2.sig),
                                          wire.EnvelopeKey(laptop, 1, e1.public, e1.sig)]
            for k in keys.envelope_keys:
                assert verify_kem_key(keys.identity_pub, KemUse.ENVELOPE, k.key_id, k.public, k.sig,
                                      device_id=k.device_id)
            # Each is signed for its own device: the laptop's is not the first device's.
            assert not verify_kem_key(keys.identity_pub, KemUse.ENVELOPE, 1, e1.public, e1.sig,
                                      device_id=alice.device_id)
            # A new envelope key replaces the old one in the lookup.
            e3 = kem(alice.keys, KemUse.ENVELOPE, 2, device=laptop)
            await upload(a2, wire.PrekeySet(envelope_key=e3))
            assert (await lookup(a, alice)).envelope_keys == [wire.EnvelopeKey(alice.device_id, 5, e2.public, e2.sig),
                                                              wire.EnvelopeKey(laptop, 2, e3.public, e3.sig)]


async def test_a_revoked_or_removed_device_takes_its_kem_keys_with_it(env: Env) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as a, raw_client(env.url) as b:
            alice = await register(env, a, "alice")
            await register(env, b, "bob")
            devices = []
            for _ in range(2):
                async with raw_client(env.url) as c:
                    d = secrets.token_bytes(16)
                    await second_device(c, alice, device_id=d, prekeys=kem_set(
                        alice.keys, one_time=[1, 2], last_resort=3, envelope=4, device=d,
                        signed=prekey_set(alice.keys).signed))
                    devices.append(d)
                    if len(devices) == 2:  # the second removes itself
                        await c.ok(wire.Logout(id=c.next_id(), remove_device=True))
            revoked, removed = devices
            await upload(a, kem_set(alice.keys, last_resort=7, envelope=8, device=alice.device_id))
            assert {k.device_id for k in (await lookup(b, alice)).envelope_keys} == {alice.device_id, revoked}
            ch, sig = await proof(a, alice, "revoke")
            await a.ok(wire.RevokeDevice(id=a.next_id(), name=alice.name, challenge=ch, signature=sig,
                                         device_id=revoked))
            for d in (revoked, removed):
                assert await kem_rows(env, d) == []
            assert [k.device_id for k in (await lookup(b, alice)).envelope_keys] == [alice.device_id]
            bundles = await claim(b, alice, revoked, removed, alice.device_id)
            assert [x.device_id for x in bundles] == [alice.device_id]
            assert bundles[0].kem is not None and bundles[0].kem.use == KemUse.LAST_RESORT


# ---- the store, on both engines -------------------------------------------------------


def _script(store: RelayStore) -> list[Any]:
    """The same calls on a fresh store; what each answered."""
    keys = [(i, bytes([i]) * 1184, bytes([i]) * 64) for i in range(1, 8)]
    blob = bytes(32)
    account = store.create_account(NewAccount(
        name_mac=b"m" * 32, salt=bytes(16), kdf=(1, 8192, 1), auth_pub=blob, enc_pub=blob, identity_pub=blob,
        dh_pub=blob, keys_sig=bytes(64), bundle=blob, recovery_auth_pub=blob, recovery_bundle=blob,
    ), b"A" * 16, bytes(64))
    assert store.ensure_device(account, b"B" * 16, bytes(64), wire.MAX_DEVICES)
    limits = (wire.MAX_ONE_TIME_PREKEYS, wire.MAX_KEM_ONE_TIME_PREKEYS)
    signed = (1, b"s" * 32, b"g" * 64)
    out: list[Any] = [store.prekey_status(b"A" * 16)]
    out.append(store.publish_prekeys(b"A" * 16, Prekeys(
        signed=signed, one_time=[(1, b"o" * 32)], kem_one_time=[keys[2], keys[0], keys[1]],
        kem_last_resort=keys[3], envelope_key=keys[4]), limits))
    out.append(store.publish_prekeys(b"B" * 16, Prekeys(signed=signed, envelope_key=keys[5]), limits))
    out.append(store.publish_prekeys(b"A" * 16, Prekeys(kem_one_time=[keys[6]] * 48), limits))  # 51: refused
    out.append(store.publish_prekeys(b"A" * 16, Prekeys(envelope_key=keys[6], kem_last_resort=keys[5]), limits))
    out.append(store.envelope_keys(account))
    out.append(store.claim_prekeys(account, [b"A" * 16, b"B" * 16, b"Z" * 16]))
    out.append(store.claim_prekeys(account, [b"A" * 16], one_time=[]))
    out += [store.claim_prekeys(account, [b"A" * 16]) for _ in range(3)]
    out.append(store.prekey_status(b"A" * 16))
    store.revoke_device(account, b"B" * 16, allow_last=False)
    out.append(store.envelope_keys(account))
    out.append(store.prekey_status(b"B" * 16))
    out.append(store.query("SELECT count(*) FROM kem_prekeys"))
    return out


def test_both_engines_store_and_hand_out_kem_keys_alike(tmp_path: Path, pg_cluster: PgCluster) -> None:
    from relay.pgstore import open_postgresql

    lite = open_sqlite(tmp_path / "relay.db", secrets.token_bytes(32))
    pg = open_postgresql(pg_cluster.create_database(f"veil_kem_{secrets.token_hex(4)}"), secrets.token_bytes(64),
                         b"check")
    try:
        got = _script(lite)
        assert _script(pg) == got
    finally:
        lite.close()
        pg.close()
    k = [(i, bytes([i]) * 1184, bytes([i]) * 64) for i in range(1, 8)]
    a, b = b"A" * 16, b"B" * 16
    assert got[0] == PrekeyCounts(None, 0, 0, None, None)
    assert got[1] == PrekeyCounts(1, 1, 3, 4, 5)
    assert got[2] == PrekeyCounts(1, 0, 0, None, 6)
    assert got[3] is None
    assert got[4] == PrekeyCounts(1, 1, 3, 6, 7)
    assert got[5] == [(a, *k[6]), (b, *k[5])]
    assert got[6] == [Bundle(a, 1, b"s" * 32, b"g" * 64, 1, b"o" * 32, KemPrekey(KEM_ONE_TIME, *k[0])),
                      Bundle(b, 1, b"s" * 32, b"g" * 64, None, None, None)]
    assert got[7] == [Bundle(a, 1, b"s" * 32, b"g" * 64, None, None, KemPrekey(KEM_LAST_RESORT, *k[5]))]
    assert [x[0].kem for x in got[8:11]] == [KemPrekey(KEM_ONE_TIME, *k[1]), KemPrekey(KEM_ONE_TIME, *k[2]),
                                             KemPrekey(KEM_LAST_RESORT, *k[5])]
    assert [x[0].took_one_time for x in got[8:11]] == [True, True, False]
    assert got[11] == PrekeyCounts(1, 0, 0, 6, 7)
    assert got[12] == [(a, *k[6])]
    assert got[13] == PrekeyCounts(None, 0, 0, None, None)
    assert got[14] == [(2,)]
    assert KEM_ENVELOPE == KemUse.ENVELOPE and KEM_LAST_RESORT == KemUse.LAST_RESORT
    assert KEM_ONE_TIME == KemUse.ONE_TIME
