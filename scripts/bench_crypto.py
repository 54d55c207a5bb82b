"""What post-quantum costs a message: CPU and bytes, classical and post-quantum side by side.

`scripts/bench crypto`. Pure keyvault (no relay, no I/O): the same conversation is run
with X3DH + the classical ratchet + version 2 envelopes, and with PQXDH + the
post-quantum ratchet + version 3 envelopes, alternating rounds so that both see the same
machine. Reported per message, for the sender (ratchet encrypt + payload + seal) and the
recipient (open + verify + ratchet decrypt):

- first: the first message of a session (X3DH or PQXDH on both sides, ratchet set-up);
- step: a reply, which carries a DH ratchet step (and, post-quantum, a KEM step);
- same: a message in the same direction as the last one (no step).

Bytes are the envelope sizes the relay sees, for a 100-byte message.

And what one group message costs its sender (groups are pairwise fan-out: one envelope per
member device, node/groups.py): sealing one 100-byte message for 10 and for 100 members
(one device each, sessions established, post-quantum), CPU and bytes.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from keyvault import ratchet
from keyvault.envelope import Sealed, open_envelope, seal, seal_hybrid, verify_sealed
from keyvault.kem import KemKey, KemUse, new_kem_key
from keyvault.keys import AccountKeys
from keyvault.letter import Letter, decode_letter, encode_letter
from keyvault.payload import KemInit, Payload, PrekeyInit, decode_payload, encode_payload
from keyvault.prekeys import new_one_time_prekeys, new_signed_prekey
from keyvault.x3dh import KemPrekey, PrekeyBundle, initiate, respond

A_DEV, B_DEV = b"A" * 16, b"B" * 16
BODY = "x" * 100


class Side:
    def __init__(self, name: str, device: bytes, keys: AccountKeys, pq: bool) -> None:
        self.name, self.device, self.keys, self.pq = name, device, keys, pq
        self.state: ratchet.RatchetState | None = None
        self.ad = b""
        self.init: PrekeyInit | None = None
        self.envelope: KemKey | None = new_kem_key(keys, KemUse.ENVELOPE, 9, 0, device_id=device) if pq else None

    def seal_to(self, peer: Side, text: str) -> bytes:
        assert self.state is not None
        letter = encode_letter(Letter(to=peer.name, msg_id=b"m" * 16, sent_at=0, body=text))
        self.state, message = ratchet.encrypt(self.state, letter, self.ad)
        init = None if self.state.established else self.init
        payload = encode_payload(Payload(init, message))
        sealed = Sealed(self.name, self.device, payload)
        if peer.envelope is None:
            return seal(sealed, self.keys, peer.keys.public().enc, peer.device)
        return seal_hybrid(sealed, self.keys, peer.keys.public().enc, peer.device, peer.envelope.public,
                           peer.envelope.key_id)

    def open_from(self, sender: Side, blob: bytes) -> str:
        unverified = open_envelope(blob, self.keys, self.device, self.envelope)
        sealed = verify_sealed(unverified, sender.keys.public().identity)
        p = decode_payload(sealed.payload)
        assert self.state is not None
        self.state, plain = ratchet.decrypt(self.state, p.ratchet, self.ad)
        return decode_letter(plain).body


def first_contact(a: Side, b: Side, text: str) -> tuple[bytes, float, float]:
    """A starts a session with B (B's prekeys made beforehand, not timed): the envelope,
    A's and B's CPU seconds."""
    spk = new_signed_prekey(b.keys, 1, 0)
    (opk,) = new_one_time_prekeys(2, 1)
    kem = new_kem_key(b.keys, KemUse.ONE_TIME, 3, 0, device_id=b.device) if b.pq else None
    t0 = time.process_time()
    bundle = PrekeyBundle(
        b.keys.public().identity, b.keys.public().dh, spk.key_id, spk.public, spk.signature, opk.key_id, opk.public,
        None if kem is None else KemPrekey(KemUse.ONE_TIME, kem.key_id, kem.public, kem.signature),
    )
    x = initiate(a.keys, bundle, me_name=a.name, me_device=a.device, them_name=b.name, them_device=b.device)
    a.state, a.ad = ratchet.init_initiator(x, spk.public), x.associated_data
    a.init = PrekeyInit(a.keys.public().dh, x.ephemeral, spk.key_id, opk.key_id,
                        None if kem is None else KemInit(KemUse.ONE_TIME, kem.key_id, x.kem_ciphertext))
    blob = a.seal_to(b, text)
    t1 = time.process_time()
    unverified = open_envelope(blob, b.keys, b.device, b.envelope)
    sealed = verify_sealed(unverified, a.keys.public().identity)
    p = decode_payload(sealed.payload)
    assert p.init is not None
    y = respond(b.keys, spk, opk, their_identity_dh=p.init.identity_dh, their_ephemeral=p.init.ephemeral,
                me_name=b.name, me_device=b.device, them_name=a.name, them_device=a.device,
                kem=kem, kem_ciphertext=None if p.init.kem is None else p.init.kem.ciphertext)
    b.state, b.ad = ratchet.init_responder(y, (spk.private, spk.public)), y.associated_data
    b.state, plain = ratchet.decrypt(b.state, p.ratchet, b.ad)
    t2 = time.process_time()
    assert decode_letter(plain).body == text
    return blob, t1 - t0, t2 - t1


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.process_time()
    out = fn()
    return out, time.process_time() - t0


def one_round(pq: bool, alice: AccountKeys, bob: AccountKeys, out: dict[str, dict[str, list[float]]]) -> None:
    a, b = Side("alice", A_DEV, alice, pq), Side("bob", B_DEV, bob, pq)

    def note(kind: str, blob: bytes, send_s: float, open_s: float) -> None:
        row = out.setdefault(kind, {"send_us": [], "open_us": [], "bytes": []})
        row["send_us"].append(send_s * 1e6)
        row["open_us"].append(open_s * 1e6)
        row["bytes"].append(float(len(blob)))

    blob, s, o = first_contact(a, b, BODY)
    note("first", blob, s, o)
    for _ in range(5):  # a conversation: each reply steps the ratchet, then one more without
        for x, y in ((b, a), (a, b)):
            blob, s = timed(lambda x=x, y=y: x.seal_to(y, BODY))
            body, o = timed(lambda x=x, y=y, blob=blob: y.open_from(x, blob))
            assert body == BODY
            note("step", blob, s, o)
            blob, s = timed(lambda x=x, y=y: x.seal_to(y, BODY))
            body, o = timed(lambda x=x, y=y, blob=blob: y.open_from(x, blob))
            note("same", blob, s, o)


def group_cost(members: int, keys: AccountKeys, other: AccountKeys, rounds: int = 3) -> dict[str, float]:
    """CPU ms and bytes of sealing one message for ``members`` member devices."""
    sender = Side("alice", A_DEV, keys, True)
    peers = [Side("bob", i.to_bytes(16, "big"), other, True) for i in range(members)]
    senders = []
    for peer in peers:  # one session per member device, answered (established)
        me = Side("alice", A_DEV, keys, True)
        me.envelope = sender.envelope
        first_contact(me, peer, BODY)
        me.open_from(peer, peer.seal_to(me, BODY))
        senders.append(me)
    best = float("inf")
    size = 0
    for _ in range(rounds):
        t0 = time.process_time()
        blobs = [me.seal_to(peer, BODY) for me, peer in zip(senders, peers, strict=True)]
        best = min(best, time.process_time() - t0)
        size = sum(len(b) for b in blobs)
    return {"members": members, "envelopes": members, "bytes": size, "cpu_ms": round(best * 1e3, 1)}


def run(rounds: int = 30) -> dict[str, Any]:
    alice, bob = AccountKeys.generate(), AccountKeys.generate()
    data: dict[str, dict[str, dict[str, list[float]]]] = {"classic": {}, "pq": {}}
    for i in range(rounds):
        for pq in ((False, True) if i % 2 else (True, False)):
            one_round(pq, alice, bob, data["pq" if pq else "classic"])
    report: dict[str, Any] = {"rounds": rounds, "body_bytes": len(BODY)}
    for mode, kinds in data.items():
        report[mode] = {
            kind: {k: round(statistics.median(v), 1) if k != "bytes" else int(v[0]) for k, v in row.items()}
            for kind, row in kinds.items()
        }
    for kind in ("first", "step", "same"):
        c, p = report["classic"][kind], report["pq"][kind]
        report.setdefault("ratio_cpu", {})[kind] = round((p["send_us"] + p["open_us"]) / (c["send_us"] + c["open_us"]), 2)
        report.setdefault("extra_bytes", {})[kind] = p["bytes"] - c["bytes"]
    report["group"] = [group_cost(n, alice, bob) for n in (10, 100)]
    return report


def main() -> None:
    report = run()
    for mode in ("classic", "pq"):
        for kind, row in report[mode].items():
            print(f"{mode:8} {kind:6} send {row['send_us']:>8} us  open {row['open_us']:>8} us  envelope {row['bytes']:>6} B")
    print("ratio (post-quantum / classical CPU per message, send + open): "
          + ", ".join(f"{k} {v}" for k, v in report["ratio_cpu"].items()))
    print("extra envelope bytes: " + ", ".join(f"{k} {v}" for k, v in report["extra_bytes"].items()))
    for g in report["group"]:
        print(f"group message to {g['members']} members: {g['envelopes']} envelopes, {g['bytes']} bytes,"
              f" {g['cpu_ms']} ms of the sender's CPU")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
