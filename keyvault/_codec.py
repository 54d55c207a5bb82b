"""Unambiguous length-prefixed encoding shared by the keyvault modules (private)."""

from __future__ import annotations

LEN_BYTES = 4  # every variable-length field is prefixed with a big-endian u32 length


def lp(data: bytes) -> bytes:
    """Return ``data`` prefixed with its length as a big-endian u32."""
    return len(data).to_bytes(LEN_BYTES, "big") + data


class Reader:
    """Cursor over bytes that raises ValueError on any overrun, so callers map one type."""

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)
        self._pos = 0

    def take(self, n: int) -> bytes:
        """Return the next ``n`` bytes."""
        end = self._pos + n
        if n < 0 or end > len(self._data):
            raise ValueError("truncated")
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def lp(self) -> bytes:
        """Return the next length-prefixed field."""
        n = int.from_bytes(self.take(LEN_BYTES), "big")
        return self.take(n)

    def rest(self) -> bytes:
        """Return everything not yet read."""
        out = self._data[self._pos :]
        self._pos = len(self._data)
        return out

    def end(self) -> None:
        """Check that nothing is left over (trailing bytes are a malformation)."""
        if self._pos != len(self._data):
            raise ValueError("trailing bytes")
