"""Ratchet sessions with other devices: X3DH to start one, the Double Ratchet after.

Every pair of devices has its own session, kept in the device store. Sending to a device
without a session claims one of its prekey bundles from the relay and starts one as the
initiator; the X3DH data rides along with each message until the peer has answered.
Receiving tries this device's sessions with the sender's device (newest first); a
message that none of them opens but that carries X3DH data starts a responder session.

Everything here is synchronous and commits nothing by itself: ``encrypt`` saves the new
session state through the store inside the caller's transaction (the same one that puts
the envelope in the outbox, so a state is never reused), and ``decrypt`` returns a
``commit`` to call in the transaction that stores the message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import wire
from keyvault import ratchet
from keyvault.errors import DecryptionFailed
from keyvault.kem import CIPHERTEXT_LEN, KemKey, KemUse, new_kem_key
from keyvault.keys import AccountKeys
from keyvault.payload import KemInit, Payload, PrekeyInit, decode_payload, encode_payload
from keyvault.prekeys import OneTimePrekey, SignedPrekey, new_one_time_prekeys, new_signed_prekey
from keyvault.x3dh import KemPrekey, PrekeyBundle, initiate, respond
from node.errors import Downgrade
from node.store import NodeStore, SessionRow

ONE_TIME_STOCK = wire.MAX_ONE_TIME_PREKEYS  # 100 one-time prekeys published per device
REFILL_BELOW = 20
KEM_ONE_TIME_STOCK = wire.MAX_KEM_ONE_TIME_PREKEYS  # 50 one-time KEM prekeys (1.2 KiB each)
KEM_REFILL_BELOW = 10
ROTATE_SIGNED_AFTER = 7 * 86400  # a new signed prekey (and last-resort KEM prekey) every week
KEEP_RETIRED_SIGNED = 30 * 86400  # old ones still open late first messages for a month
# The first signed prekey published with this device's KEM prekeys: a bundle with it or a
# later one always held a KEM prekey, so a first message naming it without PQXDH is a
# downgrade (from a device known to have PQ keys). Below it: bundles from before.
PQ_SINCE_SPK = "pq_since_spk"


@dataclass(frozen=True)
class PrekeysDue:
    """What a device should publish now (see Sessions.prekeys_due)."""

    signed: bool = False
    one_time: int = 0
    kem_one_time: int = 0
    kem_last_resort: bool = False
    envelope_key: bool = False  # publish it (a new one, or ours again if the relay lost it)

    def __bool__(self) -> bool:
        return bool(self.signed or self.one_time or self.kem_one_time or self.kem_last_resort or self.envelope_key)


@dataclass(frozen=True)
class Peer:
    """Who a session is with: an account and one of its devices, with the keys we pinned."""

    name: str
    device_id: bytes
    identity: bytes  # Ed25519 identity public key (verifies prekey signatures)
    identity_dh: bytes  # X25519 identity public key (X3DH)
    envelope_key: tuple[int, bytes] | None = None  # (key id, ML-KEM public) if it has one


def _init_bytes(init: PrekeyInit) -> bytes:
    """How a session keeps the X3DH data it attaches until the peer answers (73 bytes;
    PQXDH's part follows: use, key id, ciphertext)."""
    opk = b"\x00" * 5 if init.opk_id is None else b"\x01" + init.opk_id.to_bytes(4, "big")
    out = init.identity_dh + init.ephemeral + init.spk_id.to_bytes(4, "big") + opk
    if init.kem is not None:
        out += bytes([int(init.kem.use)]) + init.kem.key_id.to_bytes(4, "big") + init.kem.ciphertext
    return out


def _init_from(data: bytes) -> PrekeyInit:
    opk_id = int.from_bytes(data[69:73], "big") if data[68] else None
    kem = None
    if len(data) == 73 + 5 + CIPHERTEXT_LEN:
        kem = KemInit(KemUse(data[73]), int.from_bytes(data[74:78], "big"), data[78:])
    return PrekeyInit(data[:32], data[32:64], int.from_bytes(data[64:68], "big"), opk_id, kem)


class Sessions:
    """Session state of one device, in its store."""

    def __init__(self, store: NodeStore, keys: AccountKeys, name: str, device_id: bytes) -> None:
        self.store = store
        self.keys = keys
        self.name = name
        self.device_id = device_id

    def has_session(self, peer: str, device_id: bytes) -> bool:
        return bool(self._sending_rows(peer, device_id))

    def _sending_rows(self, peer: str, device_id: bytes) -> list[SessionRow]:
        """The sessions we may send in, newest first. A classical session the peer has
        not answered yet, with a device now known to have PQ keys, is not one: it was set
        up from a stripped bundle, and the peer refuses it (19.6); a new one is started
        (it still opens what the peer sends in it)."""
        rows = self.store.sessions(peer, device_id)
        if rows and self.store.is_post_quantum(peer, device_id):
            rows = [r for r in rows if r.init is None or ratchet.RatchetState.from_bytes(r.state).pq]
        return rows

    # ---- sending ---------------------------------------------------------------------
    def encrypt(self, peer: Peer, plaintext: bytes, bundle: wire.DeviceBundle | None) -> bytes:
        """A payload for ``peer``'s device (call inside the store transaction that also
        stores the envelope). Starts a session from ``bundle`` when there is none."""
        rows = self._sending_rows(peer.name, peer.device_id)
        if rows:
            row = rows[0]
            state, ad, init, sid = ratchet.RatchetState.from_bytes(row.state), row.ad, row.init, row.sid
        else:
            if bundle is None:
                raise ValueError("no session and no prekey bundle")
            kem = None
            if bundle.kem is not None:
                try:
                    use = KemUse(bundle.kem.use)
                except ValueError:
                    use = KemUse.ENVELOPE  # not a prekey's use: the bundle check refuses it
                kem = KemPrekey(use, bundle.kem.key_id, bundle.kem.public, bundle.kem.sig)
            elif self.store.is_post_quantum(peer.name, peer.device_id):
                # The device has published KEM prekeys (its relay keeps a last-resort one):
                # a bundle without one would make a session a quantum computer can open.
                raise Downgrade(
                    f"the relay handed out a device of {peer.name} without its post-quantum prekey"
                )
            x = initiate(
                self.keys,
                PrekeyBundle(peer.identity, peer.identity_dh, bundle.spk_id, bundle.spk, bundle.spk_sig,
                             bundle.opk_id, bundle.opk, kem),
                me_name=self.name, me_device=self.device_id, them_name=peer.name, them_device=peer.device_id,
            )
            if kem is not None:
                self.store.mark_post_quantum(peer.name, peer.device_id)
            state = ratchet.init_initiator(x, bundle.spk)
            ad, sid = x.associated_data, None
            kem_init = None if kem is None else KemInit(kem.use, kem.key_id, x.kem_ciphertext)
            init = _init_bytes(PrekeyInit(self.keys.public().dh, x.ephemeral, bundle.spk_id, bundle.opk_id, kem_init))
        new, message = ratchet.encrypt(state, plaintext, ad)
        keep_init = None if new.established else init
        self.store.save_session(peer.name, peer.device_id, sid, new.to_bytes(), ad, keep_init)
        attach = _init_from(keep_init) if keep_init is not None else None
        return encode_payload(Payload(attach, message))

    # ---- receiving -------------------------------------------------------------------
    def decrypt(
        self, sender: str, sender_device: bytes, payload: bytes, sender_identity_dh: bytes
    ) -> tuple[bytes, Callable[[], None]]:
        """The plaintext and a ``commit`` that saves the session's new state.

        DuplicateMessage for a message already opened; DecryptionFailed otherwise."""
        p = decode_payload(payload)
        for row in self.store.sessions(sender, sender_device):
            state = ratchet.RatchetState.from_bytes(row.state)
            try:
                new, plain = ratchet.decrypt(state, p.ratchet, row.ad)
            except DecryptionFailed:
                continue

            def commit(row_sid: int = row.sid, new: ratchet.RatchetState = new,
                       ad: bytes = row.ad, init: bytes | None = row.init) -> None:
                self.store.save_session(
                    sender, sender_device, row_sid, new.to_bytes(), ad, None if new.established else init
                )

            return plain, commit
        if p.init is None or p.init.identity_dh != sender_identity_dh:
            raise DecryptionFailed()
        spk_blob = self.store.signed_prekey(p.init.spk_id)
        opk_blob = None if p.init.opk_id is None else self.store.one_time_prekey(p.init.opk_id)
        if spk_blob is None or (p.init.opk_id is not None and opk_blob is None):
            raise DecryptionFailed()  # prekeys long gone, used already, or never ours
        kem: KemKey | None = None
        kem_init = p.init.kem
        if kem_init is not None:
            kem_blob = self.store.kem_key(int(kem_init.use), kem_init.key_id)
            if kem_blob is None:
                raise DecryptionFailed()
            kem = KemKey.from_bytes(kem_blob)
        spk = SignedPrekey.from_bytes(spk_blob)
        opk = None if opk_blob is None else OneTimePrekey.from_bytes(opk_blob)
        x = respond(
            self.keys, spk, opk, their_identity_dh=p.init.identity_dh, their_ephemeral=p.init.ephemeral,
            me_name=self.name, me_device=self.device_id, them_name=sender, them_device=sender_device,
            kem=kem, kem_ciphertext=None if kem_init is None else kem_init.ciphertext,
        )
        state = ratchet.init_responder(x, (spk.private, spk.public))
        new, plain = ratchet.decrypt(state, p.ratchet, x.associated_data)
        if kem is None and self.store.is_post_quantum(sender, sender_device):
            # Checked once the message proved itself (a forgery is just undecryptable): a
            # device that has PQ keys, answering a bundle of ours that held a KEM prekey,
            # without PQXDH. Bundles handed out before we published KEM prekeys still open.
            since = self.store.get(PQ_SINCE_SPK)
            if since is not None and p.init.spk_id >= int.from_bytes(since, "big"):
                raise Downgrade(
                    f"refused a new session from a device of {sender} without post-quantum keys,"
                    " which that device has"
                )
        opk_id = p.init.opk_id
        one_time_kem = kem.key_id if kem is not None and kem.use == KemUse.ONE_TIME else None

        def commit_new() -> None:
            self.store.save_session(sender, sender_device, None, new.to_bytes(), x.associated_data, None)
            if opk_id is not None:  # only now: a forged first message cannot burn it
                self.store.delete_one_time_prekey(opk_id)
            if one_time_kem is not None:
                self.store.delete_kem_key(KemUse.ONE_TIME, one_time_kem)
            if kem is not None:
                self.store.mark_post_quantum(sender, sender_device)

        return plain, commit_new

    # ---- our prekeys -------------------------------------------------------------------
    def new_prekeys(self, due: PrekeysDue, *, now: int) -> wire.PrekeySet:
        """Make the prekeys ``due`` asks for, keep their private halves (in the caller's
        transaction), and return the public halves to publish."""
        spub = None
        if due.signed:
            key_id = self.store.next_prekey_ids(1)
            spk = new_signed_prekey(self.keys, key_id, now)
            self.store.add_signed_prekey(key_id, spk.to_bytes(), now)
            self.store.drop_signed_prekeys_retired_before(now - KEEP_RETIRED_SIGNED)
            spub = wire.SignedPrekeyPub(key_id, spk.public, spk.signature)
            if due.kem_last_resort and self.store.get(PQ_SINCE_SPK) is None:
                self.store.put(PQ_SINCE_SPK, key_id.to_bytes(8, "big"))
        opks: list[OneTimePrekey] = []
        if due.one_time:
            opks = new_one_time_prekeys(self.store.next_prekey_ids(due.one_time), due.one_time)
            self.store.add_one_time_prekeys([(k.key_id, k.to_bytes()) for k in opks])
        kems: list[KemKey] = []
        if due.kem_one_time:
            first = self.store.next_prekey_ids(due.kem_one_time)
            kems = [new_kem_key(self.keys, KemUse.ONE_TIME, first + i, now, device_id=self.device_id)
                    for i in range(due.kem_one_time)]
        if due.kem_last_resort:
            kems.append(new_kem_key(self.keys, KemUse.LAST_RESORT, self.store.next_prekey_ids(1), now,
                                    device_id=self.device_id))
            self.store.drop_kem_keys_retired_before(KemUse.LAST_RESORT, now - KEEP_RETIRED_SIGNED)
        envelope = None
        if due.envelope_key:
            held = self.store.newest_kem_key(KemUse.ENVELOPE)
            if held is not None:  # the relay lost it: the same key again (mail to it is in flight)
                key = KemKey.from_bytes(held[2])
            else:
                key = new_kem_key(self.keys, KemUse.ENVELOPE, self.store.next_prekey_ids(1), now,
                                  device_id=self.device_id)
                kems.append(key)
            envelope = wire.KemKeyPub(key.key_id, key.public, key.signature)
        self.store.add_kem_keys([(int(k.use), k.key_id, k.to_bytes(), now) for k in kems])

        def pub(k: KemKey) -> wire.KemKeyPub:
            return wire.KemKeyPub(k.key_id, k.public, k.signature)

        return wire.PrekeySet(
            signed=spub,
            one_time=[wire.OneTimePrekeyPub(k.key_id, k.public) for k in opks],
            kem_one_time=[pub(k) for k in kems if k.use == KemUse.ONE_TIME],
            kem_last_resort=next((pub(k) for k in kems if k.use == KemUse.LAST_RESORT), None),
            envelope_key=envelope,
        )

    def prekeys_due(self, status: wire.PrekeyStatusOk, now: int) -> PrekeysDue:
        """What to publish, given what the relay holds. A relay that predates post-quantum
        keys (no KEM counts in its answer) gets none. The last-resort KEM prekey rotates
        with the signed prekey; the first one comes with a new signed prekey too (see
        PQ_SINCE_SPK)."""
        newest = self.store.newest_signed_prekey()
        rotate = (status.signed_id is None or newest is None or newest[0] != status.signed_id
                  or newest[1] + ROTATE_SIGNED_AFTER <= now)
        # The relay's counts, kept within what a device may hold (a relay is not trusted
        # to say how many keys to make).
        one_time_left = max(0, min(status.one_time_left, ONE_TIME_STOCK))
        add = ONE_TIME_STOCK - one_time_left if one_time_left < REFILL_BELOW else 0
        if status.kem_one_time_left is None:
            return PrekeysDue(signed=rotate, one_time=add)
        last = self.store.newest_kem_key(KemUse.LAST_RESORT)
        kem_rotate = (rotate or status.kem_last_resort_id is None or last is None
                      or last[0] != status.kem_last_resort_id)
        envelope = self.store.newest_kem_key(KemUse.ENVELOPE)
        return PrekeysDue(
            signed=rotate or kem_rotate,
            one_time=add,
            kem_one_time=(KEM_ONE_TIME_STOCK - kem_left if (kem_left := max(0, min(
                status.kem_one_time_left, KEM_ONE_TIME_STOCK))) < KEM_REFILL_BELOW else 0),
            kem_last_resort=kem_rotate,
            envelope_key=envelope is None or envelope[0] != status.envelope_key_id,
        )
