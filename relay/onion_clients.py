"""The clients of a private onion relay: Tor v3 client authorization keys, and where they live.

A private onion relay (``veil relay serve --onion --private``) publishes its onion service
with one ``ClientAuthV3`` key per client: tor encrypts the service's descriptor to those
x25519 public keys, so only a holder of one of the private keys can learn how to reach the
service. The relay keeps the public keys only, one file per client in
``DATA_DIR/onion_clients/`` (directory 0700, files 0600)::

    {"id": "3f9a0c1e", "label": "alice's laptop", "added": "2026-12-02",
     "x25519_public": "<52 upper-case base32 letters>"}

The directory's existence marks the data directory as private: a relay started on it
without ``--private`` refuses to publish (``require_private``), so a restart cannot
silently make the service public. The private key leaves ``veil relay invite
--new-client`` once, inside the link it prints, and is stored nowhere by the relay.

Key formats (docs: PROTOCOL, "private onion relays"): the 32-byte x25519 private key is
lower-case base32 without padding in a link (``#client=...``, 52 letters), upper-case
base32 in tor's ``.auth_private`` files, and base64 for the control port's
``ONION_CLIENT_AUTH_ADD``. The public key is upper-case base32 for ADD_ONION.

Also here, without I/O: the onion address of an ED25519-V3 key as ADD_ONION returns it
(rend-spec-v3, section 6: ``base32(pubkey || checksum || 0x03)``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

CLIENTS_DIR = "onion_clients"
SUFFIX = ".client"
LABEL_MAX = 64
_ID = re.compile(r"[0-9a-f]{8}")
_B32_KEY = re.compile(r"[A-Z2-7]{52}")
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


class ClientError(Exception):
    """A problem with the client directory or a client key, in one line for the operator."""


# ---- key formats --------------------------------------------------------------------------


def b32(data: bytes) -> str:
    """Upper-case base32 without padding, as tor writes keys."""
    return base64.b32encode(data).decode().rstrip("=")


@dataclass(frozen=True)
class ClientKeyPair:
    private: bytes  # 32 bytes, x25519
    public: bytes  # 32 bytes

    @classmethod
    def generate(cls) -> ClientKeyPair:
        key = X25519PrivateKey.generate()
        return cls(
            key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
            key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
        )

    @property
    def private_link(self) -> str:
        """The private key as a link carries it: lower-case base32, no padding (52 letters)."""
        return b32(self.private).lower()

    @property
    def public_tor(self) -> str:
        """The public key as ADD_ONION's ClientAuthV3 takes it: upper-case base32 (52 letters)."""
        return b32(self.public)


def throwaway_public_key() -> str:
    """A client key nobody holds (its private half is dropped at once): what a private
    relay without clients publishes with, so its descriptor opens for no one."""
    return ClientKeyPair.generate().public_tor


# ---- the onion address of an ED25519-V3 key ----------------------------------------------

# Ed25519 arithmetic (RFC 8032, section 5.1), only what it takes to get the public key of
# tor's expanded secret key: cryptography derives public keys from seeds only, and tor's
# ADD_ONION key is the expanded form (clamped scalar || prefix), without the seed.
_P = 2**255 - 19
_D = -121665 * pow(121666, _P - 2, _P) % _P
_BASE = (
    15112221349535400772501151409588531511454012693041857206046113283949847762202,
    46316835694926478169428394003475163141307993866256225615783033603165251855960,
)
_Point = tuple[int, int, int, int]  # extended coordinates (X, Y, Z, T)


def _add(p: _Point, q: _Point) -> _Point:
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % _P
    b = (y1 + x1) * (y2 + x2) % _P
    c = 2 * t1 * t2 * _D % _P
    d = 2 * z1 * z2 % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _public_point(scalar: int) -> bytes:
    q: _Point = (0, 1, 1, 0)
    p: _Point = (_BASE[0], _BASE[1], 1, _BASE[0] * _BASE[1] % _P)
    while scalar:
        if scalar & 1:
            q = _add(q, p)
        p = _add(p, p)
        scalar >>= 1
    x, y, z, _ = q
    zi = pow(z, _P - 2, _P)
    x, y = x * zi % _P, y * zi % _P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def public_key_of_expanded(expanded: bytes) -> bytes:
    """The Ed25519 public key of a 64-byte expanded secret key (tor's ED25519-V3 blob)."""
    if len(expanded) != 64:
        raise ClientError("an ED25519-V3 onion key is 64 bytes")
    return _public_point(int.from_bytes(expanded[:32], "little"))


def onion_address_of_public_key(public: bytes) -> str:
    """rend-spec-v3 section 6: base32(pubkey || SHA3-256(".onion checksum" || pubkey || 3)[:2] || 3)."""
    version = b"\x03"
    checksum = hashlib.sha3_256(b".onion checksum" + public + version).digest()[:2]
    return b32(public + checksum + version).lower()


def service_id_of_key(key_blob: str) -> str:
    """The 56-letter service id (no ``.onion``) of the base64 ED25519-V3 key in ``onion.key``."""
    try:
        expanded = base64.b64decode(key_blob, validate=True)
    except ValueError:
        raise ClientError("the onion key is not base64") from None
    return onion_address_of_public_key(public_key_of_expanded(expanded))


# ---- the client directory -----------------------------------------------------------------


@dataclass(frozen=True)
class OnionClient:
    id: str  # 8 hex digits
    label: str
    added: str  # YYYY-MM-DD: a day, no finer
    public: str  # upper-case base32 x25519 public key
    expires: str | None = None  # YYYY-MM-DD (UTC): the first day the key no longer works

    def expired(self, today: str | None = None) -> bool:
        return self.expires is not None and (today or utc_day()) >= self.expires


def utc_day(offset_days: int = 0) -> str:
    return (datetime.now(UTC) + timedelta(days=offset_days)).strftime("%Y-%m-%d")


def live(clients: Iterable[OnionClient], today: str | None = None) -> list[OnionClient]:
    """The clients whose keys work today (not expired)."""
    return [c for c in clients if not c.expired(today)]


def clients_dir(data_dir: Path) -> Path:
    return data_dir / CLIENTS_DIR


def is_private(data_dir: Path) -> bool:
    """A data directory with a client directory belongs to a private onion relay."""
    return clients_dir(data_dir).is_dir()


def require_private(data_dir: Path, private: bool) -> None:
    """Refuse to publish a private relay's service without client authorization."""
    if not private and is_private(data_dir):
        raise ClientError(
            f"{data_dir} belongs to a private onion relay ({clients_dir(data_dir)} exists): start it with"
            " --private, or remove that directory to make its onion service public"
        )


def ensure_dir(data_dir: Path) -> Path:
    """The client directory (0700), made if missing: from then on the relay is private."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = clients_dir(data_dir)
    path.mkdir(exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def clean_label(label: str) -> str:
    text = " ".join(label.split())
    if not text.isprintable() or len(text) > LABEL_MAX:
        raise ClientError(f"a client label is at most {LABEL_MAX} printable characters")
    return text


def read_clients(data_dir: Path) -> list[OnionClient]:
    """Every client in the directory, oldest first (none if there is no directory)."""
    path = clients_dir(data_dir)
    try:
        files = sorted(p for p in path.iterdir() if p.name.endswith(SUFFIX))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ClientError(f"cannot read the client directory {path}: {exc.strerror}") from None
    clients = []
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
            expires = data.get("expires")
            client = OnionClient(str(data["id"]), str(data["label"]), str(data["added"]), str(data["x25519_public"]),
                                 None if expires is None else str(expires))
            if client.expires is not None and not _DAY.fullmatch(client.expires):
                raise ValueError(client.expires)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ClientError(f"{f} is not a client file (id, label, added, x25519_public, expires)") from None
        if not _ID.fullmatch(client.id) or f.name != client.id + SUFFIX or not _B32_KEY.fullmatch(client.public):
            raise ClientError(f"{f} does not hold a well-formed client (8 hex digit id, 52 base32 letters key)")
        clients.append(client)
    clients.sort(key=lambda c: (c.added, c.id))
    return clients


def public_keys(clients: Iterable[OnionClient]) -> frozenset[str]:
    return frozenset(c.public for c in clients)


def add_client(
    data_dir: Path, label: str, public: bytes, *, today: str | None = None, expires: str | None = None,
) -> OnionClient:
    """Store a new client's public key (file 0600, written whole or not at all); with
    ``expires`` (YYYY-MM-DD), the first day it no longer works."""
    path = ensure_dir(data_dir)
    existing = {c.id for c in read_clients(data_dir)}
    client_id = secrets.token_hex(4)
    while client_id in existing:
        client_id = secrets.token_hex(4)
    day = today or datetime.now(UTC).strftime("%Y-%m-%d")
    client = OnionClient(client_id, clean_label(label), day, b32(public), expires)
    record: dict[str, str] = {"id": client.id, "label": client.label, "added": client.added,
                              "x25519_public": client.public}
    if expires is not None:
        record["expires"] = expires
    text = json.dumps(record) + "\n"
    final = path / (client.id + SUFFIX)
    tmp = path / (client.id + ".tmp")
    with suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return client


def remove_client(data_dir: Path, client_id: str) -> OnionClient:
    """Delete a client's file; ClientError if there is no such client."""
    wanted = client_id.strip().lower()
    for client in read_clients(data_dir):
        if client.id == wanted:
            (clients_dir(data_dir) / (client.id + SUFFIX)).unlink()
            return client
    raise ClientError(f"no client {client_id!r} on this relay (`veil relay clients` lists them)")
