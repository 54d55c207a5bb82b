"""A Veil device: account keys, local store, and what it does over a relay link.

The path of one message out: ``send`` looks up the recipient's keys and devices (pinned
on first use), seals one envelope per recipient device and per own other device, stores
the message and the envelopes in the outbox in one transaction, then ``flush_outbox``
hands them to the relay; each envelope leaves the outbox when the relay acknowledges it.

The path in: the relay pushes ``Deliver`` frames; ``accept`` opens each envelope,
verifies the sender's signature against the pinned key, drops anything already seen,
stores the message, and only then acknowledges it so the relay deletes its copy.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import trio

import wire
from cipherdb import WrongKey
from keyvault.auth import auth_public_key, sign_challenge
from keyvault.envelope import (
    Sealed,
    envelope_key_id,
    open_envelope,
    seal,
    seal_hybrid,
    verify_sealed,
)
from keyvault.errors import (
    BadPassword,
    BadPrekey,
    DecryptionFailed,
    DuplicateMessage,
    KeyvaultError,
)
from keyvault.errors import MessageTooLarge as KeyvaultTooLarge
from keyvault.group import Action, Change, GroupState, added_by, decode_change
from keyvault.kdf import DEFAULT_KDF, KdfParams, new_salt, password_keys, store_key
from keyvault.kem import KemKey, KemUse, verify_kem_key
from keyvault.keys import (
    AccountKeys,
    PublicKeys,
    new_recovery_code,
    parse_recovery_code,
    recovery_keys,
    seal_device_label,
    sign_account_keys,
    sign_device,
    unwrap_bundle,
    verify_account_keys,
    verify_device,
    wrap_bundle,
)
from keyvault.letter import (
    KIND_CHANGES,
    MAX_CHANGES,
    Letter,
    decode_letter,
    encode_letter,
    max_body_bytes,
)
from keyvault.prekeys import OneTimePrekey, SignedPrekey, new_one_time_prekeys, new_signed_prekey
from keyvault.safety import identity_fingerprint, safety_number
from node.errors import (
    AlreadySetUp,
    CodeNeeded,
    ConnectionLost,
    DeviceRevoked,
    Downgrade,
    IdentityChanged,
    KeyDiffers,
    LoginFailed,
    MessageTooLarge,
    NameTaken,
    NotSetUp,
    RelayKeyMismatch,
    RelayRefused,
    RelayUnreachable,
    UnknownUser,
    VeilError,
    WrongPassword,
)
from node.groups import Groups, conversation, describe, group_of
from node.home import Home, HomeConfig
from node.link import RelayLink, check_address, open_link, shown_address
from node.sessions import ONE_TIME_STOCK, PQ_SINCE_SPK, Peer, Sessions
from node.store import Contact, NodeStore, OutboxEntry, StoredMessage
from wire.address import parse_address
from wire.invite import ContactLink

log = logging.getLogger("veil.node")
E = wire.ErrorCode
LOGGED_OUT_REMOVED = b"1"  # the relay removed this device: nothing left to resume
LOGGED_OUT_KEPT = b"kept"  # the session ended; the device resumes with the password
RECV_CURSOR = "recv_cursor"  # the seq of the last message `veil recv` handed out
HOLDER = "veil"  # what a home held by the library names (the CLI holds it first, by command)


MAILBOX_FULL_RETRY = 60.0  # seconds before envelopes for a device with a full mailbox are tried again
RECIPIENT_LIMITED_RETRY = 30.0  # ... for a device this account has sent too much lately


def _preview(text: str, width: int = 24) -> str:
    one = " ".join(text.split())
    return repr(one if len(one) <= width else one[: width - 1] + "…")


def _canonical(name: str) -> bool:
    try:
        return wire.normalize_username(name) == name
    except ValueError:
        return False


MAX_AUTHOR_LOOKUPS = 16  # per changes letter received
SEND_FRAME_BYTES = wire.MAX_FRAME - 8192  # envelope bytes in one send, with room for the rest
ENVELOPE_OVERHEAD = 64  # its device id, eid and field names, generously


def _frames(messages: list[list[OutboxEntry]]) -> list[list[OutboxEntry]]:
    """Group envelopes into send frames: whole messages together where they fit (up to
    MAX_BATCH envelopes and SEND_FRAME_BYTES), a message too large for one frame split."""
    frames: list[list[OutboxEntry]] = []
    size = 0
    for entries in messages:
        whole = sum(len(e.blob) + ENVELOPE_OVERHEAD for e in entries)
        if not (frames and len(frames[-1]) + len(entries) <= wire.MAX_BATCH and size + whole <= SEND_FRAME_BYTES):
            frames.append([])
            size = 0
        for e in entries:
            n = len(e.blob) + ENVELOPE_OVERHEAD
            if frames[-1] and (len(frames[-1]) == wire.MAX_BATCH or size + n > SEND_FRAME_BYTES):
                frames.append([])
                size = 0
            frames[-1].append(e)
            size += n
    return frames


def now_ms() -> int:
    return int(time.time() * 1000)


def _plain_allowed(relay: str) -> bool:
    address = parse_address(relay)
    return address.secure or address.plain_allowed


def _refused_as(exc: RelayRefused, *, mfa: bool = False) -> VeilError:
    """The person-facing error for a relay refusal (``mfa``: a code went with the proof)."""
    if exc.code == E.AUTH_FAILED:
        return LoginFailed("login failed: wrong password or code, or unknown user") if mfa else LoginFailed()
    if exc.code == E.DEVICE_REVOKED:
        return DeviceRevoked()
    if exc.code == E.UNKNOWN_USER:
        return UnknownUser()
    if exc.code == E.NAME_TAKEN:
        return NameTaken()
    if exc.code == E.BAD_NAME:
        return VeilError(exc.args[0])
    return exc


@dataclass(frozen=True)
class Received:
    """What ``accept`` reports for one delivered envelope that became a message."""

    message: StoredMessage
    warning: str | None = None


def _first_prekeys(keys: AccountKeys) -> tuple[tuple[SignedPrekey, list[OneTimePrekey]], wire.PrekeySet]:
    """A new device's prekeys, published with its registration so that others can start
    sessions with it at once (kept by ``_create_home``)."""
    spk = new_signed_prekey(keys, 1, int(time.time()))
    opks = new_one_time_prekeys(2, ONE_TIME_STOCK)
    public = wire.PrekeySet(
        signed=wire.SignedPrekeyPub(spk.key_id, spk.public, spk.signature),
        one_time=[wire.OneTimePrekeyPub(k.key_id, k.public) for k in opks],
    )
    return (spk, opks), public


async def _password_proof(
    link: RelayLink, name: str, purpose: str, auth_seed: bytes
) -> tuple[bytes, bytes]:
    ch = await link.request(wire.Challenge, name=name, purpose=purpose)
    return ch.challenge, sign_challenge(auth_seed, purpose, ch.relay_id, name, ch.challenge)


async def _name_device(link: RelayLink, keys: AccountKeys, name: str, device_id: bytes) -> None:
    """Give a new device its first name (the host's), encrypted for the account."""
    label = seal_device_label(keys, name, device_id, default_device_name())
    try:
        await link.request(wire.RenameDevice, device_id=device_id, label=label)
    except RelayRefused as exc:  # a name is a convenience: never a reason to fail
        log.info("the relay did not take this device's name (%s)", exc.code)


AskCode = Callable[[], str]  # asks the person for a code from their authenticator app


def checked_code(code: str) -> str:
    """A TOTP code as typed (spaces allowed), or a one-line error."""
    digits = "".join(code.split())
    if len(digits) != 6 or not digits.isascii() or not digits.isdigit():
        raise VeilError("a code from the authenticator app is 6 digits")
    return digits


def ask_code(ask: AskCode | None) -> str:
    if ask is None:
        raise CodeNeeded()
    return checked_code(ask())


async def account_params(link: RelayLink, name: str, floor: KdfParams) -> tuple[wire.AuthParamsOk, KdfParams]:
    """The account's salt, KDF parameters and MFA flag, refusing parameters below ``floor``."""
    params = await link.request(wire.AuthParams, name=name)
    kdf = KdfParams(params.kdf.t, params.kdf.m, params.kdf.p)
    if kdf.time_cost < floor.time_cost or kdf.memory_kib < floor.memory_kib:
        raise VeilError("the relay asks for weaker password hashing than this device accepts")
    return params, kdf


def default_device_name() -> str:
    """What a new device is called until renamed: the host's name."""
    import socket

    name = " ".join(socket.gethostname().split())[:48]
    return name or "a device"


CHANGES_PER_LETTER_BYTES = 40_000  # of encoded changes in one letter (an envelope holds 57,518)


@dataclass
class _GroupSealing:
    """The letters of a group message for each device (inside the sealing transaction):
    the group's changes first if the device has not had them all from us (or the message
    is a resync), then the text (unless the message is a change or a resync: a device that
    has had this version from us has the change, so a hundred changes made offline go out
    once, not a hundred times)."""

    store: NodeStore
    gid: bytes
    m: StoredMessage
    state: GroupState

    def __post_init__(self) -> None:
        self.version = self.state.version
        # Only the valid changes, parents first, in letters that each fit an envelope:
        # a receiver takes them in order, and what a non-member made is not passed on.
        by_hash = self.store.group_changes(self.gid)
        self.chunks: list[tuple[bytes, ...]] = []
        chunk: list[bytes] = []
        size = 0
        for h in self.state.order:
            blob = by_hash[h]
            if chunk and (size + len(blob) + 4 > CHANGES_PER_LETTER_BYTES or len(chunk) == MAX_CHANGES):
                self.chunks.append(tuple(chunk))
                chunk, size = [], 0
            chunk.append(blob)
            size += len(blob) + 4
        if chunk:
            self.chunks.append(tuple(chunk))
        self._added_in: dict[str, int] | None = None  # `_addition_chunk`
        self.notice = self.store.group_notice(self.m.msg_id) is not None
        # A resync (a notice that is not one of our changes) passes the changes on to
        # every device, whatever it had from us: it is sent because some may lack some.
        self.resync = self.notice and not self.store.is_group_event(self.m.msg_id)

    def letters(self, peer: Peer) -> list[bytes]:
        m, out = self.m, []
        sent = self.store.group_sent(self.gid, peer.name, peer.device_id)
        if self.resync or sent < self.version:  # (a change: a device with this version has it)
            # Each letter is parents-first. To a device we sent the group before, oldest
            # first: it holds the group, and takes each letter whole (a device keeps only
            # MAX_PENDING changes waiting for parents). To one that may not hold it yet,
            # first the letter with its account's latest addition (which may be the
            # creation), then all of them oldest first: one that does not hold the group
            # keeps them as they come from the first letter on (node/groups.py, merge: a
            # group that names it waits), and one that holds part of it (a member
            # removed and added again) takes them parents first, that letter again too.
            chunks = self.chunks
            if not sent:
                first = self._addition_chunk(peer.name)
                if first:
                    chunks = [chunks[first], *chunks]
            out += [encode_letter(Letter(to=peer.name, msg_id=secrets.token_bytes(16), sent_at=m.sent_at,
                                         body="", group=self.gid, kind=KIND_CHANGES, changes=chunk))
                    for chunk in chunks]
        if not self.notice:
            out.append(encode_letter(Letter(to=peer.name, msg_id=m.msg_id, sent_at=m.sent_at, body=m.body,
                                            group=self.gid)))
        return out

    def _addition_chunk(self, name: str) -> int:
        """The letter (of `chunks`) with the latest effective addition of ``name``."""
        if self._added_in is None:
            self._added_in = {}
            by_hash = self.store.group_changes(self.gid)
            at = 0
            for k, chunk in enumerate(self.chunks):
                for h in self.state.order[at:at + len(chunk)]:
                    if h in self.state.effective:
                        for who in added_by(decode_change(by_hash[h])):
                            self._added_in[who] = k
                at += len(chunk)
        return self._added_in.get(name, 0)

    def sealed(self, peer: Peer) -> None:
        """Every letter for ``peer`` went into the outbox."""
        self.store.set_group_sent(self.gid, peer.name, peer.device_id, self.version)


class Node:
    """One unlocked device."""

    def __init__(self, home: Home, config: HomeConfig, store: NodeStore, keys: AccountKeys) -> None:
        self.home = home
        self.config = config
        self.store = store
        self.keys = keys
        self.name = config.username
        self.device_id = bytes.fromhex(config.device_id)
        self.relay = shown_address(config.relay)  # to show (no client key); config.relay to connect
        self.socks = config.socks  # None: connect directly (refused for a .onion relay)
        self.insecure = config.insecure  # plain ws:// off loopback was asked for
        self.tor_control = config.tor_control  # a private onion relay's key goes to this tor
        self.events: list[Callable[[str], None]] = []  # listeners for warnings
        self.sent_listeners: list[Callable[[bytes], None]] = []  # a message is now held by the relay
        # A message was stored: called at once, before the relay is told, so a link that
        # dies before the acknowledgement cannot hide a stored message from the user.
        self.received_listeners: list[Callable[[Received], None]] = []
        self.sessions = Sessions(store, keys, self.name, self.device_id)
        self.groups = Groups(store, keys, self.name)
        # The master password this device was opened with, to prove it again when the
        # session must be renewed, and where to ask for a code (MFA) or a newer password
        # (changed on another device). Set by whoever opened the device.
        self.password: str | None = None
        self.ask_code: AskCode | None = None
        self.ask_password: Callable[[str], str] | None = None

    def close(self) -> None:
        self.store.close()
        self.home.release()

    # ---- creating and opening a device ------------------------------------------------
    @classmethod
    def _create_home(
        cls, home: Home, name: str, relay: str, password: str, kdf: KdfParams, keys: AccountKeys,
        device_id: bytes, auth_seed: bytes, token: bytes, socks: str | None,
        prekeys: tuple[SignedPrekey, list[OneTimePrekey]], insecure: bool = False,
        tor_control: str | None = None,
    ) -> Node:
        """Set up the home of a device that has just got its first session (in a worker
        thread); a home left half-made by a failure is removed."""
        try:
            store_salt = new_salt()
            config = HomeConfig(
                username=name, relay=relay, device_id=device_id.hex(), store_salt=store_salt.hex(),
                kdf=kdf.to_dict(), socks=socks, tor_control=tor_control,
                # Remembered only where it is needed: a later change of the address (a new
                # pin written into device.json) must not quietly allow plain ws://.
                insecure=insecure and not _plain_allowed(relay),
            )
            home.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            store = NodeStore(home.store_path, store_key(password, store_salt, kdf))
            with store.transaction():
                store.put("account_keys", keys.to_bytes())
                store.put("auth_seed", auth_seed)
                store.put("token", token)
                spk, opks = prekeys
                store.add_signed_prekey(spk.key_id, spk.to_bytes(), spk.created_at)
                store.add_one_time_prekeys([(k.key_id, k.to_bytes()) for k in opks])
                last_id = max([spk.key_id, *(k.key_id for k in opks)])
                store.put("next_prekey_id", (last_id + 1).to_bytes(8, "big"))
                store.put(RECV_CURSOR, (0).to_bytes(8, "big"))
            home.save(config)
            node = cls(home, config, store, keys)
        except BaseException:
            home.discard()
            raise
        node.password = password
        return node

    @staticmethod
    async def name_free(
        relay: str, name: str, *, socks: str | None = None, insecure: bool = False, tor_control: str | None = None,
    ) -> bool:
        """Whether no account has ``name`` at the relay now (a check before registering)."""
        try:
            name = wire.normalize_username(name)
        except ValueError as exc:
            raise VeilError(str(exc)) from None
        async with open_link(relay, socks, insecure=insecure, tor_control=tor_control) as link:
            try:
                ans = await link.request(wire.NameFree, name=name)
            except RelayRefused as exc:
                raise _refused_as(exc) from None
        return bool(ans.free)

    @classmethod
    async def register(
        cls, home: Home, name: str, password: str, relay: str, *, kdf: KdfParams = DEFAULT_KDF,
        keys: AccountKeys | None = None, socks: str | None = None, insecure: bool = False,
        tor_control: str | None = None,
    ) -> tuple[Node, str]:
        """Create an account and this, its first device. Returns the node and the
        recovery code (shown once)."""
        took = not home.held  # a caller that held the home first keeps it on failure
        home.hold(HOLDER)
        try:
            return await cls._register(home, name, password, relay, kdf=kdf, keys=keys, socks=socks,
                                       insecure=insecure, tor_control=tor_control)
        except BaseException:
            if took:
                home.release()
            raise

    @classmethod
    async def _register(
        cls, home: Home, name: str, password: str, relay: str, *, kdf: KdfParams,
        keys: AccountKeys | None, socks: str | None, insecure: bool, tor_control: str | None,
    ) -> tuple[Node, str]:
        if home.exists():
            raise AlreadySetUp()
        try:
            name = wire.normalize_username(name)
        except ValueError as exc:
            raise VeilError(str(exc)) from None
        if keys is None:
            keys = await trio.to_thread.run_sync(AccountKeys.generate)
        salt = new_salt()
        pk = await trio.to_thread.run_sync(password_keys, password, salt, kdf)
        code = new_recovery_code()
        rk = recovery_keys(parse_recovery_code(code))
        device_id = secrets.token_bytes(16)
        pub = keys.public()
        prekeys, prekeys_pub = _first_prekeys(keys)
        node: Node | None = None
        try:
            async with open_link(relay, socks, insecure=insecure, tor_control=tor_control) as link:
                try:
                    session = await link.request(
                        wire.Register,
                        name=name,
                        salt=salt,
                        kdf=wire.Kdf(kdf.time_cost, kdf.memory_kib, kdf.parallelism),
                        auth_pub=auth_public_key(pk.auth_seed),
                        enc_pub=pub.enc,
                        identity_pub=pub.identity,
                        dh_pub=pub.dh,
                        keys_sig=sign_account_keys(keys, name),
                        bundle=wrap_bundle(keys, pk.wrap_key, name),
                        recovery_auth_pub=auth_public_key(rk.auth_seed),
                        recovery_bundle=wrap_bundle(keys, rk.wrap_key, name),
                        device=wire.DeviceCert(device_id, sign_device(keys, name, device_id)),
                        prekeys=prekeys_pub,
                    )
                    await _name_device(link, keys, name, device_id)
                except RelayRefused as exc:
                    raise _refused_as(exc) from None
                node = await trio.to_thread.run_sync(
                    cls._create_home, home, name, relay, password, kdf, keys, device_id, pk.auth_seed,
                    session.token, socks, prekeys, insecure, tor_control,
                )
                await node._first_publish(link)
        except (ConnectionLost, RelayUnreachable):
            if node is None:
                raise
            # The link fell after the home was made: the device is set up all the same.
        assert node is not None
        return node, code

    @classmethod
    async def login(
        cls, home: Home, name: str, password: str, relay: str, *, socks: str | None = None, insecure: bool = False,
        min_kdf: KdfParams = DEFAULT_KDF, code: AskCode | None = None, tor_control: str | None = None,
    ) -> Node:
        """A new device for an existing account, with the master password alone.

        KDF parameters weaker than ``min_kdf`` are refused: a relay must not be able to
        make a device derive its keys cheaply (and so make the password cheap to guess
        from what the device then sends)."""
        took = not home.held  # a caller that held the home first keeps it on failure
        home.hold(HOLDER)
        try:
            return await cls._login(home, name, password, relay, socks=socks, min_kdf=min_kdf, code=code,
                                    insecure=insecure, tor_control=tor_control)
        except BaseException:
            if took:
                home.release()
            raise

    @classmethod
    async def _login(
        cls, home: Home, name: str, password: str, relay: str, *, socks: str | None, min_kdf: KdfParams,
        insecure: bool,
        code: AskCode | None, tor_control: str | None,
    ) -> Node:
        if home.exists():
            raise AlreadySetUp()
        try:
            name = wire.normalize_username(name)
        except ValueError:
            raise LoginFailed() from None
        mfa = False
        node: Node | None = None
        try:
            async with open_link(relay, socks, insecure=insecure, tor_control=tor_control) as link:
                try:
                    params, kdf = await account_params(link, name, min_kdf)
                    mfa = params.mfa
                    totp = ask_code(code) if mfa else None
                    pk = await trio.to_thread.run_sync(password_keys, password, params.salt, kdf)
                    challenge, sig = await _password_proof(link, name, "bundle", pk.auth_seed)
                    # The code proves itself once: the login that follows on this connection
                    # is covered by it (the relay accepts no code twice).
                    bundle = await link.request(
                        wire.FetchBundle, name=name, challenge=challenge, signature=sig, totp=totp
                    )
                    try:
                        keys = await trio.to_thread.run_sync(unwrap_bundle, bundle.bundle, pk.wrap_key, name)
                    except BadPassword:
                        raise LoginFailed() from None
                    device_id = secrets.token_bytes(16)
                    prekeys, prekeys_pub = _first_prekeys(keys)
                    challenge, sig = await _password_proof(link, name, "login", pk.auth_seed)
                    session = await link.request(
                        wire.Login, name=name, challenge=challenge, signature=sig,
                        device=wire.DeviceCert(device_id, sign_device(keys, name, device_id)),
                        prekeys=prekeys_pub,
                    )
                    await _name_device(link, keys, name, device_id)
                except RelayRefused as exc:
                    raise _refused_as(exc, mfa=mfa) from None
                node = await trio.to_thread.run_sync(
                    cls._create_home, home, name, relay, password, kdf, keys, device_id, pk.auth_seed,
                    session.token, socks, prekeys, insecure, tor_control,
                )
                await node._first_publish(link)
        except (ConnectionLost, RelayUnreachable):
            if node is None:
                raise
            # The link fell after the home was made: the device is set up all the same.
        assert node is not None
        return node

    @classmethod
    def unlock(cls, home: Home, password: str) -> Node:
        """Open this device's store with the master password (holding the home for this
        process: HomeInUse if another has it)."""
        if not home.exists():
            raise NotSetUp()
        took = not home.held  # a caller that held the home first keeps it on failure
        home.hold(HOLDER)
        try:
            return cls._unlock(home, password)
        except BaseException:
            if took:
                home.release()
            raise

    @classmethod
    def _unlock(cls, home: Home, password: str) -> Node:
        config = home.load()
        key = store_key(password, bytes.fromhex(config.store_salt), config.kdf_params)
        try:
            store = NodeStore(home.store_path, key)
        except WrongKey:
            # A re-key (password change) that stopped midway: the store opens with the new salt.
            if not config.store_salt_next:
                raise WrongPassword() from None
            try:
                store = NodeStore(
                    home.store_path, store_key(password, bytes.fromhex(config.store_salt_next), config.kdf_params)
                )
            except WrongKey:
                raise WrongPassword() from None
            config.store_salt, config.store_salt_next = config.store_salt_next, None
            home.save(config)
        blob = store.get("account_keys")
        if blob is None:
            store.close()
            raise NotSetUp("this device's store is incomplete; set it up again in a new --home")
        node = cls(home, config, store, AccountKeys.from_bytes(blob))
        if store.get(RECV_CURSOR) is None:
            # A home from before the cursor: what it holds was shown already.
            with store.transaction():
                store.put(RECV_CURSOR, store.last_seq().to_bytes(8, "big"))
        # Kept to prove the password again if the session must be renewed (logged out
        # with the device kept: the stored credentials went with the logout).
        node.password = password
        return node

    # ---- the connection --------------------------------------------------------------
    @asynccontextmanager
    async def connected(self) -> AsyncIterator[RelayLink]:
        """A link with this device's session (resumed, or renewed with the stored auth
        key), the outbox already flushed."""
        async with open_link(self.config.relay, self.socks, insecure=self.insecure, tor_control=self.tor_control) as link:
            await self.authenticate(link)
            await self.refresh_prekeys(link)
            for msg_id, exc in await self.seal_pending(link):
                self._warn(self.not_sent(msg_id, exc))
            try:
                await self.flush_outbox(link)
            except RelayRefused as exc:
                # What stays in the outbox must never keep this device from receiving.
                self._warn(f"the outbox could not be sent now ({exc}); it is tried again later")
            yield link

    async def move_relay(self, new: str, *, insecure: bool = False) -> str:
        """Reach this device's relay at another address from now on (its new pin after it
        got a new key, or a new name): the relay there must take this device's session (or
        its proof of the password) first; saved only then. Returns the address shown."""
        address = check_address(new, insecure=insecure)
        old = parse_address(self.config.relay)
        if address.client_key is None and old.client_key is not None and address.host == old.host:
            address = replace(address, client_key=old.client_key)  # the same private onion relay
        async with open_link(str(address), self.socks, insecure=insecure, tor_control=self.tor_control) as link:
            # Not the moment to ask for a newer password: a relay that refuses this device's
            # proof is most likely not its relay.
            ask, self.ask_password = self.ask_password, None
            try:
                await self.authenticate(link)
            except LoginFailed as exc:
                if isinstance(exc, DeviceRevoked):
                    raise
                raise LoginFailed(
                    f"the relay at {address.url} does not know this device or its account: is it this"
                    " device's relay?"
                ) from None
            finally:
                self.ask_password = ask
        self.config.relay = str(address)
        self.config.insecure = insecure and not _plain_allowed(self.config.relay)
        self.insecure = self.config.insecure
        self.home.save(self.config)
        self.relay = shown_address(self.config.relay)
        return self.relay

    async def authenticate(self, link: RelayLink) -> None:
        state = self.store.get("logged_out")
        if state and state != LOGGED_OUT_KEPT:
            raise LoginFailed(
                "this device was logged out and removed from its account: run `veil logout` to"
                " clear it, then `veil login NAME --relay URL`"
            )
        token = self.store.get("token")
        if state != LOGGED_OUT_KEPT and token:
            try:
                await link.request(wire.Resume, token=token)
                link.device_id = self.device_id
                return
            except RelayRefused as exc:
                if exc.code == E.DEVICE_REVOKED:
                    raise DeviceRevoked() from None
                if exc.code != E.AUTH_FAILED:
                    raise
        # No session (expired, or logged out with the device kept): a new one.
        await self._log_in(link, fresh=state == LOGGED_OUT_KEPT)
        link.device_id = self.device_id

    async def maintain_prekeys(self, link: RelayLink, *, now: int | None = None) -> None:
        """Refill one-time prekeys below the threshold; rotate the signed prekey weekly.
        (``now``, in seconds, lets a test move the clock.)"""
        status = await link.request(wire.PrekeyStatus)
        now = int(time.time()) if now is None else now
        if status.kem_one_time_left is None and self.store.get(PQ_SINCE_SPK) is not None:
            # It took this device's KEM keys before: an older relay now, or one that hides them.
            self._warn("the relay no longer takes post-quantum keys: new sessions with this device may be classical")
        due = self.sessions.prekeys_due(status, now)
        if due:
            # Made and kept before they are published: a first message to one of them may
            # come before the answer does. On this thread, as every use of the store: a
            # full stock of KEM prekeys takes about 10 ms (50 key pairs and signatures).
            with self.store.transaction():
                fresh = self.sessions.new_prekeys(due, now=now)
            await link.request(wire.UploadPrekeys, prekeys=fresh)

    async def refresh_prekeys(self, link: RelayLink) -> None:
        """maintain_prekeys on a connection that is for something else: a relay that
        refuses the prekeys (full, or one that does not know a field) is a warning, and
        the connection goes on (first messages to this device use what the relay holds,
        or its last-resort keys, until a later connection publishes them)."""
        try:
            await self.maintain_prekeys(link)
        except RelayRefused as exc:
            self._warn(f"the relay did not take this device's new prekeys ({exc}); they are offered again later")

    async def _first_publish(self, link: RelayLink) -> None:
        """Right after a device got its first session, on that link: its post-quantum
        keys (they are not in the register or login frame), so that the first bundles
        others claim already have them. Failing here fails nothing: the next connection
        publishes them."""
        try:
            await self.maintain_prekeys(link)
        except (RelayRefused, ConnectionLost, RelayUnreachable) as exc:
            log.info("prekeys not published yet: %s", type(exc).__name__)

    async def _log_in(self, link: RelayLink, *, fresh: bool) -> None:
        """Open a new session for this device, keeping its id: with the stored auth seed
        or (logged out with the device kept: ``fresh``) the password it was opened with,
        and a code if the account has MFA. If the relay refuses that, the password was
        probably changed on another device: the new one is asked for (``ask_password``),
        and this device's store is re-keyed to it."""
        params, kdf = await account_params(link, self.name, self.config.kdf_params)
        totp = ask_code(self.ask_code) if params.mfa else None
        seed = None if fresh else self.store.get("auth_seed") or None
        if seed is None:
            if self.password is None:
                raise LoginFailed("this device is logged out: unlock it with the master password to log in again")
            seed = (await trio.to_thread.run_sync(password_keys, self.password, params.salt, kdf)).auth_seed
        new_password: str | None = None
        try:
            session = await self._login_with(link, seed, totp)
        except RelayRefused as exc:
            if exc.code != E.AUTH_FAILED:
                raise _refused_as(exc) from None
            if self.ask_password is None:
                raise LoginFailed(
                    "the relay no longer accepts this device's credentials"
                    + (" (or the code was wrong)" if params.mfa else "")
                    + ": if the master password was changed on another device, run a veil command"
                    " at a terminal to enter the new one"
                ) from None
            new_password = self.ask_password(
                "the relay no longer accepts this device's password (was it changed on another"
                " device?); the current master password: "
            )
            pk = await trio.to_thread.run_sync(password_keys, new_password, params.salt, kdf)
            seed = pk.auth_seed
            try:
                # The code was not used up if the password was what failed.
                session = await self._login_with(link, seed, totp)
                # Before this device's store is re-keyed to it: the password must open
                # the account's key bundle (a relay that accepted anything cannot make
                # the store depend on a typo). The code above covers this proof too.
                challenge, sig = await _password_proof(link, self.name, "bundle", seed)
                got = await link.request(wire.FetchBundle, name=self.name, challenge=challenge, signature=sig)
            except RelayRefused as again:
                raise _refused_as(again, mfa=params.mfa) from None
            try:
                opened = await trio.to_thread.run_sync(unwrap_bundle, got.bundle, pk.wrap_key, self.name)
            except BadPassword:
                raise LoginFailed("that password does not open this account's keys at the relay") from None
            if opened.public() != self.keys.public():
                raise LoginFailed("the relay holds other keys for this account than this device has") from None
        with self.store.transaction():
            self.store.put("token", session.token)
            self.store.put("auth_seed", seed)
            self.store.delete("logged_out")
        if new_password is not None:
            await trio.to_thread.run_sync(self.rekey, new_password)

    async def _login_with(self, link: RelayLink, seed: bytes, totp: str | None) -> wire.SessionOk:
        challenge, sig = await _password_proof(link, self.name, "login", seed)
        return await link.request(  # type: ignore[no-any-return]
            wire.Login, name=self.name, challenge=challenge, signature=sig, totp=totp,
            device=wire.DeviceCert(self.device_id, sign_device(self.keys, self.name, self.device_id)),
        )

    def rekey(self, password: str) -> None:
        """Encrypt this device's store under ``password`` from now on (a new store salt).
        The new salt is written down first, so a crash midway leaves a home that opens
        with one of the two."""
        config = self.config
        salt = new_salt()
        config.store_salt_next = salt.hex()
        self.home.save(config)
        self.store.rekey(store_key(password, salt, config.kdf_params))
        config.store_salt, config.store_salt_next = salt.hex(), None
        self.home.save(config)
        self.password = password

    # ---- keys of others ----------------------------------------------------------------
    async def lookup(self, link: RelayLink, name: str) -> tuple[Contact, str | None]:
        """Fetch an account's keys and devices; pin on first use, flag a change.

        Returns the contact and a warning line if its identity key changed."""
        name, ans, devices = await self._fetch_keys(link, name)
        warning = None
        with self.store.transaction():
            pinned = self.store.contact(name)
            if pinned is None:
                self.store.pin(name, ans.enc_pub, ans.identity_pub, ans.dh_pub)
            elif pinned.identity_pub != ans.identity_pub or pinned.enc_pub != ans.enc_pub:
                self.store.replace_keys(name, ans.enc_pub, ans.identity_pub, ans.dh_pub)
                if pinned.identity_pub != ans.identity_pub:
                    self.store.forget_post_quantum(name)
                warning = f"{name}'s identity key has changed: check it with `veil verify {name}`"
            self.store.set_devices(name, devices)
            self.store.forget_sessions(name, devices)
            self.store.put_envelope_keys(name, self._envelope_keys(ans, devices))
        contact = self.store.contact(name)
        assert contact is not None
        if warning:
            self._warn(warning)
        return contact, warning

    async def add_from_link(
        self, invite: ContactLink, link: RelayLink | None = None, *, replace: bool = False,
    ) -> tuple[Contact, bool]:
        """Add (or re-pin) the contact an invite link names, verified: the keys the relay
        hands out must match the link's fingerprint, or nothing is stored. Returns the
        contact and whether it was new. A link for another relay is refused, and so is one
        whose key differs from the one pinned here, unless ``replace`` (the person chose
        the link over the earlier key). (``link``: an open connection to use.)"""
        if not invite.relay.same_relay(parse_address(self.relay)):
            raise VeilError(
                f"that link is for {invite.name} on another relay ({invite.relay.url}); this account is on"
                f" {parse_address(self.relay).url}, and Veil does not reach across relays yet"
            )
        if invite.name == self.name:
            raise VeilError("that is this account's own link: give it to someone else")
        if link is not None:
            name, ans, devices = await self._fetch_keys(link, invite.name)
        else:
            async with self.connected() as fresh:
                name, ans, devices = await self._fetch_keys(fresh, invite.name)
        if not hmac.compare_digest(identity_fingerprint(ans.identity_pub), invite.fingerprint):
            raise VeilError(
                f"the relay's keys for {name} do not match the link's: {name} was not added (the link may"
                f" be mistyped or old, or the relay is handing out other keys: check with {name})"
            )
        with self.store.transaction():
            pinned = self.store.contact(name)
            if pinned is None:
                self.store.pin(name, ans.enc_pub, ans.identity_pub, ans.dh_pub)
            elif pinned.key_changed or pinned.identity_pub != ans.identity_pub or pinned.enc_pub != ans.enc_pub:
                # (A change seen at an earlier lookup and not accepted counts too: the key
                # pinned first, or verified, is not the link's.)
                if not replace:
                    state = "verified" if pinned.verified else "pinned"
                    raise KeyDiffers(
                        f"{name}'s key in the link (which the relay has now) is not the one {state} on this"
                        f" device: nothing changed; check with {name}, and if the link is right, add it again"
                        " replacing the old key"
                    )
                self.store.replace_keys(name, ans.enc_pub, ans.identity_pub, ans.dh_pub)
                if pinned.identity_pub != ans.identity_pub:
                    self.store.forget_post_quantum(name)
            self.store.set_verified(name, True)  # the link vouches for the key (and clears a change)
            self.store.set_devices(name, devices)
            self.store.forget_sessions(name, devices)
            self.store.put_envelope_keys(name, self._envelope_keys(ans, devices))
        contact = self.store.contact(name)
        assert contact is not None
        return contact, pinned is None

    async def _fetch_keys(self, link: RelayLink, name: str) -> tuple[str, wire.KeysOk, list[bytes]]:
        """An account's keys, checked against its identity key, and its devices whose
        certificates verify (nothing stored; see `_envelope_keys`)."""
        try:
            name = wire.normalize_username(name)
            ans = await link.request(wire.LookupKeys, name=name)
        except ValueError:
            raise UnknownUser() from None
        except RelayRefused as exc:
            raise _refused_as(exc) from None
        if ans.name != name:
            # The keys are signed for the name they belong to: a relay answering with
            # another account's keys would otherwise pass every signature check.
            raise VeilError(f"the relay answered a lookup of {name} with another account's keys")
        PublicKeys(enc=ans.enc_pub, identity=ans.identity_pub, dh=ans.dh_pub).validate()
        if not verify_account_keys(ans.identity_pub, name, ans.enc_pub, ans.dh_pub, ans.keys_sig):
            raise VeilError(f"the relay served keys for {name} that {name}'s identity key does not vouch for")
        devices = [d.device_id for d in ans.devices if verify_device(ans.identity_pub, name, d.device_id, d.sig)]
        return name, ans, devices

    @staticmethod
    def _envelope_keys(ans: wire.KeysOk, devices: list[bytes]) -> list[tuple[bytes, int, bytes]]:
        """The envelope keys of a lookup that the account's identity key signed, for its
        listed devices (device id, key id, ML-KEM public)."""
        listed = set(devices)
        return [
            (e.device_id, e.key_id, e.public) for e in ans.envelope_keys
            if e.device_id in listed
            and verify_kem_key(ans.identity_pub, KemUse.ENVELOPE, e.key_id, e.public, e.sig, device_id=e.device_id)
        ]

    def _warn(self, text: str) -> None:
        for listener in self.events:
            listener(text)

    # ---- sending -----------------------------------------------------------------------
    def _held(self, peer: str) -> IdentityChanged:
        return IdentityChanged(
            f"{peer}'s identity key changed since you verified it; sending is held"
            f" (check with `veil verify {peer}`, accept with `veil trust {peer}`)"
        )

    def recipient(self, peer: str) -> str:
        """The canonical name to send to; UnknownUser for a name that cannot exist, and
        IdentityChanged for a verified contact whose key changed (sending is held)."""
        try:
            peer = wire.normalize_username(peer)
        except ValueError:
            raise UnknownUser() from None
        contact = self.store.contact(peer)
        if contact is not None and contact.verified and contact.key_changed:
            raise self._held(peer)
        return peer

    def compose(self, peer: str, text: str) -> StoredMessage:
        """Store a message to send (state "pending"). No network: it is sealed and sent by
        ``seal_pending`` and ``flush_outbox`` once a link is up."""
        try:
            peer = wire.normalize_username(peer)
        except ValueError:
            raise UnknownUser() from None
        if not text:
            raise VeilError("empty message")
        if len(text.encode()) > max_body_bytes():
            raise MessageTooLarge(f"message too large (at most {max_body_bytes()} bytes)")
        sent_at = now_ms()
        with self.store.transaction():
            msg = self.store.add_message(
                StoredMessage(secrets.token_bytes(16), peer, self.name, True, text, sent_at, sent_at, "pending", 0)
            )
            self.store.add_unsealed(msg.msg_id)
        return msg

    async def send(self, link: RelayLink, peer: str, text: str) -> StoredMessage:
        """Send now: check the recipient, compose, seal for every device of ``peer`` and
        every other device of ours, and hand the envelopes to the relay."""
        try:
            peer = wire.normalize_username(peer)
        except ValueError:
            raise UnknownUser() from None
        if peer != self.name:
            contact, _ = await self.lookup(link, peer)  # an unknown name is an error, not a queued message
            if contact.verified and contact.key_changed:
                raise self._held(peer)
        msg = self.compose(peer, text)
        problems = await self.seal_pending(link)
        for msg_id, exc in problems:
            if msg_id == msg.msg_id:
                raise exc
        await self.flush_outbox(link)
        return self.store.message(msg.msg_id) or msg

    async def send_or_queue(self, peer: str, text: str) -> tuple[StoredMessage, str | None]:
        """Send now if the relay can be reached and takes it. If not (unreachable, the link
        drops on the way, a recipient's mailbox is full, the relay fails to store), the
        message stays in the outbox, state "pending", and goes out on a later connection;
        the second value then says why. Errors that waiting cannot cure (no such user, a
        held contact, a refused login) are raised as ``send`` raises them, and then nothing
        is stored. A ``peer`` of "#NAME" is a group, by its name on this device."""
        composed: StoredMessage | None = None
        group = peer.startswith("#")
        if group:
            self.groups.find(peer)  # an unknown group is an error, not a queued message
        else:
            peer = self.recipient(peer)
        reason: str | None = None
        deferred: str | None = None
        try:
            async with self.connected() as link:
                if peer != self.name and not group:
                    contact, _ = await self.lookup(link, peer)
                    if contact.verified and contact.key_changed:
                        raise self._held(peer)
                composed = self.compose_group(peer, text) if group else self.compose(peer, text)
                for msg_id, exc in await self.seal_pending(link):
                    if msg_id == composed.msg_id:
                        raise exc
                try:
                    await self.flush_outbox(link)
                except RelayRefused as exc:
                    reason = f"the relay did not take it now ({exc})"
                deferred = next((w for e in self.store.outbox() if e.msg_id == composed.msg_id
                                 if (w := link.why_deferred(e.device_id))), None)
        except (RelayUnreachable, ConnectionLost) as exc:
            reason = (str(exc).rstrip(".") if isinstance(exc, RelayKeyMismatch)
                      else f"the relay at {self.relay} cannot be reached now")
            if composed is None:
                composed = self.compose_group(peer, text) if group else self.compose(peer, text)
        assert composed is not None
        now = self.store.message(composed.msg_id) or composed
        if now.state == "pending" and reason is None:
            reason = deferred or "the relay did not take it for every device now"
        return now, reason if now.state == "pending" else None

    def not_sent(self, msg_id: bytes, exc: VeilError) -> str:
        """The warning for a message ``seal_pending`` could not seal: which one, and why."""
        m = self.store.message(msg_id)
        what = f"the message to {m.peer} ({_preview(m.body)})" if m is not None else "a message"
        state = "is held" if isinstance(exc, IdentityChanged) else "was not sent"
        return f"{what} {state}: {str(exc).rstrip('.')}"

    async def seal_pending(self, link: RelayLink) -> list[tuple[bytes, VeilError]]:
        """Seal composed messages for the recipients' current devices, into the outbox.

        Returns the messages that could not be sealed, with why: held (a verified
        contact's key changed; they stay queued) or failed (no such user)."""
        problems: list[tuple[bytes, VeilError]] = []
        own: list[bytes] | None = None
        contacts: dict[str, Contact] = {}  # looked up once per peer per call
        for gid, also in self.store.group_resyncs():
            # The group's changes to every member, in a message of its own (no text, no
            # line in the history): they cross one of ours, or undo an addition (see
            # _accept_group; those it undoes hear of it too).
            now = now_ms()
            sync = StoredMessage(secrets.token_bytes(16), conversation(gid), self.name, True, "", now, now, "pending", 0)
            with self.store.transaction():
                self.store.add_group_notice(sync.msg_id, also)
            try:
                if own is None:
                    own = await self.own_devices(link)
                targets, bundles = await self._prepare(link, sync, own, contacts)
                with self.store.transaction():
                    self._seal(sync, targets, bundles)
                    self.store.drop_group_resync(gid)
            except (ConnectionLost, RelayUnreachable, RelayRefused):
                raise  # the link: the group stays due for the next one
            except (VeilError, KeyvaultError) as exc:
                log.info("group changes not passed on: %s", type(exc).__name__)
                with self.store.transaction():
                    self.store.drop_group_resync(gid)
        for msg_id in self.store.unsealed():
            m = self.store.message(msg_id)
            if m is None:
                continue
            try:
                if own is None:
                    own = await self.own_devices(link)
                targets, bundles = await self._prepare(link, m, own, contacts)
                sealed = self._seal(m, targets, bundles)
            except IdentityChanged as exc:
                problems.append((msg_id, exc))
                continue
            except (ConnectionLost, RelayUnreachable, RelayRefused):
                raise  # the link: try again on the next one
            except (VeilError, KeyvaultError) as exc:
                # No such user, too large, keys the identity key does not vouch for:
                # retrying cannot help, so the message fails (and says why).
                with self.store.transaction():
                    self.store.remove_unsealed(msg_id)
                    self.store.set_state(msg_id, "failed")
                problems.append((msg_id, exc if isinstance(exc, VeilError) else VeilError(str(exc))))
                continue
            if not sealed:  # a note to self on a one-device account: nothing to hand over
                for fn in self.sent_listeners:
                    fn(msg_id)
        return problems

    async def _prepare(
        self, link: RelayLink, m: StoredMessage, own: list[bytes], contacts: dict[str, Contact]
    ) -> tuple[list[tuple[Peer, bytes]], dict[tuple[str, bytes], wire.DeviceBundle]]:
        """Everything sealing needs from the relay: the devices to seal for (with their
        account's RSA key), and prekey bundles for devices we have no session with."""
        me = self.keys.public()
        targets: list[tuple[Peer, bytes]] = []
        gid = group_of(m.peer)
        if gid is not None:
            for name in self._group_recipients(gid, m):
                if name not in contacts:
                    try:
                        contacts[name], _ = await self.lookup(link, name)
                    except UnknownUser:
                        self._warn(f"skipped {name} in {self.groups.label(gid)}: no such user on this relay")
                        continue
                contact = contacts[name]
                if contact.verified and contact.key_changed:
                    self._warn(f"skipped {name} in {self.groups.label(gid)}: {self._held(name)}")
                    continue
                targets += [
                    (Peer(contact.name, d, contact.identity_pub, contact.dh_pub,
                          self.store.envelope_key(contact.name, d)), contact.enc_pub)
                    for d in contact.devices
                ]
        elif m.peer != self.name:
            if m.peer not in contacts:
                contacts[m.peer], _ = await self.lookup(link, m.peer)
            contact = contacts[m.peer]
            if contact.verified and contact.key_changed:
                raise self._held(m.peer)
            targets += [
                (Peer(contact.name, d, contact.identity_pub, contact.dh_pub,
                      self.store.envelope_key(contact.name, d)), contact.enc_pub)
                for d in contact.devices
            ]
        targets += [
            (Peer(self.name, d, me.identity, me.dh, self.store.envelope_key(self.name, d)), me.enc)
            for d in own if d != self.device_id
        ]
        missing: dict[str, list[bytes]] = {}
        for peer, _ in targets:
            if not self.sessions.has_session(peer.name, peer.device_id):
                missing.setdefault(peer.name, []).append(peer.device_id)
        bundles: dict[tuple[str, bytes], wire.DeviceBundle] = {}
        for name, devices in missing.items():
            ans = await link.request(wire.ClaimPrekeys, name=name, device_ids=devices)
            bundles.update({(name, b.device_id): b for b in ans.bundles})
        return targets, bundles

    def _seal(
        self, m: StoredMessage, targets: list[tuple[Peer, bytes]],
        bundles: dict[tuple[str, bytes], wire.DeviceBundle],
    ) -> int:
        """Encrypt the message in each device's ratchet session, seal each for its device,
        and store the new session states with the envelopes in one transaction (no await
        inside: nothing else touches the sessions meanwhile). Returns the envelope count."""
        gid = group_of(m.peer)
        one = encode_letter(Letter(to=m.peer, msg_id=m.msg_id, sent_at=m.sent_at, body=m.body)) if gid is None else b""
        entries: list[OutboxEntry] = []
        try:
            with self.store.transaction():
                group = None if gid is None else self._group_sealing(gid, m)
                for peer, enc in targets:
                    bundle = bundles.get((peer.name, peer.device_id))
                    if bundle is None and not self.sessions.has_session(peer.name, peer.device_id):
                        self._warn(f"a device of {peer.name} has no prekeys yet and cannot receive this")
                        continue
                    letters = [one] if group is None else group.letters(peer)
                    for letter in letters:
                        try:
                            payload = self.sessions.encrypt(peer, letter, bundle)
                        except BadPrekey:
                            self._warn(f"skipped a device of {peer.name}: its prekey signature does not verify")
                            break
                        except Downgrade as exc:
                            self._warn(f"skipped a device of {peer.name}: {exc}")
                            break
                        sealed = Sealed(self.name, self.device_id, payload)
                        if peer.envelope_key is None:
                            blob = seal(sealed, self.keys, enc, peer.device_id)
                        else:  # version 3: the sender stays hidden from a quantum computer too
                            key_id, public = peer.envelope_key
                            blob = seal_hybrid(sealed, self.keys, enc, peer.device_id, public, key_id)
                        entries.append(OutboxEntry(secrets.token_bytes(16), m.msg_id, peer.device_id, blob))
                    else:
                        if group is not None:
                            group.sealed(peer)
                peer_devices = {p.device_id for p, _ in targets if p.name == m.peer}
                if gid is None and m.peer != self.name and not any(e.device_id in peer_devices for e in entries):
                    raise VeilError(f"no device of {m.peer} can receive messages yet")
                self.store.add_outbox(entries)
                self.store.remove_unsealed(m.msg_id)
                if not entries:
                    self.store.set_state(m.msg_id, "sent")
        except KeyvaultTooLarge:
            raise MessageTooLarge() from None
        return len(entries)

    def _group_recipients(self, gid: bytes, m: StoredMessage) -> list[str]:
        """Who a message in a group goes to (besides this account's other devices): its
        members; for a change of ours, also those it removes (so they learn of it)."""
        state = self.groups.state(gid)
        also = self.store.group_notice(m.msg_id)
        if also is None and self.name not in state.members:
            raise VeilError(f"you are no longer a member of {self.groups.label(gid)!r}")
        return sorted((state.members | set(also or ())) - {self.name})

    def _group_sealing(self, gid: bytes, m: StoredMessage) -> _GroupSealing:
        return _GroupSealing(self.store, gid, m, self.groups.state(gid))

    async def own_devices(self, link: RelayLink) -> list[bytes]:
        """This account's devices, as the relay lists them (signatures checked)."""
        ans = await link.request(wire.LookupKeys, name=self.name)
        me = self.keys.public()
        if ans.name != self.name:
            raise VeilError("the relay answered a lookup of this account with another account's keys")
        devices = [d.device_id for d in ans.devices if verify_device(me.identity, self.name, d.device_id, d.sig)]
        if ans.identity_pub != me.identity:
            raise VeilError("the relay answered a lookup of this account with another identity key")
        with self.store.transaction():
            self.store.forget_sessions(self.name, devices)
            self.store.put_envelope_keys(self.name, self._envelope_keys(ans, devices))
        return devices

    async def flush_outbox(self, link: RelayLink) -> int:
        """Hand every unacknowledged envelope to the relay. Whole messages share a frame
        (up to MAX_BATCH envelopes), so a backlog goes out in few round trips. Returns
        how many messages the relay now holds."""
        by_msg: dict[bytes, list[OutboxEntry]] = {}
        for e in self.store.outbox():
            by_msg.setdefault(e.msg_id, []).append(e)
        frames = _frames(list(by_msg.values()))
        left = {msg_id: len(entries) for msg_id, entries in by_msg.items()}
        done = 0
        for chunk in frames:
            chunk = [e for e in chunk if not link.deferred(e.device_id)]
            if not chunk:
                continue
            try:
                await link.request(
                    wire.Send, envelopes=[wire.Envelope(e.device_id, e.eid, e.blob) for e in chunk]
                )
                gone = chunk
            except RelayRefused as exc:
                if exc.code not in (E.UNKNOWN_DEVICE, E.MAILBOX_FULL, E.RECIPIENT_LIMITED):
                    raise
                # The relay refuses the whole frame for one device that was removed since
                # the message was sealed, whose mailbox is full, or that this account has
                # sent too much lately: send one by one, so that one recipient cannot
                # hold up the others.
                gone = await self._send_singly(link, chunk)
            finished: list[bytes] = []
            for e in gone:
                left[e.msg_id] -= 1
                if left[e.msg_id] == 0:
                    finished.append(e.msg_id)
            with self.store.transaction():
                self.store.remove_outbox([e.eid for e in gone])
                for msg_id in finished:
                    self.store.set_state(msg_id, "sent")
            done += len(finished)
            for msg_id in finished:
                for fn in self.sent_listeners:
                    fn(msg_id)
        return done

    async def _send_singly(self, link: RelayLink, entries: list[OutboxEntry]) -> list[OutboxEntry]:
        """Send envelopes one by one; returns those that are done: stored, or for a device
        that no longer exists (it gets nothing more). One for a full mailbox, or for a
        device the relay says this account has sent too much lately, stays in the outbox,
        and that device is left alone for a while (``RelayLink.defer``)."""
        gone: list[OutboxEntry] = []
        for e in entries:
            if link.deferred(e.device_id):
                continue
            try:
                await link.request(wire.Send, envelopes=[wire.Envelope(e.device_id, e.eid, e.blob)])
            except RelayRefused as exc:
                if exc.code in (E.MAILBOX_FULL, E.RECIPIENT_LIMITED):
                    m = self.store.message(e.msg_id)
                    who = m.peer if m is not None else "someone"
                    contact = self.store.contact(who) if m is not None else None
                    ours = who == self.name or (contact is not None and e.device_id not in contact.devices)
                    whose = "another device of yours" if ours else f"a device of {who}"  # our own copy
                    if exc.code == E.MAILBOX_FULL:
                        why = f"{whose} has a full mailbox at the relay"
                        link.defer(e.device_id, MAILBOX_FULL_RETRY, why)
                    else:
                        why = (f"{whose} takes no more from you for now (the relay limits"
                               " how much one account sends one device)")
                        link.defer(e.device_id, RECIPIENT_LIMITED_RETRY, why)
                    self._warn(f"{why}: the message to {who} waits in the outbox and is tried again later")
                    continue
                if exc.code != E.UNKNOWN_DEVICE:
                    raise
            gone.append(e)
        return gone

    # ---- receiving -------------------------------------------------------------------
    async def accept(self, link: RelayLink, frame: wire.Deliver) -> list[Received]:
        """Open, check and store delivered envelopes, then acknowledge them."""
        received: list[Received] = []
        done: list[bytes] = []
        for item in frame.items:
            try:
                got = await self._accept_one(link, item.blob)
            except DecryptionFailed:
                log.warning("dropped an envelope that failed to open or verify")
                got = None
            except (ConnectionLost, RelayUnreachable, RelayRefused):
                raise  # not acknowledged: it comes again on the next link
            except (KeyvaultError, VeilError) as exc:
                # Beyond the ratchet's skip limits, or the relay served keys the sender's
                # identity does not vouch for: it will not open later either. Dropping it
                # (and saying so) beats a redelivery loop.
                self._warn(f"dropped a message that cannot be opened: {exc}")
                got = None
            if got is not None:
                received.append(got)
            done.append(item.eid)
        if done:
            link.ack_soon(done)
        return received

    async def _accept_one(self, link: RelayLink, blob: bytes, *, looked_up: bool = False) -> Received | None:
        """Open one envelope: the outer layer (RSA) names the sender, whose identity key
        must have signed it; the inner layer is a ratchet message in the session with the
        sender's device. Returns None for a duplicate; DecryptionFailed for anything bad."""
        unverified = open_envelope(blob, self.keys, self.device_id, self._envelope_key_for(blob))
        sender = unverified.sealed.sender
        if not _canonical(sender):
            # "mallory\r" would pass as mallory's (the lookup canonicalises) and print as
            # someone else: a name on the wire is in its one canonical form, or refused.
            raise DecryptionFailed()
        warning = None
        if sender == self.name:
            me = self.keys.public()
            sealed = verify_sealed(unverified, me.identity)
            sender_dh = me.dh
        else:
            contact = self.store.contact(sender)
            try:
                if contact is None:
                    raise DecryptionFailed()
                sealed = verify_sealed(unverified, contact.identity_pub)
            except DecryptionFailed:
                # Unknown sender, or a key we have not seen yet: ask the relay.
                try:
                    contact, warning = await self.lookup(link, sender)
                except UnknownUser:
                    raise DecryptionFailed() from None
                sealed = verify_sealed(unverified, contact.identity_pub)
            sender_dh = contact.dh_pub
        # From here on nothing awaits: the session state read is the one committed.
        try:
            plain, commit = self.sessions.decrypt(sender, sealed.sender_device, sealed.payload, sender_dh)
        except DuplicateMessage:
            log.info("dropped a replayed message")
            return None
        letter = decode_letter(plain)
        if not _canonical(letter.to):
            raise DecryptionFailed()
        if sender != self.name and letter.to != self.name:
            raise DecryptionFailed()  # written for someone else: not ours to show
        if letter.group is not None:
            unknown = self._unknown_authors(letter)
            if unknown and not looked_up:
                # The changes' authors' identity keys are needed to check them: look them
                # up, then open the envelope again (nothing was committed; a session that
                # moved on meanwhile is read afresh).
                for name in unknown:
                    try:
                        await self.lookup(link, name)
                    except UnknownUser:
                        pass
                return await self._accept_one(link, blob, looked_up=True)
            return self._accept_group(sender, letter, commit)
        peer = letter.to if sender == self.name else sender
        with self.store.transaction():
            if self.store.has_message(letter.msg_id):
                # An old message replayed (perhaps rebuilding a session from its X3DH
                # data): keep the sessions as they are.
                log.info("dropped a message already received")
                return None
            commit()  # the ratchet moves on with the message stored, or not at all
            msg = self.store.add_message(
                StoredMessage(letter.msg_id, peer, sender, sender == self.name, letter.body,
                              letter.sent_at, now_ms(), "received", 0)
            )
        received = Received(msg, warning)
        for fn in self.received_listeners:
            fn(received)
        return received

    def _unknown_authors(self, letter: Letter) -> list[str]:
        """Authors of a changes letter's changes whose identity keys this device lacks, to
        look up: only for a group this device holds, or one whose creation or an addition
        names this account, and at most MAX_AUTHOR_LOOKUPS of them (a stranger's letter of a
        thousand made-up authors costs no thousand lookups)."""
        names = set()
        gid = letter.group or b""
        ours = self.store.group_label(gid) is not None or bool(self.store.group_limbo(gid))
        for raw in letter.changes:
            try:
                c = decode_change(raw)
            except DecryptionFailed:
                continue
            if c.group_id != letter.group:
                continue
            if c.action in (Action.CREATE, Action.ADD) and self.name in c.subjects:
                ours = True
            names.add(c.author)
        if not ours:
            return []
        unknown = sorted(n for n in names if n != self.name and _canonical(n) and self.store.contact(n) is None)
        return unknown[:MAX_AUTHOR_LOOKUPS]

    def _identity_of(self, name: str) -> bytes | None:
        if name == self.name:
            return self.keys.public().identity
        contact = self.store.contact(name)
        return None if contact is None else contact.identity_pub

    def _accept_group(self, sender: str, letter: Letter, commit: Callable[[], None]) -> Received | None:
        """Store a letter in a group (its session's state moves on with it): a text from
        a member, or changes (each one that becomes valid is a line in the group's
        history). A text from someone who is not a member is dropped, with a warning."""
        gid = letter.group
        assert gid is not None
        stored: list[StoredMessage] = []
        with self.store.transaction():
            if letter.kind != KIND_CHANGES and self.store.has_message(letter.msg_id):
                log.info("dropped a message already received")
                return None
            commit()
            if letter.kind == KIND_CHANGES:
                state, became, undone = self.groups.merge(gid, letter.changes, self._identity_of, sender)
                if state is None:
                    log.info("dropped the changes of a group this account is not in")
                    return None
                if became and len(state.heads) > 1 and self.name in state.members:
                    held = self.store.group_changes(gid)
                    if any(decode_change(held[h]).author == self.name for h in state.heads if h in held):
                        self.store.add_group_resync(gid)  # ours crossed theirs: pass both on
                def line(c: Change, key: bytes, body: str) -> None:
                    # A line in the group's history, once per key (our own change, or
                    # one heard of already, has its line).
                    if self.store.has_group_event(key):
                        return
                    mid = secrets.token_bytes(16)
                    stored.append(self.store.add_message(StoredMessage(
                        mid, conversation(gid), c.author, c.author == self.name, body, c.sent_at, now_ms(),
                        "received", 0)))
                    self.store.add_group_event(mid, key)

                for c in became:
                    line(c, c.hash, describe(c))
                out = sorted({who for c in undone if c.action == Action.ADD for who in c.subjects}
                             - state.members - {self.name})
                if out and self.name in state.members:
                    self.store.add_group_resync(gid, out)  # they were told they are in: tell them not
                for c in undone:  # it was a line in the history: say that it does not stand
                    line(c, hashlib.sha256(b"undone" + c.hash).digest(),
                         f"{describe(c)}: does not stand (a removal crossed it)")
            else:
                label = self.store.group_label(gid)
                if label is None or sender not in self.groups.state(gid).members:
                    where = f"group {label!r}" if label else "a group this device does not know"
                    self._warn(f"dropped a message in {where} from {sender}, who is not a member")
                    return None
                stored.append(self.store.add_message(StoredMessage(
                    letter.msg_id, conversation(gid), sender, sender == self.name, letter.body, letter.sent_at,
                    now_ms(), "received", 0)))
        received = None
        for msg in stored:
            received = Received(msg, None)
            for fn in self.received_listeners:
                fn(received)
        return received

    # ---- groups ------------------------------------------------------------------------
    def group_create(self, name: str, members: Sequence[str]) -> str:
        """Create a group with ``members`` (besides this account); its changes go to them
        with the next connection. Returns the group's name on this device."""
        names = self._usernames(members)
        with self.store.transaction():
            gid, change = self.groups.create(name, names)
            self._notice(gid, change, ())
        return self.groups.label(gid)

    def group_change(self, label: str, action: Action, subjects: Sequence[str] = (), name: str = "") -> Change:
        """Add or remove members, leave (remove ourselves) or rename; the change goes to
        every member (and those it removes) with the next connection."""
        gid = self.groups.find(label)
        names = self._usernames(subjects)
        with self.store.transaction():
            change = self.groups.change(gid, action, names, name)
            self._notice(gid, change, names if action == Action.REMOVE else ())
        return change

    def _usernames(self, names: Sequence[str]) -> list[str]:
        out = []
        for n in names:
            try:
                out.append(wire.normalize_username(n))
            except ValueError as exc:
                raise VeilError(f"{n!r}: {exc}") from None
        return out

    def _notice(self, gid: bytes, change: Change, also: tuple[str, ...] | list[str]) -> None:
        mid = secrets.token_bytes(16)
        now = now_ms()
        self.store.add_message(StoredMessage(mid, conversation(gid), self.name, True, describe(change), now, now,
                                             "pending", 0))
        self.store.add_group_event(mid, change.hash)
        self.store.add_group_notice(mid, list(also))
        self.store.add_unsealed(mid)

    def compose_group(self, label: str, text: str) -> StoredMessage:
        """Store a message to a group's members (state "pending"); it goes out as ``compose``'s."""
        gid = self.groups.find(label)
        if self.name not in self.groups.state(gid).members:
            raise VeilError(f"you are no longer a member of {label!r}")
        if not text:
            raise VeilError("empty message")
        if len(text.encode()) > max_body_bytes():
            raise MessageTooLarge(f"message too large (at most {max_body_bytes()} bytes)")
        sent_at = now_ms()
        with self.store.transaction():
            msg = self.store.add_message(StoredMessage(
                secrets.token_bytes(16), conversation(gid), self.name, True, text, sent_at, sent_at, "pending", 0))
            self.store.add_unsealed(msg.msg_id)
        return msg

    def _envelope_key_for(self, blob: bytes) -> KemKey | None:
        """This device's envelope key that a version 3 envelope names, if it has it."""
        key_id = envelope_key_id(blob)
        raw = None if key_id is None else self.store.kem_key(KemUse.ENVELOPE, key_id)
        return None if raw is None else KemKey.from_bytes(raw)

    def open_only(self, blob: bytes) -> tuple[str, bytes]:
        """Try to open an envelope with this device's current keys and sessions without
        changing anything: (sender, plaintext body) or DecryptionFailed/DuplicateMessage.
        For checking forward secrecy against a copy of a device's state."""
        unverified = open_envelope(blob, self.keys, self.device_id, self._envelope_key_for(blob))
        s = unverified.sealed
        contact = self.store.contact(s.sender)
        dh = self.keys.public().dh if s.sender == self.name else (contact.dh_pub if contact else b"")
        plain, _ = self.sessions.decrypt(s.sender, s.sender_device, s.payload, dh)
        return s.sender, plain

    async def receive(self, link: RelayLink, *, wait: float = 0.0) -> list[Received]:
        """Everything waiting at the relay; with ``wait``, wait up to that many seconds
        for at least one message when nothing is waiting."""
        got: list[Received] = []
        deadline = trio.current_time() + wait
        synced = False
        while True:
            timeout = trio.current_time() + 60 if not synced else deadline
            with trio.move_on_at(timeout):
                try:
                    frame = await link.deliveries.receive()
                except trio.EndOfChannel:
                    raise ConnectionLost("the relay closed the connection") from None
                got += await self.accept(link, frame)
                synced = synced or frame.synced
                if frame.synced and (got or trio.current_time() >= deadline):
                    return got
                continue
            return got

    # ---- what `veil recv` prints ----------------------------------------------------------
    def unprinted(self, limit: int = 500) -> list[StoredMessage]:
        """Received messages no `veil recv` has handed out yet, oldest first, whichever
        process of this device received them (recv itself, `veil chat`, `veil daemon`)."""
        blob = self.store.get(RECV_CURSOR)
        return self.store.received_after(int.from_bytes(blob or b"", "big"), limit)

    def mark_printed(self, seq: int) -> None:
        """Everything up to ``seq`` has been handed out."""
        with self.store.transaction():
            current = int.from_bytes(self.store.get(RECV_CURSOR) or b"", "big")
            if seq > current:
                self.store.put(RECV_CURSOR, seq.to_bytes(8, "big"))

    # ---- contacts and devices ------------------------------------------------------------
    def safety_number(self, contact: Contact) -> str:
        return safety_number(self.name, self.keys.public().identity, contact.name, contact.identity_pub)

    async def devices(self, link: RelayLink) -> list[wire.DeviceInfo]:
        ans = await link.request(wire.ListDevices)
        return list(ans.devices)

    async def logout(self, link: RelayLink, *, remove_device: bool = True) -> None:
        """End this device's session. With ``remove_device`` the device also leaves the
        account (the caller then wipes the home); without it the device stays, and its
        next connection logs in again with the master password. Either way the stored
        credentials go, so the device cannot quietly log itself back in."""
        await link.request(wire.Logout, remove_device=remove_device)
        with self.store.transaction():
            self.store.put("token", b"")
            self.store.put("auth_seed", b"")
            self.store.put("logged_out", LOGGED_OUT_REMOVED if remove_device else LOGGED_OUT_KEPT)

    @property
    def removed(self) -> bool:
        """This device was logged out and removed from its account (its home can go)."""
        return self.store.get("logged_out") == LOGGED_OUT_REMOVED
