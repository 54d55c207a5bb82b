"""X3DH key agreement (https://signal.org/docs/specifications/x3dh/), with header keys.

Parameters (section 2.1 of the spec): curve X25519, hash SHA-256, info ``X3DH_SK``. Our
"IK" is the account's X25519 DH identity key; the account's Ed25519 identity key signs the
signed prekey (instead of XEdDSA), see `keyvault.prekeys`. Encode(PK) is the raw 32-byte
X25519 public key (only one curve is ever used, so no curve byte is needed).

The initiator (Alice) fetches Bob's prekey bundle and computes, with her ephemeral key EK_A::

    DH1 = DH(IK_A, SPK_B)   DH2 = DH(EK_A, IK_B)   DH3 = DH(EK_A, SPK_B)   DH4 = DH(EK_A, OPK_B)
    SK  = HKDF-SHA256(salt = 32 zero bytes, ikm = F || DH1 || DH2 || DH3 [|| DH4],
                      info = X3DH_SK, length 32)          F = 32 bytes of 0xFF

DH4 is present only when the bundle had a one-time prekey.

PQXDH (https://signal.org/docs/specifications/pqxdh/), when the bundle also holds a KEM
prekey PQPK_B (an ML-KEM-768 key the identity key signed, `keyvault.kem`: a one-time one
if any were left, else the device's last-resort one): the initiator encapsulates to it,
``(SS, CT) = ML-KEM-768.Encaps(PQPK_B)``, sends CT (with the KEM key's use and id) in the
first message's header (`keyvault.payload`), and::

    SK  = HKDF-SHA256(salt = 32 zero bytes, ikm = F || DH1 || DH2 || DH3 [|| DH4] || SS,
                      info = PQXDH_SK, length 32)

The distinct label keeps a PQXDH secret apart from an X3DH one over the same DH values.
ML-KEM's shared secret depends on the public key it was made for (FIPS 203 hashes the
key into it), which is what PQXDH's analysis asks of the KEM against re-encapsulation to
another key. A bundle without a KEM prekey gives plain X3DH as above (a peer from before
post-quantum keys); the caller decides whether to accept that (no downgrade once a peer
is known to have KEM keys). SK is then split (HKDF-SHA256,
salt empty = 32 zero bytes, ikm = SK, 32 bytes each) into the three inputs of the spec's
Double Ratchet with header encryption::

    root_key    = HKDF(SK, info = X3DH_ROOT)
    shared_hka  = HKDF(SK, info = X3DH_HEADER_A)   header key of Alice's first sending chain
    shared_nhkb = HKDF(SK, info = X3DH_HEADER_B)   header key of Bob's first sending chain

`X3DHResult` names the two header keys from the holder's own view, so both roles read alike:

    ``header_key_send``       the header key of MY first sending chain
                              (initiator: shared_hka -> HKs; responder: shared_nhkb -> NHKs)
    ``next_header_key_recv``  the header key of THE PEER's first sending chain
                              (initiator: shared_nhkb -> NHKr; responder: shared_hka -> NHKr)

``ephemeral`` is EK_A's public key for the initiator (to send to Bob with IK_A, the signed
prekey id and the one-time prekey id) and ``b""`` for the responder.

Associated data (the same on both sides; A is always the initiator, B the responder)::

    AD = X3DH_AD || IK_A (32) || IK_B (32)
         || lp(utf8 name_A) || lp(device_A) || lp(utf8 name_B) || lp(device_B)

where lp(x) = u32 big-endian length || x. Pass it as ``ad`` to every ratchet encrypt/decrypt
of the session.

The responder must check that ``their_identity_dh`` is the DH identity key of the account the
message claims to come from (the pinned key); X3DH itself authenticates the initiator only
through that key.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyvault import labels
from keyvault._codec import lp
from keyvault.errors import BadPrekey, DecryptionFailed
from keyvault.kdf import derive
from keyvault.kem import CIPHERTEXT_LEN, KemKey, KemUse, decapsulate, encapsulate, verify_kem_key
from keyvault.keys import AccountKeys
from keyvault.prekeys import KEY_LEN, SIG_LEN, OneTimePrekey, SignedPrekey, verify_signed_prekey

#: The spec's F for X25519: domain separation from XEdDSA signatures.
F = b"\xff" * 32


@dataclass(frozen=True)
class KemPrekey:
    """The public half of a KEM prekey in a bundle: a one-time one, or the last-resort one."""

    use: KemUse  # KemUse.ONE_TIME or KemUse.LAST_RESORT
    key_id: int
    public: bytes  # ML-KEM-768 public key (1184)
    signature: bytes  # Ed25519 by the identity key (64), see keyvault.kem


@dataclass(frozen=True)
class PrekeyBundle:
    """A device's public prekeys, as the relay hands them to an initiator."""

    identity: bytes  # Ed25519 identity public key of the account (32)
    identity_dh: bytes  # X25519 DH identity public key of the account (32)
    spk_id: int
    spk: bytes  # signed prekey, X25519 public (32)
    spk_sig: bytes  # Ed25519 signature (64), see keyvault.prekeys
    opk_id: int | None = None
    opk: bytes | None = None  # one-time prekey, X25519 public (32), if any were left
    kem: KemPrekey | None = None  # PQXDH's KEM prekey, if the device has published any


@dataclass(frozen=True, repr=False)
class X3DHResult:
    """The output of X3DH: the ratchet's first root key, its header keys and the AD."""

    root_key: bytes
    header_key_send: bytes  # header key of my first sending chain (see module docstring)
    next_header_key_recv: bytes  # header key of the peer's first sending chain
    associated_data: bytes
    ephemeral: bytes  # the initiator's ephemeral public key; b"" for the responder
    kem_ciphertext: bytes = b""  # PQXDH's CT for the initiator to send; b"" otherwise
    post_quantum: bool = False  # SK came from PQXDH (a KEM secret is in it)

    @property
    def initiator(self) -> bool:
        """True if this side started the session (it holds the ephemeral key)."""
        return bool(self.ephemeral)

    def __repr__(self) -> str:
        role = "initiator" if self.initiator else "responder"
        return f"X3DHResult({role}, <secret>)"


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    # ValueError on a malformed key or a low-order point (all-zero shared secret).
    return private.exchange(X25519PublicKey.from_public_bytes(bytes(public)))


def _kdf(dhs: list[bytes], kem_secret: bytes | None = None) -> bytes:
    if kem_secret is None:
        info, ikm = labels.X3DH_SK, F + b"".join(dhs)
    else:
        info, ikm = labels.PQXDH_SK, F + b"".join(dhs) + kem_secret
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=bytes(32), info=info).derive(ikm)


def associated_data(
    initiator_dh: bytes,
    responder_dh: bytes,
    initiator_name: str,
    initiator_device: bytes,
    responder_name: str,
    responder_device: bytes,
) -> bytes:
    """Return the X3DH associated data (layout in the module docstring)."""
    if len(initiator_dh) != KEY_LEN or len(responder_dh) != KEY_LEN:
        raise ValueError("identity keys are 32 bytes")
    return (
        labels.X3DH_AD
        + bytes(initiator_dh)
        + bytes(responder_dh)
        + lp(initiator_name.encode("utf-8"))
        + lp(bytes(initiator_device))
        + lp(responder_name.encode("utf-8"))
        + lp(bytes(responder_device))
    )


def _split(sk: bytes) -> tuple[bytes, bytes, bytes]:
    return (
        derive(sk, labels.X3DH_ROOT),
        derive(sk, labels.X3DH_HEADER_A),
        derive(sk, labels.X3DH_HEADER_B),
    )


def _check_bundle(bundle: PrekeyBundle, device_id: bytes) -> None:
    ok = (
        isinstance(bundle.identity, bytes)
        and isinstance(bundle.identity_dh, bytes)
        and isinstance(bundle.spk, bytes)
        and isinstance(bundle.spk_sig, bytes)
        and len(bundle.identity) == KEY_LEN
        and len(bundle.identity_dh) == KEY_LEN
        and len(bundle.spk) == KEY_LEN
        and len(bundle.spk_sig) == SIG_LEN
        and (bundle.opk is None) == (bundle.opk_id is None)
        and (bundle.opk is None or (isinstance(bundle.opk, bytes) and len(bundle.opk) == KEY_LEN))
    )
    if not ok:
        raise BadPrekey("The contact's prekey bundle is malformed.")
    if not verify_signed_prekey(bundle.identity, bundle.spk_id, bundle.spk, bundle.spk_sig):
        raise BadPrekey("The contact's signed prekey does not carry a valid signature.")
    kem = bundle.kem
    if kem is not None and (
        kem.use not in (KemUse.ONE_TIME, KemUse.LAST_RESORT)
        or not verify_kem_key(bundle.identity, kem.use, kem.key_id, kem.public, kem.signature, device_id=device_id)
    ):
        raise BadPrekey("The contact's post-quantum prekey does not carry a valid signature.")


def initiate(
    me: AccountKeys,
    bundle: PrekeyBundle,
    *,
    me_name: str,
    me_device: bytes,
    them_name: str,
    them_device: bytes,
    ephemeral_private: bytes | None = None,
    kem_encapsulation: tuple[bytes, bytes] | None = None,
) -> X3DHResult:
    """Run X3DH as the initiator against ``bundle`` (BadPrekey if it does not verify);
    PQXDH when the bundle holds a KEM prekey.

    ``ephemeral_private`` (tests only) fixes EK_A; otherwise it is fresh.
    ``kem_encapsulation`` (tests only) fixes (SS, CT); otherwise it is fresh.
    """
    _check_bundle(bundle, them_device)
    if ephemeral_private is None:
        ephemeral_private = secrets.token_bytes(KEY_LEN)
    if len(ephemeral_private) != KEY_LEN:
        raise ValueError("an X25519 private key is 32 bytes")
    ek = X25519PrivateKey.from_private_bytes(bytes(ephemeral_private))
    try:
        dhs = [
            _dh(me.dh_private, bundle.spk),
            _dh(ek, bundle.identity_dh),
            _dh(ek, bundle.spk),
        ]
        if bundle.opk is not None:
            dhs.append(_dh(ek, bundle.opk))
    except ValueError:
        raise BadPrekey("The contact's prekey bundle holds an invalid key.") from None
    kem_secret, kem_ciphertext = None, b""
    if bundle.kem is not None:
        kem_secret, kem_ciphertext = kem_encapsulation or encapsulate(bundle.kem.public)
    root, hka, nhkb = _split(_kdf(dhs, kem_secret))
    ad = associated_data(
        me.public().dh, bundle.identity_dh, me_name, me_device, them_name, them_device
    )
    return X3DHResult(
        root_key=root,
        header_key_send=hka,
        next_header_key_recv=nhkb,
        associated_data=ad,
        ephemeral=ek.public_key().public_bytes_raw(),
        kem_ciphertext=kem_ciphertext,
        post_quantum=kem_secret is not None,
    )


def respond(
    me: AccountKeys,
    spk: SignedPrekey,
    opk: OneTimePrekey | None,
    *,
    their_identity_dh: bytes,
    their_ephemeral: bytes,
    me_name: str,
    me_device: bytes,
    them_name: str,
    them_device: bytes,
    kem: KemKey | None = None,
    kem_ciphertext: bytes | None = None,
) -> X3DHResult:
    """Run X3DH as the responder, with the prekeys the initiator named; PQXDH when the
    first message named a KEM prekey (``kem``, with the ``kem_ciphertext`` it carried).

    DecryptionFailed if the initiator's keys are malformed. The caller deletes ``opk`` (and
    a one-time ``kem``) from its store once the first message has been decrypted (and not
    before, so that a forged first message cannot burn it).
    """
    if (kem is None) != (kem_ciphertext is None):
        raise ValueError("kem and kem_ciphertext go together")
    if kem is not None and kem.use not in (KemUse.ONE_TIME, KemUse.LAST_RESORT):
        raise ValueError("PQXDH uses a one-time or the last-resort KEM prekey")
    if len(their_identity_dh) != KEY_LEN or len(their_ephemeral) != KEY_LEN:
        raise DecryptionFailed("The first message of this session is malformed.")
    spk_private = X25519PrivateKey.from_private_bytes(spk.private)
    try:
        dhs = [
            _dh(spk_private, their_identity_dh),
            _dh(me.dh_private, their_ephemeral),
            _dh(spk_private, their_ephemeral),
        ]
        if opk is not None:
            dhs.append(_dh(X25519PrivateKey.from_private_bytes(opk.private), their_ephemeral))
    except ValueError:
        raise DecryptionFailed("The first message of this session holds an invalid key.") from None
    kem_secret = None
    if kem is not None and kem_ciphertext is not None:
        if len(kem_ciphertext) != CIPHERTEXT_LEN:
            raise DecryptionFailed("The first message of this session is malformed.")
        kem_secret = decapsulate(kem.seed, kem_ciphertext)
    root, hka, nhkb = _split(_kdf(dhs, kem_secret))
    ad = associated_data(
        their_identity_dh, me.public().dh, them_name, them_device, me_name, me_device
    )
    return X3DHResult(
        root_key=root,
        header_key_send=nhkb,
        next_header_key_recv=hka,
        associated_data=ad,
        ephemeral=b"",
        post_quantum=kem_secret is not None,
    )
