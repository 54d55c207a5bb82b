"""The Double Ratchet with header encryption (Signal's specification, section 4).

Reference: https://signal.org/docs/specifications/doubleratchet/ ("Double Ratchet with header
encryption"). Every function here is pure: it takes a `RatchetState` and returns a new one,
never changing its input, so the caller can commit the new state in the same transaction
that stores the plaintext (and simply drop it when anything fails).

Primitives (all integers big-endian; lp(x) = u32 len(x) || x)::

    KDF_RK(rk, dh_out) = HKDF-SHA256(salt = rk, ikm = dh_out, info = RATCHET_ROOT, L = 96)
                       -> new root key [0:32] || chain key [32:64] || next header key [64:96]
    KDF_CK(ck)         -> message key = HMAC-SHA256(ck, 0x01), next chain key = HMAC-SHA256(ck, 0x02)
    message_keys(mk)   = HKDF-SHA256(salt = none (32 zero bytes), ikm = mk,
                                     info = RATCHET_MESSAGE, L = 56)
                       -> AES-256 key [0:32] || body nonce [32:44] || header nonce [44:56]

Each message key is used for exactly one message, so deriving both AES-GCM nonces from it
is safe. The header key is used for a whole chain; its nonces are the per-message header
nonces above, which are pseudorandom and distinct per message (collisions are exactly as
unlikely as with random 96-bit nonces). Encryption therefore needs no randomness except a new
ratchet key pair at each DH ratchet step (``dh_private`` fixes it for tests).

Message (version 1; 85 bytes of overhead)::

    message    = 0x01 || enc_header (68) || body
    header     = DHs public (32) || u32 PN || u32 N                         (40 bytes)
    enc_header = header nonce (12) || AES-256-GCM(HK, header nonce, header,
                                                  aad = RATCHET_HEADER_AAD || 0x01) (56)
    body       = AES-256-GCM(message key, body nonce, plaintext,
                             aad = lp(AD) || 0x01 || enc_header)

AD is the session's associated data from X3DH (`X3DHResult.associated_data`).

Deviations from the spec's pseudocode, all internal (the peers' messages are the same):

- The sending half of a DH ratchet step (new DHs key pair, ``RK, CKs, NHKs = KDF_RK(RK,
  DH(DHs, DHr))``) is deferred from decrypt to the next encrypt, so that decrypt needs no
  randomness. The root chain sees the same sequence of inputs as in the spec. While that
  step is pending (``CKs`` is None and ``DHr`` is set), a header under ``NHKr`` cannot come
  from an honest peer and is refused as DecryptionFailed.
- Limits. A message may jump at most MAX_SKIP keys in one chain (the end of the old chain
  and the start of the new one are each bounded); beyond that, TooManySkipped, before any
  key is derived, so work per message is bounded. At most MAX_STORED_SKIPPED skipped keys
  are kept: when more are skipped, the OLDEST are evicted first; their messages can then
  no longer be decrypted (and are reported as DuplicateMessage: the key is gone either
  way). So a long gap (up to MAX_SKIP lost or delayed messages) does not jam the session,
  and memory stays bounded whatever the peer sends.
- Duplicates. A message whose header decrypts under a known header key but whose message
  key is gone (already used) raises DuplicateMessage rather than DecryptionFailed. To
  recognise duplicates from finished chains, the state keeps the last
  MAX_RETIRED_HEADER_KEYS receiving header keys (header keys protect only the header: the
  ratchet public key and counters, never message content). Older duplicates raise
  DecryptionFailed.

Errors: any damaged or forged message -> DecryptionFailed (one opaque error); a replay ->
DuplicateMessage; a jump beyond the limits -> TooManySkipped. None changes the input state.
A replay is recognised from its (authenticated) header before its body can be checked, so a
damaged copy of an already-decrypted message may raise DuplicateMessage too; it is never
opened either way.

The post-quantum ratchet (a session set up by PQXDH, `X3DHResult.post_quantum`). Every
DH ratchet step also mixes in an ML-KEM-768 secret, so a conversation heals against an
attacker who can break X25519, not only at its start. Each side's ratchet key pair comes
with a ratchet KEM key pair, made together and sent together: every message carries its
sender's current ratchet KEM public key, and every message of a sending chain that began
after the peer's KEM key was known carries the ciphertext of that chain's step::

    KDF_RK_KEM(rk, dh_out, ss) = HKDF-SHA256(salt = rk, ikm = dh_out || ss,
                                             info = RATCHET_ROOT_KEM, L = 96)  (split as KDF_RK)

    sending a new chain:   DHs, KEMs = new key pairs; (ss, CT) = ML-KEM-768.Encaps(KEMr)
                           RK, CKs, NHKs = KDF_RK_KEM(RK, DH(DHs, DHr), ss)
    receiving a new chain: ss = ML-KEM-768.Decaps(KEMs, CT); KEMr = the header's key
                           RK, CKr, NHKr = KDF_RK_KEM(RK, DH(DHs, DHr), ss)

The initiator's first chain has no ciphertext (the responder's first ratchet key is its
signed prekey, with no ratchet KEM key; PQXDH's KEM secret is already in the root key),
and then is an ordinary KDF_RK step; every later chain must carry one: a header without it
in such a session, or a version 1 message in a post-quantum session (or the reverse), is
refused as DecryptionFailed (no downgrade within a session). Messages::

    version 2: header = DHs public (32) || u32 PN || u32 N || KEMs public (1184)    (1224)
    version 3: header = the version 2 header || CT (1088)                           (2312)
    message = version || nonce (12) || AES-256-GCM(HK, nonce, header,
                                                   aad = RATCHET_HEADER_AAD || version)
              || body (as in version 1, its aad covering this longer prefix)

Overhead: 1,269 bytes for version 2, 2,357 for version 3 (version 1: 85). CPU per new
sending chain: one ML-KEM key generation and one encapsulation; per new receiving chain,
one decapsulation; nothing more per message.

State serialisation (version 1; version 2 for a post-quantum session appends
``opt64(KEMs seed) || opt1184(KEMr) || opt1088(CT of the current sending chain)``)::

    state = 0x01 || DHs private (32) || opt(DHr) || RK (32) || opt(CKs) || opt(CKr)
            || u32 Ns || u32 Nr || u32 PN || opt(HKs) || opt(HKr) || NHKs (32) || NHKr (32)
            || u32 n || n x (HK (32) || u32 N || MK (32))     skipped keys, oldest first
            || u32 m || m x HK (32)                           retired header keys, oldest first
    opt(k) = 0x00 (absent) | 0x01 || k (32)
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyvault import kem, labels
from keyvault._codec import Reader, lp
from keyvault.errors import (
    BadKey,
    BadPrekey,
    DecryptionFailed,
    DuplicateMessage,
    KeyvaultError,
    TooManySkipped,
)
from keyvault.prekeys import x25519_pair
from keyvault.x3dh import X3DHResult

VERSION = 1
PQ_VERSION = 2  # the header carries the sender's ratchet KEM key
PQ_CT_VERSION = 3  # ... and the ciphertext of its chain's KEM step
STATE_VERSION = 1
PQ_STATE_VERSION = 2
KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
HEADER_LEN = KEY_LEN + 4 + 4
ENC_HEADER_LEN = NONCE_LEN + HEADER_LEN + TAG_LEN  # 68
PREFIX_LEN = 1 + ENC_HEADER_LEN  # version || enc_header
OVERHEAD = PREFIX_LEN + TAG_LEN  # 85 bytes on top of the plaintext (version 1)
_HEADER_LENS = {
    VERSION: HEADER_LEN,
    PQ_VERSION: HEADER_LEN + kem.PUBLIC_LEN,  # 1224
    PQ_CT_VERSION: HEADER_LEN + kem.PUBLIC_LEN + kem.CIPHERTEXT_LEN,  # 2312
}
#: The most a message adds to its plaintext (a version 3 message): 2,357 bytes.
MAX_OVERHEAD = 1 + NONCE_LEN + _HEADER_LENS[PQ_CT_VERSION] + TAG_LEN + TAG_LEN

#: The most message keys one message may skip in one chain.
MAX_SKIP = 2000
#: The most skipped message keys a session stores (see the module docstring).
MAX_STORED_SKIPPED = 1000
#: How many finished receiving chains' header keys are kept to recognise duplicates.
MAX_RETIRED_HEADER_KEYS = 50
MAX_COUNTER = 2**32 - 1

_HEADER_AAD = labels.RATCHET_HEADER_AAD + bytes([VERSION])


# Primitives -------------------------------------------------------------------------------


def kdf_rk(rk: bytes, dh_out: bytes) -> tuple[bytes, bytes, bytes]:
    """KDF_RK for header encryption: return (root key, chain key, next header key)."""
    out = HKDF(algorithm=hashes.SHA256(), length=96, salt=rk, info=labels.RATCHET_ROOT).derive(
        dh_out
    )
    return out[:32], out[32:64], out[64:]


def kdf_ck(ck: bytes) -> tuple[bytes, bytes]:
    """KDF_CK: return (next chain key, message key)."""
    return (
        hmac.new(ck, b"\x02", hashlib.sha256).digest(),
        hmac.new(ck, b"\x01", hashlib.sha256).digest(),
    )


def message_keys(mk: bytes) -> tuple[bytes, bytes, bytes]:
    """Expand a message key: return (AES-256 key, body nonce, header nonce)."""
    out = HKDF(algorithm=hashes.SHA256(), length=56, salt=None, info=labels.RATCHET_MESSAGE).derive(
        mk
    )
    return out[:32], out[32:44], out[44:]


def kdf_rk_kem(rk: bytes, dh_out: bytes, kem_secret: bytes) -> tuple[bytes, bytes, bytes]:
    """KDF_RK_KEM, a post-quantum ratchet step: (root key, chain key, next header key)."""
    out = HKDF(algorithm=hashes.SHA256(), length=96, salt=rk, info=labels.RATCHET_ROOT_KEM).derive(
        dh_out + kem_secret
    )
    return out[:32], out[32:64], out[64:]


@dataclass(frozen=True)
class _Header:
    dh: bytes
    pn: int
    n: int
    kem_public: bytes | None  # versions 2 and 3
    kem_ciphertext: bytes | None  # version 3


def _open_header(hk: bytes, enc_header: bytes, version: int) -> _Header | None:
    try:
        h = AESGCM(hk).decrypt(
            enc_header[:NONCE_LEN], enc_header[NONCE_LEN:], labels.RATCHET_HEADER_AAD + bytes([version])
        )
    except InvalidTag:
        return None
    if len(h) != _HEADER_LENS[version]:
        return None
    kem_public = h[HEADER_LEN : HEADER_LEN + kem.PUBLIC_LEN] if version != VERSION else None
    kem_ct = h[HEADER_LEN + kem.PUBLIC_LEN :] if version == PQ_CT_VERSION else None
    return _Header(h[:32], int.from_bytes(h[32:36], "big"), int.from_bytes(h[36:40], "big"), kem_public, kem_ct)


def encode_header(dh_public: bytes, pn: int, n: int) -> bytes:
    """Return the 40-byte plaintext header."""
    return dh_public + pn.to_bytes(4, "big") + n.to_bytes(4, "big")


def encrypt_header(hk: bytes, header: bytes, nonce: bytes) -> bytes:
    """HENCRYPT: return nonce || AES-256-GCM(hk, nonce, header)."""
    return nonce + AESGCM(hk).encrypt(nonce, header, _HEADER_AAD)


def decrypt_header(hk: bytes, enc_header: bytes) -> tuple[bytes, int, int] | None:
    """HDECRYPT: return (DH public, PN, N), or None if ``hk`` does not open it."""
    try:
        h = AESGCM(hk).decrypt(enc_header[:NONCE_LEN], enc_header[NONCE_LEN:], _HEADER_AAD)
    except InvalidTag:
        return None
    if len(h) != HEADER_LEN:
        return None
    return h[:32], int.from_bytes(h[32:36], "big"), int.from_bytes(h[36:40], "big")


def _dh(private: bytes, public: bytes) -> bytes:
    # ValueError for a low-order public key (all-zero shared secret).
    return X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(public)
    )


# State ------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class RatchetState:
    """The whole state of one side of a session (the spec's names, lower case). Immutable."""

    dhs_private: bytes  # DHs: our current ratchet key pair
    dhs_public: bytes
    dhr: bytes | None  # DHr: the peer's current ratchet public key
    rk: bytes  # RK
    cks: bytes | None  # CKs (None before the responder's first send, or while pending)
    ckr: bytes | None  # CKr
    ns: int
    nr: int
    pn: int
    hks: bytes | None  # HKs
    hkr: bytes | None  # HKr
    nhks: bytes  # NHKs
    nhkr: bytes  # NHKr
    #: MKSKIPPED: (header key, N) -> message key, oldest first.
    skipped: Mapping[tuple[bytes, int], bytes] = field(default_factory=lambda: MappingProxyType({}))
    #: Header keys of finished receiving chains, oldest first (duplicate detection only).
    retired: tuple[bytes, ...] = ()
    #: The post-quantum ratchet (see the module docstring); all None/False otherwise.
    pq: bool = False
    kems_seed: bytes | None = None  # KEMs: our ratchet KEM key pair, made with DHs
    kems_public: bytes | None = None
    kemr: bytes | None = None  # KEMr: the peer's ratchet KEM public key, sent with DHr
    kem_ct: bytes | None = None  # CT of our current sending chain's KEM step

    def __repr__(self) -> str:
        return (
            f"RatchetState(ns={self.ns}, nr={self.nr}, pn={self.pn}, "
            f"skipped={len(self.skipped)}, <secret>)"
        )

    @property
    def established(self) -> bool:
        """True once this side has decrypted a message from the peer.

        Until then an initiator keeps sending its X3DH data (identity key, ephemeral key,
        prekey ids) with every message, since any of them may be the first to arrive.
        """
        return self.ckr is not None

    @property
    def can_send(self) -> bool:
        """False only for a responder that has not decrypted the first message yet."""
        return self.cks is not None or self.dhr is not None

    def to_bytes(self) -> bytes:
        """Serialise the state (see the module docstring). Secret!"""

        def opt(k: bytes | None) -> bytes:
            return b"\x00" if k is None else b"\x01" + k

        out = [
            bytes([PQ_STATE_VERSION if self.pq else STATE_VERSION]),
            self.dhs_private,
            opt(self.dhr),
            self.rk,
            opt(self.cks),
            opt(self.ckr),
            self.ns.to_bytes(4, "big"),
            self.nr.to_bytes(4, "big"),
            self.pn.to_bytes(4, "big"),
            opt(self.hks),
            opt(self.hkr),
            self.nhks,
            self.nhkr,
            len(self.skipped).to_bytes(4, "big"),
        ]
        for (hk, n), mk in self.skipped.items():
            out.append(hk + n.to_bytes(4, "big") + mk)
        out.append(len(self.retired).to_bytes(4, "big"))
        out.extend(self.retired)
        if self.pq:
            out += [opt(self.kems_seed), opt(self.kemr), opt(self.kem_ct)]
        return b"".join(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> RatchetState:
        """Parse `to_bytes` output (BadKey on any malformation)."""
        try:
            r = Reader(data)
            version = r.take(1)[0]
            if version not in (STATE_VERSION, PQ_STATE_VERSION):
                raise ValueError("version")

            def opt(length: int = KEY_LEN) -> bytes | None:
                flag = r.take(1)
                if flag == b"\x00":
                    return None
                if flag != b"\x01":
                    raise ValueError("flag")
                return r.take(length)

            def u32() -> int:
                return int.from_bytes(r.take(4), "big")

            dhs_private = r.take(KEY_LEN)
            dhr = opt()
            rk = r.take(KEY_LEN)
            cks, ckr = opt(), opt()
            ns, nr, pn = u32(), u32(), u32()
            hks, hkr = opt(), opt()
            nhks, nhkr = r.take(KEY_LEN), r.take(KEY_LEN)
            count = u32()
            if count > MAX_STORED_SKIPPED:
                raise ValueError("too many skipped keys")
            skipped: dict[tuple[bytes, int], bytes] = {}
            for _ in range(count):
                hk, n, mk = r.take(KEY_LEN), u32(), r.take(KEY_LEN)
                skipped[(hk, n)] = mk
            if len(skipped) != count:
                raise ValueError("repeated skipped key")
            count = u32()
            if count > MAX_RETIRED_HEADER_KEYS:
                raise ValueError("too many retired header keys")
            retired = tuple(r.take(KEY_LEN) for _ in range(count))
            pq = version == PQ_STATE_VERSION
            kems_seed = kems_public = kemr = kem_ct = None
            if pq:
                kems_seed, kemr, kem_ct = opt(kem.SEED_LEN), opt(kem.PUBLIC_LEN), opt(kem.CIPHERTEXT_LEN)
                if kems_seed is not None:
                    kems_public = kem.kem_pair(kems_seed)[1]
            r.end()
            if (hkr is None) != (ckr is None) or (cks is not None and hks is None):
                raise ValueError("inconsistent")
            if dhr is not None:
                X25519PublicKey.from_public_bytes(dhr)
            _, dhs_public = x25519_pair(dhs_private)
        except ValueError:
            raise BadKey("The ratchet session state is malformed.") from None
        return cls(
            dhs_private,
            dhs_public,
            dhr,
            rk,
            cks,
            ckr,
            ns,
            nr,
            pn,
            hks,
            hkr,
            nhks,
            nhkr,
            MappingProxyType(skipped),
            retired,
            pq,
            kems_seed,
            kems_public,
            kemr,
            kem_ct,
        )


@dataclass
class _Work:
    """A private, mutable copy of a RatchetState that one operation works on."""

    dhs_private: bytes
    dhs_public: bytes
    dhr: bytes | None
    rk: bytes
    cks: bytes | None
    ckr: bytes | None
    ns: int
    nr: int
    pn: int
    hks: bytes | None
    hkr: bytes | None
    nhks: bytes
    nhkr: bytes
    skipped: dict[tuple[bytes, int], bytes]
    retired: list[bytes]
    pq: bool
    kems_seed: bytes | None
    kems_public: bytes | None
    kemr: bytes | None
    kem_ct: bytes | None

    @classmethod
    def of(cls, state: RatchetState) -> _Work:
        values = {f.name: getattr(state, f.name) for f in fields(RatchetState)}
        values["skipped"] = dict(state.skipped)
        values["retired"] = list(state.retired)
        return cls(**values)

    def freeze(self) -> RatchetState:
        values = {f.name: getattr(self, f.name) for f in fields(RatchetState)}
        values["skipped"] = MappingProxyType(self.skipped)
        values["retired"] = tuple(self.retired)
        return RatchetState(**values)


# Initialisation ---------------------------------------------------------------------------


def init_initiator(
    x: X3DHResult, their_ratchet_public: bytes, *, dh_private: bytes | None = None,
    kem_seed: bytes | None = None,
) -> RatchetState:
    """RatchetInitAliceHE: the peer's first ratchet key is its signed prekey. A PQXDH
    result starts the post-quantum ratchet (with our first ratchet KEM key).

    ``dh_private`` and ``kem_seed`` (tests only) fix our first ratchet keys; otherwise fresh.
    """
    if not x.initiator:
        raise ValueError("init_initiator needs the initiator's X3DH result")
    priv, pub = x25519_pair(dh_private)
    try:
        rk, cks, nhks = kdf_rk(x.root_key, _dh(priv, bytes(their_ratchet_public)))
    except ValueError:
        raise BadPrekey("The contact's signed prekey is not a valid key.") from None
    state = RatchetState(
        dhs_private=priv,
        dhs_public=pub,
        dhr=bytes(their_ratchet_public),
        rk=rk,
        cks=cks,
        ckr=None,
        ns=0,
        nr=0,
        pn=0,
        hks=x.header_key_send,
        hkr=None,
        nhks=nhks,
        nhkr=x.next_header_key_recv,
    )
    return _pq_start(state, x, kem_seed, initiator=True)


def _pq_start(state: RatchetState, x: X3DHResult, kem_seed: bytes | None, *, initiator: bool) -> RatchetState:
    if not x.post_quantum:
        return state
    if not initiator:
        return replace(state, pq=True)
    seed, public = kem.kem_pair(kem_seed)
    return replace(state, pq=True, kems_seed=seed, kems_public=public)


def init_responder(x: X3DHResult, my_ratchet: tuple[bytes, bytes]) -> RatchetState:
    """RatchetInitBobHE: ``my_ratchet`` is (private, public) of the signed prekey used."""
    if x.initiator:
        raise ValueError("init_responder needs the responder's X3DH result")
    priv, pub = bytes(my_ratchet[0]), bytes(my_ratchet[1])
    if x25519_pair(priv)[1] != pub:
        raise ValueError("the ratchet key pair does not match")
    state = RatchetState(
        dhs_private=priv,
        dhs_public=pub,
        dhr=None,
        rk=x.root_key,
        cks=None,
        ckr=None,
        ns=0,
        nr=0,
        pn=0,
        hks=None,
        hkr=None,
        nhks=x.header_key_send,
        nhkr=x.next_header_key_recv,
    )
    return _pq_start(state, x, None, initiator=False)


# Encrypt ----------------------------------------------------------------------------------


def encrypt(
    state: RatchetState, plaintext: bytes, ad: bytes, *, dh_private: bytes | None = None,
    kem_seed: bytes | None = None, kem_encapsulation: tuple[bytes, bytes] | None = None,
) -> tuple[RatchetState, bytes]:
    """RatchetEncryptHE: return (new state, message).

    Commit the returned state (with the outbox entry) BEFORE the message leaves the device:
    encrypting again from the old state reuses the same one-use key and nonces, which is
    harmless for the same plaintext (the bytes are identical) and fatal for a different one.

    ``dh_private`` (tests only) fixes the new ratchet key pair if this message starts a new
    sending chain (the first message after receiving a new ratchet key); otherwise unused;
    ``kem_seed`` and ``kem_encapsulation`` (tests only) likewise fix the new ratchet KEM
    key and the step's (secret, ciphertext) in a post-quantum session.
    """
    w = _Work.of(state)
    if w.cks is None:
        if w.dhr is None:
            raise KeyvaultError("This session cannot send before the first message arrives.")
        # The deferred sending half of the DH ratchet step.
        w.dhs_private, w.dhs_public = x25519_pair(dh_private)
        dh_out = _dh(w.dhs_private, w.dhr)
        if w.pq:
            if w.kemr is None:
                raise KeyvaultError("This session has no post-quantum key of the peer's.")
            w.kems_seed, w.kems_public = kem.kem_pair(kem_seed)
            secret, w.kem_ct = kem_encapsulation or kem.encapsulate(w.kemr)
            w.rk, w.cks, w.nhks = kdf_rk_kem(w.rk, dh_out, secret)
        else:
            w.rk, w.cks, w.nhks = kdf_rk(w.rk, dh_out)
    if w.ns > MAX_COUNTER or w.hks is None:
        raise KeyvaultError("This session has sent too many messages; start a new one.")
    w.cks, mk = kdf_ck(w.cks)
    key, nonce, header_nonce = message_keys(mk)
    header = encode_header(w.dhs_public, w.pn, w.ns)
    version = VERSION
    if w.pq:
        assert w.kems_public is not None
        header += w.kems_public + (w.kem_ct or b"")
        version = PQ_CT_VERSION if w.kem_ct is not None else PQ_VERSION
    prefix = bytes([version]) + header_nonce + AESGCM(w.hks).encrypt(
        header_nonce, header, labels.RATCHET_HEADER_AAD + bytes([version])
    )
    body = AESGCM(key).encrypt(nonce, bytes(plaintext), lp(bytes(ad)) + prefix)
    w.ns += 1
    return w.freeze(), prefix + body


# Decrypt ----------------------------------------------------------------------------------


def _open(mk: bytes, body: bytes, aad: bytes) -> bytes:
    key, nonce, _ = message_keys(mk)
    try:
        return AESGCM(key).decrypt(nonce, body, aad)
    except InvalidTag:
        raise DecryptionFailed() from None


def _skip(w: _Work, until: int) -> None:
    # SkipMessageKeysHE; the caller has checked the limits.
    if w.ckr is None or w.hkr is None:
        return
    while w.nr < until:
        w.ckr, mk = kdf_ck(w.ckr)
        w.skipped[(w.hkr, w.nr)] = mk
        w.nr += 1


def _evict(w: _Work) -> None:
    while len(w.skipped) > MAX_STORED_SKIPPED:
        del w.skipped[next(iter(w.skipped))]


def _next_key(w: _Work) -> bytes:
    assert w.ckr is not None
    w.ckr, mk = kdf_ck(w.ckr)
    w.nr += 1
    return mk


def _dh_ratchet_receive(w: _Work, h: _Header) -> None:
    # The receiving half of DHRatchetHE (the sending half waits for the next encrypt).
    secret = None
    if w.pq:
        # Our current KEM key went out with our current ratchet key: a peer that answers
        # our ratchet key had it, so its step must use it (no downgrade); only the
        # initiator's first chain, answering the signed prekey, has none.
        if (w.kems_seed is None) != (h.kem_ciphertext is None):
            raise DecryptionFailed()
        if w.kems_seed is not None and h.kem_ciphertext is not None:
            secret = kem.decapsulate(w.kems_seed, h.kem_ciphertext)
    if w.hkr is not None:
        w.retired.append(w.hkr)
        del w.retired[:-MAX_RETIRED_HEADER_KEYS]
    w.pn, w.ns, w.nr = w.ns, 0, 0
    w.hks, w.hkr = w.nhks, w.nhkr
    w.dhr = h.dh
    if w.pq:
        w.kemr, w.kem_ct = h.kem_public, None
    try:
        dh_out = _dh(w.dhs_private, h.dh)
    except ValueError:
        raise DecryptionFailed() from None
    if secret is None:
        w.rk, w.ckr, w.nhkr = kdf_rk(w.rk, dh_out)
    else:
        w.rk, w.ckr, w.nhkr = kdf_rk_kem(w.rk, dh_out, secret)
    w.cks = None


def decrypt(state: RatchetState, message: bytes, ad: bytes) -> tuple[RatchetState, bytes]:
    """RatchetDecryptHE: return (new state, plaintext); the input state is never changed.

    DecryptionFailed if the message is damaged or forged, DuplicateMessage if its key was
    already used, TooManySkipped if it jumps beyond the limits.
    """
    message = bytes(message)
    version = message[0] if message else 0
    if version not in ((PQ_VERSION, PQ_CT_VERSION) if state.pq else (VERSION,)):
        raise DecryptionFailed()  # also: a version 1 message in a post-quantum session
    prefix_len = 1 + NONCE_LEN + _HEADER_LENS[version] + TAG_LEN
    if len(message) < prefix_len + TAG_LEN:
        raise DecryptionFailed()
    enc_header, body = message[1:prefix_len], message[prefix_len:]
    aad = lp(bytes(ad)) + message[:prefix_len]
    w = _Work.of(state)

    def header(hk: bytes) -> _Header | None:
        return _open_header(hk, enc_header, version)

    # 1. The current receiving chain (the common case).
    if w.hkr is not None and (h := header(w.hkr)) is not None:
        n = h.n
        if h.dh != w.dhr or h.kem_public != w.kemr:
            raise DecryptionFailed()
        mk = w.skipped.pop((w.hkr, n), None)
        if mk is None:
            if n < w.nr:
                raise DuplicateMessage()
            if n - w.nr > MAX_SKIP:
                raise TooManySkipped()
            _skip(w, n)
            _evict(w)
            mk = _next_key(w)
        return w.freeze(), _open(mk, body, aad)

    # 2. The peer's next chain: a DH ratchet step.
    if (h := header(w.nhkr)) is not None:
        if w.cks is None and w.dhr is not None:
            raise DecryptionFailed()  # the peer cannot have our next ratchet key yet
        pn, n = h.pn, h.n
        old = pn - w.nr
        if old > MAX_SKIP or n > MAX_SKIP:
            raise TooManySkipped()
        _skip(w, pn)
        _dh_ratchet_receive(w, h)
        _skip(w, n)
        _evict(w)
        mk = _next_key(w)
        return w.freeze(), _open(mk, body, aad)

    # 3. Earlier chains that still have skipped keys (TrySkippedMessageKeysHE).
    for hk in dict.fromkeys(hk for hk, _ in w.skipped):
        if hk == w.hkr or (h := header(hk)) is None:
            continue
        mk = w.skipped.pop((hk, h.n), None)
        if mk is None:
            raise DuplicateMessage()
        return w.freeze(), _open(mk, body, aad)

    # 4. Finished chains: a header that opens here is a replay.
    with_skipped = {hk for hk, _ in w.skipped}
    for hk in reversed(w.retired):
        if hk not in with_skipped and header(hk) is not None:
            raise DuplicateMessage()
    raise DecryptionFailed()
