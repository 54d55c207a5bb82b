"""TOTP (RFC 6238): the RFC's own vectors, an independent HMAC computation, the window
of one step either side, and a code that is never accepted twice."""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from urllib.parse import parse_qs, urlparse

import pytest

from keyvault.errors import BadKey
from keyvault.totp import STEP, accept, code_at, new_secret, otpauth_uri, step_at

RFC_SECRET = b"12345678901234567890"  # RFC 6238, appendix B (SHA-1)


@pytest.mark.parametrize(
    ("t", "eight_digits"),
    [(59, "94287082"), (1111111109, "07081804"), (1111111111, "14050471"),
     (1234567890, "89005924"), (2000000000, "69279037"), (20000000000, "65353130")],
)
def test_rfc_6238_vectors(t: int, eight_digits: str) -> None:
    assert code_at(RFC_SECRET, step_at(t)) == eight_digits[-6:]  # six digits: the same value mod 10^6


def _independent(secret: bytes, step: int) -> str:
    mac = hmac.new(secret, struct.pack(">Q", step), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    value = int.from_bytes(mac[offset : offset + 4], "big") & 0x7FFFFFFF
    return f"{value % 10**6:06d}"


def test_codes_match_an_independent_computation() -> None:
    secret = new_secret()
    for step in (0, 1, 56_000_000, 2**33):
        assert code_at(secret, step) == _independent(secret, step)


def test_one_step_either_side_and_never_twice() -> None:
    secret = new_secret()
    now = 1_800_000_015.0
    step = step_at(now)
    for offset in (-1, 0, 1):
        assert accept(secret, code_at(secret, step + offset), now, None) == step + offset
    for offset in (-2, 2):
        assert accept(secret, code_at(secret, step + offset), now, None) is None
    # Once a step is accepted, its code and every older one are refused.
    assert accept(secret, code_at(secret, step), now, step) is None
    assert accept(secret, code_at(secret, step - 1), now, step) is None
    assert accept(secret, code_at(secret, step + 1), now, step) == step + 1


@pytest.mark.parametrize("code", ["", "12345", "1234567", "12a456", "١٢٣٤٥٦", " 123456"])
def test_malformed_codes_are_refused(code: str) -> None:
    assert accept(new_secret(), code, 1_800_000_000.0, None) is None


def test_a_code_for_another_secret_is_refused() -> None:
    now = 1_800_000_000.0
    a, b = new_secret(), new_secret()  # a chance match is 3 in 10^6 per try
    misses = sum(accept(a, code_at(b, step_at(now) + k), now + k * STEP, None) is None for k in range(50))
    assert misses >= 49


def test_short_secrets_are_refused() -> None:
    with pytest.raises(BadKey):
        code_at(b"short", 1)


def test_the_uri_carries_what_an_authenticator_app_needs() -> None:
    secret = new_secret()
    uri = urlparse(otpauth_uri(secret, "alice"))
    assert (uri.scheme, uri.netloc, uri.path) == ("otpauth", "totp", "/Veil:alice")
    q = {k: v[0] for k, v in parse_qs(uri.query).items()}
    assert base64.b32decode(q["secret"] + "=" * (-len(q["secret"]) % 8)) == secret
    assert (q["issuer"], q["algorithm"], q["digits"], q["period"]) == ("Veil", "SHA1", "6", "30")
