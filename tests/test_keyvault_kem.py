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
DEVICE = bytes(range(16))
OTHER_DEVICE = bytes(range(16, 32))


@pytest.fixture(scope="module")
def account() -> AccountKeys:
    return AccountKeys.generate()


def test_a_key_round_trips_and_its_signature_verifies_for_its_use_only(account: AccountKeys) -> None:
    key = new_kem_key(account, KemUse.LAST_RESORT, 7, 1_700_000_000, device_id=DEVICE, seed=SEED)
    assert len(key.public) == PUBLIC_LEN and len(key.to_bytes()) == KEM_KEY_LEN
    again = KemKey.from_bytes(key.to_bytes())
    assert again == key
    identity = account.public().identity
    assert verify_kem_key(identity, KemUse.LAST_RESORT, 7, key.public, key.signature, device_id=DEVICE)
    # Another use, another id, another key, another signer: all refused.
    assert not verify_kem_key(identity, KemUse.ONE_TIME, 7, key.public, key.signature, device_id=DEVICE)
    assert not verify_kem_key(identity, KemUse.ENVELOPE, 7, key.public, key.signature, device_id=DEVICE)
    assert not verify_kem_key(identity, KemUse.LAST_RESORT, 8, key.public, key.signature, device_id=DEVICE)
    other = kem_pair()[1]
    assert not verify_kem_key(identity, KemUse.LAST_RESORT, 7, other, key.signature, device_id=DEVICE)
    assert not verify_kem_key(AccountKeys.generate().public().identity, KemUse.LAST_RESORT, 7,
                              key.public, key.signature, device_id=DEVICE)
    assert "seed" not in repr(key) and SEED.hex() not in repr(key)


def test_the_signed_bytes_are_label_use_id_device_and_key(account: AccountKeys) -> None:
    key = new_kem_key(account, KemUse.ENVELOPE, 0x01020304, 0, device_id=DEVICE, seed=SEED)
    message = signed_message(KemUse.ENVELOPE, 0x01020304, key.public, DEVICE)
    assert message == labels.KEM_KEY_SIGNATURE + b"\x03" + b"\x01\x02\x03\x04" + DEVICE + key.public
    assert verify_kem_key(account.public().identity, KemUse.ENVELOPE, 0x01020304, key.public, key.signature,
                          device_id=DEVICE)
    assert labels.KEM_KEY_SIGNATURE in labels.ALL_LABELS


def test_a_seed_gives_the_same_key_and_the_secret_survives_the_trip(account: AccountKeys) -> None:
    assert kem_pair(SEED) == kem_pair(SEED)
    key = new_kem_key(account, KemUse.ONE_TIME, 1, 0, device_id=DEVICE)
    secret, ciphertext = encapsulate(key.public)
    assert len(ciphertext) == CIPHERTEXT_LEN and len(secret) == 32
    assert key.decapsulate(ciphertext) == secret
    assert decapsulate(key.seed, ciphertext) == secret
    # A different key of the same device gets a different (pseudorandom) secret.
    assert new_kem_key(account, KemUse.ONE_TIME, 2, 0, device_id=DEVICE).decapsulate(ciphertext) != secret


def test_malformed_input_is_one_clear_error(account: AccountKeys) -> None:
    key = new_kem_key(account, KemUse.ONE_TIME, 1, 0, device_id=DEVICE, seed=SEED)
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
    identity = account.public().identity
    assert not verify_kem_key(identity, KemUse.ONE_TIME, 1, b"\xff" * PUBLIC_LEN, key.signature, device_id=DEVICE)
    assert not verify_kem_key(identity, KemUse.ONE_TIME, -1, key.public, key.signature, device_id=DEVICE)
    assert not verify_kem_key(identity, 9, 1, key.public, key.signature, device_id=DEVICE)  # type: ignore[arg-type]


def test_one_time_keys_are_numbered_and_distinct(account: AccountKeys) -> None:
    keys = new_one_time_kem_keys(account, 100, 3, 5, device_id=DEVICE)
    assert [k.key_id for k in keys] == [100, 101, 102]
    assert len({k.public for k in keys}) == 3
    assert all(k.use is KemUse.ONE_TIME for k in keys)
    identity = account.public().identity
    assert all(verify_kem_key(identity, KemUse.ONE_TIME, k.key_id, k.public, k.signature, device_id=DEVICE)
               for k in keys)
    assert not any(verify_kem_key(identity, KemUse.ONE_TIME, k.key_id, k.public, k.signature, device_id=OTHER_DEVICE)
                   for k in keys)
    with pytest.raises(ValueError):
        new_one_time_kem_keys(account, 2**32 - 2, 3, 0, device_id=DEVICE)


@pytest.mark.parametrize("use", list(KemUse))
def test_a_key_signed_for_one_device_does_not_verify_for_another(account: AccountKeys, use: KemUse) -> None:
    """The signature binds the device: a relay cannot present device A's key as device B's
    (of the same account, signed by the same identity key)."""
    key = new_kem_key(account, use, 11, 0, device_id=DEVICE)
    identity = account.public().identity
    assert verify_kem_key(identity, use, 11, key.public, key.signature, device_id=DEVICE)
    assert not verify_kem_key(identity, use, 11, key.public, key.signature, device_id=OTHER_DEVICE)
    one_bit = bytes([DEVICE[0] ^ 1]) + DEVICE[1:]
    assert not verify_kem_key(identity, use, 11, key.public, key.signature, device_id=one_bit)
    # The same key signed again for B verifies for B only.
    for_b = KemKey(use, 11, key.seed, key.public,
                   account.identity_private.sign(signed_message(use, 11, key.public, OTHER_DEVICE)), 0)
    assert verify_kem_key(identity, use, 11, for_b.public, for_b.signature, device_id=OTHER_DEVICE)
    assert not verify_kem_key(identity, use, 11, for_b.public, for_b.signature, device_id=DEVICE)


@pytest.mark.parametrize("device_id", [b"", DEVICE[:15], DEVICE + b"\x00", bytes(32)])
def test_a_device_id_is_sixteen_bytes(account: AccountKeys, device_id: bytes) -> None:
    key = new_kem_key(account, KemUse.ONE_TIME, 1, 0, device_id=DEVICE, seed=SEED)
    with pytest.raises(ValueError):
        signed_message(KemUse.ONE_TIME, 1, key.public, device_id)
    assert not verify_kem_key(account.public().identity, KemUse.ONE_TIME, 1, key.public, key.signature,
                              device_id=device_id)
    with pytest.raises(ValueError):
        new_kem_key(account, KemUse.ONE_TIME, 1, 0, device_id=device_id)
    with pytest.raises(ValueError):
        new_one_time_kem_keys(account, 1, 2, 0, device_id=device_id)
