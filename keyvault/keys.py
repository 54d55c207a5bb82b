"""Account key pairs, the password-wrapped key bundle, device signatures and recovery codes."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyvault import labels
from keyvault._codec import Reader, lp
from keyvault._verify import ed25519_verifies
from keyvault.errors import BadKey, BadPassword
from keyvault.kdf import PasswordKeys, derive

RSA_BITS = 3072
RSA_EXPONENT = 65537
KEYS_VERSION = 1
BUNDLE_VERSION = 1
NONCE_LEN = 12
TAG_LEN = 16


def check_rsa_public(key: object) -> rsa.RSAPublicKey:
    """Return ``key`` as an RSA public key if it is RSA-3072 with e=65537, else BadKey."""
    if not isinstance(key, rsa.RSAPublicKey):
        raise BadKey("The encryption key is not an RSA key.")
    if key.key_size != RSA_BITS or key.public_numbers().e != RSA_EXPONENT:
        raise BadKey("The encryption key must be RSA-3072 with exponent 65537.")
    return key


def load_rsa_public(der: bytes) -> rsa.RSAPublicKey:
    """Parse an RSA-3072 SubjectPublicKeyInfo DER key (BadKey if malformed)."""
    try:
        key = serialization.load_der_public_key(bytes(der))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise BadKey("The encryption key is malformed.") from None
    return check_rsa_public(key)


@dataclass(frozen=True)
class PublicKeys:
    """An account's public keys, as published through the relay."""

    enc: bytes  # RSA-3072 SubjectPublicKeyInfo DER
    identity: bytes  # Ed25519 raw, 32 bytes
    dh: bytes  # X25519 raw, 32 bytes

    def validate(self) -> None:
        """Raise BadKey if any of the keys is malformed or of the wrong kind."""
        if not all(isinstance(k, bytes) for k in (self.enc, self.identity, self.dh)):
            raise BadKey("The account's public keys are malformed.")
        load_rsa_public(self.enc)
        if len(self.identity) != 32 or len(self.dh) != 32:
            raise BadKey("The account's identity keys have the wrong length.")
        try:
            Ed25519PublicKey.from_public_bytes(self.identity)
            X25519PublicKey.from_public_bytes(self.dh)
        except ValueError:
            raise BadKey("The account's identity keys are malformed.") from None


class AccountKeys:
    """An account's private keys, parsed once so that bulk decryption does not re-parse DER."""

    def __init__(
        self,
        rsa_private: rsa.RSAPrivateKey,
        identity_private: Ed25519PrivateKey,
        dh_private: X25519PrivateKey,
    ) -> None:
        self._rsa = rsa_private
        self._identity = identity_private
        self._dh = dh_private
        check_rsa_public(rsa_private.public_key())
        self._public: PublicKeys | None = None

    def __repr__(self) -> str:
        # Never show private material; the identity key is enough to tell accounts apart.
        return f"AccountKeys(identity={self.public().identity.hex()})"

    @classmethod
    def generate(cls) -> AccountKeys:
        """Generate a new account's key pairs (slow: RSA-3072 takes up to a few 100 ms)."""
        return cls(
            rsa.generate_private_key(public_exponent=RSA_EXPONENT, key_size=RSA_BITS),
            Ed25519PrivateKey.generate(),
            X25519PrivateKey.generate(),
        )

    @property
    def rsa_private(self) -> rsa.RSAPrivateKey:
        """The RSA-3072 private key that opens sealed envelopes."""
        return self._rsa

    @property
    def identity_private(self) -> Ed25519PrivateKey:
        """The Ed25519 identity private key (signs envelopes, devices and prekeys)."""
        return self._identity

    @property
    def identity_seed(self) -> bytes:
        """The raw 32-byte Ed25519 identity private key."""
        return self._identity.private_bytes_raw()

    @property
    def dh_private(self) -> X25519PrivateKey:
        """The X25519 DH identity private key (X3DH)."""
        return self._dh

    def public(self) -> PublicKeys:
        """Return the account's public keys (computed once)."""
        if self._public is None:
            self._public = PublicKeys(
                enc=self._rsa.public_key().public_bytes(
                    serialization.Encoding.DER,
                    serialization.PublicFormat.SubjectPublicKeyInfo,
                ),
                identity=self._identity.public_key().public_bytes_raw(),
                dh=self._dh.public_key().public_bytes_raw(),
            )
        return self._public

    def to_bytes(self) -> bytes:
        """Serialise the private keys (version 1, then length-prefixed fields). Secret!"""
        der = self._rsa.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return (
            bytes([KEYS_VERSION])
            + lp(der)
            + lp(self._identity.private_bytes_raw())
            + lp(self._dh.private_bytes_raw())
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> AccountKeys:
        """Parse keys serialised by `to_bytes` (BadKey on any malformation)."""
        try:
            r = Reader(data)
            if r.take(1) != bytes([KEYS_VERSION]):
                raise ValueError("version")
            der, ed, x = r.lp(), r.lp(), r.lp()
            r.end()
            if len(ed) != 32 or len(x) != 32:
                raise ValueError("length")
            rsa_key = serialization.load_der_private_key(der, password=None)
            if not isinstance(rsa_key, rsa.RSAPrivateKey):
                raise ValueError("not RSA")
            return cls(
                rsa_key,
                Ed25519PrivateKey.from_private_bytes(ed),
                X25519PrivateKey.from_private_bytes(x),
            )
        except (ValueError, TypeError, UnsupportedAlgorithm, BadKey):
            raise BadKey("The account key bundle is malformed.") from None


def _bundle_aad(username: str) -> bytes:
    # The username is bound in so a relay cannot hand one account's bundle to another login.
    return labels.BUNDLE_AAD + username.encode("utf-8")


def wrap_bundle(
    keys: AccountKeys, wrap_key: bytes, username: str, *, nonce: bytes | None = None
) -> bytes:
    """Encrypt the account's private keys under ``wrap_key`` (AES-256-GCM)."""
    if nonce is None:
        nonce = secrets.token_bytes(NONCE_LEN)
    if len(nonce) != NONCE_LEN:
        raise ValueError("nonce must be 12 bytes")
    ct = AESGCM(wrap_key).encrypt(nonce, keys.to_bytes(), _bundle_aad(username))
    return bytes([BUNDLE_VERSION]) + nonce + ct


def unwrap_bundle(blob: bytes, wrap_key: bytes, username: str) -> AccountKeys:
    """Decrypt a key bundle; BadPassword if the key is wrong or the blob is damaged."""
    try:
        if len(blob) < 1 + NONCE_LEN + TAG_LEN or blob[0] != BUNDLE_VERSION:
            raise ValueError("malformed")
        nonce, ct = blob[1 : 1 + NONCE_LEN], blob[1 + NONCE_LEN :]
        plain = AESGCM(wrap_key).decrypt(nonce, ct, _bundle_aad(username))
        return AccountKeys.from_bytes(plain)
    except (ValueError, TypeError, InvalidTag, BadKey):
        raise BadPassword() from None


def _device_message(username: str, device_id: bytes) -> bytes:
    return labels.DEVICE_SIGNATURE + lp(username.encode("utf-8")) + lp(bytes(device_id))


def sign_device(keys: AccountKeys, username: str, device_id: bytes) -> bytes:
    """Sign a device id with the account identity key, admitting it to the account."""
    return keys.identity_private.sign(_device_message(username, device_id))


def verify_device(
    identity_public: bytes, username: str, device_id: bytes, signature: bytes
) -> bool:
    """Return True if the account identity key signed this device; False on any bad input."""
    try:
        message = _device_message(username, device_id)
    except (ValueError, TypeError):
        return False
    return ed25519_verifies(identity_public, signature, message)


# Device names --------------------------------------------------------------------------

LABEL_VERSION = 1
LABEL_BYTES = 64  # a name is padded to this, so its length does not show


def _label_key(keys: AccountKeys) -> bytes:
    return derive(keys.identity_seed, labels.DEVICE_LABEL)


def _label_aad(username: str, device_id: bytes) -> bytes:
    return labels.DEVICE_LABEL + lp(username.encode("utf-8")) + lp(bytes(device_id))


def seal_device_label(
    keys: AccountKeys, username: str, device_id: bytes, name: str, *, nonce: bytes | None = None
) -> bytes:
    """Encrypt a device's name for the account's devices (the relay stores it unread).
    ``name`` is at most LABEL_BYTES of UTF-8 with no NUL; ValueError otherwise."""
    data = name.encode("utf-8")
    if not data or len(data) > LABEL_BYTES or b"\0" in data:
        raise ValueError(f"a device name is 1 to {LABEL_BYTES} bytes of text")
    if nonce is None:
        nonce = secrets.token_bytes(NONCE_LEN)
    ct = AESGCM(_label_key(keys)).encrypt(
        nonce, data.ljust(LABEL_BYTES, b"\0"), _label_aad(username, device_id)
    )
    return bytes([LABEL_VERSION]) + nonce + ct


def open_device_label(keys: AccountKeys, username: str, device_id: bytes, blob: bytes) -> str | None:
    """The name in a label sealed by ``seal_device_label`` for this device; None if it
    does not open (made by someone without the account's keys, or for another device)."""
    try:
        if len(blob) != 1 + NONCE_LEN + LABEL_BYTES + TAG_LEN or blob[0] != LABEL_VERSION:
            return None
        plain = AESGCM(_label_key(keys)).decrypt(
            blob[1 : 1 + NONCE_LEN], blob[1 + NONCE_LEN :], _label_aad(username, device_id)
        )
        return plain.rstrip(b"\0").decode("utf-8")
    except (InvalidTag, UnicodeDecodeError, ValueError):
        return None


def _account_keys_message(username: str, enc: bytes, dh: bytes) -> bytes:
    return labels.ACCOUNT_KEYS_SIGNATURE + lp(username.encode("utf-8")) + lp(bytes(enc)) + lp(bytes(dh))


def sign_account_keys(keys: AccountKeys, username: str) -> bytes:
    """Sign the account's RSA and X25519 public keys with its identity key."""
    pub = keys.public()
    return keys.identity_private.sign(_account_keys_message(username, pub.enc, pub.dh))


def verify_account_keys(
    identity_public: bytes, username: str, enc: bytes, dh: bytes, signature: bytes
) -> bool:
    """Return True if the identity key vouches for these keys; False on any bad input."""
    try:
        message = _account_keys_message(username, enc, dh)
    except (ValueError, TypeError):
        return False
    return ed25519_verifies(identity_public, signature, message)


# Recovery codes ---------------------------------------------------------------------------

RECOVERY_CODE_BYTES = 16
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE = {c: i for i, c in enumerate(_CROCKFORD)} | {"O": 0, "I": 1, "L": 1}
_CODE_CHARS = -(-RECOVERY_CODE_BYTES * 8 // 5)  # 26 characters for 128 bits
_PAD_BITS = _CODE_CHARS * 5 - RECOVERY_CODE_BYTES * 8  # 2 zero bits at the end
_GROUP = 4


def new_recovery_code(*, code: bytes | None = None) -> str:
    """Return a new recovery code (128 random bits) as Crockford base32 in dashed groups."""
    if code is None:
        code = secrets.token_bytes(RECOVERY_CODE_BYTES)
    if len(code) != RECOVERY_CODE_BYTES:
        raise ValueError("recovery code must be 16 bytes")
    value = int.from_bytes(code, "big") << _PAD_BITS
    chars = "".join(
        _CROCKFORD[(value >> (5 * (_CODE_CHARS - 1 - i))) & 31] for i in range(_CODE_CHARS)
    )
    return "-".join(chars[i : i + _GROUP] for i in range(0, _CODE_CHARS, _GROUP))


def parse_recovery_code(text: str) -> bytes:
    """Parse a recovery code as typed (any case, spaces and dashes ignored, O=0, I=L=1)."""
    cleaned = "".join(c for c in text.upper() if c not in " -\t\r\n")
    if len(cleaned) != _CODE_CHARS or any(c not in _DECODE for c in cleaned):
        raise BadPassword("That is not a valid recovery code (26 letters and digits).")
    value = 0
    for c in cleaned:
        value = (value << 5) | _DECODE[c]
    if value & ((1 << _PAD_BITS) - 1):
        # The final character can only take 8 of 32 values; anything else is a typo.
        raise BadPassword("That is not a valid recovery code; check the last group.")
    return (value >> _PAD_BITS).to_bytes(RECOVERY_CODE_BYTES, "big")


def recovery_keys(code: bytes) -> PasswordKeys:
    """Derive the wrap key and auth seed from a recovery code (128 bits: no Argon2 needed)."""
    if len(code) != RECOVERY_CODE_BYTES:
        raise BadPassword("That is not a valid recovery code.")
    return PasswordKeys(
        wrap_key=derive(code, labels.RECOVERY_WRAP), auth_seed=derive(code, labels.RECOVERY_AUTH)
    )
