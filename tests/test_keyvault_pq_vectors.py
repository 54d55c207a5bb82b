"""Known-answer tests for the post-quantum pieces, against tests/vectors/pq_vectors.json:
ML-KEM-768 keys and their signatures, a decapsulation, the PQXDH derivation, a PQXDH first
message's payload header and a version 3 (hybrid) envelope.

The vectors also hold three messages of a post-quantum ratchet (its first KEM steps).
ML-KEM encapsulation and RSA-OAEP are randomised, so the generator
(``python -m tests.test_keyvault_pq_vectors``) keeps the ciphertexts and the envelope
already in the file (they depend only on the seeds and the stored account): only a
deliberate format change changes the file. Each test recomputes what it can
independently (the signatures with Ed25519, HKDF by hand, RSA-OAEP and AES-GCM directly);
ML-KEM itself is checked by decapsulation only (no second implementation here).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyvault import kem, labels, ratchet
from keyvault.envelope import Sealed, open_envelope, seal_hybrid, verify_sealed
from keyvault.keys import AccountKeys
from keyvault.payload import KemInit, Payload, PrekeyInit, encode_payload
from keyvault.prekeys import new_one_time_prekeys, new_signed_prekey, x25519_pair
from keyvault.x3dh import KemPrekey, X3DHResult, initiate, respond
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
#: The device each KEM key is signed for: all three are bob's device's (the PQXDH
#: responder's, DEVICES[1]; the envelope's recipient device is DEVICES[1] too).
KEM_DEVICE = DEVICES[1]
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
    return kem.new_kem_key(bob, use, KEM_IDS[name], CREATED_AT, device_id=KEM_DEVICE, seed=KEM_SEEDS[name])


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


RATCHET_ROOT, RATCHET_HKA, RATCHET_NHKB = _b(150), _b(151), _b(152)
RATCHET_AD = b"veil/test/pq-ratchet-vector"
RATCHET_SPK = _b(153)
#: (sender, plaintext, ratchet private key, ratchet KEM seed) in order; each delivered at once.
RATCHET_SCRIPT = [("alice", b"a1", _b(160), _b(170, 64)), ("bob", b"b1", _b(161), _b(171, 64)),
                  ("alice", b"a2", _b(162), _b(172, 64))]


def _pq_conversation(cts: list[bytes] | None) -> dict[str, Any]:
    """Three messages of a post-quantum ratchet; ``cts``: the stored KEM ciphertexts of
    the two KEM steps (None: fresh ones)."""
    a = X3DHResult(RATCHET_ROOT, RATCHET_HKA, RATCHET_NHKB, RATCHET_AD, ephemeral=_b(154), post_quantum=True)
    b = X3DHResult(RATCHET_ROOT, RATCHET_NHKB, RATCHET_HKA, RATCHET_AD, ephemeral=b"", post_quantum=True)
    spk = x25519_pair(RATCHET_SPK)
    states = {"alice": ratchet.init_initiator(a, spk[1], dh_private=RATCHET_SCRIPT[0][2], kem_seed=RATCHET_SCRIPT[0][3]),
              "bob": ratchet.init_responder(b, spk)}
    seeds = {"alice": RATCHET_SCRIPT[0][3]}
    steps, messages, used = [], [], list(cts or [])
    for i, (sender, text, dh, seed) in enumerate(RATCHET_SCRIPT):
        peer = "bob" if sender == "alice" else "alice"
        st = states[sender]
        encapsulation = None
        if i:
            assert st.kemr is not None
            ct = used.pop(0) if cts else kem.encapsulate(st.kemr)[1]
            encapsulation = (kem.decapsulate(seeds[peer], ct), ct)
            steps.append({"ciphertext": ct.hex(), "kem_secret": encapsulation[0].hex()})
            seeds[sender] = seed
        states[sender], m = ratchet.encrypt(st, text, RATCHET_AD, dh_private=dh, kem_seed=seed,
                                            kem_encapsulation=encapsulation)
        states[peer], got = ratchet.decrypt(states[peer], m, RATCHET_AD)
        assert got == text
        messages.append(m.hex())
    return {"root_key": RATCHET_ROOT.hex(), "shared_hka": RATCHET_HKA.hex(), "shared_nhkb": RATCHET_NHKB.hex(),
            "associated_data": RATCHET_AD.hex(), "spk_private": RATCHET_SPK.hex(),
            "script": [{"sender": s_, "plaintext": t.hex(), "dh_private": d.hex(), "kem_seed": k.hex()}
                       for s_, t, d, k in RATCHET_SCRIPT],
            "kem_steps": steps, "messages": messages}


def generate() -> dict[str, Any]:
    old = _load(PQ_FILE) if PQ_FILE.exists() else {}
    bob = account(X3DH_INPUT["bob_identity_seed"], X3DH_INPUT["bob_dh_private"])
    keys = {name: _kem_key(bob, name) for name in KEM_SEEDS}
    kem_keys = {
        name: {"use": int(k.use), "key_id": k.key_id, "device_id": KEM_DEVICE.hex(), "seed": k.seed.hex(),
               "public": k.public.hex(), "signature": k.signature.hex(), "serialised": k.to_bytes().hex()}
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
    old_cts = [bytes.fromhex(x["ciphertext"]) for x in old["ratchet"]["kem_steps"]] if "ratchet" in old else None
    return {
        "ratchet": _pq_conversation(old_cts),
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
        assert c["device_id"] == KEM_DEVICE.hex()
        signed = (labels.KEM_KEY_SIGNATURE + bytes([c["use"]]) + c["key_id"].to_bytes(4, "big")
                  + bytes.fromhex(c["device_id"]) + bytes.fromhex(c["public"]))
        identity.verify(bytes.fromhex(c["signature"]), signed)
        use, public, sig = kem.KemUse(c["use"]), bytes.fromhex(c["public"]), bytes.fromhex(c["signature"])
        assert kem.verify_kem_key(bob.public().identity, use, c["key_id"], public, sig, device_id=KEM_DEVICE)
        # Signed for bob's device only: not for alice's (nor any other).
        assert not kem.verify_kem_key(bob.public().identity, use, c["key_id"], public, sig, device_id=DEVICES[0])
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


def test_pq_ratchet_conversation() -> None:
    v = _load(PQ_FILE)["ratchet"]
    cts = [bytes.fromhex(x["ciphertext"]) for x in v["kem_steps"]]
    assert _pq_conversation(cts) == v
    m = [bytes.fromhex(x) for x in v["messages"]]
    assert [x[0] for x in m] == [ratchet.PQ_VERSION, ratchet.PQ_CT_VERSION, ratchet.PQ_CT_VERSION]
    # By hand: bob's chain (the first KEM step) from the root after alice's first chain.
    spk_pub = _x25519_public(RATCHET_SPK)
    a0, b1 = RATCHET_SCRIPT[0][2], RATCHET_SCRIPT[1][2]
    okm = _hkdf(RATCHET_ROOT, _x25519(a0, spk_pub), labels.RATCHET_ROOT, 96)
    rk1 = okm[:32]
    ss = bytes.fromhex(v["kem_steps"][0]["kem_secret"])
    okm = _hkdf(rk1, _x25519(b1, _x25519_public(a0)) + ss, labels.RATCHET_ROOT_KEM, 96)
    ck = okm[32:64]
    mk = hmac.new(ck, b"\x01", hashlib.sha256).digest()
    keys = _hkdf(b"", mk, labels.RATCHET_MESSAGE, 56)
    header_len = 40 + 1184 + 1088
    enc_header = m[1][1 : 1 + 12 + header_len + 16]
    header = AESGCM(RATCHET_NHKB).decrypt(enc_header[:12], enc_header[12:], labels.RATCHET_HEADER_AAD + b"\x03")
    assert header[:32] == _x25519_public(b1) and header[40 + 1184 :].hex() == v["kem_steps"][0]["ciphertext"]
    assert enc_header[:12] == keys[44:56]
    prefix = m[1][: 1 + 12 + header_len + 16]
    body = AESGCM(keys[:32]).decrypt(keys[32:44], m[1][len(prefix):],
                                     len(RATCHET_AD).to_bytes(4, "big") + RATCHET_AD + prefix)
    assert body == b"b1"  # bob's first header key is shared_nhkb


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
