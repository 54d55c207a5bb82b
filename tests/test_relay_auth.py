"""Relay authentication, with logins built by hand: challenges are single use and bound to
one name and one purpose, bad proofs all get ``auth_failed``, and ``auth_params`` does not
tell whether an account exists."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import trio

import wire
from keyvault.auth import sign_challenge
from keyvault.kdf import DEFAULT_KDF, TEST_KDF, password_keys
from keyvault.keys import sign_device
from tests.conftest import PASSWORD, Accounts
from tests.test_relay_support import DEADLINE, RawClient, raw_client

E = wire.ErrorCode


async def assert_logged_in(c: RawClient, device_id: bytes) -> None:
    """The connection has a session for ``device_id``: it may list its devices."""
    ans = await c.ok(wire.ListDevices(id=c.next_id()))
    assert isinstance(ans, wire.DevicesOk)
    assert device_id in {d.device_id for d in ans.devices}


async def test_hand_built_login_works(accounts: Accounts) -> None:
    """The control for every negative test below: the helper builds a valid login."""
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        async with raw_client(accounts.relay.url) as c:
            await c.refused(wire.ListDevices(id=c.next_id()), E.NOT_AUTHENTICATED)
            login = await c.login_frame(alice)
            ans = await c.ok(login)
            assert isinstance(ans, wire.SessionOk)
            assert ans.device_id == alice.device_id and len(ans.token) == 32
            await assert_logged_in(c, alice.device_id)
            # A second login on a connection that has a session is refused.
            again = await c.login_frame(alice)
            await c.refused(again, E.ALREADY_AUTHENTICATED)
        # The token opens a new connection.
        async with raw_client(accounts.relay.url) as c:
            resumed = await c.ok(wire.Resume(id=1, token=ans.token))
            assert resumed == wire.ResumeOk(id=1, device_id=alice.device_id)
            await assert_logged_in(c, alice.device_id)


async def test_login_challenge_is_single_use(accounts: Accounts) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        async with raw_client(accounts.relay.url) as first:
            login = await first.login_frame(alice)
            frame = wire.encode(login)
            await first.send(frame)
            assert isinstance(await first.answer(), wire.SessionOk)
            # Exactly the same bytes, replayed on another connection.
            async with raw_client(accounts.relay.url) as second:
                await second.expect_error(frame, E.AUTH_FAILED, login.id)
                await second.refused(wire.ListDevices(id=second.next_id()), E.NOT_AUTHENTICATED)
                await second.assert_alive()


async def test_challenge_spent_by_a_failed_login_cannot_be_reused(accounts: Accounts) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        async with raw_client(accounts.relay.url) as c:
            good = await c.login_frame(alice)
            bad = wire.Login(
                id=c.next_id(), name=good.name, challenge=good.challenge,
                signature=bytes(64), device=good.device,
            )
            await c.refused(bad, E.AUTH_FAILED)
            # The right signature over the same challenge: too late, it was used up.
            await c.refused(good, E.AUTH_FAILED)
            # A fresh challenge works (the failure did not lock the account for good).
            await c.ok(await c.login_frame(alice))
            await assert_logged_in(c, alice.device_id)


async def test_challenge_for_one_name_cannot_log_in_another(accounts: Accounts) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        await accounts.register("bob")
        async with raw_client(accounts.relay.url) as c:
            # A challenge issued for bob, signed correctly by alice for her own name.
            login = await c.login_frame(alice, challenge_for="bob")
            await c.refused(login, E.AUTH_FAILED)
            await c.refused(wire.ListDevices(id=c.next_id()), E.NOT_AUTHENTICATED)
        async with raw_client(accounts.relay.url) as c:
            # ... and one for a name with no account at all.
            await c.refused(await c.login_frame(alice, challenge_for="nobody"), E.AUTH_FAILED)
        async with raw_client(accounts.relay.url) as c:
            await c.ok(await c.login_frame(alice))  # the control


async def test_challenge_for_one_purpose_cannot_serve_another(accounts: Accounts) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        async with raw_client(accounts.relay.url) as c:
            # A "bundle" challenge, signed as a login: refused.
            await c.refused(await c.login_frame(alice, purpose="bundle"), E.AUTH_FAILED)
        async with raw_client(accounts.relay.url) as c:
            # A "login" challenge used to fetch the key bundle: refused.
            login = await c.login_frame(alice)
            fetch = wire.FetchBundle(
                id=c.next_id(), name=alice.name, challenge=login.challenge, signature=login.signature
            )
            await c.refused(fetch, E.AUTH_FAILED)
        async with raw_client(accounts.relay.url) as c:
            # The control: a "bundle" challenge signed for "bundle" fetches it.
            params = await c.ok(wire.AuthParams(id=c.next_id(), name=alice.name))
            assert isinstance(params, wire.AuthParamsOk)
            seed = password_keys(PASSWORD, params.salt, TEST_KDF).auth_seed
            ch = await c.ok(wire.Challenge(id=c.next_id(), name=alice.name, purpose="bundle"))
            assert isinstance(ch, wire.ChallengeOk)
            sig = sign_challenge(seed, "bundle", ch.relay_id, alice.name, ch.challenge)
            bundle = await c.ok(
                wire.FetchBundle(id=c.next_id(), name=alice.name, challenge=ch.challenge, signature=sig)
            )
            assert isinstance(bundle, wire.BundleOk) and bundle.bundle


async def test_wrong_signatures_are_auth_failed(accounts: Accounts) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bad_logins = []
        async with raw_client(accounts.relay.url) as c:
            bad_logins.append(await c.login_frame(alice, password="not the password"))
        async with raw_client(accounts.relay.url) as c:
            bad_logins.append(await c.login_frame(alice, relay_id=secrets.token_bytes(16)))
        async with raw_client(accounts.relay.url) as c:
            bad_logins.append(await c.login_frame(alice, sign_as="bob"))
        for login in bad_logins:
            async with raw_client(accounts.relay.url) as c:
                err = await c.refused(login, E.AUTH_FAILED)
                assert err.message == "authentication failed"  # the same words for every cause
                await c.refused(wire.ListDevices(id=c.next_id()), E.NOT_AUTHENTICATED)
        async with raw_client(accounts.relay.url) as c:
            await c.ok(await c.login_frame(alice))  # the control, after the failures


async def test_unknown_user_login_is_plain_auth_failed(accounts: Accounts) -> None:
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        async with raw_client(accounts.relay.url) as c:
            ch = await c.ok(wire.Challenge(id=c.next_id(), name="nobody", purpose="login"))
            assert isinstance(ch, wire.ChallengeOk)
            seed = password_keys(PASSWORD, bytes(16), TEST_KDF).auth_seed
            sig = sign_challenge(seed, "login", ch.relay_id, "nobody", ch.challenge)
            device = wire.DeviceCert(alice.device_id, sign_device(alice.keys, "nobody", alice.device_id))
            err = await c.refused(
                wire.Login(id=c.next_id(), name="nobody", challenge=ch.challenge, signature=sig, device=device),
                E.AUTH_FAILED,
            )
            assert err.message == "authentication failed"


async def test_auth_params_do_not_reveal_whether_an_account_exists(accounts: Accounts) -> None:
    relay = accounts.relay
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")

        async def params(name: str) -> wire.AuthParamsOk:
            async with raw_client(relay.url) as c:
                ans = await c.ok(wire.AuthParams(id=3, name=name))
                assert isinstance(ans, wire.AuthParamsOk) and ans.id == 3
                return ans

        known = await params("alice")
        unknown = await params("nobody_here")
        for ans in (known, unknown):
            assert isinstance(ans.salt, bytes) and len(ans.salt) == 16
            assert isinstance(ans.kdf, wire.Kdf)
        assert (known.kdf.t, known.kdf.m, known.kdf.p) == (
            TEST_KDF.time_cost, TEST_KDF.memory_kib, TEST_KDF.parallelism
        )
        # An unknown name looks like an account made with the default parameters.
        assert (unknown.kdf.t, unknown.kdf.m, unknown.kdf.p) == (
            DEFAULT_KDF.time_cost, DEFAULT_KDF.memory_kib, DEFAULT_KDF.parallelism
        )
        # Stable: the same answer every time, on any connection, for any spelling.
        assert await params("nobody_here") == unknown
        assert await params("  Nobody_Here ") == unknown
        assert await params("alice") == known
        # Not one salt for all unknown names.
        other = await params("someone_else")
        assert other.salt != unknown.salt and other.salt != known.salt
        # ...and still the same after a restart (derived from the relay key, not memory).
        await relay.stop()
        await relay.start()
        assert await params("nobody_here") == unknown
        assert await params("alice") == known
        # The known salt is the one alice registered with: her login still works.
        async with raw_client(relay.url) as c:
            await c.ok(await c.login_frame(alice))


async def test_resume_with_a_random_or_dead_token_is_auth_failed(accounts: Accounts) -> None:
    relay = accounts.relay
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        async with raw_client(relay.url) as c:
            await c.refused(wire.Resume(id=c.next_id(), token=secrets.token_bytes(32)), E.AUTH_FAILED)
            await c.refused(wire.Send(id=c.next_id(), envelopes=[
                wire.Envelope(alice.device_id, secrets.token_bytes(16), b"x")
            ]), E.NOT_AUTHENTICATED)
            await c.assert_alive()
        # A token from a login works, and stops working after logout.
        async with raw_client(relay.url) as c:
            session = await c.ok(await c.login_frame(alice))
            assert isinstance(session, wire.SessionOk)
            await c.ok(wire.Logout(id=c.next_id()))
            await c.refused(wire.ListDevices(id=c.next_id()), E.NOT_AUTHENTICATED)
        async with raw_client(relay.url) as c:
            await c.refused(wire.Resume(id=c.next_id(), token=session.token), E.AUTH_FAILED)
        # The node's own token (from registering) still works: logout ended one session.
        async with raw_client(relay.url) as c:
            await c.resume(alice)


async def test_login_cannot_take_over_another_accounts_device(accounts: Accounts) -> None:
    """bob proves his own password but names alice's device id: refused, and bob's
    session never sees alice's mail."""
    relay = accounts.relay
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        async with raw_client(relay.url) as c:
            login = await c.login_frame(bob)
            hijack = wire.Login(
                id=login.id, name=login.name, challenge=login.challenge, signature=login.signature,
                device=wire.DeviceCert(alice.device_id, sign_device(bob.keys, bob.name, alice.device_id)),
            )
            await c.refused(hijack, E.UNKNOWN_DEVICE)
            await c.refused(wire.ListDevices(id=c.next_id()), E.NOT_AUTHENTICATED)
        # A device certificate not signed by the account's identity key is refused too.
        async with raw_client(relay.url) as c:
            login = await c.login_frame(bob)
            new_device = secrets.token_bytes(16)
            forged = wire.Login(
                id=login.id, name=login.name, challenge=login.challenge, signature=login.signature,
                device=wire.DeviceCert(new_device, sign_device(alice.keys, bob.name, new_device)),
            )
            await c.refused(forged, E.BAD_KEY)
        async with raw_client(relay.url) as c:
            await c.resume(bob)
            devices = await c.ok(wire.ListDevices(id=c.next_id()))
            assert isinstance(devices, wire.DevicesOk)
            assert [d.device_id for d in devices.devices] == [bob.device_id]


async def test_name_free_says_whether_a_name_is_taken_and_is_capped(accounts: Accounts) -> None:
    relay = accounts.relay
    with trio.fail_after(DEADLINE):
        await accounts.register("alice")
        async with raw_client(relay.url) as c:
            for name, free in (("alice", False), ("  ALICE ", False), ("nobody_here", True)):
                ans = await c.ok(wire.NameFree(id=c.next_id(), name=name))
                assert ans == wire.NameFreeOk(id=ans.id, free=free)  # type: ignore[attr-defined]
            await c.refused(wire.NameFree(id=c.next_id(), name="x!"), E.BAD_NAME)
            for _ in range(10 - 4):
                await c.ok(wire.NameFree(id=c.next_id(), name="someone"))
            # The eleventh on one connection is refused; the connection lives on.
            await c.refused(wire.NameFree(id=c.next_id(), name="someone"), E.RATE_LIMITED)
            await c.assert_alive()
        async with raw_client(relay.url) as c:  # the cap is per connection
            ans = await c.ok(wire.NameFree(id=c.next_id(), name="alice"))
            assert isinstance(ans, wire.NameFreeOk) and not ans.free


async def test_name_free_is_capped_across_the_whole_relay(accounts: Accounts) -> None:
    """Reconnecting does not reset it: outsiders cannot test names one by one at speed."""
    refused = 0
    with trio.fail_after(DEADLINE):
        for _ in range(10):  # 100 checks in a few seconds against a budget of 50 (+5 a second)
            async with raw_client(accounts.relay.url) as c:
                for _ in range(10):
                    ans = await c.ask(wire.NameFree(id=c.next_id(), name="someone"))
                    if isinstance(ans, wire.Error):
                        assert ans.code == E.RATE_LIMITED
                        refused += 1
    assert refused >= 20


async def test_concurrent_guesses_cannot_race_past_the_account_throttle(
    accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of fetch_bundle attempts on many connections at once: only one of them is
    checked against the password at all, whatever the order they arrive in."""
    import relay.service

    checked = 0
    real_verify = relay.service.verify_challenge

    def counting_verify(*args: Any) -> bool:
        nonlocal checked
        checked += 1
        return real_verify(*args)

    monkeypatch.setattr(relay.service, "verify_challenge", counting_verify)
    burst = 20
    with trio.fail_after(DEADLINE * 2):
        alice = await accounts.register("alice")
        url = accounts.relay.url
        async with raw_client(url) as c:
            params = await c.ok(wire.AuthParams(id=c.next_id(), name=alice.name))
            assert isinstance(params, wire.AuthParamsOk)
        right = password_keys(PASSWORD, params.salt, TEST_KDF).auth_seed
        wrong = password_keys("a guess", params.salt, TEST_KDF).auth_seed
        answers: list[wire.Frame] = []
        ready = trio.Event()
        prepared = 0

        async def attempt(seed: bytes) -> None:
            nonlocal prepared
            async with raw_client(url) as conn:
                ch = await conn.ok(wire.Challenge(id=conn.next_id(), name=alice.name, purpose="bundle"))
                assert isinstance(ch, wire.ChallengeOk)
                sig = sign_challenge(seed, "bundle", ch.relay_id, alice.name, ch.challenge)
                prepared += 1
                if prepared == burst:
                    ready.set()
                await ready.wait()  # every attempt ready: now all at once
                answers.append(await conn.ask(
                    wire.FetchBundle(id=7, name=alice.name, challenge=ch.challenge, signature=sig)
                ))

        async with trio.open_nursery() as nursery:
            for i in range(burst):
                nursery.start_soon(attempt, right if i == burst - 1 else wrong)
        assert len(answers) == burst
        assert checked == 1
        assert sum(isinstance(a, wire.BundleOk) for a in answers) <= 1
        assert all(isinstance(a, wire.BundleOk) or a == wire.Error(7, E.AUTH_FAILED, "authentication failed")
                   for a in answers), answers


async def test_outstanding_challenges_are_capped_per_connection(accounts: Accounts) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(accounts.relay.url) as c:
            for _ in range(16):
                await c.ok(wire.Challenge(id=c.next_id(), name="someone", purpose="login"))
            await c.refused(wire.Challenge(id=c.next_id(), name="someone", purpose="login"), E.RATE_LIMITED)
            await c.assert_alive()
