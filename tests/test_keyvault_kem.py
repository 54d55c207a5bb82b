"""ML-KEM-768 keys signed by the identity key (keyvault/kem.py)."""

from __future__ import annotations

import pytest

from keyvault import labels
from keyvault.errors import BadKey, DecryptionFailed
from keyvault.kem import (
    CIPHERTEXT_LEN,
    KEM_KEY_LEN,
    PUBLIC_LEN,
    KemKey,
    KemUse,
    decapsulate,
    encapsulate,
    kem_pair,
    new_kem_key,
    new_one_time_kem_keys,
    signed_message,
    verify_kem_key,
)
from keyvault.keys import AccountKeys

SEED = bytes(range(64))


@pytest.fixture(scope="module")
def account() -> AccountKeys:
    return AccountKeys.generate()


def test_a_key_round_trips_and_its_signature_verifies_for_its_use_only(account: AccountKeys) -> None:
    key = new_kem_key(account, KemUse.LAST_RESORT, 7, 1_700_000_000, seed=SEED)
    assert len(key.public) == PUBLIC_LEN and len(key.to_bytes()) == KEM_KEY_LEN
    again = KemKey.from_bytes(key.to_bytes())
    assert again == key
    identity = account.public().identity
    assert verify_kem_key(identity, KemUse.LAST_RESORT, 7, key.public, key.signature)
    # Another use, another id, another key, another signer: all refused.
    assert not verify_kem_key(identity, KemUse.ONE_TIME, 7, key.public, key.signature)
    assert not verify_kem_key(identity, KemUse.ENVELOPE, 7, key.public, key.signature)
    assert not verify_kem_key(identity, KemUse.LAST_RESORT, 8, key.public, key.signature)
    other = kem_pair()[1]
    assert not verify_kem_key(identity, KemUse.LAST_RESORT, 7, other, key.signature)
    assert not verify_kem_key(AccountKeys.generate().public().identity, KemUse.LAST_RESORT, 7,
                              key.public, key.signature)
    assert "seed" not in repr(key) and SEED.hex() not in repr(key)


def test_the_signed_bytes_are_label_use_id_and_key(account: AccountKeys) -> None:
    key = new_kem_key(account, KemUse.ENVELOPE, 0x01020304, 0, seed=SEED)
    message = signed_message(KemUse.ENVELOPE, 0x01020304, key.public)
    assert message == labels.KEM_KEY_SIGNATURE + b"\x03" + b"\x01\x02\x03\x04" + key.public
    assert labels.KEM_KEY_SIGNATURE in labels.ALL_LABELS


def test_a_seed_gives_the_same_key_and_the_secret_survives_the_trip(account: AccountKeys) -> None:
    assert kem_pair(SEED) == kem_pair(SEED)
    key = new_kem_key(account, KemUse.ONE_TIME, 1, 0)
    secret, ciphertext = encapsulate(key.public)
    assert len(ciphertext) == CIPHERTEXT_LEN and len(secret) == 32
    assert key.decapsulate(ciphertext) == secret
    assert decapsulate(key.seed, ciphertext) == secret
    # A different key of the same device gets a different (pseudorandom) secret.
    assert new_kem_key(account, KemUse.ONE_TIME, 2, 0).decapsulate(ciphertext) != secret


def test_malformed_input_is_one_clear_error(account: AccountKeys) -> None:
    key = new_kem_key(account, KemUse.ONE_TIME, 1, 0, seed=SEED)
    data = bytearray(key.to_bytes())
    for broken in (bytes(data[:-1]), b"\x02" + bytes(data[1:]), bytes(data[:1]) + b"\x09" + bytes(data[2:])):
        with pytest.raises(BadKey):
            KemKey.from_bytes(broken)
    data[20] ^= 1  # the seed no longer gives the stored public key
    with pytest.raises(BadKey):
        KemKey.from_bytes(bytes(data))
    with pytest.raises(DecryptionFailed):
        key.decapsulate(b"\x00" * (CIPHERTEXT_LEN - 1))
    with pytest.raises(BadKey):
        encapsulate(b"\x00" * 10)
    with pytest.raises(BadKey):
        encapsulate(b"\xff" * PUBLIC_LEN)  # coefficients out of range: not an ML-KEM key
    assert not verify_kem_key(account.public().identity, KemUse.ONE_TIME, 1, b"\xff" * PUBLIC_LEN, key.signature)
    assert not verify_kem_key(account.public().identity, KemUse.ONE_TIME, -1, key.public, key.signature)
    assert not verify_kem_key(account.public().identity, 9, 1, key.public, key.signature)  # type: ignore[arg-type]


def test_one_time_keys_are_numbered_and_distinct(account: AccountKeys) -> None:
    keys = new_one_time_kem_keys(account, 100, 3, 5)
    assert [k.key_id for k in keys] == [100, 101, 102]
    assert len({k.public for k in keys}) == 3
    assert all(k.use is KemUse.ONE_TIME for k in keys)
    with pytest.raises(ValueError):
        new_one_time_kem_keys(account, 2**32 - 2, 3, 0)
