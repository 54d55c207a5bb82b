"""`veil relay serve`: run a relay in the foreground until Ctrl-C or SIGTERM.

Prints `relay listening on wss://HOST:PORT#PIN` on standard output once it accepts
connections (`wss://HOST:PORT` with --tls-cert, `ws://HOST:PORT` with --insecure-no-tls or
--onion, and then `relay onion address ...`); everything else goes to standard error.
SIGHUP reads the TLS certificate and key again.

With --onion --private the onion service admits only the clients in DATA_DIR/onion_clients
(`veil relay invite --new-client`); on SIGHUP the relay re-reads them and, if they changed,
re-publishes and prints `relay onion clients N` on standard output.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from cli.errors import CliError
from cli.invites import write_relay_addresses
from node.link import collapse_groups

ENV_STORE = "VEIL_RELAY_STORE"  # --store's default (keeps a password out of the command line)
ENV_REUSE_PORT = "VEIL_RELAY_REUSE_PORT"  # set by --workers for the processes it starts
EXPIRY_CHECK = 3600.0  # seconds between checks for expired onion client keys

if TYPE_CHECKING:
    from relay.server import RelayInfo


async def cmd_relay_serve(args: argparse.Namespace) -> None:
    from relay.onion import OnionError
    from relay.onion_clients import ClientError
    from relay.server import RelayStartError

    try:
        with collapse_groups():
            await _relay_serve(args)
    except (OnionError, RelayStartError, ClientError) as exc:
        raise CliError(str(exc)) from None


async def _relay_serve(args: argparse.Namespace) -> None:
    from relay import onion, onion_clients
    from relay.server import RelayConfig, serve

    control = args.tor_control or os.environ.get("TOR_CONTROL") or onion.DEFAULT_CONTROL
    if not args.onion and (args.tor_control or args.launch_tor or args.torrc):
        raise CliError("--tor-control, --launch-tor and --torrc go with --onion")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CliError("--tls-cert and --tls-key go together")
    if args.tls_cert and (args.insecure_no_tls or args.onion):
        raise CliError("--tls-cert goes with a relay that speaks TLS: not with --insecure-no-tls or --onion")
    if args.private and not args.onion:
        raise CliError("--private goes with --onion")
    store = args.store or os.environ.get(ENV_STORE) or None
    if store is not None and not store.startswith(("postgresql://", "postgres://")):
        raise CliError("--store takes a PostgreSQL connection string (postgresql://...)")
    if store is not None and args.relaxed_durability:
        raise CliError("--relaxed-durability is for the file store (PostgreSQL: its synchronous_commit setting)")
    if args.workers is not None and (store is None or args.onion):
        raise CliError("--workers needs --store (processes share the database) and no --onion")
    if args.workers is not None and os.environ.get(ENV_REUSE_PORT):
        raise CliError("--workers: this is already one of the processes it started")
    if store is not None and args.onion:
        # An onion relay's client list is reloaded by signalling the one process that
        # publishes it: one process per data directory, the file store's exclusive lock.
        raise CliError("--onion goes with the file store (one process): not with --store")
    if args.onion:
        onion_clients.require_private(Path(args.data_dir), args.private)
        if args.host not in (None, "127.0.0.1"):
            raise CliError("an onion relay listens on 127.0.0.1 only: drop --host")
        if args.torrc and not args.launch_tor:
            raise CliError("--torrc configures the tor that --launch-tor starts")
        onion.check_available(launch=args.launch_tor)  # before the relay starts: one clear line
        if not args.launch_tor:
            onion.control_target(control)
    logging.basicConfig(level=logging.DEBUG if os.environ.get("VEIL_DEBUG") else logging.INFO, format="%(asctime)s relay %(levelname)s %(message)s", stream=sys.stderr)
    # An onion relay is reached through tor, which authenticates it by its address and
    # encrypts: it listens on 127.0.0.1 only, in plain ws://.
    config = RelayConfig(
        data_dir=Path(args.data_dir), host=args.host or "127.0.0.1", port=args.port,
        tls=not (args.insecure_no_tls or args.onion),
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        durable=not args.relaxed_durability,
        store=store, reuse_port=bool(os.environ.get(ENV_REUSE_PORT)),
    )
    if args.workers is not None:
        from cli.relay_workers import run_workers

        await run_workers(args, config)
        return
    if args.max_connections is not None:
        config.limits.max_connections = args.max_connections
    rations = config.limits.rations
    if args.registrations_per_hour is not None:
        rations.registrations_per_hour = args.registrations_per_hour
        rations.registration_burst = max(1.0, args.registrations_per_hour / 10)
    if args.sender_rate is not None:
        rations.sender_rate = args.sender_rate
        rations.sender_burst = max(rations.sender_burst, 300 * args.sender_rate)

    started: list[RelayInfo] = []  # what a SIGHUP reloads: the relay, and its tor if any
    tors: list[onion.Tor] = []

    async def run_relay() -> None:
        async with trio.open_nursery() as inner:
            info = await inner.start(serve, config)
            started.append(info)
            if not config.reuse_port:  # one of --workers' processes: the parent writes it
                write_relay_addresses(config.data_dir, [info.url])
            print(f"relay listening on {info.url}", flush=True)

    async def run_onion_relay() -> None:
        async with onion.open_tor(
            control=None if args.launch_tor else control, launch=args.launch_tor,
            data_dir=config.data_dir, torrc=Path(args.torrc) if args.torrc else None,
        ) as tor:
            tors.append(tor)
            async with trio.open_nursery() as inner:
                info = await inner.start(serve, config)
                started.append(info)
                print(f"relay listening on {info.url}", flush=True)
                if args.private:
                    onion_clients.ensure_dir(config.data_dir)
                service = await tor.publish(config.data_dir / onion.KEY_FILE, info.port,
                                            config.data_dir if args.private else None)
                write_relay_addresses(config.data_dir, [service.url])
                print(f"relay onion address {service.url}", flush=True)

    async def reload_onion(tor: onion.Tor, info: RelayInfo, periodic: bool = False) -> None:
        ended = info.connections.end_all if info.connections else lambda: 0
        if await onion.reload_onion_clients(tor, ended, periodic=periodic):
            print(f"relay onion clients {len(tor.clients or ())}", flush=True)

    async def expire_onion_clients() -> None:
        # A client key with an expiry stops working on its day: checked every hour, as a
        # SIGHUP would (the service is published again without it).
        while True:
            await trio.sleep(EXPIRY_CHECK)
            if tors and started:
                await reload_onion(tors[0], started[0], periodic=True)

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_onion_relay if args.onion else run_relay)
            if args.onion and args.private:
                nursery.start_soon(expire_onion_clients)
            async for signum in signals:
                if signum == signal.SIGHUP:  # reload what can be reloaded; keep serving
                    _reload(started[0] if started else None)
                    if tors and started:
                        nursery.start_soon(reload_onion, tors[0], started[0])
                    continue
                print("relay stopping", file=sys.stderr, flush=True)
                nursery.cancel_scope.cancel()
                break


def _reload(info: RelayInfo | None) -> None:
    """SIGHUP: the TLS certificate and key again (a renewed certificate, without a restart)."""
    from relay.tls import TlsError

    if info is None or info.tls_state is None:
        return
    try:
        info.tls_state.reload()
    except TlsError as exc:
        print(f"relay: TLS reload failed, keeping the old certificate: {exc}", file=sys.stderr, flush=True)
        return
    print("relay: TLS certificate reloaded", file=sys.stderr, flush=True)
