"""Known-answer tests for keyvault, against tests/vectors/keyvault_vectors.json.

The vectors pin the wire formats so a change that breaks old bundles or envelopes is caught.
They were produced by keyvault itself (``python -m tests.test_keyvault_vectors``, which
rewrites the file but keeps the stored account, so only deliberately changed formats change:
run it only for a format change), so each test here also recomputes the answer
independently where it can: HKDF with hmac/hashlib, Argon2id through argon2.low_level,
AES-GCM and RSA-OAEP by hand, the safety number with hashlib.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from argon2.low_level import Type, hash_secret_raw
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import keyvault
from keyvault import labels
from keyvault.safety import identity_fingerprint

VECTORS = Path(__file__).parent / "vectors" / "keyvault_vectors.json"
HKDF_IKM = bytes(range(32))
SALT = bytes(range(16))
PASSWORDS = ["correct horse battery staple", "cafe\u0301 \U0001f510"]
AUTH_SEED = bytes(range(100, 132))
RECOVERY = bytes(range(16))
SAFETY = [("alice", bytes(range(32))), ("bob", bytes(range(32, 64)))]
SENDER_DEVICE = bytes([0xA1]) * 16
LETTER = keyvault.Letter(
    to="bob",
    msg_id=bytes(range(16)),
    sent_at=1_700_000_000_000,
    body="hello \u00e9 \U0001f510",
)
EPHEMERAL = bytes(range(32, 64))
#: Stands in for a ratchet message (the ratchet has its own vectors): opaque to the envelope.
RATCHET_MESSAGE = bytes(range(85, 185))
RECIPIENT_DEVICE = bytes([0xB1]) * 16
AES_KEY = bytes(range(64, 96))
NONCE = bytes(range(12))
WRAP_KEY = bytes(range(200, 232))


def _label_name(label: bytes) -> str:
    return next(n for n in dir(labels) if getattr(labels, n) is label and n != "ALL_LABELS")


def _payload(account: keyvault.AccountKeys) -> keyvault.Payload:
    init = keyvault.PrekeyInit(account.public().dh, EPHEMERAL, spk_id=7, opk_id=42)
    return keyvault.Payload(init, RATCHET_MESSAGE)


def generate(account: keyvault.AccountKeys | None = None) -> dict[str, Any]:
    """Compute every vector with keyvault (see the module docstring).

    Pass the stored account to keep every vector that depends only on it unchanged.
    """
    if account is None:
        account = keyvault.AccountKeys.generate()
    payload = keyvault.encode_payload(_payload(account))
    mk = [keyvault.master_key(p, SALT, keyvault.TEST_KDF) for p in PASSWORDS]
    pk = keyvault.password_keys(PASSWORDS[0], SALT, keyvault.TEST_KDF)
    rk = keyvault.recovery_keys(RECOVERY)
    envelope = keyvault.seal(
        keyvault.Sealed("alice", SENDER_DEVICE, payload),
        account,
        account.public().enc,
        RECIPIENT_DEVICE,
        aes_key=AES_KEY,
        nonce=NONCE,
    )
    return {
        "hkdf": {
            "ikm": HKDF_IKM.hex(),
            "outputs": {
                _label_name(lb): keyvault.derive(HKDF_IKM, lb).hex() for lb in labels.ALL_LABELS
            },
        },
        "argon2id": {
            "params": keyvault.TEST_KDF.to_dict(),
            "salt": SALT.hex(),
            "cases": [
                {"password": p, "master_key": k.hex()} for p, k in zip(PASSWORDS, mk, strict=True)
            ],
            "wrap_key": pk.wrap_key.hex(),
            "auth_seed": pk.auth_seed.hex(),
            "store_key": keyvault.store_key(PASSWORDS[0], SALT, keyvault.TEST_KDF).hex(),
        },
        "auth": {
            "seed": AUTH_SEED.hex(),
            "public": keyvault.auth_public_key(AUTH_SEED).hex(),
            "purpose": "login",
            "relay_id": "72656c6179",
            "username": "alice",
            "challenge": bytes(32).hex(),
            "message": keyvault.challenge_message("login", b"relay", "alice", bytes(32)).hex(),
            "signature": keyvault.sign_challenge(
                AUTH_SEED, "login", b"relay", "alice", bytes(32)
            ).hex(),
        },
        "recovery": {
            "raw": RECOVERY.hex(),
            "code": keyvault.new_recovery_code(code=RECOVERY),
            "wrap_key": rk.wrap_key.hex(),
            "auth_seed": rk.auth_seed.hex(),
        },
        "safety": {
            "parties": [[n, k.hex()] for n, k in SAFETY],
            "number": keyvault.safety_number(
                SAFETY[0][0], SAFETY[0][1], SAFETY[1][0], SAFETY[1][1]
            ),
            # What an invite link's id is (docs/PROTOCOL.md, section 1.2), of the first key.
            "identity_fingerprint": identity_fingerprint(SAFETY[0][1]).hex(),
        },
        "account": {
            "keys": account.to_bytes().hex(),
            "public": {k: v.hex() for k, v in vars(account.public()).items()},
            "username": "alice",
            "wrap_key": WRAP_KEY.hex(),
            "nonce": NONCE.hex(),
            "bundle": keyvault.wrap_bundle(account, WRAP_KEY, "alice", nonce=NONCE).hex(),
            "device_id": RECIPIENT_DEVICE.hex(),
            "device_signature": keyvault.sign_device(account, "alice", RECIPIENT_DEVICE).hex(),
        },
        "letter": {
            "to": LETTER.to,
            "msg_id": LETTER.msg_id.hex(),
            "sent_at": LETTER.sent_at,
            "body": LETTER.body,
            "encoded": keyvault.encode_letter(LETTER).hex(),
        },
        "payload": {
            "note": "identity_dh is the account's; the ratchet message is a stand-in",
            "identity_dh": account.public().dh.hex(),
            "ephemeral": EPHEMERAL.hex(),
            "spk_id": 7,
            "opk_id": 42,
            "ratchet": RATCHET_MESSAGE.hex(),
            "encoded": payload.hex(),
        },
        "envelope": {
            "note": "version 2; sender and recipient are both the account above",
            "sealed": {
                "sender": "alice",
                "sender_device": SENDER_DEVICE.hex(),
                "payload": payload.hex(),
            },
            "recipient_device": RECIPIENT_DEVICE.hex(),
            "aes_key": AES_KEY.hex(),
            "nonce": NONCE.hex(),
            "blob": envelope.hex(),
            "aead_part": envelope[1 + 384 :].hex(),
        },
    }


@pytest.fixture(scope="module")
def v() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def account(v: dict[str, Any]) -> keyvault.AccountKeys:
    return keyvault.AccountKeys.from_bytes(bytes.fromhex(v["account"]["keys"]))


def _hkdf_sha256(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    # RFC 5869 by hand: salt None means HashLen zero bytes.
    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def test_hkdf(v: dict[str, Any]) -> None:
    ikm = bytes.fromhex(v["hkdf"]["ikm"])
    outputs = v["hkdf"]["outputs"]
    assert set(outputs) == {_label_name(lb) for lb in labels.ALL_LABELS}
    for name, expected in outputs.items():
        label = getattr(labels, name)
        assert keyvault.derive(ikm, label).hex() == expected
        assert _hkdf_sha256(ikm, label).hex() == expected
    assert keyvault.derive(ikm, b"x", 100) == _hkdf_sha256(ikm, b"x", 100)


def test_argon2id(v: dict[str, Any]) -> None:
    a = v["argon2id"]
    params = keyvault.KdfParams.from_dict(a["params"])
    assert params == keyvault.TEST_KDF
    salt = bytes.fromhex(a["salt"])
    for case in a["cases"]:
        pw = case["password"]
        assert keyvault.master_key(pw, salt, params).hex() == case["master_key"]
        direct = hash_secret_raw(
            unicodedata.normalize("NFC", pw).encode(), salt, 1, 8192, 1, 32, Type.ID
        )
        assert direct.hex() == case["master_key"]
    mk = bytes.fromhex(a["cases"][0]["master_key"])
    pk = keyvault.password_keys(a["cases"][0]["password"], salt, params)
    assert pk.wrap_key.hex() == a["wrap_key"] == _hkdf_sha256(mk, labels.BUNDLE_WRAP).hex()
    assert pk.auth_seed.hex() == a["auth_seed"] == _hkdf_sha256(mk, labels.AUTH_SEED).hex()
    store = keyvault.store_key(a["cases"][0]["password"], salt, params)
    assert store.hex() == a["store_key"] == _hkdf_sha256(mk, labels.DEVICE_STORE).hex()


def test_auth(v: dict[str, Any]) -> None:
    a = v["auth"]
    seed, relay, challenge = (bytes.fromhex(a[k]) for k in ("seed", "relay_id", "challenge"))
    assert keyvault.auth_public_key(seed).hex() == a["public"]
    msg = keyvault.challenge_message(a["purpose"], relay, a["username"], challenge)
    expected_msg = b"".join(
        [labels.AUTH_CHALLENGE]
        + [len(f).to_bytes(4, "big") + f for f in (b"login", relay, b"alice", challenge)]
    )
    assert msg.hex() == a["message"] == expected_msg.hex()
    sig = keyvault.sign_challenge(seed, a["purpose"], relay, a["username"], challenge)
    assert sig.hex() == a["signature"]  # Ed25519 is deterministic
    Ed25519PublicKey.from_public_bytes(bytes.fromhex(a["public"])).verify(sig, expected_msg)


def test_recovery(v: dict[str, Any]) -> None:
    r = v["recovery"]
    raw = bytes.fromhex(r["raw"])
    assert keyvault.new_recovery_code(code=raw) == r["code"]
    assert keyvault.parse_recovery_code(r["code"]) == raw
    rk = keyvault.recovery_keys(raw)
    assert rk.wrap_key.hex() == r["wrap_key"] == _hkdf_sha256(raw, labels.RECOVERY_WRAP).hex()
    assert rk.auth_seed.hex() == r["auth_seed"] == _hkdf_sha256(raw, labels.RECOVERY_AUTH).hex()
    # Crockford base32 of 0x000102..0f, bit-stream order, 2 zero pad bits.
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    value = int.from_bytes(raw, "big") << 2
    chars = "".join(alphabet[(value >> (5 * i)) & 31] for i in reversed(range(26)))
    assert r["code"].replace("-", "") == chars


def _safety_half(name: str, key: bytes) -> str:
    h = labels.SAFETY_NUMBER + key + name.encode()
    for _ in range(5200):
        h = hashlib.sha512(h + key).digest()
    return "".join(f"{int(h[i : i + 5].hex(), 16) % 100000:05d}" for i in range(0, 30, 5))


def test_safety(v: dict[str, Any]) -> None:
    s = v["safety"]
    (na, ka), (nb, kb) = ((n, bytes.fromhex(k)) for n, k in s["parties"])
    assert keyvault.safety_number(na, ka, nb, kb) == s["number"]
    assert keyvault.safety_number(nb, kb, na, ka) == s["number"]
    assert "".join(sorted([_safety_half(na, ka), _safety_half(nb, kb)])) == s["number"]
    assert identity_fingerprint(ka).hex() == s["identity_fingerprint"]
    assert hashlib.sha256(b"veil/v1/identity-fingerprint" + ka).hexdigest() == s["identity_fingerprint"]


def test_account_and_bundle(v: dict[str, Any], account: keyvault.AccountKeys) -> None:
    a = v["account"]
    assert account.to_bytes().hex() == a["keys"]
    assert {k: x.hex() for k, x in vars(account.public()).items()} == a["public"]
    wrap_key, nonce = bytes.fromhex(a["wrap_key"]), bytes.fromhex(a["nonce"])
    bundle = bytes.fromhex(a["bundle"])
    assert keyvault.wrap_bundle(account, wrap_key, a["username"], nonce=nonce) == bundle
    assert keyvault.unwrap_bundle(bundle, wrap_key, a["username"]).to_bytes() == account.to_bytes()
    # Independently: version 1 || nonce || AES-GCM(keys, aad = BUNDLE_AAD || username).
    assert bundle[0] == 1 and bundle[1:13] == nonce
    plain = AESGCM(wrap_key).decrypt(nonce, bundle[13:], labels.BUNDLE_AAD + b"alice")
    assert plain.hex() == a["keys"]
    device, sig = bytes.fromhex(a["device_id"]), bytes.fromhex(a["device_signature"])
    assert keyvault.sign_device(account, "alice", device) == sig
    assert keyvault.verify_device(account.public().identity, "alice", device, sig)


def _lp(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


def test_letter(v: dict[str, Any]) -> None:
    f = v["letter"]
    letter = keyvault.Letter(
        to=f["to"], msg_id=bytes.fromhex(f["msg_id"]), sent_at=f["sent_at"], body=f["body"]
    )
    assert letter == LETTER
    encoded = bytes.fromhex(f["encoded"])
    assert keyvault.encode_letter(letter) == encoded
    assert keyvault.decode_letter(encoded) == letter
    # Independently: 0x01 || lp(to) || msg_id || u64 sent_at || lp(body).
    expected = (
        b"\x01"
        + _lp(f["to"].encode())
        + letter.msg_id
        + f["sent_at"].to_bytes(8, "big")
        + _lp(f["body"].encode())
    )
    assert expected == encoded


def test_payload(v: dict[str, Any], account: keyvault.AccountKeys) -> None:
    f = v["payload"]
    encoded = bytes.fromhex(f["encoded"])
    payload = _payload(account)
    assert f["identity_dh"] == account.public().dh.hex()
    assert keyvault.encode_payload(payload) == encoded
    assert keyvault.decode_payload(encoded) == payload
    # Independently: 0x01 || flags 0x03 || identity_dh || ephemeral || u32 spk || u32 opk || rest.
    expected = (
        b"\x01\x03"
        + bytes.fromhex(f["identity_dh"])
        + bytes.fromhex(f["ephemeral"])
        + f["spk_id"].to_bytes(4, "big")
        + f["opk_id"].to_bytes(4, "big")
        + bytes.fromhex(f["ratchet"])
    )
    assert expected == encoded


def test_envelope(v: dict[str, Any], account: keyvault.AccountKeys) -> None:
    e = v["envelope"]
    f = e["sealed"]
    sealed = keyvault.Sealed(
        sender=f["sender"],
        sender_device=bytes.fromhex(f["sender_device"]),
        payload=bytes.fromhex(f["payload"]),
    )
    assert sealed.payload.hex() == v["payload"]["encoded"]
    device = bytes.fromhex(e["recipient_device"])
    aes_key, nonce = bytes.fromhex(e["aes_key"]), bytes.fromhex(e["nonce"])
    blob = bytes.fromhex(e["blob"])
    identity = account.public().identity

    # The stored envelope still opens and verifies.
    opened = keyvault.open_envelope(blob, account, device)
    assert keyvault.verify_sealed(opened, identity) == sealed
    # Sealing again with the same key and nonce gives the same AEAD part (OAEP is random).
    again = keyvault.seal(
        sealed, account, account.public().enc, device, aes_key=aes_key, nonce=nonce
    )
    assert again[0] == 2 and again[1 + 384 :].hex() == e["aead_part"] == blob[1 + 384 :].hex()
    assert keyvault.open_envelope(again, account, device).sealed == sealed

    # Independently: RSA-OAEP-SHA256 unwraps the AES key, AES-GCM opens the padded inner.
    assert blob[0] == 2
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    assert account.rsa_private.decrypt(blob[1:385], oaep) == aes_key
    assert blob[385:397] == nonce
    aad = labels.ENVELOPE_AAD + b"\x02" + device
    padded = AESGCM(aes_key).decrypt(nonce, blob[397:], aad)
    assert len(padded) == 1024  # 271 bytes of inner: past the first bucket
    n = int.from_bytes(padded[:4], "big")
    assert padded[4 + n :] == bytes(len(padded) - 4 - n)
    inner = padded[4 : 4 + n]
    expected_fields = _lp(b"alice") + sealed.sender_device + _lp(sealed.payload)
    assert inner[:-64] == expected_fields
    Ed25519PublicKey.from_public_bytes(identity).verify(
        inner[-64:], labels.ENVELOPE_SIGNATURE + expected_fields + device
    )


if __name__ == "__main__":
    VECTORS.parent.mkdir(exist_ok=True)
    stored = None
    if VECTORS.exists():  # keep the account, so only deliberately changed vectors change
        keys = json.loads(VECTORS.read_text(encoding="utf-8"))["account"]["keys"]
        stored = keyvault.AccountKeys.from_bytes(bytes.fromhex(keys))
    VECTORS.write_text(
        json.dumps(generate(stored), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    print(f"wrote {VECTORS}")
