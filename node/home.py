"""A device's home directory: ``device.json`` (nothing secret), ``store.db`` (encrypted)
and ``lock``.

``device.json`` holds what is needed before the store can be opened: the account name,
the relay address (and the SOCKS proxy it is reached through, if any; for a private onion
relay the address carries its client key, ``#client=...``, and tor's control port to hand
it to, if any: the file is 0600), this device's id,
and the salt and Argon2id parameters from which the store key is derived with the master
password.

One process at a time uses a home: two processes on one device would split its live
messages between them and race on its ratchet sessions. ``Home.hold`` takes an exclusive
``flock`` on ``lock`` (released by the kernel when the process ends, however it ends) and
writes into it which command holds it, so a second process can say what is in the way.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from keyvault.kdf import KdfParams
from node.errors import HomeInUse, HomeNotPrivate

CONFIG_FILE = "device.json"
STORE_FILE = "store.db"
LOCK_FILE = "lock"
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
    # tor's control port (HOST:PORT or a socket path), to hand it a private onion relay's
    # client key (the relay address ends in #client=KEY; node/onion_auth.py)
    tor_control: str | None = None
    store_salt_next: str | None = None  # hex: set only while the store is being re-keyed
    insecure: bool = False  # plain ws:// to a relay off loopback was asked for (--insecure-no-tls)

    @property
    def kdf_params(self) -> KdfParams:
        return KdfParams.from_dict(self.kdf)


class Home:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None

    # ---- one process per home -------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def held(self) -> bool:
        return self._lock_fd is not None

    def hold(self, what: str) -> None:
        """Take this home for this process (``what``: the command, for others to read);
        HomeInUse, naming the holder, if another process has it. Idempotent."""
        if self._lock_fd is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._check_private()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        if os.fstat(fd).st_uid != os.getuid():
            os.close(fd)
            raise HomeNotPrivate(f"{self.lock_path} belongs to another user: this home is not safe to use")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise HomeInUse(self.path, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
        self._lock_fd = fd

    def _check_private(self) -> None:
        """The home must be a directory of this user that nobody else can enter: another
        user who could write in it could plant its lock or its control socket. One of
        ours that is too open is closed to 0700 if it is empty or a Veil home already
        (made by hand, say); any other directory is refused rather than changed."""
        st = os.stat(self.path)
        if not stat.S_ISDIR(st.st_mode):
            raise HomeNotPrivate(f"{self.path} is not a directory")
        if st.st_uid != os.getuid():
            raise HomeNotPrivate(f"{self.path} belongs to another user: use a home of your own")
        if st.st_mode & 0o077:
            entries = {p.name for p in self.path.iterdir()}
            if entries - {LOCK_FILE} and CONFIG_FILE not in entries:
                raise HomeNotPrivate(
                    f"{self.path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}) and is not"
                    " a Veil home: use a new directory, or make this one private (chmod 700)"
                )
            os.chmod(self.path, 0o700)

    def release(self) -> None:
        """Let other processes use this home again."""
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)  # closing the descriptor drops the flock

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

    def wipe(self) -> None:
        """Remove this device's account from the home (after it left its account), so
        that the home can be set up again; the lock file stays, held."""
        self.discard()
        try:
            (self.path / "chat-history").unlink()  # an older veil chat's input history
        except FileNotFoundError:
            pass

    def discard(self) -> None:
        """Remove a half-created home (after a failed register or login)."""
        for name in (CONFIG_FILE, STORE_FILE, STORE_FILE + "-wal", STORE_FILE + "-shm"):
            try:
                (self.path / name).unlink()
            except FileNotFoundError:
                pass
