"""Insert tagd's tags into Liquidsoap as metadata, through Liquidsoap's server.

Usage: python examples/liquidsoap_bridge.py TAGD_ENDPOINT SERVER STREAM=SOURCE_ID [...]
e.g.   python examples/liquidsoap_bridge.py tcp://127.0.0.1:5560 127.0.0.1:1234 radio1=live
       python examples/liquidsoap_bridge.py tcp://127.0.0.1:5560 /run/liquidsoap/radio.sock radio1=live

SERVER is Liquidsoap's telnet server (HOST:PORT) or its Unix socket (a path). In the
Liquidsoap script (2.x; tested with 2.1.3):

    settings.server.telnet.set(true)              # telnet on 127.0.0.1:1234, or
    settings.server.socket.set(true)              # a Unix socket (settings.server.socket.path)
    live = server.insert_metadata(id="live", live)  # registers the command live.insert

Plain ``insert_metadata(id=...)`` registers no server command in 2.x: Liquidsoap answers
every line with ``ERROR: unknown command``, which the bridge reports.

When the tags that are on for a stream change (``active`` in tags.<stream>, after tagd's
hysteresis; docs/topics.md), the bridge sends one line,

    live.insert tagd_tags="[\\"rock\\",\\"guitar\\"]",tagd_model="fcn4"

``tagd_tags`` is a JSON array, so a tag name may hold a comma; in Liquidsoap,
``let json.parse (tags : [string]) = m["tagd_tags"]`` gives the list. What it guarantees:

- every reply is read: "Done" is success; an ``ERROR`` is logged at ERROR level at once
  (with the command and the reply), and the insert is retried every RETRY_S until it
  succeeds. A bridge whose every insert is refused is misconfigured (a wrong source id, a
  script without ``server.insert_metadata``), so while the refusals last the ERROR line
  comes again every REFUSED_LOG_INTERVAL_S with the count since the last one; the first
  insert accepted again is logged at INFO;
- Liquidsoap restarted, or unreachable for a while: the bridge reconnects and sends each
  stream's current tags again, so a fresh Liquidsoap has them without waiting for a change;
- changes that come faster than Liquidsoap applies them (it merges inserts that come
  close together: of five inside a millisecond only the last reaches ``on_metadata``)
  are coalesced: at most one insert per source every MIN_INSERT_INTERVAL_S, and always
  the latest tags.
Needs pyzmq only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import sys
import time
from dataclasses import dataclass

import zmq

log = logging.getLogger("liquidsoap_bridge")

REPLY_TIMEOUT_S = 5.0  # Liquidsoap answers a command in milliseconds
RETRY_S = 2.0  # after an ERROR reply, or while Liquidsoap cannot be reached
REFUSED_LOG_INTERVAL_S = 30.0  # while inserts are refused, the ERROR line again this often
# Inserts closer together than a frame (0.04 s by default) may be merged; five frames
# leave room for a busy Liquidsoap and are still far below a tag change's pace (a hop).
MIN_INSERT_INTERVAL_S = 0.2
# Liquidsoap's server closes a connection idle for settings.server.timeout (30 s by
# default); a harmless command more often keeps it, so a drop means a restart.
KEEPALIVE_S = 10.0
KEEPALIVE_COMMAND = "uptime"


def quote(value: str) -> str:
    """A Liquidsoap string literal, on one line."""
    one_line = value.replace("\r", " ").replace("\n", " ")
    return '"' + one_line.replace("\\", "\\\\").replace('"', '\\"') + '"'


def insert_command(source_id: str, fields: dict[str, str]) -> str:
    return f"{source_id}.insert " + ",".join(f"{k}={quote(v)}" for k, v in fields.items())


class Connection:
    """One connection to Liquidsoap's server: telnet (HOST:PORT) or a Unix socket (a path)."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.sock: socket.socket | None = None

    def open(self) -> None:
        """Connect; raises OSError."""
        if "/" in self.server:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(REPLY_TIMEOUT_S)
                sock.connect(self.server)
            except OSError:
                sock.close()
                raise
        else:
            host, _, port = self.server.rpartition(":")
            sock = socket.create_connection((host, int(port)), timeout=REPLY_TIMEOUT_S)
        self.sock, self.file = sock, sock.makefile("rwb")

    def command(self, line: str) -> list[str]:
        """Send one command; return the reply's lines before "END". Raises OSError."""
        assert self.sock is not None
        self.file.write(line.encode() + b"\n")
        self.file.flush()
        reply = []
        while (raw := self.file.readline()).strip() != b"END":
            if not raw:
                raise ConnectionError("Liquidsoap closed the connection")
            reply.append(raw.decode(errors="replace").strip())
        return reply

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.file.close()
                self.sock.close()
        self.sock = None


@dataclass
class Refusals:
    """A stream's inserts refused since its last accepted one, and what was logged."""

    error: str  # Liquidsoap's reply, as last logged
    logged_at: float
    total: int = 1
    since_logged: int = 0


class Bridge:
    """tags.<stream> in, ``SOURCE.insert`` out; the state that makes it reliable."""

    def __init__(self, server: str, sources: dict[str, str]) -> None:
        self.sources = sources  # stream -> Liquidsoap source id
        self.liquidsoap = Connection(server)
        self.wanted: dict[str, dict[str, str]] = {}  # the latest tags of each stream
        self.applied: dict[str, dict[str, str]] = {}  # what this Liquidsoap acknowledged
        self.sent_at: dict[str, float] = {}
        self.retry_at: dict[str, float] = {}
        self.refused: dict[str, Refusals] = {}  # until the stream's next insert succeeds
        self.reconnect_at = 0.0
        self.unreachable: str | None = None  # the connection error logged
        self.last_command_at = 0.0

    # -- tagd's side ---------------------------------------------------------------------
    def on_tags(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        stream = frames[0].decode(errors="replace").removeprefix("tags.")
        if stream not in self.sources:
            return  # tags.radio10 also matches the subscription tags.radio1
        try:
            message = json.loads(frames[1])
            active, model = list(map(str, message["active"])), str(message["model"])
        except (ValueError, KeyError, TypeError) as exc:  # not what docs/topics.md says
            log.warning("%s: skipped a message that is not tags.<stream> JSON: %r", stream, exc)
            return
        self.wanted[stream] = {
            "tagd_tags": json.dumps(active, ensure_ascii=False, separators=(",", ":")),
            "tagd_model": model,
        }

    # -- Liquidsoap's side -------------------------------------------------------------------
    def connected(self) -> bool:
        return self.liquidsoap.sock is not None

    def connect(self, now: float) -> None:
        if self.connected() or now < self.reconnect_at:
            return
        try:
            self.liquidsoap.open()
        except OSError as exc:
            self.reconnect_at = now + RETRY_S
            if self.unreachable is None:
                log.warning(
                    "cannot reach Liquidsoap at %s: %s; retrying every %.0f s",
                    self.liquidsoap.server,
                    exc,
                    RETRY_S,
                )
            self.unreachable = str(exc)
            return
        log.info("connected to Liquidsoap at %s", self.liquidsoap.server)
        self.unreachable = None
        self.applied.clear()  # a new connection may be a new Liquidsoap: send everything
        self.last_command_at = now

    def disconnect(self, why: str, now: float) -> None:
        log.warning("lost Liquidsoap at %s (%s); reconnecting", self.liquidsoap.server, why)
        self.liquidsoap.close()
        self.reconnect_at = now  # at once: a restarted Liquidsoap is usually back

    def due(self, stream: str) -> float:
        return max(
            self.retry_at.get(stream, 0.0), self.sent_at.get(stream, 0.0) + MIN_INSERT_INTERVAL_S
        )

    def pending(self) -> list[str]:
        return [s for s, fields in self.wanted.items() if self.applied.get(s) != fields]

    def send_pending(self, now: float) -> None:
        for stream in self.pending():
            if not self.connected():
                return
            if now < self.due(stream):
                continue
            fields = self.wanted[stream]
            line = insert_command(self.sources[stream], fields)
            try:
                reply = self.liquidsoap.command(line)
            except OSError as exc:
                self.disconnect(str(exc), now)
                return
            self.sent_at[stream] = self.last_command_at = now
            if reply == ["Done"]:
                self.applied[stream] = fields
                self.retry_at.pop(stream, None)
                if (refusals := self.refused.pop(stream, None)) is not None:
                    log.info(
                        "%s: Liquidsoap accepts the inserts again, after %d refused",
                        stream,
                        refusals.total,
                    )
                log.info("%s: %s", stream, line)
                continue
            self.on_refused(stream, line, " ".join(reply) or "(an empty reply)", now)
            self.retry_at[stream] = now + RETRY_S

    def on_refused(self, stream: str, line: str, error: str, now: float) -> None:
        """Log a refused insert at ERROR: a new error at once, the same one again every
        REFUSED_LOG_INTERVAL_S while it lasts, with how many were refused in between."""
        refusals = self.refused.get(stream)
        if refusals is None or refusals.error != error:
            log.error(
                "%s: Liquidsoap refused %s: %s; retrying every %.0f s",
                stream,
                line,
                error,
                RETRY_S,
            )
            total = refusals.total + 1 if refusals else 1
            self.refused[stream] = Refusals(error, logged_at=now, total=total)
            return
        refusals.total += 1
        refusals.since_logged += 1
        if now - refusals.logged_at < REFUSED_LOG_INTERVAL_S:
            return
        log.error(
            "%s: Liquidsoap still refuses the inserts: %d refused in the last %.0f s, "
            "%d since the first; the last: %s: %s",
            stream,
            refusals.since_logged,
            now - refusals.logged_at,
            refusals.total,
            line,
            error,
        )
        refusals.logged_at, refusals.since_logged = now, 0

    def keep_alive(self, now: float) -> None:
        if self.connected() and now - self.last_command_at >= KEEPALIVE_S:
            self.last_command_at = now
            try:
                self.liquidsoap.command(KEEPALIVE_COMMAND)
            except OSError as exc:
                self.disconnect(str(exc), now)

    def next_wake(self, now: float) -> float:
        """Seconds until something is due (an insert, a reconnection, a keep-alive)."""
        times = [self.due(stream) for stream in self.pending()]
        times.append(self.last_command_at + KEEPALIVE_S if self.connected() else self.reconnect_at)
        return min(max(0.0, min(times) - now), 1.0)

    # -- the loop ------------------------------------------------------------------------------
    def run(self, endpoint: str) -> None:
        sub = zmq.Context.instance().socket(zmq.SUB)
        for stream in self.sources:
            sub.setsockopt_string(zmq.SUBSCRIBE, f"tags.{stream}")
        sub.connect(endpoint)
        while True:
            now = time.monotonic()
            self.connect(now)
            poller = zmq.Poller()
            poller.register(sub, zmq.POLLIN)
            if self.connected():
                poller.register(self.liquidsoap.sock, zmq.POLLIN)
            ready = dict(poller.poll(self.next_wake(now) * 1000))
            now = time.monotonic()
            if self.connected() and self.liquidsoap.sock in ready:
                # Between commands Liquidsoap only speaks to hang up: EOF when it stops,
                # "Connection timed out.. Bye!" after settings.server.timeout.
                self.disconnect("it closed the connection", now)
                self.connect(now)
            if sub in ready:
                while True:  # everything queued: only each stream's latest tags matter
                    try:
                        self.on_tags(sub.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            self.send_pending(now)
            self.keep_alive(now)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if len(sys.argv) < 4 or not all("=" in arg for arg in sys.argv[3:]):
        sys.exit(__doc__)
    endpoint, server = sys.argv[1], sys.argv[2]
    sources = dict(arg.split("=", 1) for arg in sys.argv[3:])  # stream -> source id
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as on Ctrl-C
    context = zmq.Context.instance()
    try:
        Bridge(server, sources).run(endpoint)
    finally:
        context.destroy(linger=0)  # sockets closed now, not by the interpreter's exit


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
