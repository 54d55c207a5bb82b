"""`veil relay serve --store postgresql://... --workers N`: N relay processes, one port.

The parent makes what the processes share before any starts (the relay key, the TLS key
and certificate: two processes creating them at once would each make their own), holds
the port with a bound socket that never listens (so that port 0 picks one port for all),
and starts N `veil relay serve` processes that listen on it with SO_REUSEPORT: the kernel
spreads new connections among them. It prints `relay listening on ...` once all of them
listen, starts again a process that dies (its devices reconnect to the others meanwhile,
and lose nothing: every unacknowledged envelope is in PostgreSQL), passes SIGHUP on, and
on SIGINT or SIGTERM stops them all.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

import trio

from cli.errors import CliError
from cli.invites import write_relay_addresses
from relay.server import RelayConfig, reuse_port_socket

RESTART_DELAY = 1.0  # seconds before a process that died is started again
START_TIMEOUT = 60.0


def _child_argv(port: int) -> list[str]:
    """This command's own arguments, without --workers, on ``port``."""
    argv = sys.argv[1:]
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--workers", "--port"):
            skip = True
            continue
        if arg.startswith(("--workers=", "--port=")):
            continue
        out.append(arg)
    return [sys.executable, "-m", "cli.main", *out, "--port", str(port)]


async def run_workers(args: argparse.Namespace, config: RelayConfig) -> None:
    from cli.relay_serve import ENV_REUSE_PORT
    from relay.keyfile import RelayKeyError, load_root_key
    from relay.tls import RelayTls, TlsError

    try:
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        load_root_key(config.data_dir)
        if config.tls:
            RelayTls(config.data_dir, config.tls_cert, config.tls_key)
        held = reuse_port_socket(config.host, config.port)
    except (RelayKeyError, TlsError) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
    port = held.getsockname()[1]
    argv = _child_argv(port)
    env = {**os.environ, ENV_REUSE_PORT: "1"}
    n = int(args.workers)
    procs: dict[int, trio.Process] = {}
    urls: list[str] = []
    ready = trio.Event()
    stopping = False

    async def keep(i: int) -> None:
        first = True
        while not stopping:
            proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, env=env)
            procs[i] = proc
            assert proc.stdout is not None
            buf = b""
            async with proc.stdout:
                while True:
                    data = await proc.stdout.receive_some()
                    if not data:
                        break
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        text = line.decode(errors="replace")
                        if text.startswith("relay listening on "):
                            if first:
                                urls.append(text.removeprefix("relay listening on "))
                                if len(urls) == n:
                                    ready.set()
                            else:
                                print(f"relay process {i + 1} of {n} listening again", flush=True)
                            first = False
            code = await proc.wait()
            if stopping:
                return
            if first:  # never listened: a setting it refuses, not a crash; do not loop
                raise CliError(f"relay process {i + 1} of {n} failed to start (exit {code})")
            print(f"relay process {i + 1} of {n} ended (exit {code}); starting it again",
                  file=sys.stderr, flush=True)
            await trio.sleep(RESTART_DELAY)

    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(keep, i)

                async def announce() -> None:
                    with trio.fail_after(START_TIMEOUT):
                        await ready.wait()
                    write_relay_addresses(config.data_dir, [urls[0]])
                    print(f"relay listening on {urls[0]}", flush=True)
                    print(f"relay processes {n}", file=sys.stderr, flush=True)

                nursery.start_soon(announce)
                async for signum in signals:
                    for proc in procs.values():
                        if proc.returncode is None:
                            proc.send_signal(signum)
                    if signum != signal.SIGHUP:
                        stopping = True
                        print("relay stopping", file=sys.stderr, flush=True)
                        break
                with trio.move_on_after(30):
                    for proc in procs.values():
                        await proc.wait()
                nursery.cancel_scope.cancel()
    except trio.TooSlowError:
        raise CliError(f"the relay processes did not all start within {START_TIMEOUT:.0f} s") from None
    finally:
        held.close()
        for proc in procs.values():
            if proc.returncode is None:
                proc.kill()
