"""A private Tor network on 127.0.0.1, for the tests and for trying Veil out offline.

Seven tor processes, each in its own directory under the network directory:

    auth0 auth1 auth2   directory authorities (also relays: they carry circuits)
    relay0 relay1       relays (no exits: onion circuits never leave the network)
    hs                  the tor that hosts onion services: its control port is TOR_CONTROL
    client              a client tor: its SOCKS port is VEIL_SOCKS

Every tor runs with ``TestingTorNetwork 1``, knows only these three authorities
(``DirAuthority`` lines, no fallback directories), and binds every port to 127.0.0.1;
nothing here ever contacts the public Tor network (tor refuses ``TestingTorNetwork``
with the default authorities, so a mistake fails loudly instead of leaking).

``start`` returns once the network is ready: the client and the onion-service tor have
bootstrapped to 100% and a probe onion service on the hs tor has answered a round trip
through the client's SOCKS port. Every started process id is written to ``DIR/pids``
at once (and each tor writes its own ``PidFile``); ``stop`` signals those ids and no
others, checking first that each still runs a tor with a torrc inside ``DIR``.

Standard library only, so ``scripts/tornet`` runs with any python3 >= 3.11:

    scripts/tornet start DIR     # prints "socks 127.0.0.1:PORT" and "control 127.0.0.1:PORT"
    scripts/tornet stop DIR
"""

from __future__ import annotations

import argparse
import binascii
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

LOCALHOST = "127.0.0.1"
AUTHORITIES = 3
RELAYS = 2
START_TIMEOUT = 150.0  # whole network: launch to first onion round trip
STOP_TIMEOUT = 10.0  # per process, SIGTERM to exit, before SIGKILL
KEYGEN_TIMEOUT = 60.0
CONTROL_REPLY_TIMEOUT = 30.0  # one answer on a control connection
CHECK_EVERY = 5.0  # while waiting for bootstrap, check this often that every tor still runs
PIDS_FILE = "pids"
ENV_FILE = "tornet.env"
LAUNCH_TORRC = "launch.torrc"
# SOCKS5 replies worth retrying: tor's extended errors for an onion service whose
# descriptor is not (yet) found (F0), a failed introduction or rendezvous (F2, F3, F7),
# and the plain codes a SocksPort without ExtendedErrors uses for the same (04, 06).
RETRY_SOCKS = {0x04, 0x06, 0xF0, 0xF2, 0xF3, 0xF7}


class TorNetError(Exception):
    pass


def tor_binaries() -> tuple[str, str] | None:
    """(tor, tor-gencert) if both are on PATH."""
    tor, gencert = shutil.which("tor"), shutil.which("tor-gencert")
    if tor is None or gencert is None:
        return None
    return tor, gencert


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held together while choosing)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((LOCALHOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---- the control port ------------------------------------------------------------------


class Control:
    """A minimal tor control-port client (cookie authentication), enough for readiness
    checks and a probe onion service."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((LOCALHOST, port), timeout=timeout)
        self.buf = b""
        self.events: list[str] = []
        info = self.command("PROTOCOLINFO 1")
        match = next((re.search(r'COOKIEFILE="((?:[^"\\]|\\.)*)"', ln) for ln in info if "COOKIEFILE=" in ln), None)
        if match is None:
            raise TorNetError(f"tor on control port {port} offers no cookie authentication")
        cookie = Path(match.group(1).replace('\\"', '"').replace("\\\\", "\\")).read_bytes()
        self.command("AUTHENTICATE " + binascii.hexlify(cookie).decode())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _line(self, deadline: float) -> str:
        """One line of the reply stream; TimeoutError at ``deadline`` (nothing is lost:
        a partial line stays buffered)."""
        while b"\r\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)  # TimeoutError at the deadline
            if not chunk:
                raise TorNetError("tor closed the control connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line.decode("utf-8", "replace")

    def _reply(self, deadline: float) -> tuple[str, list[str]]:
        """One reply (status, lines); data blocks ("+") are folded into their line."""
        lines: list[str] = []
        while True:
            line = self._line(deadline)
            status, sep, rest = line[:3], line[3:4], line[4:]
            if sep == "+":
                data = []
                while (d := self._line(deadline)) != ".":
                    data.append(d)
                rest = rest + "\n" + "\n".join(data)
            lines.append(rest)
            if sep == " ":
                return status, lines

    def command(self, line: str) -> list[str]:
        deadline = time.monotonic() + CONTROL_REPLY_TIMEOUT
        self.sock.settimeout(CONTROL_REPLY_TIMEOUT)
        self.sock.sendall(line.encode() + b"\r\n")
        while True:  # events that arrive first are kept; bounded by the deadline
            status, lines = self._reply(deadline)
            if status == "650":  # an asynchronous event that arrived first
                self.events.extend(lines)
                continue
            if status != "250":
                raise TorNetError(f"tor refused {line.split()[0]}: {status} {' '.join(lines)}")
            return lines

    def wait_event(self, done: Callable[[str], bool], deadline: float) -> str:
        """Wait for an asynchronous event line for which ``done`` is true."""
        while True:
            while self.events:
                event = self.events.pop(0)
                if done(event):
                    return event
            status, lines = self._reply(deadline)
            if status == "650":
                self.events.extend(lines)

    def getinfo(self, key: str) -> str:
        line = self.command(f"GETINFO {key}")[0]
        return line.split("=", 1)[1]

    def wait_bootstrapped(self, deadline: float) -> None:
        self.command("SETEVENTS STATUS_CLIENT")
        if "PROGRESS=100" in self.getinfo("status/bootstrap-phase"):
            return
        self.wait_event(lambda e: "BOOTSTRAP" in e and "PROGRESS=100" in e, deadline)


# ---- SOCKS5, for the probe ---------------------------------------------------------------


def socks_connect(socks_port: int, host: str, port: int, timeout: float) -> socket.socket:
    """A stream to host:port through the SOCKS5 proxy, the name resolved by the proxy."""
    s = socket.create_connection((LOCALHOST, socks_port), timeout=timeout)
    try:
        s.sendall(b"\x05\x01\x00")
        if _recv_exactly(s, 2) != b"\x05\x00":
            raise TorNetError("the SOCKS proxy wants authentication")
        name = host.encode()
        s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
        head = _recv_exactly(s, 4)
        if head[1] != 0:
            raise SocksRefused(head[1])
        atyp = head[3]
        addr_len = _recv_exactly(s, 1)[0] if atyp == 3 else {1: 4, 4: 16}.get(atyp, 0)
        _recv_exactly(s, addr_len + 2)  # the bound address and port: unused
        return s
    except BaseException:
        s.close()
        raise


class SocksRefused(TorNetError):
    def __init__(self, code: int) -> None:
        super().__init__(f"SOCKS error 0x{code:02X}")
        self.code = code


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise TorNetError("the SOCKS proxy closed the connection")
        data += chunk
    return data


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """A one-line echo server on 127.0.0.1 (a thread), yielding its port."""
    srv = socket.socket()
    srv.bind((LOCALHOST, 0))
    srv.listen()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(30)
                with contextlib.suppress(OSError):
                    conn.sendall(conn.recv(1024))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            srv.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        srv.close()
        t.join(timeout=5)


def onion_round_trip(socks_port: int, address: str, deadline: float) -> None:
    """Connect to ``address``:80 through the SOCKS port and get b"ping" echoed, retrying
    while the descriptor or the circuits are not there yet (bounded backoff)."""
    delay, last = 0.25, "no attempt"
    for _ in range(200):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socks_connect(socks_port, address, 80, timeout=min(left, 60)) as s:
                s.sendall(b"ping")
                if _recv_exactly(s, 4) == b"ping":
                    return
                last = "a wrong echo"
        except SocksRefused as exc:
            if exc.code not in RETRY_SOCKS:
                raise
            last = str(exc)
        except (OSError, TorNetError) as exc:
            last = str(exc)
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))  # backoff between attempts
        delay = min(delay * 2, 4.0)
    raise TorNetError(f"no round trip to the probe onion service in time (last: {last})")


# ---- the network ---------------------------------------------------------------------------


@dataclass
class TorNode:
    name: str
    kind: str  # authority, relay, hs, client
    dir: Path
    or_port: int = 0
    dir_port: int = 0
    socks_port: int = 0
    control_port: int = 0
    v3ident: str = ""
    fingerprint: str = ""

    @property
    def torrc(self) -> Path:
        return self.dir / "torrc"


def network_lines(authorities: list[TorNode]) -> list[str]:
    """What every tor of this network has: a test network of these authorities only."""
    lines = [
        "TestingTorNetwork 1",
        "UseDefaultFallbackDirs 0",
        "AssumeReachable 1",
        "PathsNeededToBuildCircuits 0.67",
        "TestingDirAuthVoteGuard *",
        "TestingDirAuthVoteHSDir *",
        "V3AuthNIntervalsValid 2",
        "VanguardsLiteEnabled 0",
        'GeoIPFile ""',
        'GeoIPv6File ""',
        "Schedulers Vanilla",
        f"Address {LOCALHOST}",
        "AddressDisableIPv6 1",
        "ClientUseIPv6 0",
        "ExitRelay 0",
        "ExitPolicy reject *:*",
    ]
    for a in authorities:
        lines.append(
            f"DirAuthority {a.name} orport={a.or_port} no-v2 v3ident={a.v3ident} "
            f"{LOCALHOST}:{a.dir_port} {a.fingerprint}"
        )
    return lines


def common_lines(node: TorNode, authorities: list[TorNode]) -> list[str]:
    lines = [
        f"DataDirectory {node.dir}",
        f"Nickname {node.name}",
        f"PidFile {node.dir / 'tor.pid'}",
        f"Log notice file {node.dir / 'notice.log'}",
        "RunAsDaemon 0",
        "ShutdownWaitLength 0",
        *network_lines(authorities),
    ]
    if node.or_port:
        lines.append(f"ORPort {LOCALHOST}:{node.or_port}")
    if node.dir_port:
        lines.append(f"DirPort {LOCALHOST}:{node.dir_port}")
    lines.append(f"SocksPort {LOCALHOST}:{node.socks_port} ExtendedErrors" if node.socks_port else "SocksPort 0")
    if node.control_port:
        lines += [f"ControlPort {LOCALHOST}:{node.control_port}", "CookieAuthentication 1"]
    if node.kind == "authority":
        lines += [
            "AuthoritativeDirectory 1",
            "V3AuthoritativeDirectory 1",
            f"ContactInfo {node.name}@tornet.invalid",
            "TestingV3AuthInitialVotingInterval 5",
            "TestingV3AuthInitialVoteDelay 2",
            "TestingV3AuthInitialDistDelay 2",
            "V3AuthVotingInterval 10",
            "V3AuthVoteDelay 2",
            "V3AuthDistDelay 2",
        ]
    return lines


class TorNet:
    """A private Tor network in ``base`` (see the module's docstring)."""

    def __init__(self, base: Path, *, relays: int = RELAYS, owned: bool = False) -> None:
        self.base = base.resolve()
        self.relays = relays
        # owned: every tor also exits by itself soon after this process is gone (even
        # SIGKILLed), through tor's __OwningControllerProcess. For the tests; not for
        # `scripts/tornet start`, which returns and leaves the network running.
        self.owner = os.getpid() if owned else None
        self.nodes: list[TorNode] = []
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.started_at = 0.0
        self.ready_after = 0.0  # seconds from launch to the first onion round trip
        self.timings: dict[str, float] = {}  # seconds from launch to each readiness step

    def node(self, name: str) -> TorNode:
        return next(n for n in self.nodes if n.name == name)

    @property
    def socks(self) -> str:
        return f"{LOCALHOST}:{self.node('client').socks_port}"

    @property
    def control(self) -> str:
        return f"{LOCALHOST}:{self.node('hs').control_port}"

    @property
    def client_control(self) -> str:
        """The client tor's control port (to hand it a private onion service's client key)."""
        return f"{LOCALHOST}:{self.node('client').control_port}"

    def add_client(self, name: str, timeout: float = START_TIMEOUT) -> TorNode:
        """Another client tor in the running network, bootstrapped: its own SOCKS and control
        ports, and its own descriptor cache and client keys."""
        bins = tor_binaries()
        if bins is None:
            raise TorNetError("tor and tor-gencert are needed (apt-get install tor)")
        deadline = time.monotonic() + timeout
        d = self.base / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(mode=0o700)
        control_port, socks_port = free_ports(2)
        n = TorNode(name, "client", d, control_port=control_port, socks_port=socks_port)
        self.nodes.append(n)
        n.torrc.write_text("\n".join(common_lines(n, [a for a in self.nodes if a.kind == "authority"])) + "\n")
        self._launch(bins[0], n)
        self._wait_bootstrapped(name, deadline)
        return n

    # ---- starting ----------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT) -> None:
        bins = tor_binaries()
        if bins is None:
            raise TorNetError("tor and tor-gencert are needed (apt-get install tor)")
        tor, gencert = bins
        if (self.base / PIDS_FILE).exists():
            stop_network(self.base)  # leftovers of an earlier run in the same directory
        self.base.mkdir(parents=True, exist_ok=True, mode=0o700)
        deadline = time.monotonic() + timeout
        try:
            self._plan()
            self._make_authority_keys(tor, gencert)
            self._write_torrcs()
            self.started_at = time.monotonic()
            for n in self.nodes:
                self._launch(tor, n)
            self._wait_ready(deadline)
            self.ready_after = time.monotonic() - self.started_at
            (self.base / ENV_FILE).write_text(f"VEIL_SOCKS={self.socks}\nTOR_CONTROL={self.control}\n")
        except BaseException:
            self.stop()
            raise

    def _plan(self) -> None:
        names = [(f"auth{i}", "authority") for i in range(AUTHORITIES)]
        names += [(f"relay{i}", "relay") for i in range(self.relays)]
        names += [("hs", "hs"), ("client", "client")]
        ports = iter(free_ports(2 * AUTHORITIES + self.relays + 3))
        for name, kind in names:
            d = self.base / name
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(mode=0o700)
            n = TorNode(name, kind, d)
            if kind in ("authority", "relay"):
                n.or_port = next(ports)
            if kind == "authority":
                n.dir_port = next(ports)
            if kind in ("hs", "client"):
                n.control_port = next(ports)
            if kind == "client":
                n.socks_port = next(ports)
            self.nodes.append(n)

    def _make_authority_keys(self, tor: str, gencert: str) -> None:
        empty = self.base / "empty-torrc"
        empty.write_text("")
        auths = [n for n in self.nodes if n.kind == "authority"]
        procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        # `tor --list-fingerprint` only makes the relay identity key and exits. It too runs
        # as a test-network tor with the network disabled; its DirAuthority is a placeholder
        # (the real ones need the keys made here).
        placeholder = f"placeholder orport=1 no-v2 {LOCALHOST}:1 {'0' * 40}"
        for a in auths:
            keys = a.dir / "keys"
            keys.mkdir(mode=0o700)
            procs.append(("tor-gencert", subprocess.Popen(
                [gencert, "--create-identity-key", "--passphrase-fd", "0", "-m", "12",
                 "-a", f"{LOCALHOST}:{a.dir_port}",
                 "-i", str(keys / "authority_identity_key"),
                 "-s", str(keys / "authority_signing_key"),
                 "-c", str(keys / "authority_certificate")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=a.dir,
            )))
            procs.append(("tor --list-fingerprint", subprocess.Popen(
                [tor, "--ignore-missing-torrc", "-f", str(empty), "--defaults-torrc", str(empty),
                 "--TestingTorNetwork", "1", "--DisableNetwork", "1", "--DirAuthority", placeholder,
                 "--UseDefaultFallbackDirs", "0", "--DataDirectory", str(a.dir),
                 "--ORPort", f"{LOCALHOST}:{a.or_port}", "--Address", LOCALHOST, "--SocksPort", "0",
                 "--Log", "err stderr", "--list-fingerprint"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=a.dir,
            )))
        for what, p in procs:
            try:
                out, _ = p.communicate(input=b"\n" if p.stdin else None, timeout=KEYGEN_TIMEOUT)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                raise TorNetError(f"{what} did not finish in time") from None
            if p.returncode != 0:
                raise TorNetError(f"{what} failed: {out.decode(errors='replace').strip()[-300:]}")
        for a in auths:
            cert = (a.dir / "keys" / "authority_certificate").read_text()
            a.v3ident = re.search(r"^fingerprint ([0-9A-F]{40})$", cert, re.M).group(1)  # type: ignore[union-attr]
            a.fingerprint = (a.dir / "fingerprint").read_text().split()[1]

    def _write_torrcs(self) -> None:
        auths = [n for n in self.nodes if n.kind == "authority"]
        for n in self.nodes:
            n.torrc.write_text("\n".join(common_lines(n, auths)) + "\n")
        # For a tor that someone else starts in this network (`veil relay serve --onion
        # --launch-tor --torrc DIR/launch.torrc`): the network, without ports or paths.
        (self.base / LAUNCH_TORRC).write_text("\n".join(network_lines(auths)) + "\n")

    def _launch(self, tor: str, n: TorNode) -> None:
        with open(n.dir / "stderr.log", "wb") as log:  # the child keeps its own descriptor
            owner = ["__OwningControllerProcess", str(self.owner)] if self.owner else []
            proc = subprocess.Popen(
                [tor, "-f", str(n.torrc), "--defaults-torrc", str(self.base / "empty-torrc"), *owner],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=n.dir,
                start_new_session=True,  # survives `scripts/tornet start` returning; no terminal signals
            )
        self.procs[proc.pid] = proc
        with open(self.base / PIDS_FILE, "a") as f:
            f.write(f"{proc.pid} {n.name}\n")
            f.flush()
            os.fsync(f.fileno())

    def _check_alive(self) -> None:
        for pid, proc in self.procs.items():
            if proc.poll() is not None:
                name = next((ln.split()[1] for ln in (self.base / PIDS_FILE).read_text().splitlines()
                             if ln.split()[0] == str(pid)), "?")
                tail = (self.base / name / "notice.log")
                detail = tail.read_text(errors="replace").strip().splitlines()[-3:] if tail.exists() else []
                raise TorNetError(f"tor {name} exited with {proc.returncode}: {' | '.join(detail)}")

    def _wait_ready(self, deadline: float) -> None:
        for name in ("hs", "client"):
            self._wait_bootstrapped(name, deadline)
            self.timings[f"{name} bootstrapped"] = time.monotonic() - self.started_at
        self.probe(deadline)

    def _wait_bootstrapped(self, name: str, deadline: float) -> None:
        ctl = self._control(name, deadline)
        try:
            for _ in range(int(max(0.0, deadline - time.monotonic()) / CHECK_EVERY) + 2):
                self._check_alive()  # between waits: a tor that died fails at once
                try:
                    ctl.wait_bootstrapped(min(deadline, time.monotonic() + CHECK_EVERY))
                    return
                except TimeoutError:
                    if time.monotonic() >= deadline:
                        break
            raise TorNetError(f"tor {name} did not bootstrap in time")
        finally:
            ctl.close()

    def _control(self, name: str, deadline: float) -> Control:
        """A control connection to ``name``, once its control port is open."""
        last: Exception | None = None
        for _ in range(1000):
            self._check_alive()
            if time.monotonic() >= deadline:
                break
            try:
                return Control(self.node(name).control_port)
            except (OSError, TorNetError) as exc:  # not listening yet, or no cookie yet
                last = exc
            time.sleep(0.05)  # poll interval while tor opens its control port
        raise TorNetError(f"no control connection to tor {name} ({last})")

    def probe(self, deadline: float) -> None:
        """Publish a throwaway onion service on the hs tor and make one round trip to it
        through the client tor; removes the service afterwards."""
        ctl = self._control("hs", deadline)
        with echo_server() as echo_port:
            try:
                ctl.command("SETEVENTS HS_DESC")
                reply = ctl.command(
                    f"ADD_ONION NEW:ED25519-V3 Flags=DiscardPK Port=80,{LOCALHOST}:{echo_port}"
                )
                service_id = next(ln.split("=", 1)[1] for ln in reply if ln.startswith("ServiceID="))
                try:
                    ctl.wait_event(lambda e: e.startswith(f"HS_DESC UPLOADED {service_id}"), deadline)
                except TimeoutError:
                    raise TorNetError("the probe onion service was not published in time") from None
                self.timings["probe published"] = time.monotonic() - self.started_at
                onion_round_trip(self.node("client").socks_port, f"{service_id}.onion", deadline)
                ctl.command(f"DEL_ONION {service_id}")
            finally:
                ctl.close()

    # ---- stopping ----------------------------------------------------------------------
    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        self.procs.clear()
        stop_network(self.base)  # anything else recorded in the pid files


def _our_tor(pid: int, base: Path) -> bool:
    """True if ``pid`` is a live (not zombie) tor whose torrc lies inside ``base``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z" or not cmdline or Path(os.fsdecode(cmdline[0])).name != "tor":
        return False
    return any(os.fsdecode(a).startswith(str(base) + os.sep) for a in cmdline[1:])


def recorded_pids(base: Path) -> set[int]:
    """Every process id the network in ``base`` recorded: ``pids`` and the tors' PidFiles."""
    pids: set[int] = set()
    files = [base / PIDS_FILE, *base.glob("*/tor.pid")]
    for f in files:
        try:
            for line in f.read_text().splitlines():
                if line.split() and line.split()[0].isdigit():
                    pids.add(int(line.split()[0]))
        except OSError:
            pass
    return pids


def stop_network(base: Path) -> list[int]:
    """Stop every tor recorded in ``base`` (by process id, and only if it still is one of
    this network's tors); returns the ids that were signalled."""
    base = base.resolve()
    live = [pid for pid in sorted(recorded_pids(base)) if _our_tor(pid, base)]
    for pid in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for _ in range(int(STOP_TIMEOUT / 0.05) + 1):
        if not any(_our_tor(pid, base) for pid in live) or time.monotonic() >= deadline:
            break
        time.sleep(0.05)  # poll interval: these are not our children, so no wait()
    for pid in live:
        if _our_tor(pid, base):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        (base / PIDS_FILE).unlink()
    with contextlib.suppress(FileNotFoundError):
        (base / ENV_FILE).unlink()
    return live


# ---- the command -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tornet", description="A private Tor network on 127.0.0.1.")
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("dir", type=Path, help="the network's directory (keys, torrcs, logs, pids)")
    p.add_argument("--relays", type=int, default=RELAYS, help=f"relays besides the authorities ({RELAYS})")
    p.add_argument("--timeout", type=float, default=START_TIMEOUT, help="seconds to wait for the network")
    args = p.parse_args(argv)
    if args.action == "stop":
        stopped = stop_network(args.dir)
        print(f"stopped {len(stopped)} tor process(es)")
        return 0
    net = TorNet(args.dir, relays=args.relays)
    try:
        net.start(args.timeout)
    except TorNetError as exc:
        print(f"tornet: error: {exc}", file=sys.stderr)
        return 1
    print(f"socks {net.socks}")
    print(f"control {net.control}")
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in net.timings.items())
    print(f"ready after {net.ready_after:.1f}s ({steps}); settings in {net.base / ENV_FILE}; "
          f"stop with: scripts/tornet stop {args.dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
