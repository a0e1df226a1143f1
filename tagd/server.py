"""`tagd serve`: streams in, rolling windows, batched inference, tags and events out.

    sources (one thread each) ─► StreamHub/Stream ─► Batcher ─► engine ─► Tagger ─► Publisher
    ffmpeg zmq, multi-stream,    decode, downmix,    one worker            averaging,  XPUB
    soundcard, file              resample, window    thread                hysteresis  tags.<s>, events.<s>

``Server.start()`` and ``Server.stop()`` are the daemon's lifecycle, step by step; the
``serve`` command (tagd/cli.py) wraps them with config loading, logging and signals.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator

from tagd.asrun import (
    ENDED_IDLE,
    ENDED_OFF,
    ENDED_STOP,
    AsRunError,
    AsRunLog,
    Record,
    StreamClock,
    check_path,
)
from tagd.batcher import Batcher, BatchResult
from tagd.card import CardError, ModelCard
from tagd.config import ServeConfig
from tagd.engines import (
    BACKENDS,
    Engine,
    EngineError,
    backend_of,
    engine_url_scheme,
    load_engine,
    option_sections,
)
from tagd.incremental import choose_scorer
from tagd.metrics import Metrics, MetricsServer, Series
from tagd.publish import (
    EVENTS_TOPIC,
    TAGS_TOPIC,
    Publisher,
    PublishError,
    event_messages,
    tags_message,
    topic,
)
from tagd.scoring import RemoteScorer, Scorer, resolve_hop
from tagd.sockets import CurveServer, SecurityError
from tagd.sources import Source, SourceError, make_source
from tagd.stream import StreamGeometry, StreamHub
from tagd.tagger import Prediction, Tagger
from tagd.timeline import Segmenter
from tagd.windowing import WindowPool

log = logging.getLogger(__name__)

STOP_BUDGET_S = 1.5  # SIGTERM to exit must stay under 2 s
SWEEP_INTERVAL_S = 0.25  # how often idle streams are marked and gauges refreshed
EXIT_STARTUP_FAILED = 2
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's default, kept fixed (see release_freed_memory)
# Free window buffers kept for reuse (windowing.WindowPool): 35 SampleCNN windows, 5 of
# FCN-4's, at least 2.
WINDOW_POOL_BYTES = 8 * 1024 * 1024


class StartupError(RuntimeError):
    """The daemon cannot start; the message is one line saying why."""


class Server:
    def __init__(self, config: ServeConfig, metrics: Metrics | None = None):
        self.config = config.validate()
        self.metrics = metrics or Metrics()
        self.engine: Engine | None = None  # the first instance: card, limits, description
        self.engines: list[Engine] = []  # every instance, [batching] instances of them
        self.publisher: Publisher | None = None
        self.batcher: Batcher | None = None
        self.hub: StreamHub | None = None
        self.tagger: Tagger | None = None
        self.scorer: Scorer | None = None  # full windows or incremental (tagd.scoring)
        # a remote scorer's round trips a row (latency_ms.remote); None: inference is here
        self._round_trips: Callable[[], np.ndarray] | None = None
        self.sources: list[Source] = []
        self.asrun: AsRunLog | None = None  # the as-run log, when [asrun] path is set
        self.segmenter: Segmenter | None = None  # its segments, fed by the workers
        self._segments_lock = threading.Lock()  # workers update, the sweeper and stop close
        self._stream_clock = StreamClock()  # segments' stream seconds to unix time
        self._http: MetricsServer | None = None
        self._context = zmq.Context()
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._went_idle = False  # a stream went idle in this sweep
        self._curve: CurveServer | None = None  # tagd's keys when [security] is set
        self._authenticator: ThreadAuthenticator | None = None
        # Per stream, its tagd_windows_published_total and tagd_events_published_total
        # series, looked up once; dropped when the stream is evicted.
        self._published: dict[str, tuple[Series, Series]] = {}

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Bring the daemon up; raise StartupError (after cleaning up) if a step fails."""
        try:
            self._serve_metrics()  # /healthz answers 503 until the last step
            self._secure()  # CURVE keys and the allowed clients, when configured
            self._bind_publisher()  # a port in use fails here, before the slow load
            self._reserve_inputs()  # bind zmq+pull inputs, find files: before the load too
            check_asrun(self.config)  # the as-run log's file and folder, when set
            self._load_engine()  # load, check the card against the I/O, warm up
            self._build_pipeline()  # streams → batcher → tagger → publisher
            self._open_inputs()  # connect, open devices and files
            self._start_threads()  # workers, sweeper, publish monitor, a reader per input
        except StartupError:
            self.stop()
            raise
        self._ready.set()
        self.metrics.ready.set(1)
        log.info(
            "tagd serve ready: %s%s; hop %.3f s, %s; publishing on %s%s; %d input(s)",
            self.engine.describe(),
            f" ({len(self.engines)} instances)" if len(self.engines) > 1 else "",
            self.hub.geometry.hop_samples / self.hub.geometry.sample_rate,
            self.scorer.describe(),
            self.publisher.address,
            f"; metrics on http://{self.metrics_address[0]}:{self.metrics_address[1]}/metrics"
            if self._http
            else "",
            len(self.sources),
        )

    def stop(self) -> None:
        """Tear down in order: readiness, inputs, inference, outputs, engine. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        deadline = time.perf_counter() + STOP_BUDGET_S
        self._ready.clear()
        self.metrics.ready.set(0)
        for source in self.sources:  # 1. no new audio
            source.stop()
        joined = [
            source.join(max(0.05, deadline - time.perf_counter() - 0.5)) for source in self.sources
        ]
        if self.batcher is not None:  # 2. drop pending windows, finish the batch in flight
            self.batcher.stop(timeout=max(0.05, deadline - time.perf_counter() - 0.2))
        if self._sweeper is not None:
            self._sweeper.join(timeout=SWEEP_INTERVAL_S * 2)
            self.metrics.ready.set(0)
        if self.asrun is not None:  # 2b. the segments still open, to the as-run log
            self._end_segments(None, ENDED_STOP)
            self.asrun.close(timeout=max(0.2, deadline - time.perf_counter()))
        if self.batcher is not None and self.batcher.busy():
            # The worker is inside an engine call that outlasted the budget: its socket
            # and engine are still in use, so leave them to the process exit.
            log.warning("stopping with a batch still on the engine; it is abandoned")
        else:
            if self.publisher is not None:  # 3. outputs
                self.publisher.close()
            for engine in dict.fromkeys(self.engines):  # 4. the engine's instances, once each
                engine.close()
            if self._authenticator is not None:  # 5. the ZAP handler, last of the sockets
                self._authenticator.stop()
            if all(joined):
                self._context.term()  # every socket is closed: term() returns at once
        if self._http is not None:
            self._http.stop()
        log.info("tagd serve stopped")

    def is_ready(self) -> bool:
        return self._ready.is_set()

    def is_healthy(self) -> bool:
        """What /healthz says: ready, and the engine not failing batch after batch."""
        return self.is_ready() and (self.batcher is None or self.batcher.healthy())

    def _unhealthy_reason(self) -> str:
        return "engine failing" if self.is_ready() else "starting"

    @property
    def publish_address(self) -> str:
        return self.publisher.address if self.publisher else ""

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return self._http.address if self._http else None

    # -- start-up steps -------------------------------------------------------------------
    def _serve_metrics(self) -> None:
        if not self.config.metrics.enabled:
            return
        host, port = self.config.metrics.host_port()
        try:
            self._http = MetricsServer(
                self.metrics, host, port, self.is_healthy, why_not=self._unhealthy_reason
            )
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
        self._http.start()

    def _secure(self) -> None:
        security = self.config.security
        if not security.enabled:
            return
        try:
            self._curve = CurveServer.load(
                security.curve_server_secret, security.curve_allowed_clients
            )
        except SecurityError as exc:
            raise StartupError(str(exc)) from None
        self._authenticator = self._curve.start_authenticator(self._context)

    def _bind_publisher(self) -> None:
        publish = self.config.publish
        try:
            self.publisher = Publisher(
                self._context,
                publish.address,
                self.metrics,
                sndhwm=publish.sndhwm,
                linger_ms=publish.linger_ms,
                curve=self._curve,
            )
        except PublishError as exc:
            raise StartupError(str(exc)) from None

    def _load_engine(self) -> None:
        path = self.config.engine  # a file, or a URL (triton://) that Path would mangle
        instances = self.config.batching.instances
        try:
            options = self._engine_options(backend_of(path), instances)
            self.engine = load_engine(path, warmup=False, **options)
            # one copy of the weights when the engine runs windows side by side
            self.engines = [self.engine] + [
                self.engine
                if self.engine.concurrent_runs
                else load_engine(path, warmup=False, **options)
                for _ in range(instances - 1)
            ]
            hop = resolve_hop(self.engine.card, self.config.hop_seconds)
            self.scorer = choose_scorer(
                self.engines,
                hop,
                self.config.incremental,
                on_updates=self._count_updates,
                metrics=self.metrics,
            )
            if self.config.aggregate:
                from tagd.aggregate import aggregating

                self.scorer = aggregating(self.scorer, path, self.engine.card)
            if isinstance(self.scorer, RemoteScorer):
                self._round_trips = self.scorer.round_trips
            # what the scorer runs, so the first live window pays nothing
            self.scorer.warmup(batch_sizes=tuple(sorted({1, self._max_batch()})))
        except (EngineError, CardError, OSError) as exc:
            reason = " ".join(str(exc).split())  # one line, whatever the runtime said
            raise StartupError(f"cannot load the engine {path}: {reason}") from None
        card = self.engine.card
        self.metrics.describe_engine(
            model=card.name,
            architecture=card.architecture,
            backend=self.engine.backend,
            card_version=card.schema_version,
            sample_rate=card.sample_rate,
            window_samples=card.window_samples,
            hop_samples=self.scorer.hop_samples,
            n_tags=card.n_tags,
            inference=self.scorer.mode,
            state_bytes=self.scorer.state_bytes,
            precision=card.precision,
        )

    def _count_updates(self, mode: str, count: int) -> None:
        if count:
            self.metrics.window_updates.labels(mode).inc(count)

    def _build_pipeline(self) -> None:
        card = self.engine.card
        batching, limits = self.config.batching, self.config.limits
        self.tagger = Tagger(
            card, on_after=self.config.tagger.on_after, off_margin=self.config.tagger.off_margin
        )
        window_bytes = card.window_samples * np.dtype(np.float32).itemsize
        self.window_pool = WindowPool(
            card.window_samples, max(2, WINDOW_POOL_BYTES // window_bytes)
        )
        self.batcher = Batcher(
            [functools.partial(self._run_engine, index) for index in range(len(self.engines))],
            card.window_samples,
            self._publish_batch,
            self.metrics,
            max_batch=self._max_batch(),
            max_wait_s=batching.max_wait_ms / 1000,
            max_pending_per_stream=batching.max_pending_per_stream,
            max_queue_age_s=batching.max_queue_age_s,
            # windows that continue their stream's state first (docs/serve.md)
            prefer=self.scorer.continues if self.scorer.carries_state else None,
            unhealthy_after=limits.unhealthy_after_failed_batches,
            recycle=self.window_pool.give,
        )
        geometry = StreamGeometry(card.sample_rate, card.window_samples, self.scorer.hop_samples)
        self.hub = StreamHub(
            geometry,
            self.batcher.submit,
            self.metrics,
            max_streams=limits.max_streams,
            idle_after_s=limits.idle_after_s,
            evict_after_s=limits.evict_after_s,
            spread_phases=batching.spread_phases,
            max_spliced_gap_s=limits.max_spliced_gap_s,
            on_evict=self._forget_stream,  # dict pops: safe from the evicting thread
            on_idle=self._stream_idle,
            pool=self.window_pool,
        )
        if self.config.asrun.enabled:
            self.segmenter = Segmenter(card.tags, card.sample_rate)
            self.asrun = AsRunLog(
                self.config.asrun.path,
                self.metrics,
                retention_days=self.config.asrun.retention_days,
            )

    def _reserve_inputs(self) -> None:
        for spec in self.config.inputs:
            curve = self._curve if spec.uses_curve(self.config.security) else None
            source = make_source(spec, None, self.metrics, self._context, self.config.limits, curve)
            self.sources.append(source)  # stop() closes what it reserved
            try:
                source.reserve()
            except SourceError as exc:
                raise StartupError(str(exc)) from None

    def _open_inputs(self) -> None:
        for source in self.sources:
            source.hub = self.hub
            try:
                source.open()
            except SourceError as exc:
                raise StartupError(str(exc)) from None

    def _start_threads(self) -> None:
        if self.asrun is not None:
            self.asrun.start()
        self.batcher.start()
        self._sweeper = threading.Thread(target=self._sweep, name="tagd-sweeper", daemon=True)
        self._sweeper.start()
        self.publisher.start_monitor()  # the monitor socket's one reader
        for source in self.sources:
            source.start()

    # -- helpers --------------------------------------------------------------------------
    def _engine_options(self, backend: type[Engine], instances: int) -> dict:
        """The keyword arguments of the backend's ``load``, from its own config section;
        a changed section of another backend is ignored with a warning."""
        for section, suffixes in option_sections().items():
            if section != backend.options_section:
                changed = getattr(self.config, section)
                if changed != type(changed)():
                    log.warning(
                        "[%s] applies to %s models only; %s ignores it",
                        section,
                        " and ".join(suffixes),
                        Path(self.config.engine).name,
                    )
        if backend.options_section is None:
            return {}
        return getattr(self.config, backend.options_section).engine_options(instances)

    def _max_batch(self) -> int:
        wanted = self.config.batching.max_batch or self.engine.default_max_batch
        limit = self.engine.max_batch
        return min(wanted, limit) if limit else wanted

    def _sweep(self) -> None:
        while not self._stopping.wait(SWEEP_INTERVAL_S):
            self._went_idle = False
            self.hub.sweep()
            if self._went_idle:
                trim_freed_memory()
            self.metrics.ready.set(1 if self.is_healthy() else 0)

    def _stream_idle(self, name: str) -> None:
        self._went_idle = True  # the sweep ends by handing back what the stream freed
        self.scorer.forget(name)  # its next window is a restart: scored in full anyway
        self._end_segments(name, ENDED_IDLE)  # they end where its audio did

    def _forget_stream(self, name: str) -> None:
        self.tagger.forget(name)
        self.scorer.forget(name)
        self._published.pop(name, None)
        self._end_segments(name, ENDED_IDLE)
        self._stream_clock.forget(name)

    # -- the inference workers' side ----------------------------------------------------------
    def _run_engine(self, instance: int, batch: np.ndarray, windows: list) -> np.ndarray:
        return self.scorer.run(windows, batch, instance)

    def _publish_batch(self, result: BatchResult) -> None:
        """Runs in the inference worker: tag, publish, measure. Never blocks."""
        card = self.engine.card
        self.publisher.read_subscriptions()  # only so that they do not pile up
        inference_ms = result.inference_seconds * 1000
        remote_ms = None if self._round_trips is None else self._round_trips() * 1000
        for row, (item, scores) in enumerate(zip(result.items, result.scores, strict=True)):
            window = item.window
            windows_published, events_published = self._published_series(window.stream)
            prediction = self.tagger.update(window, scores)
            published_at = time.time()
            total_s = time.perf_counter() - window.captured.mono
            ingest_s = item.submitted - window.captured.mono
            message = tags_message(
                prediction,
                card,
                captured_at=window.captured.unix,
                published_at=published_at,
                ingest_ms=ingest_s * 1000,
                queue_ms=(result.started - item.submitted) * 1000,
                inference_ms=inference_ms,
                remote_ms=None if remote_ms is None else remote_ms[row],
                total_ms=total_s * 1000,
                batch_size=len(result.items),
            )
            if self.config.aggregate:
                message["song"] = self.scorer.song(window)
            self.publisher.send(topic(TAGS_TOPIC, window.stream), message)
            self.metrics.ingest_delay.observe(ingest_s)
            self.metrics.end_to_end_latency.observe(total_s)
            windows_published.inc()
            self.metrics.last_predictions.update(
                window.stream, card.tags, prediction.scores, prediction.active
            )
            for event in event_messages(prediction, card, published_at=published_at):
                self.publisher.send(topic(EVENTS_TOPIC, window.stream), event)
                events_published.inc()
            if self.asrun is not None:
                self._log_segments(window, prediction)

    def _log_segments(self, window, prediction: Prediction) -> None:
        """The segments this prediction ended, placed on the wall clock, to the as-run
        log's queue (which never waits)."""
        rate = self.engine.card.sample_rate
        self._stream_clock.note(
            window.stream,
            window.epoch,
            window.start / rate,
            window.end / rate,
            window.captured.unix,
        )
        with self._segments_lock:
            ended = self.segmenter.update(prediction)
        if ended:
            self.asrun.put([Record.placed(s, self._stream_clock, ENDED_OFF) for s in ended])

    def _end_segments(self, stream: str | None, why: str) -> None:
        """End the open segments of ``stream`` (None: every stream's) in the as-run log."""
        if self.asrun is None:
            return
        with self._segments_lock:
            ended = self.segmenter.close_all() if stream is None else self.segmenter.close(stream)
        self.asrun.put([Record.placed(s, self._stream_clock, why) for s in ended])

    def _published_series(self, stream: str) -> tuple[Series, Series]:
        series = self._published.get(stream)
        if series is None:
            series = self._published[stream] = (
                Series(self.metrics.windows_published, stream),
                Series(self.metrics.events_published, stream),
            )
        return series


def release_freed_memory() -> None:
    """Have glibc allocate large blocks with mmap always, so that freeing them returns them.

    glibc raises its mmap threshold the first time a large block is freed; from then on
    windows and PCM buffers come from the heap and stay resident after a burst
    (docs/design.md has the measurement). Not glibc: nothing to do.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3  # from malloc.h
    libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD_BYTES)


def trim_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim).

    A burst of small blocks (ZeroMQ messages queued while streams catch up, a stream's
    state dropped) leaves free pages inside the heap that glibc keeps resident; the
    sweeper trims after streams go idle. Not glibc: nothing to do.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.malloc_trim(0)


def check_startup(config: ServeConfig) -> ModelCard:
    """What --check-config knows without loading the model or binding a port: the model
    file opens, its suffix names a backend, its card reads and is valid (an engine URL's
    card: from its servers), and file inputs exist. Raises StartupError with what `tagd
    serve` would fail on."""
    if engine_url_scheme(config.engine):
        try:
            card = backend_of(config.engine).read_card(config.engine)
        except (EngineError, CardError) as exc:
            reason = " ".join(str(exc).split())
            raise StartupError(f"cannot load the engine {config.engine}: {reason}") from None
    else:
        card = _model_file_card(Path(config.engine))
    for spec in config.inputs:
        if spec.scheme == "file" and not Path(spec.address).is_file():
            raise StartupError(f"input {spec.name}: no such file: {spec.address}")
    check_asrun(config)
    if config.aggregate:
        from tagd.aggregate import serve_problem

        problem = serve_problem(card, resolve_hop(card, config.hop_seconds))
        if problem:
            raise StartupError(problem)
    return card


def check_asrun(config: ServeConfig) -> None:
    """StartupError unless ``[asrun] path`` (when set) can be the as-run log."""
    if config.asrun.enabled:
        try:
            check_path(config.asrun.path)
        except AsRunError as exc:
            raise StartupError(f"as-run log: {exc}") from None


def _model_file_card(path: Path) -> ModelCard:
    if not path.exists():
        raise StartupError(f"cannot load the engine {path}: model file not found: {path}")
    if path.suffix not in BACKENDS:
        known = ", ".join(sorted(BACKENDS))
        raise StartupError(
            f"cannot load the engine {path}: unknown model type {path.suffix!r}; known: {known}"
        )
    try:
        with path.open("rb") as model:
            model.read(1)
        return backend_of(path).read_card(path)
    except OSError as exc:
        raise StartupError(f"cannot load the engine {path}: {exc.strerror}") from None
    except CardError as exc:
        reason = " ".join(str(exc).split())
        raise StartupError(f"cannot load the engine {path}: {reason}") from None


def input_warnings(config: ServeConfig, card: ModelCard) -> list[str]:
    """Inputs that will work, but not as well as they could with this model."""
    warnings = []
    hop = resolve_hop(card, config.hop_seconds)
    if hop > card.window_samples:
        warnings.append(
            f"the hop ({hop / card.sample_rate:.2f} s) is longer than the model's window "
            f"({card.window_seconds:.2f} s): audio between windows is never tagged"
        )
    for index, spec in enumerate(config.inputs):
        if spec.rate is not None and spec.rate < card.sample_rate:
            warnings.append(
                f"inputs[{index}]: {spec.rate} Hz is below the model's "
                f"{card.sample_rate} Hz: it hears band-limited audio"
            )
    return warnings
