"""Keeping an account safe, through the `veil` command as a person runs it: two-factor
codes, recovery with the recovery code, a new password, and revoking a device. Real
`veil` processes, a real relay process on 127.0.0.1.

Codes are computed from the otpauth:// address `veil mfa enable` prints, with
cryptography's own TOTP (not Veil's code). The relay accepts a code one step either side
of now and never a step at or before the last one it accepted, so each test walks the
steps upwards (``Authenticator.next``): three codes fit in any 30 s, and no test waits.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP

from tests.test_cli import (
    ROOT,
    TIMEOUT,
    VEIL,
    RelayProcess,
    User,
    assert_one_line_error,
    env_for,
)
from tests.test_cli_first_hour import finish, pty

pytestmark = pytest.mark.slow


class Authenticator:
    """What an authenticator app does with the scanned address, for the tests."""

    def __init__(self, uri: str) -> None:
        parts = urlsplit(uri)
        assert parts.scheme == "otpauth" and parts.netloc == "totp"
        query = parse_qs(parts.query)
        assert query["digits"] == ["6"] and query["period"] == ["30"] and query["algorithm"] == ["SHA1"]
        secret = query["secret"][0]
        self.totp = TOTP(base64.b32decode(secret + "=" * (-len(secret) % 8)), 6, SHA1(), 30,
                         enforce_key_length=False)
        self.label = parts.path
        self.last: int | None = None

    def at(self, step: int) -> str:
        return self.totp.generate(step * 30).decode()

    def next(self) -> str:
        """A code the relay has not seen: the lowest step above the last one used that is
        still accepted now."""
        now = int(time.time()) // 30
        step = now - 1 if self.last is None else max(self.last + 1, now - 1)
        assert step <= now + 1, "more than three codes in one 30 s step"
        self.last = step
        return self.at(step)


def users(tmp: Path, relay: RelayProcess, *names: str) -> list[User]:
    out = [User(tmp, n) for n in names]
    for u in out:
        u.veil("register", u.name, "--relay", relay.url)
    return out


def device(tmp: Path, owner: User, label: str, password_file: Path | None = None) -> User:
    """Another device of ``owner``'s account (not logged in yet), with the same password."""
    d = User(tmp, f"{owner.name}-{label}")
    d.password_file.write_text((password_file or owner.password_file).read_text())
    return d


def enable_mfa(u: User) -> Authenticator:
    """`veil mfa enable`, answering the code on standard input as a script does."""
    proc = subprocess.Popen(
        [*VEIL, "--home", str(u.home), "--password-file", str(u.password_file), "mfa", "enable"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env_for(u.tmp), cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stdin is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("otpauth://"):
            break
    else:
        raise AssertionError(f"no otpauth address: {lines} {proc.stderr.read() if proc.stderr else ''}")
    app = Authenticator(lines[-1].strip())
    # A QR code came before it, drawn with block characters.
    assert sum(1 for ln in lines if "█" in ln or "▀" in ln or "▄" in ln) >= 10
    out, err = proc.communicate(app.next() + "\n", timeout=TIMEOUT)
    assert proc.returncode == 0, err
    assert "two-factor authentication is on" in out
    return app


def login(d: User, owner: str, relay: RelayProcess, *extra: str) -> subprocess.CompletedProcess[str]:
    return d.veil("login", owner, "--relay", relay.url, *extra, check=False)


def test_mfa_enrolment_login_replay_wrong_step_and_disable(relay_proc: RelayProcess, tmp_path: Path) -> None:
    (alice,) = users(tmp_path, relay_proc, "alice")
    app = enable_mfa(alice)
    assert app.label.endswith("Veil:alice")
    # Enabled twice: one line, before any address is shown, and nothing changes.
    again = alice.veil("mfa", "enable", check=False, stdin="123456\n")
    assert_one_line_error(again, "on already")
    assert "otpauth://" not in again.stdout

    phone = device(tmp_path, alice, "phone")
    # No code, from a script: one line that says what is missing; nothing is set up.
    assert_one_line_error(login(phone, "alice", relay_proc), "needs a code")
    assert not (phone.home / "device.json").exists()
    # A malformed code is refused before the relay sees it.
    assert_one_line_error(login(phone, "alice", relay_proc, "--code", "12a456"), "6 digits")
    # A code from the wrong step (three steps back): the same answer as a wrong password.
    stale = app.at(int(time.time()) // 30 - 3)
    assert_one_line_error(login(phone, "alice", relay_proc, "--code", stale), "wrong password or code")
    # The right code works.
    code = app.next()
    res = login(phone, "alice", relay_proc, "--code", code)
    assert res.returncode == 0, res.stderr
    # The same code again, on another new device: refused (never twice).
    tablet = device(tmp_path, alice, "tablet")
    assert_one_line_error(login(tablet, "alice", relay_proc, "--code", code), "wrong password or code")
    # The right password with no code is not enough either; with a wrong password and a
    # right code the answer is the same as with a wrong code.
    wrong = tmp_path / "wrong-pw"
    wrong.write_text("not the password\n")
    res = tablet.veil("login", "alice", "--relay", relay_proc.url, "--code", app.at(int(time.time()) // 30 + 1),
                      password_file=wrong, check=False)
    assert_one_line_error(res, "wrong password or code")
    # A device that has its session needs no code for everyday commands.
    assert phone.veil("recv").returncode == 0

    # Disable needs a code too.
    assert_one_line_error(alice.veil("mfa", "disable", check=False), "needs a code")
    done = alice.veil("mfa", "disable", "--code", app.next())
    assert "off" in done.stdout
    assert_one_line_error(alice.veil("mfa", "disable", check=False), "not on")
    # Now the password alone logs in.
    res = login(tablet, "alice", relay_proc)
    assert res.returncode == 0, res.stderr


def test_recovery_end_to_end(relay_proc: RelayProcess, tmp_path: Path) -> None:
    alice = User(tmp_path, "alice")
    out = alice.veil("register", "alice", "--relay", relay_proc.url).stdout
    code = out.split("recovery code: ", 1)[1].split()[0]
    (bob,) = users(tmp_path, relay_proc, "bob")
    phone = device(tmp_path, alice, "phone")
    assert login(phone, "alice", relay_proc).returncode == 0
    alice.veil("send", "bob", "before")
    assert "alice: before" in bob.veil("recv").stdout

    # Bad input first: each one line, nothing changes.
    rescued = User(tmp_path, "alice-rescued", password="a new and better passphrase")
    bad = tmp_path / "bad-code"
    bad.write_text("not a code\n")
    res = rescued.veil("recover", "alice", "--relay", relay_proc.url, "--recovery-code-file", str(bad), check=False)
    assert_one_line_error(res, "not a valid recovery code")
    other = tmp_path / "other-code"
    other.write_text("0000-0000-0000-0000-0000-0000-00\n")
    res = rescued.veil("recover", "alice", "--relay", relay_proc.url, "--recovery-code-file", str(other), check=False)
    assert_one_line_error(res, "wrong recovery code")
    real = tmp_path / "code"
    real.write_text(code + "\n")
    # Alice's code does not open bob's account.
    res = rescued.veil("recover", "bob", "--relay", relay_proc.url, "--recovery-code-file", str(real), check=False)
    assert_one_line_error(res, "wrong recovery code")
    assert not (rescued.home / "device.json").exists()
    assert phone.veil("recv").returncode == 0  # still logged in: nothing changed

    res = rescued.veil("recover", "alice", "--relay", relay_proc.url, "--recovery-code-file", str(real))
    assert "every other session of the account has ended" in res.stdout
    new_code = res.stdout.split("new recovery code: ", 1)[1].split()[0]
    assert new_code != code

    # The old password works nowhere: not on a new device...
    stranger = device(tmp_path, alice, "old-password")
    assert_one_line_error(login(stranger, "alice", relay_proc), "wrong password")
    # ...and the devices that had it were logged out, and cannot log in with it again.
    assert_one_line_error(phone.veil("recv", check=False), "no longer accepts")
    # The old recovery code is spent; the new one works (it is checked, not used here).
    again = User(tmp_path, "alice-again")
    res = again.veil("recover", "alice", "--relay", relay_proc.url, "--recovery-code-file", str(real), check=False)
    assert_one_line_error(res, "wrong recovery code")

    # The new password on a new device.
    fresh = device(tmp_path, alice, "fresh", password_file=rescued.password_file)
    assert login(fresh, "alice", relay_proc).returncode == 0
    # Messages flow, and bob sees a device change, not an identity change.
    bob.veil("send", "alice", "after")
    assert "bob: after" in rescued.veil("recv").stdout
    assert "bob: after" in fresh.veil("recv").stdout
    contacts = [json.loads(x) for x in bob.veil("contacts", "--json").stdout.splitlines()]
    assert contacts[0]["name"] == "alice" and not contacts[0]["key_changed"]
    rescued.veil("send", "bob", "back")
    assert "alice: back" in bob.veil("recv").stdout
    assert "KEY CHANGED" not in bob.veil("contacts").stdout


def test_recovery_into_the_home_of_a_device_of_the_account(relay_proc: RelayProcess, tmp_path: Path) -> None:
    """Recovering into the home of a device of the account: a new device there, and the
    old one (whose store and ratchet sessions opened only with the lost password) revoked."""
    alice = User(tmp_path, "alice")
    out = alice.veil("register", "alice", "--relay", relay_proc.url).stdout
    code = tmp_path / "code"
    code.write_text(out.split("recovery code: ", 1)[1].split()[0] + "\n")
    before = [json.loads(x)["device"] for x in alice.veil("devices", "--json").stdout.splitlines()]
    new = tmp_path / "new-pw"
    new.write_text("a much longer new passphrase\n")
    res = alice.veil("recover", "alice", "--relay", relay_proc.url, "--recovery-code-file", str(code),
                     "--keep-recovery-code", password_file=new)
    assert "the recovery code stays the same" in res.stdout
    after = [json.loads(x)["device"] for x in alice.veil("devices", "--json", password_file=new).stdout.splitlines()]
    assert len(before) == len(after) == 1 and after != before
    assert_one_line_error(alice.veil("recv", check=False), "wrong password")
    # The code was kept: it still recovers (into a new home this time).
    other = User(tmp_path, "alice-other", password="yet another long passphrase")
    res = other.veil("recover", "alice", "--relay", relay_proc.url, "--recovery-code-file", str(code))
    assert "new recovery code: " in res.stdout


def test_a_code_of_another_account_is_refused(relay_proc: RelayProcess, tmp_path: Path) -> None:
    alice, bob = users(tmp_path, relay_proc, "alice", "bob")
    enable_mfa(alice)
    bobs = enable_mfa(bob)
    phone = device(tmp_path, alice, "phone")
    assert_one_line_error(login(phone, "alice", relay_proc, "--code", bobs.next()), "wrong password or code")
    assert not (phone.home / "device.json").exists()


def test_password_change_keeps_other_devices_until_they_log_in_again(
    relay_proc: RelayProcess, tmp_path: Path
) -> None:
    alice, bob = users(tmp_path, relay_proc, "alice", "bob")
    phone = device(tmp_path, alice, "phone")
    assert login(phone, "alice", relay_proc).returncode == 0
    new = tmp_path / "new-pw"
    new.write_text("a much longer new passphrase\n")
    res = alice.veil("passwd", "--new-password-file", str(new))
    assert "old one works nowhere" in res.stdout
    assert "stay logged in" in res.stdout and phone.veil("devices", "--json").returncode == 0
    # This device now opens with the new password only.
    assert_one_line_error(alice.veil("recv", check=False), "wrong password")
    assert alice.veil("recv", password_file=new).returncode == 0
    # The old password works nowhere at the relay.
    stranger = device(tmp_path, alice, "stranger")
    assert_one_line_error(login(stranger, "alice", relay_proc), "wrong password")
    assert login(stranger, "alice", relay_proc, "--password-file", str(new)).returncode == 0
    # The phone keeps working (its session does not come from the password)...
    bob.veil("send", "alice", "to every device")
    assert "bob: to every device" in phone.veil("recv").stdout
    # ...until it has to log in again: then it asks for the new password, once, and
    # from then on opens with it.
    phone.veil("logout", "--keep-device")
    assert_one_line_error(phone.veil("recv", check=False), "no longer accepts")
    p = pty(phone.home, "recv")
    p.expect("master password: ")
    p.sendline("pw for tests")  # the password the phone's store opens with
    p.expect("current master password: ")
    p.sendline("a much longer new passphrase")
    out, status = finish(p)
    assert status == 0, out
    assert phone.veil("recv", password_file=new).returncode == 0
    assert_one_line_error(phone.veil("recv", check=False), "wrong password")


def test_password_change_with_mfa_needs_a_code(relay_proc: RelayProcess, tmp_path: Path) -> None:
    (alice,) = users(tmp_path, relay_proc, "alice")
    app = enable_mfa(alice)
    new = tmp_path / "new-pw"
    new.write_text("a much longer new passphrase\n")
    assert_one_line_error(alice.veil("passwd", "--new-password-file", str(new), check=False), "needs a code")
    assert alice.veil("recv").returncode == 0  # unchanged: the old password still opens it
    alice.veil("passwd", "--new-password-file", str(new), "--code", app.next())
    phone = device(tmp_path, alice, "phone", password_file=new)
    assert login(phone, "alice", relay_proc, "--code", app.next()).returncode == 0


def test_revoke_a_device_from_another(relay_proc: RelayProcess, tmp_path: Path) -> None:
    alice, bob = users(tmp_path, relay_proc, "alice", "bob")
    phone = device(tmp_path, alice, "phone")
    assert login(phone, "alice", relay_proc).returncode == 0
    listed = [json.loads(x) for x in alice.veil("devices", "--json").stdout.splitlines()]
    assert len(listed) == 2 and all(d["active"] and d["certified"] and d["name"] for d in listed)
    phone_id = next(d["device"] for d in listed if not d["this_device"])
    alice.veil("devices", "rename", phone_id[:8], "alice's phone")
    assert "alice's phone" in phone.veil("devices").stdout

    # Bad input: each one line, nothing changed.
    assert_one_line_error(alice.veil("devices", "revoke", "ffffffff", check=False), "no device")
    assert_one_line_error(alice.veil("devices", "revoke", "xyz", check=False), "not a device id")

    res = alice.veil("devices", "revoke", phone_id[:8])
    assert "revoked" in res.stdout and "veil passwd" in res.stdout
    # The revoked device's next command fails with one line.
    assert_one_line_error(phone.veil("recv", check=False), "revoked")
    assert_one_line_error(phone.veil("send", "bob", "still here?", check=False), "revoked")
    # It is gone from the list, and revoking it again says so.
    listed = [json.loads(x) for x in alice.veil("devices", "--json").stdout.splitlines()]
    assert [d["this_device"] for d in listed] == [True]
    assert_one_line_error(alice.veil("devices", "revoke", phone_id[:8], check=False), "no device")
    # A message sent afterwards goes to the remaining device only: bob seals for one.
    bob.veil("send", "alice", "after the revocation")
    assert "bob: after the revocation" in alice.veil("recv").stdout
    contacts = [json.loads(x) for x in bob.veil("contacts", "--json").stdout.splitlines()]
    assert contacts[0]["devices"] == 1 and not contacts[0]["key_changed"]
    # The only device left cannot be revoked without saying so.
    me = listed[0]["device"]
    assert_one_line_error(alice.veil("devices", "revoke", me[:8], check=False), "only device")
    assert alice.veil("recv").returncode == 0


def test_devices_show_which_are_signed_out(relay_proc: RelayProcess, tmp_path: Path) -> None:
    (alice,) = users(tmp_path, relay_proc, "alice")
    phone = device(tmp_path, alice, "phone")
    assert login(phone, "alice", relay_proc).returncode == 0
    phone.veil("logout", "--keep-device")
    rows = {d["this_device"]: d for d in map(json.loads, alice.veil("devices", "--json").stdout.splitlines())}
    assert rows[True]["active"] and not rows[False]["active"]
    assert rows[False]["last_seen"] == time.strftime("%Y-%m-%d", time.gmtime())
    plain = alice.veil("devices").stdout
    assert "signed out" in plain and "(this device)" in plain


def test_an_interactive_login_asks_for_the_code(relay_proc: RelayProcess, tmp_path: Path) -> None:
    (alice,) = users(tmp_path, relay_proc, "alice")
    app = enable_mfa(alice)
    p = pty(tmp_path / "home-alice-laptop", "login", "alice", "--relay", relay_proc.url)
    p.expect("master password: ")
    p.sendline("pw for tests")
    p.expect("code from your authenticator app: ")
    p.sendline(app.next())
    out, status = finish(p)
    assert status == 0 and "logged in as alice" in out, out


def test_a_device_that_is_online_learns_at_once_that_it_was_revoked(
    relay_proc: RelayProcess, tmp_path: Path
) -> None:
    (alice,) = users(tmp_path, relay_proc, "alice")
    phone = device(tmp_path, alice, "phone")
    assert login(phone, "alice", relay_proc).returncode == 0
    follow = subprocess.Popen(
        [*VEIL, "--home", str(phone.home), "--password-file", str(phone.password_file), "recv", "--follow"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_for(tmp_path), cwd=ROOT,
    )
    try:
        assert follow.stderr is not None
        deadline = time.monotonic() + TIMEOUT
        for line in follow.stderr:  # ends with the process, or at the online line
            if line.startswith("veil: online;"):
                break
            assert time.monotonic() < deadline
        else:
            raise AssertionError("recv --follow never came online")
        phone_id = next(d["device"] for d in map(json.loads, alice.veil("devices", "--json").stdout.splitlines())
                        if not d["this_device"])
        alice.veil("devices", "revoke", phone_id[:8])
        _, err = follow.communicate(timeout=TIMEOUT)  # it ends by itself
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.communicate()
    assert follow.returncode == 1
    errors = [ln for ln in err.splitlines() if ln.startswith("veil: error:")]
    assert len(errors) == 1 and "revoked" in errors[0], err
    assert "Traceback" not in err


def test_enrolment_at_a_terminal_asks_again_after_a_typo(relay_proc: RelayProcess, tmp_path: Path) -> None:
    (alice,) = users(tmp_path, relay_proc, "alice")
    p = pty(alice.home, "mfa", "enable")
    p.expect("master password: ")
    p.sendline("pw for tests")
    p.expect(r"otpauth://\S+")
    app = Authenticator(p.after.strip())
    p.expect("the code the app shows now: ")
    now = int(time.time()) // 30
    valid = {app.at(s) for s in range(now - 3, now + 4)}
    p.sendline(next(f"{n:06d}" for n in range(10**6) if f"{n:06d}" not in valid))
    p.expect("does not match")
    p.expect("the code the app shows now: ")
    p.sendline(app.next())
    out, status = finish(p)
    assert status == 0 and "two-factor authentication is on" in out, out
    phone = device(tmp_path, alice, "phone")
    assert login(phone, "alice", relay_proc, "--code", app.next()).returncode == 0
