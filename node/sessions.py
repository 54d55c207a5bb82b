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
from keyvault.keys import AccountKeys
from keyvault.payload import Payload, PrekeyInit, decode_payload, encode_payload
from keyvault.prekeys import OneTimePrekey, SignedPrekey, new_one_time_prekeys, new_signed_prekey
from keyvault.x3dh import PrekeyBundle, initiate, respond
from node.store import NodeStore

ONE_TIME_STOCK = wire.MAX_ONE_TIME_PREKEYS  # 100 one-time prekeys published per device
REFILL_BELOW = 20
ROTATE_SIGNED_AFTER = 7 * 86400  # a new signed prekey every week
KEEP_RETIRED_SIGNED = 30 * 86400  # old ones still open late first messages for a month


@dataclass(frozen=True)
class Peer:
    """Who a session is with: an account and one of its devices, with the keys we pinned."""

    name: str
    device_id: bytes
    identity: bytes  # Ed25519 identity public key (verifies prekey signatures)
    identity_dh: bytes  # X25519 identity public key (X3DH)


def _init_bytes(init: PrekeyInit) -> bytes:
    """How a session keeps the X3DH data it attaches until the peer answers."""
    opk = b"\x00" * 5 if init.opk_id is None else b"\x01" + init.opk_id.to_bytes(4, "big")
    return init.identity_dh + init.ephemeral + init.spk_id.to_bytes(4, "big") + opk


def _init_from(data: bytes) -> PrekeyInit:
    opk_id = int.from_bytes(data[69:73], "big") if data[68] else None
    return PrekeyInit(data[:32], data[32:64], int.from_bytes(data[64:68], "big"), opk_id)


class Sessions:
    """Session state of one device, in its store."""

    def __init__(self, store: NodeStore, keys: AccountKeys, name: str, device_id: bytes) -> None:
        self.store = store
        self.keys = keys
        self.name = name
        self.device_id = device_id

    def has_session(self, peer: str, device_id: bytes) -> bool:
        return bool(self.store.sessions(peer, device_id))

    # ---- sending ---------------------------------------------------------------------
    def encrypt(self, peer: Peer, plaintext: bytes, bundle: wire.DeviceBundle | None) -> bytes:
        """A payload for ``peer``'s device (call inside the store transaction that also
        stores the envelope). Starts a session from ``bundle`` when there is none."""
        rows = self.store.sessions(peer.name, peer.device_id)
        if rows:
            row = rows[0]
            state, ad, init, sid = ratchet.RatchetState.from_bytes(row.state), row.ad, row.init, row.sid
        else:
            if bundle is None:
                raise ValueError("no session and no prekey bundle")
            x = initiate(
                self.keys,
                PrekeyBundle(peer.identity, peer.identity_dh, bundle.spk_id, bundle.spk, bundle.spk_sig,
                             bundle.opk_id, bundle.opk),
                me_name=self.name, me_device=self.device_id, them_name=peer.name, them_device=peer.device_id,
            )
            state = ratchet.init_initiator(x, bundle.spk)
            ad, sid = x.associated_data, None
            init = _init_bytes(PrekeyInit(self.keys.public().dh, x.ephemeral, bundle.spk_id, bundle.opk_id))
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
        spk = SignedPrekey.from_bytes(spk_blob)
        opk = None if opk_blob is None else OneTimePrekey.from_bytes(opk_blob)
        x = respond(
            self.keys, spk, opk, their_identity_dh=p.init.identity_dh, their_ephemeral=p.init.ephemeral,
            me_name=self.name, me_device=self.device_id, them_name=sender, them_device=sender_device,
        )
        state = ratchet.init_responder(x, (spk.private, spk.public))
        new, plain = ratchet.decrypt(state, p.ratchet, x.associated_data)
        opk_id = p.init.opk_id

        def commit_new() -> None:
            self.store.save_session(sender, sender_device, None, new.to_bytes(), x.associated_data, None)
            if opk_id is not None:  # only now: a forged first message cannot burn it
                self.store.delete_one_time_prekey(opk_id)

        return plain, commit_new

    # ---- our prekeys -------------------------------------------------------------------
    def new_prekeys(self, *, signed: bool, one_time: int, now: int) -> wire.PrekeySet:
        """Make prekeys, keep their private halves (in the caller's transaction), and
        return the public halves to publish."""
        spub = None
        if signed:
            key_id = self.store.next_prekey_ids(1)
            spk = new_signed_prekey(self.keys, key_id, now)
            self.store.add_signed_prekey(key_id, spk.to_bytes(), now)
            self.store.drop_signed_prekeys_retired_before(now - KEEP_RETIRED_SIGNED)
            spub = wire.SignedPrekeyPub(key_id, spk.public, spk.signature)
        opks: list[OneTimePrekey] = []
        if one_time:
            opks = new_one_time_prekeys(self.store.next_prekey_ids(one_time), one_time)
            self.store.add_one_time_prekeys([(k.key_id, k.to_bytes()) for k in opks])
        return wire.PrekeySet(signed=spub, one_time=[wire.OneTimePrekeyPub(k.key_id, k.public) for k in opks])

    def prekeys_due(self, signed_id: int | None, one_time_left: int, now: int) -> tuple[bool, int]:
        """(publish a new signed prekey?, how many one-time prekeys to add)."""
        newest = self.store.newest_signed_prekey()
        rotate = signed_id is None or newest is None or newest[0] != signed_id or newest[1] + ROTATE_SIGNED_AFTER <= now
        add = ONE_TIME_STOCK - one_time_left if one_time_left < REFILL_BELOW else 0
        return rotate, add
