"""The relay as a Tor onion service, through stem (the only module that imports stem).

stem is synchronous and unmaintained upstream, so it stays behind this thin layer:
every call into it runs in a trio worker thread, under a deadline of our own (stem's
launch timeout uses SIGALRM, which works only in the main thread, so it is never used).

Two ways to reach a tor:

- ``Tor.connect("HOST:PORT")`` (or a control socket's path): a running tor's control
  port, cookie authentication (the system tor: ``ControlPort 9051`` and
  ``CookieAuthentication 1``, or Debian's ``/run/tor/control``);
- ``Tor.launch(data_dir)``: start a tor of our own with ``stem.process``, its data in
  ``DATA_DIR/tor``, its control port chosen by tor and read back from a file. It is
  owned by this process (``__OwningControllerProcess``): it exits when we close the
  controller or die.

``Tor.publish`` creates a v3 onion service (ADD_ONION) that maps virtual port 80 to the
relay's loopback port, and returns once its descriptor has been uploaded (HS_DESC
UPLOADED). The ED25519-V3 key is kept in ``DATA_DIR/onion.key`` (mode 0600), so the
relay keeps its onion address across restarts. The service is not detached: it ends
with the control connection, and ``aclose`` removes it explicitly first.

A private relay (``--private``) passes the set of its clients' x25519 public keys
(``relay/onion_clients.py``): the service is then always created with ``Flags=V3Auth`` and
one ``ClientAuthV3`` per client, never without; with no clients yet, with one throwaway
key whose private half nobody has. ``reload_onion_clients`` (on SIGHUP) re-reads the
client directory and, if it changed, re-publishes: DEL_ONION, then ADD_ONION with the same
ED25519 key and the new clients. tor closes the service's introduction and rendezvous
circuits at DEL_ONION, so every onion connection ends there, and the new descriptor lists
new introduction points: a revoked client's cached descriptor leads nowhere, and the
descriptor it fetches next does not open with its key. After a revocation the relay also
ends every live WebSocket connection itself (it cannot tell which came from whom: all
arrive from tor on 127.0.0.1); nodes reconnect on their own.

Errors are ``OnionError`` with one line written for the operator.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from relay.onion_clients import ClientError, live, public_keys, read_clients, throwaway_public_key

log = logging.getLogger("veil.relay")

KEY_FILE = "onion.key"
TOR_DIR = "tor"  # a launched tor's DataDirectory, inside the relay's data directory
KEY_TYPE = "ED25519-V3"
VIRTUAL_PORT = 80
DEFAULT_CONTROL = "127.0.0.1:9051"
CONTROL_TIMEOUT = 15.0  # connect and authenticate
LAUNCH_TIMEOUT = 120.0  # tor started and its control port open
PUBLISH_TIMEOUT = 300.0  # bootstrap (if not done yet) and the first descriptor upload
STOP_TIMEOUT = 10.0  # a launched tor, after SIGTERM, before SIGKILL
POLL = 0.5  # how often a waiting worker thread checks whether it should give up
# Options the relay sets itself on a launched tor; a --torrc file may not change them.
OWN_OPTIONS = {
    "datadirectory", "controlport", "controlportwritetofile", "cookieauthentication",
    "log", "__owningcontrollerprocess", "runasdaemon",
}


class OnionError(Exception):
    """A problem with tor or the onion service, in one line for the operator."""


@dataclass(frozen=True)
class OnionService:
    service_id: str  # the 56 base32 characters

    @property
    def address(self) -> str:
        return f"{self.service_id}.onion"

    @property
    def url(self) -> str:
        return f"ws://{self.address}"


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` (a bare ``PORT`` means 127.0.0.1)."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 < number < 65536:
        raise OnionError(f"bad {what} address {text!r}: use HOST:PORT, e.g. 127.0.0.1:9051")
    return host, number


def _stem() -> Any:
    try:
        import stem  # type: ignore[import-untyped]
        import stem.connection  # type: ignore[import-untyped]
        import stem.control  # type: ignore[import-untyped]
        import stem.process  # type: ignore[import-untyped]
        import stem.response  # type: ignore[import-untyped]
    except ImportError:
        raise OnionError(
            "the onion service needs stem, which is not installed: pip install 'veil[tor]'"
        ) from None
    logging.getLogger("stem").setLevel(logging.WARNING)
    return stem


def tor_binary() -> str:
    path = shutil.which("tor")
    if path is None:
        raise OnionError(
            "tor is not installed (no `tor` on PATH): install it (e.g. apt-get install tor), "
            "or point --tor-control at a running tor"
        )
    return path


def check_available(*, launch: bool) -> None:
    """Fail early, before the relay starts, if stem (or tor, to launch one) is missing."""
    _stem()
    if launch:
        tor_binary()


def read_torrc(path: Path) -> dict[str, list[str]]:
    """Extra options for a launched tor, from a torrc-style file (``Key value`` lines)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise OnionError(f"cannot read the torrc file {path}: {exc.strerror}") from None
    options: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if key.lower() in OWN_OPTIONS or key.startswith("%"):
            raise OnionError(f"{path}: {key} is set by veil itself and cannot be changed")
        options.setdefault(key, []).append(value.strip())
    return options


# ---- the key file ------------------------------------------------------------------------


def load_key(path: Path) -> str | None:
    """The stored ED25519-V3 key (base64, as ADD_ONION takes it), or None if there is none."""
    try:
        text = path.read_text(encoding="ascii").strip()
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise OnionError(f"cannot read the onion key {path}: {exc}") from None
    if mode & 0o077:
        log.warning("%s was readable by others (mode %o); set it to 0600", path.name, mode)
        os.chmod(path, 0o600)
    kind, _, key = text.partition(":")
    if kind != KEY_TYPE or len(key) < 80:
        raise OnionError(f"{path} does not hold an {KEY_TYPE} onion key")
    return key


def save_key(path: Path, key: str) -> None:
    """Write the key (mode 0600 from the start), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    with suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(f"{KEY_TYPE}:{key}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- tor -----------------------------------------------------------------------------------


class Tor:
    """An authenticated control connection to tor (and the tor process, if we launched it)."""

    def __init__(self, controller: Any, process: Any = None, where: str = "") -> None:
        self.controller = controller
        self.process = process
        self.where = where
        self.service: OnionService | None = None
        self.uploaded = 0  # directories that accepted the descriptor
        self.key_file: Path | None = None  # set once publish runs
        self.target_port = 0
        self.private_dir: Path | None = None  # a private relay's data directory (its clients)
        self.clients: frozenset[str] | None = None  # None: public; else the published client keys
        self.publishing = trio.Lock()  # one publication (or re-publication) at a time
        self._closing = threading.Event()

    # ---- connecting --------------------------------------------------------------------
    @classmethod
    async def connect(cls, address: str) -> Tor:
        target = control_target(address)
        where = target if isinstance(target, str) else f"{target[0]}:{target[1]}"
        try:
            with trio.fail_after(CONTROL_TIMEOUT):
                controller = await trio.to_thread.run_sync(_connect_sync, target, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise OnionError(f"the tor control port at {where} did not answer within "
                             f"{CONTROL_TIMEOUT:.0f}s") from None
        return cls(controller, where=f"the tor at {where}")

    @classmethod
    async def launch(cls, data_dir: Path, extra: dict[str, list[str]] | None = None) -> Tor:
        tor = tor_binary()
        stem = _stem()
        tor_dir = data_dir / TOR_DIR
        tor_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(tor_dir, 0o700)  # tor refuses a DataDirectory others can read
        port_file = tor_dir / "control-port"
        with suppress(FileNotFoundError):
            port_file.unlink()
        config: dict[str, str | list[str]] = {
            "DataDirectory": str(tor_dir),
            "SocksPort": "0",
            "ControlPort": "127.0.0.1:auto",
            "ControlPortWriteToFile": str(port_file),
            "CookieAuthentication": "1",
            "Log": ["NOTICE stdout", f"notice file {tor_dir / 'notice.log'}"],
        }
        for key, values in (extra or {}).items():
            config[key] = values if len(values) > 1 else values[0]

        def launch() -> Any:
            # No timeout here (it would use SIGALRM): bounded by the caller instead.
            # Returns at "Bootstrapped 0%": publication waits for the rest.
            return stem.process.launch_tor_with_config(
                config, tor_cmd=tor, completion_percent=0, timeout=None, take_ownership=True
            )

        # If this is abandoned at the deadline, a tor that starts after all exits with us
        # (it is owned by this process).
        try:
            with trio.fail_after(LAUNCH_TIMEOUT):
                process = await trio.to_thread.run_sync(launch, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise OnionError(f"tor did not start within {LAUNCH_TIMEOUT:.0f}s (log: {tor_dir / 'notice.log'})") from None
        except OSError as exc:
            problem = str(exc).removeprefix("Process terminated: ")
            raise OnionError(f"tor failed to start: {problem}") from None
        log.info("launched tor (pid %d), data in %s", process.pid, tor_dir)
        try:
            with trio.fail_after(LAUNCH_TIMEOUT):
                port = await _read_port_file(port_file)
            with trio.fail_after(CONTROL_TIMEOUT):
                controller = await trio.to_thread.run_sync(_connect_sync, ("127.0.0.1", port), abandon_on_cancel=True)
        except BaseException as exc:
            await trio.to_thread.run_sync(_stop_process, process)
            if isinstance(exc, trio.TooSlowError):
                raise OnionError("the tor launched by this relay did not open its control port in time") from None
            raise
        return cls(controller, process, where="the tor launched by this relay")

    # ---- the onion service -------------------------------------------------------------
    async def publish(
        self, key_file: Path, target_port: int, private_dir: Path | None = None,
        timeout: float = PUBLISH_TIMEOUT,
    ) -> OnionService:
        """Create (or restore from ``key_file``) the onion service for 127.0.0.1:``target_port``
        and wait until its descriptor is uploaded. ``private_dir``: a private relay's data
        directory, whose clients alone may reach the service (read here, under the lock
        that a reload takes too, so no SIGHUP falls between reading and publishing)."""
        async with self.publishing:
            self.key_file, self.target_port, self.private_dir = key_file, target_port, private_dir
            return await self._publish(_client_keys(private_dir), timeout)

    async def _publish(self, clients: frozenset[str] | None, timeout: float) -> OnionService:
        assert self.key_file is not None
        service_id = await trio.to_thread.run_sync(
            self._publish_sync, self.key_file, self.target_port, clients, timeout, abandon_on_cancel=True
        )
        return OnionService(service_id)

    async def republish(
        self, clients: frozenset[str], *, revoked: bool, timeout: float = PUBLISH_TIMEOUT
    ) -> OnionService:
        """Publish the service again for another set of clients (same key, same address);
        after a revocation (``revoked``), with every rendezvous circuit of the old one
        closed first. The caller holds ``publishing``."""
        old = self.service
        if old is not None:
            await trio.to_thread.run_sync(self._remove_sync, old.service_id, revoked, abandon_on_cancel=True)
        return await self._publish(clients, timeout)

    def _remove_sync(self, service_id: str, close_rendezvous: bool) -> None:
        stem = _stem()
        try:
            self.controller.remove_ephemeral_hidden_service(service_id)
        except stem.ControllerError as exc:
            raise OnionError(f"{self.where} refused to remove the onion service: {exc}") from None
        self.service = None
        if close_rendezvous:
            self._close_rendezvous_sync(service_id)

    def _close_rendezvous_sync(self, service_id: str) -> None:
        """Close the service's rendezvous circuits. DEL_ONION closes only the introduction
        circuits, and leaves the rendezvous circuits open "for existing connections to
        finish"; a client's tor opens new streams on such a circuit, and the service that
        ADD_ONION makes with the same key takes them: a revoked client would keep its way in
        for as long as its circuit lives."""
        stem = _stem()
        try:
            circuits = self.controller.get_circuits()
        except stem.ControllerError as exc:
            raise OnionError(f"{self.where} did not list its circuits: {exc}") from None
        closed = 0
        for circuit in circuits:
            if circuit.purpose == "HS_SERVICE_REND" and circuit.rend_query == service_id:
                with suppress(stem.ControllerError):  # closed meanwhile
                    self.controller.close_circuit(circuit.id)
                    closed += 1
        log.info("closed %d rendezvous circuit(s) of the onion service", closed)

    def _add_onion(self, key: str | None, target_port: int, clients: frozenset[str] | None) -> Any:
        """ADD_ONION; for a private service always with V3Auth and at least one client key."""
        stem = _stem()
        request = f"ADD_ONION {KEY_TYPE}:{key}" if key else f"ADD_ONION NEW:{KEY_TYPE}"
        if clients is not None:
            request += " Flags=V3Auth"
        request += f" Port={VIRTUAL_PORT},127.0.0.1:{target_port}"
        if clients is not None:
            for client in sorted(clients) or [throwaway_public_key()]:
                request += f" ClientAuthV3={client}"
        response = self.controller.msg(request)
        stem.response.convert("ADD_ONION", response)
        return response

    def _publish_sync(self, key_file: Path, target_port: int, clients: frozenset[str] | None, timeout: float) -> str:
        stem = _stem()
        deadline = time.monotonic() + timeout
        events: queue.Queue[Any] = queue.Queue()
        self.controller.add_event_listener(events.put, stem.control.EventType.HS_DESC)
        try:
            key = load_key(key_file)
            try:
                response = self._add_onion(key, target_port, clients)
            except stem.ControllerError as exc:
                raise OnionError(f"{self.where} refused to create the onion service: {exc}") from None
            service_id = response.service_id
            if key is None:
                save_key(key_file, response.private_key)
                log.info("new onion key stored in %s", key_file)
            self.service = OnionService(service_id)
            self.clients = clients
            self.uploaded = 0
            self._await_upload(service_id, events, deadline)
            if self._closing.is_set():
                raise OnionError("stopped before the onion service was published")
            if not self.uploaded:
                raise OnionError(
                    f"the onion service was not published within {timeout:.0f}s ({self._bootstrap_text()})"
                )
            log.info("onion service descriptor uploaded to %d directories", self.uploaded)
            return str(service_id)
        finally:
            with suppress(Exception):
                self.controller.remove_event_listener(events.put)

    def _await_upload(self, service_id: str, events: queue.Queue[Any], deadline: float) -> None:
        """Until one directory holds the descriptor and every upload of that round has
        ended (uploaded or failed), or the deadline."""
        pending: set[str] = set()
        while not self._closing.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                event = events.get(timeout=min(left, POLL))
            except queue.Empty:
                continue
            directory = event.directory_fingerprint or event.directory
            if event.action == "UPLOAD" and event.address == service_id:
                pending.add(directory)
            elif event.action in ("UPLOADED", "FAILED") and directory in pending:
                pending.discard(directory)
                if event.action == "UPLOADED":
                    self.uploaded += 1
                else:
                    log.info("onion descriptor upload failed at one directory (%s)", event.reason)
            if self.uploaded and not pending:
                return

    def _bootstrap_text(self) -> str:
        try:
            phase = self.controller.get_info("status/bootstrap-phase")
        except Exception:
            return "tor's bootstrap state is unknown"
        fields = dict(part.split("=", 1) for part in phase.split() if "=" in part)
        progress = fields.get("PROGRESS", "?")
        if progress == "100":
            return "tor is bootstrapped; no directory accepted the descriptor yet"
        return f"tor bootstrapped only {progress}%: {fields.get('SUMMARY', '').strip(chr(34))}"

    # ---- closing -------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Remove the onion service, close the controller, stop a launched tor. Bounded."""
        self._closing.set()
        with trio.move_on_after(STOP_TIMEOUT + CONTROL_TIMEOUT):
            await trio.to_thread.run_sync(self._close_sync, abandon_on_cancel=True)

    def _close_sync(self) -> None:
        if self.service is not None:
            with suppress(Exception):
                self.controller.remove_ephemeral_hidden_service(self.service.service_id)
        with suppress(Exception):
            self.controller.close()
        if self.process is not None:
            _stop_process(self.process)


def _client_keys(private_dir: Path | None) -> frozenset[str] | None:
    if private_dir is None:
        return None
    try:
        return public_keys(live(read_clients(private_dir)))
    except ClientError as exc:
        raise OnionError(str(exc)) from None


def control_target(address: str) -> tuple[str, int] | str:
    """A control port (HOST:PORT) or the path of a control socket (``/run/tor/control``,
    also written ``unix:/run/tor/control``)."""
    if address.startswith("unix:") or os.sep in address:
        return address.removeprefix("unix:")
    return parse_hostport(address, "tor control")


def _connect_sync(target: tuple[str, int] | str) -> Any:
    stem = _stem()
    try:
        if isinstance(target, str):
            where, hint = target, f"ControlSocket {target}"
            controller = stem.control.Controller.from_socket_file(path=target)
        else:
            where, hint = f"{target[0]}:{target[1]}", f"ControlPort {target[1]}"
            controller = stem.control.Controller.from_port(address=target[0], port=target[1])
    except stem.SocketError as exc:
        raise OnionError(
            f"cannot connect to the tor control port at {where} ({_reason(exc)}): is tor running "
            f"with `{hint}` and `CookieAuthentication 1`?"
        ) from None
    try:
        controller.authenticate()
    except stem.connection.UnreadableCookieFile as exc:
        controller.close()
        raise OnionError(
            f"cannot read tor's authentication cookie {exc.cookie_path}: run the relay as a user "
            "who may read it (for the Debian tor: a member of the debian-tor group)"
        ) from None
    except stem.connection.MissingPassword:
        controller.close()
        raise OnionError(
            f"the tor control port at {where} wants a password; veil uses cookie "
            "authentication: set `CookieAuthentication 1` in the torrc"
        ) from None
    except stem.connection.AuthenticationFailure as exc:
        controller.close()
        raise OnionError(f"tor's control port at {where} refused authentication: {exc}") from None
    return controller


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if "refused" in text.lower():
        return "connection refused"
    return text or type(exc).__name__


async def _read_port_file(path: Path) -> int:
    """The control port a launched tor wrote (``PORT=127.0.0.1:N``); tor writes it when its
    listener opens, about when it reports "Bootstrapped 0%". Bounded by the caller."""
    for _ in range(int(LAUNCH_TIMEOUT / 0.05) + 1):
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        if text.strip().startswith("PORT=") and text.endswith("\n"):
            return int(text.strip().rsplit(":", 1)[1])
        await trio.sleep(0.05)  # poll interval while tor opens its control port
    raise trio.TooSlowError


def _stop_process(process: Any) -> None:
    """Stop a tor we launched, by its process id: SIGTERM, then SIGKILL. Bounded."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except Exception:
        process.kill()
        with suppress(Exception):
            process.wait(timeout=STOP_TIMEOUT)


# ---- what the relay command uses ---------------------------------------------------------


@asynccontextmanager
async def open_tor(
    *, control: str | None, launch: bool, data_dir: Path, torrc: Path | None = None
) -> AsyncIterator[Tor]:
    """A controller for the onion service, closed (service removed, launched tor stopped)
    on the way out, however that happens."""
    if launch:
        tor = await Tor.launch(data_dir, read_torrc(torrc) if torrc else None)
    else:
        tor = await Tor.connect(control or DEFAULT_CONTROL)
    try:
        yield tor
    finally:
        with trio.CancelScope(shield=True):
            await tor.aclose()


async def reload_onion_clients(tor: Tor, end_connections: Callable[[], int], *, periodic: bool = False) -> bool:
    """On SIGHUP: re-read a private relay's client directory and, if it changed, publish
    the service again for the new set of clients; after a revocation, end every live
    connection too (``end_connections``; see the module's docstring). Problems are logged,
    never raised: the relay keeps running, and another SIGHUP tries again. True if it
    re-published. ``periodic``: the hourly check for keys that expired (quiet when
    nothing changed)."""
    async with tor.publishing:
        if tor.key_file is None:
            return False  # not published yet: publish reads the clients itself
        if tor.private_dir is None:
            if periodic:
                return False
            log.warning("SIGHUP: this relay's onion service is public (started without --private); "
                        "client keys take effect only with --private")
            return False
        try:
            clients = public_keys(live(read_clients(tor.private_dir)))
        except ClientError as exc:
            log.error("SIGHUP: onion clients not reloaded: %s", exc)
            return False
        if clients == tor.clients and tor.service is not None:
            if not periodic:
                log.info("SIGHUP: onion clients unchanged (%d)", len(clients))
            return False
        revoked = (tor.clients or frozenset()) - clients
        try:
            await tor.republish(clients, revoked=bool(revoked))
            log.info("onion service re-published for %d client(s)", len(clients))
            return True
        except OnionError as exc:
            log.error("the onion service could not be re-published (%s); send SIGHUP again to retry", exc)
            return False
        finally:
            if revoked:
                ended = end_connections()
                log.info("a client was revoked: ended %d live connection(s); the others reconnect", ended)
