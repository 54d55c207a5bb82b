"""The input history of ``veil chat`` (the up arrow): commands only, kept encrypted.

A line typed to someone is a message: it stays in memory for this run (the up arrow finds
it) and is never written anywhere. A command (a line that starts with one '/') is kept in
the device's encrypted store, the newest ``INPUT_HISTORY_MAX``. Earlier versions kept
commands in a plaintext file in the home, ``chat-history``, where a thief of a locked
device could read whom they name; its commands move into the store and the file is
removed the next time the chat starts.
"""

from __future__ import annotations

from pathlib import Path

from node.store import NodeStore

PLAINTEXT_FILE = "chat-history"  # the file earlier versions kept in the home


def is_command(line: str) -> bool:
    """Whether a typed line is a command (kept) rather than a message (never kept)."""
    return line.startswith("/") and not line.startswith("//")


def read_plaintext_history(path: Path) -> list[str]:
    """The commands in a prompt-toolkit ``FileHistory`` file, oldest first. Entries are
    runs of lines that start with '+'; anything else separates them."""
    entries: list[str] = []
    run: list[str] = []
    for raw in path.read_bytes().decode("utf-8", "replace").splitlines():
        if raw.startswith("+"):
            run.append(raw[1:])
        elif run:
            entries.append("\n".join(run))
            run = []
    if run:
        entries.append("\n".join(run))
    return [e for e in entries if is_command(e)]


def retire_plaintext_history(home: Path, store: NodeStore) -> int | None:
    """Move the commands of an old plaintext history file into the store and remove the
    file; how many were moved, or None if there was no such file."""
    path = home / PLAINTEXT_FILE
    if not path.is_file() and not path.is_symlink():
        return None
    commands = read_plaintext_history(path) if path.is_file() else []
    with store.transaction():
        for line in commands:
            store.add_input(line)
    path.unlink()
    return len(commands)
