"""Inputs: each reads one kind of producer in its own thread and feeds a StreamHub.

A ``Source`` is built from an ``InputConfig``; ``reserve()`` takes what another process
could hold (a port to bind, a file that must exist) and needs no ``StreamHub``, so the
daemon calls it before the model loads and a port in use fails start-up in milliseconds;
``open()`` (once ``hub`` is set) connects or opens the device in the caller's thread (so
a missing device fails start-up with one line), ``start()`` runs the reader thread,
``stop()`` asks it to finish and ``join()`` waits. Readers never wait for inference: they push into streams, which hand windows to
the batcher without blocking. Each ZeroMQ socket is created, used and closed by its
reader thread's owner in that order, and read by that one thread only.

Schemes: ``zmq+raw`` (ffmpeg's zmq output), ``zmq+sub``/``zmq+pull`` (the multi-stream
protocol of docs/protocol.md), ``soundcard`` (PortAudio via sounddevice), ``file``. Each
source class declares its schemes and the ``InputConfig`` fields it reads
(``schemes``, ``options``, ``required``, ``multi_stream``, ``check``); tagd/config.py
validates an input by asking its class.
"""

from __future__ import annotations

import abc
import logging
import threading
from typing import TYPE_CHECKING, ClassVar

import zmq

from tagd.metrics import Metrics
from tagd.ratelimit import RateLimitedLog
from tagd.sockets import CurveServer
from tagd.stream import StreamHub

if TYPE_CHECKING:  # tagd.config asks the source classes to validate inputs
    from tagd.config import InputConfig, LimitsConfig, SecurityConfig

log = logging.getLogger(__name__)
_limited = RateLimitedLog(log)

POLL_INTERVAL_S = 0.1  # how often a reader checks whether it should stop


class SourceError(RuntimeError):
    """An input could not be opened."""


class Source(abc.ABC):
    schemes: ClassVar[tuple[str, ...]]  # the URL schemes this source reads
    multi_stream: ClassVar[bool] = False  # stream names come in each message, not the URL
    # The InputConfig fields it reads (beyond url, stream and curve), and of those the ones
    # an input must give, each with what to give.
    options: ClassVar[tuple[str, ...]] = ()
    required: ClassVar[dict[str, str]] = {}
    needs_stream_name: ClassVar[bool] = True  # single-stream: ?stream=NAME is required
    secured: ClassVar[bool] = False  # reads the `curve` field (ZeroMQ inputs)

    @classmethod
    def address_of(cls, spec: InputConfig) -> str:
        """What the input connects to or opens, from its URL."""
        return spec.url_parts.netloc

    @classmethod
    def check(cls, spec: InputConfig, path: str, security: SecurityConfig | None) -> list[str]:
        """Problems particular to this kind of input, each with its key path."""
        return []

    def __init__(
        self,
        spec: InputConfig,
        hub: StreamHub | None,
        metrics: Metrics,
        context: zmq.Context,
        limits: LimitsConfig,
        curve: CurveServer | None = None,
    ) -> None:
        self.spec = spec
        self.hub = hub
        self.metrics = metrics
        self.context = context
        self.limits = limits
        self.curve = curve  # CURVE server keys for this input's socket; None: plain
        self.label = spec.name  # the `input` label of tagd_malformed_messages_total
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reserve(self) -> None:  # noqa: B027 - optional hook
        """Bind what must be exclusive, before ``hub`` exists; raise SourceError."""

    @abc.abstractmethod
    def open(self) -> None:
        """Bind, connect or open the device; raise SourceError with a one-line reason."""

    @abc.abstractmethod
    def _read(self) -> None:
        """The reader thread's body: feed streams until ``self._stop`` is set."""

    def _close(self) -> None:  # noqa: B027 - optional hook, run in the reader thread at exit
        """Release what ``open`` took."""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"tagd-in-{self.label}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._read()
        except Exception:  # a reader bug must end this input only, loudly
            log.exception("input %s failed; its streams go idle", self.label)
        finally:
            self._close()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        if self._thread is None:
            self._close()
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def count_malformed(self, reason: str, detail: object = "") -> None:
        """Count a refused message; log it, at most every few seconds per reason."""
        self.metrics.malformed.labels(self.label, reason).inc()
        _limited.warning(
            (self.label, reason), "input %s: dropped a message (%s): %s", self.label, reason, detail
        )


def source_classes() -> dict[str, type[Source]]:
    """Scheme → the source class that declares it, in the order of the docs."""
    from tagd.sources.file import FileSource
    from tagd.sources.soundcard import SoundcardSource
    from tagd.sources.zmq import MultiStreamZmqSource, RawZmqSource

    classes = (RawZmqSource, MultiStreamZmqSource, SoundcardSource, FileSource)
    return {scheme: cls for cls in classes for scheme in cls.schemes}


def make_source(
    spec: InputConfig,
    hub: StreamHub | None,
    metrics: Metrics,
    context: zmq.Context,
    limits: LimitsConfig,
    curve: CurveServer | None = None,
) -> Source:
    return source_classes()[spec.scheme](spec, hub, metrics, context, limits, curve)


__all__ = ["POLL_INTERVAL_S", "Source", "SourceError", "make_source", "source_classes"]
