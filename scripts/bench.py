"""Relay benchmark: Veil's relay against a bare trio-websocket forwarder, in one run.

    scripts/bench [--pairs 50] [--size 300] [--seconds 8] [--conns 10000] [--json-only]
                  [--no-postgresql] [--curve 0.05,0.1,0.25,0.5] [--plot docs/bench-latency.svg]

Three processes: the server under test (the bare forwarder, a real relay with durable
storage and TLS as it runs by default, or the same relay with --insecure-no-tls), and one
load generator driving it. The load generator opens ``pairs`` sender
connections and ``pairs`` receiver connections; each sender sends messages of ``size``
bytes to its receiver. Measured, for both servers with the same generator:

1. maximum sustained throughput (messages received per second, after a warm-up);
2. one-way latency p50/p95/p99 at half the bare forwarder's maximum rate; for the relay
   also in two parts, a message's wait in its sender (from being composed until the send
   frame carrying it goes out: a sender keeps one send in flight, so this is the wait for
   the answer to the send before) and its transit from there to its receiver;
3. (relay only) how many authenticated, idle nodes one relay process holds, and its
   memory per connection (RSS growth / connections);
4. latency at several rates (``--curve``: fractions of the forwarder's maximum) for the
   forwarder, the relay on its SQLCipher file and the relay on PostgreSQL, drawn as the
   latency-against-rate picture ``--plot`` (an SVG the README shows);
5. on PostgreSQL (a throwaway cluster this run starts, with PostgreSQL's durable defaults:
   tests/pgcluster.py), the relay's maximum with one process and with two (``--workers 2``)
   over the same database.

The last line printed is one JSON object; ``ratio`` is relay msgs/s / forwarder msgs/s
(the forwarder is plain ws://: the ratio includes what TLS costs), ``tls_ratio`` the relay
with TLS / the relay without, ``durable_ratio`` the relay as it runs by default (every
answered send fsynced) / the same relay with --relaxed-durability, ``pg_ratio`` the relay on
PostgreSQL / on its file, ``pg_workers_ratio`` two processes on PostgreSQL / one,
``p99_ratio`` the relay's p99 / the forwarder's at half the forwarder's maximum, and
``transit_p99_ratio`` the same for the relay's transit part alone.
Loops are bounded in time and count; all traffic stays on 127.0.0.1 (PostgreSQL: a Unix
socket only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import selectors
import signal
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import websockets
from trio_websocket import ConnectionClosed, WebSocketConnection, serve_websocket

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import wire  # noqa: E402
from keyvault.keys import AccountKeys, sign_account_keys, sign_device  # noqa: E402

TS = struct.Struct("!Q")
HELLO = b"H"
DATA = b"D"


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# ---- the bare forwarder ------------------------------------------------------------------


async def forwarder(port: int) -> None:
    """Receive on one connection, send on another: no storage, no auth, no parsing
    beyond the 4-byte destination. The physical limit of trio-websocket here."""
    conns: dict[int, WebSocketConnection] = {}

    async def handler(request):  # type: ignore[no-untyped-def]
        ws = await request.accept()
        me = None
        try:
            while True:
                msg = await ws.get_message()
                if msg[:1] == HELLO:
                    me = int.from_bytes(msg[1:5], "big")
                    conns[me] = ws
                    await ws.send_message(b"ok")
                    continue
                dst = conns.get(int.from_bytes(msg[1:5], "big"))
                if dst is not None:
                    await dst.send_message(msg)
        except ConnectionClosed:
            pass
        finally:
            if me is not None:
                conns.pop(me, None)

    raise_fd_limit()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_websocket(handler, "127.0.0.1", port, ssl_context=None,
                                                message_queue_size=16, task_status=task_status)
        )
        print(f"forwarder listening on ws://127.0.0.1:{server.port}", flush=True)


# ---- load generation ---------------------------------------------------------------------


@dataclass
class Stats:
    received: int = 0
    latencies: list[float] = field(default_factory=list)
    measuring: bool = False
    # Relay runs: each message's latency in two parts, its wait in the sender (from being
    # composed to the send frame that carries it going out) and its transit (from there
    # to its receiver).
    waits: list[float] = field(default_factory=list)
    transits: list[float] = field(default_factory=list)

    def record(self, ts_ns: int, sent_ns: int | None = None) -> None:
        self.received += 1
        if self.measuring:
            now = time.monotonic_ns()
            self.latencies.append((now - ts_ns) / 1e6)
            if sent_ns is not None:
                self.waits.append((sent_ns - ts_ns) / 1e6)
                self.transits.append((now - sent_ns) / 1e6)


def payload(size: int, dst: int) -> bytes:
    body = DATA + dst.to_bytes(4, "big") + TS.pack(time.monotonic_ns())
    return body + b"\x00" * max(0, size - len(body))


def stamp(data: bytes) -> int:
    return int(TS.unpack_from(data, 5)[0])


class Pacer:
    """Paces a sender at ``rate`` messages per second (None: as fast as possible)."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.next = time.monotonic()

    async def wait(self) -> None:
        if self.interval:
            now = time.monotonic()
            # Never catch up in a burst after falling behind: offer at most the rate.
            self.next = max(self.next + self.interval, now)
            delay = self.next - now
            if delay > 0:
                await asyncio.sleep(delay)
        else:
            await asyncio.sleep(0)


# The load generator uses asyncio and the `websockets` library: several times cheaper per
# frame than trio-websocket, so that on a 2-core machine the generator is not the
# bottleneck for either server. Both servers are driven by exactly this code.


def _tls_context() -> ssl.SSLContext:
    # The bench's own relay on loopback, with its self-signed key: what TLS costs is the
    # handshake and the record layer, the same whether or not the pin is checked.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def ws_connect(url: str) -> Any:
    return await websockets.connect(url, max_size=wire.WS_MAX_MESSAGE, compression=None,
                                    ping_interval=None, open_timeout=30,
                                    ssl=_tls_context() if url.startswith("wss://") else None)


async def bare_pair(url: str, i: int, size: int, rate: float | None, stats: Stats,
                    stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    rx = await ws_connect(url)
    await rx.send(HELLO + i.to_bytes(4, "big"))
    await rx.recv()
    tx = await ws_connect(url)

    async def receive() -> None:
        async for msg in rx:
            stats.record(stamp(msg))

    async def send() -> None:
        pacer = Pacer(rate)
        while not stop.is_set():
            await tx.send(payload(size, i))
            await pacer.wait()

    tasks += [asyncio.create_task(receive()), asyncio.create_task(send())]


class RelayClient:
    """A bare-bones wire client (no Node, no crypto): the relay's cost, not ours."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = iter(range(1, 1 << 62))

    async def call(self, kind: type[wire.Frame], **fields: object) -> wire.Frame:
        await self.ws.send(wire.encode(kind(id=next(self.ids), **fields)))  # type: ignore[call-arg]
        while True:
            frame = wire.decode_answer(await self.ws.recv())
            if not isinstance(frame, wire.Deliver):
                if isinstance(frame, wire.Error):
                    raise RuntimeError(f"{frame.code}: {frame.message}")
                return frame


class Registrar:
    """Registers bench accounts quickly: one RSA key for all (the relay does not care)."""

    def __init__(self) -> None:
        self.keys = AccountKeys.generate()
        self.pub = self.keys.public()
        self.n = 0
        self.tag = secrets.token_hex(3)

    async def register(self, client: RelayClient) -> bytes:
        self.n += 1
        name = f"b{self.tag}{self.n}"
        device = secrets.token_bytes(16)
        await client.call(
            wire.Register, name=name, salt=b"\x00" * 16, kdf=wire.Kdf(1, 8, 1),
            auth_pub=secrets.token_bytes(32), enc_pub=self.pub.enc, identity_pub=self.pub.identity,
            dh_pub=self.pub.dh, keys_sig=sign_account_keys(self.keys, name), bundle=b"\x00" * 64, recovery_auth_pub=secrets.token_bytes(32),
            recovery_bundle=b"\x00" * 64,
            device=wire.DeviceCert(device, sign_device(self.keys, name, device)),
        )
        return device


async def relay_pair(url: str, reg: Registrar, size: int, rate: float | None, stats: Stats,
                     stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    rx = RelayClient(await ws_connect(url + wire.PATH))
    rx_device = await reg.register(rx)
    tx = RelayClient(await ws_connect(url + wire.PATH))
    await reg.register(tx)
    pending: list[wire.Envelope] = []
    wake = asyncio.Event()
    inflight = asyncio.Semaphore(1)

    acks: list[bytes] = []
    ack_wake = asyncio.Event()
    sent_at: dict[bytes, int] = {}  # eid: when the send frame carrying it went out

    async def receive() -> None:
        async for data in rx.ws:
            frame = wire.decode_answer(data)
            if isinstance(frame, wire.Deliver) and frame.items:
                for item in frame.items:
                    stats.record(stamp(item.blob), sent_at.pop(item.eid, None))
                acks.extend(m.eid for m in frame.items)
                ack_wake.set()

    async def ack() -> None:
        # As a node does (node/link.py): acks go out within 20 ms, many to a frame.
        while True:
            await ack_wake.wait()
            ack_wake.clear()
            if len(acks) < 1024:
                await asyncio.sleep(0.02)
            batch = acks[:1024]
            del acks[:1024]
            if batch:
                await rx.ws.send(wire.encode(wire.Ack(eids=batch)))

    async def tx_answers() -> None:
        async for data in tx.ws:
            frame = wire.decode_answer(data)
            if isinstance(frame, wire.Error):
                raise RuntimeError(f"send refused: {frame.code}")
            if not isinstance(frame, wire.Deliver):
                inflight.release()

    async def produce() -> None:
        pacer = Pacer(rate)
        while not stop.is_set():
            if len(pending) < 4 * wire.MAX_BATCH:
                pending.append(wire.Envelope(rx_device, secrets.token_bytes(16), payload(size, 0)))
                wake.set()
            await pacer.wait()

    async def flush() -> None:
        # Like a node's outbox: whatever is pending goes out in the next Send frame,
        # one Send in flight at a time.
        while True:
            await wake.wait()
            wake.clear()
            while pending:
                await inflight.acquire()
                batch = pending[: wire.MAX_BATCH]
                del pending[: wire.MAX_BATCH]
                now = time.monotonic_ns()
                for envelope in batch:
                    sent_at[envelope.eid] = now
                await tx.ws.send(wire.encode(wire.Send(id=next(tx.ids), envelopes=batch)))

    tasks += [asyncio.create_task(c) for c in (receive(), ack(), tx_answers(), produce(), flush())]


async def load(kind: str, url: str, pairs: int, size: int, seconds: float, rate: float | None) -> dict[str, object]:
    """Drive the server; returns throughput (msgs/s over the measured window) and latency."""
    stats = Stats()
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    per_sender = rate / pairs if rate else None
    reg = Registrar() if kind == "relay" else None
    # Fresh forwarder ids per run: frames a previous run left in flight must not reach
    # this run's receivers (the forwarder keeps running between runs).
    base = secrets.randbelow(1 << 30)
    for i in range(pairs):
        if reg is not None:
            await relay_pair(url, reg, size, per_sender, stats, stop, tasks)
        else:
            await bare_pair(url, base + i, size, per_sender, stats, stop, tasks)
    await asyncio.sleep(min(2.0, seconds / 4))  # warm-up
    stats.measuring = True
    start_count, start = stats.received, time.monotonic()
    await asyncio.sleep(seconds)
    count, elapsed = stats.received - start_count, time.monotonic() - start
    stats.measuring = False
    stop.set()
    for t in tasks:
        t.cancel()
    lat = sorted(stats.latencies)

    def pct(p: float, xs: list[float] = lat) -> float:
        return round(xs[min(len(xs) - 1, int(p * len(xs)))], 3) if xs else float("nan")

    parts: dict[str, float] = {}
    if stats.waits:
        waits, transits = sorted(stats.waits), sorted(stats.transits)
        parts = {"wait_p50_ms": pct(0.50, waits), "wait_p99_ms": pct(0.99, waits),
                 "transit_p50_ms": pct(0.50, transits), "transit_p99_ms": pct(0.99, transits)}
    return {
        "msgs_per_s": round(count / elapsed, 1),
        "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99),
        "mean_ms": round(statistics.fmean(lat), 3) if lat else float("nan"),
        **parts,
    }


async def capacity(url: str, conns: int, server_pid: int) -> dict[str, object]:
    """Open ``conns`` authenticated idle nodes; report relay RSS growth per connection."""
    reg = Registrar()
    base = rss_kib(server_pid)
    opened = 0
    t0 = time.monotonic()
    limiter = asyncio.Semaphore(64)
    clients: list[RelayClient] = []

    async def one() -> None:
        nonlocal opened
        async with limiter:
            client = RelayClient(await ws_connect(url + wire.PATH))
            await reg.register(client)
            await client.ws.recv()  # the first Deliver: this node is online
            clients.append(client)
        opened += 1

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(conns))), timeout=900)
    elapsed = time.monotonic() - t0
    await asyncio.sleep(1.0)  # let the relay settle before reading its memory
    grown = rss_kib(server_pid) - base
    for c in clients:
        c.ws.transport.abort()
    return {
        "connections": opened,
        "kib_per_connection": round(grown / max(opened, 1), 1),
        "relay_rss_mib": round((base + grown) / 1024, 1),
        "setup_s": round(elapsed, 1),
    }


# ---- orchestration -------------------------------------------------------------------------


SERVER_START_TIMEOUT = 30.0


def start_server(cmd: list[str], prefix: str) -> tuple[subprocess.Popen[str], str]:
    """Start a server and wait, with a deadline, for the line that says it listens. Its
    standard error goes to a log file that a failure names."""
    fd, log_name = tempfile.mkstemp(prefix="veil-bench-server-", suffix=".log")
    with os.fdopen(fd, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    why = f"it did not print {prefix!r} within {SERVER_START_TIMEOUT:g} s"
    while (left := deadline - time.monotonic()) > 0:
        if not sel.select(timeout=left):
            continue
        line = proc.stdout.readline()
        if line.startswith(prefix):
            sel.close()
            return proc, line.strip().split()[-1]
        if not line:
            why = f"it exited with status {proc.wait()}"
            break
    sel.close()
    proc.kill()
    proc.wait()
    raise SystemExit(f"bench: error: the server did not start ({why}); its log: {log_name}")


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_loadgen(*args: str) -> dict[str, object]:
    """The load generator runs in its own process, like a real client fleet would."""
    out = subprocess.run([sys.executable, __file__, "loadgen", *args], capture_output=True, text=True,
                         timeout=900, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"bench: error: load generator failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _curve_rates(fmax: float, fractions: list[float]) -> list[float]:
    return [round(fmax * f, 1) for f in fractions]


def plot_curve(path: Path, curve: dict[str, list[dict[str, object]]], fmax: float) -> None:
    """The latency-against-rate picture: p50 (dashed) and p99 (solid) one-way latency of
    each server against the offered rate, log scale, as a small self-contained SVG."""
    import math

    width, height, left, right, top, bottom = 720, 420, 70, 170, 40, 50
    colours = {"forwarder": "#555555", "relay (SQLite file)": "#1f77b4", "relay (PostgreSQL)": "#d62728"}
    points = [(float(r["rate"]), float(r[k])) for rows in curve.values() for r in rows  # type: ignore[arg-type]
              for k in ("p50_ms", "p99_ms") if not math.isnan(float(r[k]))]  # type: ignore[arg-type]
    if not points:
        return
    xmax = max(x for x, _ in points) * 1.05
    ymin = max(0.1, min(y for _, y in points) / 1.5)
    ymax = max(y for _, y in points) * 1.5
    lo, hi = math.log10(ymin), math.log10(ymax)

    def px(x: float) -> float:
        return left + (width - left - right) * x / xmax

    def py(y: float) -> float:
        return top + (height - top - bottom) * (1 - (math.log10(max(y, ymin)) - lo) / (hi - lo))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif"'
           ' font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="20" font-size="14">One-way latency against offered rate (scripts/bench;'
           f' forwarder max {fmax:,.0f} msgs/s)</text>']
    for e in range(math.floor(lo), math.ceil(hi) + 1):
        for m in (1, 2, 5):
            y = m * 10.0**e
            if ymin <= y <= ymax:
                out.append(f'<line x1="{left}" x2="{width - right}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#ddd"/>')
                out.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    step = 10 ** math.floor(math.log10(xmax / 4))
    step = step * (5 if xmax / step > 20 else 2 if xmax / step > 8 else 1)
    x = 0.0
    while x <= xmax:
        out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top}" y2="{height - bottom}" stroke="#eee"/>')
        out.append(f'<text x="{px(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{x:,.0f}</text>')
        x += step
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 10}" text-anchor="middle">offered rate, msgs/s</text>')
    out.append(f'<text x="16" y="{(top + height - bottom) / 2}" transform="rotate(-90 16 {(top + height - bottom) / 2})"'
               ' text-anchor="middle">ms (log scale)</text>')
    legend_y = top + 10
    for name, rows in curve.items():
        colour = colours.get(name, "#2ca02c")
        for key, dash in (("p99_ms", ""), ("p50_ms", ' stroke-dasharray="5 4"')):
            pts = " ".join(f"{px(float(r['rate'])):.1f},{py(float(r[key])):.1f}" for r in rows  # type: ignore[arg-type]
                           if not math.isnan(float(r[key])))  # type: ignore[arg-type]
            out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        out.append(f'<line x1="{width - right + 10}" x2="{width - right + 30}" y1="{legend_y}" y2="{legend_y}"'
                   f' stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{width - right + 36}" y="{legend_y + 4}">{name}</text>')
        legend_y += 18
    out.append(f'<text x="{width - right + 10}" y="{legend_y + 8}">solid: p99, dashed: p50</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def orchestrate(args: argparse.Namespace) -> None:
    raise_fd_limit()
    common = ["--pairs", str(args.pairs), "--size", str(args.size), "--seconds", str(args.seconds)]
    say = (lambda *a: None) if args.json_only else (lambda *a: print(*a, file=sys.stderr, flush=True))
    results: dict[str, dict[str, object]] = {}
    curve: dict[str, list[dict[str, object]]] = {}
    fractions = [float(f) for f in args.curve.split(",") if f.strip()] if args.curve else []

    def at_rates(name: str, kind: str, url: str, rates: list[float]) -> None:
        rows = curve.setdefault(name, [])
        for rate in rates:
            say(f"{name}: latency at {rate:.0f} msgs/s ...")
            rows.append({"rate": rate, **run_loadgen(kind, url, *common, "--rate", str(rate))})

    with tempfile.TemporaryDirectory(prefix="veil-bench-") as tmp:
        fwd, fwd_url = start_server([sys.executable, __file__, "forwarder"], "forwarder listening on")
        try:
            say("bare forwarder: maximum throughput ...")
            results["forwarder_max"] = run_loadgen("bare", fwd_url, *common)
            fmax = float(results["forwarder_max"]["msgs_per_s"])  # type: ignore[arg-type]
            half = fmax / 2
            say(f"bare forwarder: latency at {half:.0f} msgs/s ...")
            results["forwarder_half"] = run_loadgen("bare", fwd_url, *common, "--rate", str(half))
            rates = _curve_rates(fmax, fractions)
            at_rates("forwarder", "bare", fwd_url, rates)
        finally:
            stop_server(fwd)
        # The relay's flood limits are lifted: one bench account sends one device thousands
        # of envelopes a second, and the capacity run registers and connects thousands of
        # accounts (more than the default cap, which is sized for the worst case).
        def relay_cmd(data_dir: str, *extra: str) -> list[str]:
            return [sys.executable, "-m", "cli.main", "relay", "serve", "--port", "0", "--data-dir",
                    str(Path(tmp) / data_dir), "--sender-rate", "1e9", "--registrations-per-hour", "1e9",
                    "--max-connections", "20000", *extra]

        def measure(key: str, what: str, cmd: list[str], curve_name: str | None = None, half_too: bool = True) -> None:
            rel, rel_url = start_server(cmd, "relay listening on")
            try:
                say(f"{what}: maximum throughput ...")
                results[f"{key}_max"] = run_loadgen("relay", rel_url, *common)
                if half_too:
                    say(f"{what}: latency at {half:.0f} msgs/s ...")
                    results[f"{key}_half"] = run_loadgen("relay", rel_url, *common, "--rate", str(half))
                if curve_name:
                    at_rates(curve_name, "relay", rel_url, rates)
            finally:
                stop_server(rel)

        # The relay as it runs by default; committing without waiting for the disk
        # (--relaxed-durability), for what durability costs; without TLS, for what TLS costs.
        measure("relay", "relay", relay_cmd("relay-relay"), "relay (SQLite file)")
        measure("relaxed", "relay with relaxed durability", relay_cmd("relay-relaxed", "--relaxed-durability"))
        measure("plain", "relay without TLS", relay_cmd("relay-plain", "--insecure-no-tls"))
        if not args.no_postgresql:
            from tests.pgcluster import PgCluster, pg_bindir

            if pg_bindir() is None:
                say("PostgreSQL is not installed: its runs are skipped (.ci/run installs it)")
            else:
                with PgCluster.start(fsync=True) as cluster:
                    dsn = cluster.create_database("bench_one")
                    measure("pg", "relay on PostgreSQL", relay_cmd("relay-pg", "--store", dsn), "relay (PostgreSQL)")
                    dsn = cluster.create_database("bench_two")
                    measure("pg2", "two relay processes on PostgreSQL",
                            relay_cmd("relay-pg2", "--store", dsn, "--workers", "2"), half_too=False)
        if args.conns:
            rel, rel_url = start_server(relay_cmd("relay-capacity"), "relay listening on")
            try:
                say(f"relay: {args.conns} connected nodes ...")
                results["capacity"] = run_loadgen("capacity", rel_url, "--conns", str(args.conns),
                                                  "--server-pid", str(rel.pid))
            finally:
                stop_server(rel)
    fmax_r, rmax = results["forwarder_max"], results["relay_max"]
    fh, rh = results["forwarder_half"], results["relay_half"]

    def over(a: dict[str, object], b: dict[str, object]) -> float:
        return round(float(a["msgs_per_s"]) / float(b["msgs_per_s"]), 3)  # type: ignore[arg-type]

    ratio = over(rmax, fmax_r)
    pmax, ph = results["plain_max"], results["plain_half"]
    xmax, xh = results["relaxed_max"], results["relaxed_half"]
    tls_ratio = over(rmax, pmax)
    durable_ratio = over(rmax, xmax)
    columns = [("forwarder", fmax_r, fh), ("relay", rmax, rh), ("relay no TLS", pmax, ph), ("relay relaxed", xmax, xh)]
    extra: dict[str, object] = {}
    if "pg_max" in results:
        columns.append(("relay on PG", results["pg_max"], results["pg_half"]))
        extra["pg_ratio"] = over(results["pg_max"], rmax)
        extra["pg_workers_ratio"] = over(results["pg2_max"], results["pg_max"])
    print(f"{'':28}" + "".join(f"{name:>15}" for name, _, _ in columns))
    print(f"{'max msgs/s':28}" + "".join(f"{m['msgs_per_s']:>15}" for _, m, _ in columns))
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        print(f"{key + f' at {half:.0f}/s':28}" + "".join(f"{h[key]:>15}" for _, _, h in columns))
    for name, _, h in columns[1:]:
        if "wait_p50_ms" in h:
            print(f"{name} at {half:.0f}/s, p50/p99 ms: {h['wait_p50_ms']}/{h['wait_p99_ms']} in the sender (for the"
                  f" answer to its send before), then {h['transit_p50_ms']}/{h['transit_p99_ms']} to the receiver")
    if "pg2_max" in results:
        print(f"two relay processes on PostgreSQL: {results['pg2_max']['msgs_per_s']} msgs/s")
    for name, rows in curve.items():
        print(f"{name} p50/p99 ms by rate: " + ", ".join(f"{r['rate']:.0f}: {r['p50_ms']}/{r['p99_ms']}" for r in rows))
    if "capacity" in results:
        cap = results["capacity"]
        print(f"connected nodes: {cap['connections']}, {cap['kib_per_connection']} KiB each "
              f"(relay RSS {cap['relay_rss_mib']} MiB)")
    print(f"ratio (relay / forwarder max msgs/s): {ratio}")
    print(f"ratio (relay with TLS / without, max msgs/s): {tls_ratio}")
    print(f"ratio (relay durable / relaxed durability, max msgs/s): {durable_ratio}")
    p99_ratio = round(float(rh["p99_ms"]) / float(fh["p99_ms"]), 2)  # type: ignore[arg-type]
    print(f"ratio (relay / forwarder p99 at half the forwarder's max): {p99_ratio}")
    transit_p99_ratio = round(float(rh["transit_p99_ms"]) / float(fh["p99_ms"]), 2)  # type: ignore[arg-type]
    print(f"ratio (relay's transit alone / forwarder p99 at half the forwarder's max): {transit_p99_ratio}")
    for key, value in extra.items():
        print(f"{key}: {value}")
    if curve and args.plot:
        plot_curve(Path(args.plot), curve, fmax)
        print(f"latency curve written to {args.plot}")
    summary = {"ratio": ratio, "tls_ratio": tls_ratio, "durable_ratio": durable_ratio, "p99_ratio": p99_ratio,
               "transit_p99_ratio": transit_p99_ratio,
               **extra, "pairs": args.pairs, "size": args.size, "seconds": args.seconds,
               "half_rate": round(half, 1), **{k: v for k, v in results.items()}, "curve": curve}
    print(json.dumps(summary))


def main() -> None:
    p = argparse.ArgumentParser(prog="scripts/bench")
    sub = p.add_subparsers(dest="cmd")
    p.add_argument("--pairs", type=int, default=50)
    p.add_argument("--size", type=int, default=300)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--conns", type=int, default=10000, help="connected-nodes test size (0 skips it)")
    p.add_argument("--json-only", action="store_true")
    p.add_argument("--no-postgresql", action="store_true", help="skip the PostgreSQL runs")
    p.add_argument("--curve", default="0.05,0.1,0.25,0.5",
                   help="rates for the latency curve, as fractions of the forwarder's maximum ('' skips it)")
    p.add_argument("--plot", default=str(ROOT / "docs" / "bench-latency.svg"),
                   help="where the latency curve's SVG goes ('' writes none)")
    sub.add_parser("crypto", help="what post-quantum costs a message: CPU and bytes (scripts/bench_crypto.py)")
    f = sub.add_parser("forwarder")
    f.add_argument("--port", type=int, default=0)
    lg = sub.add_parser("loadgen")
    lg.add_argument("kind", choices=["bare", "relay", "capacity"])
    lg.add_argument("url")
    lg.add_argument("--pairs", type=int, default=50)
    lg.add_argument("--size", type=int, default=300)
    lg.add_argument("--seconds", type=float, default=8.0)
    lg.add_argument("--rate", type=float, default=None)
    lg.add_argument("--conns", type=int, default=0)
    lg.add_argument("--server-pid", type=int, default=0)
    args = p.parse_args()
    if args.cmd == "crypto":
        import bench_crypto  # scripts/ is this script's directory

        bench_crypto.main()
    elif args.cmd == "forwarder":
        trio.run(forwarder, args.port)
    elif args.cmd == "loadgen":
        raise_fd_limit()
        args.url = args.url.split("#", 1)[0]  # the relay's key pin: not part of what is dialled
        if args.kind == "capacity":
            res = asyncio.run(capacity(args.url, args.conns, args.server_pid))
        else:
            res = asyncio.run(load(args.kind, args.url, args.pairs, args.size, args.seconds, args.rate))
        print(json.dumps(res))
    else:
        orchestrate(args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
