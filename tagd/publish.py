"""Wire out: the ZeroMQ publisher of ``tags.<stream>`` and ``events.<stream>``.

Messages are multipart ``[topic, JSON]`` (UTF-8); docs/topics.md is their reference and
``SCHEMA_VERSION`` their version. The socket is bound by ``Publisher.__init__`` (so a
port in use is a start-up error) and from then on used by the inference worker alone.

Publishing never blocks inference. The socket is an XPUB with ``XPUB_NODROP`` so that a
send to a subscriber whose queue is full (``sndhwm``) fails at once instead of being
dropped silently: that miss is counted in ``tagd_publish_dropped_total`` and the message
is then sent in the ordinary lossy way, so the other subscribers still get it.

With ``[security]`` set the socket is a CURVE server: only subscribers whose public key
is allowed complete the handshake (tagd/sockets.py). Its ``PeerMonitor`` counts
subscribers that leave or are refused, read by a thread of its own
(``tagd-publish-monitor``, from ``start_monitor()``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import zmq

from tagd.card import ModelCard
from tagd.metrics import PUBLISH_SOCKET, Metrics
from tagd.sockets import CurveServer, MonitorThread, PeerMonitor
from tagd.tagger import Prediction

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TAGS_TOPIC = "tags"
EVENTS_TOPIC = "events"
SCORE_DECIMALS = 6  # float32 carries ~7 significant digits; more is noise on the wire
MAX_SUBSCRIPTION_BYTES = 1024  # what a subscriber may send: subscriptions to topic prefixes


class PublishError(RuntimeError):
    """The publisher could not bind its address."""


def topic(kind: str, stream: str) -> str:
    return f"{kind}.{stream}"


def tags_message(
    prediction: Prediction,
    card: ModelCard,
    *,
    captured_at: float,
    published_at: float,
    ingest_ms: float,
    queue_ms: float,
    inference_ms: float,
    total_ms: float,
    batch_size: int,
    remote_ms: float | None = None,
) -> dict[str, Any]:
    """The tags.<stream> message (docs/topics.md); ``remote_ms``: a remote engine's
    round trip for this window (part of ``inference_ms``), None for a local engine."""
    rate = card.sample_rate
    latency_ms = {
        "ingest": round(ingest_ms, 3),
        "queue": round(queue_ms, 3),
        "inference": round(inference_ms, 3),
    }
    if remote_ms is not None:
        latency_ms["remote"] = round(float(remote_ms), 3)
    latency_ms["total"] = round(total_ms, 3)
    return {
        "schema": SCHEMA_VERSION,
        "stream": prediction.stream,
        "seq": prediction.seq,
        "model": card.name,
        "window": {
            "start_s": round(prediction.start / rate, 6),
            "end_s": round(prediction.end / rate, 6),
            "segments": prediction.segments,
        },
        "captured_at": round(captured_at, 6),
        "published_at": round(published_at, 6),
        "latency_ms": latency_ms,
        "batch_size": batch_size,
        "scores": {
            tag: round(float(score), SCORE_DECIMALS)
            for tag, score in zip(card.tags, prediction.scores, strict=True)
        },
        "tags": prediction.over,
        "active": prediction.active,
    }


def event_messages(
    prediction: Prediction, card: ModelCard, *, published_at: float
) -> list[dict[str, Any]]:
    rate = card.sample_rate
    return [
        {
            "schema": SCHEMA_VERSION,
            "stream": prediction.stream,
            "seq": prediction.seq,
            "model": card.name,
            "tag": event.tag,
            "state": event.state,
            "score": round(event.score, SCORE_DECIMALS),
            "threshold": round(event.threshold, SCORE_DECIMALS),
            "window": {
                "start_s": round(prediction.start / rate, 6),
                "end_s": round(prediction.end / rate, 6),
            },
            "published_at": round(published_at, 6),
        }
        for event in prediction.events
    ]


class Publisher:
    def __init__(
        self,
        context: zmq.Context,
        address: str,
        metrics: Metrics,
        *,
        sndhwm: int = 1000,
        linger_ms: int = 200,
        curve: CurveServer | None = None,
    ) -> None:
        self._metrics = metrics
        self._socket = context.socket(zmq.XPUB)
        self._socket.setsockopt(zmq.SNDHWM, sndhwm)
        self._socket.setsockopt(zmq.LINGER, linger_ms)
        self._socket.setsockopt(zmq.XPUB_NODROP, 1)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_BYTES)
        if curve is not None:
            curve.secure(self._socket)
        self.monitor = PeerMonitor(self._socket, PUBLISH_SOCKET, metrics)
        self._monitor_thread: MonitorThread | None = None
        try:
            self._socket.bind(address)
        except zmq.ZMQError as exc:
            self.monitor.close()
            self._socket.close(linger=0)
            raise PublishError(f"cannot publish on {address}: {exc.strerror}") from None
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def send(self, topic_name: str, message: dict[str, Any]) -> bool:
        """Publish one message; False when a slow subscriber missed it (counted)."""
        frames = [topic_name.encode(), json.dumps(message, separators=(",", ":")).encode()]
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            pass
        # Some subscriber's queue is full: count its miss, deliver to everyone else.
        self._metrics.publish_dropped.labels(topic_name.split(".", 1)[0]).inc()
        self._socket.setsockopt(zmq.XPUB_NODROP, 0)
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
        finally:
            self._socket.setsockopt(zmq.XPUB_NODROP, 1)
        return False

    def read_subscriptions(self) -> list[bytes]:
        """The topic prefixes subscribed to since the last call.

        XPUB queues every (un)subscription for the application: the owner reads them now
        and then (the daemon once a batch, not once a message) so that they do not pile up.
        """
        subscribed = []
        while self._socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            notice = self._socket.recv()
            if notice[:1] == b"\x01":
                subscribed.append(notice[1:])
        return subscribed

    def start_monitor(self) -> None:
        """Count peers that leave or are refused, from now on, in a thread of their own."""
        self._monitor_thread = MonitorThread(self.monitor, "tagd-publish-monitor")
        self._monitor_thread.start()

    def close(self) -> None:
        if self._monitor_thread is not None and not self._monitor_thread.stop(timeout=0.5):
            log.warning("the publisher's monitor thread did not stop; leaving its socket")
            self._socket.close()
            return
        self.monitor.close()
        self._socket.close()
