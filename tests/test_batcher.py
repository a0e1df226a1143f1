"""Dynamic batching: batch forming, bounded queues with counted drops, never blocking ingest."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tagd.batcher import Batcher, BatchResult
from tagd.metrics import Metrics
from tagd.stream import Arrival, ReadyWindow

WINDOW = 16


def window(stream: str, seq: int) -> ReadyWindow:
    samples = np.full(WINDOW, seq, dtype=np.float32)
    return ReadyWindow(stream, seq, 1, seq * WINDOW, samples, Arrival.now())


def mean_engine(batch: np.ndarray) -> np.ndarray:
    """A real (if trivial) model: each window's mean, as two 'tags'."""
    means = batch.mean(axis=1, keepdims=True)
    return np.concatenate([means, -means], axis=1)


class Recorder:
    def __init__(self):
        self.results: list[BatchResult] = []
        self.done = threading.Condition()

    def __call__(self, result: BatchResult) -> None:
        with self.done:
            self.results.append(result)
            self.done.notify_all()

    def wait_for(self, windows: int, timeout: float = 5.0) -> None:
        with self.done:
            assert self.done.wait_for(lambda: self.published() >= windows, timeout), (
                self.published()
            )

    def published(self) -> int:
        return sum(len(r.items) for r in self.results)

    def seqs(self, stream: str) -> list[int]:
        return [i.window.seq for r in self.results for i in r.items if i.window.stream == stream]


def make(engine=mean_engine, **settings) -> tuple[Batcher, Recorder, Metrics]:
    recorder, metrics = Recorder(), Metrics()
    options = {"max_batch": 4, "max_wait_s": 0.005, "max_pending_per_stream": 2, **settings}
    engines = engine if isinstance(engine, list) else [engine]  # one per engine instance
    runs = [lambda batch, _windows, e=e: e(batch) for e in engines]
    batcher = Batcher(runs, WINDOW, recorder, metrics, **options)
    return batcher, recorder, metrics


class GatedEngine:
    """Blocks inside run() until released: an engine that has fallen behind."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        assert self.release.wait(5)
        return mean_engine(batch)


def test_scores_come_back_matched_to_their_windows():
    batcher, recorder, _ = make()
    batcher.start()
    for seq in range(6):
        batcher.submit(window(f"s{seq % 3}", seq))
    recorder.wait_for(6)
    batcher.stop()
    for result in recorder.results:
        for item, scores in zip(result.items, result.scores, strict=True):
            assert scores[0] == item.window.seq  # the window's mean is its seq


def test_windows_wait_at_most_max_wait_for_a_batch_to_fill():
    batcher, recorder, metrics = make(max_batch=8, max_wait_s=0.05)
    batcher.start()
    started = time.perf_counter()
    batcher.submit(window("a", 0))
    recorder.wait_for(1)
    waited = time.perf_counter() - started
    batcher.stop()
    assert 0.04 <= waited < 1.0
    assert recorder.results[0].started - recorder.results[0].items[0].submitted >= 0.045
    assert metrics.sample("tagd_batch_size_count") == 1


def test_a_full_batch_goes_at_once_and_oldest_first():
    engine = GatedEngine()
    batcher, recorder, metrics = make(
        engine=engine, max_batch=3, max_wait_s=10.0, max_pending_per_stream=5
    )
    batcher.start()
    for seq in range(3):  # fills a batch: no waiting for max_wait
        batcher.submit(window("a", seq))
    assert engine.entered.wait(2)
    for seq in range(3, 6):  # queued while the engine is busy: the next full batch
        batcher.submit(window(("b", "a", "b")[seq - 3], seq))
    engine.release.set()
    recorder.wait_for(6)
    batcher.stop()
    assert [[i.window.seq for i in r.items] for r in recorder.results] == [[0, 1, 2], [3, 4, 5]]
    assert metrics.sample("tagd_batch_size_sum") == 6


def test_preferred_windows_go_before_older_ones_but_never_before_their_streams_own():
    """Incremental inference prefers steps (windows that continue a chain) to primes."""
    engine = GatedEngine()
    preferred = {("s", 1), ("s", 2), ("q", 4)}
    recorder, metrics = Recorder(), Metrics()
    batcher = Batcher(
        [lambda batch, _windows: engine(batch)],
        WINDOW,
        recorder,
        metrics,
        max_batch=1,
        max_wait_s=0.0,
        max_pending_per_stream=5,
        prefer=lambda w: (w.stream, w.seq) in preferred,
    )
    batcher.start()
    batcher.submit(window("x", 0))
    assert engine.entered.wait(2)  # the engine is now stuck on x0; the rest queue
    for stream, seq in (("p", 1), ("q", 3), ("s", 1), ("q", 4), ("s", 2), ("p", 2)):
        batcher.submit(window(stream, seq))
    engine.release.set()
    recorder.wait_for(7)
    batcher.stop()
    order = [(i.window.stream, i.window.seq) for r in recorder.results for i in r.items]
    # s1, s2 jump the queue; q4 waits for q3, its stream's older window; then oldest first
    assert order == [("x", 0), ("s", 1), ("s", 2), ("p", 1), ("q", 3), ("q", 4), ("p", 2)]


def test_falling_behind_drops_each_streams_oldest_and_counts_them():
    engine = GatedEngine()
    batcher, recorder, metrics = make(engine=engine, max_batch=2, max_pending_per_stream=2)
    batcher.start()
    batcher.submit(window("a", 0))
    assert engine.entered.wait(2)  # the engine is now stuck on [a0]

    def ingest() -> None:
        for seq in range(1, 11):
            for stream in ("a", "b"):
                batcher.submit(window(stream, seq))

    # The engine is held until after ingest is done: a submit that waited for inference
    # would still be waiting when the join gives up.
    submitter = threading.Thread(target=ingest, daemon=True)
    submitter.start()
    submitter.join(timeout=4)
    assert not submitter.is_alive(), "ingest waited for inference"
    assert batcher.pending() == 4  # two per stream, whatever arrived
    engine.release.set()
    recorder.wait_for(5)
    batcher.stop()
    assert recorder.seqs("a") == [0, 9, 10] and recorder.seqs("b") == [9, 10]  # the newest survive
    drops = {
        s: metrics.sample("tagd_windows_dropped_total", {"stream": s, "reason": "queue_full"})
        for s in "ab"
    }
    assert drops == {"a": 8, "b": 8}


def test_windows_older_than_max_queue_age_are_dropped_as_stale():
    engine = GatedEngine()
    batcher, recorder, metrics = make(engine=engine, max_batch=1, max_queue_age_s=0.05)
    batcher.start()
    batcher.submit(window("a", 0))
    assert engine.entered.wait(2)
    batcher.submit(window("a", 1))
    time.sleep(0.1)
    engine.release.set()
    batcher.submit(window("a", 2))
    recorder.wait_for(2)
    batcher.stop()
    assert recorder.seqs("a") == [0, 2]
    assert metrics.sample("tagd_windows_dropped_total", {"stream": "a", "reason": "stale"}) == 1


def test_an_engine_failure_is_counted_and_the_worker_goes_on():
    calls = []

    def flaky(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return mean_engine(batch)

    batcher, recorder, metrics = make(engine=flaky, max_batch=1)
    batcher.start()
    batcher.submit(window("a", 0))
    time.sleep(0.05)
    batcher.submit(window("a", 1))
    recorder.wait_for(1)
    batcher.stop()
    assert recorder.seqs("a") == [1]
    assert metrics.sample("tagd_engine_errors_total") == 1
    assert (
        metrics.sample("tagd_windows_dropped_total", {"stream": "a", "reason": "engine_error"}) == 1
    )


def test_stop_finishes_the_batch_in_flight_and_drops_the_rest():
    engine = GatedEngine()
    batcher, recorder, metrics = make(engine=engine, max_batch=1, max_pending_per_stream=5)
    batcher.start()
    batcher.submit(window("a", 0))
    assert engine.entered.wait(2)
    batcher.submit(window("a", 1))
    batcher.submit(window("a", 2))
    threading.Timer(0.1, engine.release.set).start()
    assert batcher.stop(timeout=2.0)
    assert recorder.seqs("a") == [0]
    assert metrics.sample("tagd_windows_dropped_total", {"stream": "a", "reason": "shutdown"}) == 2
    batcher.submit(window("a", 3))  # after stop: dropped, counted, no error
    assert metrics.sample("tagd_windows_dropped_total", {"stream": "a", "reason": "shutdown"}) == 3


@pytest.mark.parametrize("streams", [1, 5])
def test_every_window_is_either_published_or_counted_as_dropped(streams):
    def slow(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.002)
        return mean_engine(batch)

    batcher, recorder, metrics = make(engine=slow, max_batch=2, max_pending_per_stream=1)
    batcher.start()
    submitted = 0
    for seq in range(200):
        for s in range(streams):
            batcher.submit(window(f"s{s}", seq))
            submitted += 1
    time.sleep(0.1)
    batcher.stop()
    dropped = sum(
        metrics.sample("tagd_windows_dropped_total", {"stream": f"s{s}", "reason": reason}) or 0
        for s in range(streams)
        for reason in ("queue_full", "shutdown")
    )
    assert recorder.published() + dropped == submitted
    assert dropped > 0


def test_instances_run_batches_at_the_same_time():
    both_inside = threading.Barrier(2, timeout=5)

    def meeting_engine(batch: np.ndarray) -> np.ndarray:
        both_inside.wait()  # raises, and the batch fails, unless the other call is inside too
        return mean_engine(batch)

    batcher, recorder, metrics = make([meeting_engine, meeting_engine], max_batch=1)
    batcher.start()
    batcher.submit(window("a", 0))
    batcher.submit(window("b", 0))
    recorder.wait_for(2)
    batcher.stop()
    assert metrics.sample("tagd_engine_errors_total") == 0
    assert sorted(r.items[0].window.stream for r in recorder.results) == ["a", "b"]


def test_a_streams_windows_are_never_on_two_instances_and_stay_in_order():
    on_engine: list[set[str]] = [set(), set()]
    overlaps = []

    def instance(index: int):
        def run(batch: np.ndarray) -> np.ndarray:
            streams = {chr(ord("a") + int(row[1])) for row in batch}
            if streams & on_engine[1 - index]:
                overlaps.append(streams)
            on_engine[index] = streams
            time.sleep(0.002)
            on_engine[index] = set()
            return mean_engine(batch)

        return run

    batcher, recorder, _ = make(
        [instance(0), instance(1)], max_batch=2, max_wait_s=0.0, max_pending_per_stream=100
    )
    batcher.start()
    for seq in range(40):
        for number, stream in enumerate("abc"):
            item = window(stream, seq)
            item.samples[1] = number  # tells the engine the stream
            batcher.submit(item)
    recorder.wait_for(120)
    batcher.stop()
    assert overlaps == []
    for stream in "abc":
        assert recorder.seqs(stream) == list(range(40))  # handled in order, none lost


def test_every_window_is_recycled_once_batched_or_dropped_never_twice():
    engine = GatedEngine()
    recycled: list[int] = []
    batcher, recorder, metrics = make(
        engine=engine,
        max_batch=1,
        max_pending_per_stream=2,
        max_queue_age_s=0.05,
        recycle=lambda samples: recycled.append(id(samples)),
    )
    windows = [window("a", seq) for seq in range(7)]
    batcher.start()
    batcher.submit(windows[0])
    # a0 is in the engine, which reads the window's own samples (a batch of one is not
    # copied): they must not go back to the pool before the call returns
    assert engine.entered.wait(2)
    assert recycled == []
    for w in windows[1:4]:  # a1 dropped as queue_full when a3 arrives
        batcher.submit(w)
    time.sleep(0.1)  # a2 and a3 go stale while the engine is held
    engine.release.set()  # a0 finishes; before the next batch the worker drops a2 and a3
    deadline = time.monotonic() + 5
    while id(windows[0].samples) not in recycled:
        assert time.monotonic() < deadline, "a0 was not recycled after its engine call"
        time.sleep(0.01)
    deadline = time.monotonic() + 5
    while (
        metrics.sample("tagd_windows_dropped_total", {"stream": "a", "reason": "stale"}) or 0
    ) < 2:
        assert time.monotonic() < deadline, "the stale windows were not dropped"
        time.sleep(0.01)
    batcher.submit(windows[4])
    recorder.wait_for(2)
    engine.release.clear()
    engine.entered.clear()
    batcher.submit(windows[5])
    assert engine.entered.wait(2)  # the engine is held on a5
    batcher.submit(windows[6])  # still pending at stop: dropped as shutdown
    threading.Timer(0.1, engine.release.set).start()
    assert batcher.stop(timeout=2.0)
    assert recorder.seqs("a") == [0, 4, 5]
    reasons = {
        r: metrics.sample("tagd_windows_dropped_total", {"stream": "a", "reason": r})
        for r in ("queue_full", "stale", "shutdown")
    }
    assert reasons == {"queue_full": 1, "stale": 2, "shutdown": 1}
    assert sorted(recycled) == sorted(id(w.samples) for w in windows)  # each exactly once


def test_after_a_long_stall_batches_still_take_the_oldest_windows_across_streams():
    # Many drops while the engine is stuck: the submission order is compacted, and
    # what survives still goes out oldest first, whichever stream it belongs to.
    engine = GatedEngine()
    batcher, recorder, _ = make(engine=engine, max_batch=1, max_pending_per_stream=2)
    batcher.start()
    batcher.submit(window("z", 0))
    assert engine.entered.wait(2)
    for seq in range(1, 200):
        for stream in ("a", "b", "c"):
            batcher.submit(window(stream, seq))
    batcher.submit(window("late", 500))
    assert batcher.pending() == 7
    engine.release.set()
    recorder.wait_for(8)
    batcher.stop()
    taken = [(i.window.stream, i.window.seq) for r in recorder.results for i in r.items]
    assert taken == [
        ("z", 0),
        ("a", 198),
        ("b", 198),
        ("c", 198),
        ("a", 199),
        ("b", 199),
        ("c", 199),
        ("late", 500),
    ]
