"""What every ZeroMQ socket of tagd shares: CURVE security and a monitor of its peers.

**CURVE.** With ``[security]`` set, tagd is the CURVE *server* on each socket it secures,
whether that socket binds (``zmq+pull``, the publisher) or connects (``zmq+sub``): in
ZeroMQ the CURVE roles do not depend on who binds. Every peer (producer or subscriber)
is a CURVE client holding its own key pair and tagd's public key; a ZAP handler (pyzmq's
``ThreadAuthenticator``) admits only the public keys found in
``security.curve_allowed_clients``. A peer without CURVE, or with a key not listed,
fails the handshake: nothing it sends is read and nothing is sent to it.

**Monitoring.** ``PeerMonitor`` reads a socket's monitor events and counts
``tagd_peer_disconnects_total{socket}`` and ``tagd_handshake_failures_total{socket,
reason}``. The monitor is a socket of its own with one owner: an input's reader thread
polls it beside the input's socket; the publisher's owners (the inference workers) sleep
on the batcher, not on a poller, so ``MonitorThread`` gives its monitor a thread of its
own. A frame over ``ZMQ_MAXMSGSIZE`` is not delivered: ZeroMQ drops the connection, so
it shows as a disconnect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from tagd.metrics import HANDSHAKE_AUTH, HANDSHAKE_OTHER, HANDSHAKE_PROTOCOL, Metrics
from tagd.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)
_limited = RateLimitedLog(log)

MONITORED_EVENTS = (
    zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
HANDSHAKE_REASONS = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: HANDSHAKE_AUTH,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: HANDSHAKE_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: HANDSHAKE_OTHER,
}


class SecurityError(RuntimeError):
    """Keys or the allowed-clients directory cannot be used; the message says which."""


@dataclass(frozen=True)
class CurveServer:
    """tagd's CURVE key pair (from a ``.key_secret`` file) and who may connect."""

    public_key: bytes
    secret_key: bytes
    allowed_clients: Path

    @classmethod
    def load(cls, secret_file: str | Path, allowed_clients: str | Path) -> CurveServer:
        secret_file, allowed_clients = Path(secret_file), Path(allowed_clients)
        try:
            public, secret = zmq.auth.load_certificate(secret_file)
        except OSError as exc:
            raise SecurityError(f"cannot read the CURVE key {secret_file}: {exc}") from None
        except ValueError as exc:
            raise SecurityError(f"{secret_file} is not a ZeroMQ certificate: {exc}") from None
        if not secret:
            raise SecurityError(
                f"{secret_file} holds no secret key: give the .key_secret file that "
                f"`tagd keys generate` wrote, not the public .key"
            )
        if not allowed_clients.is_dir():
            raise SecurityError(
                f"security.curve_allowed_clients: no such directory: {allowed_clients}"
            )
        return cls(public, secret, allowed_clients)

    def start_authenticator(self, context: zmq.Context) -> ThreadAuthenticator:
        """Start the ZAP handler of ``context`` admitting the allowed clients' keys."""
        clients = sorted(self.allowed_clients.glob("*.key"))
        if not clients:
            log.warning(
                "no public keys (*.key) in %s: every CURVE peer will be refused",
                self.allowed_clients,
            )
        authenticator = ThreadAuthenticator(context, log=logging.getLogger("tagd.auth"))
        authenticator.start()
        authenticator.configure_curve(domain="*", location=str(self.allowed_clients))
        log.info("CURVE on: %d allowed client key(s) from %s", len(clients), self.allowed_clients)
        return authenticator

    def secure(self, socket: zmq.Socket) -> None:
        """Make ``socket`` a CURVE server; call before bind or connect."""
        socket.curve_secretkey = self.secret_key
        socket.curve_publickey = self.public_key
        socket.curve_server = True  # no ZAP domain: the authenticator's "*" covers it


def secure_client(socket: zmq.Socket, server_key: str | Path, client_secret: str | Path) -> None:
    """Make ``socket`` a CURVE client of tagd: tagd's public ``.key`` file and this
    client's ``.key_secret`` (whose public half is in tagd's allowed clients)."""
    try:
        server_public, _ = zmq.auth.load_certificate(server_key)
        public, secret = zmq.auth.load_certificate(client_secret)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read a CURVE key: {exc}") from None
    if not secret:
        raise SecurityError(f"{client_secret} holds no secret key: give the .key_secret file")
    socket.curve_serverkey = server_public
    socket.curve_publickey = public
    socket.curve_secretkey = secret


def generate_keys(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (0600) into ``directory``."""
    directory = Path(directory)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    existing = [str(path) for path in (public, secret) if path.exists()]
    if existing:
        raise SecurityError(f"refusing to overwrite {', '.join(existing)}")
    directory.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0o077)  # the secret is never readable by others, not even briefly
    try:
        public_file, secret_file = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(umask)
    Path(public_file).chmod(0o644)
    return Path(public_file), Path(secret_file)


class PeerMonitor:
    """Counts a socket's peer disconnects and refused handshakes.

    The monitor is a second socket: read it (``drain``) in one thread only, the one
    that polls the monitored socket or a ``MonitorThread``, and ``close`` it before the
    monitored socket.
    """

    def __init__(self, socket: zmq.Socket, label: str, metrics: Metrics):
        self.label = label
        self._metrics = metrics
        self._owner = socket
        self.socket = socket.get_monitor_socket(MONITORED_EVENTS)

    def drain(self) -> None:
        while True:
            try:
                frames = self.socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(frames)
            kind, endpoint = event["event"], event["endpoint"].decode(errors="replace")
            if kind == zmq.EVENT_DISCONNECTED:
                self._metrics.peer_disconnects.labels(self.label).inc()
                log.debug("%s: peer %s disconnected", self.label, endpoint)
            elif kind in HANDSHAKE_REASONS:
                reason = HANDSHAKE_REASONS[kind]
                self._metrics.handshake_failures.labels(self.label, reason).inc()
                _limited.warning(
                    (self.label, reason),
                    "%s: refused a peer at %s (%s)",
                    self.label,
                    endpoint,
                    reason,
                )

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._owner.disable_monitor()
        self.socket.close(linger=0)


MONITOR_POLL_MS = 100  # how often a MonitorThread checks whether it should stop


class MonitorThread:
    """The one thread that reads a ``PeerMonitor``, for a socket whose users never poll.

    ``start()`` hands the monitor's socket to the thread; ``stop()`` joins it, after
    which the caller owns the socket again and may ``close`` the monitor.
    """

    def __init__(self, monitor: PeerMonitor, name: str) -> None:
        self.monitor = monitor
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.monitor.socket.poll(MONITOR_POLL_MS):
                self.monitor.drain()

    def stop(self, timeout: float = 1.0) -> bool:
        """Ask the thread to finish and wait; False if it is still running."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()
