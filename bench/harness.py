"""The harness of bench/serve.py: producers, `tagd serve` as a process, the baselines.

- ``Producer``: N streams on one PUSH socket over the multi-stream protocol, paced in real
  time, each at its own phase of the hop and of the message cycle, every send kept so a
  subscriber can time a window from the message that carried its last sample;
- ``Daemon`` and ``run_daemon``: `tagd serve` fed by a producer, its published windows
  timed by a subscriber, into a ``RunResult``; ``idle_rss``: memory with idle streams;
- the baselines on the same windows: the bare engine (``bare_engine``, ``paced_window``,
  ``side_by_side``), ``naive_loop`` and ``ideal_fifo``.

It measures and returns figures; bench/serve.py chooses the runs and prints the report.
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
import os
import resource
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # support: the daemon process and free ports

from support import TagdProcess, connect_and_wait, free_port  # noqa: E402

from tagd.metrics import Metrics  # noqa: E402
from tagd.scoring import FULL, INCREMENTAL  # noqa: E402
from tagd.sources.zmq import parse_message  # noqa: E402
from tagd.stream import (  # noqa: E402
    LIVE_CHECK_S,
    PHASE_WINDOWS,
    Arrival,
    ReadyWindow,
    Stream,
    StreamGeometry,
)

SOURCE_RATE = 44_100
CHANNELS = 2
# Each stream sends 1152 frames (4608 bytes, 26 ms) per message: what ffmpeg's zmq output
# sends for 44.1 kHz stereo s16le. Windows complete when a message arrives, so message
# size sets how finely completion times fall.
MESSAGE_FRAMES = 1152
MAX_PRODUCER_SLEEP_S = 0.01
PREROLL_S = 5  # the pre-roll goes in 5 s messages
AUDIO_LOOP_S = 37.0  # streams loop this much generated audio
IDLE_STREAMS = 50
MAX_STREAMS = 1024  # the daemon's limits.max_streams in the bench
WARMUP_S = 12.0  # measurements skip at least the first seconds of each run


def warmup_s(hop_s: float) -> float:
    """Seconds before a daemon run is measured: until every stream's phase is placed.

    The hub places a stream once it is live (LIVE_CHECK_S) and has completed
    PHASE_WINDOWS windows, and the move delays its next window by up to a hop: a
    measurement that overlaps it counts a window fewer for that stream (at FCN-4's 3 s
    hop, 37 streams that keep up published 0.94 of the offered windows with 12 s).
    """
    return max(WARMUP_S, LIVE_CHECK_S + (PHASE_WINDOWS + 2) * hop_s)


# -- audio and producers -------------------------------------------------------------------


def music_like(seconds: float, rate: int, seed: int, channels: int = CHANNELS) -> np.ndarray:
    """Float32 frames: chords changing every second over noise (content barely matters)."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    out = 0.02 * rng.standard_normal((len(t), channels))
    for second in range(int(np.ceil(seconds))):
        part = slice(second * rate, (second + 1) * rate)
        root = 110 * 2 ** rng.uniform(0, 2)
        for ratio in (1.0, 1.26, 1.5):
            out[part] += 0.1 * np.sin(2 * np.pi * root * ratio * t[part])[:, None]
    return np.clip(out, -1, 1).astype(np.float32)


def looped_audio(rate: int, channels: int) -> np.ndarray:
    """The s16le frames that streams loop, at ``rate`` with ``channels``."""
    return (music_like(AUDIO_LOOP_S, rate, seed=0, channels=channels) * 32767).astype("<i2")


AUDIO = looped_audio(SOURCE_RATE, CHANNELS)


class Producer:
    """N streams on one PUSH socket, paced in real time, each with a random phase.

    Each stream first sends (window - phase) seconds at once, so its first window is
    complete ``phase`` seconds after the start and one follows every hop. Then it sends
    ``message_frames`` per message, each when its last frame is due, at its own lag in
    the message cycle (independent producers). Every message's last frame and send time
    are kept, so a subscriber can time a prediction from the message that carried its
    window's last sample (``sent_at``). Streams are 44.1 kHz stereo unless ``rate`` and
    ``channels`` say otherwise (the model's rate in mono: nothing for the daemon to
    resample).
    """

    def __init__(
        self,
        endpoint: str,
        streams: int,
        window_s: float,
        hop_s: float,
        seed: int = 1,
        message_frames: int = MESSAGE_FRAMES,
        rate: int = SOURCE_RATE,
        channels: int = CHANNELS,
    ) -> None:
        self.endpoint, self.streams, self.window_s = endpoint, streams, window_s
        self.message_frames = message_frames
        self.rate, self.channels = rate, channels
        audio = (
            AUDIO if (rate, channels) == (SOURCE_RATE, CHANNELS) else looped_audio(rate, channels)
        )
        self._audio_frames, self._audio_bytes = len(audio), audio.tobytes()
        self._frame_bytes = 2 * channels
        rng = np.random.default_rng(seed)
        self.phases = rng.uniform(0.05, 0.05 + hop_s, streams)
        self.offsets = rng.integers(0, len(audio), streams)  # different audio per stream
        self.message_lag = rng.integers(0, message_frames, streams)
        self.frames_sent = 0
        # per stream: frames sent after each message, and when it left (perf_counter)
        self._sent_frames: list[list[int]] = [[] for _ in range(streams)]
        self._sent_times: list[list[float]] = [[] for _ in range(streams)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Producer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def sent_at(self, stream: int, frame: int) -> float | None:
        """When the message carrying source frame ``frame`` of ``stream`` was sent."""
        index = bisect.bisect_right(self._sent_frames[stream], frame)
        times = self._sent_times[stream]
        return times[index] if index < len(times) else None

    def _chunk(self, stream: int, start_frame: int, frames: int) -> bytes:
        # Byte slices of the looped audio: the producer must cost the CPUs next to nothing.
        first = (int(self.offsets[stream]) + start_frame) % self._audio_frames
        parts, left, size = [], frames, self._frame_bytes
        while left:
            take = min(left, self._audio_frames - first)
            parts.append(self._audio_bytes[first * size : (first + take) * size])
            left, first = left - take, 0
        return b"".join(parts)

    def _send(self, push: zmq.Socket, stream: int, start_frame: int, frames: int, seq: int) -> None:
        header = {"format": "s16le", "rate": self.rate, "channels": self.channels, "seq": seq}
        header["t"] = time.time()  # the naive loop counts its latency from here
        payload = self._chunk(stream, start_frame, frames)
        push.send_multipart([f"s{stream}".encode(), json.dumps(header).encode(), payload])
        self._sent_frames[stream].append(start_frame + frames)
        self._sent_times[stream].append(time.perf_counter())

    def _run(self) -> None:
        context = zmq.Context()
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        push.connect(self.endpoint)
        rate = self.rate
        preroll = [max(0, round((self.window_s - phase) * rate)) for phase in self.phases]
        lag = [int(frames) for frames in self.message_lag]
        message_frames = self.message_frames
        sent = [0] * self.streams  # frames sent per stream
        seq = [0] * self.streams
        for stream in range(self.streams):  # at once, in big messages
            while sent[stream] < preroll[stream]:
                frames = min(PREROLL_S * rate, preroll[stream] - sent[stream])
                self._send(push, stream, sent[stream], frames, seq[stream])
                sent[stream] += frames
                seq[stream] += 1
        self.frames_sent = sum(sent)
        started = time.perf_counter()

        def due_at(stream: int) -> float:  # when the next message's last frame is due
            return started + (sent[stream] + message_frames + lag[stream] - preroll[stream]) / rate

        # then in real time, each message when its last frame is due (ffmpeg sends each
        # packet when decoded); a heap keeps the cost per message, not per stream
        schedule = [(due_at(stream), stream) for stream in range(self.streams)]
        heapq.heapify(schedule)
        while not self._stop.is_set():
            now = time.perf_counter()
            while schedule[0][0] <= now:
                _, stream = heapq.heappop(schedule)
                self._send(push, stream, sent[stream], message_frames, seq[stream])
                sent[stream] += message_frames
                seq[stream] += 1
                self.frames_sent += message_frames
                heapq.heappush(schedule, (due_at(stream), stream))
            self._stop.wait(min(MAX_PRODUCER_SLEEP_S, schedule[0][0] - now))
        push.close(linger=0)
        context.term()


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the daemon --------------------------------------------------------------------------


@dataclass
class RunResult:
    streams: int
    hop_s: float
    offered_per_s: float
    published_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    dropped: float
    published: float
    cpu_cores: float
    rss_mb: float
    batch_mean: float | None = None
    inference_p50_ms: float | None = None  # the engine call, as the daemon timed it
    queue_p50_ms: float | None = None
    inference_p99_ms: float | None = None
    queue_p99_ms: float | None = None
    # share of windows that waited over 1 ms for the engine: behind another stream's window
    queued_share: float | None = None
    # the resampler holding the window's last sample back (latency_ms.ingest)
    ingest_p50_ms: float | None = None
    ingest_p99_ms: float | None = None
    # total - ingest: from the window ready to publication (runs before latency_ms.ingest
    # existed measured this as the total)
    ready_p50_ms: float | None = None
    ready_p99_ms: float | None = None
    # total - ingest - queue - inference: tagging and publishing
    overhead_p50_ms: float | None = None
    overhead_p99_ms: float | None = None
    # From the producer's send of the message carrying the window's last sample to the
    # subscriber's receipt: adds what the daemon's own clock cannot see (time in sockets
    # before the reader gets to them, and after publication).
    outside_p50_ms: float | None = None
    outside_p99_ms: float | None = None
    bench_cores: float | None = None  # this process: producer and subscriber
    notes: dict = field(default_factory=dict)
    # per window received: (unix time it was ready, its latency_ms.ingest), for ideal_fifo
    windows_ready: list[tuple[float, float]] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        """The figures, without the per-window list."""
        figures = asdict(self)
        figures.pop("windows_ready")
        return figures


class Daemon(TagdProcess):
    """`tagd serve` on a zmq+pull input, its extra config in a temporary file."""

    def __init__(self, model: Path, hop_s: float, extra: list[str] | None = None, toml: str = ""):
        self.input_port, self.publish_port = free_port(), free_port()
        metrics_port = free_port()
        self._config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)  # noqa: SIM115
        self._config.write(toml)  # top-level keys, then tables, e.g. [onnxruntime]
        self._config.write(f"[limits]\nmax_streams = {MAX_STREAMS}\n")  # more than the default 64
        self._config.close()
        super().__init__(
            [
                "--engine",
                str(model),
                "--input",
                f"zmq+pull://127.0.0.1:{self.input_port}",
                "--publish",
                f"tcp://127.0.0.1:{self.publish_port}",
                "--metrics",
                f"127.0.0.1:{metrics_port}",
                "--hop",
                str(hop_s),
                "--log-level",
                "warning",
                "--config",
                self._config.name,
                *(extra or []),
            ],
            metrics_port,
        )
        self.wait_ready(timeout=60)

    @property
    def input(self) -> str:
        return f"tcp://127.0.0.1:{self.input_port}"

    def peak_rss_mb(self) -> float:
        return self.rss_mb("VmHWM")

    def stop(self) -> int:
        code = super().stop()
        os.unlink(self._config.name)
        return code


def run_daemon(
    model: Path,
    window_s: float,
    streams: int,
    hop_s: float,
    seconds: float,
    toml: str = "",
    message_frames: int = MESSAGE_FRAMES,
    rate: int = SOURCE_RATE,
    channels: int = CHANNELS,
    settle_s: float = 0.0,
) -> RunResult:
    """``message_frames`` are at 44.1 kHz: other rates keep the same message duration.

    ``settle_s`` (incremental inference): after the warm-up, wait up to that long for a
    hop in which the daemon primed no window (every stream's chain running, its start-up
    and phase-move primes done) before measuring; ``notes`` say how long it took."""
    daemon = Daemon(model, hop_s, toml=toml)
    try:
        context = zmq.Context()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"tags.")
        sub.setsockopt(zmq.RCVHWM, 0)
        connect_and_wait(sub, f"tcp://127.0.0.1:{daemon.publish_port}")
        producer = Producer(
            daemon.input,
            streams,
            window_s,
            hop_s,
            rate=rate,
            channels=channels,
            message_frames=round(message_frames * rate / SOURCE_RATE),
        ).start()
        started = time.perf_counter()
        drain(sub, started + warmup_s(hop_s))
        settled = settle_primes(daemon, sub, hop_s, settle_s) if settle_s else None
        measure_from = time.perf_counter()
        latencies, ingest, ready, inference, queued, overhead, outside = [], [], [], [], [], [], []
        windows_ready = []
        received = 0
        cpu0 = bench_cpu0 = None
        published0 = dropped0 = 0.0
        while time.perf_counter() < measure_from + seconds:
            if cpu0 is None and time.perf_counter() >= measure_from:
                cpu0, published0 = (
                    daemon.cpu_seconds(),
                    daemon.metric_sum("tagd_windows_published_total"),
                )
                dropped0 = daemon.metric_sum("tagd_windows_dropped_total")
                batches0 = daemon.metric_sum("tagd_batch_size_count")
                updates0 = window_updates(daemon)
                bench_cpu0 = process_cpu_seconds()
            if not sub.poll(100):
                continue
            _, body = sub.recv_multipart()
            received_at = time.perf_counter()
            if received_at >= measure_from:
                received += 1
                message = json.loads(body)
                timing = message["latency_ms"]
                latencies.append(timing["total"])
                inference.append(timing["inference"])
                queued.append(timing["queue"])
                ingest.append(timing["ingest"])
                ready.append(timing["total"] - timing["ingest"])
                windows_ready.append(
                    (message["captured_at"] + timing["ingest"] / 1000, timing["ingest"])
                )
                overhead.append(
                    timing["total"] - timing["ingest"] - timing["queue"] - timing["inference"]
                )
                last_frame = math.ceil(message["window"]["end_s"] * rate - 1e-3) - 1
                sent = producer.sent_at(int(message["stream"][1:]), last_frame)
                if sent is not None:
                    outside.append((received_at - sent) * 1000)
        cpu = (daemon.cpu_seconds() - cpu0) / seconds
        bench_cpu = (process_cpu_seconds() - bench_cpu0) / seconds
        published = daemon.metric_sum("tagd_windows_published_total") - published0
        dropped = daemon.metric_sum("tagd_windows_dropped_total") - dropped0
        batches = daemon.metric_sum("tagd_batch_size_count") - batches0
        updates = {mode: n - updates0[mode] for mode, n in window_updates(daemon).items()}
        rss = daemon.rss_mb()
        producer.stop()
        sub.close(linger=0)
        context.term()
    finally:
        code = daemon.stop()
    return RunResult(
        streams=streams,
        hop_s=hop_s,
        offered_per_s=streams / hop_s,
        published_per_s=published / seconds,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        dropped=dropped,
        published=published,
        cpu_cores=cpu,
        rss_mb=rss,
        batch_mean=published / batches if batches else None,
        inference_p50_ms=percentile(inference, 50),
        queue_p50_ms=percentile(queued, 50),
        inference_p99_ms=percentile(inference, 99),
        queue_p99_ms=percentile(queued, 99),
        queued_share=float(np.mean(np.asarray(queued) > 1.0)) if queued else None,
        ingest_p50_ms=percentile(ingest, 50),
        ingest_p99_ms=percentile(ingest, 99),
        ready_p50_ms=percentile(ready, 50),
        ready_p99_ms=percentile(ready, 99),
        overhead_p50_ms=percentile(overhead, 50),
        overhead_p99_ms=percentile(overhead, 99),
        outside_p50_ms=percentile(outside, 50),
        outside_p99_ms=percentile(outside, 99),
        bench_cores=bench_cpu,
        notes={
            "exit_code": code,
            "received": received,
            "updates": updates,
            "settled": settled,
            "measured_after_s": measure_from - started,
        },
        windows_ready=windows_ready,
    )


def drain(sub: zmq.Socket, until: float) -> None:
    """Receive and drop the daemon's messages until ``until`` (perf_counter)."""
    while (left := until - time.perf_counter()) > 0:
        if sub.poll(min(100, max(1, round(left * 1000)))):
            sub.recv_multipart()


def settle_primes(daemon: Daemon, sub: zmq.Socket, hop_s: float, settle_s: float) -> bool:
    """Wait (draining) for a hop with no window primed, at most ``settle_s``; whether it came."""
    deadline = time.perf_counter() + settle_s
    primes = window_updates(daemon)[FULL]
    while time.perf_counter() < deadline:
        drain(sub, min(deadline, time.perf_counter() + hop_s))
        now = window_updates(daemon)[FULL]
        if now == primes:
            return True
        primes = now
    return False


def window_updates(daemon: Daemon) -> dict[str, float]:
    """Windows the daemon has scored so far, by mode: from the last window's state or in full."""
    return {
        mode: daemon.metric("tagd_window_updates_total", mode=mode) for mode in (INCREMENTAL, FULL)
    }


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def ideal_fifo(result: RunResult, window_ms: float) -> dict:
    """What a daemon with no cost of its own would reach on the same windows.

    One engine that takes the windows in the order they were ready, each in exactly
    ``window_ms``, with nothing else on the machine: a window waits only for those
    ready before it. Its latency counts from the same capture as the daemon's (the
    resampler's hold, ``ingest``, included), so no design with one engine can do better
    at the p99 than this on these arrivals; only the windows' spacing decides it.
    """
    free_at = -math.inf
    totals, readies = [], []
    for ready_at, ingest_ms in sorted(result.windows_ready):
        finished = max(ready_at, free_at) + window_ms / 1000
        free_at = finished
        readies.append((finished - ready_at) * 1000)
        totals.append(ingest_ms + readies[-1])
    return {
        "window_ms": window_ms,
        "p50_ms": percentile(totals, 50),
        "p99_ms": percentile(totals, 99),
        "ready_p50_ms": percentile(readies, 50),
        "ready_p99_ms": percentile(readies, 99),
        "waited_share": float(np.mean(np.asarray(readies) > window_ms + 1.0)) if readies else None,
    }


def idle_rss(
    model: Path, window_s: float, hop_s: float, streams: int = IDLE_STREAMS, toml: str = ""
) -> dict:
    """RSS once ``streams`` streams have each filled a window and gone quiet."""
    daemon = Daemon(model, hop_s, toml=toml)
    try:
        baseline = daemon.rss_mb()
        producer = Producer(daemon.input, streams, window_s, hop_s).start()
        time.sleep(1.0)
        producer.stop()  # every stream has sent its pre-roll: a full window
        expected_s = producer.frames_sent / SOURCE_RATE
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # until all audio is in and every stream is idle
            received = daemon.metric_sum("tagd_audio_received_seconds_total")
            if received >= expected_s - 1e-3 and daemon.metric_sum("tagd_active_streams") == 0:
                break
            time.sleep(0.5)
        time.sleep(2.0)
        known = daemon.metric_sum("tagd_streams")
        rss = daemon.rss_mb()
        peak = daemon.peak_rss_mb()
    finally:
        daemon.stop()
    return {
        "streams": streams,
        "known": known,
        "audio_s": expected_s,
        "rss_mb": rss,
        "peak_rss_mb": peak,
        "rss_before_mb": baseline,
    }


# -- baselines ------------------------------------------------------------------------------


def cut_windows(geometry: StreamGeometry, count: int) -> np.ndarray:
    windows: list[ReadyWindow] = []
    stream = Stream("bench", geometry, windows.append, Metrics())
    chunk = round(SOURCE_RATE * 1.0)
    position = 0
    while len(windows) < count:
        stream.push_pcm(
            AUDIO[position % len(AUDIO) :][:chunk].tobytes(),
            "s16le",
            SOURCE_RATE,
            CHANNELS,
            Arrival.now(),
        )
        position += chunk
    return np.stack([w.samples for w in windows[:count]])


def batch_seconds(engine, batch: np.ndarray, seconds: float) -> list[float]:
    """Times of back-to-back runs of ``batch`` for about ``seconds`` (at least 3 runs)."""
    times = []
    began = time.perf_counter()
    while time.perf_counter() - began < seconds or len(times) < 3:
        t0 = time.perf_counter()
        engine.run(batch)
        times.append(time.perf_counter() - t0)
    return times


def paced_window(engines: dict, windows: np.ndarray, rate: float, seconds: float = 8.0) -> dict:
    """One window at a time, one every 1/``rate`` s: the engine as the daemon sees it at
    that load, its caches and thread pool cooled between windows, but nothing queued.

    Back to back a window runs faster than on its own (SampleCNN here: 14.5 against
    16.3 ms with 15 ms between runs): this is the inference time the half-load latency
    is held against, next to the back-to-back figure. Each engine given gets an equal
    share of ``seconds``; the faster median is kept.
    """
    found = {}
    for name, engine in engines.items():
        times, due = [], time.perf_counter()
        began = due
        while time.perf_counter() - began < seconds / len(engines):
            time.sleep(max(0.0, due - time.perf_counter()))
            t0 = time.perf_counter()
            engine.run(windows[len(times) % len(windows)][None])
            times.append(time.perf_counter() - t0)
            due += 1.0 / rate
        found[name] = {
            "p50_ms": float(np.median(times)) * 1000,
            "p99_ms": float(np.percentile(times, 99)) * 1000,
        }
    best = min(found, key=lambda name: found[name]["p50_ms"])
    return {"engine": best, **found[best], "per_engine": found}


def side_by_side(engines: list, window: np.ndarray, seconds: float) -> dict:
    """Engine instances each running ``window`` back to back in its own thread, at once:
    windows/s of them all, and one window's median time on one instance."""
    times: list[list[float]] = [[] for _ in engines]
    began = time.perf_counter()

    def work(engine, found: list[float]) -> None:
        while time.perf_counter() - began < seconds:
            t0 = time.perf_counter()
            engine.run(window)
            found.append(time.perf_counter() - t0)

    threads = [
        threading.Thread(target=work, args=pair) for pair in zip(engines, times, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    return {
        "windows_per_s": sum(map(len, times)) / elapsed,
        "window_ms": float(np.median(np.concatenate(times))) * 1000,
    }


def bare_engine(
    engines: dict, windows: np.ndarray, seconds_per_size: float = 4.0, rounds: int = 4
) -> dict:
    """Each engine at batch sizes 1..8, in alternating rounds; the best is the reference.

    The engines are the daemon's (its pool spins while a run is in flight only) and ONNX
    Runtime's default (spinning after each run too): the reference is the faster.
    """
    times: dict = {name: {} for name in engines}
    for size in (1, 2, 4, 8):
        batch = windows[:size]
        for engine in engines.values():
            engine.run(batch)
        for _ in range(rounds):
            for name, engine in engines.items():
                times[name].setdefault(size, []).extend(
                    batch_seconds(engine, batch, seconds_per_size / rounds / len(engines))
                )
    per_engine = {
        name: {
            size: {"median_s": float(np.median(t)), "windows_per_s": size / float(np.median(t))}
            for size, t in sizes.items()
        }
        for name, sizes in times.items()
    }
    fastest = min(per_engine, key=lambda name: per_engine[name][1]["median_s"])
    best_engine, best = max(
        ((name, size) for name in per_engine for size in per_engine[name]),
        key=lambda key: per_engine[key[0]][key[1]]["windows_per_s"],
    )
    return {
        "window_inference_ms": per_engine[fastest][1]["median_s"] * 1000,
        # the engine alone is not steady either: its own p99 over its median
        "window_inference_p99_ms": float(np.percentile(times[fastest][1], 99)) * 1000,
        "window_inference_engine": fastest,
        "best_engine": best_engine,
        "best_batch": best,
        "windows_per_s": per_engine[best_engine][best]["windows_per_s"],
        "per_engine": per_engine,
    }


def naive_loop(
    engine,
    window_s: float,
    streams: int,
    hop_s: float,
    seconds: float,
    message_frames: int = MESSAGE_FRAMES,
) -> dict:
    """One thread: read, window, run each window at once (batch 1). Nothing is dropped.

    Latency counts from when the producer sent the completing message: while the loop
    runs the engine, messages wait in the socket, and that wait is part of its latency.
    """
    card = engine.card
    geometry = StreamGeometry(
        card.sample_rate, card.window_samples, round(hop_s * card.sample_rate)
    )
    port = free_port()
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.bind(f"tcp://127.0.0.1:{port}")
    latencies: list[tuple[float, float]] = []  # (done at, latency)

    def run_now(window: ReadyWindow) -> None:
        engine.run(window.samples[None, :])
        done = time.perf_counter()
        latencies.append((done, done - window.captured.mono))

    producer = Producer(
        f"tcp://127.0.0.1:{port}", streams, window_s, hop_s, message_frames=message_frames
    ).start()
    pipelines: dict[str, Stream] = {}
    started = time.perf_counter()
    while time.perf_counter() < started + WARMUP_S + seconds:
        if not pull.poll(100):
            continue
        name, header, pcm = parse_message(pull.recv_multipart())
        stream = pipelines.setdefault(name, Stream(name, geometry, run_now, Metrics()))
        sent = Arrival(header["t"], time.perf_counter() - (time.time() - header["t"]))
        stream.push_pcm(
            pcm, header["format"], header["rate"], header["channels"], sent, header["seq"]
        )
    producer.stop()
    pull.close(linger=0)
    context.term()
    measured = [lat for done, lat in latencies if done >= started + WARMUP_S]
    return {
        "streams": streams,
        "hop_s": hop_s,
        "offered_per_s": streams / hop_s,
        "windows_per_s": len(measured) / seconds,
        "p50_ms": float(np.percentile(measured, 50)) * 1000 if measured else None,
        "p99_ms": float(np.percentile(measured, 99)) * 1000 if measured else None,
    }


def export_full_size(arch: str, folder: Path) -> Path:
    import torch

    from trainer.export import export_onnx
    from trainer.models import create_model

    torch.manual_seed(0)
    path = folder / f"{arch}.onnx"
    export_onnx(create_model(arch, 50), path, check=False)
    return path
