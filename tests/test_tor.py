"""Tor: the relay as an onion service, nodes through a SOCKS5 proxy.

The network tests run a private Tor network on 127.0.0.1 (``tests/tornet.py``, the same
code as ``scripts/tornet``), once per session; nothing contacts the public Tor network.
They are skipped, with one line saying why, where tor is not installed (CI installs it).
The other tests need no tor: a fake SOCKS5 proxy stands in for it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from node.errors import RelayUnreachable
from node.link import open_link
from tests.conftest import RelayRunner
from tests.test_cli import ROOT, TIMEOUT, VEIL, assert_one_line_error, env_for, read_line_until
from tests.tornet import LAUNCH_TORRC, TorNet, tor_binaries

ONION_URL = re.compile(r"^ws://[a-z2-7]{56}\.onion$")
FAKE_ONION = "ws://" + "a" * 52 + "bcdq.onion"  # well formed; no service behind it
TOR_START = 180  # the private network, from launch to ready
PUBLISH = 120  # a relay's onion service, from start to "relay onion address"


def needs_tor() -> None:
    if tor_binaries() is None:
        pytest.skip("tor and tor-gencert are not installed (apt-get install tor)")
    pytest.importorskip("stem", reason="stem is not installed (pip install '.[tor]')")
    pytest.importorskip("python_socks", reason="python-socks is not installed (pip install '.[tor]')")


@pytest.fixture(scope="session")
def tornet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorNet]:
    """The private network, for the whole session; every tor stopped by pid at the end."""
    needs_tor()
    net = TorNet(tmp_path_factory.mktemp("tornet"), owned=True)
    try:
        net.start(TOR_START)
        print(f"tornet ready after {net.ready_after:.1f}s", file=sys.stderr)
        yield net
    finally:
        net.stop()


# ---- processes ---------------------------------------------------------------------------


def veil_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = env_for(tmp)
    env.pop("VEIL_SOCKS", None)
    env.pop("TOR_CONTROL", None)
    env.update(extra)
    return env


def veil(tmp: Path, *args: str, env: dict[str, str] | None = None, check: bool = True,
         timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([*VEIL, *args], capture_output=True, text=True, timeout=timeout,
                         env=env or veil_env(tmp), cwd=ROOT, stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise AssertionError(f"veil {args} failed: {res.stderr}")
    return res


@dataclass
class OnionRelay:
    proc: subprocess.Popen[str]
    local_url: str
    onion_url: str
    log: Path

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=TIMEOUT)
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode


@pytest.fixture
def relays() -> Iterator[list[OnionRelay]]:
    """Relay processes a test started; all stopped at the end, pass or fail."""
    started: list[OnionRelay] = []
    yield started
    for r in started:
        r.stop()


def start_onion_relay(tmp: Path, data: Path, relays: list[OnionRelay], *tor_args: str) -> OnionRelay:
    log = tmp / f"relay-{len(relays)}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [*VEIL, "relay", "serve", "--onion", *tor_args, "--port", "0", "--data-dir", str(data)],
            stdout=subprocess.PIPE, stderr=err, text=True, env=veil_env(tmp), cwd=ROOT,
        )
    relay = OnionRelay(proc, "", "", log)
    relays.append(relay)
    deadline = time.monotonic() + PUBLISH
    try:
        relay.local_url = read_line_until(proc, "relay listening on ", deadline).split()[-1]
        relay.onion_url = read_line_until(proc, "relay onion address ", deadline).split()[-1]
    except AssertionError as exc:
        raise AssertionError(f"{exc}; relay log:\n{log.read_text()}") from None
    return relay


class Person:
    def __init__(self, tmp: Path, name: str) -> None:
        self.tmp, self.name = tmp, name
        self.home = tmp / f"home-{name}"
        self.pw = tmp / f"pw-{name}"
        self.pw.write_text(f"password of {name}\n")

    def veil(self, *args: str, env: dict[str, str] | None = None) -> str:
        return veil(self.tmp, "--home", str(self.home), "--password-file", str(self.pw), *args, env=env).stdout


# ---- the private network ----------------------------------------------------------------


@pytest.mark.slow
def test_onion_relay_two_nodes_and_a_restart(tornet: TorNet, tmp_path: Path, relays: list[OnionRelay]) -> None:
    data = tmp_path / "relay"
    relay = start_onion_relay(tmp_path, data, relays, "--tor-control", tornet.control)
    assert relay.local_url.startswith("ws://127.0.0.1:")  # onion mode: loopback only
    assert ONION_URL.match(relay.onion_url), relay.onion_url
    key = data / "onion.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("ED25519-V3:")

    alice, bob = Person(tmp_path, "alice"), Person(tmp_path, "bob")
    # One through the global flag, one through VEIL_SOCKS: both remembered in the home.
    alice.veil("--socks", tornet.socks, "register", "alice", "--relay", relay.onion_url)
    bob.veil("register", "bob", "--relay", relay.onion_url, env=veil_env(tmp_path, VEIL_SOCKS=tornet.socks))
    for p in (alice, bob):
        assert f'"socks": "{tornet.socks}"' in (p.home / "device.json").read_text()

    # From here on, no flags: the relay and the proxy come from each home.
    alice.veil("send", "bob", "hello over an onion circuit")
    assert "alice: hello over an onion circuit" in bob.veil("recv")
    bob.veil("send", "alice", "and back again")
    assert "bob: and back again" in alice.veil("recv")

    # A restart keeps the address (the key is in the data directory), on a new local port.
    assert relay.stop() == 0
    again = start_onion_relay(tmp_path, data, relays, "--tor-control", tornet.control)
    assert again.onion_url == relay.onion_url
    alice.veil("send", "bob", "after the restart")
    assert "alice: after the restart" in bob.veil("recv")
    log = again.log.read_text()
    assert "alice" not in log and "bob" not in log
    assert again.stop() == 0


@pytest.mark.slow
def test_launch_tor_publishes_and_stops_its_tor(tornet: TorNet, tmp_path: Path, relays: list[OnionRelay]) -> None:
    relay = start_onion_relay(tmp_path, tmp_path / "relay", relays,
                              "--launch-tor", "--torrc", str(tornet.base / LAUNCH_TORRC))
    assert ONION_URL.match(relay.onion_url)
    match = re.search(r"launched tor \(pid (\d+)\)", relay.log.read_text())
    assert match, relay.log.read_text()
    tor_pid = int(match.group(1))
    carol = Person(tmp_path, "carol")
    carol.veil("--socks", tornet.socks, "register", "carol", "--relay", relay.onion_url)
    assert relay.stop() == 0
    assert not running(tor_pid), "the relay left the tor it launched running"


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# ---- without tor -------------------------------------------------------------------------


def test_missing_tor_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("stem", reason="stem is not installed (pip install '.[tor]')")
    empty = tmp_path / "bin"
    empty.mkdir()
    res = veil(tmp_path, "relay", "serve", "--onion", "--launch-tor", "--port", "0",
               "--data-dir", str(tmp_path / "relay"), env=veil_env(tmp_path, PATH=str(empty)), check=False)
    assert_one_line_error(res, "tor is not installed")
    assert not (tmp_path / "relay" / "relay.db").exists()


def test_missing_stem_is_one_line(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "stem"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('stem hidden by the test')\n")
    env = veil_env(tmp_path, PYTHONPATH=f"{shadow.parent}{os.pathsep}{ROOT}")
    res = veil(tmp_path, "relay", "serve", "--onion", "--port", "0", "--data-dir", str(tmp_path / "relay"),
               env=env, check=False)
    assert_one_line_error(res, "needs stem")


def test_refused_control_port_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("stem", reason="stem is not installed (pip install '.[tor]')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    res = veil(tmp_path, "relay", "serve", "--onion", "--tor-control", f"127.0.0.1:{closed}", "--port", "0",
               "--data-dir", str(tmp_path / "relay"), check=False)
    assert_one_line_error(res, f"cannot connect to the tor control port at 127.0.0.1:{closed}")
    res = veil(tmp_path, "relay", "serve", "--launch-tor", "--data-dir", str(tmp_path / "relay"), check=False)
    assert_one_line_error(res, "go with --onion")


NO_NETWORK = """\
import socket, sys
def _refuse(*args, **kwargs):
    sys.stderr.write("veil: error: TEST: network used: %r\\n" % (args[:2],))
    raise SystemExit(99)
socket.getaddrinfo = _refuse
socket.gethostbyname = _refuse
socket.create_connection = _refuse
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
"""


def test_onion_without_proxy_is_refused_before_any_lookup(tmp_path: Path) -> None:
    # The command runs with every way to resolve or connect replaced by a trap.
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NO_NETWORK)
    env = veil_env(tmp_path, PYTHONPATH=f"{guard}{os.pathsep}{ROOT}")
    user = Person(tmp_path, "x")
    res = veil(tmp_path, "--home", str(user.home), "--password-file", str(user.pw),
               "register", "xavier", "--relay", FAKE_ONION, env=env, check=False)
    assert res.returncode == 1, res.stderr
    assert_one_line_error(res, "is an onion address")
    assert "--socks" in res.stderr and "TEST: network used" not in res.stderr
    assert not (user.home / "device.json").exists()


async def test_open_link_refuses_onion_without_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    def trap(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network used: {args[:2]}")

    monkeypatch.setattr(trio.socket, "getaddrinfo", trap)
    monkeypatch.setattr(trio, "open_tcp_stream", trap)
    monkeypatch.setattr(socket, "getaddrinfo", trap)
    for url in (FAKE_ONION, FAKE_ONION.upper().replace("WS://", "ws://") + ":8765", FAKE_ONION + "./"):
        with pytest.raises(RelayUnreachable, match="onion address"):
            async with open_link(url):
                pass


# ---- a fake SOCKS5 proxy: the SOCKS path without tor -------------------------------------


class FakeSocks:
    """Answers SOCKS5 CONNECTs: the names it was asked for are recorded; a scripted list
    of reply codes is used up first, then it forwards ``relay.invalid`` to the relay."""

    def __init__(self, relay_port: int, replies: list[int]) -> None:
        self.relay_port = relay_port
        self.replies = replies
        self.asked: list[tuple[int, str, int]] = []  # (address type, host, port)
        self.port = 0

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, client: trio.SocketStream) -> None:
        async with client:
            buf = bytearray()

            async def read(n: int) -> bytes:
                while len(buf) < n:
                    chunk = await client.receive_some()
                    if not chunk:
                        raise trio.BrokenResourceError
                    buf.extend(chunk)
                out = bytes(buf[:n])
                del buf[:n]
                return out

            try:
                _, nmethods = await read(2)
                await read(nmethods)
                await client.send_all(b"\x05\x00")
                _, _, _, atyp = await read(4)
                host = (await read((await read(1))[0])).decode() if atyp == 3 else (await read(4 if atyp == 1 else 16)).hex()
                port = int.from_bytes(await read(2), "big")
                self.asked.append((atyp, host, port))
                code = self.replies.pop(0) if self.replies else 0
                if code or host != "relay.invalid":
                    await client.send_all(bytes([5, code or 4, 0, 1, 0, 0, 0, 0, 0, 0]))
                    return
                upstream = await trio.open_tcp_stream("127.0.0.1", self.relay_port)
                await client.send_all(b"\x05\x00\x00\x01\x7f\x00\x00\x01" + self.relay_port.to_bytes(2, "big"))
            except trio.BrokenResourceError:
                return
            async with upstream, trio.open_nursery() as n:
                async def pump(src: trio.abc.ReceiveStream, dst: trio.abc.SendStream) -> None:
                    try:
                        async for chunk in src:
                            await dst.send_all(chunk)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    n.cancel_scope.cancel()

                if buf:
                    await upstream.send_all(bytes(buf))
                n.start_soon(pump, client, upstream)
                n.start_soon(pump, upstream, client)


async def test_link_through_socks_with_retries(
    nursery: trio.Nursery, relay: RelayRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("python_socks", reason="python-socks is not installed (pip install '.[tor]')")
    import node.socks

    monkeypatch.setattr(node.socks, "BACKOFF_FIRST", 0.01)
    assert relay.info is not None
    port = relay.info.port
    fake = FakeSocks(port, [0xF0, 0xF0])  # descriptor "not published yet", twice
    await nursery.start(fake.serve)
    proxy = f"127.0.0.1:{fake.port}"
    # TLS, the pin checked, and the WebSocket handshake through the proxy to the real relay.
    async with open_link(f"wss://relay.invalid:{port}#{relay.info.pin}", socks=proxy) as link:
        assert not link.closed.is_set()
    # The name went to the proxy as a name (address type 3): never resolved here.
    assert fake.asked == [(3, "relay.invalid", port)] * 3

    fake.replies = [0xF6]  # invalid onion address: not worth a retry
    with pytest.raises(RelayUnreachable, match="invalid onion address"):
        async with open_link(FAKE_ONION, socks=proxy):
            pass
    assert fake.asked[-1] == (3, FAKE_ONION.removeprefix("ws://"), 80)

    # A private onion service's refusals: not retried; one line that says what is missing.
    key = "b" * 52
    for replies, url, said in (
        ([0xF4], FAKE_ONION, "this node needs a client key"),
        ([0xF4], f"{FAKE_ONION}#client={key}", "give --tor-control"),
        ([0xF5], f"{FAKE_ONION}#client={key}", "wrong, expired, or was revoked"),
    ):
        fake.replies = replies
        with pytest.raises(RelayUnreachable, match=said) as exc:
            async with open_link(url, socks=proxy):
                pass
        assert key not in str(exc.value) and not fake.replies
    assert fake.asked[-1] == (3, FAKE_ONION.removeprefix("ws://"), 80)  # the key never goes to the proxy

    monkeypatch.setattr(node.socks, "MAX_ATTEMPTS", 3)
    fake.replies = [0xF0] * 10
    with pytest.raises(RelayUnreachable, match=r"gave up .*descriptor not found"):
        async with open_link(FAKE_ONION, socks=proxy):
            pass


def test_proxy_addresses_and_reply_codes() -> None:
    from node.socks import BadProxy, describe, parse_proxy, reply_code

    assert parse_proxy("127.0.0.1:9050") == ("127.0.0.1", 9050)
    assert parse_proxy("[::1]:9150") == ("::1", 9150)
    for bad in ("9050", "localhost", "host:0", "host:70000", ":9050", "host:x"):
        with pytest.raises(BadProxy):
            parse_proxy(bad)
    assert reply_code(Exception("Invalid reply code: 0XF0")) == 0xF0
    assert "descriptor not found" in describe(0xF0)


# ---- a private onion relay (Tor v3 client authorization) ---------------------------------


class ErrLines:
    """A process's standard error, read line by line without blocking past a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        self.fd = proc.stderr.fileno()
        os.set_blocking(self.fd, False)
        self.buf = b""
        self.seen: list[str] = []

    def wait_for(self, fragment: str, deadline: float) -> str:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.fd, selectors.EVENT_READ)
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                self.seen.append(text)
                if fragment in text:
                    return text
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {fragment!r} in time; stderr so far: {self.seen}")
            if sel.select(timeout=left):
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise AssertionError(f"process ended before {fragment!r}; stderr: {self.seen}")
                self.buf += chunk


def new_client(tmp: Path, data: Path, relay: OnionRelay | None, label: str) -> str:
    """`veil relay invite --new-client`: the link; waits for a running relay to re-publish."""
    res = veil(tmp, "relay", "invite", "--new-client", "--name", label, "--data-dir", str(data))
    link = res.stdout.strip()
    assert len(res.stdout.splitlines()) == 1 and link.startswith("ws://") and "#client=" in link, res.stdout
    assert link.split("#client=")[1] not in res.stderr
    if relay is not None:
        assert "told the running relay" in res.stderr, res.stderr
        read_line_until(relay.proc, "relay onion clients ", time.monotonic() + PUBLISH)
    return link


@pytest.mark.slow
def test_private_onion_relay_invite_connect_refuse_revoke(
    tornet: TorNet, tmp_path: Path, relays: list[OnionRelay]
) -> None:
    from relay.onion import load_key
    from relay.onion_clients import service_id_of_key

    started = time.monotonic()
    data = tmp_path / "relay"
    # Published at once, for a throwaway client key (nobody has one yet).
    relay = start_onion_relay(tmp_path, data, relays, "--private", "--tor-control", tornet.control)
    assert ONION_URL.match(relay.onion_url)
    key = load_key(data / "onion.key")
    assert key is not None and f"ws://{service_id_of_key(key)}.onion" == relay.onion_url  # tor's own address
    assert stat.S_IMODE((data / "onion_clients").stat().st_mode) == 0o700

    link_a = new_client(tmp_path, data, relay, "alice")
    link_b = new_client(tmp_path, data, relay, "bob")
    for link in (link_a, link_b):
        assert link.startswith(relay.onion_url + "#client=")
    secrets_in_files = [p for p in data.rglob("*") if p.is_file()
                        and any(lk.split("=")[1].encode() in p.read_bytes().lower() for lk in (link_a, link_b))]
    assert not secrets_in_files, "the relay stored a client's private key"
    for f in (data / "onion_clients").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600

    # Two authorized nodes, through the client tor, which gets each key from veil.
    alice, bob = Person(tmp_path, "alice"), Person(tmp_path, "bob")
    out = alice.veil("--socks", tornet.socks, "register", "alice", "--relay", link_a,
                     "--tor-control", tornet.client_control)
    assert link_a.split("#client=")[1] not in out
    bob.veil("register", "bob", "--relay", link_b,
             env=veil_env(tmp_path, VEIL_SOCKS=tornet.socks, VEIL_TOR_CONTROL=tornet.client_control))
    assert f'"tor_control": "{tornet.client_control}"' in (bob.home / "device.json").read_text()
    alice.veil("send", "bob", "hello, privately")
    assert "alice: hello, privately" in bob.veil("recv")
    print(f"two authorized nodes chatted after {time.monotonic() - started:.1f}s", file=sys.stderr)

    # Another tor, which never had a key for this relay.
    other = tornet.add_client("client2")
    socks2, control2 = f"127.0.0.1:{other.socks_port}", f"127.0.0.1:{other.control_port}"
    eve = Person(tmp_path, "eve")
    res = veil(tmp_path, "--home", str(eve.home), "--password-file", str(eve.pw), "--socks", socks2,
               "register", "eve", "--relay", relay.onion_url, check=False)
    assert_one_line_error(res, "is a private onion relay: this node needs a client key")
    # A client key the relay never issued.
    from relay.onion_clients import ClientKeyPair

    made_up_key = ClientKeyPair.generate().private_link
    made_up = relay.onion_url + "#client=" + made_up_key
    res = veil(tmp_path, "--home", str(eve.home), "--password-file", str(eve.pw), "--socks", socks2,
               "register", "eve", "--relay", made_up, "--tor-control", control2, check=False)
    assert_one_line_error(res, "does not accept this node's client key")
    assert made_up_key not in res.stderr.lower() and not (eve.home / "device.json").exists()

    # Carol's key, but no control port to hand it to tor: one line that says how.
    link_c = new_client(tmp_path, data, relay, "carol")
    carol = Person(tmp_path, "carol")
    tor3 = tornet.add_client("client3")
    socks3, control3 = f"127.0.0.1:{tor3.socks_port}", f"127.0.0.1:{tor3.control_port}"
    res = veil(tmp_path, "--home", str(carol.home), "--password-file", str(carol.pw), "--socks", socks3,
               "register", "carol", "--relay", link_c, check=False)
    assert_one_line_error(res, "give --tor-control")
    assert "auth_private" in res.stderr and link_c.split("#client=")[1] not in res.stderr.lower()
    carol.veil("--socks", socks3, "register", "carol", "--relay", link_c, "--tor-control", control3)
    carol.veil("send", "alice", "carol here")
    assert "carol: carol here" in alice.veil("recv")

    # Carol stays online; then the operator revokes her key.
    listed = [json.loads(ln) for ln in veil(tmp_path, "relay", "clients", "--json", "--data-dir", str(data))
              .stdout.splitlines()]
    assert sorted(c["label"] for c in listed) == ["alice", "bob", "carol"]
    carol_id = next(c["id"] for c in listed if c["label"] == "carol")
    follow = subprocess.Popen(
        [*VEIL, "--home", str(carol.home), "--password-file", str(carol.pw), "recv", "--follow"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=veil_env(tmp_path), cwd=ROOT,
    )
    try:
        err = ErrLines(follow)
        err.wait_for("veil: online", time.monotonic() + PUBLISH)
        res = veil(tmp_path, "relay", "clients", "revoke", carol_id, "--data-dir", str(data))
        assert f"revoked client {carol_id} (carol)" in res.stdout
        read_line_until(relay.proc, "relay onion clients 2", time.monotonic() + PUBLISH)
        revoked_at = time.monotonic()
        err.wait_for("veil: offline", time.monotonic() + TIMEOUT)  # her live connection ended
        print(f"the revoked node's live connection ended {time.monotonic() - revoked_at:.1f}s after "
              "the re-publication", file=sys.stderr)
    finally:
        follow.send_signal(signal.SIGTERM)
        follow.wait(timeout=TIMEOUT)
        assert follow.stderr is not None
        follow.stderr.close()
    # A new connection with her key: refused, in one line (her tor has the key, the relay not).
    # Her tor first tries the old descriptor's introduction points and fetches the new
    # descriptor only once they all fail, which on a loaded machine can outlast one
    # command's 120 s: then that command ends with "cannot reach" (one line too), and the
    # next one, with the new descriptor, is refused.
    deadline = time.monotonic() + 3 * 200
    for attempt in range(1, 4):
        res = veil(tmp_path, "--home", str(carol.home), "--password-file", str(carol.pw), "recv", check=False,
                   timeout=200)
        if "wrong, expired, or was revoked" in res.stderr or attempt == 3 or time.monotonic() > deadline:
            break
        assert_one_line_error(res, "cannot reach")
        print(f"the revoked node's attempt {attempt} ended without tor's refusal: {res.stderr.strip()}",
              file=sys.stderr)
    assert_one_line_error(res, "wrong, expired, or was revoked")
    # The others go on (their tor fetches the new descriptor once the old one leads nowhere).
    alice.veil("send", "bob", "after the revocation")
    assert "alice: after the revocation" in bob.veil("recv")
    assert carol_id not in veil(tmp_path, "relay", "clients", "--data-dir", str(data)).stdout
    log = relay.log.read_text()
    for link in (link_a, link_b, link_c):
        assert link.split("#client=")[1] not in log.lower()
    assert relay.stop() == 0

    # Private once, private at every start: without --private the relay refuses to start.
    res = veil(tmp_path, "relay", "serve", "--onion", "--tor-control", tornet.control, "--port", "0",
               "--data-dir", str(data), check=False)
    assert_one_line_error(res, "start it with --private")
    print(f"private onion relay test took {time.monotonic() - started:.1f}s", file=sys.stderr)
