"""A newcomer's first hour with the `veil` command, as they run it: real `veil` processes
(some in pseudo-terminals, to answer prompts), a real relay process on 127.0.0.1."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pexpect
import pytest

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

PROMPT_TIMEOUT = 30


def pty(user_or_home: User | Path, *args: str) -> pexpect.spawn:
    """`veil --home HOME ARGS` in a pseudo-terminal, with no password file."""
    home = user_or_home.home if isinstance(user_or_home, User) else user_or_home
    tmp = user_or_home.tmp if isinstance(user_or_home, User) else user_or_home.parent
    return pexpect.spawn(
        sys.executable, ["-m", "cli.main", "--home", str(home), *args],
        env=env_for(tmp), cwd=str(ROOT), encoding="utf-8", timeout=PROMPT_TIMEOUT, dimensions=(24, 200),
    )


def finish(p: pexpect.spawn) -> tuple[str, int | None]:
    """Everything the process printed until it ended, and its exit status."""
    p.expect(pexpect.EOF)
    out = p.before or ""
    p.close()
    return out, p.exitstatus


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- cheap checks come before the password prompt ----------------------------------------


def test_no_account_is_reported_before_the_password_is_asked(tmp_path: Path) -> None:
    p = pty(tmp_path / "empty-home", "recv")
    out, status = finish(p)
    assert "password" not in out.lower().split("error:")[0]
    assert "veil: error: no account on this device" in out
    assert status == 1 and "Traceback" not in out


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["register", "no way!", "--relay", "ws://127.0.0.1:1"], "is not a valid name"),
        (["register", "alice", "--relay", "http://127.0.0.1:1"], "the scheme must be wss:// or ws://"),
        (["register", "alice", "--relay", "127.0.0.1:1"], "is not a relay address"),
        (["register", "alice", "--relay", "wss://127.0.0.1:1/v2"], "without a path"),
        (["register", "alice", "--relay", "wss://127.0.0.1:1#tooshort"], "the key pin after # is 52 base32 letters"),
        (["register", "alice", "--relay", "ws://192.0.2.7:1"], "is plain ws:// to a host"),
        (["login", "x", "--relay", "ws://127.0.0.1:1"], "is not a valid name"),
    ],
)
def test_malformed_names_and_addresses_are_refused_before_the_password(
    tmp_path: Path, args: list[str], fragment: str
) -> None:
    out, status = finish(pty(tmp_path / "home", *args))
    assert "master password" not in out
    assert status == 1 and fragment in out and "Traceback" not in out
    assert not (tmp_path / "home" / "device.json").exists()


def test_a_taken_name_and_an_unreachable_relay_are_reported_before_the_password(
    relay_proc: RelayProcess, tmp_path: Path
) -> None:
    registered(tmp_path, relay_proc, "alice")
    out, status = finish(pty(tmp_path / "other", "register", "alice", "--relay", relay_proc.url))
    assert "master password" not in out
    assert status == 1 and "the name alice is taken" in out
    out, status = finish(pty(tmp_path / "other", "register", "carol", "--relay", f"ws://127.0.0.1:{closed_port()}"))
    assert "master password" not in out
    assert status == 1 and "cannot reach the relay" in out
    assert not (tmp_path / "other" / "device.json").exists()


def test_a_relay_url_with_a_wrong_path_is_one_line(relay_proc: RelayProcess, tmp_path: Path) -> None:
    (alice,) = registered(tmp_path, relay_proc, "alice")
    # Written into device.json by hand: the address grammar has no path.
    config = json.loads((alice.home / "device.json").read_text())
    config["relay"] = relay_proc.url.split("#")[0] + "/elsewhere"
    (alice.home / "device.json").write_text(json.dumps(config))
    res = alice.veil("devices", check=False)
    assert_one_line_error(res, "give it without a path")


# ---- passwords at a terminal ------------------------------------------------------------------


def test_a_mistyped_password_is_asked_again_three_times(relay_proc: RelayProcess, tmp_path: Path) -> None:
    alice, bob = registered(tmp_path, relay_proc, "alice", "bob")
    bob.veil("send", "alice", "are you there")
    p = pty(alice, "recv")
    for left in (2, 1):
        p.expect_exact("master password: ")
        p.sendline("not the password")
        p.expect_exact(f"Wrong password; try again ({left} {'try' if left == 1 else 'tries'} left)")
    p.expect_exact("master password: ")
    p.sendline("pw for tests")
    out, status = finish(p)
    assert status == 0 and "bob: are you there" in out
    p = pty(alice, "recv")
    for _ in range(3):
        p.expect_exact("master password: ")
        p.sendline("still wrong")
    out, status = finish(p)
    assert status == 1 and "veil: error: Wrong password." in out and "Traceback" not in out


def test_ctrl_c_at_the_password_prompt_is_one_line(relay_proc: RelayProcess, tmp_path: Path) -> None:
    (alice,) = registered(tmp_path, relay_proc, "alice")
    p = pty(alice, "recv")
    p.expect_exact("master password: ")
    p.sendcontrol("c")
    out, status = finish(p)
    assert status == 130 and "veil: error: interrupted" in out and "Traceback" not in out
    # And the home is free again at once.
    alice.veil("recv")


def test_ctrl_d_at_the_verify_question_means_no(relay_proc: RelayProcess, tmp_path: Path) -> None:
    alice, _ = registered(tmp_path, relay_proc, "alice", "bob")
    p = pty(alice, "--password-file", str(alice.password_file), "verify", "bob")
    p.expect_exact("mark verified [y/N] ")
    p.sendeof()
    out, status = finish(p)
    assert status == 0 and "Traceback" not in out and "EOFError" not in out
    assert "bob  unverified" in alice.veil("contacts").stdout


# ---- the master password's strength ---------------------------------------------------------


def test_a_very_weak_master_password_is_refused_unless_insisted_on(relay_proc: RelayProcess, tmp_path: Path) -> None:
    u = User(tmp_path, "weakling", password="abc")
    res = u.veil("register", "weakling", "--relay", relay_proc.url, check=False)
    assert_one_line_error(res, "very easy to guess")
    assert "--allow-weak-password" in res.stderr
    assert not (u.home / "device.json").exists()
    res = u.veil("register", "weakling", "--relay", relay_proc.url, "--allow-weak-password")
    assert "registered weakling" in res.stdout
    assert "veil: warning: the master password is very easy to guess" in res.stderr
    # A weak one (not very weak) is accepted, with a warning.
    v = User(tmp_path, "middling", password="correcthorse")
    res = v.veil("register", "middling", "--relay", relay_proc.url)
    assert "registered middling" in res.stdout
    assert "veil: warning: the master password is weak" in res.stderr


def test_register_at_a_terminal_asks_again_after_a_weak_or_mismatched_password(
    relay_proc: RelayProcess, tmp_path: Path
) -> None:
    p = pty(tmp_path / "home-dora", "register", "dora", "--relay", relay_proc.url)
    p.expect_exact("new master password: ")
    p.sendline("password1")
    p.expect_exact("very easy to guess")
    p.expect_exact("new master password: ")
    p.sendline("a perfectly decent passphrase")
    p.expect_exact("the same again: ")
    p.sendline("a perfectly decent passphrase, mistyped")
    p.expect_exact("the passwords do not match; try again")
    p.expect_exact("new master password: ")
    p.sendline("a perfectly decent passphrase")
    p.expect_exact("the same again: ")
    p.sendline("a perfectly decent passphrase")
    out, status = finish(p)
    assert status == 0 and "registered dora" in out


# ---- sending and receiving --------------------------------------------------------------------


def test_send_takes_the_rest_of_the_line_and_options_after_the_command(
    relay_proc: RelayProcess, tmp_path: Path
) -> None:
    alice, bob = registered(tmp_path, relay_proc, "alice", "bob")
    cmd = [*VEIL, "send", "bob", "hello", "world", "--home", str(alice.home),
           "--password-file", str(alice.password_file)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env_for(tmp_path), cwd=ROOT)
    assert res.returncode == 0, res.stderr
    got = [json.loads(x) for x in bob.veil("recv", "--json").stdout.splitlines()]
    assert [m["text"] for m in got] == ["hello world"]


def test_version() -> None:
    res = subprocess.run([*VEIL, "--version"], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert res.returncode == 0
    assert re.fullmatch(r"veil \d+\.\d+\.\d+\S*\n", res.stdout)


def test_send_while_the_relay_is_down_is_queued_and_goes_out_later(tmp_path: Path) -> None:
    rp = start_relay(tmp_path)
    port = urlsplit(rp.url).port
    alice, bob = registered(tmp_path, rp, "alice", "bob")
    stop_relay(rp)
    res = alice.veil("send", "bob", "written", "offline")
    assert "queued for bob" in res.stdout and "next time this device is online" in res.stdout
    rp = start_relay(tmp_path, port)
    try:
        assert bob.veil("recv", "--json").stdout == ""  # nothing went out yet
        alice.veil("recv")  # any command that connects sends what waits
        got = [json.loads(x) for x in bob.veil("recv", "--json").stdout.splitlines()]
        assert [m["text"] for m in got] == ["written offline"]
        assert bob.veil("recv", "--json").stdout == ""  # and once only
    finally:
        stop_relay(rp)


def test_recv_follow_prints_messages_as_they_arrive_until_interrupted(
    relay_proc: RelayProcess, tmp_path: Path
) -> None:
    alice, bob = registered(tmp_path, relay_proc, "alice", "bob")
    follow = subprocess.Popen(
        [*VEIL, "--home", str(bob.home), "--password-file", str(bob.password_file), "recv", "--follow", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_for(tmp_path), cwd=ROOT,
    )
    try:
        assert follow.stderr is not None
        deadline = time.monotonic() + TIMEOUT
        while "online" not in follow.stderr.readline():
            assert time.monotonic() < deadline and follow.poll() is None
        for i in range(3):
            alice.veil("send", "bob", f"number {i}")
            line = read_line_until(follow, "{", time.monotonic() + TIMEOUT)
            assert json.loads(line)["text"] == f"number {i}"
        follow.send_signal(signal.SIGINT)
        out, err = follow.communicate(timeout=TIMEOUT)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.communicate()
    assert follow.returncode == 0, err
    assert "Traceback" not in err and out == ""


def test_contacts_and_devices_as_json(relay_proc: RelayProcess, tmp_path: Path) -> None:
    alice, _ = registered(tmp_path, relay_proc, "alice", "bob")
    alice.veil("send", "bob", "hi")
    contacts = [json.loads(x) for x in alice.veil("contacts", "--json").stdout.splitlines()]
    assert [c["name"] for c in contacts] == ["bob"]
    assert contacts[0]["verified"] is False and contacts[0]["devices"] == 1
    assert len(contacts[0]["safety_number"]) == 60
    devices = [json.loads(x) for x in alice.veil("devices", "--json").stdout.splitlines()]
    assert len(devices) == 1 and devices[0]["this_device"] is True
    assert len(bytes.fromhex(devices[0]["device"])) == 16


# ---- logging out --------------------------------------------------------------------------------


def test_logout_leaves_a_home_that_login_can_use_again(relay_proc: RelayProcess, tmp_path: Path) -> None:
    alice, _ = registered(tmp_path, relay_proc, "alice", "bob")
    phone = User(tmp_path, "alice-phone")
    phone.password_file.write_text(alice.password_file.read_text())
    phone.veil("login", "alice", "--relay", relay_proc.url)
    assert len(alice.veil("devices").stdout.splitlines()) == 2
    out = phone.veil("logout").stdout
    assert "removed from the account" in out
    assert not (phone.home / "device.json").exists() and not (phone.home / "store.db").exists()
    assert len(alice.veil("devices").stdout.splitlines()) == 1
    phone.veil("login", "alice", "--relay", relay_proc.url)
    assert len(alice.veil("devices").stdout.splitlines()) == 2


def test_logout_keep_device_resumes_with_the_password(relay_proc: RelayProcess, tmp_path: Path) -> None:
    alice, bob = registered(tmp_path, relay_proc, "alice", "bob")
    phone = User(tmp_path, "alice-phone")
    phone.password_file.write_text(alice.password_file.read_text())
    phone.veil("login", "alice", "--relay", relay_proc.url)
    assert "stays in the account" in phone.veil("logout", "--keep-device").stdout
    bob.veil("send", "alice", "while you were out")
    assert "bob: while you were out" in phone.veil("recv").stdout  # logged in again
    assert len(alice.veil("devices").stdout.splitlines()) == 2  # the same device, not a new one
    # And it can still leave for good.
    phone.veil("logout")
    assert len(alice.veil("devices").stdout.splitlines()) == 1


# ---- one home, one process --------------------------------------------------------------------


def test_a_second_process_on_a_home_in_use_is_told_what_holds_it(
    relay_proc: RelayProcess, tmp_path: Path
) -> None:
    alice, bob = registered(tmp_path, relay_proc, "alice", "bob")
    holder = subprocess.Popen(
        [*VEIL, "--home", str(bob.home), "--password-file", str(bob.password_file), "recv", "--follow"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_for(tmp_path), cwd=ROOT,
    )
    try:
        assert holder.stderr is not None
        deadline = time.monotonic() + TIMEOUT
        while "online" not in holder.stderr.readline():
            assert time.monotonic() < deadline and holder.poll() is None
        # Commands that need the store itself are told who holds it (send and recv go
        # through the holder instead: tests/test_control.py).
        for args in (["contacts"], ["devices"], ["verify", "alice"]):
            res = bob.veil(*args, check=False)
            assert_one_line_error(res, f"is in use by `veil recv` (pid {holder.pid})")
        alice.veil("send", "bob", "only the holder gets this")
        line = read_line_until(holder, "[", time.monotonic() + TIMEOUT)
        assert line.endswith("alice: only the holder gets this")
    finally:
        holder.send_signal(signal.SIGINT)
        holder.communicate(timeout=TIMEOUT)
    # The holder is gone: the home is free, and the message was not taken twice.
    assert bob.veil("recv").stdout == ""


def test_two_chats_on_one_home(relay_proc: RelayProcess, tmp_path: Path) -> None:
    (alice,) = registered(tmp_path, relay_proc, "alice")
    env = env_for(tmp_path) | {"TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1", "LC_ALL": "C.UTF-8"}
    args = ["-m", "cli.main", "--home", str(alice.home), "--password-file", str(alice.password_file), "chat"]
    first = pexpect.spawn(sys.executable, args, env=env, cwd=str(ROOT), encoding="utf-8", timeout=PROMPT_TIMEOUT,
                          dimensions=(40, 160))
    try:
        first.expect_exact("online: connected to wss://")
        second = pexpect.spawn(sys.executable, args, env=env, cwd=str(ROOT), encoding="utf-8",
                               timeout=PROMPT_TIMEOUT, dimensions=(40, 160))
        out, status = finish(second)
        assert status == 1 and "is in use by `veil chat`" in out and "Traceback" not in out
    finally:
        first.terminate(force=True)


# ---- operators ----------------------------------------------------------------------------------


def test_relay_serve_refuses_a_port_out_of_range(tmp_path: Path) -> None:
    res = subprocess.run([*VEIL, "relay", "serve", "--port", "99999", "--data-dir", str(tmp_path / "d")],
                         capture_output=True, text=True, timeout=TIMEOUT, env=env_for(tmp_path), cwd=ROOT)
    assert res.returncode == 2 and "port 99999 is out of range" in res.stderr
    assert not (tmp_path / "d").exists()


def test_relay_serve_on_a_taken_port_names_it_and_leaves_no_data_dir(
    relay_proc: RelayProcess, tmp_path: Path
) -> None:
    port = str(urlsplit(relay_proc.url).port)
    res = subprocess.run([*VEIL, "relay", "serve", "--port", port, "--data-dir", str(tmp_path / "fresh")],
                         capture_output=True, text=True, timeout=TIMEOUT, env=env_for(tmp_path), cwd=ROOT)
    assert_one_line_error(res, f"cannot listen on 127.0.0.1:{port}: address already in use")
    assert not (tmp_path / "fresh").exists()


def test_simulate_against_a_relay_that_is_not_there_fails_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    res = subprocess.run(
        [*VEIL, "simulate", "--nodes", "2", "--messages", "1", "--relay", f"ws://127.0.0.1:{closed_port()}",
         "--quiet"],
        capture_output=True, text=True, timeout=TIMEOUT, env=env_for(tmp_path), cwd=ROOT,
    )
    assert_one_line_error(res, "cannot reach the relay at ws://127.0.0.1:")
    assert time.monotonic() - started < TIMEOUT  # seconds, not the 300 s --timeout


def test_ctrl_c_while_connecting_is_one_line(relay_proc: RelayProcess, tmp_path: Path) -> None:
    """Interrupted while it waits for a relay that accepts but never answers."""
    (alice,) = registered(tmp_path, relay_proc, "alice")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        config = json.loads((alice.home / "device.json").read_text())
        config["relay"] = f"ws://127.0.0.1:{silent.getsockname()[1]}"
        (alice.home / "device.json").write_text(json.dumps(config))
        p = pty(alice, "--password-file", str(alice.password_file), "recv")
        conn, _ = silent.accept()  # it is connecting now
        try:
            p.sendcontrol("c")
            out, status = finish(p)
        finally:
            conn.close()
    assert status == 130 and "veil: error: interrupted" in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
