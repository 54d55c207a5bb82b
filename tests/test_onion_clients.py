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
from node.onion_auth import TorControlError, add_client_auth, key_blob, refused, without_client_key
from relay import onion_clients as oc
from tests.conftest import RelayRunner
from tests.test_cli import RelayProcess, assert_one_line_error, env_for
from tests.test_tor import veil
from wire.address import parse_address


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
    assert oc.unb32(pair.private_link) == pair.private
    # The control port's form: x25519: and the base64 of the same 32 bytes.
    assert key_blob(pair.private_link) == "x25519:" + base64.b64encode(pair.private).decode()
    with pytest.raises(TorControlError):
        key_blob("A" * 52)  # upper case is tor's file form, not the link's
    # The link parses in the address grammar, and shows without the key.
    link = f"ws://{'a' * 55}d.onion#client={pair.private_link}"
    address = parse_address(link)
    assert address.client_key == pair.private_link and str(address.public) == f"ws://{'a' * 55}d.onion"
    assert relay_address(link) == link
    assert without_client_key(link) == f"ws://{'a' * 55}d.onion"
    assert without_client_key("ws://127.0.0.1:8765") == "ws://127.0.0.1:8765"
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
    private = oc.unb32(key)
    assert oc.unb32(client.public) == X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)
    assert not [p for p in data.rglob("*") if p.is_file() and key.encode() in p.read_bytes().lower()]

    qr = veil(tmp_path, "relay", "invite", "--new-client", "--qr", "--data-dir", str(data)).stdout.splitlines()
    assert len(qr) > 10 and qr[-1].startswith(f"ws://{service_id}.onion#client=")
    listed = [json.loads(ln) for ln in veil(tmp_path, "relay", "clients", "--json", "--data-dir", str(data))
              .stdout.splitlines()]
    assert sorted(c["label"] for c in listed) == ["alice", "client"]
    assert all(set(c) == {"id", "label", "added"} for c in listed)
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
    assert_one_line_error(res, "give --new-client")


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
    assert "wrong or was revoked" in str(refused(0xF5, host, has_key=True, control="127.0.0.1:9051"))
