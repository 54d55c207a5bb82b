"""The master password: where it comes from, asking again after a typo, and how strong it is.

A password comes from ``--password-file`` / ``VEIL_PASSWORD_FILE`` (scripts: one try, no
questions) or from the terminal, where a mistyped password is asked again, up to
``TRIES`` times in all. A new master password is rated with zxcvbn: the relay holds the
key bundle wrapped under it, so whoever runs the relay can guess at it offline (each
guess costing an Argon2id run); a very weak one is refused unless the person insists.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cli.errors import CliError

TRIES = 3
# zxcvbn scores 0..4. 0-1: guessable within about 10^6 guesses (refused unless insisted
# on); 2: within about 10^8 (a warning); 3 and 4: fine.
REFUSE_BELOW = 2
WARN_BELOW = 3

T = TypeVar("T")


class WeakPassword(CliError):
    """The master password is too easy to guess."""


def password_source(args: argparse.Namespace) -> str | None:
    """The password file to read, or None to ask at the terminal."""
    return args.password_file or os.environ.get("VEIL_PASSWORD_FILE") or None


def _read_file(path: str, what: str = "password") -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read {what} file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CliError(f"{what} file {path} is not UTF-8 text") from None
    secret = text.rstrip("\r\n")
    if not secret:
        raise CliError(f"{what} file {path} is empty")
    return secret


def _ask(prompt: str) -> str:
    if not sys.stdin.isatty():
        raise CliError("no terminal to ask for the password: use --password-file or VEIL_PASSWORD_FILE")
    try:
        return getpass.getpass(prompt)
    except EOFError:
        print(file=sys.stderr)
        raise CliError("no password given") from None


def read_password(args: argparse.Namespace, prompt: str = "master password: ") -> str:
    """One password: from the file, or asked once at the terminal."""
    path = password_source(args)
    if path:
        return _read_file(path)
    password = _ask(prompt)
    if not password:
        raise CliError("the password is empty")
    return password


def with_password(args: argparse.Namespace, attempt: Callable[[str], T], *, retry_on: type[Exception],
                  prompt: str = "master password: ") -> T:
    """Call ``attempt(password)``; at a terminal, ask again (up to TRIES in all) when it
    raises ``retry_on`` (a wrong password). From a file there is one try."""
    path = password_source(args)
    if path:
        return attempt(_read_file(path))
    for left in range(TRIES - 1, -1, -1):
        password = _ask(prompt)
        if not password:
            if left:
                print("the password is empty; try again", file=sys.stderr)
                continue
            raise CliError("the password is empty")
        try:
            return attempt(password)
        except retry_on as exc:
            if not left:
                raise
            print(f"{str(exc).rstrip('.')}; try again ({left} {'try' if left == 1 else 'tries'} left)",
                  file=sys.stderr)
    raise AssertionError("unreachable")


def strength(password: str, user_inputs: list[str]) -> tuple[int, str]:
    """zxcvbn's score (0..4) and its advice, in one line."""
    import zxcvbn  # type: ignore[import-untyped]  # imported only when a password is chosen

    rating = zxcvbn.zxcvbn(password[:100], user_inputs=user_inputs)
    feedback = rating.get("feedback", {})
    advice = " ".join(x for x in [feedback.get("warning", ""), *feedback.get("suggestions", [])] if x)
    return int(rating["score"]), advice


def check_new_password(password: str, name: str, *, allow_weak: bool) -> str | None:
    """Refuse a very weak new master password (unless ``allow_weak``); return a warning
    line for a weak one, None for a good one."""
    score, advice = strength(password, [name, "veil"])
    if score < REFUSE_BELOW:
        if not allow_weak:
            raise WeakPassword(
                "that master password is very easy to guess"
                + (f" ({advice.rstrip('.')})" if advice else "")
                + ": choose a longer one (a few random words work well), or pass --allow-weak-password"
            )
        return "the master password is very easy to guess (allowed by --allow-weak-password)"
    if score < WARN_BELOW:
        return "the master password is weak: whoever runs the relay could guess it with enough effort" + (
            f" ({advice.rstrip('.')})" if advice else ""
        )
    return None


def new_password(args: argparse.Namespace, name: str, source: str | None = None) -> tuple[str, str | None]:
    """A new master password (with its warning line, if any): from the file (``source``,
    or else the password file), or asked twice at the terminal, again after a mismatch or
    a refused one, up to TRIES in all."""
    allow_weak = bool(getattr(args, "allow_weak_password", False))
    path = source or password_source(args)
    if path:
        password = _read_file(path)
        return password, check_new_password(password, name, allow_weak=allow_weak)
    for left in range(TRIES - 1, -1, -1):
        password = _ask("new master password: ")
        problem: CliError
        try:
            if not password:
                raise WeakPassword("the password is empty")
            warning = check_new_password(password, name, allow_weak=allow_weak)
        except WeakPassword as exc:
            problem = exc
        else:
            if _ask("the same again: ") == password:
                return password, warning
            problem = CliError("the passwords do not match")
        if not left:
            raise problem
        print(f"{problem}; try again", file=sys.stderr)
    raise AssertionError("unreachable")


def code_asker(args: argparse.Namespace) -> Callable[[], str] | None:
    """Where a code from the authenticator app comes from: ``--code`` (also VEIL_CODE),
    used once, or asked at the terminal when needed; None when neither can be had."""
    given = getattr(args, "code", None) or os.environ.get("VEIL_CODE") or None
    if given:
        # Once: a code is good for one proof, and a long-running command (a daemon, the
        # chat) that reconnected with it again and again would only pile up failures.
        left = [given]

        def once() -> str:
            if not left:
                raise CliError("the code given with --code (or VEIL_CODE) was used already")
            return left.pop()

        return once
    if not sys.stdin.isatty():
        return None

    def ask() -> str:
        try:
            return input("code from your authenticator app: ")
        except EOFError:
            print(file=sys.stderr)
            raise CliError("no code given") from None

    return ask


def password_asker(args: argparse.Namespace) -> Callable[[str], str] | None:
    """Asks for the master password again at the terminal (when the one a device was
    opened with is no longer the account's); None from a password file or without one."""
    if password_source(args) or not sys.stdin.isatty():
        return None
    return _ask


def read_secret_line(args: argparse.Namespace, path: str | None, prompt: str, what: str) -> str:
    """A secret such as the recovery code: from a file, or asked (hidden) at the terminal."""
    if path:
        return _read_file(path, what).strip()
    if not sys.stdin.isatty():
        raise CliError(f"no terminal to ask for the {what}: give it in a file")
    try:
        return getpass.getpass(prompt)
    except EOFError:
        print(file=sys.stderr)
        raise CliError(f"no {what} given") from None


def confirm(question: str, *, default: bool = False) -> bool:
    """Ask yes or no at a terminal (end of input means no); without one, yes: the
    command line said what to do."""
    if not sys.stdin.isatty():
        return True
    try:
        answer = input(question).strip().lower()
    except EOFError:
        print(file=sys.stderr)
        return False
    return default if not answer else answer in ("y", "yes")
