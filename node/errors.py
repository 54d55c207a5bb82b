"""Errors a person sees. The CLI prints ``veil: error: <str(exc)>``: write them for people."""

from __future__ import annotations


def _inert(text: str, limit: int) -> str:
    """Text from elsewhere, fit for one line of a terminal: controls escaped, cut short."""
    out = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"
                  for c in text[:limit])
    return out + ("…" if len(text) > limit else "")


class VeilError(Exception):
    """Something went wrong."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "error").strip())


class NotSetUp(VeilError):
    """No account on this device yet: run `veil register NAME --relay URL` or `veil login NAME --relay URL`."""


class AlreadySetUp(VeilError):
    """This home directory already holds an account; use another --home."""


class HomeInUse(VeilError):
    """Another process is using this device's home directory."""

    def __init__(self, path: object, holder: str) -> None:
        pid, _, what = holder.partition(" ")
        who = f"`{what}` (pid {pid})" if pid.isdigit() and what else "another veil process"
        super().__init__(
            f"this device ({path}) is in use by {who}: one process at a time uses a home;"
            " quit it first, or use another --home"
        )
        self.holder_pid = int(pid) if pid.isdigit() else None
        self.holder = what


class HomeNotPrivate(VeilError):
    """This device's home directory is not private to this user."""


class WrongPassword(VeilError):
    """Wrong password."""


class LoginFailed(VeilError):
    """Login failed: wrong password or unknown user."""


class UnknownUser(VeilError):
    """No such user."""


class NameTaken(VeilError):
    """That name is taken."""


class RelayUnreachable(VeilError):
    """Cannot reach the relay."""


class ConnectionLost(VeilError):
    """The connection to the relay was lost."""


class MessageTooLarge(VeilError):
    """Message too large."""


class IdentityChanged(VeilError):
    """A verified contact's identity key changed; sending is held until you accept it."""


class RelayRefused(VeilError):
    """The relay refused the request."""

    def __init__(self, code: str, message: str) -> None:
        # The relay's words: shown to a person, so made inert (no line breaks, no terminal
        # controls) and kept short; the code is the relay's stable one.
        super().__init__(f"relay refused: {_inert(message, 200)} ({_inert(code, 40)})")
        self.code = code


class DeviceRevoked(LoginFailed):
    """This device was revoked by another device of the account: it can no longer connect (`veil logout --local` deletes its keys and history here)."""


class CodeNeeded(LoginFailed):
    """This account needs a code from its authenticator app: give --code, or run the command at a terminal."""


class RelayKeyMismatch(RelayUnreachable):
    """The relay presented a key other than the one its address pins: nothing was sent to it."""


class PlainRefused(VeilError):
    """A plain ws:// address off loopback and not an onion: refused, since anyone on the path could read it."""


class KeyDiffers(VeilError):
    """An invite link names a key other than the one pinned for that contact here."""


class Downgrade(VeilError):
    """A device that has post-quantum keys appeared without them: refused."""
