"""TOTP second factor (RFC 6238): 30 s steps, 6 digits, HMAC-SHA-1, as authenticator apps
expect. Pure: the caller passes the time and keeps the last accepted step.

Built on ``cryptography``'s TOTP, whose ``verify`` checks only the exact step; here a code
is accepted one step either side, and never for a step at or before the last one accepted
(so a code, once used, is refused for good, and so is any older one).
"""

from __future__ import annotations

import base64
import hmac
import secrets
from urllib.parse import quote, urlencode

from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP

from keyvault.errors import BadKey

STEP = 30
DIGITS = 6
SECRET_LEN = 20  # 160 bits, RFC 4226's recommendation for HMAC-SHA-1
WINDOW = 1  # steps accepted either side of now


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_LEN)


def _totp(secret: bytes) -> TOTP:
    if len(secret) < 16:
        raise BadKey("A TOTP secret is at least 16 bytes.")
    return TOTP(bytes(secret), DIGITS, SHA1(), STEP, enforce_key_length=False)


def step_at(now: float) -> int:
    """The RFC 6238 time step that ``now`` (Unix seconds) falls in."""
    return int(now) // STEP


def code_at(secret: bytes, step: int) -> str:
    """The code for one time step."""
    return _totp(secret).generate(step * STEP).decode("ascii")


def accept(secret: bytes, code: str, now: float, last_step: int | None) -> int | None:
    """The step a code is valid for (now, or one step either side) and later than
    ``last_step``; None if it is not. The caller stores the returned step as the new
    ``last_step`` in the same transaction that acts on the code."""
    if len(code) != DIGITS or not code.isascii() or not code.isdigit():
        return None
    t = _totp(secret)
    current = step_at(now)
    found: int | None = None
    for step in range(current - WINDOW, current + WINDOW + 1):
        # Every candidate is compared (in constant time), whichever matches.
        if hmac.compare_digest(t.generate(step * STEP), code.encode("ascii")):
            found = step
    if found is None or (last_step is not None and found <= last_step):
        return None
    return found


def otpauth_uri(secret: bytes, account: str, issuer: str = "Veil") -> str:
    """The ``otpauth://totp/...`` URI that authenticator apps read (from a QR code)."""
    label = quote(f"{issuer}:{account}", safe=":@")
    query = urlencode({
        "secret": base64.b32encode(secret).decode("ascii").rstrip("="),
        "issuer": issuer,
        "algorithm": "SHA1",
        "digits": DIGITS,
        "period": STEP,
    })
    return f"otpauth://totp/{label}?{query}"
