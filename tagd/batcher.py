"""Dynamic batching: every stream's windows into one queue of inference, never blocking ingest.

Ingest threads ``submit`` windows; the call takes a lock for microseconds and returns.
A worker thread forms batches the way Triton's dynamic batcher does: it starts a batch
when the oldest pending window has waited ``max_wait_s`` or ``max_batch`` windows are
pending, whichever comes first, takes the oldest windows across all streams, runs the
engine (ONNX Runtime and TensorRT release the GIL meanwhile) and hands the scores to
``on_batch`` (the tagger and publisher) in the same thread.

With more than one engine instance (Triton's instance groups) there is one worker per
instance, all taking from the same queue. A stream's windows are never on two instances
at once, so each stream's predictions stay in order, and ``on_batch`` runs for one
batch at a time.

When the worker falls behind, a stream never has more than ``max_pending_per_stream``
windows waiting: submitting one more drops that stream's oldest, counted as
``queue_full``. Latency stays bounded by about that many hops plus one batch; windows
older than ``max_queue_age_s`` (when set) are dropped as ``stale`` before a batch.

With incremental inference (tagd.incremental) windows are not equal: one that continues
its stream's chain is a *step* (FCN-4: a fifth of a window's work), any other a *prime*
(a whole window). ``prefer`` says which is which, and a preferred window goes before
older ones that are not: under load, running chains keep their updates and new or broken
chains wait for spare time. Oldest-first would let a start-up's primes (every stream's
first window) delay steps until they are dropped, and each drop is one more prime: an
overload that feeds itself.

Once a window is copied into a batch, or dropped, its samples go to ``recycle`` (the
streams' ``WindowPool``): nothing reads a submitted window's samples after that. A batch
of one (the CPU's) is no copy: the engine reads the window's own samples, recycled when
the engine call returns.

An engine that raises loses that batch's windows (``engine_error``), not the worker:
each kind of error is logged in full the first time, and ``healthy()`` turns false after
``unhealthy_after`` failed batches in a row (the daemon's /healthz then says 503) and
true again with the next batch that succeeds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tagd.affinity import keep_off_pinned_cores
from tagd.metrics import DROP_ENGINE_ERROR, DROP_QUEUE_FULL, DROP_SHUTDOWN, DROP_STALE, Metrics
from tagd.stream import ReadyWindow

log = logging.getLogger(__name__)

ORDER_SLACK = 64  # skipped entries the submission order may hold beyond twice the pending
# An engine instance: scores [n, n_tags] of a batch of windows [n, samples], told which
# windows they are (incremental inference carries each stream's state: tagd.incremental).
EngineRun = Callable[[np.ndarray, list[ReadyWindow]], np.ndarray]


@dataclass(eq=False)
class Pending:
    window: ReadyWindow
    submitted: float  # perf_counter when the batcher got it
    done: bool = False  # taken or dropped: what the submission order skips


@dataclass
class BatchResult:
    items: list[Pending]
    scores: np.ndarray  # float32 [len(items), n_tags]
    started: float  # perf_counter when the engine call began
    finished: float  # perf_counter when it returned

    @property
    def inference_seconds(self) -> float:
        return self.finished - self.started


class Batcher:
    def __init__(
        self,
        runs: Sequence[EngineRun],
        window_samples: int,
        on_batch: Callable[[BatchResult], None],
        metrics: Metrics,
        *,
        max_batch: int,
        max_wait_s: float,
        max_pending_per_stream: int,
        max_queue_age_s: float = 0.0,
        unhealthy_after: int = 3,
        recycle: Callable[[np.ndarray], None] | None = None,
        prefer: Callable[[ReadyWindow], bool] | None = None,
    ) -> None:
        if not runs:
            raise ValueError("a batcher needs at least one engine instance")
        self._runs = list(runs)  # one per engine instance, each used by its own worker
        self._on_batch = on_batch
        self._recycle = recycle  # takes a window's samples that nothing will read again
        self._prefer = prefer  # a stream's next window that goes before older ones (a step)
        self._metrics = metrics
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_pending_per_stream = max_pending_per_stream
        self.max_queue_age_s = max_queue_age_s
        self._pending: dict[str, deque[Pending]] = {}  # per stream, oldest first
        # Every pending window in the order submitted (so the oldest is at the left, no
        # scan of the streams under the lock); taken and dropped ones are skipped there
        # and compacted away.
        self._order: deque[Pending] = deque()
        self._count = 0
        self._cond = threading.Condition(threading.Lock())
        self._stopping = False
        self._in_flight: set[str] = set()  # streams with a window on an instance
        self._threads: list[threading.Thread] = []
        # One reusable input buffer per worker: engines copy their input, so reuse is safe.
        self._buffers = [
            np.zeros((max_batch, window_samples), dtype=np.float32) for _ in self._runs
        ]
        # Results are handled, and failures counted, one batch at a time.
        self._results_lock = threading.Lock()
        self.unhealthy_after = unhealthy_after
        self.failures_in_a_row = 0  # written by the worker, read by health checks
        self._errors_seen: set[str] = set()  # kinds of engine error already logged in full

    # -- ingest side (any thread) -------------------------------------------------------
    def submit(self, window: ReadyWindow) -> None:
        """Queue a window for inference; drops the stream's oldest when it has too many."""
        dropped = None
        with self._cond:
            if self._stopping:
                dropped = window
            else:
                queue = self._pending.setdefault(window.stream, deque())
                if len(queue) >= self.max_pending_per_stream:
                    oldest = queue.popleft()
                    oldest.done, dropped = True, oldest.window
                    self._count -= 1
                item = Pending(window, time.perf_counter())
                queue.append(item)
                self._order.append(item)
                self._count += 1
                if len(self._order) > 2 * self._count + ORDER_SLACK:
                    self._order = deque(p for p in self._order if not p.done)
                # Wake the workers when this can start a batch: the first window, a full
                # batch, or (several instances) a window of a stream none of them has.
                if self._count == 1 or self._count >= self.max_batch or len(self._runs) > 1:
                    self._cond.notify_all()
        if dropped is not None:
            reason = DROP_SHUTDOWN if self._stopping else DROP_QUEUE_FULL
            self._metrics.windows_dropped.labels(dropped.stream, reason).inc()
            self._done_with(dropped)

    def healthy(self) -> bool:
        """False after ``unhealthy_after`` failed batches in a row, until one succeeds."""
        return self.failures_in_a_row < self.unhealthy_after

    def busy(self) -> bool:
        """Whether a worker thread is still running (an engine call it could not leave)."""
        return any(thread.is_alive() for thread in self._threads)

    def pending(self) -> int:
        with self._cond:
            return self._count

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        for index, run in enumerate(self._runs):
            name = "tagd-inference" if len(self._runs) == 1 else f"tagd-inference-{index}"
            thread = threading.Thread(
                target=self._work, args=(run, self._buffers[index]), name=name, daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 1.0) -> bool:
        """Drop pending windows, let an in-flight batch finish; False if it did not in time."""
        with self._cond:
            self._stopping = True
            leftover = [item for queue in self._pending.values() for item in queue]
            self._pending.clear()
            self._order.clear()
            self._count = 0
            self._cond.notify_all()
        for item in leftover:
            self._metrics.windows_dropped.labels(item.window.stream, DROP_SHUTDOWN).inc()
            self._done_with(item.window)
        deadline = time.perf_counter() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.perf_counter()))
        if self.busy():
            log.warning("inference worker still busy after %.1f s; leaving it behind", timeout)
            return False
        return True

    # -- the worker ---------------------------------------------------------------------------
    def _work(self, run: EngineRun, buffer: np.ndarray) -> None:
        keep_off_pinned_cores()  # not on a core with the engine's pinned threads (affinity.py)
        while True:
            items = self._next_batch()
            if items is None:
                return
            try:
                self._run_batch(run, buffer, items)
            finally:
                with self._cond:
                    self._in_flight.difference_update(item.window.stream for item in items)
                    self._cond.notify_all()  # their streams' next windows may go now

    def _next_batch(self) -> list[Pending] | None:
        with self._cond:
            while self._available() == 0 and not self._stopping:
                self._cond.wait()
            deadline = self._oldest().submitted + self.max_wait_s if not self._stopping else 0.0
            while not self._stopping and self._available() < self.max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._available() == 0:  # another worker took them
                    break
                self._cond.wait(remaining)
            if self._stopping:
                return None
            stale = self._take_stale(time.perf_counter())
            items = [self._take_next() for _ in range(min(self._available(), self.max_batch))]
            self._in_flight.update(item.window.stream for item in items)
        for item in stale:
            self._metrics.windows_dropped.labels(item.window.stream, DROP_STALE).inc()
            self._done_with(item.window)
        return items

    def _done_with(self, window: ReadyWindow) -> None:
        if self._recycle is not None:
            self._recycle(window.samples)

    def _available(self) -> int:
        """Pending windows this worker may take: none of a stream on another instance."""
        if not self._in_flight:
            return self._count
        return sum(len(q) for s, q in self._pending.items() if s not in self._in_flight)

    def _oldest(self) -> Pending:
        """The oldest pending window of a stream no other worker has (lock held)."""
        order = self._order
        while order[0].done:
            order.popleft()
        # Only windows of streams in flight on other instances are passed over: a few.
        return next(p for p in order if not p.done and p.window.stream not in self._in_flight)

    def _take(self, item: Pending) -> Pending:
        queue = self._pending[item.window.stream]
        queue.popleft()  # a stream's oldest is the first of its windows in the order
        if not queue:  # streams come and go: keep no empty queue for a stream gone
            del self._pending[item.window.stream]
        item.done = True
        self._count -= 1
        return item

    def _take_next(self) -> Pending:
        """The oldest available window, or before it the oldest one ``prefer`` picks."""
        oldest = self._oldest()
        if self._prefer is None or self._prefer(oldest.window):
            return self._take(oldest)
        # Only when the oldest is not preferred (a prime, rare once streams run): a scan
        # of the pending windows, each stream's next one only (they go in order).
        for item in self._order:
            stream = item.window.stream
            if (
                not item.done
                and stream not in self._in_flight
                and self._pending[stream][0] is item
                and self._prefer(item.window)
            ):
                return self._take(item)
        return self._take(oldest)

    def _take_stale(self, now: float) -> list[Pending]:
        if not self.max_queue_age_s:
            return []
        stale = []
        order = self._order
        while order and (order[0].done or now - order[0].submitted > self.max_queue_age_s):
            item = order.popleft()
            if not item.done:
                stale.append(self._take(item))
        return stale

    def _run_batch(self, run: EngineRun, buffer: np.ndarray, items: list[Pending]) -> None:
        if not items:
            return
        if len(items) == 1:
            batch = items[0].window.samples[np.newaxis]  # a view, recycled after the call
        else:
            batch = buffer[: len(items)]
            for row, item in enumerate(items):
                batch[row] = item.window.samples
                self._done_with(item.window)
        started = time.perf_counter()
        try:
            scores = run(batch, [item.window for item in items])
        except Exception as exc:  # an engine failure must not kill the worker; count and go on
            with self._results_lock:
                self._engine_failed(exc, items)
            return
        finally:
            if len(items) == 1:
                self._done_with(items[0].window)
        finished = time.perf_counter()
        with self._results_lock:
            self._handle(items, scores, started, finished)

    def _handle(
        self, items: list[Pending], scores: np.ndarray, started: float, finished: float
    ) -> None:
        if self.failures_in_a_row:
            log.info("engine recovered after %d failed batches", self.failures_in_a_row)
            self.failures_in_a_row = 0
        self._metrics.inference.observe(finished - started)
        self._metrics.batch_size.observe(len(items))
        for item in items:
            self._metrics.queue_wait.observe(started - item.submitted)
        try:
            self._on_batch(BatchResult(items, scores, started, finished))
        except Exception:  # a publishing bug must not stop inference for every stream
            log.exception("handling a batch's results failed")

    def _engine_failed(self, exc: Exception, items: list[Pending]) -> None:
        self.failures_in_a_row += 1
        self._metrics.engine_errors.inc()
        for item in items:
            self._metrics.windows_dropped.labels(item.window.stream, DROP_ENGINE_ERROR).inc()
        kind = type(exc).__qualname__
        if kind not in self._errors_seen:  # in full once per kind; the counter has the rest
            self._errors_seen.add(kind)
            log.error(
                "engine failed on a batch of %d windows (%s; further failures of this "
                "kind are counted in tagd_engine_errors_total, not logged)",
                len(items),
                kind,
                exc_info=exc,
            )
        else:
            log.debug("engine failed on a batch of %d windows: %r", len(items), exc)
        if self.failures_in_a_row == self.unhealthy_after:
            log.error(
                "engine failed %d batches in a row: /healthz says 503 until one succeeds",
                self.failures_in_a_row,
            )
