"""`veil chat` as a person uses it: REPLs in real pseudo-terminals (pexpect), a real relay
process, users registered with the real `veil` command."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import pexpect
import pyte
import pytest

from cli.chat import local_time, wrap
from tests.test_cli import ROOT, VEIL, RelayProcess, User, env_for, start_relay, stop_relay

TIMEOUT = 20
COLUMNS = 160
ROWS = 40
BEL = "\x07"
# Between the characters of typed text, prompt-toolkit may move the cursor or restyle.
_CSI = r"(?:\x1b\[[0-9;?]*[A-Za-z]|\x08)*"


def typed(text: str) -> str:
    """A pattern for text echoed as it is typed (escape sequences allowed in between)."""
    return _CSI.join(re.escape(ch) for ch in text)


class Repl:
    """One `veil chat` in its own pseudo-terminal; everything it prints is kept in ``log``."""

    def __init__(self, user: User, env: dict[str, str] | None = None) -> None:
        env = env_for(user.tmp) | (env or {})
        env.update(TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1", LC_ALL="C.UTF-8")
        self.log = io.StringIO()
        self.p = pexpect.spawn(
            sys.executable,
            ["-m", "cli.main", "--home", str(user.home), "--password-file", str(user.password_file), "chat"],
            env=env, cwd=str(ROOT), dimensions=(ROWS, COLUMNS), encoding="utf-8", timeout=TIMEOUT,
        )
        self.p.logfile_read = self.log

    def expect(self, text: str) -> None:
        self.p.expect_exact(text)

    def expect_all(self, *texts: str) -> None:
        """Each of ``texts``, in any order."""
        left = list(texts)
        while left:
            left.pop(self.p.expect_exact(left))

    def rang(self) -> int:
        """Terminal bells in the output the last expect skipped (before its match)."""
        before = self.p.before
        assert isinstance(before, str)
        return before.count(BEL)

    def expect_re(self, pattern: str) -> re.Match[str]:
        self.p.expect(pattern)
        match = self.p.match
        assert isinstance(match, re.Match)
        return match

    def screen(self) -> list[str]:
        """The terminal as a person sees it now: everything printed so far, played through
        a VT100 emulator the size of the pseudo-terminal."""
        screen = pyte.Screen(COLUMNS, ROWS)
        pyte.Stream(screen).feed(self.log.getvalue())
        return [row.rstrip() for row in screen.display]

    def rows_with(self, text: str) -> list[str]:
        """The rows of the screen that show ``text``."""
        return [row for row in self.screen() if text in row]

    def expect_screen(self, text: str) -> None:
        """Wait until a row of the screen shows ``text``. For what prompt-toolkit draws as
        part of the prompt: it redraws only the cells that change, so the text need not
        appear in one piece in the output. Consumes the output read meanwhile."""
        deadline = time.monotonic() + TIMEOUT
        while not self.rows_with(text):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} not on the screen:\n" + "\n".join(self.screen()))
            try:
                self.p.read_nonblocking(65536, timeout=left)  # logged, and so on the screen
            except pexpect.TIMEOUT:
                pass

    def type(self, text: str) -> None:
        self.p.send(text)

    def line(self, text: str) -> None:
        self.p.send(text + "\r")

    def exit_code(self) -> int | None:
        self.p.expect(pexpect.EOF)
        self.p.close()
        return self.p.exitstatus

    def kill(self) -> None:
        if self.p.isalive():
            self.p.terminate(force=True)


class World:
    """The relay and REPLs of one test, all stopped at its end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.relay: RelayProcess | None = None
        self.port = 0
        self.repls: list[Repl] = []

    def start_relay(self) -> RelayProcess:
        self.relay = start_relay(self.tmp, self.port)  # the same port and data dir each time
        self.port = urlsplit(self.relay.url).port
        return self.relay

    def stop_relay(self) -> None:
        rp = self.relay
        if rp is None:
            return
        self.relay = None
        stop_relay(rp)

    def user(self, name: str) -> User:
        assert self.relay is not None
        u = User(self.tmp, name)
        u.veil("register", name, "--relay", self.relay.url)
        return u

    def chat(self, user: User, env: dict[str, str] | None = None) -> Repl:
        r = Repl(user, env)
        self.repls.append(r)
        return r

    def close(self) -> None:
        for r in self.repls:
            r.kill()
        self.stop_relay()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    w.start_relay()
    yield w
    w.close()


def safety_digits(repl: Repl) -> str:
    m = repl.expect_re(r"safety number for you \(\w+\) and \w+:\r\n((?:\s+(?:\d{5} ?){4}\r\n){3})")
    return re.sub(r"\D", "", m.group(1))


def test_two_repls_talk_through_the_relay(world: World) -> None:
    alice, bob, mallory = world.user("alice"), world.user("bob"), world.user("mallory")
    a, b = world.chat(alice), world.chat(bob)
    a.expect("online: connected to wss://")
    b.expect("online: connected to wss://")

    # No peer and nobody has written to alice yet: a plain line is not sent, it stays in
    # the input with a hint; here it becomes an @NAME line.
    a.line("hello?")
    a.expect("! not sent: nobody has written to you yet; pick who gets it with /to NAME"
             " or @NAME text (the line is kept)\r\n")
    a.expect_re(typed("> hello?"))
    a.type("\x01@bob ")  # Ctrl-A: to the start of the line
    a.line("")
    a.expect("-- talking to bob")
    a.expect("] alice -> bob: hello? (sent)")

    # Bob has no peer either: the message is shown in full (with the bell: it is not in
    # a conversation bob is looking at), and a plain line answers it.
    b.expect("] alice: hello?")
    assert b.rang() == 1
    b.line("hi alice")
    b.expect("] bob -> alice (who wrote last): hi alice (sent)")
    b.expect_re(typed("@alice>"))  # alice is now bob's current peer
    a.expect("] bob: hi alice")

    # Errors are one line, and the REPL carries on.
    a.line("/to x!")
    a.expect("is not a username")
    a.line("@nobody hi")
    a.expect("! no such user: nobody")
    a.line("/nope")
    a.expect("! unknown command /nope: /help lists the commands")
    a.line("/to bob")
    a.expect("-- talking to bob")
    a.expect_re(typed("@bob>"))

    # @NAME text picks the peer and sends.
    b.line("@alice and again")
    # A sent message is one line: drawn as pending, it turns to sent in place.
    b.expect("] bob -> alice: and again (sent)")
    b.expect_re(typed("@alice>"))
    [row] = b.rows_with("and again")
    assert row.endswith("] bob -> alice: and again (sent)")
    assert not b.rows_with("(pending)")
    a.expect("] bob: and again")

    # A message arrives while bob has half a line typed: it appears above, the line stays.
    b.type("half typ")
    b.expect_re(typed("half typ"))
    a.line("hello bob")
    a.expect("alice -> bob: hello bob (sent)")
    b.expect("] alice: hello bob\r\n")
    assert b.rang() == 0  # the conversation on screen: no bell
    b.expect_re(typed("@alice> half typ"))  # the prompt is redrawn below, with the line
    b.line("ed line")
    b.expect("bob -> alice: half typed line (sent)")
    a.expect("] bob: half typed line")

    # Someone else writes to bob while he talks to alice: announced, counted as unread.
    # The text carries escape sequences: they must arrive inert.
    evil = "evil \x1b[2J\x1b[31mred\x07"
    mallory.veil("send", "bob", evil)
    b.expect("-- new message from mallory (1 unread): /to mallory to read")
    assert b.rang() == 1  # another conversation: the bell rings
    b.expect_re(typed("[1 unread] @alice>"))
    b.line("/inbox")
    b.expect_re(r"mallory\s+1 unread")
    b.line("/to mallory")
    b.expect("-- talking to mallory; 1 unread:")
    b.expect("] mallory: evil \\x1b[2J\\x1b[31mred\\x07\r\n")
    assert b.rang() == 0
    out = b.log.getvalue()
    assert "\x1b[2J" not in out and "\x1b[31m" not in out
    assert out.count(BEL) == 2  # the two bells above, none from mallory's text
    b.line("/bell off")
    b.expect("-- bell off: messages outside the conversation you are in are announced without it")
    a.line("while you read that")
    b.expect("-- new message from alice (1 unread): /to alice to read")
    assert b.rang() == 0
    b.line("/inbox")
    b.expect_re(r"alice\s+1 unread")
    b.expect_re(r"mallory\s+no unread")

    # /history shows the stored conversation, and reading it clears the unread count.
    b.line("/history alice")
    b.expect("-- history with alice (last 6, local time):")
    b.expect("] alice: hello?")
    b.expect("] bob -> alice: hi alice (sent)")
    b.expect("] bob -> alice: and again (sent)")
    b.expect("] alice: hello bob")
    b.expect("] bob -> alice: half typed line (sent)")
    b.expect("] alice: while you read that")
    b.line("/inbox")
    b.expect_re(r"alice\s+no unread")
    a.line("/history 2")
    a.expect("-- history with bob (last 2, local time):")
    a.expect("] bob: half typed line")
    a.expect("] alice -> bob: while you read that (sent)")

    # /verify: 60 digits, the same on both sides; "yes" marks the contact verified.
    # Typed with Tab completion of the command and the name.
    a.type("/ver\t")
    a.expect_re(typed("/verify"))
    a.type(" b\t")
    a.expect_re(typed("bob"))
    a.line("")
    digits = safety_digits(a)
    assert len(digits) == 60
    a.expect("if it is the same: /verify bob yes")
    b.line("/verify alice")
    assert safety_digits(b) == digits
    a.line("/verify bob yes")
    a.expect("-- bob is now verified")
    a.line("/contacts")
    a.expect_re(r"bob\s+verified\s+1 device\(s\)")

    a.line("/status")
    a.expect(f"relay {world.relay.url if world.relay else ''}: connected")
    a.expect("outbox: 0 pending")
    a.expect("talking to: bob")
    a.line("/devices")
    a.expect("(this device)")
    a.line("/help")
    a.expect("/quit")

    a.line("/quit")
    assert a.exit_code() == 0
    b.type("\x04")  # Ctrl-D
    assert b.exit_code() == 0

    assert not (alice.home / "chat-history").exists()  # input history: in the store only


def test_input_history_is_kept_encrypted_and_commands_only(world: World) -> None:
    alice = world.user("alice")
    world.user("bob")
    # What an earlier version left in the home: commands in plaintext (prompt-toolkit's
    # FileHistory format).
    old = alice.home / "chat-history"
    old.write_text("\n# 2026-11-30 10:00:00\n+/history bob 5\n\n# 2026-11-30 10:01:00\n+/inbox\n")
    a = world.chat(alice)
    a.expect("-- removed chat-history, the plaintext input history of an earlier version;"
             " its 2 command(s) are now kept in the encrypted store")
    a.expect("-- online: connected to wss://")
    assert not old.exists()
    a.line("/to bob")
    a.expect("-- talking to bob")
    a.line("a very secret message to bob")
    a.expect("] alice -> bob: a very secret message to bob (sent)")
    a.line("@bob another very secret one")
    a.expect("] alice -> bob: another very secret one (sent)")
    a.line("/status")
    a.expect("outbox: 0 pending")
    a.line("/quit")
    assert a.exit_code() == 0

    # Nothing typed is in the clear anywhere in the home: a thief of the locked device
    # learns the account name, the relay and the device id (device.json), no more.
    for f in alice.home.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for text in (b"/to bob", b"/status", b"/history", b"very secret"):
                assert text not in data, (f, text)

    # The up arrow brings back the commands of earlier runs, newest first; never messages.
    a = world.chat(alice)
    a.expect("-- online: connected to wss://")
    assert "removed chat-history" not in a.log.getvalue()  # said once
    for line in ("/quit", "/status", "/to bob", "/inbox", "/history bob 5"):
        a.type("\x1b[A")  # up arrow
        a.expect_screen(f"> {line}")
    a.type("\x15/quit\r")  # Ctrl-U clears the line
    assert a.exit_code() == 0


def test_unread_counts_and_the_bell_setting_survive_a_restart(world: World) -> None:
    alice, bob = world.user("alice"), world.user("bob")
    world.user("carol")
    phone = User(world.tmp, "bob-phone")  # a second device of bob's
    phone.password_file.write_text(bob.password_file.read_text())
    assert world.relay is not None
    phone.veil("login", "bob", "--relay", world.relay.url)
    b = world.chat(bob)
    b.expect("-- online: connected to wss://")
    b.line("/to carol")
    b.expect("-- talking to carol")
    alice.veil("send", "bob", "one")
    b.expect("-- new message from alice (1 unread): /to alice to read")
    assert b.rang() == 1
    phone.veil("send", "alice", "from my phone")
    b.expect("-- you wrote to alice from your other device")
    assert b.rang() == 0  # never for our own messages
    b.line("/bell off")
    b.expect("-- bell off:")
    alice.veil("send", "bob", "two")
    b.expect("-- new message from alice (2 unread): /to alice to read")
    assert b.rang() == 0
    b.line("/quit")
    assert b.exit_code() == 0

    # The count comes back from the store, in the prompt and in /inbox; so does the bell.
    b = world.chat(bob)
    b.expect("-- online: connected to wss://")
    b.expect_re(typed("[2 unread] >"))
    b.line("/bell")
    b.expect("-- bell off:")
    b.line("/inbox")
    b.expect_re(r"alice\s+2 unread")
    b.expect_re(r"carol\s+no unread")
    b.line("/to alice")  # shows them: now they are read
    b.expect("-- talking to alice; 2 unread:")
    b.expect("] alice: one")
    b.expect("] bob -> alice: from my phone")
    b.expect("] alice: two")
    b.line("/quit")
    assert b.exit_code() == 0

    b = world.chat(bob, env={"VEIL_CHAT_BELL": "1"})  # for this run only
    b.expect("-- online: connected to wss://")
    b.line("/inbox")
    b.expect_re(r"alice\s+no unread")
    b.line("/bell")
    b.expect("-- bell on:")
    b.line("/quit")
    assert b.exit_code() == 0
    assert "unread]" not in b.log.getvalue()


@pytest.mark.slow
def test_offline_typing_is_delivered_when_the_relay_comes_back(world: World) -> None:
    alice, bob = world.user("alice"), world.user("bob")
    world.stop_relay()

    # Started while the relay is down: it says so and keeps trying.
    a = world.chat(alice)
    a.expect("cannot reach the relay at wss://")
    a.expect_re(typed("[offline"))
    a.line("/to bob")
    a.expect("-- offline: bob is not checked yet; messages to bob are queued")
    a.line("written while offline")
    a.expect_screen("] alice -> bob: written while offline (pending)")
    a.line("/devices")
    a.expect("! offline: /devices needs the relay")
    a.line("/status")
    a.expect("not connected (attempt ")
    a.expect("outbox: 1 pending")

    world.start_relay()
    # The outbox is flushed as the connection is made; the pending line turns to sent.
    a.expect("-- online: connected to wss://")
    a.expect("] alice -> bob: written while offline (sent)")
    a.expect_re(typed("@bob>"))
    [row] = a.rows_with("written while offline")
    assert row.endswith("] alice -> bob: written while offline (sent)")
    b = world.chat(bob)
    b.expect("-- online: connected to wss://")
    b.expect("] alice: written while offline")  # no peer chosen yet: shown in full
    b.line("/to alice")
    b.expect("-- talking to alice")

    # The relay goes away under two running REPLs and comes back: both reconnect.
    world.stop_relay()
    a.expect("lost the connection to the relay: offline, reconnecting with backoff")
    b.expect("lost the connection to the relay")
    a.expect_re(typed("[offline"))
    # Four lines: the three newest stay pending just above the prompt; the first is
    # pushed out of that area, so its send is told in a line of its own.
    for n in ("first", "second", "third", "fourth"):
        a.line(f"{n} while down")
    a.expect_screen("] alice -> bob: fourth while down (pending)")
    world.start_relay()
    a.expect("-- back online: reconnected to the relay")
    a.expect("] sent to bob: first while down")
    a.expect("] alice -> bob: fourth while down (sent)")
    a.expect_re(typed("@bob>"))
    first = a.rows_with("first while down")
    assert len(first) == 2
    assert first[0].endswith("] alice -> bob: first while down (pending)")
    assert first[1].endswith("] sent to bob: first while down")
    for n in ("second", "third", "fourth"):
        [row] = a.rows_with(f"{n} while down")
        assert row.endswith(f"] alice -> bob: {n} while down (sent)")
    b.expect("] alice: fourth while down")

    a.type("\x03")  # Ctrl-C
    assert a.exit_code() == 0
    b.line("/quit")
    assert b.exit_code() == 0


@pytest.mark.slow
def test_changed_key_of_a_verified_contact_holds_sending(world: World) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from node.home import Home
    from node.node import Node

    alice, bob = world.user("alice"), world.user("bob")
    alice.veil("send", "bob", "first")
    # Pretend alice had pinned and verified another identity key for bob (as if bob's
    # key changed since).
    node = Node.unlock(Home(alice.home), alice.password_file.read_text().strip())
    try:
        with node.store.transaction():
            node.store.conn.execute(
                "UPDATE contacts SET identity_pub = ? WHERE name = 'bob'",
                (Ed25519PrivateKey.generate().public_key().public_bytes_raw(),),
            )
            node.store.set_verified("bob", True)
    finally:
        node.close()

    a = world.chat(alice)
    a.expect("-- online: connected to wss://")
    a.line("/to bob")
    a.expect("! WARNING: bob's identity key has changed (check: /verify bob)."
             " Sending to bob is held until you /trust bob.")
    a.line("held back")
    a.expect("alice -> bob: held back (held)")
    a.line("/status")
    a.expect("outbox: 1 pending")
    a.line("/trust bob")
    a.expect("-- accepted bob's new identity key; held messages go out now")
    a.expect("sent to bob: held back")
    a.line("/contacts")
    a.expect_re(r"bob\s+unverified")
    a.line("/quit")
    assert a.exit_code() == 0
    out = bob.veil("recv").stdout
    assert "alice: first" in out and "alice: held back" in out


def test_add_a_contact_from_an_invite_link_in_the_chat(world: World) -> None:
    alice, bob = world.user("alice"), world.user("bob")
    link = alice.veil("invite").stdout.strip()
    b = world.chat(bob)
    b.expect("-- online: connected to wss://")
    b.line("/add veil:contact?v=1&name=alice")
    b.expect("! that Veil contact link is incomplete")
    b.line("/add " + link)
    b.expect("-- added alice as a verified contact (the relay's keys match the link); safety number ")
    b.line("/contacts")
    b.expect_re(r"alice\s+verified")
    b.line("/invite")
    b.expect("-- your invite link")
    b.expect("veil:contact?v=1&name=bob&id=")
    b.line("/to alice")
    b.line("by link")
    b.expect("] bob -> alice: by link (sent)")
    b.line("/quit")
    assert b.exit_code() == 0
    assert "bob: by link" in alice.veil("recv").stdout


def test_wrapping_and_times() -> None:
    rows = wrap("[12:00] bob: " + "word " * 30, 40, 13)
    assert all(len(r) <= 40 for r in rows) and len(rows) > 3
    assert all(r.startswith(" " * 13) for r in rows[1:])
    assert wrap("a\nb", 40, 4) == ["a", "    b"]
    now = datetime(2026, 11, 5, 12, 0)
    assert re.fullmatch(r"\d\d:\d\d", local_time(int(datetime(2026, 11, 5, 9, 30).timestamp() * 1000), now))
    assert local_time(int(datetime(2025, 1, 2, 3, 4).timestamp() * 1000), now) == "2025-01-02 03:04"
    assert "?" in local_time(2**62)  # a peer's clock is not to be trusted


def test_send_and_recv_from_another_terminal_go_through_the_chat(world: World) -> None:
    alice, bob = world.user("alice"), world.user("bob")
    world.user("carol")
    b = world.chat(bob)
    b.expect("-- online: connected to wss://")
    b.line("/to carol")
    b.expect("-- talking to carol")
    alice.veil("send", "bob", "for the chat and the script")
    b.expect("-- new message from alice (1 unread)")
    # Another terminal, no password: the chat holds the device and takes the request.
    env = env_for(world.tmp)
    res = subprocess.run([*VEIL, "--home", str(bob.home), "send", "alice", "from", "a", "script"],
                         capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0 and "sent to alice (sent)" in res.stdout, res.stderr
    b.expect_screen("bob -> alice (via `veil send`): from a script (sent)")
    assert [m["text"] for m in map(json.loads, alice.veil("recv", "--json").stdout.splitlines())] == [
        "from a script"
    ]
    # recv through the chat: what the chat received, once; the chat still shows it unread.
    res = subprocess.run([*VEIL, "--home", str(bob.home), "recv", "--json"], capture_output=True, text=True,
                         timeout=TIMEOUT, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert [json.loads(x)["text"] for x in res.stdout.splitlines()] == ["for the chat and the script"]
    b.line("/inbox")
    b.expect_re(r"alice\s+1 unread")
    b.line("/quit")
    assert b.exit_code() == 0


def test_groups_in_the_chat(world: World) -> None:
    alice, bob, carol = world.user("alice"), world.user("bob"), world.user("carol")
    a, b, c = world.chat(alice), world.chat(bob), world.chat(carol)
    for r in (a, b, c):
        r.expect("online: connected to wss://")
    a.line("/group create crew bob,carol")
    a.expect("-- group #crew created with bob, carol")
    b.expect("] alice in #crew: created the group 'crew' with bob, carol")
    c.expect("] alice in #crew: created the group 'crew' with bob, carol")
    a.line("/to #crew")
    a.expect("-- in #crew (3 members)")
    a.expect_re(typed("#crew>"))
    a.line("hello crew")
    a.expect("] alice -> #crew: hello crew (sent)")
    b.expect("] alice in #crew: hello crew")
    c.expect("] alice in #crew: hello crew")
    b.line("/inbox")
    b.expect("#crew")
    b.line("/group show crew")
    b.expect("-- #crew: 'crew', created by alice")
    b.expect("-- members, in the order they joined")
    b.expect("    0  alice  unverified")
    b.expect("    1  carol  unverified")
    c.line("/group rename crew the crew")
    c.expect("-- crew renamed 'the crew'")
    a.expect("] carol in #crew: renamed the group 'the crew'")
    c.line("/group remove crew bob")  # they joined together: only alice can
    c.expect("! you cannot remove bob: only a member who joined before them can")
    a.line("/group remove crew bob")
    a.expect("-- bob removed from crew")
    b.expect("] alice in #crew: removed bob")
    c.expect("] alice in #crew: removed bob")
    a.line("after bob")
    a.expect("] alice -> #crew: after bob (sent)")
    c.expect("] alice in #crew: after bob")
    b.line("/group list")
    b.expect("#crew  2 members, ")
    b.expect("you are no longer a member")
