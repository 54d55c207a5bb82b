"""Known-answer tests for the post-quantum pieces, against tests/vectors/pq_vectors.json:
ML-KEM-768 keys and their signatures, a decapsulation, the PQXDH derivation, a PQXDH first
message's payload header and a version 3 (hybrid) envelope.

ML-KEM encapsulation and RSA-OAEP are randomised, so the generator
(``python -m tests.test_keyvault_pq_vectors``) keeps the ciphertexts and the envelope
already in the file (they depend only on the seeds and the stored account): only a
deliberate format change changes the file. Each test recomputes what it can
independently (the signatures with Ed25519, HKDF by hand, RSA-OAEP and AES-GCM directly);
ML-KEM itself is checked by decapsulation only (no second implementation here).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyvault import kem, labels
from keyvault.envelope import Sealed, open_envelope, seal_hybrid, verify_sealed
from keyvault.keys import AccountKeys
from keyvault.payload import KemInit, Payload, PrekeyInit, encode_payload
from keyvault.prekeys import new_one_time_prekeys, new_signed_prekey
from keyvault.x3dh import KemPrekey, initiate, respond
from tests.test_keyvault_ratchet_vectors import (
    CREATED_AT,
    DEVICES,
    NAMES,
    OPK_ID,
    SPK_ID,
    X3DH_INPUT,
    _b,
    _hkdf,
    _x25519,
    _x25519_public,
)
from tests.test_keyvault_x3dh import account, bundle_of

VECTORS = Path(__file__).parent / "vectors"
PQ_FILE = VECTORS / "pq_vectors.json"
ACCOUNT_FILE = VECTORS / "keyvault_vectors.json"
KEM_SEEDS = {use.name: _b(40 + int(use), 64) for use in kem.KemUse}
KEM_IDS = {"ONE_TIME": 5, "LAST_RESORT": 1, "ENVELOPE": 2}
RSA_SECRET = _b(90)
NONCE = _b(120, 12)
RATCHET_MESSAGE = bytes(range(85, 185))
_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _load(path: Path) -> Any:
    return json.loads(path.read_text())


def _stored_account() -> AccountKeys:
    return AccountKeys.from_bytes(bytes.fromhex(_load(ACCOUNT_FILE)["account"]["keys"]))


def _kem_key(bob: AccountKeys, name: str) -> kem.KemKey:
    use = kem.KemUse[name]
    return kem.new_kem_key(bob, use, KEM_IDS[name], CREATED_AT, seed=KEM_SEEDS[name])


def _pqxdh(ciphertext: bytes) -> tuple[dict[str, str], bytes]:
    i = X3DH_INPUT
    alice = account(i["alice_identity_seed"], i["alice_dh_private"])
    bob = account(i["bob_identity_seed"], i["bob_dh_private"])
    spk = new_signed_prekey(bob, SPK_ID, CREATED_AT, private=i["spk_private"])
    opk = new_one_time_prekeys(OPK_ID, 1, privates=[i["opk_private"]])[0]
    key = _kem_key(bob, "ONE_TIME")
    secret = key.decapsulate(ciphertext)
    bundle = bundle_of(bob, spk, opk)
    bundle = type(bundle)(**{**vars(bundle), "kem": KemPrekey(key.use, key.key_id, key.public, key.signature)})
    xa = initiate(alice, bundle, me_name=NAMES[0], me_device=DEVICES[0], them_name=NAMES[1],
                  them_device=DEVICES[1], ephemeral_private=i["ephemeral_private"],
                  kem_encapsulation=(secret, ciphertext))
    xb = respond(bob, spk, opk, their_identity_dh=alice.public().dh, their_ephemeral=xa.ephemeral,
                 me_name=NAMES[1], me_device=DEVICES[1], them_name=NAMES[0], them_device=DEVICES[0],
                 kem=key, kem_ciphertext=ciphertext)
    assert xa.root_key == xb.root_key and xb.post_quantum
    init = PrekeyInit(alice.public().dh, xa.ephemeral, SPK_ID, OPK_ID, KemInit(key.use, key.key_id, ciphertext))
    case = {
        "kem_secret": secret.hex(),
        "root_key": xa.root_key.hex(),
        "shared_hka": xa.header_key_send.hex(),
        "shared_nhkb": xa.next_header_key_recv.hex(),
        "payload": encode_payload(Payload(init, RATCHET_MESSAGE)).hex(),
    }
    return case, secret


def generate() -> dict[str, Any]:
    old = _load(PQ_FILE) if PQ_FILE.exists() else {}
    bob = account(X3DH_INPUT["bob_identity_seed"], X3DH_INPUT["bob_dh_private"])
    keys = {name: _kem_key(bob, name) for name in KEM_SEEDS}
    kem_keys = {
        name: {"use": int(k.use), "key_id": k.key_id, "seed": k.seed.hex(), "public": k.public.hex(),
               "signature": k.signature.hex(), "serialised": k.to_bytes().hex()}
        for name, k in keys.items()
    }
    ct = bytes.fromhex(old["pqxdh"]["ciphertext"]) if old else kem.encapsulate(keys["ONE_TIME"].public)[1]
    pqxdh, _ = _pqxdh(ct)
    pqxdh["ciphertext"] = ct.hex()
    # The envelope: from and to the stored account, to the ENVELOPE key.
    acct = _stored_account()
    env_key = keys["ENVELOPE"]
    sealed = Sealed(NAMES[0], DEVICES[0], RATCHET_MESSAGE)
    if old:
        blob = bytes.fromhex(old["envelope"]["blob"])
    else:
        ect = kem.encapsulate(env_key.public)[1]
        blob = seal_hybrid(sealed, acct, acct.public().enc, DEVICES[1], env_key.public, env_key.key_id,
                           rsa_secret=RSA_SECRET, nonce=NONCE,
                           kem_encapsulation=(env_key.decapsulate(ect), ect))
    return {
        "note": "bob's identity key is the one of ratchet_x3dh.json; the envelope's account is "
                "the one of keyvault_vectors.json (sender and recipient)",
        "kem_keys": kem_keys,
        "pqxdh": {**pqxdh, "inputs": "those of ratchet_x3dh.json, with_opk true", "kem_key": "ONE_TIME"},
        "envelope": {"recipient_device": DEVICES[1].hex(), "kem_key": "ENVELOPE",
                     "rsa_secret": RSA_SECRET.hex(), "nonce": NONCE.hex(),
                     "sender": sealed.sender, "sender_device": sealed.sender_device.hex(),
                     "payload": sealed.payload.hex(), "blob": blob.hex()},
    }


def test_kem_keys() -> None:
    v = _load(PQ_FILE)["kem_keys"]
    bob = account(X3DH_INPUT["bob_identity_seed"], X3DH_INPUT["bob_dh_private"])
    identity = Ed25519PublicKey.from_public_bytes(bob.public().identity)
    for name, c in v.items():
        key = _kem_key(bob, name)
        assert (key.public.hex(), key.signature.hex(), key.to_bytes().hex()) == (c["public"], c["signature"], c["serialised"])
        assert kem.KemKey.from_bytes(bytes.fromhex(c["serialised"])) == key
        signed = labels.KEM_KEY_SIGNATURE + bytes([c["use"]]) + c["key_id"].to_bytes(4, "big") + bytes.fromhex(c["public"])
        identity.verify(bytes.fromhex(c["signature"]), signed)
        serialised = bytes.fromhex(c["serialised"])
        assert serialised[:6] == bytes([1, c["use"]]) + c["key_id"].to_bytes(4, "big")
        assert serialised[14:78].hex() == c["seed"] and serialised[78:1262].hex() == c["public"]


def test_pqxdh() -> None:
    v = _load(PQ_FILE)["pqxdh"]
    case, secret = _pqxdh(bytes.fromhex(v["ciphertext"]))
    assert secret.hex() == v["kem_secret"]
    assert case == {k: v[k] for k in case}
    # By hand: SK over the four DHs and the KEM secret, under PQXDH's own label.
    i = X3DH_INPUT
    bob_dh = _x25519_public(i["bob_dh_private"])
    spk_pub = _x25519_public(i["spk_private"])
    ik_a, ek_a = i["alice_dh_private"], i["ephemeral_private"]
    km = (_x25519(ik_a, spk_pub) + _x25519(ek_a, bob_dh) + _x25519(ek_a, spk_pub)
          + _x25519(ek_a, _x25519_public(i["opk_private"])))
    sk = _hkdf(b"", b"\xff" * 32 + km + bytes.fromhex(v["kem_secret"]), labels.PQXDH_SK, 32)
    assert _hkdf(b"", sk, labels.X3DH_ROOT, 32).hex() == v["root_key"]
    assert _hkdf(b"", sk, labels.X3DH_HEADER_A, 32).hex() == v["shared_hka"]
    assert _hkdf(b"", sk, labels.X3DH_HEADER_B, 32).hex() == v["shared_nhkb"]
    # The payload header: flags 0x07, then the KEM part after the classical init.
    payload = bytes.fromhex(v["payload"])
    assert payload[:2] == b"\x01\x07"
    assert payload[74:79] == bytes([int(kem.KemUse.ONE_TIME)]) + KEM_IDS["ONE_TIME"].to_bytes(4, "big")
    assert payload[79:1167].hex() == v["ciphertext"] and payload[1167:] == RATCHET_MESSAGE


def test_hybrid_envelope() -> None:
    v = _load(PQ_FILE)
    e = v["envelope"]
    blob, device = bytes.fromhex(e["blob"]), bytes.fromhex(e["recipient_device"])
    acct = _stored_account()
    env = kem.KemKey.from_bytes(bytes.fromhex(v["kem_keys"]["ENVELOPE"]["serialised"]))
    opened = verify_sealed(open_envelope(blob, acct, device, env), acct.public().identity)
    assert opened == Sealed(e["sender"], bytes.fromhex(e["sender_device"]), bytes.fromhex(e["payload"]))
    # By hand: RSA-OAEP, ML-KEM, the HKDF combination and AES-GCM.
    assert blob[0] == 3 and blob[385:389] == env.key_id.to_bytes(4, "big")
    rsa_secret = acct.rsa_private.decrypt(blob[1:385], _OAEP)
    assert rsa_secret.hex() == e["rsa_secret"]
    kem_secret = env.decapsulate(blob[389:1477])
    info = labels.ENVELOPE_HYBRID + hashlib.sha256(blob[:1477]).digest()
    aes_key = _hkdf(b"", rsa_secret + kem_secret, info, 32)
    assert blob[1477:1489].hex() == e["nonce"]
    padded = AESGCM(aes_key).decrypt(blob[1477:1489], blob[1489:], labels.ENVELOPE_AAD + b"\x03" + device)
    n = int.from_bytes(padded[:4], "big")
    inner = padded[4 : 4 + n]
    sender = e["sender"].encode()
    assert inner[:4 + len(sender)] == len(sender).to_bytes(4, "big") + sender
    assert not any(padded[4 + n :])


if __name__ == "__main__":
    PQ_FILE.write_text(json.dumps(generate(), indent=2) + "\n")
    print(f"wrote {PQ_FILE}")
