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

Errors are ``OnionError`` with one line written for the operator.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

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
    async def publish(self, key_file: Path, target_port: int, timeout: float = PUBLISH_TIMEOUT) -> OnionService:
        """Create (or restore from ``key_file``) the onion service for 127.0.0.1:``target_port``
        and wait until its descriptor is uploaded."""
        service_id = await trio.to_thread.run_sync(
            self._publish_sync, key_file, target_port, timeout, abandon_on_cancel=True
        )
        return OnionService(service_id)

    def _publish_sync(self, key_file: Path, target_port: int, timeout: float) -> str:
        stem = _stem()
        deadline = time.monotonic() + timeout
        events: queue.Queue[Any] = queue.Queue()
        self.controller.add_event_listener(events.put, stem.control.EventType.HS_DESC)
        try:
            key = load_key(key_file)
            try:
                response = self.controller.create_ephemeral_hidden_service(
                    {VIRTUAL_PORT: f"127.0.0.1:{target_port}"},
                    key_type=KEY_TYPE if key else "NEW",
                    key_content=key or KEY_TYPE,
                    detached=False,
                    await_publication=False,
                )
            except stem.ControllerError as exc:
                raise OnionError(f"{self.where} refused to create the onion service: {exc}") from None
            service_id = response.service_id
            if key is None:
                save_key(key_file, response.private_key)
                log.info("new onion key stored in %s", key_file)
            self.service = OnionService(service_id)
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
