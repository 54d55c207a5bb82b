"""Argon2id master key, HKDF derivation, KDF parameters and labels."""

from __future__ import annotations

import pytest

from keyvault import (
    DEFAULT_KDF,
    SALT_LEN,
    TEST_KDF,
    BadKey,
    KdfParams,
    derive,
    labels,
    master_key,
    new_salt,
    password_keys,
    store_key,
)

SALT = bytes(range(16))


def test_default_kdf_is_rfc9106_second_recommendation() -> None:
    assert (DEFAULT_KDF.time_cost, DEFAULT_KDF.memory_kib, DEFAULT_KDF.parallelism) == (
        3,
        65536,
        4,
    )


def test_params_dict_round_trip() -> None:
    for p in (DEFAULT_KDF, TEST_KDF):
        assert KdfParams.from_dict(p.to_dict()) == p
    assert DEFAULT_KDF.to_dict() == {"t": 3, "m": 65536, "p": 4}


@pytest.mark.parametrize(
    "d",
    [
        {"t": 0, "m": 65536, "p": 4},
        {"t": 11, "m": 65536, "p": 4},
        {"t": 3, "m": 31, "p": 4},  # below 8 * p
        {"t": 3, "m": 1048577, "p": 4},  # above 1 GiB
        {"t": 3, "m": 65536, "p": 0},
        {"t": 3, "m": 65536, "p": 17},
        {"t": True, "m": 65536, "p": 4},
        {"t": "3", "m": 65536, "p": 4},
        {"t": 3.0, "m": 65536, "p": 4},
        {"t": 3, "m": 65536},
        {"t": 3, "m": 65536, "p": 4, "x": 1},
    ],
)
def test_params_from_dict_rejects_absurd_values(d: dict[str, object]) -> None:
    with pytest.raises(BadKey):
        KdfParams.from_dict(d)


def test_params_bounds_inclusive() -> None:
    KdfParams.from_dict({"t": 1, "m": 8, "p": 1})
    KdfParams.from_dict({"t": 10, "m": 1048576, "p": 16})


def test_new_salt() -> None:
    a, b = new_salt(), new_salt()
    assert len(a) == len(b) == SALT_LEN == 16
    assert a != b


def test_master_key_deterministic_and_sensitive() -> None:
    k = master_key("correct horse", SALT, TEST_KDF)
    assert len(k) == 32
    assert master_key("correct horse", SALT, TEST_KDF) == k
    assert master_key("correct horsf", SALT, TEST_KDF) != k
    assert master_key("correct horse", bytes(16), TEST_KDF) != k
    assert master_key("correct horse", SALT, KdfParams(2, 8192, 1)) != k


def test_master_key_normalises_to_nfc() -> None:
    composed = "caf\u00e9"
    decomposed = "cafe\u0301"
    assert master_key(composed, SALT, TEST_KDF) == master_key(decomposed, SALT, TEST_KDF)


def test_master_key_rejects_bad_inputs() -> None:
    with pytest.raises(BadKey):
        master_key("pw", b"short", TEST_KDF)
    with pytest.raises(BadKey):
        master_key("pw", SALT, KdfParams(0, 8192, 1))


def test_derive_labels_give_independent_keys() -> None:
    key = bytes(32)
    outs = {derive(key, label) for label in labels.ALL_LABELS}
    assert len(outs) == len(labels.ALL_LABELS)
    assert len(derive(key, labels.BUNDLE_WRAP, 64)) == 64
    assert derive(key, labels.BUNDLE_WRAP, 64)[:32] == derive(key, labels.BUNDLE_WRAP)


def test_labels_distinct_and_namespaced() -> None:
    assert len(set(labels.ALL_LABELS)) == len(labels.ALL_LABELS)
    for label in labels.ALL_LABELS:
        assert isinstance(label, bytes)
        assert label.startswith(b"veil/v1/")
    public = [n for n in dir(labels) if n.isupper() and n != "ALL_LABELS"]
    assert {getattr(labels, n) for n in public} == set(labels.ALL_LABELS)


def test_password_keys_and_store_key() -> None:
    pk = password_keys("pw", SALT, TEST_KDF)
    mk = master_key("pw", SALT, TEST_KDF)
    assert pk.wrap_key == derive(mk, labels.BUNDLE_WRAP)
    assert pk.auth_seed == derive(mk, labels.AUTH_SEED)
    assert pk.wrap_key != pk.auth_seed
    sk = store_key("pw", SALT, TEST_KDF)
    assert sk == derive(mk, labels.DEVICE_STORE)
    assert sk not in (pk.wrap_key, pk.auth_seed)
    assert "secret" in repr(pk) and pk.wrap_key.hex() not in repr(pk)
