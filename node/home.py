"""A device's home directory: ``device.json`` (nothing secret) and ``store.db`` (encrypted).

``device.json`` holds what is needed before the store can be opened: the account name,
the relay address (and the SOCKS proxy it is reached through, if any), this device's id,
and the salt and Argon2id parameters from which the store key is derived with the master
password.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from keyvault.kdf import KdfParams

CONFIG_FILE = "device.json"
STORE_FILE = "store.db"
FORMAT = 1


@dataclass
class HomeConfig:
    username: str
    relay: str
    device_id: str  # hex
    store_salt: str  # hex
    kdf: dict[str, int]
    format: int = FORMAT
    socks: str | None = None  # HOST:PORT of the SOCKS5 proxy (Tor) the relay is reached through

    @property
    def kdf_params(self) -> KdfParams:
        return KdfParams.from_dict(self.kdf)


class Home:
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def store_path(self) -> Path:
        return self.path / STORE_FILE

    def exists(self) -> bool:
        return self.config_path.exists()

    def load(self) -> HomeConfig:
        data = json.loads(self.config_path.read_text())
        return HomeConfig(**data)

    def save(self, config: HomeConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.config_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(config), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.config_path)

    def discard(self) -> None:
        """Remove a half-created home (after a failed register or login)."""
        for name in (CONFIG_FILE, STORE_FILE, STORE_FILE + "-wal", STORE_FILE + "-shm"):
            try:
                (self.path / name).unlink()
            except FileNotFoundError:
                pass
