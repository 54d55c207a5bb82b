"""`veil simulate`: many real nodes against one relay, checked message by message.

The coordinator (this process) starts a relay process with a throwaway database (unless
``--relay`` is given), then ``--procs`` worker processes. Each worker registers its share
of the N nodes (real RSA/Ed25519/X25519 keys, real encrypted stores; passwords are
hashed with the weak test KDF profile, and the run says so), gives every fifth node a
second device, then runs every device as a ``LiveSession``: online most of the time,
sometimes offline (its messages queue and its mail waits at the relay). Each node sends
M messages to random peers. Workers report every send and every decrypted message on
stdout as JSON lines; the coordinator checks that each message reached every device it
was meant for (all the recipient's devices and the sender's other devices) exactly once,
and no other device.

``--chaos`` also cuts node connections just after a send is handed over, and kills and
restarts the relay process (SIGKILL or SIGTERM) during the run.

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
RELAY_START_TIMEOUT = 30.0


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
    relay = cfg["relay"]
    devices: dict[str, Node] = {}  # label "name/i" -> node
    for name in cfg["names"]:
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
    sessions = {label: LiveSession(node, backoff_max=1.0) for label, node in devices.items()}

    for label, session in sessions.items():
        def on_message(r: Received, label: str = label) -> None:
            try:
                body = json.loads(r.message.body)
            except ValueError:
                body = {}
            emit({"recv": body.get("k"), "device": label, "t": time.time_ns(), "from": r.message.sender})

        session.on.message.append(on_message)

    async def run_device(label: str, session: LiveSession) -> None:
        # Some devices spend part of the run offline: their mail waits at the relay and
        # what they send waits in their outbox.
        offline = rng.random() < OFFLINE_SHARE
        while True:
            if offline:
                await trio.sleep(rng.uniform(0.2, 1.5))
            with trio.move_on_after(rng.uniform(1.0, 4.0) if offline else math.inf):
                await session.run()

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
            sessions[label].send(peer, body)
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
    for node in devices.values():
        node.close()
    emit({"done": 1})


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
    changed: trio.Event = field(default_factory=trio.Event)
    expected_total: int = 0
    delivered: int = 0
    done_workers: int = 0
    errors: list[str] = field(default_factory=list)  # a worker's one-line failure

    def expected(self, key: str) -> set[str]:
        rec = self.sent[key]
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

    def on_event(self, ev: dict[str, Any]) -> None:
        self.changed.set()
        self.changed = trio.Event()
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
            self.last_recv = max(self.last_recv, ev["t"])
            rec = self.sent.get(key)
            if rec is not None:
                self.latencies.append((ev["t"] - rec["t"]) / 1e6)
                if counts[dev] == 1 and dev in self.expected(key):
                    self.delivered += 1
        elif "cut" in ev:
            self.cuts += 1
        elif "done" in ev:
            self.done_workers += 1
        elif "error" in ev:
            self.errors.append(str(ev["error"])[:300])

    def complete(self) -> bool:
        return len(self.sent) == self.n * self.m and self.delivered >= self.expected_total

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
            "chaos": chaos,
            "connections_cut": self.cuts,
            "relay_restarts": self.restarts,
            "procs": procs,
            "kdf_profile": "test",
            "missing": missing[:10],
        }


class RelayProcess:
    """A relay subprocess that can be killed and started again on the same port."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = 0
        self.proc: trio.Process | None = None
        self.url = ""

    async def start(self) -> str:
        # Its own throwaway relay registers every simulated node at once.
        cmd = [sys.executable, "-m", "cli.main", "relay", "serve", "--port", str(self.port),
               "--data-dir", str(self.data_dir), "--registrations-per-hour", "1e9"]
        log_path = self.data_dir.parent / "relay.log"
        with open(log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=log)
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

    say("node passwords use the weak test KDF profile (Argon2id t=1, 8 MiB) to keep the run short")
    tag = secrets.token_hex(2)
    names = [f"sim{tag}n{i:05d}" for i in range(args.nodes)]
    procs = max(1, min(args.procs, args.nodes))
    run = Run(args.nodes, args.messages)
    with tempfile.TemporaryDirectory(prefix="veil-sim-") as tmp:
        relay: RelayProcess | None = None
        url = args.relay
        if url is None:
            relay = RelayProcess(Path(tmp) / "relay")
            url = await relay.start()
            say(f"relay on {url} (throwaway database)")
        else:
            await check_relay(url)
            if args.chaos:
                say("--relay given: chaos cuts connections but cannot restart that relay")
        workers: list[trio.Process] = []
        try:
            async with trio.open_nursery() as nursery:
                for w in range(procs):
                    cfg = {"names": names[w::procs], "everyone": names, "messages": args.messages,
                           "relay": url, "dir": str(Path(tmp) / f"w{w}"), "seed": args.seed * 1000 + w,
                           "chaos": args.chaos}
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
                for p in workers:
                    assert p.stdin is not None
                    await p.stdin.send_all(b'{"go": true}\n')
                if args.chaos and relay is not None:
                    nursery.start_soon(restart_relay, relay, run, args, say)
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
        finally:
            for p in workers:
                if p.returncode is None:
                    p.kill()
            if relay is not None:
                await relay.stop()
    return run.report(args.chaos, procs)


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


async def restart_relay(relay: RelayProcess, run: Run, args: argparse.Namespace, say: Any) -> None:
    """Kill the relay (SIGKILL, then SIGTERM) once a quarter and again once 60% of the
    messages have been handed to nodes, and start it again on the same port."""
    total = args.nodes * args.messages
    for i, share in enumerate((0.25, 0.6)):
        await run.wait_until(lambda share=share: len(run.sent) >= share * total, lambda _: None, lambda: "")
        sig = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
        say(f"chaos: stopping the relay ({signal.Signals(sig).name}) and starting it again")
        await relay.stop(sig)
        await relay.start()
        run.restarts += 1


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
    rows = [
        ("nodes", f"{rep['nodes']} ({rep['devices']} devices, {rep['procs']} processes)"),
        ("sent", rep["sent"]),
        ("deliveries expected", rep["expected"]),
        ("delivered", rep["delivered"]),
        ("lost", rep["lost"]),
        ("duplicates", rep["duplicates"]),
        ("misdelivered", rep["misdelivered"]),
        ("messages/s", rep["messages_per_s"]),
        ("latency ms p50/p95/p99", f"{lat['p50']} / {lat['p95']} / {lat['p99']}"),
        ("chaos", f"{rep['chaos']} (connections cut {rep['connections_cut']}, relay restarts {rep['relay_restarts']})"),
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
