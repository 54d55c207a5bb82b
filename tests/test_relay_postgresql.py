"""Many relay processes over one PostgreSQL database act as one relay.

Two relays over one database (in this test process, each with its own pool, listener and
commit loop: all they share is the database), or real `veil relay serve` processes where
a process must die: live push from one to the other, a process killed mid-send losing
nothing, the mailbox limit, login throttling and ended sessions holding across them, a
process with another relay key refusing to start, and the tables holding nothing a relay
key or a device did not seal. (Every other relay test runs on PostgreSQL too: conftest.)
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

import wire
from keyvault.keys import AccountKeys
from tests.conftest import PASSWORD, Accounts, RelayRunner
from tests.pgcluster import PgCluster
from tests.test_cli import TIMEOUT, VEIL, env_for, read_line_until, start_relay, stop_relay
from tests.test_relay_support import DEADLINE, envelope, publish_kem_keys, raw_client

E = wire.ErrorCode
ALICE = "quokka_ardent7"
BOB = "wombat.umbral3"
SECRET = "the walrus hums at dawn: 4471-zq"


@pytest.fixture
def dsn(pg_cluster: PgCluster) -> str:
    return pg_cluster.create_database(f"veil_pair_{secrets.token_hex(4)}")


@pytest.fixture
async def pair(nursery: trio.Nursery, tmp_path: Path, dsn: str) -> AsyncIterator[tuple[RelayRunner, RelayRunner]]:
    """Two relays over one database, sharing one data directory (its relay and TLS keys)."""
    first = RelayRunner(nursery, tmp_path / "relay", store=dsn)
    await first.start()
    second = RelayRunner(nursery, tmp_path / "relay", store=dsn)
    await second.start()
    for r in (first, second):
        assert r.state is not None and r.state.listener is not None
        with trio.fail_after(DEADLINE):
            await r.state.listener.connected.wait()
    yield first, second
    for r in (first, second):
        if r._scope is not None:
            r._scope.cancel()


def on(relay: RelayRunner, accounts: Accounts) -> Accounts:
    """The same pool of keys, registering through another relay of the service."""
    other = Accounts.__new__(Accounts)
    other.__dict__.update(accounts.__dict__)
    other.relay = relay
    return other


@pytest.fixture
def accounts_pair(key_pool: list[AccountKeys], tmp_path: Path,
                  pair: tuple[RelayRunner, RelayRunner]) -> Iterator[tuple[Accounts, Accounts]]:
    a = Accounts(key_pool, tmp_path, pair[0])
    b = on(pair[1], a)
    yield a, b
    a.close()


async def test_mail_sent_through_one_process_is_pushed_live_by_another(
    accounts_pair: tuple[Accounts, Accounts],
) -> None:
    via_a, via_b = accounts_pair
    with trio.fail_after(DEADLINE):
        alice = await via_a.register("alice")
        bob = await via_b.register("bob")
        async with raw_client(via_b.relay.url) as b, raw_client(via_a.relay.url) as a:
            await b.resume(bob)
            assert await b.mail_until_synced() == []
            await a.resume(alice)
            envs = [envelope(bob.device_id) for _ in range(3)]
            for env in envs:
                await a.ok(wire.Send(id=a.next_id(), envelopes=[env]))
            got: list[bytes] = []
            while len(got) < len(envs):  # pushed, not asked for: NOTIFY from the other relay
                frame = await b.frame()
                assert isinstance(frame, wire.Deliver), frame
                got += [m.eid for m in frame.items]
            assert got == [e.eid for e in envs]
            # A real message, end to end, the same way.
            async with alice.connected() as link:
                await alice.send(link, "bob", SECRET)
            frame = await b.frame()
            assert isinstance(frame, wire.Deliver) and len(frame.items) == 1
            async with bob.connected() as link:
                opened = await bob.accept(link, frame)
            assert [r.message.body for r in opened] == [SECRET]


async def test_the_mailbox_limit_holds_across_processes(
    nursery: trio.Nursery, key_pool: list[AccountKeys], tmp_path: Path, dsn: str
) -> None:
    relays = [RelayRunner(nursery, tmp_path / "relay", store=dsn, mailbox_limit=5) for _ in range(2)]
    for r in relays:
        await r.start()
    accounts = Accounts(key_pool, tmp_path, relays[0])
    try:
        with trio.fail_after(DEADLINE):
            await accounts.register("alice")
            bob = await accounts.register("bob")
            alice = accounts.nodes[0]
            async with raw_client(relays[0].url) as a0, raw_client(relays[1].url) as a1:
                await a0.resume(alice)
                await a1.resume(alice)
                # Both at once, six sends to a mailbox of five: five are stored, one is refused.
                answers: list[wire.Frame] = []

                async def burst(c: Any, n: int) -> None:
                    ids = [c.next_id() for _ in range(n)]
                    for i in ids:
                        await c.send(wire.encode(wire.Send(id=i, envelopes=[envelope(bob.device_id)])))
                    for _ in ids:
                        answers.append(await c.answer())

                async with trio.open_nursery() as n:
                    n.start_soon(burst, a0, 3)
                    n.start_soon(burst, a1, 3)
                assert sum(isinstance(x, wire.Ok) for x in answers) == 5
                assert [x.code for x in answers if isinstance(x, wire.Error)] == [E.MAILBOX_FULL]
            state = relays[1].state
            assert state is not None
            assert await state.mailroom.call(state.store.query, "SELECT mail_count FROM devices WHERE device_id = ?",
                                             bob.device_id) == [(5,)]
    finally:
        accounts.close()
        for r in relays:
            if r._scope is not None:
                r._scope.cancel()


async def test_login_throttling_is_shared_by_the_processes(accounts_pair: tuple[Accounts, Accounts]) -> None:
    via_a, via_b = accounts_pair
    with trio.fail_after(DEADLINE):
        alice = await via_a.register("alice")
        async with raw_client(via_a.relay.url) as a:
            await a.refused(await a.login_frame(alice, password="wrong"), E.AUTH_FAILED)
            await a.refused(await a.login_frame(alice, password="also wrong"), E.AUTH_FAILED)
        sb = via_b.relay.state
        assert sb is not None
        mac = sb.service.mac("alice")
        # The other process sees both failures; an attempt through one blocks the account
        # for both (the gate and the block are one transaction), so that even the right
        # password is refused there meanwhile.
        assert await sb.mailroom.call(sb.service.throttle.failures, mac) == 2
        sa = via_a.relay.state
        assert sa is not None
        async with raw_client(via_a.relay.url) as a:
            frame = await a.login_frame(alice, password=PASSWORD)
            assert await sb.mailroom.call(sb.service.throttle.attempt, mac)
            assert not await sa.mailroom.call(sa.service.throttle.attempt, mac)
            await a.refused(frame, E.AUTH_FAILED)


async def test_a_session_ended_on_one_process_ends_its_connections_on_the_other(
    accounts_pair: tuple[Accounts, Accounts],
) -> None:
    via_a, via_b = accounts_pair
    with trio.fail_after(DEADLINE):
        await via_a.register("alice")
        laptop = await via_a.login("alice", "laptop")
        async with raw_client(via_b.relay.url) as b:
            await b.resume(laptop)
            await b.mail_until_synced()
            # The laptop logs out through the other process: the connection here, with
            # the same session, ends too (a stolen token's connection must not go on).
            async with laptop.connected() as link:
                await laptop.logout(link, remove_device=False)
            with pytest.raises(ConnectionClosed):
                await b.frame()


async def test_tables_hold_no_name_no_plaintext_and_no_bundle_in_the_clear(
    accounts_pair: tuple[Accounts, Accounts],
) -> None:
    via_a, _ = accounts_pair
    with trio.fail_after(DEADLINE):
        alice = await via_a.register(ALICE)
        bob = await via_a.register(BOB)
        async with alice.connected() as link:
            await alice.send(link, BOB, SECRET)  # bob is offline: it is kept
        await publish_kem_keys(via_a.relay, bob)
        state = via_a.relay.state
        assert state is not None
        store = state.store
        needles = {"alice's name": ALICE.encode(), "bob's name": BOB.encode(), "the text": SECRET.encode(),
                   "the text (utf-16)": SECRET.encode("utf-16-le")}
        for node in (alice, bob):
            account = await state.mailroom.call(store.account, state.service.mac(node.name))
            assert account is not None
            # What the relay gives back is what the device wrapped; the table holds it sealed.
            needles[f"{node.name}'s bundle"] = account.bundle
            needles[f"{node.name}'s recovery bundle"] = account.recovery_bundle
            token = node.store.get("token")
            assert token
            needles[f"{node.name}'s token"] = token
        tables = [r[0] for r in await state.mailroom.call(
            store.query, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        assert {"accounts", "devices", "sessions", "mailbox", "relay_meta", "signed_prekeys", "one_time_prekeys",
                "kem_prekeys"} <= set(tables)
        assert await state.mailroom.call(store.query, "SELECT count(*) FROM kem_prekeys") != [(0,)]
        for table in tables:
            for row in await state.mailroom.call(store.query, f"SELECT * FROM {table}"):
                for cell in row:
                    raw = cell if isinstance(cell, bytes) else str(cell).encode()
                    for what, needle in needles.items():
                        assert needle not in raw, f"{what} in the clear in {table}"
        # No sender, no address, no time finer than a day: but for failed logins of the
        # last minutes (an UNLOGGED table, docs/THREAT_MODEL.md).
        columns = await state.mailroom.call(
            store.query, "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'public'")
        assert {c for t, c, _ in columns if t == "mailbox"} == {"seq", "device_id", "eid", "blob", "expires_day"}
        assert {c for t, c, _ in columns if t == "kem_prekeys"} == {"device_id", "use", "key_id", "public", "sig"}
        forbidden = ("sender", "from", "ip", "addr", "host", "port", "time", "_at", "stamp", "ts")
        for table, col, kind in columns:
            if table == "login_throttle":
                continue
            assert not any(col == f or col.startswith(f) or col.endswith(f) for f in forbidden), f"{table}.{col}"
            assert "time" not in kind and "date" not in kind, f"{table}.{col} is a {kind}"


def _serve(tmp: Path, dsn: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*VEIL, "relay", "serve", "--port", "0", "--data-dir", str(tmp / "relay"), "--store", dsn, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or env_for(tmp),
    )


def test_a_process_with_another_relay_key_refuses_to_start(tmp_path: Path, dsn: str) -> None:
    rp = start_relay(tmp_path, 0, "--store", dsn)
    stop_relay(rp)
    env = {**env_for(tmp_path), "VEIL_RELAY_KEY": secrets.token_hex(32)}
    proc = _serve(tmp_path, dsn, env=env)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "created with another relay key" in lines[0], err
    # The database still opens with the right key.
    stop_relay(start_relay(tmp_path, 0, "--store", dsn))


@pytest.mark.slow
async def test_a_relay_process_killed_mid_send_loses_nothing(
    key_pool: list[AccountKeys], tmp_path: Path, dsn: str
) -> None:
    """Two real `veil relay serve` processes; the sender's is killed (SIGKILL) in the
    middle of a burst. Every envelope answered ok is in bob's mailbox, once; sending the
    unanswered ones again through the other process (as a node's outbox does) completes
    the set, still once each."""
    first = start_relay(tmp_path, 0, "--store", dsn)
    second = start_relay(tmp_path, 0, "--store", dsn)
    try:
        accounts = Accounts(key_pool, tmp_path, SimpleNamespace(url=first.url))  # type: ignore[arg-type]
        with trio.fail_after(DEADLINE * 2):
            alice = await accounts.register("alice")
            bob = await accounts.register("bob")
            envs = [envelope(bob.device_id) for _ in range(250)]  # within the sender's ration
            answered: set[bytes] = set()
            async with raw_client(first.url) as a:
                await a.resume(alice)
                ids: dict[int, wire.Envelope] = {}
                waiting = list(reversed(envs))
                # Twenty sends in flight at a time; the process is killed once fifty are
                # answered, with twenty unanswered and the rest not sent yet.
                while len(answered) < 50:
                    while waiting and len(ids) - len(answered) < 20:
                        rid = a.next_id()
                        ids[rid] = waiting.pop()
                        await a.send(wire.encode(wire.Send(id=rid, envelopes=[ids[rid]])))
                    ans = await a.answer()
                    assert isinstance(ans, wire.Ok), ans
                    answered.add(ids[ans.id].eid)
                first.proc.send_signal(signal.SIGKILL)
                with trio.move_on_after(TIMEOUT):
                    try:
                        while True:
                            ans = await a.answer()
                            if isinstance(ans, wire.Ok):
                                answered.add(ids[ans.id].eid)
                    except Exception:
                        pass  # the connection died with the process
            assert 50 <= len(answered) < len(envs)
            async with raw_client(second.url) as b:
                await b.resume(bob)
                held = [m.eid for m in await b.mail_until_synced()]
                assert len(held) == len(set(held))
                assert answered <= set(held)  # nothing answered ok was lost
                async with raw_client(second.url) as a2:
                    await a2.resume(alice)
                    for env in envs:  # the retry of everything (a node retries what was unanswered)
                        if env.eid not in answered:
                            await a2.ok(wire.Send(id=a2.next_id(), envelopes=[env]))
                got = held + [m.eid for m in await _pushed_until(b, len(envs) - len(held))]
                assert sorted(got) == sorted(e.eid for e in envs) and len(got) == len(envs)
        accounts.close()
    finally:
        stop_relay(first)
        stop_relay(second)


async def _pushed_until(client: Any, n: int) -> list[wire.Mail]:
    items: list[wire.Mail] = []
    while len(items) < n:
        frame = await client.frame()
        assert isinstance(frame, wire.Deliver), frame
        items += frame.items
    return items


@pytest.mark.slow
def test_workers_share_one_port_and_survive_the_loss_of_one(tmp_path: Path, dsn: str) -> None:
    """`--workers 2`: two processes on one port; one killed is started again, and the
    service answers throughout."""
    from tests.test_cli import registered

    proc = _serve(tmp_path, dsn, "--workers", "2")
    try:
        line = read_line_until(proc, "relay listening on ", time.monotonic() + TIMEOUT)
        url = line.removeprefix("relay listening on ")
        kids = _children(proc.pid)
        assert len(kids) == 2
        from tests.test_cli import RelayProcess

        rp = RelayProcess(proc, url, tmp_path / "relay")
        alice, bob = registered(tmp_path, rp, "alice", "bob")
        alice.veil("send", "bob", "one")
        os.kill(kids[0], signal.SIGKILL)
        alice.veil("send", "bob", "two")  # the other process answers meanwhile
        line = read_line_until(proc, "relay process ", time.monotonic() + TIMEOUT)
        assert line.endswith(" of 2 listening again"), line
        assert len(_children(proc.pid)) == 2 and kids[0] not in _children(proc.pid)
        got = bob.veil("recv", "--json").stdout
        assert '"one"' in got and '"two"' in got
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()
    assert proc.returncode == 0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(x) for x in text]
    return out


def test_a_store_that_cannot_be_reached_is_one_line_without_the_password(tmp_path: Path) -> None:
    store = f"postgresql:///veil?host={tmp_path / 'nowhere'}&user=veil&password=hunter2-secret"
    proc = _serve(tmp_path, store)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("veil: error: cannot connect to the PostgreSQL store: "), err
    assert "hunter2-secret" not in err and "Traceback" not in err


def test_workers_and_onion_combinations_that_cannot_work_are_refused(tmp_path: Path) -> None:
    store = "postgresql:///veil?host=/nonexistent"
    for extra, says in ((("--onion",), "--onion goes with the file store"),
                        (("--work", "2"), "unrecognized arguments")):
        proc = _serve(tmp_path, store, *extra)
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode != 0 and out == "" and says in err, err
        assert "Traceback" not in err


async def test_a_resume_racing_a_logout_on_another_process_is_refused(
    accounts_pair: tuple[Accounts, Accounts], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The logout's notice arrives while the resume is between reading the session and
    binding the connection: it finds nothing to close, so the resume checks again."""
    import threading

    via_a, via_b = accounts_pair
    sb = via_b.relay.state
    assert sb is not None
    store = sb.store
    real_session = store.session
    read, go = threading.Event(), threading.Event()

    def slow_session(th: bytes) -> Any:
        found = real_session(th)
        if not read.is_set():
            read.set()
            go.wait(DEADLINE)
        return found

    monkeypatch.setattr(store, "session", slow_session)
    with trio.fail_after(DEADLINE):
        await via_a.register("alice")
        laptop = await via_a.login("alice", "laptop")
        token = laptop.store.get("token")
        async with raw_client(via_b.relay.url) as b, trio.open_nursery() as n:
            answer: list[wire.Frame] = []

            async def resume() -> None:
                answer.append(await b.ask(wire.Resume(id=1, token=token)))

            n.start_soon(resume)
            await trio.to_thread.run_sync(read.wait, DEADLINE)
            noticed = trio.Event()
            assert sb.listener is not None
            real_notice = sb.listener.on_notice

            def on_notice(kind: str, values: list[bytes]) -> None:
                real_notice(kind, values)
                if kind == "token":
                    noticed.set()

            sb.listener.on_notice = on_notice
            async with laptop.connected() as link:
                await laptop.logout(link, remove_device=False)
            await noticed.wait()  # the notice has reached B, and found nothing to close
            go.set()
        assert isinstance(answer[0], wire.Error) and answer[0].code == E.AUTH_FAILED, answer
