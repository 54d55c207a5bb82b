"""The exceptions keyvault raises.

Every failure the caller is expected to handle is a `KeyvaultError`. Messages are written for
the person at the keyboard: the CLI prints ``str(exc)`` (or the docstring when that is empty).
"""

from __future__ import annotations


class KeyvaultError(Exception):
    """Something went wrong with the keys or the encryption."""

    def __str__(self) -> str:
        # Fall back to the class docstring so a bare `raise BadPassword` still reads well.
        text = super().__str__()
        if text:
            return text
        doc = type(self).__doc__ or type(self).__name__
        return doc.strip().splitlines()[0]


class DecryptionFailed(KeyvaultError):
    """This message could not be decrypted or verified; it may be damaged or forged."""


class BadPassword(KeyvaultError):
    """The password or recovery code is not correct for this account."""


class MessageTooLarge(KeyvaultError):
    """The message is too large to send; split it into smaller messages."""


class BadKey(KeyvaultError):
    """A key or key bundle is malformed or of an unsupported kind."""


class DuplicateMessage(KeyvaultError):
    """This message was already decrypted; its one-use key is gone."""


class TooManySkipped(KeyvaultError):
    """This message skips too far ahead in the conversation to be decrypted."""


class BadPrekey(KeyvaultError):
    """The contact's prekey bundle is malformed or its signature does not verify."""
