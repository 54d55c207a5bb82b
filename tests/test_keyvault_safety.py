"""Safety numbers."""

from __future__ import annotations

import pytest

from keyvault import BadKey, format_safety_number, safety_number

KA = bytes(range(32))
KB = bytes(range(32, 64))


def test_symmetric_and_60_digits() -> None:
    n = safety_number("alice", KA, "bob", KB)
    assert n == safety_number("bob", KB, "alice", KA)
    assert len(n) == 60 and n.isdigit()


def test_changes_when_a_key_or_name_changes() -> None:
    n = safety_number("alice", KA, "bob", KB)
    other = bytes([KB[0] ^ 1]) + KB[1:]
    assert safety_number("alice", KA, "bob", other) != n
    assert safety_number("alice", KA, "carol", KB) != n
    # Only one half changes: the other party's half is still there.
    half_a = safety_number("alice", KA, "alice", KA)[:30]
    assert half_a in n and half_a in safety_number("alice", KA, "bob", other)


def test_bad_key_length() -> None:
    with pytest.raises(BadKey):
        safety_number("alice", KA[:31], "bob", KB)


def test_format() -> None:
    n = safety_number("alice", KA, "bob", KB)
    text = format_safety_number(n)
    lines = text.split("\n")
    assert len(lines) == 3
    groups = text.split()
    assert len(groups) == 12 and all(len(g) == 5 for g in groups)
    assert "".join(groups) == n
    for bad in ("1" * 59, "1" * 61, "a" * 60, "\u0661" * 60):
        with pytest.raises(ValueError):
            format_safety_number(bad)
