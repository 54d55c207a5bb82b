"""Account security at the relay (issue 11): TOTP as a second factor, recovery with the
recovery code, password change, device names and revocation.

Against a real relay on 127.0.0.1 with hand-built frames (keys from the session's pool,
the test KDF). The TOTP clock is the relay service's own, moved by the tests: nothing
here waits for time to pass. Failed proofs are followed by ``forgive``, which lifts the
account's throttle after checking that the failure was counted (else every test would
wait out doubling delays)."""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from sqlite_utils.migrations import Migrations
from trio_websocket import ConnectionClosed

import wire
from cipherdb import open_encrypted
from keyvault.auth import auth_public_key, sign_challenge
from keyvault.kdf import TEST_KDF, PasswordKeys, new_salt, password_keys
from keyvault.kem import KemUse, new_kem_key
from keyvault.keys import (
    AccountKeys,
    new_recovery_code,
    parse_recovery_code,
    recovery_keys,
    sign_account_keys,
    sign_device,
    unwrap_bundle,
    wrap_bundle,
)
from keyvault.prekeys import new_one_time_prekeys, new_signed_prekey
from keyvault.totp import code_at, new_secret, step_at
from relay.service import MFA_GRANT_SECONDS, RECOVERY_GRANT_SECONDS, RelayService
from relay.store import (
    MAX_CODE_FAILURES,
    MAX_REVOKED,
    SESSION_IDLE_DAYS,
    SESSION_MAX_DAYS,
    Credentials,
    CredentialsChanged,
    DeviceRevoked,
    NewAccount,
    NoSession,
    RelayStore,
    _m0001,
    _m0002,
    open_sqlite,
    today,
)
from tests.conftest import PASSWORD, RelayRunner
from tests.test_relay_support import (
    DEADLINE,
    RawClient,
    envelope,
    mailbox_eids,
    pack,
    raw_client,
    sql,
)

E = wire.ErrorCode
KDF = wire.Kdf(TEST_KDF.time_cost, TEST_KDF.memory_kib, TEST_KDF.parallelism)
T0 = 1_800_000_000.0 + 5  # the service's clock when a test starts: 5 s into a TOTP step
FAILED = "authentication failed"


class Clock:
    """The relay service's clock, moved by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def step(self) -> int:
        return step_at(self.now)

    def next_step(self) -> None:
        self.now += 30


@dataclass
class Env:
    relay: RelayRunner
    pool: Iterator[AccountKeys]
    clock: Clock

    @property
    def url(self) -> str:
        return self.relay.url

    @property
    def service(self) -> RelayService:
        assert self.relay.state is not None
        return self.relay.state.service

    def failures(self, name: str) -> int:
        return self.service.throttle.failures(self.service.mac(name))

    def forgive(self, name: str, failed: int = 1) -> None:
        """The account's failures were counted; then the throttle is lifted."""
        assert self.failures(name) == failed
        self.service.throttle.succeed(self.service.mac(name))


@pytest.fixture
def env(relay: RelayRunner, key_pool: list[AccountKeys]) -> Env:
    e = Env(relay, iter(key_pool), Clock(T0))
    e.service.clock = e.clock
    return e


@dataclass
class Acct:
    """An account built by hand: what its owner knows."""

    name: str
    keys: AccountKeys
    salt: bytes
    pk: PasswordKeys  # from the password
    rk: PasswordKeys  # from the recovery code
    device_id: bytes
    token: bytes = b""
    secret: bytes | None = None  # TOTP

    def cert(self, device_id: bytes | None = None) -> wire.DeviceCert:
        d = self.device_id if device_id is None else device_id
        return wire.DeviceCert(d, sign_device(self.keys, self.name, d))

    def code(self, step: int) -> str:
        assert self.secret is not None
        return code_at(self.secret, step)


def prekey_set(keys: AccountKeys, one_time: int = 2, first: int = 1) -> wire.PrekeySet:
    spk = new_signed_prekey(keys, first, 0)
    return wire.PrekeySet(
        signed=wire.SignedPrekeyPub(spk.key_id, spk.public, spk.signature),
        one_time=[wire.OneTimePrekeyPub(k.key_id, k.public) for k in new_one_time_prekeys(first, one_time)],
    )


def credentials(keys: AccountKeys, name: str) -> tuple[bytes, PasswordKeys, dict[str, Any]]:
    """A new password's salt, keys, and the frame fields that carry them."""
    salt = new_salt()
    pk = password_keys(secrets.token_hex(8), salt, TEST_KDF)
    fields = {"salt": salt, "kdf": KDF, "auth_pub": auth_public_key(pk.auth_seed),
              "bundle": wrap_bundle(keys, pk.wrap_key, name)}
    return salt, pk, fields


async def register(env: Env, c: RawClient, name: str) -> Acct:
    """Register on ``c``, which then has the new account's session."""
    keys = next(env.pool)
    salt = new_salt()
    pk = password_keys(PASSWORD, salt, TEST_KDF)
    rk = recovery_keys(parse_recovery_code(new_recovery_code()))
    acct = Acct(name, keys, salt, pk, rk, secrets.token_bytes(16))
    pub = keys.public()
    ans = await c.ok(wire.Register(
        id=c.next_id(), name=name, salt=salt, kdf=KDF, auth_pub=auth_public_key(pk.auth_seed),
        enc_pub=pub.enc, identity_pub=pub.identity, dh_pub=pub.dh, keys_sig=sign_account_keys(keys, name),
        bundle=wrap_bundle(keys, pk.wrap_key, name), recovery_auth_pub=auth_public_key(rk.auth_seed),
        recovery_bundle=wrap_bundle(keys, rk.wrap_key, name), device=acct.cert(), prekeys=prekey_set(keys),
    ))
    assert isinstance(ans, wire.SessionOk)
    acct.token = ans.token
    return acct


async def proof(c: RawClient, acct: Acct, purpose: wire.Purpose, seed: bytes | None = None) -> tuple[bytes, bytes]:
    """A fresh challenge for ``purpose`` and its signature (by default with the password)."""
    ch = await c.ok(wire.Challenge(id=c.next_id(), name=acct.name, purpose=purpose))
    assert isinstance(ch, wire.ChallengeOk)
    if seed is None:
        seed = acct.pk.auth_seed
    return ch.challenge, sign_challenge(seed, purpose, ch.relay_id, acct.name, ch.challenge)


async def fetch(c: RawClient, acct: Acct, totp: str | None = None, *, recovery: bool = False,
                seed: bytes | None = None) -> wire.Frame:
    purpose: wire.Purpose = "recovery" if recovery else "bundle"
    if recovery and seed is None:
        seed = acct.rk.auth_seed
    ch, sig = await proof(c, acct, purpose, seed)
    return await c.ask(wire.FetchBundle(
        id=c.next_id(), name=acct.name, challenge=ch, signature=sig, totp=totp, recovery=recovery
    ))


async def login(c: RawClient, acct: Acct, totp: str | None = None, *, device_id: bytes | None = None,
                seed: bytes | None = None, prekeys: wire.PrekeySet | None = None) -> wire.Frame:
    ch, sig = await proof(c, acct, "login", seed)
    return await c.ask(wire.Login(
        id=c.next_id(), name=acct.name, challenge=ch, signature=sig,
        device=acct.cert(secrets.token_bytes(16) if device_id is None else device_id),
        prekeys=prekeys, totp=totp,
    ))


async def second_device(c: RawClient, acct: Acct, *, device_id: bytes | None = None,
                        **kw: Any) -> tuple[bytes, bytes]:
    """Log a new device of the account in on ``c`` (``device_id``, fresh by default; give
    it when the prekeys sent are signed for it): (device id, token)."""
    if device_id is None:
        device_id = secrets.token_bytes(16)
    ans = await login(c, acct, device_id=device_id, **kw)
    assert isinstance(ans, wire.SessionOk), ans
    return device_id, ans.token


async def enable_mfa(env: Env, c: RawClient, acct: Acct) -> None:
    """Turn TOTP on for the account (``c`` has its session); the clock then moves on a
    step, so that the next code is a fresh one."""
    acct.secret = new_secret()
    ch, sig = await proof(c, acct, "mfa")
    await c.ok(wire.MfaEnable(id=c.next_id(), name=acct.name, challenge=ch, signature=sig,
                              secret=acct.secret, totp=acct.code(env.clock.step())))
    env.clock.next_step()


def wrong_code(secret: bytes, step: int) -> str:
    """A well-formed code valid for none of the steps around ``step``."""
    valid = {code_at(secret, s) for s in range(step - 3, step + 4)}
    n = 0
    while f"{n:06d}" in valid:
        n += 1
    return f"{n:06d}"


async def params(c: RawClient, name: str) -> wire.AuthParamsOk:
    ans = await c.ok(wire.AuthParams(id=c.next_id(), name=name))
    assert isinstance(ans, wire.AuthParamsOk)
    return ans


async def totp_row(env: Env, acct: Acct) -> tuple[Any, ...]:
    """(TOTP secret, last step) of the account; the secret unsealed where the store seals it."""
    rows = await sql(env.relay, "SELECT totp_secret, totp_last_step, id FROM accounts WHERE name_mac = ?",
                     env.service.mac(acct.name))
    secret, step, account_id = rows[0]
    assert env.relay.state is not None
    engine = env.relay.state.store.e
    return (None if secret is None else engine.unseal("totp_secret", account_id, bytes(secret))), step


async def account_row(env: Env, acct: Acct) -> tuple[Any, ...]:
    rows = await sql(env.relay, "SELECT * FROM accounts WHERE name_mac = ?", env.service.mac(acct.name))
    return rows[0]


async def snapshot(env: Env, acct: Acct) -> dict[str, Any]:
    """What a refused request must leave as it was."""
    mac = env.service.mac(acct.name)
    (account_id,) = (await sql(env.relay, "SELECT id FROM accounts WHERE name_mac = ?", mac))[0]
    return {
        "account": await account_row(env, acct),
        "devices": await sql(env.relay, "SELECT * FROM devices WHERE account_id = ? ORDER BY device_id", account_id),
        "sessions": await sql(env.relay, "SELECT * FROM sessions WHERE account_id = ? ORDER BY token_hash",
                              account_id),
        "prekeys": await sql(env.relay, "SELECT o.* FROM one_time_prekeys o JOIN devices d USING (device_id)"
                             " WHERE d.account_id = ? ORDER BY o.device_id, o.key_id", account_id),
        "signed": await sql(env.relay, "SELECT s.* FROM signed_prekeys s JOIN devices d USING (device_id)"
                            " WHERE d.account_id = ? ORDER BY s.device_id", account_id),
        "revoked": await sql(env.relay, "SELECT device_id, account_id, day FROM revoked_devices WHERE account_id = ? ORDER BY device_id",
                             account_id),
    }


async def assert_closed(c: RawClient) -> None:
    """The relay ends the connection (after any pushes still on their way)."""
    with pytest.raises(ConnectionClosed):
        while True:
            frame = await c.frame()
            assert isinstance(frame, wire.Deliver), frame


async def assert_session(c: RawClient) -> None:
    ans = await c.ok(wire.ListDevices(id=c.next_id()))
    assert isinstance(ans, wire.DevicesOk)


async def devices_of(c: RawClient) -> dict[bytes, wire.DeviceInfo]:
    ans = await c.ok(wire.ListDevices(id=c.next_id()))
    assert isinstance(ans, wire.DevicesOk)
    return {d.device_id: d for d in ans.devices}


# ---- MFA ----------------------------------------------------------------------------


async def test_mfa_enable_checks_the_first_code_and_happens_once(env: Env) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as c:
            alice = await register(env, c, "alice")
            assert not (await params(c, "alice")).mfa
            assert not (await params(c, "nobody_here")).mfa  # no account: no MFA
            step = env.clock.step()
            secret = new_secret()
            # A first code that is not one of the secret's now: refused like a wrong
            # password, and nothing is stored.
            for bad in (wrong_code(secret, step), code_at(secret, step + 2), code_at(secret, step - 2)):
                ch, sig = await proof(c, alice, "mfa")
                err = await c.refused(wire.MfaEnable(id=c.next_id(), name=alice.name, challenge=ch, signature=sig,
                                                     secret=secret, totp=bad), E.AUTH_FAILED)
                assert err.message == FAILED
                env.forgive(alice.name)
                assert await totp_row(env, alice) == (None, None)
            assert not (await params(c, "alice")).mfa
            # The right code turns it on; the step it proved is the last one accepted.
            ch, sig = await proof(c, alice, "mfa")
            await c.ok(wire.MfaEnable(id=c.next_id(), name=alice.name, challenge=ch, signature=sig,
                                      secret=secret, totp=code_at(secret, step)))
            assert await totp_row(env, alice) == (secret, step)
            assert (await params(c, "alice")).mfa
            # Once more, with another secret: refused before the proof; nothing changes...
            ch, sig = await proof(c, alice, "mfa")
            other = new_secret()
            await c.refused(wire.MfaEnable(id=c.next_id(), name=alice.name, challenge=ch, signature=sig,
                                           secret=other, totp=code_at(other, step)), E.MFA_ENABLED)
            assert await totp_row(env, alice) == (secret, step)
            assert env.failures(alice.name) == 0
            # ... and nothing was used up: that very challenge turns MFA off, with a new code.
            env.clock.next_step()
            await c.ok(wire.MfaDisable(id=c.next_id(), name=alice.name, challenge=ch, signature=sig,
                                       totp=code_at(secret, env.clock.step())))
            assert await totp_row(env, alice) == (None, None)
            assert not (await params(c, "alice")).mfa
            ch, sig = await proof(c, alice, "mfa")
            await c.refused(wire.MfaDisable(id=c.next_id(), name=alice.name, challenge=ch, signature=sig,
                                            totp=code_at(secret, env.clock.step())), E.MFA_NOT_ENABLED)
        async with raw_client(env.url) as c:  # no session: no MFA changes
            ch, sig = await proof(c, alice, "mfa")
            await c.refused(wire.MfaEnable(id=c.next_id(), name=alice.name, challenge=ch, signature=sig,
                                           secret=secret, totp=code_at(secret, env.clock.step())),
                            E.NOT_AUTHENTICATED)


async def test_mfa_proofs_without_a_fresh_code_fail_like_a_wrong_password(env: Env) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as c:
            alice = await register(env, c, "alice")
            await enable_mfa(env, c, alice)
        assert alice.secret is not None
        attempts: dict[str, Callable[..., Awaitable[wire.Frame]]] = {"fetch_bundle": fetch, "login": login}
        for kind, attempt in attempts.items():
            await sql(env.relay, "UPDATE accounts SET code_failures = 0")
            step = env.clock.step()
            bad = {
                "no code": None,
                "a wrong code": wrong_code(alice.secret, step),
                "a code two steps ahead": alice.code(step + 2),
                "a code two steps behind": alice.code(step - 2),
                "a code already used (turning MFA on)": alice.code(step - 1),
            }
            for what, code in bad.items():
                async with raw_client(env.url) as c:
                    ans = await attempt(c, alice, code)
                    assert isinstance(ans, wire.Error) and (ans.code, ans.message) == (E.AUTH_FAILED, FAILED), (
                        kind, what, ans)
                    env.forgive(alice.name)  # counted as one failure, like a wrong password
            # Each wrong code counted against the day's allowance (see the next test).
            assert await sql(env.relay, "SELECT code_failures FROM accounts") == [(len(bad),)]
            await sql(env.relay, "UPDATE accounts SET code_failures = 0")
            async with raw_client(env.url) as c:
                # The password is right, but not the code: the same answer as a wrong password.
                ans = await attempt(c, alice, code := alice.code(step))
                assert not isinstance(ans, wire.Error), (kind, ans)
                assert (await totp_row(env, alice))[1] == step
            async with raw_client(env.url) as c:  # that code, again
                ans = await attempt(c, alice, code)
                assert isinstance(ans, wire.Error) and ans.code == E.AUTH_FAILED, (kind, ans)
                env.forgive(alice.name)
            async with raw_client(env.url) as c:  # a wrong password with a right code
                env.clock.next_step()
                wrong = password_keys("not the password", alice.salt, TEST_KDF).auth_seed
                ans = await attempt(c, alice, alice.code(env.clock.step()), seed=wrong)
                assert isinstance(ans, wire.Error) and ans.code == E.AUTH_FAILED, (kind, ans)
                env.forgive(alice.name)
                # The code was not spent by the failed password: it still serves.
                ans = await attempt(c, alice, alice.code(env.clock.step()))
                assert not isinstance(ans, wire.Error), (kind, ans)
            env.clock.next_step()


async def test_after_ten_wrong_codes_in_a_day_no_code_passes_until_the_next(env: Env) -> None:
    """Someone who has the password guesses codes: each guess is throttled like a wrong
    password, and after MAX_CODE_FAILURES in one day even the right code fails (with the
    same answer) until the day is over. A wrong password does not count: only the
    password's owner (or thief) can use up the allowance."""
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as c:
            alice = await register(env, c, "alice")
            await enable_mfa(env, c, alice)
        assert alice.secret is not None
        wrong = password_keys("not the password", alice.salt, TEST_KDF).auth_seed
        async with raw_client(env.url) as c:
            ans = await login(c, alice, wrong_code(alice.secret, env.clock.step()), seed=wrong)
            assert isinstance(ans, wire.Error) and ans.code == E.AUTH_FAILED
            env.forgive(alice.name)
        assert await sql(env.relay, "SELECT code_failures FROM accounts") == [(0,)]
        for _ in range(MAX_CODE_FAILURES):
            async with raw_client(env.url) as c:
                ans = await login(c, alice, wrong_code(alice.secret, env.clock.step()))
                assert isinstance(ans, wire.Error) and (ans.code, ans.message) == (E.AUTH_FAILED, FAILED)
                env.forgive(alice.name)
        async with raw_client(env.url) as c:
            ans = await login(c, alice, alice.code(env.clock.step()))
            assert isinstance(ans, wire.Error) and (ans.code, ans.message) == (E.AUTH_FAILED, FAILED)
            env.forgive(alice.name)
        # The next day the right code works again (and a used one stays used: none was).
        await sql(env.relay, "UPDATE accounts SET code_fail_day = code_fail_day - 1")
        async with raw_client(env.url) as c:
            assert isinstance(await login(c, alice, alice.code(env.clock.step())), wire.SessionOk)


async def test_an_accepted_code_covers_the_rest_of_its_connection_only(env: Env) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as c:
            alice = await register(env, c, "alice")
            await enable_mfa(env, c, alice)
        async with raw_client(env.url) as c:
            bob = await register(env, c, "bob")
            await enable_mfa(env, c, bob)
        async with raw_client(env.url) as a, raw_client(env.url) as b:
            assert isinstance(await fetch(a, alice, alice.code(env.clock.step())), wire.BundleOk)
            # A new device's login right after its fetch_bundle: no second code.
            assert isinstance(await login(a, alice), wire.SessionOk)
            # Not on another connection...
            ans = await login(b, alice)
            assert isinstance(ans, wire.Error) and ans.code == E.AUTH_FAILED
            env.forgive(alice.name)
            # ... and not for another account on the same one.
            ans = await fetch(a, bob)
            assert isinstance(ans, wire.Error) and ans.code == E.AUTH_FAILED
            env.forgive(bob.name)
        env.clock.next_step()
        async with raw_client(env.url) as a:
            assert isinstance(await fetch(a, alice, alice.code(env.clock.step())), wire.BundleOk)
            env.clock.now += MFA_GRANT_SECONDS + 1  # the grant has run out
            ans = await login(a, alice)
            assert isinstance(ans, wire.Error) and ans.code == E.AUTH_FAILED
            env.forgive(alice.name)
            assert isinstance(await login(a, alice, alice.code(env.clock.step())), wire.SessionOk)
            # Turning MFA off needs a code of its own: the grant does not count, nor does
            # the code it came from.
            ch, sig = await proof(a, alice, "mfa")
            await a.refused(wire.MfaDisable(id=a.next_id(), name=alice.name, challenge=ch, signature=sig,
                                            totp=alice.code(env.clock.step())), E.AUTH_FAILED)
            env.forgive(alice.name)
            assert (await totp_row(env, alice))[0] == alice.secret
            env.clock.next_step()
            ch, sig = await proof(a, alice, "mfa")
            await a.ok(wire.MfaDisable(id=a.next_id(), name=alice.name, challenge=ch, signature=sig,
                                       totp=alice.code(env.clock.step())))
            assert await totp_row(env, alice) == (None, None)
        async with raw_client(env.url) as a:  # MFA off: the password alone again
            assert isinstance(await login(a, alice), wire.SessionOk)


async def test_one_code_serves_one_of_two_connections_at_once(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as c:
            alice = await register(env, c, "alice")
            await enable_mfa(env, c, alice)

        async def race() -> list[wire.Frame]:
            code = alice.code(env.clock.step())
            answers: list[wire.Frame] = []
            async with raw_client(env.url) as a, raw_client(env.url) as b:
                frames = []
                for conn in (a, b):
                    ch, sig = await proof(conn, alice, "bundle")
                    frames.append(wire.FetchBundle(id=9, name=alice.name, challenge=ch, signature=sig, totp=code))

                async def ask(conn: RawClient, frame: wire.FetchBundle) -> None:
                    answers.append(await conn.ask(frame))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ask, a, frames[0])
                    nursery.start_soon(ask, b, frames[1])
            return answers

        answers = await race()
        assert sorted(type(x).__name__ for x in answers) == ["BundleOk", "Error"], answers
        assert wire.Error(9, E.AUTH_FAILED, FAILED) in answers
        env.service.throttle.succeed(env.service.mac(alice.name))
        env.clock.next_step()
        # Even if both got past the throttle and both read the account before either
        # recorded the code, only one records it (compare-and-set in the store).
        service = env.service
        real_account = service._account
        arrived: list[str] = []
        both = trio.Event()

        async def both_read(name: str) -> Any:
            account = await real_account(name)
            arrived.append(name)
            if len(arrived) == 2:
                both.set()
            await both.wait()
            return account

        monkeypatch.setattr(service, "_account", both_read)
        monkeypatch.setattr(service.throttle, "attempt", lambda key: True)
        answers = await race()
        assert len(arrived) == 2
        assert sorted(type(x).__name__ for x in answers) == ["BundleOk", "Error"], answers
        assert wire.Error(9, E.AUTH_FAILED, FAILED) in answers
        assert (await totp_row(env, alice))[1] == env.clock.step()


# ---- recovery -------------------------------------------------------------------------


def recover_frame(c: RawClient, acct: Acct, device: wire.DeviceCert, fields: dict[str, Any],
                  **extra: Any) -> wire.Recover:
    return wire.Recover(id=c.next_id(), name=acct.name, device=device, **fields, **extra)


async def test_recovery_replaces_the_credentials_and_ends_every_session(env: Env) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as o1, raw_client(env.url) as o2:
            alice = await register(env, o1, "alice")
            other_device, other_token = await second_device(o2, alice)
            async with raw_client(env.url) as r, raw_client(env.url) as w:
                ans = await fetch(r, alice, recovery=True)
                assert isinstance(ans, wire.BundleOk)
                # The recovery copy of the bundle, which the recovery code opens.
                keys = unwrap_bundle(ans.bundle, alice.rk.wrap_key, alice.name)
                assert keys.public() == alice.keys.public()
                # A failure meanwhile (elsewhere): a recovery clears the throttle.
                ans = await fetch(w, alice, seed=password_keys("a guess", alice.salt, TEST_KDF).auth_seed)
                assert isinstance(ans, wire.Error) and ans.code == E.AUTH_FAILED
                assert env.failures(alice.name) == 1
                salt, pk, fields = credentials(keys, alice.name)
                rk = recovery_keys(parse_recovery_code(new_recovery_code()))
                new_device = secrets.token_bytes(16)
                session = await r.ok(recover_frame(
                    r, alice, alice.cert(new_device), fields,
                    recovery_auth_pub=auth_public_key(rk.auth_seed),
                    recovery_bundle=wrap_bundle(keys, rk.wrap_key, alice.name),
                    prekeys=prekey_set(keys, one_time=3),
                ))
                assert isinstance(session, wire.SessionOk) and session.device_id == new_device
                assert env.failures(alice.name) == 0
                assert set(await devices_of(r)) == {alice.device_id, other_device, new_device}
                # Every other connection of the account ended with its session.
                await assert_closed(o1)
                await assert_closed(o2)
                await r.assert_alive()
        rows = await sql(env.relay, "SELECT count(*) FROM one_time_prekeys WHERE device_id = ?", new_device)
        assert rows == [(3,)]
        for token in (alice.token, other_token):
            async with raw_client(env.url) as c:
                await c.refused(wire.Resume(id=c.next_id(), token=token), E.AUTH_FAILED)
        async with raw_client(env.url) as c:
            await c.ok(wire.Resume(id=c.next_id(), token=session.token))
        new = dataclasses.replace(alice, salt=salt, pk=pk, rk=rk)
        # The old password and the old recovery code prove nothing any more...
        for what, seed, recovery in (("old password", alice.pk.auth_seed, False),
                                     ("old recovery code", alice.rk.auth_seed, True)):
            async with raw_client(env.url) as c:
                ans = await fetch(c, alice, seed=seed, recovery=recovery)
                assert isinstance(ans, wire.Error) and ans.code == E.AUTH_FAILED, what
                env.forgive(alice.name)
        # ... the new ones do, and the bundles are the new ones.
        async with raw_client(env.url) as c:
            assert (await params(c, "alice")).salt == salt
            ans = await fetch(c, new)
            assert isinstance(ans, wire.BundleOk)
            assert unwrap_bundle(ans.bundle, pk.wrap_key, alice.name).public() == alice.keys.public()
            assert isinstance(await login(c, new), wire.SessionOk)
        async with raw_client(env.url) as c:
            ans = await fetch(c, new, recovery=True)
            assert isinstance(ans, wire.BundleOk)
            assert unwrap_bundle(ans.bundle, rk.wrap_key, alice.name).public() == alice.keys.public()


async def test_recover_needs_a_recovery_proof_on_its_own_connection(env: Env) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as c:
            alice = await register(env, c, "alice")
            before = await snapshot(env, alice)
        async with raw_client(env.url) as c:
            bob = await register(env, c, "bob")
        _, _, fields = credentials(alice.keys, alice.name)

        def frame(c: RawClient, **extra: Any) -> wire.Recover:
            return recover_frame(c, alice, alice.cert(secrets.token_bytes(16)), fields, **extra)

        no_recovery = "prove the recovery code first (fetch_bundle with recovery)"
        async with raw_client(env.url) as c, raw_client(env.url) as elsewhere:
            err = await c.refused(frame(c), E.NO_RECOVERY)
            assert err.message == no_recovery
            # A password proof is not a recovery proof...
            assert isinstance(await fetch(c, alice), wire.BundleOk)
            await c.refused(frame(c), E.NO_RECOVERY)
            # ... nor is one for another account.
            assert isinstance(await fetch(c, bob, recovery=True), wire.BundleOk)
            await c.refused(frame(c), E.NO_RECOVERY)
            # A wrong recovery code: auth_failed, counted, and no grant.
            wrong = recovery_keys(parse_recovery_code(new_recovery_code()))
            ans = await fetch(c, alice, recovery=True, seed=wrong.auth_seed)
            assert isinstance(ans, wire.Error) and (ans.code, ans.message) == (E.AUTH_FAILED, FAILED)
            env.forgive(alice.name)
            ans = await fetch(c, alice, recovery=True, seed=alice.pk.auth_seed)  # the password's key
            assert isinstance(ans, wire.Error) and ans.code == E.AUTH_FAILED
            env.forgive(alice.name)
            await c.refused(frame(c), E.NO_RECOVERY)
            # The grant is for this connection only.
            assert isinstance(await fetch(c, alice, recovery=True), wire.BundleOk)
            await elsewhere.refused(frame(elsewhere), E.NO_RECOVERY)
            # Half a recovery pair is a malformed frame.
            await c.refused(frame(c, recovery_auth_pub=bytes(32)), E.BAD_FRAME)
            # And it lasts RECOVERY_GRANT_SECONDS.
            env.clock.now += RECOVERY_GRANT_SECONDS + 1
            await c.refused(frame(c), E.NO_RECOVERY)
        async with raw_client(env.url) as c:  # not on a connection that has a session
            await c.ok(wire.Resume(id=c.next_id(), token=alice.token))
            assert isinstance(await fetch(c, alice, recovery=True), wire.BundleOk)
            await c.refused(frame(c), E.ALREADY_AUTHENTICATED)
        assert await snapshot(env, alice) == before


async def test_a_refused_recover_changes_nothing(env: Env) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as o, raw_client(env.url) as r:
            alice = await register(env, o, "alice")
            async with raw_client(env.url) as c:
                bob = await register(env, c, "bob")
            async with raw_client(env.url) as c:
                revoked, _ = await second_device(c, alice)
            ch, sig = await proof(o, alice, "revoke")
            await o.ok(wire.RevokeDevice(id=o.next_id(), name=alice.name, challenge=ch, signature=sig,
                                         device_id=revoked))
            stranger = next(env.pool)
            assert isinstance(await fetch(r, alice, recovery=True), wire.BundleOk)
            before = await snapshot(env, alice)
            _, pk, fields = credentials(alice.keys, alice.name)
            new_device = secrets.token_bytes(16)
            refusals: list[tuple[str, wire.DeviceCert, wire.PrekeySet | None, str]] = [
                ("a certificate by other keys",
                 wire.DeviceCert(new_device, sign_device(stranger, alice.name, new_device)), None, E.BAD_KEY),
                ("a certificate of another device", wire.DeviceCert(new_device, alice.cert().sig), None, E.BAD_KEY),
                ("a signed prekey by other keys", alice.cert(new_device), prekey_set(stranger), E.BAD_KEY),
                ("a revoked device", alice.cert(revoked), None, E.DEVICE_REVOKED),
                ("another account's device", alice.cert(bob.device_id), None, E.UNKNOWN_DEVICE),
                # The device holds 2 one-time prekeys already: 99 more is over the limit,
                # found only once the credentials and sessions are changed in the transaction.
                ("too many prekeys", alice.cert(), prekey_set(alice.keys, one_time=99, first=10), E.PREKEY_LIMIT),
            ]
            for what, cert, prekeys, code in refusals:
                await r.refused(recover_frame(r, alice, cert, fields, prekeys=prekeys), code)
                assert await snapshot(env, alice) == before, what
                await o.assert_alive()
                await assert_session(o)
            # An account with all its devices: no new one, and nothing else changes.
            for _ in range(wire.MAX_DEVICES - 1):
                async with raw_client(env.url) as c:
                    await second_device(c, alice)
            before = await snapshot(env, alice)
            await r.refused(recover_frame(r, alice, alice.cert(new_device), fields), E.TOO_MANY_DEVICES)
            assert await snapshot(env, alice) == before
            await assert_session(o)
            # The grant outlived the refusals; an existing device recovers.
            ans = await r.ok(recover_frame(r, alice, alice.cert(), fields))
            assert isinstance(ans, wire.SessionOk) and ans.device_id == alice.device_id
            await assert_closed(o)
        async with raw_client(env.url) as c:
            assert isinstance(await fetch(c, dataclasses.replace(alice, pk=pk)), wire.BundleOk)


# ---- password change ------------------------------------------------------------------


async def test_change_password(env: Env) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as a, raw_client(env.url) as b, raw_client(env.url) as bc:
            alice = await register(env, a, "alice")
            _, b_token = await second_device(b, alice)
            bob = await register(env, bc, "bob")
            bob_before = await account_row(env, bob)
            # The proof must name the session's account (here bob's own, right, proof on
            # alice's session).
            ch, sig = await proof(a, bob, "passwd")
            _, _, fields = credentials(bob.keys, bob.name)
            err = await a.refused(wire.ChangePassword(id=a.next_id(), name=bob.name, challenge=ch, signature=sig,
                                                      **fields), E.AUTH_FAILED)
            assert err.message == FAILED
            env.forgive(bob.name)
            assert await account_row(env, bob) == bob_before
            # A "login" proof is not a "passwd" one.
            ch, sig = await proof(a, alice, "login")
            salt, pk, fields = credentials(alice.keys, alice.name)
            await a.refused(wire.ChangePassword(id=a.next_id(), name=alice.name, challenge=ch, signature=sig,
                                                **fields), E.AUTH_FAILED)
            env.forgive(alice.name)
            # The change, keeping the other sessions.
            ch, sig = await proof(a, alice, "passwd")
            await a.ok(wire.ChangePassword(id=a.next_id(), name=alice.name, challenge=ch, signature=sig, **fields))
            async with raw_client(env.url) as c:
                ans = await fetch(c, alice)
                assert isinstance(ans, wire.Error) and ans.code == E.AUTH_FAILED
                env.forgive(alice.name)
            new = dataclasses.replace(alice, salt=salt, pk=pk)
            async with raw_client(env.url) as c:
                assert (await params(c, "alice")).salt == salt
                ans = await fetch(c, new)
                assert isinstance(ans, wire.BundleOk)
                assert unwrap_bundle(ans.bundle, pk.wrap_key, alice.name).public() == alice.keys.public()
            await assert_session(b)  # the other device's session goes on
            async with raw_client(env.url) as c:
                await c.ok(wire.Resume(id=c.next_id(), token=b_token))
            # Again, ending the other sessions: the other device's connection closes, and
            # a connection with this one's own session stays.
            async with raw_client(env.url) as same:
                await same.ok(wire.Resume(id=same.next_id(), token=alice.token))
                ch, sig = await proof(a, new, "passwd")
                _, pk3, fields = credentials(alice.keys, alice.name)
                await a.ok(wire.ChangePassword(id=a.next_id(), name=alice.name, challenge=ch, signature=sig,
                                               end_sessions=True, **fields))
                await assert_closed(b)
                await assert_session(same)
            await assert_session(a)
            await assert_session(bc)  # another account's session is untouched
        async with raw_client(env.url) as c:
            await c.refused(wire.Resume(id=c.next_id(), token=b_token), E.AUTH_FAILED)
        async with raw_client(env.url) as c:
            await c.ok(wire.Resume(id=c.next_id(), token=alice.token))
        async with raw_client(env.url) as c:  # a session is needed
            ch, sig = await proof(c, new, "passwd")
            await c.refused(wire.ChangePassword(id=c.next_id(), name=alice.name, challenge=ch, signature=sig,
                                                **fields), E.NOT_AUTHENTICATED)
        async with raw_client(env.url) as c:
            assert isinstance(await fetch(c, dataclasses.replace(alice, pk=pk3)), wire.BundleOk)


async def test_change_password_with_mfa_takes_a_code_or_the_grant(env: Env) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as a:
            alice = await register(env, a, "alice")
            await enable_mfa(env, a, alice)
            # The code that turned MFA on was accepted on this connection: no second one.
            _, pk, fields = credentials(alice.keys, alice.name)
            ch, sig = await proof(a, alice, "passwd")
            await a.ok(wire.ChangePassword(id=a.next_id(), name=alice.name, challenge=ch, signature=sig, **fields))
            new = dataclasses.replace(alice, pk=pk)
        async with raw_client(env.url) as b:  # another connection of the same session
            await b.ok(wire.Resume(id=b.next_id(), token=alice.token))
            _, pk, fields = credentials(alice.keys, alice.name)
            ch, sig = await proof(b, new, "passwd")
            await b.refused(wire.ChangePassword(id=b.next_id(), name=alice.name, challenge=ch, signature=sig,
                                                **fields), E.AUTH_FAILED)
            env.forgive(alice.name)
            ch, sig = await proof(b, new, "passwd")
            await b.ok(wire.ChangePassword(id=b.next_id(), name=alice.name, challenge=ch, signature=sig,
                                           totp=alice.code(env.clock.step()), **fields))
            new = dataclasses.replace(alice, pk=pk)
            # Right after, on the same connection, the grant stands in for a code.
            _, pk, fields = credentials(alice.keys, alice.name)
            ch, sig = await proof(b, new, "passwd")
            await b.ok(wire.ChangePassword(id=b.next_id(), name=alice.name, challenge=ch, signature=sig, **fields))
            new = dataclasses.replace(alice, pk=pk)
        async with raw_client(env.url) as c:
            assert isinstance(await fetch(c, new, alice.code(env.clock.step() + 1)), wire.BundleOk)


# ---- devices: names, list, revocation ---------------------------------------------------


async def test_rename_and_list_devices(env: Env) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as c1, raw_client(env.url) as c2, raw_client(env.url) as cb:
            alice = await register(env, c1, "alice")
            d2, _ = await second_device(c2, alice)
            bob = await register(env, cb, "bob")
            listed = await devices_of(c1)
            assert set(listed) == {alice.device_id, d2}
            for device_id, info in listed.items():
                assert info.sig == alice.cert(device_id).sig
                assert info.created_day == today() and info.last_seen_day == today()
                assert info.label is None and info.active
            # A name set from one device shows on the others; renaming overwrites.
            label = secrets.token_bytes(93)
            await c1.ok(wire.RenameDevice(id=c1.next_id(), device_id=d2, label=label))
            assert (await devices_of(c2))[d2].label == label
            label = secrets.token_bytes(93)
            await c2.ok(wire.RenameDevice(id=c2.next_id(), device_id=d2, label=label))
            await c2.ok(wire.RenameDevice(id=c2.next_id(), device_id=alice.device_id, label=label[::-1]))
            listed = await devices_of(c1)
            assert (listed[d2].label, listed[alice.device_id].label) == (label, label[::-1])
            # Only the account's own devices.
            for device_id in (secrets.token_bytes(16), bob.device_id):
                err = await c1.refused(wire.RenameDevice(id=c1.next_id(), device_id=device_id, label=label),
                                       E.UNKNOWN_DEVICE)
                assert err.message == "no such device in this account"
            assert (await devices_of(cb))[bob.device_id].label is None
            # The label is opaque but bounded.
            for size in (28, 257):
                await c1.expect_error(pack({"t": "rename_device", "id": 7, "device_id": d2,
                                            "label": bytes(size)}), E.BAD_FRAME, 7)
            # A device whose session ends is no longer active (and was last seen today).
            await c2.ok(wire.Logout(id=c2.next_id()))
            listed = await devices_of(c1)
            assert not listed[d2].active and listed[d2].last_seen_day == today()
            assert listed[alice.device_id].active
            # last_seen_day follows the days the device's sessions are used; active ends
            # with the session's idle limit.
            await sql(env.relay, "UPDATE devices SET last_seen_day = ? WHERE device_id = ?", today() - 3,
                      alice.device_id)
            await sql(env.relay, "UPDATE sessions SET idle_day = ? WHERE device_id = ?", today() - 3,
                      alice.device_id)
            assert (await devices_of(c1))[alice.device_id].last_seen_day == today() - 3
            async with raw_client(env.url) as c:
                await c.ok(wire.Resume(id=c.next_id(), token=alice.token))
                assert (await devices_of(c))[alice.device_id].last_seen_day == today()
            await sql(env.relay, "UPDATE sessions SET idle_day = ? WHERE device_id = ?",
                      today() - SESSION_IDLE_DAYS - 1, alice.device_id)
            assert not (await devices_of(c1))[alice.device_id].active
        async with raw_client(env.url) as c:
            await c.refused(wire.RenameDevice(id=c.next_id(), device_id=d2, label=label), E.NOT_AUTHENTICATED)


async def test_sessions_expire_when_idle_and_at_their_absolute_end(env: Env) -> None:
    """A session is good while resumed within 30 days and up to its expiry day; after
    either, resume fails (as for any unknown token), the row goes, and the device shows
    as not active. The expiry day is 180 days after the session was opened."""
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as c1, raw_client(env.url) as c2:
            alice = await register(env, c1, "alice")
            d2, d2_token = await second_device(c2, alice)
            (expires,) = (await sql(env.relay, "SELECT expires_day FROM sessions WHERE device_id = ?", d2))[0]
            assert expires == today() + SESSION_MAX_DAYS
        # The last day each limit allows still works.
        await sql(env.relay, "UPDATE sessions SET idle_day = ? WHERE device_id = ?", today() - SESSION_IDLE_DAYS, d2)
        async with raw_client(env.url) as c:
            await c.ok(wire.Resume(id=c.next_id(), token=d2_token))
        await sql(env.relay, "UPDATE sessions SET expires_day = ? WHERE device_id = ?", today(), alice.device_id)
        async with raw_client(env.url) as c:
            await c.ok(wire.Resume(id=c.next_id(), token=alice.token))
        # One day more, and they are gone.
        await sql(env.relay, "UPDATE sessions SET idle_day = ? WHERE device_id = ?",
                  today() - SESSION_IDLE_DAYS - 1, d2)
        await sql(env.relay, "UPDATE sessions SET expires_day = ? WHERE device_id = ?", today() - 1,
                  alice.device_id)
        async with raw_client(env.url) as c:
            for token in (d2_token, alice.token):
                await c.refused(wire.Resume(id=c.next_id(), token=token), E.AUTH_FAILED)
        assert await sql(env.relay, "SELECT count(*) FROM sessions") == [(0,)]
        # A new session for the first device (the password again): the other shows as not active.
        async with raw_client(env.url) as c:
            assert isinstance(await login(c, alice, device_id=alice.device_id), wire.SessionOk)
            listed = await devices_of(c)
            assert listed[alice.device_id].active and not listed[d2].active


async def test_revoke_device(env: Env) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as c1, raw_client(env.url) as c2, raw_client(env.url) as cb:
            alice = await register(env, c1, "alice")
            d2 = secrets.token_bytes(16)
            kem = [new_kem_key(alice.keys, use, i, 0, device_id=d2) for i, use in enumerate(KemUse, start=1)]
            _, d2_token = await second_device(c2, alice, device_id=d2, prekeys=msgspec.structs.replace(
                prekey_set(alice.keys), kem_one_time=[wire.KemKeyPub(kem[0].key_id, kem[0].public, kem[0].signature)],
                kem_last_resort=wire.KemKeyPub(kem[1].key_id, kem[1].public, kem[1].signature),
                envelope_key=wire.KemKeyPub(kem[2].key_id, kem[2].public, kem[2].signature)))
            assert len(await sql(env.relay, "SELECT 1 FROM kem_prekeys WHERE device_id = ?", d2)) == 3
            bob = await register(env, cb, "bob")
            env_ = envelope(d2)
            await cb.ok(wire.Send(id=cb.next_id(), envelopes=[env_]))
            assert await mailbox_eids(env.relay, d2) == [env_.eid]
            before = await snapshot(env, alice)
            # Refusals before the proof: they change nothing and use nothing up.
            ch, sig = await proof(c1, alice, "revoke")
            for device_id in (secrets.token_bytes(16), bob.device_id):
                err = await c1.refused(wire.RevokeDevice(id=c1.next_id(), name=alice.name, challenge=ch,
                                                         signature=sig, device_id=device_id), E.UNKNOWN_DEVICE)
                assert err.message == "no such device in this account"
            bch, bsig = await proof(cb, bob, "revoke")
            err = await cb.refused(wire.RevokeDevice(id=cb.next_id(), name=bob.name, challenge=bch, signature=bsig,
                                                     device_id=bob.device_id), E.LAST_DEVICE)
            assert "only device" in err.message
            # The proof must name the session's account.
            await c1.refused(wire.RevokeDevice(id=c1.next_id(), name=bob.name, challenge=bch, signature=bsig,
                                               device_id=d2), E.AUTH_FAILED)
            env.forgive(bob.name)
            assert await snapshot(env, alice) == before
            assert env.failures(alice.name) == 0
            # The revocation, with the challenge the refusals did not use.
            await c1.ok(wire.RevokeDevice(id=c1.next_id(), name=alice.name, challenge=ch, signature=sig,
                                          device_id=d2))
            # The revoked device's connection is told, then closed.
            pushed = await c2.answer()
            assert pushed == wire.Error(0, E.DEVICE_REVOKED, "this device was revoked by another device of the account")
            await assert_closed(c2)
            # It cannot come back: not with its token, not with the password.
            async with raw_client(env.url) as c:
                err = await c.refused(wire.Resume(id=c.next_id(), token=d2_token), E.DEVICE_REVOKED)
                assert err.message == "this device was revoked by another device of the account"
            async with raw_client(env.url) as c:
                ans = await login(c, alice, device_id=d2)
                assert ans == wire.Error(ans.id, E.DEVICE_REVOKED,  # type: ignore[attr-defined]
                                         "this device was revoked; it cannot log in again")
            # Its mailbox, prekeys and sessions went with it; lookups no longer list it,
            # and mail for it is refused.
            for table in ("mailbox", "signed_prekeys", "one_time_prekeys", "kem_prekeys", "sessions", "devices"):
                assert await sql(env.relay, f"SELECT 1 FROM {table} WHERE device_id = ?", d2) == [], table
            keys = await cb.ok(wire.LookupKeys(id=cb.next_id(), name=alice.name))
            assert isinstance(keys, wire.KeysOk) and [d.device_id for d in keys.devices] == [alice.device_id]
            assert d2 not in {k.device_id for k in keys.envelope_keys}
            await cb.refused(wire.Send(id=cb.next_id(), envelopes=[envelope(d2)]), E.UNKNOWN_DEVICE)
            assert set(await devices_of(c1)) == {alice.device_id}
            # What the relay keeps of it: its id and its session's token hash, by the day.
            (account_id,) = (await sql(env.relay, "SELECT id FROM accounts WHERE name_mac = ?",
                                       env.service.mac(alice.name)))[0]
            assert await sql(env.relay, "SELECT device_id, account_id, day FROM revoked_devices") == [(d2, account_id, today())]
            tokens = await sql(env.relay, "SELECT * FROM revoked_tokens")
            assert tokens == [(hashlib.sha256(d2_token).digest(), today() + SESSION_IDLE_DAYS)]
            # Revoked already: refused before the proof.
            ch, sig = await proof(c1, alice, "revoke")
            err = await c1.refused(wire.RevokeDevice(id=c1.next_id(), name=alice.name, challenge=ch,
                                                     signature=sig, device_id=d2), E.DEVICE_REVOKED)
            assert err.message == "that device was revoked already"
            # The account's only device now: only with last, and then this connection's
            # own device goes: the answer, then the end of the connection.
            await c1.refused(wire.RevokeDevice(id=c1.next_id(), name=alice.name, challenge=ch, signature=sig,
                                               device_id=alice.device_id), E.LAST_DEVICE)
            await c1.ok(wire.RevokeDevice(id=c1.next_id(), name=alice.name, challenge=ch, signature=sig,
                                          device_id=alice.device_id, last=True))
            await assert_closed(c1)
            await assert_session(cb)
        async with raw_client(env.url) as c:
            await c.refused(wire.Resume(id=c.next_id(), token=alice.token), E.DEVICE_REVOKED)
        assert await sql(env.relay, "SELECT 1 FROM devices WHERE account_id = ?", account_id) == []


async def test_revoke_with_mfa_and_every_connection_of_the_device(env: Env) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as c0:
            alice = await register(env, c0, "alice")
            await enable_mfa(env, c0, alice)  # (c0 may now act without a code)
        async with raw_client(env.url) as c1, raw_client(env.url) as c2, raw_client(env.url) as c3:
            await c1.ok(wire.Resume(id=c1.next_id(), token=alice.token))
            d2, d2_token = await second_device(c2, alice, totp=alice.code(env.clock.step()))
            await c3.ok(wire.Resume(id=c3.next_id(), token=d2_token))
            ch, sig = await proof(c1, alice, "revoke")
            await c1.refused(wire.RevokeDevice(id=c1.next_id(), name=alice.name, challenge=ch, signature=sig,
                                               device_id=d2), E.AUTH_FAILED)
            env.forgive(alice.name)
            assert set(await devices_of(c1)) == {alice.device_id, d2}
            env.clock.next_step()
            ch, sig = await proof(c1, alice, "revoke")
            await c1.ok(wire.RevokeDevice(id=c1.next_id(), name=alice.name, challenge=ch, signature=sig,
                                          device_id=d2, totp=alice.code(env.clock.step())))
            for c in (c2, c3):
                assert await c.answer() == wire.Error(0, E.DEVICE_REVOKED,
                                                      "this device was revoked by another device of the account")
                await assert_closed(c)
            await assert_session(c1)


# ---- frames ----------------------------------------------------------------------------


async def test_the_new_frames_are_decoded_strictly(env: Env) -> None:
    proof_fields = {"name": "alice", "challenge": bytes(32), "signature": bytes(64)}
    cert = {"device_id": bytes(16), "sig": bytes(64)}
    creds = {"salt": bytes(16), "kdf": {"t": 1, "m": 8192, "p": 1}, "auth_pub": bytes(32), "bundle": bytes(16)}
    bad: list[dict[str, Any]] = []
    for code in ("12a456", "12345", "1234567", "123456\n", " 123456", "١٢٣٤٥٦", 123456):
        bad += [
            {"t": "fetch_bundle", **proof_fields, "totp": code},
            {"t": "login", **proof_fields, "device": cert, "totp": code},
            {"t": "mfa_disable", **proof_fields, "totp": code},
            {"t": "mfa_enable", **proof_fields, "secret": bytes(20), "totp": code},
            {"t": "revoke_device", **proof_fields, "device_id": bytes(16), "totp": code},
            {"t": "change_password", **proof_fields, **creds, "totp": code},
        ]
    bad += [
        {"t": "fetch_bundle", **proof_fields, "recovery": 1},
        {"t": "mfa_enable", **proof_fields, "secret": bytes(19), "totp": "123456"},
        {"t": "mfa_enable", **proof_fields, "secret": bytes(20)},
        {"t": "mfa_disable", **proof_fields},
        {"t": "recover", "name": "alice", **creds},
        {"t": "recover", "name": "alice", **creds, "device": cert, "recovery_bundle": bytes(8)},
        {"t": "change_password", **proof_fields, **creds, "end_sessions": "yes"},
        {"t": "change_password", **proof_fields, **creds, "recovery_auth_pub": bytes(32)},
        {"t": "revoke_device", **proof_fields, "device_id": bytes(15)},
        {"t": "revoke_device", **proof_fields, "device_id": bytes(16), "last": 1},
        {"t": "rename_device", "device_id": bytes(16)},
    ]
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as c:
            for i, fields in enumerate(bad, start=1):
                await c.expect_error(pack({**fields, "id": i}), E.BAD_FRAME, i)
            await c.assert_alive()


# ---- the store, on its own ----------------------------------------------------------------


def new_store(path: Path) -> tuple[RelayStore, int, bytes]:
    store = open_sqlite(path, secrets.token_bytes(32))
    first = secrets.token_bytes(16)
    blob = secrets.token_bytes(32)
    account_id = store.create_account(NewAccount(
        name_mac=secrets.token_bytes(32), salt=bytes(16), kdf=(1, 8192, 1), auth_pub=blob, enc_pub=blob,
        identity_pub=blob, dh_pub=blob, keys_sig=bytes(64), bundle=blob, recovery_auth_pub=blob,
        recovery_bundle=blob,
    ), first, bytes(64))
    return store, account_id, first


def test_an_account_remembers_at_most_64_revoked_devices(tmp_path: Path) -> None:
    store, account_id, _ = new_store(tmp_path / "relay.db")
    ids = [secrets.token_bytes(16) for _ in range(MAX_REVOKED + 6)]
    for device_id in ids:
        assert store.ensure_device(account_id, device_id, bytes(64), wire.MAX_DEVICES)
        store.revoke_device(account_id, device_id, allow_last=False)
    (count,) = store.conn.execute("SELECT count(*) FROM revoked_devices WHERE account_id = ?",
                                  (account_id,)).fetchone()
    assert count == MAX_REVOKED
    # The oldest were forgotten (they could come back); the rest are still refused.
    assert store.ensure_device(account_id, ids[0], bytes(64), wire.MAX_DEVICES)
    with pytest.raises(DeviceRevoked):
        store.ensure_device(account_id, ids[6], bytes(64), wire.MAX_DEVICES)
    store.close()


def test_totp_steps_are_compare_and_set(tmp_path: Path) -> None:
    store, account_id, _ = new_store(tmp_path / "relay.db")
    secret, other = new_secret(), new_secret()
    assert not store.advance_totp(account_id, secret, 5)  # MFA off
    assert store.enable_totp(account_id, secret, 10)
    assert not store.enable_totp(account_id, other, 11)
    assert not store.advance_totp(account_id, secret, 10)  # that step was used
    assert not store.advance_totp(account_id, secret, 9)  # an older one
    assert not store.advance_totp(account_id, other, 11)  # a code of another secret
    assert store.advance_totp(account_id, secret, 11)
    assert not store.advance_totp(account_id, secret, 11)
    account = store.account_by_id(account_id)
    assert account is not None and (account.totp_secret, account.totp_last_step) == (secret, 11)
    assert not store.disable_totp(account_id, other)
    assert store.disable_totp(account_id, secret)
    account = store.account_by_id(account_id)
    assert account is not None and (account.totp_secret, account.totp_last_step) == (None, None)
    store.close()


def test_revoked_tokens_expire_with_the_sessions_they_were(tmp_path: Path) -> None:
    store, account_id, _ = new_store(tmp_path / "relay.db")
    second = secrets.token_bytes(16)
    assert store.ensure_device(account_id, second, bytes(64), wire.MAX_DEVICES)
    fresh, idle = secrets.token_bytes(32), secrets.token_bytes(32)
    store.create_session(fresh, account_id, second)
    store.create_session(idle, account_id, second)
    store.conn.execute("UPDATE sessions SET idle_day = ? WHERE token_hash = ?", (today() - 20, idle))
    store.revoke_device(account_id, second, allow_last=False)
    assert store.token_revoked(fresh) and store.token_revoked(idle)
    rows = dict(store.conn.execute("SELECT token_hash, expires_day FROM revoked_tokens").fetchall())
    # Kept until the session would have ended anyway (unused, by its idle limit).
    assert rows == {fresh: today() + SESSION_IDLE_DAYS, idle: today() - 20 + SESSION_IDLE_DAYS}
    # ... or its expiry, if that comes first.
    third = secrets.token_bytes(16)
    assert store.ensure_device(account_id, third, bytes(64), wire.MAX_DEVICES)
    old = secrets.token_bytes(32)
    store.create_session(old, account_id, third)
    store.conn.execute("UPDATE sessions SET expires_day = ? WHERE token_hash = ?", (today() + 3, old))
    store.revoke_device(account_id, third, allow_last=False)
    assert store.conn.execute("SELECT expires_day FROM revoked_tokens WHERE token_hash = ?",
                              (old,)).fetchone() == (today() + 3,)
    store.conn.execute("UPDATE revoked_tokens SET expires_day = ? WHERE token_hash = ?", (today() - 1, idle))
    store.expire()
    assert store.token_revoked(fresh) and not store.token_revoked(idle)
    store.close()


def test_migration_0003_keeps_existing_devices_and_when_they_were_seen(tmp_path: Path) -> None:
    path, key = tmp_path / "relay.db", secrets.token_bytes(32)
    older = Migrations("veil-relay")  # the migrations of before issue 11
    older(name="0001_initial")(_m0001)
    older(name="0002_prekeys")(_m0002)
    db = open_encrypted(path, key)
    older.apply(db)
    db.execute("INSERT INTO accounts (id, name_mac, salt, kdf_t, kdf_m, kdf_p, auth_pub, enc_pub, identity_pub,"
               " dh_pub, keys_sig, bundle, recovery_auth_pub, recovery_bundle, created_day)"
               " VALUES (1, x'01', x'00', 1, 8, 1, x'00', x'00', x'00', x'00', x'00', x'00', x'00', x'00', 1)")
    db.execute("INSERT INTO devices (device_id, account_id, sig, created_day) VALUES (x'0a', 1, x'00', 1)")
    db.execute("INSERT INTO devices (device_id, account_id, sig, created_day) VALUES (x'0b', 1, x'00', 1)")
    db.execute("INSERT INTO sessions VALUES (x'ff', 1, x'0a', ?, ?)", (today() - 2, today() + 9))
    db.conn.close()
    store = open_sqlite(path, key)
    rows = store.device_list(1)
    assert [(r.device_id, r.last_seen_day, r.label, r.active) for r in rows] == [
        (b"\x0a", today() - 2, None, True), (b"\x0b", None, None, False),
    ]
    store.close()


async def test_a_login_in_flight_does_not_survive_a_recovery(env: Env) -> None:
    """Someone with the old password has a login under way while the owner recovers: the
    session it would open is refused, because the auth key it was proved with is not
    the account's any more (found by a review: it used to outlive "every session ended")."""
    with trio.fail_after(DEADLINE):
        svc = env.service
        real_open = svc._open_session
        gate, reached = trio.Event(), trio.Event()

        async def slow_open(*args: Any) -> wire.Frame:
            reached.set()
            await gate.wait()  # stands for the mailroom queue between the proof and the session
            return await real_open(*args)

        async with raw_client(env.url) as o:
            alice = await register(env, o, "alice")
        svc._open_session = slow_open  # type: ignore[method-assign]
        result: dict[str, wire.Frame] = {}
        async with raw_client(env.url) as thief, raw_client(env.url) as owner:
            async def steal() -> None:
                result["ans"] = await login(thief, alice)  # the old password

            async with trio.open_nursery() as n:
                n.start_soon(steal)
                await reached.wait()
                svc._open_session = real_open  # type: ignore[method-assign]
                ans = await fetch(owner, alice, recovery=True)
                assert isinstance(ans, wire.BundleOk)
                keys = unwrap_bundle(ans.bundle, alice.rk.wrap_key, alice.name)
                _, _, fields = credentials(keys, alice.name)
                assert isinstance(await owner.ok(recover_frame(owner, alice, alice.cert(secrets.token_bytes(16)),
                                                               fields)), wire.SessionOk)
                gate.set()
        ans = result["ans"]
        assert isinstance(ans, wire.Error) and ans.code == E.AUTH_FAILED, ans
        assert await sql(env.relay, "SELECT count(*) FROM sessions") == [(1,)]  # the owner's


async def test_a_recovery_grant_ends_with_the_recovery_code_it_proved(env: Env) -> None:
    """A thief of the recovery code holds a grant; the owner recovers with a new code: the
    thief's grant no longer recovers (found by a review)."""
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as o:
            alice = await register(env, o, "alice")
        async with raw_client(env.url) as thief, raw_client(env.url) as owner:
            assert isinstance(await fetch(thief, alice, recovery=True), wire.BundleOk)
            ans = await fetch(owner, alice, recovery=True)
            assert isinstance(ans, wire.BundleOk)
            keys = unwrap_bundle(ans.bundle, alice.rk.wrap_key, alice.name)
            _, _, fields = credentials(keys, alice.name)
            rk2 = recovery_keys(parse_recovery_code(new_recovery_code()))
            await owner.ok(recover_frame(owner, alice, alice.cert(secrets.token_bytes(16)), fields,
                                         recovery_auth_pub=auth_public_key(rk2.auth_seed),
                                         recovery_bundle=wrap_bundle(keys, rk2.wrap_key, alice.name)))
            before = await snapshot(env, alice)
            _, _, again = credentials(keys, alice.name)
            await thief.refused(recover_frame(thief, alice, alice.cert(secrets.token_bytes(16)), again),
                                E.NO_RECOVERY)
            assert await snapshot(env, alice) == before
            await assert_session(owner)


async def test_a_recovery_grant_from_before_mfa_was_turned_on_recovers_nothing(env: Env) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as o, raw_client(env.url) as thief:
            alice = await register(env, o, "alice")
            assert isinstance(await fetch(thief, alice, recovery=True), wire.BundleOk)
            await enable_mfa(env, o, alice)
            keys = alice.keys
            _, _, fields = credentials(keys, alice.name)
            await thief.refused(recover_frame(thief, alice, alice.cert(secrets.token_bytes(16)), fields),
                                E.NO_RECOVERY)
            await assert_session(o)


async def test_a_thief_of_the_password_alone_cannot_use_up_the_owners_codes(env: Env) -> None:
    """Ten wrong codes with the password (no session) lock out new logins for the day,
    but not the owner's own session, nor a recovery (found by a second review: one
    count for everything let a password thief stop the owner changing the password)."""
    with trio.fail_after(DEADLINE):
        async with raw_client(env.url) as owner:
            alice = await register(env, owner, "alice")
            await enable_mfa(env, owner, alice)
            assert alice.secret is not None
            for _ in range(MAX_CODE_FAILURES + 2):
                async with raw_client(env.url) as thief:
                    ans = await login(thief, alice, wrong_code(alice.secret, env.clock.step()))
                    assert isinstance(ans, wire.Error) and ans.code == E.AUTH_FAILED
                    env.forgive(alice.name)
            # The owner, on the session, with a right code: the password changes.
            ch, sig = await proof(owner, alice, "passwd")
            _, pk, fields = credentials(alice.keys, alice.name)
            await owner.ok(wire.ChangePassword(id=owner.next_id(), name=alice.name, challenge=ch, signature=sig,
                                               totp=alice.code(env.clock.step()), **fields))
            alice.pk = pk
            # And the new password's count starts afresh: a new device logs in.
            env.clock.next_step()
            async with raw_client(env.url) as c:
                assert isinstance(await login(c, alice, alice.code(env.clock.step())), wire.SessionOk)
        # A session's own wrong codes count for that session only (a new connection: no grant).
        for _ in range(MAX_CODE_FAILURES):  # a connection each: its own delays stay short
            async with raw_client(env.url) as s:
                await s.ok(wire.Resume(id=s.next_id(), token=alice.token))
                ch, sig = await proof(s, alice, "revoke")
                await s.refused(wire.RevokeDevice(id=s.next_id(), name=alice.name, challenge=ch, signature=sig,
                                                  device_id=alice.device_id, last=True,
                                                  totp=wrong_code(alice.secret, env.clock.step())),
                                E.AUTH_FAILED)
                env.forgive(alice.name)
        assert await sql(env.relay, "SELECT code_failures FROM sessions WHERE token_hash = ?",
                         hashlib.sha256(alice.token).digest()) == [(MAX_CODE_FAILURES,)]
        env.clock.next_step()
        if True:
            async with raw_client(env.url) as c:
                ans = await fetch(c, alice, alice.code(env.clock.step()), recovery=True)
                assert isinstance(ans, wire.BundleOk)


def test_changes_check_their_session_and_password_inside_the_transaction(tmp_path: Path) -> None:
    """What a recovery (or a password change) committed first ends: a change asked on a
    session it deleted, or proved with the password it replaced, changes nothing (found
    by a second review: an mfa_enable queued behind a recovery still turned MFA on)."""
    store, account_id, first = new_store(tmp_path / "relay.db")
    (auth_pub,) = store.conn.execute("SELECT auth_pub FROM accounts WHERE id = ?", (account_id,)).fetchone()
    auth_pub = bytes(auth_pub)
    live, gone = secrets.token_bytes(32), secrets.token_bytes(32)
    store.create_session(live, account_id, first)
    secret = new_secret()
    with pytest.raises(NoSession):
        store.enable_totp(account_id, secret, 1, gone, auth_pub)
    with pytest.raises(CredentialsChanged):
        store.enable_totp(account_id, secret, 1, live, secrets.token_bytes(32))
    assert store.conn.execute("SELECT totp_secret FROM accounts").fetchone() == (None,)
    assert store.enable_totp(account_id, secret, 1, live, auth_pub)
    with pytest.raises(CredentialsChanged):
        store.disable_totp(account_id, secret, live, secrets.token_bytes(32))
    creds = Credentials(bytes(16), (1, 8192, 1), secrets.token_bytes(32), secrets.token_bytes(32))
    with pytest.raises(CredentialsChanged):
        store.change_password(account_id, creds, live, False, secrets.token_bytes(32))
    with pytest.raises(NoSession):
        store.revoke_device(account_id, first, True, gone, auth_pub)
    assert store.conn.execute("SELECT auth_pub FROM accounts").fetchone() == (auth_pub,)
    assert store.conn.execute("SELECT count(*) FROM devices").fetchone() == (1,)
    store.close()
