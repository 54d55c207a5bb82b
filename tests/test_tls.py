"""TLS on the relay, pinned by its address (issue 12): through `veil` with real relay
processes, and in-process for what only the wire shows (nothing sent to a wrong key).

Certificates are the relay's own (relay/tls.py) or a public-CA style chain from trustme;
the nodes' trust store for the latter is SSL_CERT_FILE, as OpenSSL reads it."""

from __future__ import annotations

import hashlib
import shutil
import signal
import stat
import subprocess
import time
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio
import trustme

from keyvault.pins import spki_pin
from node.errors import RelayKeyMismatch, RelayUnreachable
from node.link import open_link
from relay.tls import RelayTls, own_pin
from tests.test_cli import (
    TIMEOUT,
    RelayProcess,
    User,
    assert_one_line_error,
    read_line_until,
    start_relay,
    stop_relay,
)
from wire.address import parse_address

DEADLINE = 30


def port_of(rp: RelayProcess) -> int:
    port = urlsplit(rp.url).port
    assert port is not None
    return port


def chat(alice: User, bob: User, text: str) -> None:
    """alice sends, bob receives (each adds the other on first use)."""
    alice.veil("send", bob.name, text)
    got = bob.veil("recv", "--json").stdout
    assert text in got, got


def test_the_relay_makes_its_key_once_keeps_it_private_and_prints_its_pin(tmp_path: Path) -> None:
    rp = start_relay(tmp_path)
    try:
        address = parse_address(rp.url)
        assert address.secure and address.host == "127.0.0.1" and address.pin is not None
        key = rp.data_dir / "tls.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert own_pin(rp.data_dir) == address.pin
        port = port_of(rp)
    finally:
        stop_relay(rp)
    again = start_relay(tmp_path, port)
    try:
        assert again.url == rp.url  # the same key, the same address
    finally:
        stop_relay(again)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")
def test_the_pin_is_what_openssl_computes(tmp_path: Path) -> None:
    RelayTls(tmp_path)
    spki = subprocess.run(
        "openssl x509 -in tls.crt -pubkey -noout | openssl pkey -pubin -outform DER",
        shell=True, cwd=tmp_path, capture_output=True, check=True,
    ).stdout
    assert spki_pin(spki) == own_pin(tmp_path)
    import base64

    digest = base64.b32decode(own_pin(tmp_path).upper() + "====")  # type: ignore[union-attr]
    assert digest == hashlib.sha256(spki).digest()


def test_a_node_with_the_right_pin_chats_and_remembers_it(relay_proc: RelayProcess, tmp_path: Path) -> None:
    alice, bob = User(tmp_path, "alice"), User(tmp_path, "bob")
    for u in (alice, bob):
        u.veil("register", u.name, "--relay", relay_proc.url)
    import json

    assert json.loads((alice.home / "device.json").read_text())["relay"] == relay_proc.url
    chat(alice, bob, "over TLS, pinned")


def test_a_relay_with_another_key_behind_the_same_address_is_refused(tmp_path: Path) -> None:
    rp = start_relay(tmp_path)
    alice = User(tmp_path, "alice")
    try:
        alice.veil("register", "alice", "--relay", rp.url)
        port = port_of(rp)
    finally:
        stop_relay(rp)
    impostor = start_relay(tmp_path, port, data=tmp_path / "impostor")
    try:
        assert parse_address(impostor.url).pin != parse_address(rp.url).pin
        res = alice.veil("devices", check=False)
        assert_one_line_error(res, "presented a key that does not match the pin in its address")
        # A message written now waits in the outbox, and the warning says why.
        res = alice.veil("send", "bob", "not for an impostor", check=False)
        assert "does not match the pin" in res.stdout and "Traceback" not in res.stderr
        carol = User(tmp_path, "carol")
        res = carol.veil("register", "carol", "--relay", rp.url, check=False)
        assert_one_line_error(res, "does not match the pin")
        assert not (carol.home / "device.json").exists()
    finally:
        stop_relay(impostor)


async def test_nothing_is_sent_to_a_relay_whose_key_does_not_match(tmp_path: Path) -> None:
    """An impostor TLS server records every byte it receives after the handshake: with the
    real relay's pin, the node sends none; with the impostor's own pin (the control), the
    WebSocket upgrade request arrives."""
    for name in ("real", "impostor"):
        (tmp_path / name).mkdir()
    real_pin = RelayTls(tmp_path / "real").pin
    impostor = RelayTls(tmp_path / "impostor")
    received: list[bytes] = []
    done = trio.Event()

    async def record(stream: trio.SSLStream[trio.SocketStream]) -> None:
        data = b""
        try:
            while chunk := await stream.receive_some(65536):
                data += chunk
                if b"\r\n\r\n" in data:
                    break
        except trio.BrokenResourceError:
            pass
        received.append(data)
        done.set()
        await trio.aclose_forcefully(stream)

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_ssl_over_tcp, record, 0, impostor.context, host="127.0.0.1")
            )
            port = listeners[0].transport_listener.socket.getsockname()[1]
            with pytest.raises(RelayKeyMismatch, match="does not match the pin"):
                async with open_link(f"wss://127.0.0.1:{port}#{real_pin}"):
                    pass
            await done.wait()
            assert received == [b""]
            done = trio.Event()

            async def dial_the_impostor_by_its_own_pin() -> None:
                with pytest.raises(RelayUnreachable):
                    async with open_link(f"wss://127.0.0.1:{port}#{impostor.pin}"):
                        pass

            nursery.start_soon(dial_the_impostor_by_its_own_pin)
            await done.wait()  # (the node then waits for an answer that never comes)
            assert received[1].startswith(b"GET /v1 HTTP/1.1\r\n")
            nursery.cancel_scope.cancel()


def _write_leaf(ca: trustme.CA, where: Path) -> tuple[Path, Path]:
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = where / "fullchain.pem", where / "privkey.pem"
    cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def test_a_public_certificate_works_without_a_pin_and_renews_on_sighup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first_ca, second_ca = trustme.CA(), trustme.CA()
    first_ca.cert_pem.write_to_path(str(tmp_path / "first-ca.pem"))
    second_ca.cert_pem.write_to_path(str(tmp_path / "second-ca.pem"))
    cert, key = _write_leaf(first_ca, tmp_path)
    rp = start_relay(tmp_path, 0, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        port = port_of(rp)
        assert rp.url == f"wss://127.0.0.1:{port}"  # no pin: the system's CA store decides
        address = f"wss://localhost:{port}"
        alice, bob, carol = User(tmp_path, "alice"), User(tmp_path, "bob"), User(tmp_path, "carol")

        # A node whose trust store lacks the authority is refused, in one line.
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "second-ca.pem"))
        res = carol.veil("register", "carol", "--relay", address, check=False)
        assert_one_line_error(res, "has a certificate this system does not trust")

        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "first-ca.pem"))
        for u in (alice, bob):
            u.veil("register", u.name, "--relay", address)
        chat(alice, bob, "a public certificate")

        # Renewal (here from another authority, to see it take effect): new files, SIGHUP.
        _write_leaf(second_ca, tmp_path)
        rp.proc.send_signal(signal.SIGHUP)
        read_line_until(rp.proc, "relay: TLS certificate reloaded", time.monotonic() + TIMEOUT, stderr=True)
        res = alice.veil("devices", check=False)
        assert_one_line_error(res, "does not trust")
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "second-ca.pem"))
        chat(bob, alice, "after the renewal")

        # A broken renewal keeps the working certificate: a certificate whose key has not
        # been written yet (the old key stays), then a key that is not one.
        other = second_ca.issue_cert("localhost", "127.0.0.1")
        cert.write_bytes(b"".join(p.bytes() for p in other.cert_chain_pems))
        for broken in (None, "not a key\n"):
            if broken is not None:
                key.write_text(broken)
            rp.proc.send_signal(signal.SIGHUP)
            read_line_until(rp.proc, "relay: TLS reload failed, keeping the old certificate",
                            time.monotonic() + TIMEOUT, stderr=True)
            chat(alice, bob, f"still the renewed one ({broken is None})")
    finally:
        stop_relay(rp)


def test_plain_ws_only_when_asked(tmp_path: Path) -> None:
    rp = start_relay(tmp_path, 0, "--insecure-no-tls")
    try:
        assert rp.url.startswith("ws://127.0.0.1:")
        alice, bob = User(tmp_path, "alice"), User(tmp_path, "bob")
        for u in (alice, bob):
            u.veil("register", u.name, "--relay", rp.url)  # loopback: no flag needed
        chat(alice, bob, "plain, on loopback")
    finally:
        stop_relay(rp)
    # Off loopback, refused before any connection (192.0.2.7 is a documentation address).
    carol = User(tmp_path, "carol")
    res = carol.veil("register", "carol", "--relay", "ws://192.0.2.7:8765", check=False)
    assert_one_line_error(res, "is plain ws:// to a host that is neither loopback nor an onion address")
    res = carol.veil("relay", "serve", "--data-dir", str(tmp_path / "r2"), "--tls-cert", "x", check=False)
    assert_one_line_error(res, "--tls-cert and --tls-key go together")


def test_a_data_directory_others_can_write_in_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "open"
    data.mkdir()
    data.chmod(0o777)
    res = User(tmp_path, "op").veil("relay", "serve", "--port", "0", "--data-dir", str(data), check=False)
    assert_one_line_error(res, "is writable by other users (mode 777): chmod 700 it")
    assert not (data / "tls.key").exists()


def test_a_device_follows_its_relay_to_a_new_key_only_when_told(tmp_path: Path) -> None:
    rp = start_relay(tmp_path)
    alice, bob = User(tmp_path, "alice"), User(tmp_path, "bob")
    try:
        for u in (alice, bob):
            u.veil("register", u.name, "--relay", rp.url)
        port = port_of(rp)
    finally:
        stop_relay(rp)
    # The relay loses its TLS key (a new machine, say) and makes a new one: a new pin.
    (rp.data_dir / "tls.key").unlink()
    (rp.data_dir / "tls.crt").unlink()
    moved = start_relay(tmp_path, port)
    elsewhere = start_relay(tmp_path / "other", 0)
    try:
        assert moved.url != rp.url
        assert_one_line_error(alice.veil("devices", check=False), "does not match the pin")
        # Another relay (which does not know this device) is not taken for it.
        res = alice.veil("relay-address", elsewhere.url, check=False)
        assert_one_line_error(res, "(nothing changed)")
        assert_one_line_error(res, "does not know this device or its account")
        assert_one_line_error(alice.veil("devices", check=False), "does not match the pin")
        for u in (alice, bob):
            out = u.veil("relay-address", moved.url).stdout
            assert out.splitlines()[-1] == f"this device now reaches its relay at {moved.url}"
        chat(alice, bob, "after the relay's new key")
        from wire.invite import parse_link

        assert str(parse_link(alice.veil("invite").stdout.strip()).relay) == moved.url  # links follow
    finally:
        stop_relay(moved)
        stop_relay(elsewhere)

