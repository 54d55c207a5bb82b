"""Password hashing (Argon2id) and key derivation (HKDF-SHA256).

One Argon2id call turns the password into a 32-byte master key; HKDF with a distinct label
per purpose then derives independent keys from it, so learning one derived key (say the auth
seed, whose public half the relay holds) says nothing about another (the bundle-wrap key).
"""

from __future__ import annotations

import secrets
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

from argon2.exceptions import HashingError
from argon2.low_level import Type, hash_secret_raw
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyvault import labels
from keyvault.errors import BadKey

SALT_LEN = 16
MIN_SALT_LEN = 8  # Argon2's own minimum; salts we make are always SALT_LEN
KEY_LEN = 32
MAX_MEMORY_KIB = 1_048_576  # 1 GiB: beyond this a hostile relay could exhaust a client


def _int(value: object) -> int:
    # bool is an int subclass; True as a cost parameter is a malformation, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadKey("The key-derivation parameters are malformed.")
    return value


@dataclass(frozen=True)
class KdfParams:
    """Argon2id cost parameters, stored beside each salt so they can be raised later."""

    time_cost: int
    memory_kib: int
    parallelism: int

    def to_dict(self) -> dict[str, int]:
        """Return the parameters as a JSON-friendly dict with keys "t", "m", "p"."""
        return {"t": self.time_cost, "m": self.memory_kib, "p": self.parallelism}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> KdfParams:
        """Parse and validate parameters (they come from the relay, so they are untrusted)."""
        if not isinstance(d, Mapping) or set(d) != {"t", "m", "p"}:
            raise BadKey("The key-derivation parameters are malformed.")
        params = cls(_int(d["t"]), _int(d["m"]), _int(d["p"]))
        params.check()
        return params

    def check(self) -> None:
        """Raise BadKey unless the parameters are within sane bounds."""
        ok = (
            1 <= self.time_cost <= 10
            and 1 <= self.parallelism <= 16
            and 8 * self.parallelism <= self.memory_kib <= MAX_MEMORY_KIB
        )
        if not ok:
            raise BadKey("The key-derivation parameters are out of range.")


#: RFC 9106 second recommended option: t=3, m=64 MiB, p=4.
DEFAULT_KDF = KdfParams(time_cost=3, memory_kib=65536, parallelism=4)
#: WEAK: for tests and the simulation only, never for a real account.
TEST_KDF = KdfParams(time_cost=1, memory_kib=8192, parallelism=1)


@dataclass(frozen=True)
class PasswordKeys:
    """The two keys derived from one password (or recovery code)."""

    wrap_key: bytes
    auth_seed: bytes

    def __repr__(self) -> str:
        # Keep secrets out of tracebacks and logs.
        return "PasswordKeys(<secret>)"


def new_salt() -> bytes:
    """Return a fresh random salt of SALT_LEN bytes."""
    return secrets.token_bytes(SALT_LEN)


def master_key(password: str, salt: bytes, params: KdfParams) -> bytes:
    """Derive the 32-byte master key from a password with Argon2id."""
    params.check()
    if len(salt) < MIN_SALT_LEN:
        raise BadKey("The key-derivation salt is too short.")
    # NFC so the same password typed on different systems gives the same key.
    secret = unicodedata.normalize("NFC", password).encode("utf-8")
    try:
        return hash_secret_raw(
            secret=secret,
            salt=bytes(salt),
            time_cost=params.time_cost,
            memory_cost=params.memory_kib,
            parallelism=params.parallelism,
            hash_len=KEY_LEN,
            type=Type.ID,
        )
    except HashingError as exc:  # e.g. memory could not be allocated
        raise BadKey(f"Key derivation failed: {exc}") from None


def derive(key: bytes, label: bytes, length: int = 32) -> bytes:
    """Derive ``length`` bytes from ``key`` for the purpose named by ``label`` (HKDF-SHA256)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=label).derive(key)


def password_keys(password: str, salt: bytes, params: KdfParams) -> PasswordKeys:
    """Derive the bundle-wrap key and the auth seed from a password (one Argon2id call)."""
    mk = master_key(password, salt, params)
    return PasswordKeys(
        wrap_key=derive(mk, labels.BUNDLE_WRAP), auth_seed=derive(mk, labels.AUTH_SEED)
    )


def store_key(password: str, salt: bytes, params: KdfParams) -> bytes:
    """Derive the device store key from the password and the device's own salt."""
    return derive(master_key(password, salt, params), labels.DEVICE_STORE)
