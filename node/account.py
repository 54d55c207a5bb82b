"""Keeping an account safe, from one of its devices: a second factor (TOTP), a new
password, recovery with the recovery code, and the account's devices.

Every step that changes how the account is reached proves the master password afresh
(a signed challenge for its own purpose, PROTOCOL.md section 4.4) and, with MFA, a
current code; the relay makes each change in one transaction. The password never
leaves the device: what the relay gets is a new salt, a new auth public key and the key
bundle wrapped under the new password.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import trio

import wire
from keyvault import totp
from keyvault.auth import auth_public_key, sign_challenge
from keyvault.errors import BadPassword
from keyvault.kdf import DEFAULT_KDF, KdfParams, new_salt, password_keys
from keyvault.keys import (
    new_recovery_code,
    open_device_label,
    parse_recovery_code,
    recovery_keys,
    seal_device_label,
    sign_device,
    unwrap_bundle,
    verify_device,
    wrap_bundle,
)
from node.errors import AlreadySetUp, LoginFailed, RelayRefused, VeilError, WrongPassword
from node.home import Home
from node.link import RelayLink, open_link
from node.node import (
    HOLDER,
    AskCode,
    Node,
    _first_prekeys,
    _name_device,
    _password_proof,
    _refused_as,
    account_params,
    ask_code,
    checked_code,
)

E = wire.ErrorCode


def _kdf(k: KdfParams) -> wire.Kdf:
    return wire.Kdf(k.time_cost, k.memory_kib, k.parallelism)


async def _proof(node: Node, link: RelayLink, purpose: str, *, code: bool = True) -> tuple[bytes, bytes, str | None, bool]:
    """A fresh proof of the password this device was opened with: (challenge, signature,
    code or None, whether the account has MFA). A wrong password is caught here, before
    the relay counts it: it must derive the auth key this device holds."""
    if node.password is None:
        raise WrongPassword("unlock this device with the master password first")
    params, kdf = await account_params(link, node.name, node.config.kdf_params)
    # The code before the challenge: a challenge lives 60 s, and typing takes a while.
    totp_code = ask_code(node.ask_code) if code and params.mfa else None
    pk = await trio.to_thread.run_sync(password_keys, node.password, params.salt, kdf)
    stored = node.store.get("auth_seed")
    if stored and stored != pk.auth_seed:
        raise LoginFailed(
            "this device's password is not the account's any more (changed on another device?):"
            " the device asks for the new one when it next logs in"
        )
    challenge, sig = await _password_proof(link, node.name, purpose, pk.auth_seed)
    return challenge, sig, totp_code, params.mfa


def _refused(exc: RelayRefused, mfa: bool) -> VeilError:
    if exc.code == E.AUTH_FAILED:
        return LoginFailed("the relay refused: wrong code" if mfa else "the relay refused the password")
    return _refused_as(exc)


# ---- two-factor authentication -----------------------------------------------------------


async def mfa_on(node: Node, link: RelayLink) -> bool:
    """Whether the account has two-factor authentication on (as the relay says)."""
    params = await link.request(wire.AuthParams, name=node.name)
    return bool(params.mfa)


def new_mfa_secret() -> bytes:
    return totp.new_secret()


def mfa_uri(node: Node, secret: bytes) -> str:
    return totp.otpauth_uri(secret, node.name)


def check_first_code(secret: bytes, code: str, now: float) -> str:
    """The code typed at enrolment, checked here first: a typo is caught before the relay
    counts a failure."""
    code = checked_code(code)
    if totp.accept(secret, code, now, None) is None:
        raise VeilError("that code does not match: check the authenticator app's clock and the code, then try again")
    return code


async def enable_mfa(node: Node, link: RelayLink, secret: bytes, code: str) -> None:
    """Turn MFA on; ``code`` is a current code of ``secret`` (from the person's app)."""
    try:
        challenge, sig, _, mfa = await _proof(node, link, "mfa", code=False)
        if mfa:
            raise VeilError("two-factor authentication is on already (`veil mfa disable` turns it off)")
        await link.request(wire.MfaEnable, name=node.name, challenge=challenge, signature=sig,
                           secret=secret, totp=checked_code(code))
    except RelayRefused as exc:
        if exc.code == E.MFA_ENABLED:
            raise VeilError("two-factor authentication is on already (`veil mfa disable` turns it off)") from None
        raise _refused(exc, True) from None


async def disable_mfa(node: Node, link: RelayLink) -> None:
    try:
        challenge, sig, code, mfa = await _proof(node, link, "mfa")
        if not mfa or code is None:
            raise VeilError("two-factor authentication is not on")
        await link.request(wire.MfaDisable, name=node.name, challenge=challenge, signature=sig, totp=code)
    except RelayRefused as exc:
        if exc.code == E.MFA_NOT_ENABLED:
            raise VeilError("two-factor authentication is not on") from None
        raise _refused(exc, True) from None


# ---- a new password ------------------------------------------------------------------------


async def change_password(node: Node, link: RelayLink, new_password: str, *, end_sessions: bool) -> None:
    """Replace the master password: the relay swaps salt, auth key and wrapped bundle in
    one step (the old password works nowhere after it), then this device's store is
    re-keyed to the new password. Other devices keep their sessions unless
    ``end_sessions``; each asks for the new password when it next has to log in."""
    kdf = node.config.kdf_params
    salt = new_salt()
    pk = await trio.to_thread.run_sync(password_keys, new_password, salt, kdf)
    mfa = False
    try:
        challenge, sig, code, mfa = await _proof(node, link, "passwd")
        await link.request(
            wire.ChangePassword, name=node.name, challenge=challenge, signature=sig, totp=code,
            salt=salt, kdf=_kdf(kdf), auth_pub=auth_public_key(pk.auth_seed),
            bundle=wrap_bundle(node.keys, pk.wrap_key, node.name), end_sessions=end_sessions,
        )
    except RelayRefused as exc:
        raise _refused(exc, mfa) from None
    with node.store.transaction():
        node.store.put("auth_seed", pk.auth_seed)
    await trio.to_thread.run_sync(node.rekey, new_password)


# ---- recovery ------------------------------------------------------------------------------


async def recover(
    home: Home, name: str, recovery_code: str, new_password: str, relay: str, *,
    kdf: KdfParams = DEFAULT_KDF, min_kdf: KdfParams = DEFAULT_KDF, socks: str | None = None,
    insecure: bool = False,
    new_code: bool = True, code: AskCode | None = None, tor_control: str | None = None,
) -> tuple[Node, str | None]:
    """Regain an account with its recovery code: prove the code, unwrap the recovery copy
    of the key bundle, and in one step at the relay set a new password (and, with
    ``new_code``, a new recovery code, returned) and end every session of the account.
    This home becomes a new device of the account. If it held one of this account's
    devices, that device is revoked in the same connection: its store opens only with
    the lost password, and its ratchet sessions are gone with it, so it could never
    read again what others seal for it."""
    took = not home.held
    home.hold(HOLDER)
    try:
        return await _recover(home, name, recovery_code, new_password, relay, kdf=kdf, min_kdf=min_kdf,
                              socks=socks, new_code=new_code, code=code, insecure=insecure,
                              tor_control=tor_control)
    except BaseException:
        if took:
            home.release()
        raise


async def _recover(
    home: Home, name: str, recovery_code: str, new_password: str, relay: str, *,
    kdf: KdfParams, min_kdf: KdfParams, socks: str | None, new_code: bool, code: AskCode | None,
    insecure: bool,
    tor_control: str | None,
) -> tuple[Node, str | None]:
    try:
        name = wire.normalize_username(name)
    except ValueError as exc:
        raise VeilError(str(exc)) from None
    old_device: bytes | None = None
    if home.exists():
        config = home.load()
        if config.username != name or config.relay != relay:
            raise AlreadySetUp(f"{home.path} holds another account's device; recover into another --home")
        old_device = bytes.fromhex(config.device_id)
    rk = recovery_keys(parse_recovery_code(recovery_code))
    salt = new_salt()
    pk = await trio.to_thread.run_sync(password_keys, new_password, salt, kdf)
    fresh_code = new_recovery_code() if new_code else None
    mfa = False
    async with open_link(relay, socks, insecure=insecure, tor_control=tor_control) as link:
        try:
            params, _ = await account_params(link, name, min_kdf)
            mfa = params.mfa
            totp_code = ask_code(code) if mfa else None
            ch = await link.request(wire.Challenge, name=name, purpose="recovery")
            sig = sign_challenge(rk.auth_seed, "recovery", ch.relay_id, name, ch.challenge)
            got = await link.request(wire.FetchBundle, name=name, challenge=ch.challenge, signature=sig,
                                     totp=totp_code, recovery=True)
        except RelayRefused as exc:
            if exc.code == E.AUTH_FAILED:
                raise LoginFailed(
                    "recovery failed: wrong recovery code" + (" or authenticator code" if mfa else "")
                    + ", or unknown user"
                ) from None
            raise _refused_as(exc) from None
        try:
            keys = await trio.to_thread.run_sync(unwrap_bundle, got.bundle, rk.wrap_key, name)
        except BadPassword:
            raise LoginFailed("the relay's recovery copy does not open with this recovery code") from None
        device_id = secrets.token_bytes(16)
        prekeys, prekeys_pub = _first_prekeys(keys)
        fresh = None if fresh_code is None else recovery_keys(parse_recovery_code(fresh_code))
        try:
            session = await link.request(
                wire.Recover, name=name, salt=salt, kdf=_kdf(kdf), auth_pub=auth_public_key(pk.auth_seed),
                bundle=wrap_bundle(keys, pk.wrap_key, name),
                device=wire.DeviceCert(device_id, sign_device(keys, name, device_id)),
                recovery_auth_pub=None if fresh is None else auth_public_key(fresh.auth_seed),
                recovery_bundle=None if fresh is None else wrap_bundle(keys, fresh.wrap_key, name),
                prekeys=prekeys_pub,
            )
            await _name_device(link, keys, name, device_id)
            if old_device is not None:
                # The code accepted above covers this proof too (the same connection).
                ch = await link.request(wire.Challenge, name=name, purpose="revoke")
                sig = sign_challenge(pk.auth_seed, "revoke", ch.relay_id, name, ch.challenge)
                try:
                    await link.request(wire.RevokeDevice, name=name, challenge=ch.challenge, signature=sig,
                                       device_id=old_device)
                except RelayRefused as exc:
                    if exc.code not in (E.UNKNOWN_DEVICE, E.DEVICE_REVOKED):
                        raise
        except RelayRefused as exc:
            raise _refused_as(exc) from None
    if old_device is not None:
        home.discard()  # its store opens only with the lost password
    node = await trio.to_thread.run_sync(
        Node._create_home, home, name, relay, new_password, kdf, keys, device_id, pk.auth_seed,
        session.token, socks, prekeys, insecure, tor_control,
    )
    return node, fresh_code


# ---- devices -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """One device of the account, as this device sees it."""

    device_id: bytes
    name: str | None  # None: not named yet, or a name this device cannot open
    added_day: int
    last_seen_day: int | None
    active: bool  # it has a session that has not expired
    certified: bool  # its certificate verifies under the account's identity key
    this: bool

    @property
    def short(self) -> str:
        """The short fingerprint people compare and type: the id's first 8 hex digits."""
        return self.device_id.hex()[:8]


async def list_devices(node: Node, link: RelayLink) -> list[Device]:
    ans = await link.request(wire.ListDevices)
    identity = node.keys.public().identity
    out = []
    for d in ans.devices:
        label = None if d.label is None else open_device_label(node.keys, node.name, d.device_id, d.label)
        out.append(Device(
            device_id=d.device_id, name=label, added_day=d.created_day, last_seen_day=d.last_seen_day,
            active=d.active, certified=verify_device(identity, node.name, d.device_id, d.sig),
            this=d.device_id == node.device_id,
        ))
    return out


def pick_device(devices: list[Device], text: str) -> Device:
    """The device whose id starts with ``text`` (hex, at least 4 digits), or a one-line error."""
    prefix = text.strip().lower()
    if len(prefix) < 4 or any(c not in "0123456789abcdef" for c in prefix):
        raise VeilError(f"{text!r} is not a device id: give at least 4 hex digits, as `veil devices` shows them")
    found = [d for d in devices if d.device_id.hex().startswith(prefix)]
    if not found:
        raise VeilError(f"no device {prefix} in this account (it may have been revoked); `veil devices` lists them")
    if len(found) > 1:
        raise VeilError(f"{prefix} matches several devices; give more digits")
    return found[0]


async def rename_device(node: Node, link: RelayLink, device_id: bytes, name: str) -> None:
    try:
        label = seal_device_label(node.keys, node.name, device_id, " ".join(name.split()))
    except ValueError as exc:
        raise VeilError(str(exc)) from None
    try:
        await link.request(wire.RenameDevice, device_id=device_id, label=label)
    except RelayRefused as exc:
        if exc.code == E.UNKNOWN_DEVICE:
            raise VeilError("no such device in this account (it may have been revoked)") from None
        raise


async def revoke_device(node: Node, link: RelayLink, device_id: bytes, *, last: bool) -> None:
    """Revoke a device of the account (proving the password, and a code with MFA)."""
    mfa = False
    try:
        challenge, sig, code, mfa = await _proof(node, link, "revoke")
        await link.request(wire.RevokeDevice, name=node.name, challenge=challenge, signature=sig,
                           totp=code, device_id=device_id, last=last)
    except RelayRefused as exc:
        if exc.code == E.DEVICE_REVOKED:
            raise VeilError("that device was revoked already") from None
        if exc.code == E.UNKNOWN_DEVICE:
            raise VeilError("no such device in this account") from None
        if exc.code == E.LAST_DEVICE:
            raise VeilError(
                "that is the account's only device: revoking it leaves the account with none"
                " (pass --last-device to do it anyway; `veil login` can add a device later)"
            ) from None
        raise _refused(exc, mfa) from None
