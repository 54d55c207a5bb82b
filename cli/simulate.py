"""`veil simulate`: many real nodes against one relay, checked message by message.

The coordinator (this process) starts a relay process with a throwaway database (unless
``--relay`` is given), or with ``--store`` ``--relays`` N processes over one PostgreSQL
database and one data directory (so one relay key and one TLS key: they act as one
relay), then ``--procs`` worker processes. Node i registers at relay i % N and stays there
(its home keeps that address). Each worker registers its share
of the N nodes (real RSA/Ed25519/X25519 keys, real encrypted stores; passwords are
hashed with the weak test KDF profile, and the run says so), gives every fifth node a
second device, then runs every device as a ``LiveSession``: online most of the time,
sometimes offline (its messages queue and its mail waits at the relay). Each node sends
M messages to random peers. Workers report every send and every decrypted message on
stdout as JSON lines; the coordinator checks that each message reached every device it
was meant for (all the recipient's devices and the sender's other devices) exactly once,
and no other device.

``--chaos`` also cuts node connections just after a send is handed over, and kills and
restarts the relay process (SIGKILL or SIGTERM) during the run; with several, it SIGKILLs
one process at a time (each at least once) while the others serve.

Besides the counts, the report says where a message's time went (the sender's sealing,
spells offline or reconnecting, waiting in queues, the recipient's opening) and the CPU
the node and relay processes spent per message.

Everything is bounded: a run ends when every expected delivery is seen or its deadline
passes (then the missing ones count as lost). Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from cli.errors import CliError
from wire.address import parse_address

PASSWORD = "simulated nodes use this password"
SECOND_DEVICE_EVERY = 5
SEND_GAP = 0.05  # mean seconds between one node's sends
OFFLINE_SHARE = float(os.environ.get("VEIL_SIM_OFFLINE", "0.3"))  # devices that spend part of the run offline
CHAOS_CUT_PROB = 0.15
GROUP_SHARE = 0.5  # of a node's messages, to a group it knows (with --groups)
RELAY_START_TIMEOUT = 30.0
ENV_STORE = "VEIL_RELAY_STORE"  # as `veil relay serve` reads it


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, math.ceil(p * len(sorted_values)) - 1)]


# ---- worker ------------------------------------------------------------------------------------


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def worker_main(cfg: dict[str, Any]) -> None:
    from keyvault.kdf import TEST_KDF
    from keyvault.keys import AccountKeys
    from node.home import Home
    from node.node import Node, Received
    from node.session import LiveSession

    rng = random.Random(cfg["seed"])
    base = Path(cfg["dir"])
    relays: list[str] = cfg["relays"]
    devices: dict[str, Node] = {}  # label "name/i" -> node
    for name in cfg["names"]:
        relay = relays[int(name[-5:]) % len(relays)]  # the node's home keeps this address
        keys = await trio.to_thread.run_sync(AccountKeys.generate)
        node, _ = await Node.register(Home(base / name / "0"), name, PASSWORD, relay, kdf=TEST_KDF, keys=keys)
        devices[f"{name}/0"] = node
        if int(name[-5:]) % SECOND_DEVICE_EVERY == 0:
            devices[f"{name}/1"] = await Node.login(
                Home(base / name / "1"), name, PASSWORD, relay, min_kdf=TEST_KDF
            )
        emit({"registered": name, "devices": [d for d in devices if d.startswith(name + "/")]})

    stdin = trio.wrap_file(sys.stdin)
    line = await stdin.readline()
    assert json.loads(line).get("go"), line
    everyone: list[str] = cfg["everyone"]
    messages: int = cfg["messages"]
    chaos: bool = cfg["chaos"]
    cpu_at_go = time.process_time()
    for g in cfg.get("groups", []):
        creator = devices[f"{g['members'][0]}/0"]
        creator.group_create(g["name"], g["members"][1:])
    sessions = {label: LiveSession(node, backoff_max=1.0) for label, node in devices.items()}
    keys_by_id: dict[bytes, str] = {}  # msg_id -> the simulation's key of the message
    seal_ms: dict[str, float] = {}

    # Where a message's time goes: the sender's sealing and the recipient's opening are
    # timed around the node's own steps (neither awaits, except an opening that first
    # looks up an unknown sender's keys). One device opens one envelope at a time, and
    # announces it at the end of the opening.
    opening_since: dict[str, float] = {}
    for label, node in devices.items():
        node._seal = timed_seal(node._seal, seal_ms)  # type: ignore[method-assign]
        node._accept_one = timed_accept(  # type: ignore[method-assign, assignment]
            node._accept_one, opening_since, label)

    for label, session in sessions.items():
        def on_message(r: Received, label: str = label) -> None:
            if devices[label].store.is_group_event(r.message.msg_id):
                return  # a line saying who made a group: not a message of the run
            open_ms = (time.perf_counter() - opening_since.get(label, time.perf_counter())) * 1e3
            emit({"recv": message_key(r.message.body), "device": label, "t": time.time_ns(),
                  "from": r.message.sender, "open_ms": round(open_ms, 3)})

        def on_sent(msg_id: bytes, label: str = label) -> None:
            key = keys_by_id.pop(msg_id, None)
            if key is not None:
                emit({"handed": key, "t": time.time_ns(), "seal_ms": round(seal_ms.pop(key, 0.0), 3)})

        def on_status(status: str, label: str = label) -> None:
            emit({"status": status, "device": label, "t": time.time_ns()})

        session.on.message.append(on_message)
        session.on.sent.append(on_sent)
        session.on.status.append(on_status)

    async def run_device(label: str, session: LiveSession) -> None:
        # Some devices spend part of the run offline: their mail waits at the relay and
        # what they send waits in their outbox.
        offline = rng.random() < OFFLINE_SHARE
        while True:
            if offline:
                await trio.sleep(rng.uniform(0.2, 1.5))
            with trio.move_on_after(rng.uniform(1.0, 4.0) if offline else math.inf):
                await session.run()
            session.status = "offline"  # a cancelled run() announces nothing
            emit({"status": "offline", "device": label, "t": time.time_ns()})

    async def cut_links() -> None:
        while True:
            await trio.sleep(rng.uniform(0.05, 0.4))
            session = rng.choice(list(sessions.values()))
            link = session.link
            if link is not None and rng.random() < CHAOS_CUT_PROB * 4:
                emit({"cut": 1})
                await trio.aclose_forcefully(link.ws._stream)

    async def send_all(name: str) -> None:
        mine = [label for label in sessions if label.startswith(name + "/")]
        for seq in range(messages):
            await trio.sleep(rng.expovariate(1 / SEND_GAP))
            peer = rng.choice([p for p in everyone if p != name])
            label = rng.choice(mine)
            key = f"{name}:{seq}"
            body = json.dumps({"k": key, "pad": secrets.token_hex(rng.randint(0, 40))})
            t = time.time_ns()
            node = devices[label]
            known = [(gid, g) for gid, g in node.store.group_ids() if name in node.groups.state(gid).members]
            if known and rng.random() < GROUP_SHARE:
                gid, group = rng.choice(known)
                members = sorted(node.groups.state(gid).members)
                keys_by_id[sessions[label].send("#" + group, body).msg_id] = key
                emit({"sent": key, "from": name, "device": label, "to": "#" + group, "members": members, "t": t})
            else:
                keys_by_id[sessions[label].send(peer, body).msg_id] = key
                emit({"sent": key, "from": name, "device": label, "to": peer, "t": t})
            if chaos and rng.random() < CHAOS_CUT_PROB:
                link = sessions[label].link
                if link is not None:  # cut the link while the send may be in flight
                    emit({"cut": 1})
                    await trio.aclose_forcefully(link.ws._stream)

    async def until_stop(scope: trio.CancelScope) -> None:
        await stdin.readline()
        scope.cancel()

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(until_stop, scope)
            for label, session in sessions.items():
                nursery.start_soon(run_device, label, session)
            for name in cfg["names"]:
                nursery.start_soon(send_all, name)
            if chaos:
                nursery.start_soon(cut_links)
    cpu = time.process_time()
    for node in devices.values():
        node.close()
    emit({"done": 1, "cpu_s": round(cpu - cpu_at_go, 3), "cpu_setup_s": round(cpu_at_go, 3)})


def message_key(body: str) -> str | None:
    try:
        key = json.loads(body).get("k")
    except (ValueError, AttributeError):
        return None
    return key if isinstance(key, str) else None


def timed_seal(seal: Callable[..., int], spent: dict[str, float]) -> Callable[..., int]:
    def timed(m: Any, *args: Any) -> int:
        t0 = time.perf_counter()
        try:
            return seal(m, *args)
        finally:
            key = message_key(m.body)
            if key is not None:
                spent[key] = spent.get(key, 0.0) + (time.perf_counter() - t0) * 1e3

    return timed


def timed_accept(
    accept: Callable[..., Awaitable[Any]], since: dict[str, float], label: str
) -> Callable[..., Awaitable[Any]]:
    async def timed(*args: Any) -> Any:
        since[label] = time.perf_counter()
        return await accept(*args)

    return timed


# ---- coordinator -------------------------------------------------------------------------------


@dataclass
class Run:
    n: int
    m: int
    started: float = field(default_factory=time.monotonic)
    devices: dict[str, list[str]] = field(default_factory=dict)  # node -> device labels
    sent: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> send record
    received: dict[str, dict[str, int]] = field(default_factory=dict)  # key -> device -> count
    latencies: list[float] = field(default_factory=list)
    first_send: int | None = None
    last_recv: int = 0
    cuts: int = 0
    restarts: int = 0
    relay_kills: int = 0
    chaos_pending: bool = False  # relay kills still to come: the run waits for them
    handed: dict[str, tuple[int, float]] = field(default_factory=dict)  # key -> (t, seal ms)
    first_recv: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)  # (key, dev) -> (t, open ms)
    offline: dict[str, list[list[int]]] = field(default_factory=dict)  # device -> [start, end or 0]
    first_online: dict[str, int] = field(default_factory=dict)  # device -> t
    go: int = 0  # when the nodes were told to start
    node_cpu_s: float = 0.0  # the worker processes, from "go" to the end
    node_setup_cpu_s: float = 0.0
    changed: trio.Event = field(default_factory=trio.Event)
    expected_total: int = 0
    delivered: int = 0
    done_workers: int = 0
    errors: list[str] = field(default_factory=list)  # a worker's one-line failure

    def expected(self, key: str) -> set[str]:
        rec = self.sent[key]
        if "members" in rec:  # a group message: every device of every member, ours too
            return {d for m in [*rec["members"], rec["from"]] for d in self.devices[m]} - {rec["device"]}
        return (set(self.devices[rec["to"]]) | set(self.devices[rec["from"]])) - {rec["device"]}

    async def wait_until(self, done: Any, say: Any, progress: Any) -> None:
        """Wait for ``done()``, reporting progress about once a second; a failed worker
        ends the run at once (CliError with its reason)."""
        while not done():
            if self.errors:
                raise CliError(f"a simulated node process failed: {self.errors[0]}")
            say(progress())
            with trio.move_on_after(1.0):
                while not done() and not self.errors:
                    await self.changed.wait()

    def wake(self) -> None:
        """Wake whoever waits in wait_until to look again."""
        self.changed.set()
        self.changed = trio.Event()

    def on_event(self, ev: dict[str, Any]) -> None:
        self.wake()
        if "registered" in ev:
            self.devices[ev["registered"]] = ev["devices"]
        elif "sent" in ev:
            self.sent[ev["sent"]] = ev
            self.first_send = ev["t"] if self.first_send is None else min(self.first_send, ev["t"])
            self.expected_total += len(self.expected(ev["sent"]))
            self.delivered += sum(
                1 for d, c in self.received.get(ev["sent"], {}).items() if c >= 1 and d in self.expected(ev["sent"])
            )
        elif "recv" in ev:
            key, dev = ev["recv"], ev["device"]
            counts = self.received.setdefault(key, {})
            counts[dev] = counts.get(dev, 0) + 1
            if counts[dev] == 1:
                self.first_recv[(key, dev)] = (ev["t"], float(ev.get("open_ms", 0.0)))
            self.last_recv = max(self.last_recv, ev["t"])
            rec = self.sent.get(key)
            if rec is not None:
                self.latencies.append((ev["t"] - rec["t"]) / 1e6)
                if counts[dev] == 1 and dev in self.expected(key):
                    self.delivered += 1
        elif "handed" in ev:
            self.handed[ev["handed"]] = (ev["t"], float(ev["seal_ms"]))
        elif "status" in ev:
            spells = self.offline.setdefault(ev["device"], [])
            if ev["status"] == "online":
                self.first_online.setdefault(ev["device"], ev["t"])
                if spells and spells[-1][1] == 0:
                    spells[-1][1] = ev["t"]
            elif not spells or spells[-1][1] != 0:
                spells.append([ev["t"], 0])
        elif "cut" in ev:
            self.cuts += 1
        elif "done" in ev:
            self.done_workers += 1
            self.node_cpu_s += float(ev.get("cpu_s", 0.0))
            self.node_setup_cpu_s += float(ev.get("cpu_setup_s", 0.0))
        elif "error" in ev:
            self.errors.append(str(ev["error"])[:300])

    def complete(self) -> bool:
        return (len(self.sent) == self.n * self.m and self.delivered >= self.expected_total
                and not self.chaos_pending)

    def offline_ns(self, device: str, start: int, end: int) -> list[tuple[int, int]]:
        """The device's spells offline (or reconnecting) within [start, end]."""
        out = []
        for a, b in self.offline.get(device, []):
            a, b = max(a, start), min(b or end, end)
            if a < b:
                out.append((a, b))
        return out

    def latency_parts(self) -> dict[str, Any]:
        """Where the latency of each first delivery went, on average. Until the relay
        held the message (the sender's send answered): the sender's sealing (node crypto
        and its store), spells when the sender was offline or reconnecting, and the rest,
        waiting (the sender's event loop, the relay's group commit, the network). After
        that: spells when the recipient was offline, its opening, and the rest, waiting
        (the push, the recipient's event loop)."""
        sums = dict.fromkeys(("mean_ms", "seal_ms", "sender_offline_ms", "waiting_to_relay_ms",
                              "recipient_offline_ms", "open_ms", "waiting_from_relay_ms"), 0.0)
        online: list[float] = []
        for (key, dev), (t_recv, open_ms) in self.first_recv.items():
            rec = self.sent.get(key)
            if rec is None or dev not in self.expected(key):
                continue
            t_sent = rec["t"]
            t_handed, seal_ms = self.handed.get(key, (t_recv, 0.0))
            t_handed = max(t_sent, min(t_handed, t_recv))  # a push may beat the send's answer
            to_relay, from_relay = (t_handed - t_sent) / 1e6, (t_recv - t_handed) / 1e6
            seal_ms, open_ms = min(seal_ms, to_relay), min(open_ms, from_relay)
            s_off = min(to_relay - seal_ms, sum(b - a for a, b in self.offline_ns(rec["device"], t_sent, t_handed)) / 1e6)
            r_off = min(from_relay - open_ms, sum(b - a for a, b in self.offline_ns(dev, t_handed, t_recv)) / 1e6)
            for k, v in (("mean_ms", to_relay + from_relay), ("seal_ms", seal_ms), ("sender_offline_ms", s_off),
                         ("waiting_to_relay_ms", to_relay - seal_ms - s_off), ("recipient_offline_ms", r_off),
                         ("open_ms", open_ms), ("waiting_from_relay_ms", from_relay - open_ms - r_off)):
                sums[k] += v
            if s_off == 0 and r_off == 0:
                online.append(to_relay + from_relay)
        n = max(1, self.counted_deliveries())
        online.sort()
        out: dict[str, Any] = {k: round(v / n, 2) for k, v in sums.items()}
        out["deliveries_never_offline"] = len(online)
        out["never_offline_p50_ms"] = round(percentile(online, 0.50), 2) if online else None
        out["never_offline_p95_ms"] = round(percentile(online, 0.95), 2) if online else None
        # The first connection of every device (TLS, login, prekeys) comes at once, when
        # the sends start: on a busy machine it is most of the "offline" time.
        first = sorted((t - self.go) / 1e6 for t in self.first_online.values())
        out["first_online_p50_ms"] = round(percentile(first, 0.50), 2) if first else None
        out["first_online_max_ms"] = round(first[-1], 2) if first else None
        return out

    def counted_deliveries(self) -> int:
        return sum(1 for k, d in self.first_recv if k in self.sent and d in self.expected(k))

    def report(self, chaos: bool, procs: int) -> dict[str, Any]:
        lost = duplicates = misdelivered = delivered = 0
        missing: list[str] = []
        for key in self.sent:
            want = self.expected(key)
            got = self.received.get(key, {})
            for dev in want:
                if got.get(dev, 0) == 0:
                    lost += 1
                    missing.append(f"{key} from {self.sent[key]['device']} to {dev}")
                else:
                    delivered += 1
            for dev, count in got.items():
                if dev in want:
                    duplicates += count - 1
                else:
                    misdelivered += count
        unknown = sum(sum(c.values()) for k, c in self.received.items() if k not in self.sent)
        span = ((self.last_recv - (self.first_send or 0)) / 1e9) if self.first_send and self.last_recv else 0.0
        lat = sorted(self.latencies)
        return {
            "nodes": self.n,
            "devices": sum(len(v) for v in self.devices.values()),
            "sent": len(self.sent),
            "expected": self.expected_total,
            "delivered": delivered,
            "lost": lost,
            "duplicates": duplicates,
            "misdelivered": misdelivered + unknown,
            "messages_per_s": round(len(self.sent) / span, 1) if span > 0 else 0.0,
            "deliveries_per_s": round(delivered / span, 1) if span > 0 else 0.0,
            "latency_ms": {
                "p50": round(percentile(lat, 0.50), 2),
                "p95": round(percentile(lat, 0.95), 2),
                "p99": round(percentile(lat, 0.99), 2),
            },
            "latency_parts": self.latency_parts(),
            # A first message to a peer costs more on both sides: key lookups, a prekey
            # claim and X3DH before the ratchet, a key lookup where it is opened.
            "first_contacts": len({(r["from"], r["to"]) for r in self.sent.values()}),
            "group_messages": sum(1 for r in self.sent.values() if "members" in r),
            "node_cpu_ms_per_message": round(self.node_cpu_s * 1e3 / len(self.sent), 2) if self.sent else 0.0,
            "node_cpu_ms_per_delivery": round(self.node_cpu_s * 1e3 / delivered, 2) if delivered else 0.0,
            "node_cpu_s": round(self.node_cpu_s, 2),
            "node_setup_cpu_s": round(self.node_setup_cpu_s, 2),
            "chaos": chaos,
            "connections_cut": self.cuts,
            "relay_restarts": self.restarts,
            "relay_kills": self.relay_kills,
            "procs": procs,
            "kdf_profile": "test",
            "missing": missing[:10],
        }


def process_cpu_s(pid: int) -> float:
    """User and system CPU seconds of a running process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RelayProcess:
    """A relay subprocess that can be killed and started again on the same port. Relays
    of one simulation share their data directory (its relay key and TLS key) and, with
    ``store``, one PostgreSQL database: together they act as one relay."""

    def __init__(self, data_dir: Path, index: int = 0, store: str | None = None) -> None:
        self.data_dir = data_dir
        self.index = index
        self.store = store
        self.port = 0
        self.proc: trio.Process | None = None
        self.url = ""
        self.cpu_s = 0.0  # of the processes that have ended

    def cpu_so_far(self) -> float:
        return self.cpu_s + (process_cpu_s(self.proc.pid) if self.proc is not None else 0.0)

    async def start(self) -> str:
        # Its own throwaway relay registers every simulated node at once.
        cmd = [sys.executable, "-m", "cli.main", "relay", "serve", "--port", str(self.port),
               "--data-dir", str(self.data_dir), "--registrations-per-hour", "1e9"]
        # The store goes by the environment, as a password in it stays out of `ps`.
        env = {k: v for k, v in os.environ.items() if k != ENV_STORE}
        if self.store is not None:
            env[ENV_STORE] = self.store
        log_path = self.data_dir.parent / f"relay{self.index}.log"
        with open(log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=log, env=env)
        try:
            return await self._listening(log_path)
        except BaseException:
            # Not left running behind a simulation that gave up (or crashed) while it started.
            with trio.CancelScope(shield=True):
                await self.stop(signal.SIGKILL)
            raise

    async def _listening(self, log_path: Path) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        buf = b""
        with trio.move_on_after(RELAY_START_TIMEOUT) as waited:
            while b"\n" not in buf:
                chunk = await self.proc.stdout.receive_some()
                if not chunk:
                    lines = log_path.read_text(errors="replace").strip().splitlines()
                    why = lines[-1] if lines else "no output"
                    raise CliError(f"the simulation's relay exited before it was listening: {why}")
                buf += chunk
        if waited.cancelled_caught:
            raise CliError(f"the simulation's relay did not listen within {RELAY_START_TIMEOUT:g} s (log: {log_path})")
        line = buf.split(b"\n", 1)[0].decode()
        self.url = line.rsplit(" ", 1)[1]
        self.port = parse_address(self.url).port
        return self.url

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        self.cpu_s += process_cpu_s(self.proc.pid)
        self.proc.send_signal(sig)
        with trio.move_on_after(30):
            await self.proc.wait()
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.proc = None


async def coordinate(args: argparse.Namespace) -> dict[str, Any]:
    def say(text: str) -> None:
        if not args.quiet:
            print(f"simulate: {text}", file=sys.stderr, flush=True)

    store = relay_store(args)
    say("node passwords use the weak test KDF profile (Argon2id t=1, 8 MiB) to keep the run short")
    tag = secrets.token_hex(2)
    names = [f"sim{tag}n{i:05d}" for i in range(args.nodes)]
    procs = max(1, min(args.procs, args.nodes))
    run = Run(args.nodes, args.messages)
    # Groups: each made by its first member once sending starts; the others learn of it
    # with the first message they get in it, and write to it once they know it.
    pick = random.Random(args.seed)
    size = max(2, min(args.group_size, args.nodes))
    groups = [{"name": f"g{i}", "members": pick.sample(names, size)} for i in range(args.groups)]
    with tempfile.TemporaryDirectory(prefix="veil-sim-") as tmp:
        relays: list[RelayProcess] = []
        workers: list[trio.Process] = []
        try:
            if args.relay is None:
                # The first one makes the relay key, the TLS key and the schema; the
                # others find them.
                relays = [RelayProcess(Path(tmp) / "relay", i, store) for i in range(args.relays)]
                for relay in relays:
                    await relay.start()
                what = "a throwaway database" if store is None else "the PostgreSQL store"
                say(f"{len(relays)} relay process{'es' if len(relays) > 1 else ''} on {what}: "
                    + ", ".join(r.url for r in relays))
                urls = [r.url for r in relays]
            else:
                await check_relay(args.relay)
                if args.chaos:
                    say("--relay given: chaos cuts connections but cannot restart that relay")
                urls = [args.relay]
            async with trio.open_nursery() as nursery:
                for w in range(procs):
                    mine = set(names[w::procs])
                    cfg = {"names": names[w::procs], "everyone": names, "messages": args.messages,
                           "relays": urls, "dir": str(Path(tmp) / f"w{w}"), "seed": args.seed * 1000 + w,
                           "chaos": args.chaos, "groups": [g for g in groups if g["members"][0] in mine]}
                    p = await trio.lowlevel.open_process(
                        [sys.executable, "-m", "cli.simulate", "worker"],
                        stdin=-1, stdout=-1, env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
                    )
                    assert p.stdin is not None
                    await p.stdin.send_all((json.dumps(cfg) + "\n").encode())
                    workers.append(p)
                    nursery.start_soon(read_events, p, run)
                deadline = trio.current_time() + args.timeout
                with trio.move_on_at(deadline):
                    await run.wait_until(lambda: len(run.devices) >= args.nodes, say,
                                         lambda: f"registered {len(run.devices)}/{args.nodes} nodes")
                if len(run.devices) < args.nodes:
                    raise CliError(f"the nodes were not registered within --timeout {args.timeout:g} s"
                                   f" ({len(run.devices)} of {args.nodes})")
                say(f"registered {args.nodes} nodes with {sum(len(v) for v in run.devices.values())} devices; sending")
                relay_cpu_at_go = sum(r.cpu_so_far() for r in relays)
                run.go = time.time_ns()
                for p in workers:
                    assert p.stdin is not None
                    await p.stdin.send_all(b'{"go": true}\n')
                if args.chaos and relays:
                    run.chaos_pending = True
                    nursery.start_soon(restart_relays, relays, run, args, say)
                with trio.move_on_at(deadline):
                    await run.wait_until(
                        run.complete, say,
                        lambda: f"sent {len(run.sent)}/{args.nodes * args.messages}, delivered "
                        f"{run.delivered}/{run.expected_total}, cuts {run.cuts}, restarts {run.restarts}",
                    )
                # Stop every worker; let them close their stores cleanly.
                for p in workers:
                    assert p.stdin is not None
                    with trio.move_on_after(5):
                        await p.stdin.send_all(b'{"stop": true}\n')
                with trio.move_on_after(30):
                    await run.wait_until(lambda: run.done_workers >= procs, lambda _: None, lambda: "")
                nursery.cancel_scope.cancel()
            relay_cpu = sum(r.cpu_so_far() for r in relays) - relay_cpu_at_go
        finally:
            for p in workers:
                if p.returncode is None:
                    p.kill()
            for relay in relays:
                await relay.stop()
    report = run.report(args.chaos, procs)
    report["relays"] = urls
    report["store"] = "given relay's" if args.relay is not None else "file" if store is None else "postgresql"
    if relays:
        report["relay_cpu_ms_per_message"] = round(relay_cpu * 1e3 / len(run.sent), 2) if run.sent else 0.0
    return report


def relay_store(args: argparse.Namespace) -> str | None:
    """The PostgreSQL store the simulation's relays share (--store or $VEIL_RELAY_STORE)."""
    if args.relay is not None:
        if args.store is not None or args.relays > 1:
            raise CliError("--relay uses a relay that runs already: --relays and --store are for the simulation's own")
        return None
    store: str | None = args.store or os.environ.get(ENV_STORE) or None
    if store is not None and not store.startswith(("postgresql://", "postgres://")):
        raise CliError("--store takes a PostgreSQL connection string (postgresql://...)")
    if args.relays > 1 and store is None:
        raise CliError(f"--relays {args.relays} needs --store postgresql://... (or VEIL_RELAY_STORE):"
                       " relay processes act as one relay only over one database")
    return store


async def check_relay(url: str) -> None:
    """Fail in seconds, with the reason, when the relay given with --relay is not there."""
    import wire
    from node.link import open_link

    async with open_link(url) as link:  # RelayUnreachable: "cannot reach the relay at ..."
        await link.request(wire.Ping)


async def read_events(p: trio.Process, run: Run) -> None:
    assert p.stdout is not None
    buf = b""
    while True:
        chunk = await p.stdout.receive_some(65536)
        if not chunk:
            await p.wait()
            if p.returncode != 0 and not run.errors:
                run.on_event({"error": f"exited with status {p.returncode}"})
            return
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.strip():
                run.on_event(json.loads(line))


async def restart_relays(relays: list[RelayProcess], run: Run, args: argparse.Namespace, say: Any) -> None:
    """One relay: kill it (SIGKILL, then SIGTERM) once a quarter and again once 60% of
    the messages have been handed to nodes, and start it again on the same port. Several:
    SIGKILL one process at a time, each of them at least once, spread over the
    deliveries, while the others serve."""
    total: int = args.nodes * args.messages

    def handed_to_nodes(share: float) -> bool:
        return len(run.sent) >= share * total

    def delivered(share: float) -> bool:
        # The nodes compose their messages within the first seconds; deliveries go on
        # for the rest of the run, and so do these kills.
        return len(run.sent) >= total and run.delivered >= share * run.expected_total

    if len(relays) == 1:
        plan = [(handed_to_nodes, 0.25, relays[0], signal.SIGKILL), (handed_to_nodes, 0.6, relays[0], signal.SIGTERM)]
    else:
        kills = max(3, len(relays))
        plan = [(delivered, (k + 1) / (kills + 1), relays[k % len(relays)], signal.SIGKILL) for k in range(kills)]
    for when, share, relay, sig in plan:
        await run.wait_until(lambda when=when, share=share: when(share), lambda _: None, lambda: "")
        which = f"relay {relay.index}" if len(relays) > 1 else "the relay"
        say(f"chaos: stopping {which} ({signal.Signals(sig).name}) and starting it again")
        await relay.stop(sig)
        run.relay_kills += sig == signal.SIGKILL
        await relay.start()
        run.restarts += 1
    run.chaos_pending = False
    run.wake()


async def cmd_simulate(args: argparse.Namespace) -> None:
    if args.nodes < 2 or args.messages < 0:
        raise CliError("simulate needs at least 2 nodes")
    report = await coordinate(args)
    print_report(report, args.json)
    bad = report["lost"] + report["duplicates"] + report["misdelivered"]
    if bad:
        raise CliError(f"{report['lost']} lost, {report['duplicates']} duplicated, "
                       f"{report['misdelivered']} misdelivered")


def print_report(rep: dict[str, Any], as_json: bool) -> None:
    lat = rep["latency_ms"]
    parts = rep["latency_parts"]
    rows = [
        ("nodes", f"{rep['nodes']} ({rep['devices']} devices, {rep['procs']} processes)"),
        ("sent", rep["sent"]),
        ("deliveries expected", rep["expected"]),
        ("delivered", rep["delivered"]),
        ("lost", rep["lost"]),
        ("duplicates", rep["duplicates"]),
        ("misdelivered", rep["misdelivered"]),
        ("messages/s", rep["messages_per_s"]),
        ("first contacts", f"{rep['first_contacts']} messages were a node's first to that peer"),
        ("latency ms p50/p95/p99", f"{lat['p50']} / {lat['p95']} / {lat['p99']}"),
        ("relays", f"{len(rep['relays'])} on the {rep['store']} store"),
        ("chaos", f"{rep['chaos']} (connections cut {rep['connections_cut']}, relay restarts"
                  f" {rep['relay_restarts']}, of them kills {rep['relay_kills']})"),
        ("group messages", f"{rep['group_messages']}"),
        ("latency ms, mean", f"{parts['mean_ms']} = to the relay: seal {parts['seal_ms']}, sender offline"
                             f" {parts['sender_offline_ms']}, waiting {parts['waiting_to_relay_ms']}; then: recipient"
                             f" offline {parts['recipient_offline_ms']}, open {parts['open_ms']}, waiting"
                             f" {parts['waiting_from_relay_ms']}"),
        ("  never offline p50/p95", f"{parts['never_offline_p50_ms']} / {parts['never_offline_p95_ms']}"
                                    f" ({parts['deliveries_never_offline']} deliveries)"),
        ("devices first online ms", f"p50 {parts['first_online_p50_ms']}, last {parts['first_online_max_ms']}"
                                    " after the start"),
        ("CPU ms per message", f"nodes {rep['node_cpu_ms_per_message']}"
                               + (f", relays {rep['relay_cpu_ms_per_message']}" if "relay_cpu_ms_per_message" in rep
                                  else "")),
    ]
    for k, v in rows:
        print(f"{k:24} {v}")
    if as_json:
        print(json.dumps(rep))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        cfg = json.loads(sys.stdin.readline())
        try:
            trio.run(worker_main, cfg)
        except Exception as exc:  # reported to the coordinator as one line, not a traceback
            from cli.main import describe

            emit({"error": describe(exc)})
            raise SystemExit(1) from None
        return
    raise SystemExit("use `veil simulate`")


if __name__ == "__main__":
    main()
