"""A private onion relay without tor: key formats, the onion address of a key, the client
directory, the admin commands beside a running relay, and the node's side of the key.
(Over a real private Tor network: tests/test_tor.py.)"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import stat
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cli.device import relay_address
from cli.errors import CliError
from node.link import shown_address
from node.onion_auth import TorControlError, add_client_auth, key_blob, refused
from relay import onion_clients as oc
from tests.conftest import RelayRunner
from tests.test_cli import RelayProcess, assert_one_line_error, env_for
from tests.test_tor import veil
from wire.address import parse_address, unb32


def expanded_key(seed: bytes) -> bytes:
    """tor's ED25519-V3 secret key: SHA-512 of the seed, the scalar half clamped."""
    h = bytearray(hashlib.sha512(seed).digest())
    h[0] &= 248
    h[31] &= 127
    h[31] |= 64
    return bytes(h)


def write_onion_key(data: Path, seed: bytes) -> None:
    data.mkdir(parents=True, exist_ok=True)
    (data / "onion.key").write_text("ED25519-V3:" + base64.b64encode(expanded_key(seed)).decode() + "\n")
    os.chmod(data / "onion.key", 0o600)


# ---- key formats -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [bytes(32), bytes(range(32)), b"\xff" * 32, os.urandom(32)])
def test_onion_address_of_a_key_matches_cryptography_and_stem(seed: bytes) -> None:
    public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert oc.public_key_of_expanded(expanded_key(seed)) == public
    address = oc.service_id_of_key(base64.b64encode(expanded_key(seed)).decode())
    assert len(address) == 56 and address.endswith("d")  # version 3
    stem_hs = pytest.importorskip("stem.descriptor.hidden_service")
    assert stem_hs.HiddenServiceDescriptorV3.address_from_identity_key(public) == address + ".onion"


def test_rfc8032_vector() -> None:
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    public = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    assert oc.public_key_of_expanded(expanded_key(seed)) == public
    with pytest.raises(oc.ClientError):
        oc.public_key_of_expanded(public)


def test_client_key_formats() -> None:
    pair = oc.ClientKeyPair.generate()
    assert X25519PrivateKey.from_private_bytes(pair.private).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw) == pair.public
    assert len(pair.private_link) == 52 and pair.private_link == pair.private_link.lower()
    assert len(pair.public_tor) == 52 and pair.public_tor == pair.public_tor.upper()
    assert unb32(pair.private_link) == pair.private
    # The control port's form: x25519: and the base64 of the same 32 bytes.
    assert key_blob(pair.private_link) == "x25519:" + base64.b64encode(pair.private).decode()
    with pytest.raises(TorControlError):
        key_blob("A" * 52)  # upper case is tor's file form, not the link's
    # The link parses in the address grammar, and shows without the key.
    link = f"ws://{'a' * 55}d.onion#client={pair.private_link}"
    address = parse_address(link)
    assert address.client_key == pair.private_link and str(address.public) == f"ws://{'a' * 55}d.onion"
    assert relay_address(link) == link
    assert shown_address(link) == f"ws://{'a' * 55}d.onion"
    assert shown_address("ws://127.0.0.1:8765") == "ws://127.0.0.1:8765"
    for bad in (f"ws://relay.example:80#client={pair.private_link}", f"ws://{'a' * 55}d.onion#client=short"):
        with pytest.raises(CliError):
            relay_address(bad)
    assert oc.throwaway_public_key() != oc.throwaway_public_key()


# ---- the client directory --------------------------------------------------------------------


def test_client_directory(tmp_path: Path) -> None:
    data = tmp_path / "relay"
    assert not oc.is_private(data) and oc.read_clients(data) == []
    oc.require_private(data, False)  # a public relay's directory
    one = oc.add_client(data, "alice's  laptop", oc.ClientKeyPair.generate().public, today="2026-12-01")
    two = oc.add_client(data, "bob", oc.ClientKeyPair.generate().public)
    assert oc.is_private(data)
    assert stat.S_IMODE(oc.clients_dir(data).stat().st_mode) == 0o700
    for c in (one, two):
        f = oc.clients_dir(data) / f"{c.id}.client"
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert set(json.loads(f.read_text())) == {"id", "label", "added", "x25519_public"}
    assert one.label == "alice's laptop"
    assert [c.id for c in oc.read_clients(data)] == [one.id, two.id]
    assert oc.public_keys(oc.read_clients(data)) == {one.public, two.public}
    with pytest.raises(oc.ClientError, match="start it with --private"):
        oc.require_private(data, False)
    oc.require_private(data, True)
    assert oc.remove_client(data, one.id.upper()) == one
    assert [c.id for c in oc.read_clients(data)] == [two.id]
    with pytest.raises(oc.ClientError, match="no client"):
        oc.remove_client(data, one.id)
    with pytest.raises(oc.ClientError):
        oc.add_client(data, "x" * 65, oc.ClientKeyPair.generate().public)
    (oc.clients_dir(data) / "bad.client").write_text("{}")
    with pytest.raises(oc.ClientError, match="not a client file"):
        oc.read_clients(data)


# ---- the commands, beside a running relay ----------------------------------------------------


def test_invite_list_revoke_beside_a_running_relay(relay_proc: RelayProcess, tmp_path: Path) -> None:
    data = relay_proc.data_dir
    pid = relay_proc.proc.pid
    assert (data / "relay.lock").read_text().strip() == str(pid)
    seed = os.urandom(32)
    write_onion_key(data, seed)
    service_id = oc.service_id_of_key(base64.b64encode(expanded_key(seed)).decode())

    res = veil(tmp_path, "relay", "invite", "--new-client", "--name", "alice", "--data-dir", str(data))
    link = res.stdout.strip()
    assert res.stdout.count("\n") == 1 and link.startswith(f"ws://{service_id}.onion#client=")
    key = parse_address(link).client_key
    assert key is not None and key not in res.stderr
    assert f"told the running relay (pid {pid})" in res.stderr and "now a private onion relay" in res.stderr
    [client] = oc.read_clients(data)
    assert client.label == "alice"
    # The stored public key is the link's key's public half; the private half is nowhere.
    private = unb32(key)
    assert unb32(client.public) == X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)
    assert not [p for p in data.rglob("*") if p.is_file() and key.encode() in p.read_bytes().lower()]

    qr = veil(tmp_path, "relay", "invite", "--new-client", "--qr", "--data-dir", str(data)).stdout.splitlines()
    assert len(qr) > 10 and qr[-1].startswith(f"ws://{service_id}.onion#client=")
    listed = [json.loads(ln) for ln in veil(tmp_path, "relay", "clients", "--json", "--data-dir", str(data))
              .stdout.splitlines()]
    assert sorted(c["label"] for c in listed) == ["alice", "client"]
    assert all(set(c) == {"id", "label", "added", "expires", "expired"} for c in listed)
    res = veil(tmp_path, "relay", "clients", "revoke", client.id, "--data-dir", str(data))
    assert f"revoked client {client.id} (alice)" in res.stdout and f"pid {pid}" in res.stdout
    res = veil(tmp_path, "relay", "clients", "revoke", client.id, "--data-dir", str(data), check=False)
    assert_one_line_error(res, f"no client '{client.id}'")
    # Two SIGHUPs later the relay (not an onion relay: nothing to reload) still serves.
    assert relay_proc.proc.poll() is None
    assert veil(tmp_path, "relay", "clients", "--data-dir", str(data)).stdout.count("\n") == 1


def test_invite_without_a_running_relay(tmp_path: Path) -> None:
    data = tmp_path / "relay"
    res = veil(tmp_path, "relay", "invite", "--new-client", "--data-dir", str(data), check=False)
    assert_one_line_error(res, "no relay data directory")
    data.mkdir()
    res = veil(tmp_path, "relay", "invite", "--new-client", "--data-dir", str(data), check=False)
    assert_one_line_error(res, "has no onion key yet")
    write_onion_key(data, os.urandom(32))
    res = veil(tmp_path, "relay", "invite", "--new-client", "--data-dir", str(data))
    assert "takes effect when it starts" in res.stderr
    res = veil(tmp_path, "relay", "invite", "--data-dir", str(data), check=False)
    assert_one_line_error(res, "this is a private onion relay: its address alone reaches nothing")


def test_private_serve_options_are_checked_first(tmp_path: Path) -> None:
    data = tmp_path / "relay"
    res = veil(tmp_path, "relay", "serve", "--private", "--port", "0", "--data-dir", str(data), check=False)
    assert_one_line_error(res, "--private goes with --onion")
    oc.add_client(data, "alice", oc.ClientKeyPair.generate().public)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    res = veil(tmp_path, "relay", "serve", "--onion", "--tor-control", f"127.0.0.1:{closed}", "--port", "0",
               "--data-dir", str(data), check=False, env=env_for(tmp_path))
    assert_one_line_error(res, "start it with --private")
    assert not (data / "relay.db").exists()


# ---- the relay ends its connections; the node's side -----------------------------------------


async def test_end_all_closes_every_live_connection(relay: RelayRunner) -> None:
    from node.link import open_link

    assert relay.state is not None
    async with open_link(relay.url) as one, open_link(relay.url) as two:
        with trio.fail_after(10):
            assert relay.state.connections.end_all() == 2
            await one.closed.wait()
            await two.closed.wait()


async def test_add_client_auth_errors_are_one_line_without_the_key() -> None:
    key = oc.ClientKeyPair.generate().private_link
    onion = "a" * 55 + "d.onion"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(TorControlError, match=f"cannot connect to the tor control port at 127.0.0.1:{closed}") as e:
        await add_client_auth(f"127.0.0.1:{closed}", onion, key)
    assert key not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TorControlError, match="not an onion address"):
        await add_client_auth(f"127.0.0.1:{closed}", "relay.example", key)
    with pytest.raises(TorControlError, match="bad tor control address"):
        await add_client_auth("127.0.0.1:x", onion, key)
    with pytest.raises(TorControlError, match="cannot connect"):
        await add_client_auth(str(Path("/nonexistent") / "control"), onion, key)


def test_refusals_say_what_to_do() -> None:
    host = "a" * 55 + "d.onion"
    assert "needs a client key" in str(refused(0xF4, host, has_key=False, control=None))
    no_control = str(refused(0xF4, host, has_key=True, control=None))
    assert "--tor-control" in no_control and f"{host[:-6]}:descriptor:x25519:" in no_control
    assert "same tor" in str(refused(0xF4, host, has_key=True, control="127.0.0.1:9051"))
    assert "wrong, expired, or was revoked" in str(refused(0xF5, host, has_key=True, control="127.0.0.1:9051"))


async def _impostor(protocolinfo: str, received: list[bytes], extra: bytes = b"") -> tuple[trio.SocketListener, int]:
    """A process on the control port in tor's place: answers PROTOCOLINFO as told (and then
    ``extra``), and records everything the node sends it."""

    async def handle(stream: trio.SocketStream) -> None:
        data = b""
        try:
            while chunk := await stream.receive_some(4096):
                data += chunk
                received.append(chunk)
                if b"PROTOCOLINFO" in data and b"\r\n" in data:
                    data = b""
                    await stream.send_all(protocolinfo.encode() + extra)
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    return listeners[0], handle  # type: ignore[return-value]


@pytest.mark.parametrize("case", ["null", "cookie-only", "dev-zero", "too-big", "symlink", "flood"])
async def test_a_process_in_tors_place_gets_neither_the_key_nor_a_file(case: str, tmp_path: Path) -> None:
    key = oc.ClientKeyPair.generate().private_link
    onion = "a" * 55 + "d.onion"
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 100)
    cookie = {"dev-zero": "/dev/zero", "too-big": str(secret), "symlink": str(tmp_path / "link")}.get(case, str(secret))
    if case == "symlink":
        (tmp_path / "real").write_bytes(b"c" * 32)
        (tmp_path / "link").symlink_to(tmp_path / "real")
    methods = {"null": "NULL", "cookie-only": "COOKIE"}.get(case, "SAFECOOKIE")
    info = f'250-PROTOCOLINFO 1\r\n250-AUTH METHODS={methods} COOKIEFILE="{cookie}"\r\n250 OK\r\n'
    flood = b"250+" + b"x" * 100 + b"\r\n" + (b"y" * 1000 + b"\r\n") * 200 if case == "flood" else b""
    if case == "flood":
        info = "250+PROTOCOLINFO 1\r\n"
    received: list[bytes] = []
    listener, handle = await _impostor(info, received, flood)
    port = listener.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, [listener])
        with trio.fail_after(20), pytest.raises(TorControlError) as caught:
            await add_client_auth(f"127.0.0.1:{port}", onion, key)
        nursery.cancel_scope.cancel()
    sent = b"".join(received)
    assert b"ONION_CLIENT_AUTH_ADD" not in sent and b"AUTHENTICATE" not in sent, sent[:200]
    assert key not in str(caught.value) and "\n" not in str(caught.value)


def test_the_control_port_must_be_on_this_machine() -> None:
    from node.onion_auth import check_control

    assert check_control("127.0.0.1:9051") == "127.0.0.1:9051"
    assert check_control("localhost:9051") == "localhost:9051"
    with pytest.raises(TorControlError, match="is not on this machine"):
        check_control("192.0.2.7:9051")


def test_a_client_key_with_an_expiry_stops_counting_on_its_day(tmp_path: Path) -> None:
    data = tmp_path / "relay"
    data.mkdir()
    forever = oc.add_client(data, "forever", oc.ClientKeyPair.generate().public)
    today = oc.add_client(data, "ends today", oc.ClientKeyPair.generate().public, expires=oc.utc_day())
    later = oc.add_client(data, "ends tomorrow", oc.ClientKeyPair.generate().public, expires=oc.utc_day(1))
    clients = oc.read_clients(data)
    assert {c.id: c.expires for c in clients} == {forever.id: None, today.id: today.expires, later.id: later.expires}
    assert {c.id for c in oc.live(clients)} == {forever.id, later.id}  # what the relay publishes for
    assert {c.id for c in oc.live(clients, oc.utc_day(1))} == {forever.id}
    listed = veil(tmp_path, "relay", "clients", "--data-dir", str(data)).stdout
    assert "ends today  EXPIRED" in listed and f"ends tomorrow  until {later.expires}" in listed
    as_json = {c["id"]: c for c in map(json.loads, veil(tmp_path, "relay", "clients", "--json", "--data-dir",
                                                         str(data)).stdout.splitlines())}
    assert as_json[today.id]["expired"] is True and as_json[forever.id]["expires"] is None
    # A malformed expiry is a malformed client file: one line.
    path = data / oc.CLIENTS_DIR / f"{forever.id}{oc.SUFFIX}"
    path.write_text(path.read_text().replace('"added"', '"expires": "soon", "added"'))
    res = veil(tmp_path, "relay", "clients", "--data-dir", str(data), check=False)
    assert_one_line_error(res, "is not a client file")
