"""The relay's frame handling, over a real WebSocket: every bad frame gets a stable error
code (with the request id when it can be read), and the connection, and every other
connection, keeps working."""

from __future__ import annotations

import secrets
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed

import wire
from relay import connection
from relay.connection import Limits
from relay.server import RelayConfig, RelayInfo, serve
from tests.conftest import Accounts, RelayRunner
from tests.test_relay_support import (
    ACK_IS_REQUEST,
    DEADLINE,
    ack_frame,
    envelope,
    handshake_status,
    pack,
    ping,
    raw_client,
)

E = wire.ErrorCode
PING = wire.encode(wire.Ping(id=7))
SEND = wire.encode(wire.Send(id=8, envelopes=[envelope(b"d" * 16, b"e" * 16, b"x" * 300)]))


# ---- not MessagePack ---------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",  # the one byte MessagePack never uses
        b"\xc1" + secrets.token_bytes(200),
        b"",
        PING[:1],
        PING[:-1],
        SEND[: len(SEND) // 2],  # cut inside the envelope's blob
        SEND[:-1],
        PING + b"\x00",  # a valid frame followed by trailing bytes
    ],
    ids=["c1", "c1-random", "empty", "map-header-only", "ping-minus-one", "send-half", "send-minus-one",
         "trailing-byte"],
)
async def test_garbage_is_malformed_and_connection_survives(relay: RelayRunner, data: bytes) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(relay.url) as c:
            await c.expect_error(data, E.MALFORMED, 0)
            await c.assert_alive()
            await c.expect_error(data, E.MALFORMED, 0)
            await c.assert_alive()


async def test_every_truncation_of_a_frame_is_malformed(relay: RelayRunner) -> None:
    frame = wire.encode(wire.AuthParams(id=5, name="alice"))
    with trio.fail_after(DEADLINE):
        async with raw_client(relay.url) as c:
            for n in range(1, len(frame)):
                await c.expect_error(frame[:n], E.MALFORMED, 0)
            await c.assert_alive()


@pytest.mark.parametrize(
    "data",
    [pack(5), pack([1, 2]), pack("ping"), pack(None), pack(b"\x82"), pack(True)],
    ids=["int", "array", "str", "nil", "bin", "bool"],
)
async def test_messagepack_that_is_not_a_map_is_malformed(relay: RelayRunner, data: bytes) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(relay.url) as c:
            await c.expect_error(data, E.MALFORMED, 0)
            await c.assert_alive()


@pytest.mark.parametrize("data", [b"hello garbage", "hello"], ids=["ascii-garbage", "text-message"])
async def test_non_messagepack_starting_like_a_scalar_is_malformed(
    relay: RelayRunner, data: bytes | str
) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(relay.url) as c:
            await c.expect_error(data, E.MALFORMED, 0)
            await c.assert_alive()


async def test_text_message_is_refused_and_connection_survives(relay: RelayRunner) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(relay.url) as c:
            for text in ("hello", "{\"t\": \"ping\", \"id\": 3}", "é", ""):
                await c.send(text)
                ans = await c.answer()
                assert isinstance(ans, wire.Error) and ans.id == 0, ans
                assert ans.code in (E.MALFORMED, E.UNKNOWN_FRAME), ans
                await c.assert_alive()


# ---- unknown frames ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "rid"),
    [
        ({"t": "nope", "id": 9}, 9),
        ({"t": "ok", "id": 10}, 10),  # an answer's tag is not a request
        ({"t": "deliver", "id": 11, "items": [], "synced": True}, 11),
        ({"t": "PING", "id": 12}, 12),  # tags are case-sensitive
        ({"id": 13}, 13),  # no tag at all
        ({"t": 5, "id": 14}, 14),
        ({"t": None, "id": 15}, 15),
        ({"t": "nope", "id": 2**53}, 2**53),  # the largest id there is
        ({"t": "nope"}, 0),
        ({"t": "nope", "id": 0}, 0),  # ids start at 1
        ({"t": "nope", "id": -3}, 0),
        ({"t": "nope", "id": 2**53 + 1}, 0),
        ({"t": "nope", "id": True}, 0),  # a bool is not an id
        ({"t": "nope", "id": "9"}, 0),
        ({"t": "nope", "id": 9.0}, 0),
        ({}, 0),
    ],
)
async def test_unknown_frame_echoes_a_valid_id(relay: RelayRunner, frame: dict[str, object], rid: int) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(relay.url) as c:
            await c.expect_error(pack(frame), E.UNKNOWN_FRAME, rid)
            await c.assert_alive()


@pytest.mark.parametrize("tag", [[1], {"a": 1}, ["ping"]], ids=["list", "map", "list-of-tag"])
async def test_unhashable_tag_is_unknown_frame(relay: RelayRunner, tag: object) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(relay.url) as c:
            await c.expect_error(pack({"t": tag, "id": 5}), E.UNKNOWN_FRAME, 5)
            await c.assert_alive()


@pytest.mark.parametrize(
    "data",
    [
        b"\x91" * 5000 + b"\x01",  # an array nested 5000 deep
        b"\x82\xa1t\xa4ping\xa2id" + b"\x91" * 5000 + b"\x01",  # ... as a ping's id
    ],
    ids=["top-level", "in-a-field"],
)
async def test_deeply_nested_frame_is_answered(relay: RelayRunner, data: bytes) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(relay.url) as c:
            await c.send(data)
            ans = await c.answer()
            assert isinstance(ans, wire.Error), ans
            assert ans.code in (E.MALFORMED, E.BAD_FRAME, E.UNKNOWN_FRAME), ans
            await c.assert_alive()


# ---- known frames, bad content -------------------------------------------------------

D16 = b"d" * 16


@pytest.mark.parametrize(
    "frame",
    [
        {"t": "auth_params", "id": 21, "name": 5},  # wrong type
        {"t": "auth_params", "id": 21, "name": b"alice"},  # bytes for a string
        {"t": "auth_params", "id": 21},  # missing field
        {"t": "auth_params", "id": 21, "name": "alice", "extra": 1},  # unknown field
        {"t": "ping", "id": 21, "pad": b""},
        {"t": "auth_params", "id": 21, "name": ""},  # too short
        {"t": "auth_params", "id": 21, "name": "a" * 65},  # too long
        {"t": "challenge", "id": 21, "name": "alice", "purpose": "admin"},  # not a purpose
        {"t": "resume", "id": 21, "token": b"x" * 31},
        {"t": "resume", "id": 21, "token": b"x" * 33},
        {"t": "send", "id": 21, "envelopes": []},  # at least one envelope
        {"t": "send", "id": 21, "envelopes": [{"device_id": D16, "eid": D16, "blob": b"x"}] * 65},
        {"t": "send", "id": 21, "envelopes": [{"device_id": b"d" * 15, "eid": D16, "blob": b"x"}]},
        {"t": "send", "id": 21, "envelopes": [{"device_id": D16, "eid": D16}]},
        {"t": "send", "id": 21, "envelopes": [{"device_id": D16, "eid": D16, "blob": "x"}]},
        {"t": "send", "id": 21, "envelopes": [{"device_id": D16, "eid": D16, "blob": b"x", "to": "bob"}]},
        {"t": "send", "id": 21, "envelopes": {"device_id": D16, "eid": D16, "blob": b"x"}},
        {"t": "ack", "id": 21, "eids": []},
        {"t": "ack", "id": 21, "eids": [D16] * 1025},
        {"t": "ack", "id": 21, "eids": [b"short"]},
        {"t": "logout", "id": 21, "remove_device": 1},  # an int is not a bool
    ],
    ids=lambda f: "-".join(f"{k}" for k in f if k not in ("t", "id")) or "bare",
)
async def test_bad_known_frame_echoes_id(relay: RelayRunner, frame: dict[str, object]) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(relay.url) as c:
            err = await c.expect_error(pack(frame), E.BAD_FRAME, 21)
            assert len(err.message) <= 200
            await c.assert_alive()


@pytest.mark.parametrize(
    "frame",
    [
        {"t": "ping"},
        {"t": "ping", "id": 0},
        {"t": "ping", "id": "21"},
        {"t": "ping", "id": True},
        {"t": "ping", "id": 2**53 + 1},
        {"t": "auth_params", "name": "alice"},
    ],
)
async def test_bad_frame_without_a_valid_id_answers_id_zero(relay: RelayRunner, frame: dict[str, object]) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(relay.url) as c:
            await c.expect_error(pack(frame), E.BAD_FRAME, 0)
            await c.assert_alive()


# ---- sizes ----------------------------------------------------------------------------


def _send(rid: int, blob: bytes) -> bytes:
    return wire.encode(wire.Send(id=rid, envelopes=[envelope(D16, D16, blob)]))


async def test_envelope_larger_than_max_is_refused(accounts: Accounts) -> None:
    relay = accounts.relay
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        async with raw_client(relay.url) as c:
            await c.resume(alice)  # large frames need a session
            await c.expect_error(_send(31, b"x" * (wire.MAX_ENVELOPE + 1)), E.ENVELOPE_TOO_LARGE, 31)
            await c.assert_alive()
            # A second envelope that is too large, after a good one.
            frame = pack({"t": "send", "id": 32, "envelopes": [
                {"device_id": D16, "eid": D16, "blob": b"ok"},
                {"device_id": D16, "eid": b"f" * 16, "blob": b"x" * (2 * wire.MAX_ENVELOPE)},
            ]})
            await c.expect_error(frame, E.ENVELOPE_TOO_LARGE, 32)
            await c.assert_alive()
            # Exactly MAX_ENVELOPE is fine: the frame decodes (and is refused because D16
            # is no device, not for its size).
            await c.expect_error(_send(33, b"x" * wire.MAX_ENVELOPE), E.UNKNOWN_DEVICE, 33)


@pytest.mark.parametrize(
    "frame",
    [
        {"t": "send", "id": 34, "envelopes": [{"device_id": D16, "eid": D16, "blob": b""}]},
        {"t": "ping", "id": 34, "blob_length": 1},
    ],
    ids=["empty-blob", "unknown-field-blob_length"],
)
async def test_only_an_oversized_blob_is_envelope_too_large(relay: RelayRunner, frame: dict[str, object]) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(relay.url) as c:
            await c.expect_error(pack(frame), E.BAD_FRAME, 34)


@pytest.mark.parametrize(
    "frame",
    [
        {"t": "send", "id": 35, "envelopes": [{"device_id": 1, "blob": 0}] * 200_000},
        {"t": "send", "id": 35, "envelopes": [], "junk": [[0, 1]] * 300_000},
        {"id": 35, "t": "nonsense", "pad": [{"a": 1}] * 200_000},
    ],
    ids=["many-bad-envelopes", "junk-field", "unknown-tag"],
)
def test_refusing_a_crafted_frame_builds_none_of_it(frame: dict[str, object]) -> None:
    """Finding the tag and id of a refused frame skips every other field unread: a crafted
    frame of hundreds of thousands of small objects costs no allocation of them (decoding
    it in full, as before, built every one: tens of MiB and ~0.1 s on the event loop)."""
    data = pack(frame)
    tracemalloc.start()
    try:
        with pytest.raises(wire.FrameError) as info:
            wire.decode_request(data)
        assert wire.request_id(data) == 35
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.request_id == 35
    assert peak < 1024 * 1024, peak


def test_an_oversized_blob_is_found_among_malformed_envelopes() -> None:
    blob = b"y" * (wire.MAX_ENVELOPE + 1)
    data = pack({"t": "send", "id": 36, "envelopes": [7, {"blob": "text"}, {"device_id": D16, "blob": blob}]})
    with pytest.raises(wire.FrameError) as info:
        wire.decode_request(data)
    assert (info.value.code, info.value.request_id) == (E.ENVELOPE_TOO_LARGE, 36)


def _padded_ping(rid: int, size: int) -> bytes:
    """A ping with an unknown ``pad`` field, exactly ``size`` bytes long."""
    overhead = len(pack({"t": "ping", "id": rid, "pad": b"x" * 70000})) - 70000
    data = pack({"t": "ping", "id": rid, "pad": b"x" * (size - overhead)})
    assert len(data) == size
    return data


async def test_frame_larger_than_max_frame_is_refused(accounts: Accounts) -> None:
    relay = accounts.relay
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        async with raw_client(relay.url) as c:
            await c.resume(alice)  # large frames need a session
            for rid, size in ((41, wire.MAX_FRAME + 1), (42, wire.WS_MAX_REQUEST - 64)):
                await c.send(_padded_ping(rid, size))
                ans = await c.answer()
                assert isinstance(ans, wire.Error) and ans.code == E.FRAME_TOO_LARGE, ans
                assert ans.id in (0, rid)  # the relay need not read an oversized frame's id
                await c.assert_alive()
            # At exactly MAX_FRAME the frame is read (and refused for its unknown field).
            await c.expect_error(_padded_ping(43, wire.MAX_FRAME), E.BAD_FRAME, 43)
            await c.assert_alive()
            # Above WS_MAX_REQUEST, even with a session, the relay stops reading: 1009.
            with pytest.raises(ConnectionClosed) as closed:
                await c.send(b"\x00" * (wire.WS_MAX_REQUEST + 1))
                while True:
                    await c.frame()
            assert closed.value.reason is not None and closed.value.reason.code == 1009


async def test_before_a_session_a_large_frame_closes_the_connection(relay: RelayRunner) -> None:
    """Until a connection has a session it may send only small frames (login frames are a
    few KiB): big ones parked behind an authentication delay would pin relay memory."""
    with trio.fail_after(DEADLINE):
        with pytest.raises(ConnectionClosed) as closed:
            async with raw_client(relay.url) as c:
                await c.send(_padded_ping(44, connection.UNAUTHENTICATED_MAX_MESSAGE + 1))
                await c.frame()
        assert closed.value.reason is not None and closed.value.reason.code == 1009
        async with raw_client(relay.url) as c:  # just under the limit: read, and answered
            await c.expect_error(_padded_ping(45, connection.UNAUTHENTICATED_MAX_MESSAGE), E.BAD_FRAME, 45)


async def test_message_above_websocket_limit_closes_only_that_connection(relay: RelayRunner) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(relay.url) as other:
            with pytest.raises(ConnectionClosed) as closed:
                async with raw_client(relay.url) as c:
                    await c.send(b"\x00" * (wire.WS_MAX_REQUEST + 1))
                    await c.frame()
            assert closed.value.reason is not None
            assert closed.value.reason.code == 1009  # message too big
            await other.assert_alive()
        async with raw_client(relay.url) as again:
            await again.assert_alive()


# ---- authentication required ---------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        wire.Send(id=51, envelopes=[envelope(D16)]),
        wire.LookupKeys(id=51, name="alice"),
        wire.ListDevices(id=51),
        wire.Logout(id=51),
        wire.Logout(id=51, remove_device=True),
    ],
    ids=lambda f: type(f).__name__,
)
async def test_requests_before_login_are_not_authenticated(relay: RelayRunner, frame: wire.Frame) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(relay.url) as c:
            await c.expect_error(wire.encode(frame), E.NOT_AUTHENTICATED, 51)
            await c.assert_alive()
            await c.expect_error(wire.encode(frame), E.NOT_AUTHENTICATED, 51)


async def test_ack_before_login_deletes_nothing(accounts: Accounts) -> None:
    relay = accounts.relay
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        env = envelope(alice.device_id)
        async with raw_client(relay.url) as b:
            await b.resume(bob)
            assert isinstance(await b.ask(wire.Send(id=1, envelopes=[env])), wire.Ok)
        async with raw_client(relay.url) as c:
            await c.send(wire.encode(ack_frame([env.eid], 51)))
            if ACK_IS_REQUEST:
                ans = await c.answer()
                assert isinstance(ans, wire.Error) and (ans.code, ans.id) == (E.NOT_AUTHENTICATED, 51), ans
                await c.assert_alive()
            else:
                # A notification: no answer, or an error with id 0; then the ping's Ok.
                await c.send(ping(52))
                ans = await c.answer()
                if isinstance(ans, wire.Error):
                    assert (ans.code, ans.id) == (E.NOT_AUTHENTICATED, 0), ans
                    ans = await c.answer()
                assert ans == wire.Ok(id=52)
        async with raw_client(relay.url) as a:
            await a.resume(alice)
            assert await a.mail_until_synced() == [wire.Mail(env.eid, env.blob)]


async def test_send_before_login_stores_nothing(accounts: Accounts) -> None:
    relay = accounts.relay
    with trio.fail_after(DEADLINE):
        bob = await accounts.register("bob")
        async with raw_client(relay.url) as c:
            await c.expect_error(
                wire.encode(wire.Send(id=52, envelopes=[envelope(bob.device_id)])), E.NOT_AUTHENTICATED, 52
            )
        async with raw_client(relay.url) as b:
            await b.resume(bob)
            assert await b.mail_until_synced() == []


# ---- one answer per request ------------------------------------------------------------


async def test_pipelined_pings_get_exactly_one_answer_each(relay: RelayRunner) -> None:
    n = 300
    with trio.fail_after(DEADLINE):
        async with raw_client(relay.url) as c:
            for rid in range(1, n + 1):
                await c.send(ping(rid))
            answers = [await c.answer() for _ in range(n)]
            assert all(isinstance(a, wire.Ok) for a in answers), answers
            assert sorted(a.id for a in answers) == list(range(1, n + 1))  # type: ignore[attr-defined]
            # Nothing more is pending: the next answer is for the next request.
            await c.send(ping(n + 1))
            assert await c.answer() == wire.Ok(id=n + 1)


async def test_pipelined_mix_of_good_and_bad_frames_answered_once_each(relay: RelayRunner) -> None:
    n = 40
    expected: dict[int, str] = {}
    with trio.fail_after(DEADLINE):
        async with raw_client(relay.url) as c:
            for i in range(1, n + 1):
                await c.send(ping(i))
                expected[i] = "ok"
                await c.send(pack({"t": "ping", "id": 1000 + i, "x": 1}))
                expected[1000 + i] = E.BAD_FRAME
                await c.send(pack({"t": "nope", "id": 2000 + i}))
                expected[2000 + i] = E.UNKNOWN_FRAME
                await c.send(wire.encode(wire.LookupKeys(id=3000 + i, name="alice")))
                expected[3000 + i] = E.NOT_AUTHENTICATED
            got: dict[int, str] = {}
            for _ in range(len(expected)):
                a = await c.answer()
                rid = a.id  # type: ignore[attr-defined]
                assert rid not in got, f"two answers for request {rid}"
                got[rid] = a.code if isinstance(a, wire.Error) else "ok"
            assert got == expected
            await c.assert_alive()


# ---- paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v2", "/v0", "/", "/v1/", "/v1/x", "/V1", "/v10"])
async def test_wrong_path_is_rejected_at_handshake(relay: RelayRunner, path: str) -> None:
    with trio.fail_after(DEADLINE):
        assert await handshake_status(relay.url, path) == 404
        assert await handshake_status(relay.url, wire.PATH) == 101
        async with raw_client(relay.url) as c:  # the relay is still fine
            await c.assert_alive()


async def test_query_string_on_the_right_path_is_accepted(relay: RelayRunner) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(relay.url, wire.PATH + "?client=test") as c:
            await c.assert_alive()


# ---- isolation between connections ---------------------------------------------------------


async def test_spammed_connection_does_not_disturb_others(accounts: Accounts) -> None:
    relay = accounts.relay
    bad_frames = [
        b"\xc1", PING[:-1], pack({"t": "nope", "id": 3}), pack({"t": "ping", "id": 4, "x": 1}),
        _send(5, b"x" * (wire.MAX_ENVELOPE + 1)), pack({"t": "send", "id": 6}),
    ]
    with trio.fail_after(DEADLINE):
        alice = await accounts.register("alice")
        bob = await accounts.register("bob")
        spamming = trio.Event()
        done = trio.Event()
        sent = 0

        async def spam() -> None:
            nonlocal sent
            while not done.is_set():
                # Stay below the violation limit on each connection, so each one lives.
                async with raw_client(relay.url) as c:
                    for i in range(connection.MAX_VIOLATIONS // 2):
                        await c.send(bad_frames[i % len(bad_frames)])
                        ans = await c.answer()
                        assert isinstance(ans, wire.Error), ans
                        sent += 1
                        if sent >= 20:
                            spamming.set()
                    await c.assert_alive()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(spam)
            await spamming.wait()
            async with bob.connected() as bob_link:
                async with alice.connected() as link:
                    await alice.send(link, "bob", "through the noise")
                got = await bob.receive(bob_link, wait=10)
            assert [r.message.body for r in got] == ["through the noise"]
            done.set()
        assert sent >= 20


async def test_too_many_violations_close_the_connection(relay: RelayRunner) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(relay.url) as c:
            for _ in range(connection.MAX_VIOLATIONS):
                await c.expect_error(b"\xc1", E.MALFORMED, 0)
            await c.assert_alive()  # up to the limit, the connection lives
            await c.send(b"\xc1")  # one too many: the relay hangs up
            with pytest.raises(ConnectionClosed):
                while True:
                    ans = await c.answer()
                    assert isinstance(ans, wire.Error) and ans.code == E.MALFORMED, ans
        async with raw_client(relay.url) as c:  # and serves the next connection
            await c.assert_alive()


# ---- rate limit --------------------------------------------------------------------------

BURST = 10


@pytest.fixture
async def limited_relay(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[RelayInfo]:
    """A relay whose per-connection bucket holds BURST frames and (practically) never refills."""
    config = RelayConfig(data_dir=tmp_path / "limited", limits=Limits(rate=1e-6, burst=BURST))
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[RelayInfo]) -> None:
        with scope:
            await serve(config, task_status=task_status)

    info: RelayInfo = await nursery.start(run)
    yield info
    scope.cancel()


async def test_rate_limit_per_connection(limited_relay: RelayInfo) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(limited_relay.url) as c:
            for rid in range(1, 2 * BURST + 1):
                await c.send(ping(rid))
            answers = [await c.answer() for _ in range(2 * BURST)]
            oks = sorted(a.id for a in answers if isinstance(a, wire.Ok))
            limited = [a for a in answers if isinstance(a, wire.Error)]
            assert oks == list(range(1, BURST + 1))
            assert len(limited) == BURST
            assert {a.code for a in limited} == {E.RATE_LIMITED}
            # Bad frames are counted too (the bucket is checked before decoding).
            await c.expect_error(b"\xc1", E.RATE_LIMITED, 0)
            # Another connection has its own bucket.
            async with raw_client(limited_relay.url) as other:
                for _ in range(BURST):
                    await other.assert_alive()
                await other.send(ping(99))
                ans = await other.answer()
                assert isinstance(ans, wire.Error) and ans.code == E.RATE_LIMITED, ans


async def test_rate_limited_answer_carries_the_request_id(limited_relay: RelayInfo) -> None:
    with trio.fail_after(DEADLINE):
        async with raw_client(limited_relay.url) as c:
            for _ in range(BURST):
                await c.assert_alive()
            await c.expect_error(ping(77), E.RATE_LIMITED, 77)
