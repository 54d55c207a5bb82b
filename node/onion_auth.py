"""A private onion relay's client key, handed to this node's tor before it connects.

A private onion relay (``veil relay serve --onion --private``) publishes its descriptor
for its clients' keys only (Tor v3 client authorization). Its address then carries this
client's x25519 private key: ``ws://<56 letters>.onion#client=<52 base32 letters>``.
Before each connection through SOCKS the node gives that key to its tor with the control
port command ``ONION_CLIENT_AUTH_ADD <56 letters> x25519:<base64 key>`` (not
``Permanent``: tor keeps it in memory, and a second add replaces the first), over
``--tor-control HOST:PORT`` (or a control socket path; also ``VEIL_TOR_CONTROL``), with
cookie authentication (SAFECOOKIE when tor offers it, so a process listening on the port
instead of tor does not learn the cookie).

Without a control port the node cannot hand the key over; tor can have it from a file
``<name>.auth_private`` in its ``ClientOnionAuthDir``, one line
``<56 letters>:descriptor:x25519:<the same key in upper-case base32>``. If tor then has no
key, or a key the relay does not accept (a wrong or revoked one), it says so with a SOCKS
error (0xF4, 0xF5), which ``refused`` turns into one line for the person.

A minimal control client of its own, on trio, so that the node needs no stem.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import stat

import trio

from node.errors import RelayUnreachable
from wire.address import is_loopback

CONTROL_TIMEOUT = 15.0  # connect, authenticate and add the key, together
MAX_REPLY = 64 * 1024
ENV_CONTROL = "VEIL_TOR_CONTROL"
SERVER_HASH_LABEL = b"Tor safe cookie authentication server-to-controller hash"
CLIENT_HASH_LABEL = b"Tor safe cookie authentication controller-to-server hash"
_SERVICE_ID = re.compile(r"[a-z2-7]{56}")
_KEY = re.compile(r"[a-z2-7]{52}")
MISSING, WRONG = 0xF4, 0xF5  # tor's SOCKS extended errors for client authorization


class TorControlError(RelayUnreachable):
    """Cannot hand the client key to tor through its control port (for now, perhaps: a
    long-running node tries again, as for a relay it cannot reach)."""


class OnionAuthRefused(RelayUnreachable):
    """tor refused the connection for want of (the right) client authorization."""

    def __init__(self, message: str, code: int, host: str) -> None:
        super().__init__(message)
        self.code = code
        self.host = host


def control_target(address: str) -> tuple[str, int] | str:
    """``HOST:PORT``, ``[V6]:PORT`` or a bare ``PORT`` (127.0.0.1); or a control socket's
    path (``/run/tor/control``, also written ``unix:/run/tor/control``)."""
    text = address.strip()
    if text.startswith("unix:") or os.sep in text:
        return text.removeprefix("unix:")
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise TorControlError(f"bad tor control address {address!r}: use HOST:PORT, e.g. 127.0.0.1:9051,"
                              " or the path of tor's control socket")
    if not is_loopback(host):
        # The client key goes over this connection in the clear.
        raise TorControlError(f"tor's control port {address!r} is not on this machine: give a loopback"
                              " address (127.0.0.1:9051) or the path of tor's control socket")
    return ("127.0.0.1" if host == "localhost" else host), int(port)


def check_control(address: str) -> str:
    """A well-formed control address, as given (a one-line error otherwise)."""
    control_target(address)
    return address.strip()


class _Control:
    """Just enough of tor's control protocol: replies as (status, lines)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def _line(self) -> str:
        while b"\r\n" not in self.buf:
            if len(self.buf) > MAX_REPLY:
                raise TorControlError("tor's control port sent an overlong reply")
            chunk = await self.stream.receive_some(4096)
            if not chunk:
                raise TorControlError("tor closed the control connection")
            self.buf.extend(chunk)
        line, _, rest = bytes(self.buf).partition(b"\r\n")
        self.buf = bytearray(rest)
        return line.decode("utf-8", "replace")

    async def command(self, line: str) -> tuple[str, list[str]]:
        await self.stream.send_all(line.encode() + b"\r\n")
        lines: list[str] = []
        size = 0
        while True:
            text = await self._line()
            size += len(text) + 2
            if size > MAX_REPLY:  # the whole reply, data blocks and all: bounded
                raise TorControlError("tor's control port sent an overlong reply")
            status, sep, rest = text[:3], text[3:4], text[4:]
            if sep == "+":  # a data block, up to a lone "."
                while (data := await self._line()) != ".":
                    size += len(data) + 2
                    if size > MAX_REPLY:
                        raise TorControlError("tor's control port sent an overlong reply")
                    rest += "\n" + data
            if status.startswith("6"):  # an asynchronous event: not ours
                continue
            lines.append(rest)
            if sep == " ":
                return status, lines

    async def ok(self, line: str, what: str, *, quote: bool = True) -> list[str]:
        """The reply's lines, or TorControlError. ``quote=False``: tor's own words are left
        out (its refusal of a key quotes the key)."""
        status, lines = await self.command(line)
        if not status.startswith("25"):
            said = f": {status} {' '.join(lines)[:200]}" if quote else f" (status {status})"
            raise TorControlError(f"tor refused {what}{said}")
        return lines

    async def authenticate(self, where: str) -> None:
        """SAFECOOKIE only: the process on the port must prove it knows tor's cookie before
        the node sends anything that matters. The cookie file it names must look like tor's
        (a regular file of 32 bytes, not a link, owned by root, this user or a tor user):
        otherwise a process on the port in tor's place could name a file it wrote (and
        NULL or plain COOKIE authentication would hand the key, or a file, to anyone)."""
        info = " ".join(await self.ok("PROTOCOLINFO 1", "PROTOCOLINFO"))
        methods_match = re.search(r"METHODS=(\S+)", info)
        methods = set(methods_match.group(1).split(",")) if methods_match else set()
        cookie_match = re.search(r'COOKIEFILE="((?:[^"\\]|\\.)*)"', info)
        if "SAFECOOKIE" not in methods or cookie_match is None:
            raise TorControlError(f"the tor control port at {where} does not offer SAFECOOKIE authentication,"
                                  " which veil needs: set `CookieAuthentication 1` in the torrc")
        cookie = _read_cookie(re.sub(r"\\(.)", r"\1", cookie_match.group(1)), where)
        client_nonce = secrets.token_bytes(32)
        reply = " ".join(await self.ok(f"AUTHCHALLENGE SAFECOOKIE {client_nonce.hex()}", "AUTHCHALLENGE"))
        got = dict(re.findall(r"(SERVERHASH|SERVERNONCE)=([0-9A-Fa-f]+)", reply))
        try:
            server_hash, server_nonce = bytes.fromhex(got["SERVERHASH"]), bytes.fromhex(got["SERVERNONCE"])
        except (KeyError, ValueError):
            raise TorControlError(f"the tor control port at {where} gave a malformed AUTHCHALLENGE reply") from None
        message = cookie + client_nonce + server_nonce
        if not hmac.compare_digest(hmac.new(SERVER_HASH_LABEL, message, hashlib.sha256).digest(), server_hash):
            raise TorControlError(f"the process at {where} does not know tor's cookie: it is not that tor")
        proof = hmac.new(CLIENT_HASH_LABEL, message, hashlib.sha256).hexdigest()
        await self.ok(f"AUTHENTICATE {proof}", "the authentication cookie")


COOKIE_SIZE = 32
TOR_USERS = ("debian-tor", "tor", "_tor", "toranon")


def _trusted_owner(uid: int) -> bool:
    if uid in (0, os.getuid()):
        return True
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name in TOR_USERS
    except (KeyError, ImportError):
        return False


def _read_cookie(path: str, where: str) -> bytes:
    """tor's authentication cookie at ``path`` (named by the control port), if it is one."""
    bad = TorControlError(f"the control port at {where} names a cookie file ({path!r}) that is not tor's:"
                          " it may not be tor listening there")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except ValueError:
        raise bad from None
    except OSError as exc:
        raise TorControlError(f"cannot read tor's authentication cookie {path!r} ({exc.strerror}): run veil as"
                              " a user who may read it (for the Debian tor: a member of the debian-tor group)"
                              ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != COOKIE_SIZE or not _trusted_owner(st.st_uid):
            raise bad
        cookie = os.read(fd, COOKIE_SIZE + 1)
    finally:
        os.close(fd)
    if len(cookie) != COOKIE_SIZE:
        raise bad
    return cookie


async def _open(target: tuple[str, int] | str) -> trio.abc.Stream:
    if isinstance(target, str):
        return await trio.open_unix_socket(target)
    return await trio.open_tcp_stream(*target)


def key_blob(client_key_b32: str) -> str:
    """The link's client key (52 lower-case base32 letters) as ONION_CLIENT_AUTH_ADD
    takes it: ``x25519:`` and the base64 of the 32 bytes."""
    if not _KEY.fullmatch(client_key_b32):
        raise TorControlError("a client key is 52 base32 letters (a-z, 2-7)")
    raw = base64.b32decode(client_key_b32.upper() + "====")
    return "x25519:" + base64.b64encode(raw).decode()


async def add_client_auth(control: str, onion_host: str, client_key_b32: str) -> None:
    """Give tor (at ``control``) the client key for ``onion_host``, for this run of tor
    (not Permanent). Idempotent: a second call replaces the first. The key appears in
    no error message."""
    service_id = onion_host.lower().rstrip(".").removesuffix(".onion")
    if not _SERVICE_ID.fullmatch(service_id):
        raise TorControlError(f"{onion_host!r} is not an onion address")
    blob = key_blob(client_key_b32)
    target = control_target(control)
    where = target if isinstance(target, str) else f"{target[0]}:{target[1]}"
    try:
        with trio.fail_after(CONTROL_TIMEOUT):
            stream = await _open(target)
            async with stream:
                conn = _Control(stream)
                await conn.authenticate(where)
                await conn.ok(f"ONION_CLIENT_AUTH_ADD {service_id} {blob}",
                              "the client key in the relay address", quote=False)
                await conn.ok("QUIT", "QUIT")
    except trio.TooSlowError:
        raise TorControlError(f"the tor control port at {where} did not answer within {CONTROL_TIMEOUT:.0f}s") from None
    except (OSError, trio.BrokenResourceError) as exc:
        reason = "connection refused" if isinstance(exc, ConnectionRefusedError) else (
            getattr(exc, "strerror", None) or type(exc).__name__)
        raise TorControlError(
            f"cannot connect to the tor control port at {where} ({reason}): is tor running with"
            " `ControlPort` and `CookieAuthentication 1`? (--tor-control, VEIL_TOR_CONTROL)"
        ) from None


def auth_file_line(service_id: str) -> str:
    """What a ClientOnionAuthDir file holds, the key left as a placeholder (never printed)."""
    return f"{service_id}:descriptor:x25519:<the key after #client=, in upper case>"


def refused(code: int, host: str, *, has_key: bool, control: str | None) -> OnionAuthRefused:
    """One line for a connection tor refused for client authorization (SOCKS 0xF4/0xF5)."""
    service_id = host.removesuffix(".onion")
    if code == WRONG:
        text = (f"{host} is a private onion relay and does not accept this node's client key: the key is"
                " wrong, expired, or was revoked by the relay's operator (ask them for a new link)")
    elif not has_key:
        text = (f"{host} is a private onion relay: this node needs a client key for it, an address ending in"
                " #client=... from the relay's operator (`veil relay invite --new-client`)")
    elif control is None:
        text = (f"{host} is a private onion relay and this node's tor does not have its client key: give"
                f" --tor-control HOST:PORT (or {ENV_CONTROL}) so veil hands it to tor, or put it in tor's"
                f" ClientOnionAuthDir, a file NAME.auth_private: {auth_file_line(service_id)}")
    else:
        text = (f"{host} is a private onion relay and the tor behind the SOCKS proxy does not have the client"
                f" key veil gave the tor at {control}: are --socks and --tor-control the same tor?")
    return OnionAuthRefused(text, code, host)
