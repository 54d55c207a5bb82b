"""`veil simulate` run small, as a user runs it: every message accounted for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def simulate(*args: str) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
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
def test_simulation_under_chaos_loses_nothing() -> None:
    report = simulate("--nodes", "20", "--messages", "10", "--procs", "2", "--chaos", "--seed", "7")
    check(report, 20, 10)
    assert report["chaos"] is True
    assert int(report["relay_restarts"]) >= 1  # type: ignore[call-overload]
    assert int(report["connections_cut"]) >= 1  # type: ignore[call-overload]
