"""`veil simulate` run small, as a user runs it: every message accounted for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pgcluster import PgCluster

ROOT = Path(__file__).resolve().parent.parent


def simulate(*args: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "VEIL_RELAY_STORE"} | {"PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "cli.main", "simulate", "--json", "--quiet", "--timeout", "120", *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert isinstance(report, dict)
    assert res.returncode == 0, (res.stderr, report.get("missing"))
    return report


def check(report: dict[str, object], nodes: int, messages: int) -> None:
    assert report["nodes"] == nodes
    assert report["sent"] == nodes * messages
    # Every fifth node has a second device, so a message goes to 1-2 recipient devices
    # and 0-1 of the sender's own: more deliveries than messages.
    assert int(report["expected"]) > nodes * messages  # type: ignore[call-overload]
    assert report["delivered"] == report["expected"]
    assert report["lost"] == 0
    assert report["duplicates"] == 0
    assert report["misdelivered"] == 0
    assert set(report["latency_ms"]) == {"p50", "p95", "p99"}  # type: ignore[arg-type]


@pytest.mark.slow
def test_simulation_delivers_everything_exactly_once() -> None:
    check(simulate("--nodes", "20", "--messages", "10", "--procs", "2"), 20, 10)


@pytest.mark.slow
def test_simulation_with_groups_under_chaos_loses_nothing() -> None:
    """Groups among the nodes (spread over both processes), made as sending starts: every
    group message reaches every device of every member once, under chaos."""
    report = simulate("--nodes", "16", "--messages", "10", "--procs", "2", "--groups", "4", "--group-size", "5",
                      "--chaos", "--seed", "3")
    check(report, 16, 10)
    assert int(report["group_messages"]) >= 1  # type: ignore[call-overload]  (nodes write to groups they know)


@pytest.mark.slow
def test_simulation_under_chaos_loses_nothing() -> None:
    report = simulate("--nodes", "20", "--messages", "10", "--procs", "2", "--chaos", "--seed", "7")
    check(report, 20, 10)
    assert report["chaos"] is True
    assert int(report["relay_restarts"]) >= 1  # type: ignore[call-overload]
    assert int(report["connections_cut"]) >= 1  # type: ignore[call-overload]


@pytest.mark.slow
def test_simulation_over_two_relay_processes_survives_their_kills(pg_cluster: PgCluster) -> None:
    # Node i stays at relay i % 2: most messages cross from one process to the other
    # (LISTEN/NOTIFY), and each process is SIGKILLed at least once while the other serves.
    dsn = pg_cluster.create_database("veil_simulate_two_relays")
    report = simulate("--nodes", "8", "--messages", "5", "--relays", "2", "--store", dsn,
                      "--chaos", "--seed", "3")
    check(report, 8, 5)
    assert report["store"] == "postgresql"
    relays = report["relays"]
    assert isinstance(relays, list) and len(set(relays)) == 2
    assert int(report["relay_kills"]) >= 2  # type: ignore[call-overload]
    parts = report["latency_parts"]
    assert isinstance(parts, dict) and parts["mean_ms"] > 0
    assert float(report["node_cpu_ms_per_message"]) > 0  # type: ignore[arg-type]


def test_several_relays_need_a_shared_store() -> None:
    env = {k: v for k, v in os.environ.items() if k != "VEIL_RELAY_STORE"} | {"PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "cli.main", "simulate", "--relays", "2", "--quiet"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--relays 2 needs --store" in lines[0], res.stderr
