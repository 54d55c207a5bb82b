"""`veil send` and `veil recv` while another process holds the device, through the home's
control socket: real `veil daemon` / `veil recv --follow` processes and a real relay."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from node.control import CONTROL_FILE, MAX_LINE
from tests.test_cli import (
    ROOT,
    TIMEOUT,
    VEIL,
    RelayProcess,
    User,
    assert_one_line_error,
    env_for,
    read_line_until,
    registered,
    start_relay,
    stop_relay,
)


class Holder:
    """A `veil` process that holds a home and stays online (daemon, recv --follow)."""

    def __init__(self, user: User, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*VEIL, "--home", str(user.home), "--password-file", str(user.password_file), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_for(user.tmp), cwd=ROOT,
        )
        assert self.proc.stderr is not None
        deadline = time.monotonic() + TIMEOUT
        while True:  # "online" is printed once the control socket is up as well
            line = self.proc.stderr.readline()
            assert line, f"{args} ended before it was online"
            if "online" in line:
                break
            assert time.monotonic() < deadline

    def stop(self, sig: int = signal.SIGTERM) -> tuple[str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, err = self.proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return out, err


def no_password(user: User, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`veil --home HOME ARGS` with no password at all (no file, no terminal)."""
    res = subprocess.run([*VEIL, "--home", str(user.home), *args], capture_output=True, text=True,
                         timeout=TIMEOUT, env=env_for(user.tmp), cwd=ROOT, stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise AssertionError(f"veil {args} failed: {res.stderr}")
    return res


def texts(res: subprocess.CompletedProcess[str]) -> list[str]:
    return [json.loads(line)["text"] for line in res.stdout.splitlines()]


def test_send_and_recv_go_through_a_running_daemon(relay_proc: RelayProcess, tmp_path: Path) -> None:
    alice, bob = registered(tmp_path, relay_proc, "alice", "bob")
    alice.veil("send", "bob", "before the daemon")
    daemon = Holder(bob, "daemon")
    try:
        sock = bob.home / CONTROL_FILE
        assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(bob.home.stat().st_mode) == 0o700
        # No password needed: the daemon has unlocked the device.
        assert "sent to alice (sent)" in no_password(bob, "send", "alice", "through", "the", "daemon").stdout
        assert texts(alice.veil("recv", "--json")) == ["through the daemon"]
        alice.veil("send", "bob", "while the daemon runs")
        # The daemon received both; recv hands out each exactly once, oldest first.
        got = no_password(bob, "recv", "--json", "--wait", "30")
        assert texts(got) == ["before the daemon", "while the daemon runs"]
        assert no_password(bob, "recv", "--json").stdout == ""
        # --wait waits on the daemon for the next message.
        waiting = subprocess.Popen([*VEIL, "--home", str(bob.home), "recv", "--json", "--wait", "50"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=env_for(tmp_path), cwd=ROOT)
        alice.veil("send", "bob", "wake up")
        out, err = waiting.communicate(timeout=TIMEOUT)
        assert waiting.returncode == 0, err
        assert [json.loads(x)["text"] for x in out.splitlines()] == ["wake up"]
    finally:
        _, err = daemon.stop()
    assert "Traceback" not in err
    assert not (bob.home / CONTROL_FILE).exists()  # the daemon removed its socket
    assert no_password(bob, "recv", check=False).returncode != 0  # and now a password is needed again


def test_recv_follow_through_the_daemon_and_a_second_follower(relay_proc: RelayProcess, tmp_path: Path) -> None:
    alice, bob = registered(tmp_path, relay_proc, "alice", "bob")
    daemon = Holder(bob, "daemon")
    follower = subprocess.Popen([*VEIL, "--home", str(bob.home), "recv", "--follow", "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env_for(tmp_path), cwd=ROOT)
    try:
        alice.veil("send", "bob", "first")
        assert json.loads(read_line_until(follower, "{", time.monotonic() + TIMEOUT))["text"] == "first"
        # Only one consumer of the device's messages at a time.
        res = no_password(bob, "recv", check=False)
        assert_one_line_error(res, "already being printed by `veil daemon`")
        alice.veil("send", "bob", "second")
        assert json.loads(read_line_until(follower, "{", time.monotonic() + TIMEOUT))["text"] == "second"
        follower.send_signal(signal.SIGINT)
        out, err = follower.communicate(timeout=TIMEOUT)
        assert follower.returncode == 0 and out == "" and "Traceback" not in err
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate()
        daemon.stop()
    assert bob.veil("recv", "--json").stdout == ""  # both were handed out, once


def test_a_follow_process_takes_sends_too(relay_proc: RelayProcess, tmp_path: Path) -> None:
    alice, bob = registered(tmp_path, relay_proc, "alice", "bob")
    follow = Holder(bob, "recv", "--follow")
    try:
        assert "sent to alice" in no_password(bob, "send", "alice", "from a bot").stdout
        res = no_password(bob, "recv", check=False)
        assert_one_line_error(res, "already being printed by `veil recv --follow`")
    finally:
        follow.stop(signal.SIGINT)
    assert texts(alice.veil("recv", "--json")) == ["from a bot"]


def test_commands_that_need_the_store_name_the_holder(relay_proc: RelayProcess, tmp_path: Path) -> None:
    (bob,) = registered(tmp_path, relay_proc, "bob")
    daemon = Holder(bob, "daemon")
    try:
        assert_one_line_error(bob.veil("contacts", check=False),
                              f"is in use by `veil daemon` (pid {daemon.proc.pid})")
    finally:
        daemon.stop()


def test_a_stale_socket_left_by_a_killed_holder_is_harmless(relay_proc: RelayProcess, tmp_path: Path) -> None:
    alice, bob = registered(tmp_path, relay_proc, "alice", "bob")
    daemon = Holder(bob, "daemon")
    daemon.stop(signal.SIGKILL)
    assert (bob.home / CONTROL_FILE).exists()  # left behind; the lock died with the process
    bob.veil("send", "alice", "direct again")  # not in use: straight to the relay
    daemon = Holder(bob, "daemon")  # and a new holder takes the socket over
    try:
        assert "sent to alice" in no_password(bob, "send", "alice", "through the new one").stdout
    finally:
        daemon.stop()
    assert texts(alice.veil("recv", "--json")) == ["direct again", "through the new one"]


def _ask(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(str(path))
        chunks = []
        try:
            s.sendall(data)
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, BrokenPipeError):
            pass  # the holder hung up on us
        return b"".join(chunks)


def test_garbage_on_the_control_socket_gets_an_error_and_the_holder_lives_on(
    relay_proc: RelayProcess, tmp_path: Path
) -> None:
    alice, bob = registered(tmp_path, relay_proc, "alice", "bob")
    daemon = Holder(bob, "daemon")
    sock = bob.home / CONTROL_FILE
    try:
        for data in (b"not json\n", b"[1, 2]\n", b'{"op": "explode"}\n', b'{"op": "send", "to": 5}\n',
                     b'{"op": "recv", "wait": -1}\n', b'{"op": "send", "to": "x!", "text": "hi"}\n'):
            answer = json.loads(_ask(sock, data).splitlines()[0])
            assert answer["ok"] is False and answer["error"], (data, answer)
        # A line longer than the limit: the holder hangs up without reading it all.
        assert _ask(sock, b"x" * (MAX_LINE + 100_000)) == b""
        status = json.loads(_ask(sock, b'{"op": "status"}\n'))
        assert status["ok"] is True and status["status"] == "online" and "veil daemon" in status["holder"]
        assert "sent to alice" in no_password(bob, "send", "alice", "still here").stdout
    finally:
        _, err = daemon.stop()
    assert "Traceback" not in err
    assert texts(alice.veil("recv", "--json")) == ["still here"]


def test_another_user_is_refused_even_where_the_socket_is_reachable(
    relay_proc: RelayProcess, tmp_path: Path
) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root, to connect as another user")
    (bob,) = registered(tmp_path, relay_proc, "bob")
    daemon = Holder(bob, "daemon")
    sock = bob.home / CONTROL_FILE
    try:
        # Open the way on purpose (the home is 0700 and the socket 0600): only the
        # SO_PEERCRED check is left between a stranger and the device.
        for p in (sock, *sock.parents):
            if p == Path("/"):
                break
            p.chmod(p.stat().st_mode | 0o005 if p.is_dir() else 0o666)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: become "nobody" and ask
            try:
                os.close(read)
                os.setgid(65534)
                os.setuid(65534)
                os.write(write, _ask(sock, b'{"op": "status"}\n') or b"(hung up)")
            except BaseException as exc:
                os.write(write, f"child failed: {exc!r}".encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as r:
            answer = r.read()
        os.waitpid(pid, 0)
        assert json.loads(answer) == {"ok": False, "error": "not this device's user"}
    finally:
        daemon.stop()


def test_a_daemon_without_its_relay_queues_sends_and_delivers_them_later(tmp_path: Path) -> None:
    rp = start_relay(tmp_path)
    port = urlsplit(rp.url).port
    alice, bob = registered(tmp_path, rp, "alice", "bob")
    daemon = Holder(bob, "daemon")
    try:
        stop_relay(rp)
        started = time.monotonic()
        res = no_password(bob, "send", "alice", "while the relay is down")
        assert "queued for alice" in res.stdout and "next time this device is online" in res.stdout
        assert time.monotonic() - started < TIMEOUT
        rp = start_relay(tmp_path, port)  # the daemon reconnects by itself and sends it
        deadline = time.monotonic() + TIMEOUT
        got: list[str] = []
        while not got:
            assert time.monotonic() < deadline, "the queued message never arrived"
            got = texts(alice.veil("recv", "--json", "--wait", "5"))
        assert got == ["while the relay is down"]
    finally:
        daemon.stop()
        stop_relay(rp)


def _caller(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect(str(path))
    return s


def test_recv_through_the_holder_marks_only_what_the_caller_printed(
    relay_proc: RelayProcess, tmp_path: Path
) -> None:
    alice, bob = registered(tmp_path, relay_proc, "alice", "bob")
    daemon = Holder(bob, "daemon")
    try:
        for i in range(3):
            alice.veil("send", "bob", f"m{i}")
        # `head -1` closes the pipe after one line: the other two were never printed.
        cmd = " ".join([*VEIL, "--home", str(bob.home), "recv", "--json", "--wait", "30", "|", "head", "-1"])
        done = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=TIMEOUT,
                              env=env_for(tmp_path), cwd=ROOT)
        assert [json.loads(x)["text"] for x in done.stdout.splitlines()] == ["m0"]
        # A caller that asks and hangs up without reading takes nothing either.
        s = _caller(bob.home / CONTROL_FILE)
        s.sendall(b'{"op": "recv"}\n')
        s.close()
        # Nor one that asks to follow and goes away while nothing arrives: the next recv
        # is not told that someone else is printing.
        s = _caller(bob.home / CONTROL_FILE)
        s.sendall(b'{"op": "recv", "follow": true}\n')
        first = json.loads(s.makefile("rb").readline())
        assert first["message"]["text"] == "m1"  # not acknowledged, so not taken
        s.close()
        assert texts(no_password(bob, "recv", "--json")) == ["m1", "m2"]
        assert no_password(bob, "recv", "--json").stdout == ""
    finally:
        daemon.stop()


def test_a_deeply_nested_line_does_not_stop_the_holder(relay_proc: RelayProcess, tmp_path: Path) -> None:
    _, bob = registered(tmp_path, relay_proc, "alice", "bob")
    daemon = Holder(bob, "daemon")
    try:
        answer = json.loads(_ask(bob.home / CONTROL_FILE, b"[" * 100_000 + b"\n"))
        assert answer["ok"] is False
        assert "sent to alice" in no_password(bob, "send", "alice", "still alive").stdout
    finally:
        _, err = daemon.stop()
    assert "Traceback" not in err and "internal error" not in err


def test_a_follower_whose_output_nobody_reads_still_answers_and_stops(
    relay_proc: RelayProcess, tmp_path: Path
) -> None:
    alice, bob = registered(tmp_path, relay_proc, "alice", "bob")
    follower = Holder(bob, "recv", "--follow", "--json")  # its stdout is a pipe we never read
    try:
        for i in range(6):  # more than a pipe holds (64 KiB)
            alice.veil("send", "bob", f"{i} " + "x" * 20_000)
        assert "sent to alice" in no_password(bob, "send", "alice", "the loop is not stuck").stdout
        follower.proc.send_signal(signal.SIGTERM)
        follower.proc.wait(timeout=TIMEOUT)
    finally:
        follower.stop()
    assert texts(alice.veil("recv", "--json")) == ["the loop is not stuck"]
    # What the follower could not print is printed by the next recv (nothing is lost).
    printed = bob.veil("recv", "--json")
    assert len(texts(printed)) >= 1
    assert texts(printed)[-1].startswith("5 ")


def test_a_home_open_to_others_is_closed_or_refused(relay_proc: RelayProcess, tmp_path: Path) -> None:
    open_empty = tmp_path / "open-empty"
    open_empty.mkdir(mode=0o777)
    open_empty.chmod(0o777)
    u = User(tmp_path, "dora")
    u.home = open_empty
    u.veil("register", "dora", "--relay", relay_proc.url)
    assert stat.S_IMODE(open_empty.stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    (shared / "notes.txt").write_text("someone else's files")
    v = User(tmp_path, "erin")
    v.home = shared
    res = v.veil("register", "erin", "--relay", relay_proc.url, check=False)
    assert_one_line_error(res, "is open to other users (mode 755) and is not a Veil home")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755  # not changed


def test_logout_local_clears_a_home_whose_relay_is_gone(tmp_path: Path) -> None:
    rp = start_relay(tmp_path)
    (alice,) = registered(tmp_path, rp, "alice")
    stop_relay(rp)
    assert_one_line_error(alice.veil("logout", check=False), "cannot reach the relay")
    out = alice.veil("logout", "--local").stdout
    assert "without the relay" in out
    assert not (alice.home / "device.json").exists() and not (alice.home / "store.db").exists()
    rp = start_relay(tmp_path / "another")  # a new relay: the same home can register again
    try:
        alice.veil("register", "alice", "--relay", rp.url)
    finally:
        stop_relay(rp)
