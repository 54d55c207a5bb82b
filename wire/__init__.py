"""The wire schema shared by the relay and the nodes: every frame, and how it is encoded.

Frames are msgspec Structs encoded as MessagePack, one frame per WebSocket binary
message. Each frame type has a tag (field ``t``). A request carries ``id`` (a positive
integer chosen by the client); the relay answers every request exactly once with a frame
carrying the same ``id``: the matching ``...Ok`` frame or an ``Error``. Frames the relay
pushes unasked (``Deliver``) and the node's ``Ack`` notifications carry no ``id`` and get
no answer.

The protocol version is in the URL path (``/v1``); a relay refuses other paths.
This module is pure data: no I/O. Decoding is strict: unknown frames, unknown fields,
wrong types, missing fields and oversized fields are all refused with a stable code.
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta, Struct

PROTOCOL_VERSION: Final = 1
PATH: Final = "/v1"

# Sizes: a frame holds at most one message's envelopes (one per device) or one backlog batch.
MAX_ENVELOPE: Final = 65536
MAX_BATCH: Final = 64
# A request frame: room for three of the largest envelopes. Small, because what a relay
# holds for a connection it reads from is a few of these (docs/THREAT_MODEL.md).
MAX_FRAME: Final = 256 * 1024
# The relay closes a connection with 1009 for a message above this; between MAX_FRAME and
# this it answers an Error.
WS_MAX_REQUEST: Final = MAX_FRAME + 16 * 1024
# The largest message a relay sends (a deliver holds at most 512 KiB of blobs): a
# client's limit.
WS_MAX_MESSAGE: Final = 1024 * 1024
MAX_DEVICES: Final = 16

USERNAME_RE: Final = re.compile(r"^[a-z][a-z0-9_.-]{2,31}$")

Name = Annotated[str, Meta(min_length=1, max_length=64)]
Id16 = Annotated[bytes, Meta(min_length=16, max_length=16)]
Key32 = Annotated[bytes, Meta(min_length=32, max_length=32)]
Sig = Annotated[bytes, Meta(min_length=64, max_length=64)]
RsaPub = Annotated[bytes, Meta(min_length=64, max_length=1024)]
Blob = Annotated[bytes, Meta(min_length=1, max_length=MAX_ENVELOPE)]
BundleBlob = Annotated[bytes, Meta(min_length=16, max_length=16384)]
Token = Annotated[bytes, Meta(min_length=32, max_length=32)]
ReqId = Annotated[int, Meta(ge=1, le=2**53)]
Salt = Annotated[bytes, Meta(min_length=16, max_length=16)]
# What a signed challenge is for (section 4.4 of PROTOCOL.md). "recovery" is signed with
# the recovery code's auth key; every other purpose with the password's.
Purpose = Literal["login", "bundle", "recovery", "passwd", "mfa", "revoke"]
# A TOTP code as typed: six digits (RFC 6238). Malformed ones are refused as bad_frame.
Code = Annotated[str, Meta(pattern=r"^[0-9]{6}\Z")]  # \Z: "$" would let "123456\n" through
TotpSecret = Annotated[bytes, Meta(min_length=20, max_length=64)]
# A device's name, encrypted by the account's devices (the relay cannot read it).
DeviceLabel = Annotated[bytes, Meta(min_length=29, max_length=256)]


def normalize_username(name: str) -> str:
    """The canonical form of a username, or ValueError with the rules."""
    canon = name.strip().lower()
    if not USERNAME_RE.match(canon):
        raise ValueError(
            "a username is 3-32 characters: a letter, then letters, digits, '_', '.' or '-'"
        )
    return canon


class Frame(Struct, tag_field="t", forbid_unknown_fields=True, frozen=True):
    """Base of every frame."""


class Kdf(Struct, forbid_unknown_fields=True, frozen=True):
    """Argon2id parameters stored beside a salt."""

    t: Annotated[int, Meta(ge=1, le=10)]
    m: Annotated[int, Meta(ge=8, le=1048576)]
    p: Annotated[int, Meta(ge=1, le=16)]


class DeviceCert(Struct, forbid_unknown_fields=True, frozen=True):
    """A device of an account: its id, signed by the account's identity key."""

    device_id: Id16
    sig: Sig


U32 = Annotated[int, Meta(ge=0, le=2**32 - 1)]
MAX_ONE_TIME_PREKEYS = 100


class SignedPrekeyPub(Struct, forbid_unknown_fields=True, frozen=True):
    """A device's signed prekey (X25519), signed by the account identity key."""

    key_id: U32
    public: Key32
    sig: Sig


class OneTimePrekeyPub(Struct, forbid_unknown_fields=True, frozen=True):
    key_id: U32
    public: Key32


MAX_KEM_ONE_TIME_PREKEYS = 50
KemPublic = Annotated[bytes, Meta(min_length=1184, max_length=1184)]  # ML-KEM-768


class KemKeyPub(Struct, forbid_unknown_fields=True, frozen=True):
    """A device's ML-KEM-768 public key, signed by the account identity key for one use
    (keyvault.kem: one-time KEM prekey, last-resort KEM prekey, or envelope key)."""

    key_id: U32
    public: KemPublic
    sig: Sig


class PrekeySet(Struct, forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    """Prekeys a device publishes: a signed prekey and a stock of one-time prekeys; and,
    post-quantum, a stock of one-time KEM prekeys, the last-resort KEM prekey (replaces
    the one held) and the device's envelope key (replaces the one held). Fields left at
    their defaults are not encoded: a relay from before the KEM keys refuses a map with
    keys it does not know, so a set without KEM keys must look as it did then."""

    signed: SignedPrekeyPub | None = None
    one_time: Annotated[list[OneTimePrekeyPub], Meta(max_length=MAX_ONE_TIME_PREKEYS)] = []
    kem_one_time: Annotated[list[KemKeyPub], Meta(max_length=MAX_KEM_ONE_TIME_PREKEYS)] = []
    kem_last_resort: KemKeyPub | None = None
    envelope_key: KemKeyPub | None = None


# ---- requests (node -> relay) -------------------------------------------------------


class AuthParams(Frame, tag="auth_params", frozen=True):
    """Ask for the salt and KDF parameters of an account (answered for any name)."""

    id: ReqId
    name: Name


class NameFree(Frame, tag="name_free", frozen=True):
    """Ask whether a name is free to register (a check before the slow part of
    registration; ``register`` itself answers ``name_taken`` anyway)."""

    id: ReqId
    name: Name


class Register(Frame, tag="register", frozen=True):
    """Create an account and its first device; answered with a session."""

    id: ReqId
    name: Name
    salt: Salt
    kdf: Kdf
    auth_pub: Key32
    enc_pub: RsaPub
    identity_pub: Key32
    dh_pub: Key32
    keys_sig: Sig  # identity key's signature over enc_pub and dh_pub
    bundle: BundleBlob
    recovery_auth_pub: Key32
    recovery_bundle: BundleBlob
    device: DeviceCert
    prekeys: PrekeySet | None = None


class Challenge(Frame, tag="challenge", frozen=True):
    """Ask for a single-use 60 s challenge for ``purpose``."""

    id: ReqId
    name: Name
    purpose: Purpose


class FetchBundle(Frame, tag="fetch_bundle", frozen=True):
    """Prove the password (signed challenge) and receive the wrapped key bundle; with
    ``recovery``, prove the recovery code instead and receive the recovery copy (this
    connection may then ``recover``). ``totp``: a current code, if the account has MFA."""

    id: ReqId
    name: Name
    challenge: Key32
    signature: Sig
    totp: Code | None = None
    recovery: bool = False


class Login(Frame, tag="login", frozen=True):
    """Prove the password and open a session for a device (registering it if new)."""

    id: ReqId
    name: Name
    challenge: Key32
    signature: Sig
    device: DeviceCert
    prekeys: PrekeySet | None = None
    totp: Code | None = None


class Recover(Frame, tag="recover", frozen=True):
    """After ``fetch_bundle`` with ``recovery`` on this connection: replace the password
    (new salt, KDF, auth key and wrapped bundle) and, if given, the recovery code; end
    every session of the account; and open a session for ``device``. One atomic step."""

    id: ReqId
    name: Name
    salt: Salt
    kdf: Kdf
    auth_pub: Key32
    bundle: BundleBlob
    device: DeviceCert
    recovery_auth_pub: Key32 | None = None
    recovery_bundle: BundleBlob | None = None
    prekeys: PrekeySet | None = None


class ChangePassword(Frame, tag="change_password", frozen=True):
    """Replace the password of this session's account (proved with the current one,
    purpose "passwd"): new salt, KDF, auth key and wrapped bundle, in one step. With
    ``end_sessions``, every other session of the account ends too."""

    id: ReqId
    name: Name
    challenge: Key32
    signature: Sig
    salt: Salt
    kdf: Kdf
    auth_pub: Key32
    bundle: BundleBlob
    totp: Code | None = None
    end_sessions: bool = False


class MfaEnable(Frame, tag="mfa_enable", frozen=True):
    """Turn on TOTP for this session's account (password proof, purpose "mfa"); ``totp``
    is a current code of ``secret``, which the relay checks before storing it."""

    id: ReqId
    name: Name
    challenge: Key32
    signature: Sig
    secret: TotpSecret
    totp: Code


class MfaDisable(Frame, tag="mfa_disable", frozen=True):
    """Turn TOTP off (password proof, purpose "mfa", and a current code)."""

    id: ReqId
    name: Name
    challenge: Key32
    signature: Sig
    totp: Code


class RenameDevice(Frame, tag="rename_device", frozen=True):
    """Set the (encrypted) name of one of this account's devices."""

    id: ReqId
    device_id: Id16
    label: DeviceLabel


class RevokeDevice(Frame, tag="revoke_device", frozen=True):
    """Revoke one of this account's devices (password proof, purpose "revoke"): its
    sessions end, its connections close, its prekeys and mailbox go, lookups stop listing
    it, and it can never log in again. ``last`` must be true to revoke the only device."""

    id: ReqId
    name: Name
    challenge: Key32
    signature: Sig
    device_id: Id16
    totp: Code | None = None
    last: bool = False


class Resume(Frame, tag="resume", frozen=True):
    """Authenticate this connection with an existing session token."""

    id: ReqId
    token: Token


class Logout(Frame, tag="logout", frozen=True):
    """End this connection's session (and forget the device when ``remove_device``)."""

    id: ReqId
    remove_device: bool = False


class LookupKeys(Frame, tag="keys", frozen=True):
    """Public keys and devices of an account (needs a session)."""

    id: ReqId
    name: Name


class Envelope(Struct, forbid_unknown_fields=True, frozen=True):
    """One sealed envelope for one device's mailbox. ``eid`` is random per envelope and
    stays the same across retries, so the relay stores a retried send once."""

    device_id: Id16
    eid: Id16
    blob: Blob


class Send(Frame, tag="send", frozen=True):
    """Store envelopes in device mailboxes; answered once all are committed."""

    id: ReqId
    envelopes: Annotated[list[Envelope], Meta(min_length=1, max_length=MAX_BATCH)]


class Ack(Frame, tag="ack", frozen=True):
    """Delete delivered envelopes from this device's mailbox. A notification, not a
    request: it has no id and no answer (a lost ack only means a redelivery, which the
    node drops as already seen), which saves a frame per delivery."""

    eids: Annotated[list[Id16], Meta(min_length=1, max_length=1024)]


class ListDevices(Frame, tag="devices", frozen=True):
    """The devices of this session's account."""

    id: ReqId


class UploadPrekeys(Frame, tag="upload_prekeys", frozen=True):
    """Publish this device's prekeys (a new signed prekey replaces the old one; one-time
    prekeys are added, up to MAX_ONE_TIME_PREKEYS held). Answered with PrekeyStatusOk."""

    id: ReqId
    prekeys: PrekeySet


class PrekeyStatus(Frame, tag="prekey_status", frozen=True):
    """How many one-time prekeys the relay still holds for this device."""

    id: ReqId


class ClaimPrekeys(Frame, tag="claim_prekeys", frozen=True):
    """Prekey bundles of some devices of an account, to start sessions with them. Each
    one-time prekey is handed out once; when none is left the bundle has only the signed
    prekey."""

    id: ReqId
    name: Name
    device_ids: Annotated[list[Id16], Meta(min_length=1, max_length=MAX_DEVICES)]


class Ping(Frame, tag="ping", frozen=True):
    """Application-level liveness check."""

    id: ReqId


Request = (
    AuthParams
    | NameFree
    | Register
    | Challenge
    | FetchBundle
    | Login
    | Resume
    | Logout
    | LookupKeys
    | Send
    | Ack
    | ListDevices
    | UploadPrekeys
    | PrekeyStatus
    | ClaimPrekeys
    | Ping
    | Recover
    | ChangePassword
    | MfaEnable
    | MfaDisable
    | RenameDevice
    | RevokeDevice
)

# ---- answers and pushes (relay -> node) --------------------------------------------


class Ok(Frame, tag="ok", frozen=True):
    """A request succeeded and has nothing to return."""

    id: int


class AuthParamsOk(Frame, tag="auth_params_ok", frozen=True):
    """``mfa``: the account needs a TOTP code with each password proof (false for a name
    with no account)."""

    id: int
    salt: bytes
    kdf: Kdf
    mfa: bool = False


class NameFreeOk(Frame, tag="name_free_ok", frozen=True):
    id: int
    free: bool


class ChallengeOk(Frame, tag="challenge_ok", frozen=True):
    id: int
    challenge: bytes
    relay_id: bytes


class BundleOk(Frame, tag="bundle_ok", frozen=True):
    id: int
    bundle: bytes


class SessionOk(Frame, tag="session_ok", frozen=True):
    """A session for this device; ``token`` is shown once (the relay keeps its hash)."""

    id: int
    token: bytes
    device_id: bytes
    expires_day: int


class ResumeOk(Frame, tag="resume_ok", frozen=True):
    id: int
    device_id: bytes


class EnvelopeKey(Struct, frozen=True):
    """A device's envelope key (keyvault.kem use 3): sealed envelopes to that device are
    also encapsulated to it (envelope version 3)."""

    device_id: bytes
    key_id: int
    public: bytes
    sig: bytes


class KeysOk(Frame, tag="keys_ok", frozen=True):
    id: int
    name: str
    enc_pub: bytes
    identity_pub: bytes
    dh_pub: bytes
    keys_sig: bytes
    devices: list[DeviceCert]
    envelope_keys: list[EnvelopeKey] = []  # of the listed devices that have published one


class DeviceInfo(Struct, frozen=True):
    """One device of the account: its certificate, its encrypted name (None until named),
    the days it was added and last authenticated, and whether it has a live session."""

    device_id: bytes
    created_day: int
    sig: bytes = b""
    label: bytes | None = None
    last_seen_day: int | None = None
    active: bool = False


class DevicesOk(Frame, tag="devices_ok", frozen=True):
    id: int
    devices: list[DeviceInfo]


class PrekeyStatusOk(Frame, tag="prekey_status_ok", frozen=True):
    """A device's prekeys at the relay. The last three are absent (None) from a relay
    that predates post-quantum keys: a node then publishes none."""

    id: int
    signed_id: int | None
    one_time_left: int
    kem_one_time_left: int | None = None
    kem_last_resort_id: int | None = None
    envelope_key_id: int | None = None


class BundleKem(Struct, frozen=True):
    """The KEM prekey of a bundle: ``use`` 1 (one-time, handed out once) or 2 (last resort)."""

    use: int
    key_id: int
    public: bytes
    sig: bytes


class DeviceBundle(Struct, frozen=True):
    device_id: bytes
    spk_id: int
    spk: bytes
    spk_sig: bytes
    opk_id: int | None
    opk: bytes | None
    kem: BundleKem | None = None  # absent: the device has published no KEM prekey


class PrekeyBundles(Frame, tag="prekey_bundles", frozen=True):
    """One bundle per requested device that has published prekeys."""

    id: int
    bundles: list[DeviceBundle]


class Mail(Struct, frozen=True):
    eid: bytes
    blob: bytes


class Deliver(Frame, tag="deliver", frozen=True):
    """Envelopes pushed to a device. ``synced`` says that nothing older is waiting."""

    items: list[Mail]
    synced: bool


class Error(Frame, tag="error", frozen=True):
    """A refused request (``id`` 0 when the request's id could not be read)."""

    id: int
    code: str
    message: str


Answer = (
    Ok
    | AuthParamsOk
    | NameFreeOk
    | ChallengeOk
    | BundleOk
    | SessionOk
    | ResumeOk
    | KeysOk
    | DevicesOk
    | PrekeyStatusOk
    | PrekeyBundles
    | Deliver
    | Error
)


class ErrorCode:
    """Stable error codes. A client may rely on these strings; messages are for people."""

    MALFORMED = "malformed"  # not MessagePack / not a map
    UNKNOWN_FRAME = "unknown_frame"
    BAD_FRAME = "bad_frame"  # wrong type, missing or unknown field, field out of range
    FRAME_TOO_LARGE = "frame_too_large"
    ENVELOPE_TOO_LARGE = "envelope_too_large"
    RATE_LIMITED = "rate_limited"
    BAD_NAME = "bad_name"
    NAME_TAKEN = "name_taken"
    AUTH_FAILED = "auth_failed"
    NOT_AUTHENTICATED = "not_authenticated"
    ALREADY_AUTHENTICATED = "already_authenticated"
    UNKNOWN_USER = "unknown_user"
    UNKNOWN_DEVICE = "unknown_device"
    TOO_MANY_DEVICES = "too_many_devices"
    PREKEY_LIMIT = "prekey_limit"
    MAILBOX_FULL = "mailbox_full"
    RECIPIENT_LIMITED = "recipient_limited"  # this account sent that device too much lately
    BAD_KEY = "bad_key"
    DEVICE_REVOKED = "device_revoked"  # this device (or the one named) was revoked
    LAST_DEVICE = "last_device"  # revoking the account's only device needs ``last``
    MFA_ENABLED = "mfa_enabled"  # MFA is on already
    MFA_NOT_ENABLED = "mfa_not_enabled"
    NO_RECOVERY = "no_recovery"  # recover without a recovery proof on this connection
    INTERNAL = "internal"


_request_decoder = msgspec.msgpack.Decoder(Request)
_answer_decoder = msgspec.msgpack.Decoder(Answer)
_raw_decoder = msgspec.msgpack.Decoder()
_encoder = msgspec.msgpack.Encoder()

_NOT_A_MAP: Final = object()
_REQUEST_TAGS: Final = frozenset(
    t.__struct_config__.tag for t in Request.__args__
)


class FrameError(Exception):
    """The peer sent a frame we refuse; carries what to answer."""

    def __init__(self, code: str, message: str, request_id: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def to_frame(self) -> Error:
        return Error(id=self.request_id, code=self.code, message=self.message)


def encode(frame: Frame) -> bytes:
    """Serialise a frame."""
    return _encoder.encode(frame)


class _Head(Struct, forbid_unknown_fields=False):
    """Just the tag and id of a frame we refuse: every other field is skipped unread
    (msgspec parses past it without building objects), so a crafted frame costs one
    cheap pass, not a second full decode."""

    t: msgspec.Raw = msgspec.Raw(b"")
    id: msgspec.Raw = msgspec.Raw(b"")


class _SendHead(Struct, forbid_unknown_fields=False):
    # msgspec checks an array's length from its header before reading an element: a
    # frame with more envelopes than a send may hold is refused without building them.
    envelopes: Annotated[list[msgspec.Raw], Meta(max_length=MAX_BATCH)] = []


class _EnvelopeHead(Struct, forbid_unknown_fields=False):
    blob: msgspec.Raw = msgspec.Raw(b"")


_head_decoder = msgspec.msgpack.Decoder(_Head)
_send_head_decoder = msgspec.msgpack.Decoder(_SendHead)
_envelope_head_decoder = msgspec.msgpack.Decoder(_EnvelopeHead)
_SMALL: Final = 256  # a tag or an id longer than this is not one


def _small(raw: msgspec.Raw) -> object:
    if not 0 < len(raw) <= _SMALL:
        return None
    try:
        return _raw_decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None


def _salvage_id(data: bytes) -> tuple[object, int]:
    """Best effort: the tag and request id of a frame that failed to decode."""
    try:
        head = _head_decoder.decode(data)
    except msgspec.ValidationError:
        return _NOT_A_MAP, 0  # not a map (its fields are not read)
    except (msgspec.DecodeError, RecursionError):
        return _NOT_A_MAP, 0
    rid = _small(head.id)
    ok_id = rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 < rid <= 2**53 else 0
    return _small(head.t), ok_id


def _has_oversized_envelope(data: bytes) -> bool:
    """Whether a ``send`` frame that failed validation holds a blob above MAX_ENVELOPE.

    Decided from the frame's structure, not from the text of msgspec's error, which a
    msgspec release may word differently; blobs are measured, not copied."""
    try:
        envelopes = _send_head_decoder.decode(data).envelopes
    except (msgspec.DecodeError, RecursionError):  # ValidationError included
        return False
    for raw in envelopes:
        try:
            blob = _envelope_head_decoder.decode(raw).blob
        except (msgspec.DecodeError, RecursionError):
            continue
        if _bin_length(blob) > MAX_ENVELOPE:
            return True
    return False


def _bin_length(raw: msgspec.Raw) -> int:
    """The length of a MessagePack bin value from its header, or -1 if it is not one."""
    b = bytes(memoryview(raw)[:5])
    if not b:
        return -1
    if b[0] == 0xC4 and len(b) >= 2:
        return b[1]
    if b[0] == 0xC5 and len(b) >= 3:
        return int.from_bytes(b[1:3], "big")
    if b[0] == 0xC6 and len(b) >= 5:
        return int.from_bytes(b[1:5], "big")
    return -1


def request_id(data: bytes) -> int:
    """The id of a frame we refuse without decoding it (0 if it cannot be read)."""
    return _salvage_id(data)[1]


def decode_request(data: bytes) -> Request:
    """Strictly decode a request, or raise FrameError with the code to answer."""
    if len(data) > MAX_FRAME:
        raise FrameError(ErrorCode.FRAME_TOO_LARGE, f"frame larger than {MAX_FRAME} bytes", request_id(data))
    try:
        return _request_decoder.decode(data)
    except msgspec.ValidationError as exc:
        tag, rid = _salvage_id(data)
        if tag is _NOT_A_MAP:
            raise FrameError(ErrorCode.MALFORMED, "a frame is a MessagePack map") from None
        if not isinstance(tag, str) or tag not in _REQUEST_TAGS:
            raise FrameError(ErrorCode.UNKNOWN_FRAME, f"unknown frame type {tag!r}"[:200], rid) from None
        if tag == "send" and _has_oversized_envelope(data):
            raise FrameError(
                ErrorCode.ENVELOPE_TOO_LARGE, f"an envelope is larger than {MAX_ENVELOPE} bytes", rid
            ) from None
        raise FrameError(ErrorCode.BAD_FRAME, str(exc)[:200], rid) from None
    except (msgspec.DecodeError, RecursionError):
        raise FrameError(ErrorCode.MALFORMED, "frame is not valid MessagePack") from None


def decode_answer(data: bytes) -> Answer:
    """Decode a frame from the relay (raises msgspec errors on garbage)."""
    return _answer_decoder.decode(data)
