"""The relay's own secret: one 256-bit key, from which every relay key is derived.

Kept in ``DATA_DIR/relay.key`` (created mode 0600 on first start) or given as 64 hex
digits in ``VEIL_RELAY_KEY``. Losing it makes the database unreadable.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from keyvault import labels
from keyvault.kdf import derive

KEY_FILE = "relay.key"
ENV_KEY = "VEIL_RELAY_KEY"


class RelayKeyError(Exception):
    """The relay key is missing, malformed or unreadable."""


@dataclass(frozen=True)
class RelayKeys:
    db_key: bytes  # SQLCipher key of the relay database
    name_mac_key: bytes  # HMAC key: account names are stored only as HMAC(name)
    fake_salt_key: bytes  # answers auth_params for names that do not exist
    column_key: bytes  # AES-SIV (64 bytes): columns a PostgreSQL store encrypts (relay.pgstore)
    key_check: bytes  # recorded by a PostgreSQL store: a process with another key refuses

    @classmethod
    def from_root(cls, root: bytes) -> RelayKeys:
        return cls(
            db_key=derive(root, labels.RELAY_DB_KEY),
            name_mac_key=derive(root, labels.RELAY_NAME_HMAC),
            fake_salt_key=derive(root, labels.RELAY_FAKE_SALT),
            column_key=derive(root, labels.RELAY_COLUMN_KEY, 64),
            key_check=derive(root, labels.RELAY_KEY_CHECK),
        )


def _read_key_file(path: Path) -> bytes:
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise RelayKeyError(f"cannot read {path}: {exc.strerror}") from None
    if len(key) != 32:
        raise RelayKeyError(f"{path} is not a relay key (expected 32 bytes)")
    return key


def load_root_key(data_dir: Path) -> bytes:
    """The root key from the environment, or the key file (created if absent)."""
    env = os.environ.get(ENV_KEY)
    if env:
        try:
            key = bytes.fromhex(env.strip())
        except ValueError:
            key = b""
        if len(key) != 32:
            raise RelayKeyError(f"{ENV_KEY} must be 64 hexadecimal digits")
        return key
    path = data_dir / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key_file(path)
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key
