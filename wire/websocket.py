"""A guard on trio-websocket (0.12) that the relay and the node both need.

trio-websocket's reader task answers what the peer sends (a Pong for a Ping, a Close for
a malformed frame, a Close for an oversized message) even after its own Close frame went
out; wsproto then refuses the event (``LocalProtocolError``: it cannot be sent in state
LOCAL_CLOSING), and that exception leaves the reader task. On a server the reader runs
outside the connection's handler, so it ended the whole relay: anyone could stop it by
sending a Ping after the relay's Close (found by an attacker's review). With the guard,
an event wsproto refuses is not sent: nothing had been written for it (wsproto refuses
before it changes any state), and the connection goes on closing as it was.

The same wrapper makes trio-websocket's own frames wait while a frame the relay wrote
straight to the socket is half out (``veil_hold``: relay/connection.py).
"""

from __future__ import annotations

import logging

from trio_websocket import _impl
from wsproto.events import Event
from wsproto.utilities import LocalProtocolError

log = logging.getLogger("veil.websocket")

_original_send = _impl.WebSocketConnection._send


async def _send_unless_refused(self: _impl.WebSocketConnection, event: Event) -> None:
    # The relay writes some frames straight to the socket (relay/connection.py, _Line):
    # while one of them is half out, its rest must go before any frame of trio-websocket's.
    while (hold := getattr(self, "veil_hold", None)) is not None:
        await hold.wait()
    try:
        await _original_send(self, event)
    except LocalProtocolError:
        log.debug("not sent: %s in state %s", type(event).__name__, self._wsproto.state.name)


def guard() -> None:
    """Install the guard (idempotent): every WebSocketConnection's sends go through it."""
    _impl.WebSocketConnection._send = _send_unless_refused  # type: ignore[method-assign]
