"""Which conversation ``veil chat`` is in, who wrote last, and what is unread.

A conversation is read up to a mark kept in the device's encrypted store (``read_marks``):
a message counts as read once it has been shown in its conversation (as it arrived while
that conversation was current, or by /to NAME or /history), so unread counts survive a
restart. Runs on the trio side.
"""

from __future__ import annotations

from node.store import NodeStore, StoredMessage

SHOW_UNREAD_MAX = 1000  # /to NAME shows at most this many unread messages


class Conversations:
    """The current peer, the last person who wrote, and unread counts per conversation."""

    def __init__(self, store: NodeStore) -> None:
        self.store = store
        self.peer: str | None = None  # the current conversation; None until one is picked
        self.last_writer: str | None = None  # whose message arrived last while the chat runs
        self.unread: dict[str, int] = store.unread_counts()

    def total_unread(self) -> int:
        """Unread messages in all conversations."""
        return sum(self.unread.values())

    def arrived(self, m: StoredMessage) -> bool:
        """Count a message that just arrived. True if it is to be shown in full now (its
        conversation is current, or none is): it is then read."""
        if not m.outgoing:
            self.last_writer = m.peer
        if self.peer is None or m.peer == self.peer:
            self.shown(m.peer, m.seq)
            return True
        if not m.outgoing:
            self.unread[m.peer] = self.unread.get(m.peer, 0) + 1
        return False

    def shown(self, peer: str, up_to_seq: int) -> None:
        """The conversation with ``peer`` has been shown up to ``up_to_seq``."""
        with self.store.transaction():
            self.store.mark_read(peer, up_to_seq)
        left = self.store.unread_counts(peer).get(peer, 0)
        if left:
            self.unread[peer] = left
        else:
            self.unread.pop(peer, None)

    def unread_messages(self, peer: str) -> list[StoredMessage]:
        """The messages of the conversation past its read mark (both directions), oldest
        first; none if nothing in it is unread."""
        if not self.unread.get(peer):
            return []
        mark = self.store.read_mark(peer)
        return [m for m in self.store.history(peer, SHOW_UNREAD_MAX) if m.seq > mark]
