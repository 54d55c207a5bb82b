"""What the relay does with each request: one method per request frame.

``RelayService`` holds the relay-wide state (the mailroom, who is online, outstanding
challenges, failure throttles). Handlers take the connection's ``Peer`` state and a
decoded request and return the answer frame; a refusal is raised as ``Refused`` and
becomes an ``Error`` frame. Nothing here logs a name, a token or a key.
"""

from __future__ import annotations

import hmac
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, NoReturn, TypeVar

import trio

import wire
from keyvault.auth import verify_challenge
from keyvault.errors import BadKey
from keyvault.kdf import DEFAULT_KDF
from keyvault.kem import KemUse, verify_kem_key
from keyvault.keys import PublicKeys, verify_account_keys, verify_device
from keyvault.prekeys import verify_signed_prekey
from keyvault.totp import accept as totp_accept
from relay.auth import CHALLENGE_TTL, Challenges, Throttle, name_mac, new_token, token_hash
from relay.delivery import Outlet, Router
from relay.keyfile import RelayKeys
from relay.limits import AccountBuckets, Bucket, ByteBudget, KeyedBuckets
from relay.mailroom import Mailroom
from relay.pgstore import SharedThrottle
from relay.store import (
    Account,
    Bundle,
    Credentials,
    CredentialsChanged,
    DeviceRevoked,
    LastDevice,
    MailboxFull,
    NameTaken,
    NewAccount,
    NoSession,
    PrekeyCounts,
    PrekeyLimit,
    Prekeys,
    Stored,
    TooManyDevices,
    UnknownDevice,
)

E = wire.ErrorCode
K = TypeVar("K", int, bytes)
T = TypeVar("T")


class Refused(Exception):
    """A request the relay answers with an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def auth_failed() -> Refused:
    """A fresh exception each time: one shared instance would collect, in its traceback,
    every failed handler's frame (and so its connection) for the life of the process."""
    return Refused(E.AUTH_FAILED, "authentication failed")


def not_authenticated() -> Refused:
    return Refused(E.NOT_AUTHENTICATED, "log in first")


REVOKED_HERE = "this device was revoked; it cannot log in again"
REVOKED_ELSEWHERE = "this device was revoked by another device of the account"

MAX_PER_DEVICE = 4  # connections with a session for one device
MAX_PER_ACCOUNT = 32  # ... for all the devices of one account (16 devices, two each)
ACCOUNT_SEND_BYTES = 32 * 1024 * 1024  # envelope bytes awaiting commit, per account
MAX_CHALLENGES_PER_CONNECTION = 16  # a login needs two
MAX_NAME_CHECKS = 10  # name_free per connection: enough for a person choosing a name
NAME_CHECK_RATE = 5.0  # name_free per second, relay-wide
NAME_CHECK_BURST = 50.0
DAY = 86400.0
MFA_GRANT_SECONDS = 300.0  # a code accepted on a connection stands for later proofs there
RECOVERY_GRANT_SECONDS = 600.0  # a recovery proof lets its connection recover this long

# How a proof treats the account's second factor: a code or this connection's grant, a
# code always, or no code (mfa_enable: the code it carries is for the new secret).
SecondFactor = Literal["grant", "code", "none"]


@dataclass
class Rations:
    """What one party may take from everyone else, per unit of time: the relay's answer
    to floods that are each within every per-connection limit. In memory only (a restart
    forgets them); every table is capped, least recently used first."""

    # New accounts, relay-wide: a successful registration gives its connection a
    # session, so only a relay-wide rate bounds what one client can create.
    registrations_per_hour: float = 600.0
    registration_burst: float = 60.0
    # Envelopes from one account to one device: enough for any person and for a week's
    # backlog, far too few to keep someone's mailbox full (it drains faster).
    sender_rate: float = 1.0  # a second
    sender_burst: float = 300.0
    # One-time prekeys handed out: per (requesting account, device), and per device.
    # Beyond either, the bundle has only the signed prekey (X3DH still works; the
    # first message lacks the one-time prekey's extra forward secrecy).
    prekeys_per_requester_day: float = 8.0  # a few devices of one account, and a re-try
    prekeys_per_device_hour: float = 20.0
    # Prekey uploads per device: a device uploads when it connects and after first contacts
    # drain its stock; each costs the relay up to 52 signature checks (about 10 ms).
    uploads_per_device_hour: float = 60.0
    # Tables: per account at most this many devices it is rationed for (a new one is
    # refused while all have spent buckets: no one can reset their own by spraying), and
    # at most max_keys entries per table in all (about 330 bytes each).
    per_account_keys: int = 4096
    max_keys: int = 131_072




async def _no_send(frame: wire.Frame) -> None:
    raise RuntimeError("peer has no connection")


def _no_reply(frame: wire.Frame) -> None:
    pass


def _no_send_now(frame: wire.Frame) -> bool:
    return False


Grant = tuple[int, float, bytes | None]  # account id, when given, what it was proved against


def _changed_meanwhile() -> Refused:
    """A change asked on a session that a recovery or a password change (committed
    first) ended, or with a password that is no longer the account's."""
    return Refused(E.NOT_AUTHENTICATED, "this session ended meanwhile (or the password changed); log in again")


def _recovery_bound(account: Account) -> bytes:
    """What a recovery grant was proved against: the recovery auth key and the TOTP
    secret (a newer recovery code, or MFA turned on or changed, ends the grant)."""
    return account.recovery_auth_pub + (account.totp_secret or b"")


def _granted(grant: Grant | None, account_id: int, now: float, ttl: float, bound: bytes | None) -> bool:
    """Whether a grant (account id, when given, the key or secret it was proved against)
    covers this account now: the same account, in time, and ``bound`` unchanged since."""
    return (grant is not None and grant[0] == account_id and 0.0 <= now - grant[1] <= ttl
            and grant[2] == bound)


@dataclass(eq=False)
class Peer:
    """The relay's view of one connection."""

    account_id: int | None = None
    device_id: bytes | None = None
    token_hash: bytes | None = None
    outlet: Outlet | None = None
    send: Callable[[wire.Frame], Awaitable[None]] = field(default=_no_send, repr=False)
    outlet_scope: trio.CancelScope | None = field(default=None, repr=False)
    reply: Callable[[wire.Frame], None] = field(default=_no_reply, repr=False)
    # A frame written at once if the connection can take it now, else False (nothing sent)
    send_now: Callable[[wire.Frame], bool] = field(default=_no_send_now, repr=False)
    # Send a last frame if it can go without waiting, then end the connection.
    finish: Callable[[wire.Frame], None] = field(default=_no_reply, repr=False)
    finished: bool = False  # ending: nothing more is answered
    failures: int = 0
    registrations: int = 0
    name_checks: int = 0
    challenges: deque[float] = field(default_factory=deque)  # when each one issued here expires
    nursery: trio.Nursery | None = field(default=None, repr=False)
    # (account id, service clock time) of the last TOTP code accepted here, and of the
    # last recovery proof made here.
    mfa_grant: Grant | None = None  # bound to the TOTP secret the code was of
    recovery_grant: Grant | None = None  # bound to the recovery auth key it proved

    def end(self, frame: wire.Frame) -> None:
        """Send ``frame`` (after the frames queued already) if it can go without waiting,
        then end the connection; it reads no more requests and answers none."""
        self.finished = True
        self.finish(frame)

    def close(self) -> None:
        """End this connection (from outside it: a logout elsewhere, a newer connection)."""
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    def detach(self) -> None:
        """Forget the connection's tasks and closures (which refer back to this peer)."""
        self.send = _no_send
        self.reply = _no_reply
        self.send_now = _no_send_now
        self.finish = _no_reply
        self.nursery = None
        self.outlet = None
        self.outlet_scope = None


def _name(raw: str) -> str:
    try:
        return wire.normalize_username(raw)
    except ValueError as exc:
        raise Refused(E.BAD_NAME, str(exc)) from None


PREKEY_LIMITS = (wire.MAX_ONE_TIME_PREKEYS, wire.MAX_KEM_ONE_TIME_PREKEYS)  # held per device
# Where the service's room check counts only the frame's own keys (a new device, or one
# that may be another account's: the store counts what it holds, when it stores them).
NO_PREKEYS = PrekeyCounts(None, 0, 0, None, None)


def _prekey_limit() -> Refused:
    return Refused(E.PREKEY_LIMIT, f"a device holds at most {wire.MAX_ONE_TIME_PREKEYS} one-time prekeys"
                   f" and {wire.MAX_KEM_ONE_TIME_PREKEYS} one-time KEM prekeys")


def _check_prekeys(identity: bytes, prekeys: wire.PrekeySet | None, device_id: bytes) -> None:
    """The signatures of the single keys of a prekey set: the signed prekey, the
    last-resort KEM prekey and the envelope key, each for its own use (``bad_key``). The
    one-time KEM prekeys are checked apart (RelayService._check_kem_one_time)."""
    if prekeys is None:
        return
    sp = prekeys.signed
    if sp is not None and not verify_signed_prekey(identity, sp.key_id, sp.public, sp.sig):
        raise Refused(E.BAD_KEY, "the signed prekey's signature does not verify")
    for use, key, what in ((KemUse.LAST_RESORT, prekeys.kem_last_resort, "last-resort KEM prekey"),
                           (KemUse.ENVELOPE, prekeys.envelope_key, "envelope key")):
        if key is not None and not verify_kem_key(identity, use, key.key_id, key.public, key.sig, device_id=device_id):
            raise Refused(E.BAD_KEY, f"the {what}'s signature does not verify")


def _stored_prekeys(prekeys: wire.PrekeySet) -> Prekeys:
    sp, lr, ek = prekeys.signed, prekeys.kem_last_resort, prekeys.envelope_key
    return Prekeys(
        signed=None if sp is None else (sp.key_id, sp.public, sp.sig),
        one_time=[(k.key_id, k.public) for k in prekeys.one_time],
        kem_one_time=[(k.key_id, k.public, k.sig) for k in prekeys.kem_one_time],
        kem_last_resort=None if lr is None else (lr.key_id, lr.public, lr.sig),
        envelope_key=None if ek is None else (ek.key_id, ek.public, ek.sig),
    )


def _status_ok(rid: int, counts: PrekeyCounts) -> wire.PrekeyStatusOk:
    return wire.PrekeyStatusOk(
        id=rid, signed_id=counts.signed_id, one_time_left=counts.one_time_left,
        kem_one_time_left=counts.kem_one_time_left, kem_last_resort_id=counts.kem_last_resort_id,
        envelope_key_id=counts.envelope_key_id,
    )


def _leave(table: dict[K, dict[Peer, None]], key: K | None, peer: Peer) -> None:
    if key is None:
        return
    bound = table.get(key)
    if bound is not None:
        bound.pop(peer, None)
        if not bound:
            del table[key]


@dataclass(eq=False)
class Admitted:
    """A send that passed its checks: what it took of the sender's ration."""

    service: RelayService
    account: int
    wants: dict[bytes, float]
    refunded: bool = False

    def refund(self, keep: set[bytes] | frozenset[bytes] = frozenset()) -> None:
        """Give the ration back (the send was not stored), but for the devices in
        ``keep``; once."""
        if not self.refunded:
            self.refunded = True
            for device_id, n in self.wants.items():
                if device_id not in keep:
                    self.service.sender_budget.give_back(self.account, device_id, n)


class RelayService:
    def __init__(self, keys: RelayKeys, relay_id: bytes, mailroom: Mailroom, router: Router,
                 rations: Rations | None = None) -> None:
        r = rations or Rations()
        self.rations = r
        self.keys = keys
        self.relay_id = relay_id
        self.mailroom = mailroom
        self.router = router
        self.challenges = Challenges()
        # Failed logins per account: in this process's memory, or (a store that other
        # processes share) in the store, so that spreading guesses over processes gains nothing.
        self.throttle: Throttle | SharedThrottle = SharedThrottle(mailroom.store) if mailroom.store.shared else Throttle()
        # name_free across the whole relay, whatever the connections: checking names one by
        # one must stay slow for an outsider (a person choosing a name needs a handful).
        self.name_check_budget = Bucket(NAME_CHECK_RATE, NAME_CHECK_BURST)
        self.registrations = Bucket(r.registrations_per_hour / 3600, r.registration_burst)
        self.sender_budget: AccountBuckets[bytes] = AccountBuckets(
            r.sender_rate, r.sender_burst, r.per_account_keys, r.max_keys
        )
        self.prekey_requester_budget: AccountBuckets[bytes] = AccountBuckets(
            r.prekeys_per_requester_day / DAY, r.prekeys_per_requester_day, r.per_account_keys, r.max_keys
        )
        self.prekey_device_budget: KeyedBuckets[bytes] = KeyedBuckets(
            r.prekeys_per_device_hour / 3600, r.prekeys_per_device_hour, r.max_keys
        )
        self.upload_budget: KeyedBuckets[bytes] = KeyedBuckets(
            r.uploads_per_device_hour / 3600, r.uploads_per_device_hour, r.max_keys
        )
        self._bound: dict[bytes, dict[Peer, None]] = {}  # device id -> its connections
        self._by_account: dict[int, dict[Peer, None]] = {}  # account id -> its connections
        self._send_budgets: dict[int, ByteBudget] = {}  # account id -> bytes awaiting commit
        self.max_per_device = MAX_PER_DEVICE
        self.max_per_account = MAX_PER_ACCOUNT
        self.clock: Callable[[], float] = time.time  # for TOTP codes and the grants
        self._nursery: trio.Nursery | None = None  # for checks after a lost listener (set by the server)
        self._session_notices = 0  # sessions other processes ended: a resume in flight checks again

    def mac(self, name: str) -> bytes:
        return name_mac(self.keys.name_mac_key, name)

    async def handle(self, peer: Peer, req: wire.Request) -> wire.Frame:
        """Answer one request (raises Refused)."""
        match req:
            case wire.Ping():
                return wire.Ok(id=req.id)
            case wire.AuthParams():
                return await self.auth_params(req)
            case wire.NameFree():
                if peer.name_checks >= MAX_NAME_CHECKS:
                    raise Refused(E.RATE_LIMITED, "too many name checks on one connection")
                peer.name_checks += 1
                if not self.name_check_budget.take():
                    raise Refused(E.RATE_LIMITED, "too many name checks at this relay; try again shortly")
                return wire.NameFreeOk(id=req.id, free=await self._account(_name(req.name)) is None)
            case wire.Challenge():
                mac = self.mac(_name(req.name))
                now = trio.current_time()
                while peer.challenges and peer.challenges[0] <= now:
                    peer.challenges.popleft()
                if len(peer.challenges) >= MAX_CHALLENGES_PER_CONNECTION:
                    raise Refused(E.RATE_LIMITED, "too many outstanding challenges on one connection")
                peer.challenges.append(now + CHALLENGE_TTL)
                return wire.ChallengeOk(
                    id=req.id, challenge=self.challenges.issue(mac, req.purpose), relay_id=self.relay_id
                )
            case wire.Register():
                return await self.register(peer, req)
            case wire.FetchBundle():
                return await self.fetch_bundle(peer, req)
            case wire.Login():
                return await self.login(peer, req)
            case wire.Resume():
                return await self.resume(peer, req)
            case wire.Logout():
                return await self.logout(peer, req)
            case wire.LookupKeys():
                return await self.lookup_keys(peer, req)
            case wire.UploadPrekeys():
                self._require_session(peer)
                assert peer.account_id is not None and peer.device_id is not None
                device_id = peer.device_id  # a logout elsewhere may unbind the peer meanwhile
                if not self.upload_budget.take(device_id):  # before any signature is checked
                    raise Refused(E.RATE_LIMITED, "too many prekey uploads from this device; try again later")
                identity = await self.mailroom.call(self.mailroom.store.identity_of, peer.account_id)
                _check_prekeys(identity, req.prekeys, device_id)
                await self._check_kem_one_time(peer, identity, device_id, req.prekeys)
                return await self._publish(req.id, device_id, req.prekeys)
            case wire.PrekeyStatus():
                self._require_session(peer)
                counts = await self.mailroom.call(self.mailroom.store.prekey_status, peer.device_id)
                return _status_ok(req.id, counts)
            case wire.ClaimPrekeys():
                return await self.claim_prekeys(peer, req)
            case wire.ListDevices():
                self._require_session(peer)
                rows = await self.mailroom.call(self.mailroom.store.device_list, peer.account_id)
                return wire.DevicesOk(id=req.id, devices=[
                    wire.DeviceInfo(r.device_id, r.created_day, r.sig, r.label, r.last_seen_day, r.active)
                    for r in rows
                ])
            case wire.Recover():
                return await self.recover(peer, req)
            case wire.ChangePassword():
                return await self.change_password(peer, req)
            case wire.MfaEnable():
                return await self.mfa_enable(peer, req)
            case wire.MfaDisable():
                return await self.mfa_disable(peer, req)
            case wire.RenameDevice():
                account_id, _, _ = self._session(peer)
                store = self.mailroom.store
                if not await self.mailroom.call(store.rename_device, account_id, req.device_id, req.label):
                    raise Refused(E.UNKNOWN_DEVICE, "no such device in this account")
                return wire.Ok(id=req.id)
            case wire.RevokeDevice():
                return await self.revoke_device(peer, req)
        raise Refused(E.UNKNOWN_FRAME, "unknown request")  # pragma: no cover

    # ---- accounts ------------------------------------------------------------------
    async def auth_params(self, req: wire.AuthParams) -> wire.Frame:
        """Salt and KDF parameters; for a name with no account, a stable made-up answer
        of the same shape, so the answer does not tell whether the account exists."""
        name = _name(req.name)
        fake_salt = name_mac(self.keys.fake_salt_key, name)[:16]  # made either way: same work
        account = await self._account(name)
        if account is None:
            salt = fake_salt
            d = DEFAULT_KDF
            return wire.AuthParamsOk(id=req.id, salt=salt, kdf=wire.Kdf(d.time_cost, d.memory_kib, d.parallelism))
        t, m, p = account.kdf
        return wire.AuthParamsOk(
            id=req.id, salt=account.salt, kdf=wire.Kdf(t, m, p), mfa=account.totp_secret is not None
        )

    async def _account(self, name: str) -> Account | None:
        return await self.mailroom.call(self.mailroom.store.account, self.mac(name))

    async def register(self, peer: Peer, req: wire.Register) -> wire.Frame:
        if peer.account_id is not None:
            raise Refused(E.ALREADY_AUTHENTICATED, "this connection already has a session")
        if peer.registrations >= 3:
            raise Refused(E.RATE_LIMITED, "too many registrations on one connection")
        peer.registrations += 1
        name = _name(req.name)
        try:
            PublicKeys(enc=req.enc_pub, identity=req.identity_pub, dh=req.dh_pub).validate()
        except BadKey as exc:
            raise Refused(E.BAD_KEY, str(exc) or "malformed public key") from None
        if not verify_device(req.identity_pub, name, req.device.device_id, req.device.sig):
            raise Refused(E.BAD_KEY, "device signature does not verify")
        if not verify_account_keys(req.identity_pub, name, req.enc_pub, req.dh_pub, req.keys_sig):
            raise Refused(E.BAD_KEY, "the identity key does not vouch for the other keys")
        _check_prekeys(req.identity_pub, req.prekeys, req.device.device_id)
        # After the checks (junk costs no one a registration), before the account exists:
        # a taken name or device id spends one too, or register would be a free oracle.
        if not self.registrations.take():
            raise Refused(E.RATE_LIMITED, "this relay takes no more new accounts just now; try again in a few minutes")
        # Up to 50 signatures: only once a registration is spent (so no more often than the
        # relay takes registrations, whoever sends them).
        await self._check_kem_one_time(peer, req.identity_pub, req.device.device_id, req.prekeys, NO_PREKEYS)
        new = NewAccount(
            name_mac=self.mac(name),
            salt=req.salt,
            kdf=(req.kdf.t, req.kdf.m, req.kdf.p),
            auth_pub=req.auth_pub,
            enc_pub=req.enc_pub,
            identity_pub=req.identity_pub,
            dh_pub=req.dh_pub,
            keys_sig=req.keys_sig,
            bundle=req.bundle,
            recovery_auth_pub=req.recovery_auth_pub,
            recovery_bundle=req.recovery_bundle,
        )
        store = self.mailroom.store
        try:
            account_id = await self.mailroom.call(
                store.create_account, new, req.device.device_id, req.device.sig
            )
        except NameTaken:
            raise Refused(E.NAME_TAKEN, "that name is taken") from None
        except (UnknownDevice, DeviceRevoked):
            raise Refused(E.UNKNOWN_DEVICE, "device id already in use") from None
        if req.prekeys is not None:
            await self._publish(req.id, req.device.device_id, req.prekeys)
        return await self._open_session(peer, req.id, account_id, req.device.device_id)

    async def _prove(
        self, peer: Peer, raw_name: str, purpose: str, challenge: bytes, signature: bytes,
        totp: str | None = None, *, mfa: SecondFactor = "grant", session: Account | None = None,
    ) -> Account:
        """Check a signed challenge (with the recovery code's key for "recovery", the
        password's otherwise) and, if the account has TOTP, a code never accepted before
        (or, with ``mfa="grant"``, this connection's grant); the account on success,
        ``auth_failed`` (throttled) otherwise. ``session``: the account of the
        connection's session, which a session-bound proof must name."""
        name = _name(raw_name)
        mac = self.mac(name)
        redeemed = self.challenges.redeem(challenge, mac, purpose)
        # The gate and the block it sets happen together, before any await: concurrent
        # attempts on one account cannot all pass before the first failure is recorded.
        if not await self._throttle(self.throttle.attempt, mac) or not redeemed:
            await self._failed(peer, mac)
        if session is not None and not hmac.compare_digest(session.name_mac, mac):
            await self._failed(peer, mac)
        account = await self._account(name)
        if account is None:
            await self._failed(peer, mac)
        key = account.recovery_auth_pub if purpose == "recovery" else account.auth_pub
        if not verify_challenge(key, signature, purpose, self.relay_id, name, challenge):
            if account.totp_secret is not None and mfa != "none":
                # The same store round trip a wrong code makes: the time must not tell a
                # right password with a wrong code from a wrong password.
                await self.mailroom.call(self.mailroom.store.touch_account, account.id)
            await self._failed(peer, mac)
        if account.totp_secret is not None and mfa != "none":
            counter = "session" if session is not None else "recovery" if purpose == "recovery" else "password"
            await self._second_factor(peer, account, account.totp_secret, mac, totp, mfa == "grant", counter)
        await self._throttle(self.throttle.succeed, mac)
        return account

    async def _second_factor(
        self, peer: Peer, account: Account, secret: bytes, mac: bytes, code: str | None, grant: bool,
        counter: str,
    ) -> None:
        now = self.clock()
        if grant and _granted(peer.mfa_grant, account.id, now, MFA_GRANT_SECONDS, secret):
            return
        step = None
        if code is not None:
            try:
                step = totp_accept(secret, code, now, account.totp_last_step)
            except BadKey:
                step = None
        # The step is recorded only if no one recorded it (or a later one) since the
        # account was read: two connections with one code cannot both pass. A wrong (or
        # missing) code after a right password is counted, and after MAX_CODE_FAILURES
        # in a day no code passes until the next: guessing codes online stays hopeless.
        # Counted apart for proofs without a session, with the recovery code, and per
        # session, so that a thief of the password alone cannot use up the owner's.
        store = self.mailroom.store
        if not await self.mailroom.call(store.advance_totp, account.id, secret, step, counter, peer.token_hash):
            await self._failed(peer, mac)
        peer.mfa_grant = (account.id, now, secret)

    async def _throttle(self, step: Callable[[bytes], T], mac: bytes) -> T:
        """One throttle step: at once in memory, or one transaction in a shared store
        (where the check and the block it sets are one atomic step too)."""
        if isinstance(self.throttle, Throttle):
            return step(mac)
        return await self.mailroom.call(step, mac)

    async def _failed(self, peer: Peer, mac: bytes) -> NoReturn:
        delay = await self._throttle(self.throttle.fail, mac)
        peer.failures += 1
        # The connection waits too: a delay that grows with its own failures.
        await trio.sleep(max(delay, min(0.2 * 2 ** (peer.failures - 1), 10.0)))
        raise auth_failed()

    async def fetch_bundle(self, peer: Peer, req: wire.FetchBundle) -> wire.Frame:
        if not req.recovery:
            account = await self._prove(peer, req.name, "bundle", req.challenge, req.signature, req.totp)
            return wire.BundleOk(id=req.id, bundle=account.bundle)
        account = await self._prove(peer, req.name, "recovery", req.challenge, req.signature, req.totp)
        peer.recovery_grant = (account.id, self.clock(), _recovery_bound(account))
        return wire.BundleOk(id=req.id, bundle=account.recovery_bundle)

    async def login(self, peer: Peer, req: wire.Login) -> wire.Frame:
        if peer.account_id is not None:
            raise Refused(E.ALREADY_AUTHENTICATED, "this connection already has a session")
        account = await self._prove(peer, req.name, "login", req.challenge, req.signature, req.totp)
        name = _name(req.name)
        if not verify_device(account.identity_pub, name, req.device.device_id, req.device.sig):
            raise Refused(E.BAD_KEY, "device signature does not verify")
        _check_prekeys(account.identity_pub, req.prekeys, req.device.device_id)
        # After the password proof (one login per connection). Not what the device id holds
        # (it may be another account's): the store counts that when it stores them.
        await self._check_kem_one_time(peer, account.identity_pub, req.device.device_id, req.prekeys, NO_PREKEYS)
        try:
            ok = await self.mailroom.call(
                self.mailroom.store.ensure_device,
                account.id, req.device.device_id, req.device.sig, wire.MAX_DEVICES,
            )
        except UnknownDevice:
            raise Refused(E.UNKNOWN_DEVICE, "device id belongs to another account") from None
        except DeviceRevoked:
            raise Refused(E.DEVICE_REVOKED, REVOKED_HERE) from None
        if not ok:
            raise Refused(E.TOO_MANY_DEVICES, f"an account has at most {wire.MAX_DEVICES} devices")
        if req.prekeys is not None:
            await self._publish(req.id, req.device.device_id, req.prekeys)
        return await self._open_session(peer, req.id, account.id, req.device.device_id, account.auth_pub)

    async def _check_kem_one_time(
        self, peer: Peer, identity: bytes, device_id: bytes, prekeys: wire.PrekeySet | None,
        held: PrekeyCounts | None = None,
    ) -> None:
        """Check the one-time KEM prekeys of a prekey set whose other keys passed
        ``_check_prekeys``: first that the device, holding ``held`` (None: what the store
        says the session's own device holds), has room for them (``prekey_limit``), then
        their signatures (``bad_key``). The store checks the room again, atomically, when
        it stores them.

        Each costs about 0.1 ms to verify (Ed25519 and ML-KEM's encoding check), 50 a
        frame: about 5 ms, which the per-connection frame limits (500 frames a second, 32
        at a time) do not bound. So they are verified only after the count passed (a
        device with a full stock is refused before any is verified, however often it
        asks), in order, stopping at the first bad one; and a frame with a bad one makes
        its connection wait, as a failed resume does (0.2 s, doubling with each failure
        up to 10 s, holding one of its 32 request slots), so that bad signatures cannot
        be sent over and over at full rate either. (At register, login and recover they
        come after a registration is spent or a proof passed, once per connection.)"""
        if prekeys is None or not prekeys.kem_one_time:
            return
        if held is None:
            held = await self.mailroom.call(self.mailroom.store.prekey_status, device_id)
        if (held.one_time_left + len(prekeys.one_time) > wire.MAX_ONE_TIME_PREKEYS
                or held.kem_one_time_left + len(prekeys.kem_one_time) > wire.MAX_KEM_ONE_TIME_PREKEYS):
            raise _prekey_limit()
        for k in prekeys.kem_one_time:
            if not verify_kem_key(identity, KemUse.ONE_TIME, k.key_id, k.public, k.sig, device_id=device_id):
                peer.failures += 1
                await trio.sleep(min(0.2 * 2 ** (peer.failures - 1), 10.0))
                raise Refused(E.BAD_KEY, "a one-time KEM prekey's signature does not verify")

    async def _publish(self, rid: int, device_id: bytes, prekeys: wire.PrekeySet) -> wire.PrekeyStatusOk:
        """Store the device's prekeys (their signatures checked already: ``_check_prekeys``
        and ``_check_kem_one_time``)."""
        counts = await self.mailroom.call(
            self.mailroom.store.publish_prekeys, device_id, _stored_prekeys(prekeys), PREKEY_LIMITS,
        )
        if counts is None:
            raise _prekey_limit()
        return _status_ok(rid, counts)

    async def _open_session(
        self, peer: Peer, rid: int, account_id: int, device_id: bytes, auth_pub: bytes | None = None
    ) -> wire.Frame:
        """``auth_pub``: the key a login was proved with, which must still be the account's."""
        token = new_token()
        th = token_hash(token)
        try:
            expires = await self.mailroom.call(
                self.mailroom.store.create_session, th, account_id, device_id, auth_pub
            )
        except CredentialsChanged:  # a password change or a recovery came in between
            raise auth_failed() from None
        except DeviceRevoked:  # meanwhile
            raise Refused(E.DEVICE_REVOKED, REVOKED_HERE) from None
        except UnknownDevice:
            raise Refused(E.UNKNOWN_DEVICE, "the device was removed meanwhile") from None
        self._bind(peer, account_id, device_id, th)
        return wire.SessionOk(id=rid, token=token, device_id=device_id, expires_day=expires)

    async def resume(self, peer: Peer, req: wire.Resume) -> wire.Frame:
        if peer.account_id is not None:
            raise Refused(E.ALREADY_AUTHENTICATED, "this connection already has a session")
        th = token_hash(req.token)
        store = self.mailroom.store
        notices = self._session_notices
        session = await self.mailroom.call(store.session, th)
        if session is None:
            revoked = await self.mailroom.call(store.token_revoked, th)
            peer.failures += 1
            await trio.sleep(min(0.2 * 2 ** (peer.failures - 1), 10.0))
            if revoked:
                raise Refused(E.DEVICE_REVOKED, REVOKED_ELSEWHERE)
            raise auth_failed()
        self._bind(peer, session.account_id, session.device_id, th)
        if self._session_notices != notices and await self.mailroom.call(store.session, th) is None:
            # Another process ended it between the read and the bind (its notice found
            # nothing to close here): read again now that a later notice would find it.
            self.unbind(peer)
            raise auth_failed()
        return wire.ResumeOk(id=req.id, device_id=session.device_id)

    def _bind(self, peer: Peer, account_id: int, device_id: bytes, th: bytes) -> None:
        peer.account_id, peer.device_id, peer.token_hash = account_id, device_id, th
        # Connections of one device, oldest first; beyond the cap the oldest goes (a
        # node that reconnects should not be shut out by its own half-dead connection).
        for bound, cap in ((self._bound.setdefault(device_id, {}), self.max_per_device),
                           (self._by_account.setdefault(account_id, {}), self.max_per_account)):
            bound[peer] = None
            while len(bound) > cap:
                oldest = next(iter(bound))
                self._forget(oldest)
                oldest.close()
        outlet = Outlet(device_id, shared=self.mailroom.store.shared)
        peer.outlet = outlet
        self.router.attach(outlet)
        peer.outlet_scope = trio.CancelScope()
        assert peer.nursery is not None
        peer.nursery.start_soon(self._run_outlet, peer, outlet, peer.outlet_scope)

    async def _run_outlet(self, peer: Peer, outlet: Outlet, scope: trio.CancelScope) -> None:
        with scope:
            outlet.send_now = peer.send_now
            try:
                await outlet.run(self._fetch, peer.send)
            finally:
                outlet.send_now = None
                self.router.detach(outlet)

    async def _fetch(self, device_id: bytes, after: int, limit: int) -> list[Stored]:
        return await self.mailroom.call(self.mailroom.store.fetch, device_id, after, limit)

    def _forget(self, peer: Peer) -> None:
        """Take a connection out of the per-device and per-account tables."""
        _leave(self._bound, peer.device_id, peer)
        _leave(self._by_account, peer.account_id, peer)
        if peer.account_id is not None:
            self.drop_send_budget(peer.account_id)

    def unbind(self, peer: Peer) -> None:
        self._forget(peer)
        if peer.outlet is not None:
            self.router.detach(peer.outlet)
        if peer.outlet_scope is not None:
            peer.outlet_scope.cancel()
        peer.account_id = peer.device_id = peer.token_hash = None
        peer.outlet = None
        peer.outlet_scope = None

    async def logout(self, peer: Peer, req: wire.Logout) -> wire.Frame:
        self._require_session(peer)
        assert peer.token_hash is not None and peer.device_id is not None
        store = self.mailroom.store
        device_id, th = peer.device_id, peer.token_hash
        with self.router.holding(device_id):
            if req.remove_device:
                await self.mailroom.remove_device(device_id)
            else:
                await self.mailroom.call(store.delete_session, th)
            self.unbind(peer)
            # Every other connection bound to what just ended closes now: a stolen token's
            # open connection must not go on receiving this device's mail.
            for other in list(self._bound.get(device_id, {})):
                if req.remove_device or other.token_hash == th:
                    self.unbind(other)
                    other.close()
        return wire.Ok(id=req.id)

    def on_notice(self, kind: str, values: list[bytes]) -> None:
        """What another process of the service announced (relay.pgstore.Listener): new
        mail for devices, or sessions that ended there, whose connections here must go."""
        if kind == "mail":
            self.router.poke(values)
        elif kind == "resync":  # announcements may have been missed: check everything
            self.router.poke(list(self._bound))
            if self._bound:
                assert self._nursery is not None
                self._nursery.start_soon(self._recheck_sessions)
        if kind != "mail":
            self._session_notices += 1
        if kind in ("token", "device", "revoked") and values:
            th = values[0] if kind == "token" else None
            device_id = values[-1]
            for other in list(self._bound.get(device_id, {})):
                if th is None or other.token_hash == th:
                    self.unbind(other)
                    if kind == "revoked":
                        other.end(wire.Error(id=0, code=E.DEVICE_REVOKED, message=REVOKED_ELSEWHERE))
                    else:
                        other.close()
        elif kind == "account" and len(values) == 2:
            self._close_others(int.from_bytes(values[0], "big"), None, keep=values[1])

    async def _recheck_sessions(self) -> None:
        """Close the connections whose session no longer exists (ended elsewhere while
        this process was not listening)."""
        for peers in list(self._bound.values()):
            for peer in list(peers):
                th = peer.token_hash
                if th is not None and await self.mailroom.call(self.mailroom.store.session, th) is None:
                    if peer.token_hash == th:
                        self.unbind(peer)
                        peer.close()

    def _close_others(self, account_id: int, peer: Peer | None, keep: bytes | None = None) -> None:
        """Unbind and close the account's connections but ``peer`` (and those with the
        session ``keep``): their sessions have ended."""
        for other in list(self._by_account.get(account_id, {})):
            if other is not peer and (keep is None or other.token_hash != keep):
                self.unbind(other)
                other.close()

    # ---- account security ------------------------------------------------------------
    def _session(self, peer: Peer) -> tuple[int, bytes, bytes]:
        """(account id, device id, token hash) of the connection's session."""
        if peer.account_id is None or peer.device_id is None or peer.token_hash is None:
            raise not_authenticated()
        return peer.account_id, peer.device_id, peer.token_hash

    async def _session_account(self, peer: Peer) -> tuple[Account, bytes, bytes]:
        account_id, device_id, th = self._session(peer)
        account = await self.mailroom.call(self.mailroom.store.account_by_id, account_id)
        if account is None:  # pragma: no cover (accounts are never deleted)
            raise not_authenticated()
        return account, device_id, th

    @staticmethod
    def _still(peer: Peer, th: bytes) -> None:
        """After an await: the connection still has the session it started with."""
        if peer.token_hash != th:
            raise Refused(E.NOT_AUTHENTICATED, "this session ended meanwhile; log in again")

    async def recover(self, peer: Peer, req: wire.Recover) -> wire.Frame:
        if peer.account_id is not None:
            raise Refused(E.ALREADY_AUTHENTICATED, "this connection already has a session")
        if (req.recovery_auth_pub is None) != (req.recovery_bundle is None):
            raise Refused(E.BAD_FRAME, "recovery_auth_pub and recovery_bundle go together (both or neither)")
        name = _name(req.name)
        account = await self._account(name)
        if account is None or not _granted(peer.recovery_grant, account.id, self.clock(), RECOVERY_GRANT_SECONDS,
                                           _recovery_bound(account)):
            raise Refused(E.NO_RECOVERY, "prove the recovery code first (fetch_bundle with recovery)")
        device = req.device
        if not verify_device(account.identity_pub, name, device.device_id, device.sig):
            raise Refused(E.BAD_KEY, "device signature does not verify")
        _check_prekeys(account.identity_pub, req.prekeys, device.device_id)
        # After the recovery proof; the store counts what the device holds (as at login).
        await self._check_kem_one_time(peer, account.identity_pub, device.device_id, req.prekeys, NO_PREKEYS)
        recovery = None
        if req.recovery_auth_pub is not None and req.recovery_bundle is not None:
            recovery = (req.recovery_auth_pub, req.recovery_bundle)
        creds = Credentials(req.salt, (req.kdf.t, req.kdf.m, req.kdf.p), req.auth_pub, req.bundle, recovery)
        prekeys = None if req.prekeys is None else _stored_prekeys(req.prekeys)
        token = new_token()
        th = token_hash(token)
        try:
            expires = await self.mailroom.call(
                self.mailroom.store.recover, account.id, creds, (device.device_id, device.sig),
                wire.MAX_DEVICES, prekeys, PREKEY_LIMITS, th,
                (account.recovery_auth_pub, account.totp_secret),
            )
        except CredentialsChanged:
            raise Refused(E.NO_RECOVERY, "the recovery code or two-factor setting changed: prove it again") from None
        except DeviceRevoked:
            raise Refused(E.DEVICE_REVOKED, REVOKED_HERE) from None
        except UnknownDevice:
            raise Refused(E.UNKNOWN_DEVICE, "device id belongs to another account") from None
        except TooManyDevices:
            raise Refused(E.TOO_MANY_DEVICES, f"an account has at most {wire.MAX_DEVICES} devices") from None
        except PrekeyLimit:
            raise _prekey_limit() from None
        peer.recovery_grant = None
        await self._throttle(self.throttle.succeed, account.name_mac)
        # Every session of the account ended with the old password: so do their connections.
        self._close_others(account.id, peer)
        self._bind(peer, account.id, device.device_id, th)
        return wire.SessionOk(id=req.id, token=token, device_id=device.device_id, expires_day=expires)

    async def change_password(self, peer: Peer, req: wire.ChangePassword) -> wire.Frame:
        account, _, th = await self._session_account(peer)
        proved = await self._prove(peer, req.name, "passwd", req.challenge, req.signature, req.totp, session=account)
        self._still(peer, th)
        creds = Credentials(req.salt, (req.kdf.t, req.kdf.m, req.kdf.p), req.auth_pub, req.bundle)
        try:
            await self.mailroom.call(self.mailroom.store.change_password, account.id, creds, th, req.end_sessions,
                                     proved.auth_pub)
        except (NoSession, CredentialsChanged):
            raise _changed_meanwhile() from None
        if req.end_sessions:
            self._close_others(account.id, peer, keep=th)
        return wire.Ok(id=req.id)

    async def mfa_enable(self, peer: Peer, req: wire.MfaEnable) -> wire.Frame:
        account, _, th = await self._session_account(peer)
        if account.totp_secret is not None:
            raise Refused(E.MFA_ENABLED, "two-factor authentication is on already")
        # The password alone: the code this carries is for the new secret.
        proved = await self._prove(peer, req.name, "mfa", req.challenge, req.signature, mfa="none", session=account)
        now = self.clock()
        try:
            step = totp_accept(req.secret, req.totp, now, None)
        except BadKey:
            step = None
        if step is None:
            await self._failed(peer, account.name_mac)
        self._still(peer, th)
        try:
            enabled = await self.mailroom.call(self.mailroom.store.enable_totp, account.id, req.secret, step, th,
                                               proved.auth_pub)
        except (NoSession, CredentialsChanged):
            raise _changed_meanwhile() from None
        if not enabled:
            raise Refused(E.MFA_ENABLED, "two-factor authentication is on already")
        peer.mfa_grant = (account.id, now, req.secret)
        return wire.Ok(id=req.id)

    async def mfa_disable(self, peer: Peer, req: wire.MfaDisable) -> wire.Frame:
        account, _, th = await self._session_account(peer)
        if account.totp_secret is None:
            raise Refused(E.MFA_NOT_ENABLED, "two-factor authentication is not on")
        # A fresh code, whatever this connection proved before.
        proved = await self._prove(
            peer, req.name, "mfa", req.challenge, req.signature, req.totp, mfa="code", session=account
        )
        self._still(peer, th)
        secret = proved.totp_secret
        try:
            disabled = secret is not None and await self.mailroom.call(
                self.mailroom.store.disable_totp, account.id, secret, th, proved.auth_pub)
        except (NoSession, CredentialsChanged):
            raise _changed_meanwhile() from None
        if not disabled:
            raise Refused(E.MFA_NOT_ENABLED, "two-factor authentication is not on")
        peer.mfa_grant = None
        return wire.Ok(id=req.id)

    async def revoke_device(self, peer: Peer, req: wire.RevokeDevice) -> wire.Frame:
        account, own, th = await self._session_account(peer)
        store = self.mailroom.store
        # Refusals that need no proof come first: they use up nothing.
        await self._revocation(self.mailroom.call(store.check_revocable, account.id, req.device_id, req.last))
        proved = await self._prove(peer, req.name, "revoke", req.challenge, req.signature, req.totp, session=account)
        self._still(peer, th)
        with self.router.holding(req.device_id):
            await self._revocation(self.mailroom.revoke_device(account.id, req.device_id, req.last, th, proved.auth_pub))
            for other in list(self._bound.get(req.device_id, {})):
                if other is not peer:
                    self.unbind(other)
                    other.end(wire.Error(id=0, code=E.DEVICE_REVOKED, message=REVOKED_ELSEWHERE))
        ok = wire.Ok(id=req.id)
        if own == req.device_id:  # this very device: the answer, then the connection ends
            self.unbind(peer)
            peer.end(ok)
        return ok

    @staticmethod
    async def _revocation(step: Awaitable[None]) -> None:
        try:
            await step
        except DeviceRevoked:
            raise Refused(E.DEVICE_REVOKED, "that device was revoked already") from None
        except UnknownDevice:
            raise Refused(E.UNKNOWN_DEVICE, "no such device in this account") from None
        except LastDevice:
            raise Refused(
                E.LAST_DEVICE,
                "that is the account's only device: revoking it leaves the account with none"
                " (pass last to do it anyway)",
            ) from None
        except (NoSession, CredentialsChanged):
            raise _changed_meanwhile() from None

    # ---- keys and mail ---------------------------------------------------------------
    def _require_session(self, peer: Peer) -> None:
        if peer.account_id is None:
            raise not_authenticated()

    async def _named_account(self, name: str) -> Account:
        """The account a logged-in peer names, or ``unknown_user``. Not rationed: a node
        looks up the sender of every envelope it cannot yet verify, so a ration of
        unknown names per account would let anyone spend someone else's by sending them
        envelopes from made-up names. Account existence is not secret (THREAT_MODEL.md)."""
        account = await self._account(name)
        if account is None:
            raise Refused(E.UNKNOWN_USER, "no such user")
        return account

    async def lookup_keys(self, peer: Peer, req: wire.LookupKeys) -> wire.Frame:
        self._require_session(peer)
        name = _name(req.name)
        account = await self._named_account(name)
        store = self.mailroom.store

        def read() -> tuple[list[tuple[bytes, bytes, int]], list[tuple[bytes, int, bytes, bytes]]]:
            return store.devices(account.id), store.envelope_keys(account.id)

        devices, envelope_keys = await self.mailroom.call(read)  # one trip to the store: on every send
        listed = {d for d, _, _ in devices}
        return wire.KeysOk(
            id=req.id,
            name=name,
            enc_pub=account.enc_pub,
            identity_pub=account.identity_pub,
            dh_pub=account.dh_pub,
            keys_sig=account.keys_sig,
            devices=[wire.DeviceCert(d, sig) for d, sig, _ in devices],
            # Of the devices listed (one added between the two reads is not).
            envelope_keys=[wire.EnvelopeKey(*k) for k in envelope_keys if k[0] in listed],
        )

    async def claim_prekeys(self, peer: Peer, req: wire.ClaimPrekeys) -> wire.Frame:
        self._require_session(peer)
        assert peer.account_id is not None
        account = peer.account_id  # a logout elsewhere may unbind the peer meanwhile
        holder = await self._named_account(_name(req.name))
        # A one-time prekey only while neither this account nor everyone together has
        # taken too many of this device's lately: draining them costs the attacker time.
        # Only the holder's own devices are rationed (ids of others or made up spend
        # nothing); taken before the claim, so concurrent claims cannot all pass, and
        # given back for a device that yields none. One ration covers both one-time keys
        # of a device, its X25519 prekey and its one-time KEM prekey: a device that may
        # not give one gives its last-resort KEM prekey instead.
        devices = await self.mailroom.call(self.mailroom.store.devices, holder.id)
        theirs = {d for d, _, _ in devices}
        one_time: list[bytes] = []
        for device_id in dict.fromkeys(req.device_ids):
            if device_id not in theirs:
                continue
            if (self.prekey_requester_budget.can_take(account, {device_id: 1})
                    and self.prekey_device_budget.available(device_id) >= 1):
                self.prekey_requester_budget.spend(account, device_id, 1)
                self.prekey_device_budget.spend(device_id, 1)
                one_time.append(device_id)
        bundles: list[Bundle] = []
        try:
            bundles = await self.mailroom.call(self.mailroom.store.claim_prekeys, holder.id, req.device_ids, one_time)
        finally:
            # Given back unless the device gave a one-time key of either kind.
            got = {b.device_id for b in bundles if b.took_one_time}
            for device_id in one_time:
                if device_id not in got:
                    self.prekey_requester_budget.give_back(account, device_id, 1)
                    self.prekey_device_budget.give_back(device_id, 1)
        return wire.PrekeyBundles(id=req.id, bundles=[
            wire.DeviceBundle(
                b.device_id, b.spk_id, b.spk, b.spk_sig, b.opk_id, b.opk,
                None if b.kem is None else wire.BundleKem(b.kem.use, b.kem.key_id, b.kem.public, b.kem.sig),
            )
            for b in bundles
        ])

    def admit(self, peer: Peer, req: wire.Send) -> Admitted:
        """Check a send before the relay holds any of it (budgets are taken after this):
        a session, and the sender's ration for each recipient device. One account may
        not flood one device: the frame is refused whole, before any of it is stored,
        and the sender tries that device again later. A repeated envelope is stored once,
        and counts once; a send that fails (a made-up device id, say) gives its share back.
        An account cannot reset its own spent buckets by naming many devices: its table
        fails closed (AccountBuckets)."""
        self._require_session(peer)
        assert peer.account_id is not None
        account = peer.account_id
        wants: dict[bytes, float] = {}
        envelopes = req.envelopes
        if len(envelopes) == 1:
            wants[envelopes[0].device_id] = 1
        else:
            for device_id, _ in {(e.device_id, e.eid): None for e in envelopes}:
                wants[device_id] = wants.get(device_id, 0) + 1
        if wants and not self.sender_budget.can_take(account, wants):
            raise Refused(E.RECIPIENT_LIMITED, "you have sent this device too much lately; try it again later")
        for device_id, n in wants.items():
            self.sender_budget.spend(account, device_id, n)
        return Admitted(self, account, wants)

    def send_budget(self, account: int) -> ByteBudget:
        """Envelope bytes one account may have awaiting their commit, across all its
        connections: one account cannot take the whole relay-wide budget."""
        budget = self._send_budgets.get(account)
        if budget is None:
            budget = self._send_budgets[account] = ByteBudget(ACCOUNT_SEND_BYTES)
        return budget

    def drop_send_budget(self, account: int) -> None:
        budget = self._send_budgets.get(account)
        if budget is not None and budget.used == 0 and account not in self._by_account:
            del self._send_budgets[account]

    def submit(self, peer: Peer, req: wire.Send, admitted: Admitted, answered: Callable[[], None]) -> None:
        """Queue the envelopes for the next group commit; the answer goes out when it
        is durable (``answered`` runs then: the connection's budgets are freed)."""

        items = [(e.device_id, e.eid, e.blob) for e in req.envelopes]
        early = self.router.push_early(items)

        def done(error: Exception | None) -> None:
            self.router.settled(early)
            answered()
            self.drop_send_budget(admitted.account)
            if error is not None:
                # Nothing of it was stored: the ration is given back, but not for the
                # devices that got it before the commit (a send made to fail on purpose
                # must not push for free).
                admitted.refund(keep=early.devices)
            if error is None:
                answer: wire.Frame = wire.Ok(id=req.id)
            elif isinstance(error, UnknownDevice):
                answer = wire.Error(req.id, E.UNKNOWN_DEVICE, "no such device (it may have been removed)")
            elif isinstance(error, MailboxFull):
                answer = wire.Error(req.id, E.MAILBOX_FULL, "the recipient's mailbox is full")
            else:
                answer = wire.Error(req.id, E.INTERNAL, "storage failed; try again")
            peer.reply(answer)

        self.mailroom.submit(items, done)

    async def ack(self, peer: Peer, req: wire.Ack) -> None:
        """Delete acknowledged envelopes: only those pushed to this very connection (and
        not acknowledged yet). Waits while the relay has many acks queued already, which
        holds up this connection's reader, not anyone else."""
        self._require_session(peer)
        assert peer.device_id is not None
        if peer.outlet is None:
            return
        eids = peer.outlet.acknowledged(req.eids)
        if eids:
            await self.mailroom.ack(peer.device_id, eids)

    def ack_nowait(self, peer: Peer, req: wire.Ack) -> bool:
        """``ack`` if it need not wait; False: it would (nothing was done)."""
        self._require_session(peer)
        assert peer.device_id is not None
        if peer.outlet is None:
            return True
        if not self.mailroom.ack_fits():
            return False
        eids = peer.outlet.acknowledged(req.eids)
        if eids:
            self.mailroom.ack_nowait(peer.device_id, eids)
        return True
