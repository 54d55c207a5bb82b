"""Cross-checks against independent implementations: the PyPI packages ``doubleratchet``
and ``x3dh`` (by Syndace, 1.x). Skipped unless they are importable; neither is a dependency
of Veil. Run with them on the path, e.g.
``pip install --target /tmp/xcheck doubleratchet x3dh`` then
``PYTHONPATH=/tmp/xcheck pytest tests/test_keyvault_ratchet_crosscheck.py``.

``doubleratchet`` implements the spec WITHOUT header encryption and with its own AEAD
(AES-256-CBC + HMAC), so messages cannot be compared byte for byte. What can be compared are
the keys: configured with our KDF_RK info and our KDF_CK constants, and fed the same root
key and ratchet key pairs, it must derive the same message key for every message. Its
KDF_RK derives 64 bytes, which are the first 64 of our 96 (HKDF output is a prefix), so the
root and chain keys are shared while our extra next-header-key is not. The check: each of
our message bodies opens under the key the other implementation used for the same message."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import pytest

dr = pytest.importorskip("doubleratchet")

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from doubleratchet.recommended import (  # noqa: E402
    HashFunction,
    aead_aes_hmac,
    diffie_hellman_ratchet_curve25519,
    kdf_hkdf,
    kdf_separate_hmacs,
)

from keyvault import labels, ratchet  # noqa: E402
from keyvault.prekeys import x25519_pair  # noqa: E402
from keyvault.x3dh import X3DHResult  # noqa: E402

AD = b"veil/test/crosscheck"
ROOT, HKA, NHKB = bytes([11]) * 32, bytes([12]) * 32, bytes([13]) * 32
SPK = x25519_pair(bytes([14]) * 32)
KEYS = {
    "alice": [bytes([20 + i]) * 32 for i in range(8)],
    "bob": [bytes([40 + i]) * 32 for i in range(8)],
}


class RootKDF(kdf_hkdf.KDF):
    @staticmethod
    def _get_hash_function() -> HashFunction:
        return HashFunction.SHA_256

    @staticmethod
    def _get_info() -> bytes:
        return labels.RATCHET_ROOT


class ChainKDF(kdf_separate_hmacs.KDF):
    @staticmethod
    def _get_hash_function() -> HashFunction:
        return HashFunction.SHA_256


class CaptureAEAD(aead_aes_hmac.AEAD):
    """Their recommended AEAD, recording each message key it encrypts with."""

    keys: ClassVar[list[bytes]] = []

    @staticmethod
    def _get_hash_function() -> HashFunction:
        return HashFunction.SHA_256

    @staticmethod
    def _get_info() -> bytes:
        return b"crosscheck"

    @classmethod
    async def encrypt(cls, plaintext: bytes, key: bytes, associated_data: bytes) -> bytes:
        cls.keys.append(key)
        return await super().encrypt(plaintext, key, associated_data)


def _dh_class(who: str) -> type:
    queue = list(KEYS[who])

    class FixedDH(diffie_hellman_ratchet_curve25519.DiffieHellmanRatchet):
        @staticmethod
        def _generate_priv() -> bytes:
            return queue.pop(0)

    return FixedDH


class TheirRatchet(dr.DoubleRatchet):
    @staticmethod
    def _build_associated_data(associated_data: bytes, header: Any) -> bytes:
        return (
            associated_data
            + header.ratchet_pub
            + header.previous_sending_chain_length.to_bytes(4, "big")
            + header.sending_chain_length.to_bytes(4, "big")
        )


def _params(who: str) -> dict[str, Any]:
    return {
        "diffie_hellman_ratchet_class": _dh_class(who),
        "root_chain_kdf": RootKDF,
        "message_chain_kdf": ChainKDF,
        "message_chain_constant": b"\x02\x01",  # HMAC(ck, 0x02) = next chain key, 0x01 = mk
        # It refuses a jump limit above its store limit, so both are 1000 here.
        "dos_protection_threshold": ratchet.MAX_STORED_SKIPPED,
        "max_num_skipped_message_keys": ratchet.MAX_STORED_SKIPPED,
        "aead": CaptureAEAD,
    }


def _opens_with(message: bytes, mk: bytes) -> bytes:
    key, nonce, _ = ratchet.message_keys(mk)
    aad = len(AD).to_bytes(4, "big") + AD + message[: ratchet.PREFIX_LEN]
    return AESGCM(key).decrypt(nonce, message[ratchet.PREFIX_LEN :], aad)


async def _run() -> int:
    CaptureAEAD.keys = []
    ours: dict[str, ratchet.RatchetState] = {
        "alice": ratchet.init_initiator(
            X3DHResult(ROOT, HKA, NHKB, AD, b"e" * 32), SPK[1], dh_private=KEYS["alice"][0]
        ),
        "bob": ratchet.init_responder(X3DHResult(ROOT, NHKB, HKA, AD, b""), SPK),
    }
    # Both take each party's ratchet keys in the same order (one per DH ratchet step); ours
    # takes a new one at the first send after a step, theirs on receipt.
    used = {"alice": 1, "bob": 0}
    theirs: dict[str, Any] = {}
    in_flight: dict[str, list[tuple[bytes, Any, bytes]]] = {"alice": [], "bob": []}
    checked = 0

    async def send(who: str, text: bytes) -> None:
        nonlocal checked
        state = ours[who]
        new_key = None
        if state.cks is None:  # our deferred DH ratchet step takes the next key now
            new_key = KEYS[who][used[who]]
            used[who] += 1
        ours[who], mine = ratchet.encrypt(state, text, AD, dh_private=new_key)
        if who == "alice" and "alice" not in theirs:
            theirs["alice"], their_msg = await TheirRatchet.encrypt_initial_message(
                shared_secret=ROOT,
                recipient_ratchet_pub=SPK[1],
                message=text,
                associated_data=AD,
                **_params("alice"),
            )
        else:
            their_msg = await theirs[who].encrypt_message(text, AD)
        assert _opens_with(mine, CaptureAEAD.keys[-1]) == text
        checked += 1
        to = "bob" if who == "alice" else "alice"
        in_flight[to].append((mine, their_msg, text))

    async def deliver(to: str, index: int) -> None:
        mine, their_msg, text = in_flight[to].pop(index)
        ours[to], p = ratchet.decrypt(ours[to], mine, AD)
        assert p == text
        if to not in theirs:
            theirs[to], p = await TheirRatchet.decrypt_initial_message(
                shared_secret=ROOT,
                own_ratchet_priv=SPK[0],
                message=their_msg,
                associated_data=AD,
                **_params("bob"),
            )
        else:
            p = await theirs[to].decrypt_message(their_msg, AD)
        assert p == text

    await send("alice", b"a0")
    await send("alice", b"a1")
    await send("alice", b"a2")
    await deliver("bob", 0)
    await deliver("bob", 1)  # a2, skipping a1
    await send("bob", b"b0")
    await send("bob", b"b1")
    await deliver("alice", 1)  # b1 first
    await send("alice", b"a3")  # a new chain
    await deliver("bob", 1)
    await deliver("bob", 0)  # a1, from the finished chain's skipped keys
    await deliver("alice", 0)  # b0
    for i in range(3):
        await send("bob", b"b%d" % (2 + i))
        await deliver("alice", 0)
        await send("alice", b"a%d" % (4 + i))
        await deliver("bob", 0)
    return checked


def test_message_keys_match_an_independent_implementation() -> None:
    assert asyncio.run(_run()) == 12


@pytest.mark.parametrize("with_opk", [True, False])
def test_x3dh_secret_matches_an_independent_implementation(
    with_opk: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PyPI package ``x3dh`` (Syndace) must derive the same SK from the same keys.

    It has one identity key (XEdDSA signs with the X25519 key itself) where Veil has two, so
    its bundle signatures differ from ours; the DHs, F, salt and info are the same, and so
    must be SK. Ours is compared through the root key, HKDF(SK, X3DH_ROOT).
    """
    x3dh_pkg = pytest.importorskip("x3dh")
    import types

    from x3dh import base_state, identity_key_pair

    from keyvault.kdf import derive
    from tests.test_keyvault_ratchet_vectors import X3DH_INPUT, _x3dh_case

    randoms: list[bytes] = []
    monkeypatch.setattr(
        base_state,
        "secrets",
        types.SimpleNamespace(token_bytes=lambda n: randoms.pop(0), choice=lambda s: s[0]),
    )

    class State(base_state.BaseState):
        @staticmethod
        def _encode_public_key(key_format: Any, pub: bytes) -> bytes:
            return b"\x05" + pub

    def state(dh_private: bytes, spk_private: bytes) -> Any:
        randoms.append(spk_private)
        return State.create(
            x3dh_pkg.IdentityKeyFormat.CURVE_25519,
            x3dh_pkg.HashFunction.SHA_256,
            labels.X3DH_SK,
            identity_key_pair.IdentityKeyPairPriv(dh_private),
        )

    i = X3DH_INPUT
    bob = state(i["bob_dh_private"], i["spk_private"])
    if with_opk:
        randoms.append(i["opk_private"])
        bob.generate_pre_keys(1)
    alice = state(i["alice_dh_private"], bytes([99]) * 32)
    randoms.append(i["ephemeral_private"])
    sk, _, header = asyncio.run(alice.get_shared_secret_active(bob.bundle, require_pre_key=False))
    sk_bob, _, _ = asyncio.run(bob.get_shared_secret_passive(header, require_pre_key=False))
    _, ours, _ = _x3dh_case(with_opk)
    assert sk == sk_bob
    assert derive(sk, labels.X3DH_ROOT) == ours.root_key
    assert header.ephemeral_key == ours.ephemeral
