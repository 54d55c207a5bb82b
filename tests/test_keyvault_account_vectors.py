"""Known-answer tests for what account security puts on the wire, against
tests/vectors/account_vectors.json: the signed challenge for every purpose, TOTP codes
and the otpauth:// address, the encrypted device name, and a password change's or a
recovery's new credentials.

Produced by keyvault (``python -m tests.test_keyvault_account_vectors`` rewrites the
file; run it only for a deliberate format change); each test also recomputes the answer
independently: HMAC-SHA-1 truncation by hand (RFC 4226 section 5.3), HKDF with hmac,
AES-GCM from the primitive, Ed25519 verification with cryptography's public key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyvault import labels, totp
from keyvault.auth import auth_public_key, challenge_message, sign_challenge
from keyvault.kdf import TEST_KDF, password_keys
from keyvault.keys import (
    AccountKeys,
    open_device_label,
    parse_recovery_code,
    recovery_keys,
    seal_device_label,
    wrap_bundle,
)

VECTORS = Path(__file__).parent / "vectors" / "account_vectors.json"
STORED = Path(__file__).parent / "vectors" / "keyvault_vectors.json"  # its account's keys
PURPOSES = ["login", "bundle", "recovery", "passwd", "mfa", "revoke"]
RELAY_ID = bytes(range(16))
CHALLENGE = bytes(range(32, 64))
AUTH_SEED = bytes(range(100, 132))
TOTP_SECRET = b"12345678901234567890"  # RFC 6238 appendix B's SHA-1 secret
TOTP_TIMES = [59, 1111111109, 1111111111, 1234567890, 2000000000, 20000000000]
DEVICE_ID = bytes([0xA1]) * 16
NONCE = bytes(range(12))
NEW_PASSWORD = "a much longer new passphrase"
NEW_SALT = bytes(range(16, 32))
RECOVERY_CODE = "0123-4567-89AB-CDEF-GHJK-MNPQ-R0"


def _account() -> AccountKeys:
    keys = json.loads(STORED.read_text(encoding="utf-8"))["account"]["keys"]
    return AccountKeys.from_bytes(bytes.fromhex(keys))


def generate() -> dict[str, Any]:
    account = _account()
    pk = password_keys(NEW_PASSWORD, NEW_SALT, TEST_KDF)
    rk = recovery_keys(parse_recovery_code(RECOVERY_CODE))
    return {
        "challenges": {
            "seed": AUTH_SEED.hex(),
            "public": auth_public_key(AUTH_SEED).hex(),
            "relay_id": RELAY_ID.hex(),
            "username": "alice",
            "challenge": CHALLENGE.hex(),
            "cases": [
                {
                    "purpose": p,
                    "message": challenge_message(p, RELAY_ID, "alice", CHALLENGE).hex(),
                    "signature": sign_challenge(AUTH_SEED, p, RELAY_ID, "alice", CHALLENGE).hex(),
                }
                for p in PURPOSES
            ],
        },
        "totp": {
            "secret": TOTP_SECRET.hex(),
            "cases": [{"time": t, "step": totp.step_at(t), "code": totp.code_at(TOTP_SECRET, totp.step_at(t))}
                      for t in TOTP_TIMES],
            "uri": totp.otpauth_uri(TOTP_SECRET, "alice"),
        },
        "device_label": {
            "note": "the account is keyvault_vectors.json's",
            "username": "alice",
            "device_id": DEVICE_ID.hex(),
            "name": "alice's phone \u00e9",
            "nonce": NONCE.hex(),
            "key": _hkdf(account.identity_seed, labels.DEVICE_LABEL).hex(),
            "blob": seal_device_label(account, "alice", DEVICE_ID, "alice's phone \u00e9", nonce=NONCE).hex(),
        },
        "new_password": {
            "note": "change_password and recover: salt, KDF (the test profile), auth_pub, bundle",
            "password": NEW_PASSWORD,
            "salt": NEW_SALT.hex(),
            "kdf": TEST_KDF.to_dict(),
            "auth_pub": auth_public_key(pk.auth_seed).hex(),
            "wrap_key": pk.wrap_key.hex(),
            "nonce": NONCE.hex(),
            "bundle": wrap_bundle(account, pk.wrap_key, "alice", nonce=NONCE).hex(),
        },
        "recovery": {
            "code": RECOVERY_CODE,
            "raw": parse_recovery_code(RECOVERY_CODE).hex(),
            "auth_pub": auth_public_key(rk.auth_seed).hex(),
            "wrap_key": rk.wrap_key.hex(),
        },
    }


def _hkdf(ikm: bytes, info: bytes) -> bytes:
    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def _lp(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


@pytest.fixture(scope="module")
def v() -> dict[str, Any]:
    return json.loads(VECTORS.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def test_the_vectors_are_what_keyvault_makes(v: dict[str, Any]) -> None:
    assert generate() == v


def test_challenge_signatures_for_every_purpose(v: dict[str, Any]) -> None:
    c = v["challenges"]
    public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(c["public"]))
    assert Ed25519PrivateKey.from_private_bytes(bytes.fromhex(c["seed"])).public_key().public_bytes_raw() == \
        bytes.fromhex(c["public"])
    assert [case["purpose"] for case in c["cases"]] == PURPOSES
    messages = set()
    for case in c["cases"]:
        expected = (b"veil/v1/auth-challenge" + _lp(case["purpose"].encode()) + _lp(bytes.fromhex(c["relay_id"]))
                    + _lp(c["username"].encode()) + _lp(bytes.fromhex(c["challenge"])))
        assert bytes.fromhex(case["message"]) == expected
        public.verify(bytes.fromhex(case["signature"]), expected)  # raises if it does not verify
        messages.add(expected)
    assert len(messages) == len(PURPOSES)  # no two purposes sign the same bytes


def _hotp(secret: bytes, counter: int) -> str:
    """RFC 4226 section 5.3, by hand."""
    mac = hmac.new(secret, counter.to_bytes(8, "big"), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    value = int.from_bytes(mac[offset:offset + 4], "big") & 0x7FFFFFFF
    return f"{value % 10**6:06d}"


def test_totp_codes_and_address(v: dict[str, Any]) -> None:
    t = v["totp"]
    secret = bytes.fromhex(t["secret"])
    for case in t["cases"]:
        assert case["step"] == case["time"] // 30
        assert case["code"] == _hotp(secret, case["step"])
    # RFC 6238 appendix B (its 8-digit SHA-1 codes, of which six digits are ours).
    rfc = {59: "94287082", 1111111109: "07081804", 1111111111: "14050471", 1234567890: "89005924",
           2000000000: "69279037", 20000000000: "65353130"}
    for case in t["cases"]:
        assert rfc[case["time"]].endswith(case["code"])
    parts = urlsplit(t["uri"])
    query = parse_qs(parts.query)
    assert (parts.scheme, parts.netloc, parts.path) == ("otpauth", "totp", "/Veil:alice")
    assert base64.b32decode(query["secret"][0] + "=" * (-len(query["secret"][0]) % 8)) == secret
    assert (query["issuer"], query["algorithm"], query["digits"], query["period"]) == (["Veil"], ["SHA1"], ["6"], ["30"])


def test_device_label(v: dict[str, Any]) -> None:
    d = v["device_label"]
    account = _account()
    key = _hkdf(account.identity_seed, b"veil/v1/device-label")
    assert key.hex() == d["key"]
    blob = bytes.fromhex(d["blob"])
    assert blob[0] == 1 and blob[1:13] == bytes.fromhex(d["nonce"]) and len(blob) == 1 + 12 + 64 + 16
    aad = b"veil/v1/device-label" + _lp(d["username"].encode()) + _lp(bytes.fromhex(d["device_id"]))
    plain = AESGCM(key).decrypt(blob[1:13], blob[13:], aad)
    assert plain == d["name"].encode().ljust(64, b"\0")
    assert open_device_label(account, "alice", DEVICE_ID, blob) == d["name"]
    # Bound to its device and account: another device id or name does not open it.
    assert open_device_label(account, "alice", bytes(16), blob) is None
    assert open_device_label(account, "bob", DEVICE_ID, blob) is None
    with pytest.raises(ValueError):
        seal_device_label(account, "alice", DEVICE_ID, "x" * 65)
    with pytest.raises(ValueError):
        seal_device_label(account, "alice", DEVICE_ID, "")


def test_new_password_credentials(v: dict[str, Any]) -> None:
    n = v["new_password"]
    from argon2.low_level import Type, hash_secret_raw

    master = hash_secret_raw(n["password"].encode(), bytes.fromhex(n["salt"]), time_cost=n["kdf"]["t"],
                             memory_cost=n["kdf"]["m"], parallelism=n["kdf"]["p"], hash_len=32, type=Type.ID)
    wrap_key = _hkdf(master, b"veil/v1/bundle-wrap")
    assert wrap_key.hex() == n["wrap_key"]
    seed = _hkdf(master, b"veil/v1/auth-seed")
    assert Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw().hex() == n["auth_pub"]
    bundle = bytes.fromhex(n["bundle"])
    plain = AESGCM(wrap_key).decrypt(bundle[1:13], bundle[13:], b"veil/v1/bundle" + b"alice")
    assert plain == _account().to_bytes()


def test_recovery_credentials(v: dict[str, Any]) -> None:
    r = v["recovery"]
    raw = bytes.fromhex(r["raw"])
    assert _hkdf(raw, b"veil/v1/recovery-wrap").hex() == r["wrap_key"]
    seed = _hkdf(raw, b"veil/v1/recovery-auth")
    assert Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw().hex() == r["auth_pub"]


if __name__ == "__main__":
    VECTORS.write_text(json.dumps(generate(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {VECTORS}")
