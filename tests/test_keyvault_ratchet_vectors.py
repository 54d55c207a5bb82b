"""Known-answer tests for prekeys, X3DH and the ratchet, against tests/vectors/ratchet_*.json.

The vectors pin the formats and derivations a second client must reproduce. They were made
by keyvault itself (``python -m tests.test_keyvault_ratchet_vectors`` rewrites the files:
do that only for a deliberate format change), so each test here also recomputes what it can
independently: HKDF (RFC 5869) and KDF_CK with hmac/hashlib, the AEADs with AESGCM
directly, and the first messages of the conversation entirely by hand.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyvault import labels, ratchet
from keyvault.prekeys import new_one_time_prekeys, new_signed_prekey
from keyvault.ratchet import RatchetState
from keyvault.x3dh import X3DHResult, initiate, respond
from tests.test_keyvault_x3dh import account, bundle_of

VECTORS = Path(__file__).parent / "vectors"
KDF_FILE = VECTORS / "ratchet_kdf.json"
HEADER_FILE = VECTORS / "ratchet_header.json"
X3DH_FILE = VECTORS / "ratchet_x3dh.json"
CONVERSATION_FILE = VECTORS / "ratchet_conversation.json"


def _b(n: int, length: int = 32) -> bytes:
    return bytes((n + i) % 256 for i in range(length))


X3DH_INPUT = {
    "alice_identity_seed": _b(1),
    "alice_dh_private": _b(2),
    "bob_identity_seed": _b(3),
    "bob_dh_private": _b(4),
    "spk_private": _b(5),
    "opk_private": _b(6),
    "ephemeral_private": _b(7),
}
SPK_ID, OPK_ID, CREATED_AT = 7, 1001, 1_700_000_000
NAMES = ("alice", "bob")
DEVICES = (bytes([0xA1]) * 16, bytes([0xB1]) * 16)

# The conversation: ("send", sender, plaintext, new ratchet private key or None) or
# ("deliver", index of the message). The first key is the one init_initiator takes.
SCRIPT: list[tuple[Any, ...]] = [
    ("send", "alice", "Hello Bob", _b(100)),  # 0: A1 n=0
    ("send", "alice", "are you there?", None),  # 1: A1 n=1
    ("deliver", 1),  # out of order: Bob's first message is n=1
    ("deliver", 0),  # from the skipped store
    ("send", "bob", "Hi Alice \u00e9", _b(101)),  # 2: B1 n=0, PN=0 (DH ratchet step)
    ("send", "bob", "yes", None),  # 3: B1 n=1
    ("deliver", 3),
    ("send", "alice", "a new chain", _b(102)),  # 4: A2 n=0, PN=2
    ("deliver", 4),
    ("deliver", 2),  # a skipped key of a finished chain
    ("send", "bob", "", _b(103)),  # 5: B2 n=0, PN=2, empty plaintext
    ("deliver", 5),
]


def _hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    # RFC 5869 by hand; an empty salt means HashLen zero bytes.
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def _x25519(private: bytes, public: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(public)
    )


def _x25519_public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def _load(path: Path) -> Any:
    return json.loads(path.read_text())


# Generation (run once; see the module docstring) -------------------------------------------


def _x3dh_case(with_opk: bool) -> tuple[dict[str, Any], X3DHResult, X3DHResult]:
    i = X3DH_INPUT
    alice = account(i["alice_identity_seed"], i["alice_dh_private"])
    bob = account(i["bob_identity_seed"], i["bob_dh_private"])
    spk = new_signed_prekey(bob, SPK_ID, CREATED_AT, private=i["spk_private"])
    opk = new_one_time_prekeys(OPK_ID, 1, privates=[i["opk_private"]])[0] if with_opk else None
    xa = initiate(
        alice,
        bundle_of(bob, spk, opk),
        me_name=NAMES[0],
        me_device=DEVICES[0],
        them_name=NAMES[1],
        them_device=DEVICES[1],
        ephemeral_private=i["ephemeral_private"],
    )
    xb = respond(
        bob,
        spk,
        opk,
        their_identity_dh=alice.public().dh,
        their_ephemeral=xa.ephemeral,
        me_name=NAMES[1],
        me_device=DEVICES[1],
        them_name=NAMES[0],
        them_device=DEVICES[0],
    )
    case = {
        "with_opk": with_opk,
        "alice_identity": alice.public().identity.hex(),
        "alice_dh": alice.public().dh.hex(),
        "bob_identity": bob.public().identity.hex(),
        "bob_dh": bob.public().dh.hex(),
        "spk_public": spk.public.hex(),
        "spk_signature": spk.signature.hex(),
        "signed_prekey_bytes": spk.to_bytes().hex(),
        "ephemeral_public": xa.ephemeral.hex(),
        "root_key": xa.root_key.hex(),
        "shared_hka": xa.header_key_send.hex(),
        "shared_nhkb": xa.next_header_key_recv.hex(),
        "associated_data": xa.associated_data.hex(),
    }
    return case, xa, xb


def _conversation(xa: X3DHResult, xb: X3DHResult) -> tuple[list[dict[str, Any]], dict[str, str]]:
    spk_private = X3DH_INPUT["spk_private"]
    spk = (spk_private, _x25519_public(spk_private))
    states = {
        "alice": ratchet.init_initiator(xa, spk[1], dh_private=SCRIPT[0][3]),
        "bob": ratchet.init_responder(xb, spk),
    }
    ad = xa.associated_data
    events: list[dict[str, Any]] = []
    sent: list[tuple[str, bytes, str]] = []
    for step in SCRIPT:
        if step[0] == "send":
            _, who, text, dh = step
            states[who], m = ratchet.encrypt(states[who], text.encode(), ad, dh_private=dh)
            sent.append((who, m, text))
            events.append(
                {
                    "op": "send",
                    "from": who,
                    "plaintext": text,
                    "dh_private": None if dh is None else dh.hex(),
                    "message": m.hex(),
                }
            )
        else:
            index = step[1]
            who, m, text = sent[index]
            to = "bob" if who == "alice" else "alice"
            states[to], p = ratchet.decrypt(states[to], m, ad)
            assert p == text.encode()
            events.append({"op": "deliver", "message_index": index, "to": to})
    return events, {k: v.to_bytes().hex() for k, v in states.items()}


def generate() -> dict[Path, Any]:
    """Compute every vector with keyvault."""
    dh_out = _x25519(_b(50), _x25519_public(_b(60)))
    kdf = {
        "kdf_rk": [
            dict(
                zip(
                    ("root_key", "chain_key", "next_header_key"), ratchet.kdf_rk(rk, d), strict=True
                )
            )
            | {"rk": rk, "dh_out": d}
            for rk, d in [(_b(10), _b(20)), (_b(30), dh_out)]
        ],
        "kdf_ck": [
            dict(zip(("next_chain_key", "message_key"), ratchet.kdf_ck(ck), strict=True))
            | {"ck": ck}
            for ck in (_b(40), bytes(32))
        ],
        "message_keys": [
            dict(
                zip(
                    ("aes_key", "body_nonce", "header_nonce"), ratchet.message_keys(mk), strict=True
                )
            )
            | {"mk": mk}
            for mk in (_b(70), bytes(32))
        ],
    }
    kdf = {k: [{n: b.hex() for n, b in case.items()} for case in v] for k, v in kdf.items()}
    header_cases = []
    for hk, nonce, dh, pn, n in [
        (_b(80), _b(90, 12), _b(91), 0, 0),
        (_b(81), _b(92, 12), _b(93), 2**32 - 1, 12345),
    ]:
        header = ratchet.encode_header(dh, pn, n)
        header_cases.append(
            {
                "hk": hk.hex(),
                "nonce": nonce.hex(),
                "dh_public": dh.hex(),
                "pn": pn,
                "n": n,
                "header": header.hex(),
                "enc_header": ratchet.encrypt_header(hk, header, nonce).hex(),
            }
        )
    x3dh_cases = []
    for with_opk in (True, False):
        case, xa, xb = _x3dh_case(with_opk)
        x3dh_cases.append(case)
        if with_opk:
            events, final = _conversation(xa, xb)
    inputs = {k: v.hex() for k, v in X3DH_INPUT.items()} | {
        "spk_id": SPK_ID,
        "opk_id": OPK_ID,
        "created_at": CREATED_AT,
        "names": list(NAMES),
        "devices": [d.hex() for d in DEVICES],
    }
    return {
        KDF_FILE: kdf,
        HEADER_FILE: {
            "header_aad": (labels.RATCHET_HEADER_AAD + b"\x01").hex(),
            "cases": header_cases,
        },
        X3DH_FILE: {"inputs": inputs, "cases": x3dh_cases},
        CONVERSATION_FILE: {
            "x3dh": "the with_opk case of ratchet_x3dh.json",
            "ad": "that case's associated_data",
            "events": events,
            "final_states": final,
        },
    }


# Tests ------------------------------------------------------------------------------------


def test_kdf_rk() -> None:
    for c in _load(KDF_FILE)["kdf_rk"]:
        rk, dh_out = bytes.fromhex(c["rk"]), bytes.fromhex(c["dh_out"])
        expected = (c["root_key"], c["chain_key"], c["next_header_key"])
        assert tuple(x.hex() for x in ratchet.kdf_rk(rk, dh_out)) == expected
        by_hand = _hkdf(rk, dh_out, labels.RATCHET_ROOT, 96)
        assert (by_hand[:32].hex(), by_hand[32:64].hex(), by_hand[64:].hex()) == expected


def test_kdf_ck() -> None:
    for c in _load(KDF_FILE)["kdf_ck"]:
        ck = bytes.fromhex(c["ck"])
        assert [x.hex() for x in ratchet.kdf_ck(ck)] == [c["next_chain_key"], c["message_key"]]
        assert hmac.new(ck, b"\x01", hashlib.sha256).hexdigest() == c["message_key"]
        assert hmac.new(ck, b"\x02", hashlib.sha256).hexdigest() == c["next_chain_key"]


def test_message_keys() -> None:
    for c in _load(KDF_FILE)["message_keys"]:
        mk = bytes.fromhex(c["mk"])
        expected = [c["aes_key"], c["body_nonce"], c["header_nonce"]]
        assert [x.hex() for x in ratchet.message_keys(mk)] == expected
        by_hand = _hkdf(b"", mk, labels.RATCHET_MESSAGE, 56)
        assert [by_hand[:32].hex(), by_hand[32:44].hex(), by_hand[44:].hex()] == expected


def test_header_encryption() -> None:
    v = _load(HEADER_FILE)
    aad = bytes.fromhex(v["header_aad"])
    assert aad == labels.RATCHET_HEADER_AAD + bytes([ratchet.VERSION])
    for c in v["cases"]:
        hk, nonce = bytes.fromhex(c["hk"]), bytes.fromhex(c["nonce"])
        header = bytes.fromhex(c["header"])
        assert header == bytes.fromhex(c["dh_public"]) + c["pn"].to_bytes(4, "big") + c[
            "n"
        ].to_bytes(4, "big")
        assert ratchet.encode_header(bytes.fromhex(c["dh_public"]), c["pn"], c["n"]) == header
        enc = bytes.fromhex(c["enc_header"])
        assert len(enc) == ratchet.ENC_HEADER_LEN
        assert ratchet.encrypt_header(hk, header, nonce) == enc
        assert enc == nonce + AESGCM(hk).encrypt(nonce, header, aad)
        assert ratchet.decrypt_header(hk, enc) == (header[:32], c["pn"], c["n"])
        assert ratchet.decrypt_header(bytes(32), enc) is None


@pytest.mark.parametrize("index", [0, 1])
def test_x3dh(index: int) -> None:
    v = _load(X3DH_FILE)
    i, c = v["inputs"], v["cases"][index]
    assert {k: bytes.fromhex(i[k]) for k in X3DH_INPUT} == X3DH_INPUT
    case, _, xb = _x3dh_case(c["with_opk"])
    assert case == c
    assert xb.root_key.hex() == c["root_key"]
    # Independently: the signature, the four DHs, SK and its split.
    Ed25519PublicKey.from_public_bytes(bytes.fromhex(c["bob_identity"])).verify(
        bytes.fromhex(c["spk_signature"]),
        labels.PREKEY_SIGNATURE + SPK_ID.to_bytes(4, "big") + bytes.fromhex(c["spk_public"]),
    )
    ik_a, ek_a = bytes.fromhex(i["alice_dh_private"]), bytes.fromhex(i["ephemeral_private"])
    km = (
        _x25519(ik_a, bytes.fromhex(c["spk_public"]))
        + _x25519(ek_a, bytes.fromhex(c["bob_dh"]))
        + _x25519(ek_a, bytes.fromhex(c["spk_public"]))
    )
    if c["with_opk"]:
        km += _x25519(ek_a, _x25519_public(bytes.fromhex(i["opk_private"])))
    sk = _hkdf(b"", b"\xff" * 32 + km, labels.X3DH_SK, 32)
    assert _hkdf(b"", sk, labels.X3DH_ROOT, 32).hex() == c["root_key"]
    assert _hkdf(b"", sk, labels.X3DH_HEADER_A, 32).hex() == c["shared_hka"]
    assert _hkdf(b"", sk, labels.X3DH_HEADER_B, 32).hex() == c["shared_nhkb"]
    ad = (
        labels.X3DH_AD
        + bytes.fromhex(c["alice_dh"])
        + bytes.fromhex(c["bob_dh"])
        + b"".join(
            len(x).to_bytes(4, "big") + x for x in (b"alice", DEVICES[0], b"bob", DEVICES[1])
        )
    )
    assert ad.hex() == c["associated_data"]


def test_conversation_replays_exactly() -> None:
    _, xa, xb = _x3dh_case(True)
    events, final = _conversation(xa, xb)
    v = _load(CONVERSATION_FILE)
    assert events == v["events"]
    assert final == v["final_states"]
    for raw in final.values():
        assert RatchetState.from_bytes(bytes.fromhex(raw)).to_bytes().hex() == raw


def test_conversation_by_hand() -> None:
    """Open Alice's first message and Bob's first reply with nothing but the primitives."""
    x = _load(X3DH_FILE)["cases"][0]
    events = _load(CONVERSATION_FILE)["events"]
    sends = [e for e in events if e["op"] == "send"]
    root, hka, nhkb = (bytes.fromhex(x[k]) for k in ("root_key", "shared_hka", "shared_nhkb"))
    ad = bytes.fromhex(x["associated_data"])
    spk_priv = bytes.fromhex(_load(X3DH_FILE)["inputs"]["spk_private"])
    spk_pub = bytes.fromhex(x["spk_public"])

    def open_message(m: bytes, hk: bytes, ck: bytes) -> tuple[bytes, bytes, int, int, bytes]:
        mk = hmac.new(ck, b"\x01", hashlib.sha256).digest()
        okm = _hkdf(b"", mk, labels.RATCHET_MESSAGE, 56)
        assert m[0] == 1
        nonce = m[1:13]
        assert nonce == okm[44:56]  # the header nonce comes from the message key
        header = AESGCM(hk).decrypt(nonce, m[13:69], labels.RATCHET_HEADER_AAD + b"\x01")
        aad = len(ad).to_bytes(4, "big") + ad + m[:69]
        body = AESGCM(okm[:32]).decrypt(okm[32:44], m[69:], aad)
        return (
            header[:32],
            body,
            int.from_bytes(header[32:36], "big"),
            int.from_bytes(header[36:40], "big"),
            hmac.new(ck, b"\x02", hashlib.sha256).digest(),
        )

    # Alice's first message: RatchetInitAliceHE, then KDF_CK once.
    a1_priv = bytes.fromhex(sends[0]["dh_private"])
    okm = _hkdf(root, _x25519(a1_priv, spk_pub), labels.RATCHET_ROOT, 96)
    rk1, cks_a = okm[:32], okm[32:64]
    dh, body, pn, n, cks_a = open_message(bytes.fromhex(sends[0]["message"]), hka, cks_a)
    assert (dh, body, pn, n) == (_x25519_public(a1_priv), b"Hello Bob", 0, 0)
    dh, body, pn, n, _ = open_message(bytes.fromhex(sends[1]["message"]), hka, cks_a)
    assert (body, pn, n) == (b"are you there?", 0, 1)

    # Bob's first reply: the DH ratchet step on receipt (RK1 as above, with Bob's side of
    # the DH), then the sending half with his new key; his header key is shared_nhkb.
    assert _hkdf(root, _x25519(spk_priv, dh), labels.RATCHET_ROOT, 96)[:32] == rk1
    b1_priv = bytes.fromhex(sends[2]["dh_private"])
    okm = _hkdf(rk1, _x25519(b1_priv, dh), labels.RATCHET_ROOT, 96)
    dh_b, body, pn, n, _ = open_message(bytes.fromhex(sends[2]["message"]), nhkb, okm[32:64])
    assert (dh_b, body, pn, n) == (_x25519_public(b1_priv), "Hi Alice \u00e9".encode(), 0, 0)


if __name__ == "__main__":
    for path, data in generate().items():
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {path}")
