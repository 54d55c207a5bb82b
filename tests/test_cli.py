"""The `veil` command as a user runs it: real processes, a real relay process."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import unicodedata
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import pytest

VEIL = [sys.executable, "-m", "cli.main"]
ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60


_PUMPS: weakref.WeakKeyDictionary[IO[str], queue.Queue[str | None]] = weakref.WeakKeyDictionary()


def _lines_of(stream: IO[str]) -> queue.Queue[str | None]:
    """The lines of ``stream``, read by a thread of their own into a queue (None at the
    end): a select() on the pipe would miss lines already read into the file's buffer."""
    q = _PUMPS.get(stream)
    if q is None:
        q = _PUMPS[stream] = queue.Queue()

        def pump(q: queue.Queue[str | None] = q) -> None:
            try:
                for line in stream:
                    q.put(line)
            except (ValueError, OSError):  # closed by the test while we read
                pass
            q.put(None)

        threading.Thread(target=pump, daemon=True).start()
    return q


def read_line_until(proc: subprocess.Popen[str], prefix: str, deadline: float, *, stderr: bool = False) -> str:
    """Read the process's stdout (or stderr) until a line starts with ``prefix`` (or fail at
    the deadline)."""
    stream = proc.stderr if stderr else proc.stdout
    assert stream is not None
    lines = _lines_of(stream)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no line starting with {prefix!r} in time")
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            continue
        if line is None:
            lines.put(None)  # the end, for any later reader too
            raise AssertionError(f"process ended before printing {prefix!r}")
        if line.startswith(prefix):
            return line.strip()


@dataclass
class RelayProcess:
    proc: subprocess.Popen[str]
    url: str
    data_dir: Path


def env_for(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["VEIL_KDF_PROFILE"] = "test"
    env.pop("VEIL_PASSWORD_FILE", None)
    env.pop("VEIL_DEBUG", None)
    env["PYTHONPATH"] = str(ROOT)
    return env


def start_relay(tmp: Path, port: int = 0, *extra: str, data: Path | None = None) -> RelayProcess:
    data = data or tmp / "relay"
    proc = subprocess.Popen(
        [*VEIL, "relay", "serve", "--port", str(port), "--data-dir", str(data), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_for(tmp), cwd=ROOT,
    )
    line = read_line_until(proc, "relay listening on ", time.monotonic() + TIMEOUT)
    return RelayProcess(proc, line.removeprefix("relay listening on "), data)


def stop_relay(rp: RelayProcess) -> None:
    """SIGTERM, wait (SIGKILL if it hangs), close its pipes."""
    if rp.proc.poll() is None:
        rp.proc.send_signal(signal.SIGTERM)
        try:
            rp.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            rp.proc.kill()
            rp.proc.wait()
    for f in (rp.proc.stdout, rp.proc.stderr):
        if f:
            f.close()


class User:
    def __init__(self, tmp: Path, name: str, password: str = "pw for tests") -> None:
        self.tmp = tmp
        self.name = name
        self.home = tmp / f"home-{name}"
        self.password_file = tmp / f"pw-{name}"
        self.password_file.write_text(password + "\n")

    def veil(self, *args: str, password_file: Path | None = None, check: bool = True,
             stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [*VEIL, "--home", str(self.home), "--password-file", str(password_file or self.password_file), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env_for(self.tmp),
                             cwd=ROOT, input=stdin)
        if check and res.returncode != 0:
            raise AssertionError(f"veil {args} failed: {res.stderr}")
        return res


def registered(tmp: Path, relay: RelayProcess, *names: str) -> list[User]:
    """Users with accounts on ``relay`` (registered through `veil`)."""
    users = [User(tmp, n) for n in names]
    for u in users:
        u.veil("register", u.name, "--relay", relay.url)
    return users


def assert_one_line_error(res: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if not ln.startswith("veil: warning:")]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("veil: error: ")
    assert fragment.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in res.stderr


def test_register_send_recv_json(relay_proc: RelayProcess, tmp_path: Path) -> None:
    alice, bob = User(tmp_path, "alice"), User(tmp_path, "bob")
    out = alice.veil("register", "alice", "--relay", relay_proc.url).stdout
    assert "recovery code:" in out
    bob.veil("register", "bob", "--relay", relay_proc.url)
    alice.veil("send", "bob", "hello from the command line")
    alice.veil("send", "bob", "-", stdin="from stdin\nsecond line")
    res = bob.veil("recv", "--json")
    msgs = [json.loads(line) for line in res.stdout.splitlines()]
    assert [m["text"] for m in msgs] == ["hello from the command line", "from stdin\nsecond line"]
    for m in msgs:
        assert m["from"] == "alice"
        assert len(bytes.fromhex(m["id"])) == 16
        assert abs(m["sent_at"] / 1000 - time.time()) < 600
    # Nothing twice.
    assert bob.veil("recv", "--json").stdout == ""
    bob.veil("send", "alice", "back at you")
    plain = alice.veil("recv").stdout
    assert "bob: back at you" in plain
    contacts = alice.veil("contacts").stdout
    assert "bob" in contacts and "unverified" in contacts
    verify = alice.veil("verify", "bob", "--mark").stdout
    digits = "".join(ch for ch in verify.split(":", 1)[1] if ch.isdigit())
    assert len(digits) == 60
    assert "bob  verified" in alice.veil("contacts").stdout
    # Bob sees the same safety number.
    bob_digits = "".join(ch for ch in bob.veil("verify", "alice").stdout.split(":", 1)[1] if ch.isdigit())
    assert bob_digits == digits


def test_second_device_and_devices_listing(relay_proc: RelayProcess, tmp_path: Path) -> None:
    alice, bob = User(tmp_path, "alice"), User(tmp_path, "bob")
    phone = User(tmp_path, "alice-phone")
    phone.password_file.write_text(alice.password_file.read_text())
    alice.veil("register", "alice", "--relay", relay_proc.url)
    bob.veil("register", "bob", "--relay", relay_proc.url)
    phone.veil("login", "alice", "--relay", relay_proc.url)
    assert len(alice.veil("devices").stdout.splitlines()) == 2
    phone.veil("send", "bob", "from my phone")
    mine = [json.loads(x) for x in alice.veil("recv", "--json").stdout.splitlines()]
    assert mine == [{**mine[0], "from": "alice", "to": "bob", "text": "from my phone", "outgoing": True}]
    assert "from my phone" in bob.veil("recv").stdout
    phone.veil("logout")
    assert len(alice.veil("devices").stdout.splitlines()) == 1


def test_recv_output_cannot_be_forged_by_a_body(relay_proc: RelayProcess, tmp_path: Path) -> None:
    """A body with newlines, carriage returns or escapes cannot print a line that looks
    like a message from someone else: continuation lines are indented, controls inert."""
    mallory, alice = User(tmp_path, "mallory"), User(tmp_path, "alice")
    mallory.veil("register", "mallory", "--relay", relay_proc.url)
    alice.veil("register", "alice", "--relay", relay_proc.url)
    forged = "ok\n[2026-12-02 06:00] bob: please send me the door code\rbob: \x1b[2Kand again"
    mallory.veil("send", "alice", "-", stdin=forged)
    lines = alice.veil("recv").stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[") and lines[0].endswith("] mallory: ok")
    assert lines[1].startswith("    [2026-12-02 06:00] bob: ")
    assert "\r" not in lines[1] and "\x1b" not in lines[1]
    assert "\\x0d" in lines[1] and "\\x1b" in lines[1]


def test_recv_wait_returns_when_a_message_arrives(relay_proc: RelayProcess, tmp_path: Path) -> None:
    alice, bob = User(tmp_path, "alice"), User(tmp_path, "bob")
    alice.veil("register", "alice", "--relay", relay_proc.url)
    bob.veil("register", "bob", "--relay", relay_proc.url)
    waiting = subprocess.Popen(
        [*VEIL, "--home", str(bob.home), "--password-file", str(bob.password_file), "recv", "--json", "--wait", "50"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_for(tmp_path), cwd=ROOT,
    )
    try:
        alice.veil("send", "bob", "wake up")
        out, err = waiting.communicate(timeout=TIMEOUT)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
    assert waiting.returncode == 0, err
    assert json.loads(out.splitlines()[0])["text"] == "wake up"


def test_errors_are_one_line(relay_proc: RelayProcess, tmp_path: Path) -> None:
    alice = User(tmp_path, "alice")
    alice.veil("register", "alice", "--relay", relay_proc.url)
    wrong = tmp_path / "wrong"
    wrong.write_text("not it\n")
    before = (alice.home / "store.db").read_bytes()
    assert_one_line_error(alice.veil("recv", password_file=wrong, check=False), "wrong password")
    assert (alice.home / "store.db").read_bytes() == before
    assert_one_line_error(alice.veil("send", "nobody", "hi", check=False), "no such user")
    too_big = "x" * 70_000
    assert_one_line_error(alice.veil("send", "alice", too_big, check=False), "too large")
    other = User(tmp_path, "other")
    assert_one_line_error(other.veil("register", "alice", "--relay", relay_proc.url, check=False), "taken")
    assert not (other.home / "device.json").exists()
    assert_one_line_error(other.veil("login", "alice", "--relay", relay_proc.url, password_file=wrong,
                                     check=False), "wrong password or unknown user")
    assert_one_line_error(other.veil("send", "bob", "hi", check=False), "no account on this device")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    assert_one_line_error(
        other.veil("register", "carol", "--relay", f"ws://127.0.0.1:{closed_port}", check=False),
        "cannot reach the relay",
    )
    assert_one_line_error(other.veil("register", "x!", "--relay", relay_proc.url, check=False), "username")
    # No password file and no terminal.
    res = subprocess.run([*VEIL, "--home", str(alice.home), "recv"], capture_output=True, text=True,
                         timeout=TIMEOUT, env=env_for(tmp_path), cwd=ROOT, stdin=subprocess.DEVNULL)
    assert_one_line_error(res, "password")


def test_relay_stops_on_sigterm_and_keeps_mail(tmp_path: Path) -> None:
    rp = start_relay(tmp_path)
    alice, bob = User(tmp_path, "alice"), User(tmp_path, "bob")
    try:
        alice.veil("register", "alice", "--relay", rp.url)
        bob.veil("register", "bob", "--relay", rp.url)
        alice.veil("send", "bob", "survives a restart")
    finally:
        rp.proc.send_signal(signal.SIGTERM)
        rp.proc.wait(timeout=TIMEOUT)
        stderr = rp.proc.stderr.read() if rp.proc.stderr else ""
        for f in (rp.proc.stdout, rp.proc.stderr):
            if f:
                f.close()
    assert rp.proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "alice" not in stderr and "bob" not in stderr  # the relay logs no usernames
    port = urlsplit(rp.url).port
    rp2 = start_relay(tmp_path, port)
    try:
        assert "survives a restart" in bob.veil("recv").stdout
    finally:
        rp2.proc.send_signal(signal.SIGTERM)
        rp2.proc.wait(timeout=TIMEOUT)
        for f in (rp2.proc.stdout, rp2.proc.stderr):
            if f:
                f.close()


def test_relay_start_errors_are_one_line(relay_proc: RelayProcess, tmp_path: Path) -> None:
    # A second relay on the same data directory.
    res = subprocess.run([*VEIL, "relay", "serve", "--port", "0", "--data-dir", str(relay_proc.data_dir)],
                         capture_output=True, text=True, timeout=TIMEOUT, env=env_for(tmp_path), cwd=ROOT)
    assert_one_line_error(res, "another relay is running")
    # A key that does not open the database.
    env = env_for(tmp_path) | {"VEIL_RELAY_KEY": "00" * 32}
    other = tmp_path / "copy"
    other.mkdir()
    (other / "relay.db").write_bytes((relay_proc.data_dir / "relay.db").read_bytes())
    res = subprocess.run([*VEIL, "relay", "serve", "--port", "0", "--data-dir", str(other)],
                         capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT)
    assert_one_line_error(res, "does not open")
    res = subprocess.run([*VEIL, "relay", "serve", "--port", "0", "--data-dir", str(other)],
                         capture_output=True, text=True, timeout=TIMEOUT,
                         env=env | {"VEIL_RELAY_KEY": "xyz"}, cwd=ROOT)
    assert_one_line_error(res, "64 hexadecimal digits")


def test_recv_rows_fit_the_terminal_so_padding_cannot_reach_the_margin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A body padded to exactly the terminal's width would wrap there and print its rest
    at the left margin, like a new message: on a terminal recv cuts rows itself."""
    from cli.messages import print_message

    monkeypatch.setattr(shutil, "get_terminal_size", lambda *a: os.terminal_size((40, 24)))
    monkeypatch.setattr(os, "get_terminal_size", lambda *a: os.terminal_size((40, 24)))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    forged = " " * 60 + "[2026-12-02 06:00] bob: the door code?\n界" * 30
    print_message({"from": "mallory", "to": "alice", "outgoing": False, "sent_at": 0, "text": forged}, False)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[")
    for row in out[1:]:
        assert row.startswith("    "), row
    for row in out:
        assert sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in row) <= 39, row
