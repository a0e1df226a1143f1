"""Every metric tagd exports, defined once against an injectable CollectorRegistry.

Tests build ``Metrics(CollectorRegistry())`` and read samples back by name; the daemon
builds one on a fresh registry and serves it with ``MetricsServer`` (``/metrics`` in the
Prometheus text format and ``/healthz``: 200 once the engine is loaded and warm, 503
before). docs/metrics.md lists them; keep the two in step.

Label values are bounded: ``stream`` by limits.max_streams (evicted streams' series are
removed), ``input`` by the config, ``reason`` by the constants below.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tagd.scoring import FULL

log = logging.getLogger(__name__)

# 1 ms to 30 s: a batch of CPU inference is tens of ms, a full queue is seconds.
LATENCY_BUCKETS = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    30.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# Why a window never reached the engine or the topic.
DROP_QUEUE_FULL = "queue_full"  # newer windows of its stream were waiting (fell behind)
DROP_STALE = "stale"  # waited longer than batching.max_queue_age_s
DROP_SHUTDOWN = "shutdown"  # pending when the daemon stopped
DROP_ENGINE_ERROR = "engine_error"  # the engine raised on its batch
DROP_REASONS = (DROP_QUEUE_FULL, DROP_STALE, DROP_SHUTDOWN, DROP_ENGINE_ERROR)

# Why an input message was refused (tagd_malformed_messages_total{reason}).
MALFORMED_TOO_LARGE = "too_large"  # all frames together over limits.max_message_bytes
MALFORMED_FRAMES = "frames"  # not the [stream, header, pcm] multipart shape
MALFORMED_STREAM_ID = "stream_id"  # stream id not UTF-8 or not a valid name
MALFORMED_HEADER = "header"  # header not a JSON object, a key missing, a bad seq or t
MALFORMED_FORMAT = "format"  # a sample format tagd does not know
MALFORMED_RATE = "rate"  # sample rate not an integer in config.RATE_RANGE
MALFORMED_CHANNELS = "channels"  # channels not an integer in 1..config.MAX_CHANNELS
MALFORMED_PCM = "pcm"  # PCM payload empty or not a whole number of sample frames
MALFORMED_OUT_OF_ORDER = "out_of_order"  # seq not after the stream's last: a repeat or late
MALFORMED_NOT_ALLOWED = "stream_not_allowed"  # stream id not in the input's allow-list
MALFORMED_STREAM_TAKEN = "stream_taken"  # stream id already fed by another input
MALFORMED_TOO_MANY_STREAMS = "too_many_streams"  # limits.max_streams reached
MALFORMED_UNHANDLED = "unhandled"  # raised an unexpected error in tagd: a bug, see the log
MALFORMED_REASONS = (
    MALFORMED_TOO_LARGE,
    MALFORMED_FRAMES,
    MALFORMED_STREAM_ID,
    MALFORMED_HEADER,
    MALFORMED_FORMAT,
    MALFORMED_RATE,
    MALFORMED_CHANNELS,
    MALFORMED_PCM,
    MALFORMED_OUT_OF_ORDER,
    MALFORMED_NOT_ALLOWED,
    MALFORMED_STREAM_TAKEN,
    MALFORMED_TOO_MANY_STREAMS,
    MALFORMED_UNHANDLED,
)

# Samples repaired on the way in (tagd_samples_cleaned_total{kind}).
CLEANED_NONFINITE = "nonfinite"  # NaN → 0, ±Inf → ±1
CLEANED_OUT_OF_RANGE = "out_of_range"  # finite but outside [-1, 1]: clipped
CLEANED_KINDS = (CLEANED_NONFINITE, CLEANED_OUT_OF_RANGE)

# Why a peer's connection attempt failed (tagd_handshake_failures_total{reason}).
HANDSHAKE_AUTH = "auth"  # CURVE key not in security.curve_allowed_clients
HANDSHAKE_PROTOCOL = "protocol"  # wrong mechanism (no CURVE where CURVE is required) or garbage
HANDSHAKE_OTHER = "other"
PUBLISH_SOCKET = "publish"  # the `socket` label of the publisher's connection metrics

# Why the as-run log (tagd/asrun.py) could not write (tagd_asrun_write_errors_total{reason}).
ASRUN_ERROR_DISK_FULL = "disk_full"
ASRUN_ERROR_LOCKED = "locked"  # another process held the file past the busy timeout
ASRUN_ERROR_UNWRITABLE = "unwritable"  # the path or its folder cannot be created or written
ASRUN_ERROR_NOT_A_DATABASE = "not_a_database"  # not SQLite, damaged, or a newer schema
ASRUN_ERROR_OTHER = "other"
# Why segments never reached it (tagd_asrun_segments_dropped_total{reason}).
ASRUN_DROP_QUEUE_FULL = "queue_full"  # the writer thread fell behind
ASRUN_DROP_WRITE_FAILED = "write_failed"  # over asrun.MAX_HELD while writes failed, or at exit


class Series:
    """One labelled series of a metric, looked up on first use and kept: the hot path
    pays ``labels()`` once per stream, and the series appears when first counted, as
    with ``labels()``. Drop it (with the stream) once ``Metrics.forget_stream`` ran."""

    __slots__ = ("_child", "_labels", "_metric")

    def __init__(self, metric, *labels: str) -> None:
        self._metric, self._labels, self._child = metric, labels, None

    def _series(self):
        if self._child is None:
            self._child = self._metric.labels(*self._labels)
        return self._child

    def inc(self, amount: float = 1.0) -> None:
        self._series().inc(amount)

    def set(self, value: float) -> None:
        self._series().set(value)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.end_to_end_latency = Histogram(
            "tagd_end_to_end_latency_seconds",
            "From the arrival of a window's last sample to the publication of its tags.",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.ingest_delay = Histogram(
            "tagd_ingest_delay_seconds",
            "From the arrival of a window's last sample to the window being ready: audio the "
            "resampler held back until its block was full.",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.queue_wait = Histogram(
            "tagd_queue_wait_seconds",
            "From a window being ready to its batch starting on the engine.",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.inference = Histogram(
            "tagd_inference_seconds",
            "Engine time per batch.",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = Histogram(
            "tagd_batch_size",
            "Windows per engine call.",
            registry=r,
            buckets=BATCH_SIZE_BUCKETS,
        )
        self.windows_published = Counter(
            "tagd_windows_published_total",
            "Predictions published on tags.<stream>.",
            ["stream"],
            registry=r,
        )
        self.windows_dropped = Counter(
            "tagd_windows_dropped_total",
            "Windows that never got a prediction, by reason.",
            ["stream", "reason"],
            registry=r,
        )
        self.publish_dropped = Counter(
            "tagd_publish_dropped_total",
            "Messages a slow subscriber missed (its queue was at publish.sndhwm).",
            ["topic"],
            registry=r,
        )
        self.events_published = Counter(
            "tagd_events_published_total",
            "Tag on/off events published on events.<stream>.",
            ["stream"],
            registry=r,
        )
        self.audio_received = Counter(
            "tagd_audio_received_seconds_total",
            "Seconds of audio received, at the source's own rate.",
            ["stream"],
            registry=r,
        )
        self.gaps = Counter(
            "tagd_stream_gaps_total",
            "Discontinuities: sequence numbers skipped, or data resuming after idle.",
            ["stream"],
            registry=r,
        )
        self.malformed = Counter(
            "tagd_malformed_messages_total",
            "Input messages refused, by input and reason.",
            ["input", "reason"],
            registry=r,
        )
        self.active_streams = Gauge(
            "tagd_active_streams",
            "Streams that received data within limits.idle_after_s.",
            registry=r,
        )
        self.known_streams = Gauge(
            "tagd_streams",
            "Streams known to the daemon, active or idle.",
            registry=r,
        )
        self.engine_errors = Counter(
            "tagd_engine_errors_total",
            "Batches the engine failed on.",
            registry=r,
        )
        self.samples_cleaned = Counter(
            "tagd_samples_cleaned_total",
            "Input samples repaired: NaN/Inf (nonfinite) or outside [-1, 1] (out_of_range).",
            ["stream", "kind"],
            registry=r,
        )
        self.stream_idle = Gauge(
            "tagd_stream_idle",
            "1 while a stream has had no data for limits.idle_after_s, else 0.",
            ["stream"],
            registry=r,
        )
        self.stream_misdeclared = Gauge(
            "tagd_stream_misdeclared",
            "1 while a PCM stream's audio looks declared wrong (format, rate or channels): "
            "it arrives at 2x or 0.5x real time, or mostly needs cleaning; the log names "
            "the likely cause.",
            ["stream"],
            registry=r,
        )
        self.idle_episodes = Counter(
            "tagd_stream_idle_episodes_total",
            "Times a stream went without data for limits.idle_after_s, however short the "
            "episode (tagd_stream_idle may be 1 between two scrapes only).",
            ["stream"],
            registry=r,
        )
        self.stream_last_audio = Gauge(
            "tagd_stream_last_audio_timestamp_seconds",
            "Unix time of the last audio a stream received.",
            ["stream"],
            registry=r,
        )
        self.last_predictions = LastPredictions()  # tagd_tag_score and tagd_tag_active
        r.register(self.last_predictions)
        self.peer_disconnects = Counter(
            "tagd_peer_disconnects_total",
            "Peers that disconnected (or were disconnected: a frame over max_message_bytes).",
            ["socket"],
            registry=r,
        )
        self.handshake_failures = Counter(
            "tagd_handshake_failures_total",
            "Connections refused during the ZeroMQ handshake (CURVE authentication).",
            ["socket", "reason"],
            registry=r,
        )
        self.ready = Gauge(
            "tagd_ready",
            "1 once the engine is loaded and warm and inputs are open.",
            registry=r,
        )
        self.engine_info = Info(
            "tagd_engine",
            "The model being served: card name, architecture, backend, card version, "
            "precision (float32, int8), and inference: incremental (from each stream's last "
            "window) or full.",
            registry=r,
        )
        self.window_updates = Counter(
            "tagd_window_updates_total",
            "Windows scored, by mode: incremental (from the stream's last window's state) or "
            "full (the whole window: a stream's first, after a gap or a dropped window, or "
            "with incremental inference off).",
            ["mode"],
            registry=r,
        )
        # engine triton:// (tagd.engines.triton); `server` is one of the URL's HOST:PORT
        self.triton_requests = Counter(
            "tagd_triton_requests_total",
            "Requests sent to a Triton server (windows, and the ENDs of forgotten streams).",
            ["server"],
            registry=r,
        )
        self.triton_failures = Counter(
            "tagd_triton_failures_total",
            "Requests a Triton server did not answer (unreachable) or refused (refused).",
            ["server", "reason"],
            registry=r,
        )
        self.triton_round_trip = Histogram(
            "tagd_triton_round_trip_seconds",
            "From sending a window to a Triton server to its scores coming back.",
            ["server"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.triton_sent = Counter(
            "tagd_triton_sent_bytes_total",
            "Audio bytes sent to a Triton server.",
            ["server"],
            registry=r,
        )
        self.triton_starts = Counter(
            "tagd_triton_sequence_starts_total",
            "Sequences (a stream's chain of windows) started on a Triton server, by reason.",
            ["server", "reason"],
            registry=r,
        )
        self.triton_up = Gauge(
            "tagd_triton_server_up",
            "1 while a Triton server answers, 0 while its streams are on the others.",
            ["server"],
            registry=r,
        )
        self.asrun_written = Counter(
            "tagd_asrun_segments_written_total",
            "Tag segments committed to the as-run log.",
            registry=r,
        )
        self.asrun_dropped = Counter(
            "tagd_asrun_segments_dropped_total",
            "Tag segments the as-run log lost, by reason.",
            ["reason"],
            registry=r,
        )
        self.asrun_errors = Counter(
            "tagd_asrun_write_errors_total",
            "Failed attempts to open or write the as-run log, by reason.",
            ["reason"],
            registry=r,
        )
        self.asrun_pending = Gauge(
            "tagd_asrun_pending_segments",
            "Tag segments ended but not yet committed to the as-run log.",
            registry=r,
        )

    def describe_engine(
        self,
        *,
        model: str,
        architecture: str,
        backend: str,
        card_version: int,
        sample_rate: int,
        window_samples: int,
        hop_samples: int,
        n_tags: int,
        inference: str = FULL,
        state_bytes: int = 0,
        precision: str = "float32",
    ) -> None:
        self.engine_info.info(
            {
                "inference": inference,
                "precision": precision,
                "state_bytes_per_stream": str(state_bytes),
                "model": model,
                "architecture": architecture,
                "backend": backend,
                "card_version": str(card_version),
                "sample_rate": str(sample_rate),
                "window_samples": str(window_samples),
                "hop_samples": str(hop_samples),
                "n_tags": str(n_tags),
            }
        )

    def forget_stream(self, stream: str) -> None:
        """Remove an evicted stream's series, so label values stay bounded."""
        series = (
            [
                (metric, (stream,))
                for metric in (
                    self.windows_published,
                    self.events_published,
                    self.audio_received,
                    self.gaps,
                    self.stream_idle,
                    self.stream_last_audio,
                    self.stream_misdeclared,
                    self.idle_episodes,
                )
            ]
            + [(self.windows_dropped, (stream, reason)) for reason in DROP_REASONS]
            + [(self.samples_cleaned, (stream, kind)) for kind in CLEANED_KINDS]
        )
        self.last_predictions.forget(stream)
        for metric, labels in series:
            with contextlib.suppress(KeyError):
                metric.remove(*labels)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The value of one sample (tests, bench): e.g. ``sample("tagd_active_streams")``."""
        return self.registry.get_sample_value(name, labels or {})


class LastPredictions(Collector):
    """``tagd_tag_score`` and ``tagd_tag_active``: each stream's last prediction, per tag.

    The inference worker hands over the prediction's arrays (one dict assignment a
    window); the series are built when Prometheus scrapes, instead of two gauges per tag
    and stream set on every window (docs/design.md has what those cost).
    """

    def __init__(self) -> None:
        self._tags: Sequence[str] = ()
        self._last: dict[str, tuple[np.ndarray, frozenset[str]]] = {}

    def update(
        self, stream: str, tags: Sequence[str], scores: np.ndarray, active: Sequence[str]
    ) -> None:
        """``scores`` (one per tag) must not change afterwards: it is read at scrape time."""
        self._tags = tags  # the card's: the same list every time
        self._last[stream] = (scores, frozenset(active))

    def forget(self, stream: str) -> None:
        self._last.pop(stream, None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        score = GaugeMetricFamily(
            "tagd_tag_score",
            "Each tag's score in the stream's last published prediction.",
            labels=["stream", "tag"],
        )
        active = GaugeMetricFamily(
            "tagd_tag_active",
            "1 while a tag is on for the stream (after hysteresis), else 0.",
            labels=["stream", "tag"],
        )
        tags = self._tags
        for stream, (scores, on) in list(self._last.items()):  # a snapshot: C-level, atomic
            for tag, value in zip(tags, scores.tolist(), strict=True):
                score.add_metric([stream, tag], value)
                active.add_metric([stream, tag], 1.0 if tag in on else 0.0)
        yield score
        yield active


class MetricsServer:
    """/metrics and /healthz from one small http.server thread."""

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        is_ready: Callable[[], bool],
        why_not: Callable[[], str] = lambda: "starting",
    ) -> None:
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ready = is_ready()
                    body = b"ok\n" if ready else f"{why_not()}\n".encode()
                    self._reply(200 if ready else 503, body, "text/plain; charset=utf-8")
                else:
                    self._reply(404, b"try /metrics or /healthz\n", "text/plain; charset=utf-8")

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args) -> None:
                log.debug("http %s: " + fmt, self.client_address[0], *args)

        # Binding here, in the caller's thread, makes "port in use" a start-up error.
        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="tagd-http",
            daemon=True,
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return host, port

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=1.0)
        self._httpd.server_close()
