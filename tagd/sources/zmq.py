"""ZeroMQ inputs: ffmpeg's raw PCM output and the multi-stream protocol.

``zmq+raw://HOST:PORT?format=s16le&rate=44100&channels=2&stream=NAME`` connects a SUB to
the PUB that ``ffmpeg ... -f s16le zmq:tcp://HOST:PORT`` binds, subscribes to everything
and treats the payloads as one byte stream: messages need not hold whole sample frames.
ZeroMQ reconnects by itself, so tagd may start before or after ffmpeg (a SUB misses what
was published before it joined).

``zmq+sub://HOST:PORT`` (connects a SUB) and ``zmq+pull://HOST:PORT`` (binds a PULL) carry
many streams on one socket as multipart ``[stream id, JSON header, PCM]``; see
docs/protocol.md. Each message is validated; a bad one is dropped, counted in
``tagd_malformed_messages_total{input, reason}`` and logged (rate-limited). A frame over
``limits.max_message_bytes`` never reaches tagd (ZMQ_MAXMSGSIZE: ZeroMQ disconnects the
peer, counted in ``tagd_peer_disconnects_total``); a message whose frames together are
over it is refused as ``too_large``. Multi-stream sockets are CURVE servers when
``[security]`` is set (tagd/sockets.py).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import zmq

from tagd.audio import PCM_FORMATS, frame_bytes
from tagd.config import MAX_CHANNELS, RATE_RANGE, STREAM_NAME
from tagd.metrics import (
    MALFORMED_CHANNELS,
    MALFORMED_FORMAT,
    MALFORMED_FRAMES,
    MALFORMED_HEADER,
    MALFORMED_NOT_ALLOWED,
    MALFORMED_PCM,
    MALFORMED_RATE,
    MALFORMED_STREAM_ID,
    MALFORMED_TOO_LARGE,
    MALFORMED_UNHANDLED,
)
from tagd.sockets import PeerMonitor
from tagd.sources import POLL_INTERVAL_S, Source, SourceError
from tagd.stream import Arrival, Stream, StreamRefused

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 4096
GATHER_S = 0.002  # a drained input's sleep before it takes the next burst (_read)
MAX_STREAM_ID_BYTES = 64
HEADER_REQUIRED = ("format", "rate", "channels")


class MalformedMessage(ValueError):
    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


class _ZmqSource(Source):
    socket_type: int
    bind: bool
    _socket: zmq.Socket | None = None
    secured = True

    @classmethod
    def address_of(cls, spec) -> str:
        return f"tcp://{spec.url_parts.netloc}"

    @classmethod
    def check(cls, spec, path: str, security) -> list[str]:
        parts = spec.url_parts
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            return [f"{path}.url: {spec.scheme} needs host:port, got {spec.url!r}"]
        return []

    def reserve(self) -> None:
        if self.bind:  # a port in use fails now; connecting cannot fail that way
            self._open_socket()

    def open(self) -> None:
        if self._socket is None:
            self._open_socket()

    def _open_socket(self) -> None:
        self._socket = self.context.socket(self.socket_type)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        if self.socket_type == zmq.SUB:
            self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        if self.curve is not None:
            self.curve.secure(self._socket)
        self._monitor = PeerMonitor(self._socket, self.label, self.metrics)
        try:
            if self.bind:
                self._socket.bind(self.spec.address)
            else:
                self._socket.connect(self.spec.address)
        except zmq.ZMQError as exc:
            self._close()
            verb = "bind" if self.bind else "connect to"
            raise SourceError(
                f"input {self.label}: cannot {verb} {self.spec.address}: {exc.strerror}"
            ) from None
        log.info(
            "input %s: %s %s%s",
            self.label,
            "bound" if self.bind else "connecting to",
            self.spec.address,
            " (CURVE)" if self.curve else "",
        )

    def _read(self) -> None:
        # Messages are taken in bursts: once the queue is drained, the reader sleeps
        # GATHER_S for the next messages to gather instead of blocking on the next one.
        # A reader blocked on an empty queue costs ZeroMQ a wake-up for each message
        # (~36 us of CPU a message at 6,000 a second on a 2-core Xeon, against ~15 us
        # taken in bursts); the sleep adds at most GATHER_S to a message's arrival time.
        # Only when a sleep gathered nothing does the reader block (with a timeout, to
        # see a stop), so a quiet socket costs no polling. The peer monitor is drained
        # when the socket is quiet, and at least every POLL_INTERVAL_S under load.
        socket = self._socket
        socket.setsockopt(zmq.RCVTIMEO, int(POLL_INTERVAL_S * 1000))
        drain_at = 0.0
        gathering = False  # a message came since the last sleep
        while not self._stop.is_set():
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                if gathering:
                    gathering = False
                    time.sleep(GATHER_S)
                    continue
                try:
                    frames = socket.recv_multipart()
                except zmq.Again:
                    frames = None
            now = time.monotonic()
            if frames is None or now >= drain_at:
                self._monitor.drain()
                drain_at = now + POLL_INTERVAL_S
            if frames is None:
                continue
            gathering = True
            try:
                self._handle(frames, Arrival.now())
            except Exception as exc:  # a bug met by one message must not end the input
                log.debug("input %s: message failed", self.label, exc_info=True)
                self.count_malformed(MALFORMED_UNHANDLED, repr(exc))

    def _handle(self, frames: list[bytes], arrival: Arrival) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        if self._socket is not None:
            self._monitor.close()
            self._socket.close()
            self._socket = None


class RawZmqSource(_ZmqSource):
    """One stream of raw PCM bytes from ffmpeg's zmq output (a PUB)."""

    schemes = ("zmq+raw",)
    options = ("format", "rate", "channels")
    required = dict.fromkeys(options, "what ffmpeg was told to send")
    socket_type = zmq.SUB
    bind = False

    @classmethod
    def check(cls, spec, path: str, security) -> list[str]:
        found = super().check(spec, path, security)
        if spec.curve:
            found.append(
                f"{path}.curve: ffmpeg's zmq output cannot do CURVE; see docs/operations.md"
            )
        elif spec.curve is None and security is not None and security.enabled:
            found.append(
                f"{path}.curve: [security] turns CURVE on, which ffmpeg's zmq "
                f"output cannot do: keep ffmpeg on this host and set curve = false "
                f"(docs/operations.md)"
            )
        return found

    def open(self) -> None:
        super().open()
        self._stream: Stream = self.hub.open(self.spec.stream_name(), self.label, pinned=True)

    def _handle(self, frames: list[bytes], arrival: Arrival) -> None:
        if len(frames) != 1:
            self.count_malformed(MALFORMED_FRAMES, f"{len(frames)} frames; ffmpeg sends 1")
            return
        spec = self.spec
        self._stream.push_pcm(frames[0], spec.format, spec.rate, spec.channels, arrival)


class MultiStreamZmqSource(_ZmqSource):
    """Many streams on one socket: multipart [stream id, JSON header, PCM]."""

    schemes = ("zmq+sub", "zmq+pull")
    multi_stream = True
    options = ("streams",)
    needs_stream_name = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.socket_type = zmq.SUB if self.spec.scheme == "zmq+sub" else zmq.PULL
        self.bind = self.spec.scheme == "zmq+pull"
        self._allowed = set(self.spec.streams)

    def _handle(self, frames: list[bytes], arrival: Arrival) -> None:
        try:
            name, header, pcm = parse_message(frames, self.limits.max_message_bytes)
            if self._allowed and name not in self._allowed:
                raise MalformedMessage(MALFORMED_NOT_ALLOWED, f"stream {name!r} is not in streams=")
            stream = self.hub.open(name, self.label)
            stream.push_pcm(
                pcm,
                header["format"],
                header["rate"],
                header["channels"],
                arrival,
                header.get("seq"),
            )
        except (MalformedMessage, StreamRefused) as exc:
            self.count_malformed(exc.reason, exc)


def parse_message(
    frames: list[bytes], max_bytes: int | None = None
) -> tuple[str, dict[str, Any], bytes]:
    """Validate one multi-stream message; raise MalformedMessage with a metrics reason."""
    if max_bytes is not None and sum(map(len, frames)) > max_bytes:
        raise MalformedMessage(MALFORMED_TOO_LARGE, f"message over {max_bytes} bytes")
    if len(frames) != 3:
        raise MalformedMessage(MALFORMED_FRAMES, f"expected 3 frames, got {len(frames)}")
    raw_id, raw_header, pcm = frames
    if len(raw_id) > MAX_STREAM_ID_BYTES:
        raise MalformedMessage(MALFORMED_STREAM_ID, "stream id longer than 64 bytes")
    try:
        name = raw_id.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedMessage(MALFORMED_STREAM_ID, "stream id is not UTF-8") from None
    if not STREAM_NAME.match(name):
        raise MalformedMessage(MALFORMED_STREAM_ID, f"stream id {name!r} is not a valid name")
    header = _parse_header(raw_header)
    if len(pcm) == 0:
        raise MalformedMessage(MALFORMED_PCM, "empty PCM frame")
    # Whole sample frames only: a message lost on the way must not shift every later
    # sample of the stream by a byte (zmq+raw, one byte stream from ffmpeg, differs).
    size = frame_bytes(header["format"], header["channels"])
    if len(pcm) % size:
        raise MalformedMessage(
            MALFORMED_PCM, f"{len(pcm)} bytes of PCM is not a whole number of {size}-byte frames"
        )
    return name, header, pcm


def _parse_header(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_HEADER_BYTES:
        raise MalformedMessage(MALFORMED_HEADER, f"header longer than {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # [[[[... nests deep
        raise MalformedMessage(MALFORMED_HEADER, "header is not JSON") from None
    if not isinstance(header, dict):
        raise MalformedMessage(MALFORMED_HEADER, "header is not a JSON object")
    missing = [key for key in HEADER_REQUIRED if key not in header]
    if missing:
        raise MalformedMessage(MALFORMED_HEADER, f"header lacks {', '.join(missing)}")
    if not isinstance(header["format"], str) or header["format"] not in PCM_FORMATS:
        raise MalformedMessage(MALFORMED_FORMAT, f"unknown format {header['format']!r}")
    if not _is_int(header["rate"]) or not RATE_RANGE[0] <= header["rate"] <= RATE_RANGE[1]:
        raise MalformedMessage(MALFORMED_RATE, f"rate {header['rate']!r} out of range")
    if not _is_int(header["channels"]) or not 1 <= header["channels"] <= MAX_CHANNELS:
        raise MalformedMessage(MALFORMED_CHANNELS, f"channels {header['channels']!r} out of range")
    if "seq" in header and (not _is_int(header["seq"]) or header["seq"] < 0):
        raise MalformedMessage(MALFORMED_HEADER, f"seq {header['seq']!r} is not a count")
    if "t" in header and (
        not isinstance(header["t"], int | float) or isinstance(header["t"], bool)
    ):
        raise MalformedMessage(MALFORMED_HEADER, f"t {header['t']!r} is not a number")
    return header


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
