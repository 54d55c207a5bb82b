"""The CLI's own errors: one line each, printed as ``veil: error: <text>``."""

from __future__ import annotations

from node.errors import VeilError


class CliError(VeilError):
    """A command cannot go on (the text says why, for the person at the keyboard)."""
