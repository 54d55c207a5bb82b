"""Account keys, the wrapped key bundle, device signatures and recovery codes."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keyvault import (
    RECOVERY_CODE_BYTES,
    TEST_KDF,
    AccountKeys,
    BadKey,
    BadPassword,
    labels,
    new_recovery_code,
    parse_recovery_code,
    password_keys,
    recovery_keys,
    sign_device,
    unwrap_bundle,
    verify_device,
    wrap_bundle,
)
from keyvault.kdf import derive

SALT = bytes(16)
DEVICE = bytes(range(16))


@pytest.fixture(scope="module")
def alice() -> AccountKeys:
    return AccountKeys.generate()


@pytest.fixture(scope="module")
def bob() -> AccountKeys:
    return AccountKeys.generate()


@pytest.fixture(scope="module")
def wrap_key() -> bytes:
    return password_keys("hunter2", SALT, TEST_KDF).wrap_key


def _spki(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_public_keys(alice: AccountKeys, bob: AccountKeys) -> None:
    pub = alice.public()
    assert pub is alice.public()
    assert len(pub.identity) == 32 and len(pub.dh) == 32
    assert pub.identity == alice.identity_private.public_key().public_bytes_raw()
    assert alice.identity_seed == alice.identity_private.private_bytes_raw()
    pub.validate()
    assert pub != bob.public()
    assert alice.identity_seed.hex() not in repr(alice)


def test_public_keys_validate_rejects_malformed(alice: AccountKeys) -> None:
    pub = alice.public()
    rsa2048 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_e3 = rsa.generate_private_key(public_exponent=3, key_size=3072)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    bad = [
        dataclasses.replace(pub, enc=b""),
        dataclasses.replace(pub, enc=pub.enc[:-1]),
        dataclasses.replace(pub, enc=pub.enc + b"\x00"),
        dataclasses.replace(pub, enc=_spki(rsa2048)),
        dataclasses.replace(pub, enc=_spki(rsa_e3)),
        dataclasses.replace(pub, enc=_spki(ec_key)),
        dataclasses.replace(pub, identity=pub.identity[:31]),
        dataclasses.replace(pub, identity=pub.identity + b"\x00"),
        dataclasses.replace(pub, dh=b""),
        dataclasses.replace(pub, dh=pub.dh * 2),
        dataclasses.replace(pub, dh="x" * 32),  # type: ignore[arg-type]
    ]
    for p in bad:
        with pytest.raises(BadKey):
            p.validate()


def test_to_bytes_round_trip(alice: AccountKeys) -> None:
    data = alice.to_bytes()
    assert data[0] == 1
    again = AccountKeys.from_bytes(data)
    assert again.public() == alice.public()
    assert again.to_bytes() == data
    assert again.identity_seed == alice.identity_seed


def test_from_bytes_rejects_malformed(alice: AccountKeys) -> None:
    data = alice.to_bytes()
    bad = [
        b"",
        b"\x01",
        b"\x02" + data[1:],
        data[:-1],
        data + b"\x00",
        data[:5] + data[6:],
        b"\x01" + (10**6).to_bytes(4, "big") + data[5:],
        b"\x01" + (4).to_bytes(4, "big") + b"junk" + data[-72:],
    ]
    for blob in bad:
        with pytest.raises(BadKey):
            AccountKeys.from_bytes(blob)


def test_from_bytes_rejects_wrong_rsa_size() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = small.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    blob = b"\x01" + len(der).to_bytes(4, "big") + der + (b"\x00\x00\x00\x20" + bytes(32)) * 2
    with pytest.raises(BadKey):
        AccountKeys.from_bytes(blob)


def test_bundle_round_trip(alice: AccountKeys, wrap_key: bytes) -> None:
    blob = wrap_bundle(alice, wrap_key, "alice")
    assert blob[0] == 1
    assert wrap_bundle(alice, wrap_key, "alice") != blob  # fresh nonce each time
    assert unwrap_bundle(blob, wrap_key, "alice").to_bytes() == alice.to_bytes()
    fixed = wrap_bundle(alice, wrap_key, "alice", nonce=bytes(12))
    assert fixed[1:13] == bytes(12)
    assert fixed == wrap_bundle(alice, wrap_key, "alice", nonce=bytes(12))


def test_bundle_wrong_password_or_username(alice: AccountKeys, wrap_key: bytes) -> None:
    blob = wrap_bundle(alice, wrap_key, "alice")
    other = password_keys("hunter3", SALT, TEST_KDF).wrap_key
    with pytest.raises(BadPassword):
        unwrap_bundle(blob, other, "alice")
    with pytest.raises(BadPassword):
        unwrap_bundle(blob, wrap_key, "bob")
    with pytest.raises(BadPassword):
        unwrap_bundle(blob, wrap_key, "Alice")


def test_bundle_malformed_is_bad_password(alice: AccountKeys, wrap_key: bytes) -> None:
    blob = wrap_bundle(alice, wrap_key, "alice")
    bad = [b"", b"\x01", blob[:28], blob[:-1], blob + b"\x00", b"\x02" + blob[1:]]
    bad += [
        blob[:i] + bytes([blob[i] ^ 0x80]) + blob[i + 1 :]
        for i in (0, 1, 12, 13, 100, len(blob) - 1)
    ]
    for b in bad:
        with pytest.raises(BadPassword):
            unwrap_bundle(b, wrap_key, "alice")
    with pytest.raises(BadPassword):
        unwrap_bundle(blob, wrap_key[:16] + b"x", "alice")  # key of invalid length


def test_bundle_with_valid_tag_but_garbage_inside_is_bad_password(wrap_key: bytes) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    ct = AESGCM(wrap_key).encrypt(bytes(12), b"garbage", labels.BUNDLE_AAD + b"alice")
    with pytest.raises(BadPassword):
        unwrap_bundle(b"\x01" + bytes(12) + ct, wrap_key, "alice")


def test_device_signature(alice: AccountKeys, bob: AccountKeys) -> None:
    sig = sign_device(alice, "alice", DEVICE)
    ident = alice.public().identity
    assert verify_device(ident, "alice", DEVICE, sig)
    assert not verify_device(bob.public().identity, "alice", DEVICE, sig)
    assert not verify_device(ident, "bob", DEVICE, sig)
    assert not verify_device(ident, "alice", bytes(16), sig)
    assert not verify_device(ident, "alice", DEVICE, sig[:-1])
    assert not verify_device(ident[:-1], "alice", DEVICE, sig)
    assert not verify_device(b"", "", b"", b"")
    assert not verify_device(ident, "\udc80", DEVICE, sig)


def test_recovery_code_round_trip_and_format() -> None:
    code = new_recovery_code()
    groups = code.split("-")
    assert [len(g) for g in groups] == [4, 4, 4, 4, 4, 4, 2]
    assert all(c in "0123456789ABCDEFGHJKMNPQRSTVWXYZ" for c in code.replace("-", ""))
    raw = parse_recovery_code(code)
    assert len(raw) == RECOVERY_CODE_BYTES
    assert new_recovery_code(code=raw) == code
    assert new_recovery_code() != code


@pytest.mark.parametrize("raw", [bytes(16), b"\xff" * 16, bytes(range(16))])
def test_recovery_code_fixed_values(raw: bytes) -> None:
    assert parse_recovery_code(new_recovery_code(code=raw)) == raw


def test_recovery_code_tolerance() -> None:
    raw = bytes(range(16))
    code = new_recovery_code(code=raw)
    assert code == "000G-40R4-0M30-E209-185G-R38E-1W"
    variants = [
        code.lower(),
        code.replace("-", ""),
        code.replace("-", " "),
        "  " + code.replace("-", " - ") + "\n",
        code.replace("0", "O").replace("1", "I"),
        code.replace("0", "o").replace("1", "l"),
        code.replace("1", "L"),
    ]
    for v in variants:
        assert parse_recovery_code(v) == raw


@pytest.mark.parametrize(
    "text",
    [
        "",
        "000G-40R4-0M30-E209-185G-R38E-1",  # too short
        "000G-40R4-0M30-E209-185G-R38E-1W0",  # too long
        "000G-40R4-0M30-E209-185G-R38E-1U",  # U is not Crockford
        "000G-40R4-0M30-E209-185G-R38E-1!",
        "000G-40R4-0M30-E209-185G-R38E-1X",  # non-zero pad bits in the last character
    ],
)
def test_recovery_code_rejects(text: str) -> None:
    with pytest.raises(BadPassword):
        parse_recovery_code(text)


def test_recovery_keys() -> None:
    raw = bytes(range(16))
    rk = recovery_keys(raw)
    assert rk.wrap_key == derive(raw, labels.RECOVERY_WRAP)
    assert rk.auth_seed == derive(raw, labels.RECOVERY_AUTH)
    assert rk.wrap_key != rk.auth_seed
    assert recovery_keys(bytes(16)) != rk
    with pytest.raises(BadPassword):
        recovery_keys(raw[:15])


def test_recovery_wraps_a_second_bundle(alice: AccountKeys) -> None:
    raw = parse_recovery_code(new_recovery_code())
    blob = wrap_bundle(alice, recovery_keys(raw).wrap_key, "alice")
    assert unwrap_bundle(blob, recovery_keys(raw).wrap_key, "alice").public() == alice.public()
    with pytest.raises(BadPassword):
        unwrap_bundle(blob, recovery_keys(bytes(16)).wrap_key, "alice")
