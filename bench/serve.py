"""Benchmark `tagd serve`: N live streams against the bare engine and a naive loop.

    .venv/bin/python bench/serve.py                    # fcn4 and samplecnn, ~8 minutes
    .venv/bin/python bench/serve.py --models fcn4 --seconds 15

For each model (full size, untrained, exported here with trainer.export) it measures,
in one run on this machine:

1. bare engine: one window's inference time (batch 1, median) and the best windows/s
   over batch sizes 1..8, on windows cut from the same audio the streams carry;
2. naive loop: one thread that reads the same streams and runs each window as soon as
   it is complete (batch 1, ingest waits for inference, nothing dropped);
3. `tagd serve` in a subprocess, fed over the multi-stream protocol by streams paced in
   real time (44.1 kHz stereo s16le, 100 ms messages, each stream at its own random
   phase of the hop and of the message cycle; the first window is pre-rolled so that
   measuring starts at once):
   - saturation: offered twice the bare engine's rate → windows published per second;
   - half load: half the saturation throughput → end-to-end latency p50/p99;
   - the largest N streams at the card's hop with no drops and p99 under one hop;
   - RSS with 50 idle-but-connected streams.

End-to-end latency is the daemon's own `latency_ms.total` (last sample's arrival to
publication). CPU is the daemon's user+system time over wall time (1.0 = one core).
Figures go to stdout as a table and, with --json, as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tagd.engines import load_engine  # noqa: E402
from tagd.metrics import Metrics  # noqa: E402
from tagd.sources.zmq import parse_message  # noqa: E402
from tagd.stream import Arrival, ReadyWindow, Stream, StreamGeometry  # noqa: E402

SOURCE_RATE = 44_100
CHANNELS = 2
MESSAGE_S = 0.1  # each stream sends 100 ms of audio per message
PREROLL_MESSAGE_FRAMES = 5 * SOURCE_RATE  # the pre-roll goes in 5 s messages
AUDIO_LOOP_S = 37.0  # streams loop this much generated audio
IDLE_STREAMS = 50
MAX_STREAMS = 1024  # the daemon's limits.max_streams in the bench
WARMUP_S = 12.0  # measurements skip the first seconds of each run: streams get placed


# -- audio and producers -------------------------------------------------------------------


def music_like(seconds: float, rate: int, seed: int) -> np.ndarray:
    """Stereo float32: chords changing every second over noise (content barely matters)."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    out = 0.02 * rng.standard_normal((len(t), CHANNELS))
    for second in range(int(np.ceil(seconds))):
        part = slice(second * rate, (second + 1) * rate)
        root = 110 * 2 ** rng.uniform(0, 2)
        for ratio in (1.0, 1.26, 1.5):
            out[part] += 0.1 * np.sin(2 * np.pi * root * ratio * t[part])[:, None]
    return np.clip(out, -1, 1).astype(np.float32)


AUDIO = (music_like(AUDIO_LOOP_S, SOURCE_RATE, seed=0) * 32767).astype("<i2")
AUDIO_BYTES = AUDIO.tobytes()
FRAME_BYTES = 2 * CHANNELS


class Producer:
    """N streams on one PUSH socket, paced in real time, each with a random phase.

    Each stream first sends (window - phase) seconds at once, so its first window is
    complete ``phase`` seconds after the start and one follows every hop.
    """

    def __init__(self, endpoint: str, streams: int, window_s: float, hop_s: float, seed: int = 1):
        self.endpoint, self.streams, self.window_s = endpoint, streams, window_s
        rng = np.random.default_rng(seed)
        self.phases = rng.uniform(0.05, 0.05 + hop_s, streams)
        self.offsets = rng.integers(0, len(AUDIO), streams)  # different audio per stream
        # Independent producers: each stream's messages leave at its own point of the
        # 100 ms cycle, not all at once.
        self.message_lag = np.round(rng.uniform(0, MESSAGE_S, streams) * SOURCE_RATE).astype(
            np.int64
        )
        self.frames_sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Producer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _chunk(self, stream: int, start_frame: int, frames: int) -> bytes:
        # Byte slices of the looped audio: the producer must cost the CPUs next to nothing.
        first = (int(self.offsets[stream]) + start_frame) % len(AUDIO)
        parts, left = [], frames
        while left:
            take = min(left, len(AUDIO) - first)
            parts.append(AUDIO_BYTES[first * FRAME_BYTES : (first + take) * FRAME_BYTES])
            left, first = left - take, 0
        return b"".join(parts)

    def _send(self, push: zmq.Socket, stream: int, start_frame: int, frames: int, seq: int) -> None:
        header = {"format": "s16le", "rate": SOURCE_RATE, "channels": CHANNELS, "seq": seq}
        header["t"] = time.time()  # the naive loop counts its latency from here
        payload = self._chunk(stream, start_frame, frames)
        push.send_multipart([f"s{stream}".encode(), json.dumps(header).encode(), payload])

    def _run(self) -> None:
        context = zmq.Context()
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        push.connect(self.endpoint)
        sent = np.zeros(self.streams, dtype=np.int64)  # frames sent per stream
        seq = np.zeros(self.streams, dtype=np.int64)
        preroll = np.maximum(0, np.round((self.window_s - self.phases) * SOURCE_RATE)).astype(
            np.int64
        )
        message_frames = round(MESSAGE_S * SOURCE_RATE)
        started = time.perf_counter()
        while not self._stop.is_set():
            due = preroll + int((time.perf_counter() - started) * SOURCE_RATE) - self.message_lag
            for stream in range(self.streams):
                while sent[stream] < preroll[stream]:  # at once, in big messages
                    frames = int(min(PREROLL_MESSAGE_FRAMES, preroll[stream] - sent[stream]))
                    self._send(push, stream, int(sent[stream]), frames, int(seq[stream]))
                    sent[stream] += frames
                    seq[stream] += 1
                while due[stream] - sent[stream] >= message_frames:  # then in real time
                    self._send(push, stream, int(sent[stream]), message_frames, int(seq[stream]))
                    sent[stream] += message_frames
                    seq[stream] += 1
                self.frames_sent = int(sent.sum())
            self._stop.wait(0.01)
        push.close(linger=0)
        context.term()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
    notes: dict = field(default_factory=dict)


class Daemon:
    def __init__(self, model: Path, hop_s: float, extra: list[str] | None = None):
        self.input_port, self.publish_port, self.metrics_port = (
            free_port(),
            free_port(),
            free_port(),
        )
        self._config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)  # noqa: SIM115
        self._config.write(f"[limits]\nmax_streams = {MAX_STREAMS}\n")  # more than the default 64
        self._config.close()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tagd.cli", "serve", "--engine", str(model),
             "--input", f"zmq+pull://127.0.0.1:{self.input_port}",
             "--publish", f"tcp://127.0.0.1:{self.publish_port}",
             "--metrics", f"127.0.0.1:{self.metrics_port}", "--hop", str(hop_s),
             "--log-level", "warning", "--config", self._config.name, *(extra or [])],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._get("/healthz")[0] == 200:
                break
            if self.process.poll() is not None:
                raise RuntimeError(f"tagd serve exited with {self.process.returncode}")
            time.sleep(0.1)
        else:
            raise RuntimeError("tagd serve did not become ready")

    @property
    def input(self) -> str:
        return f"tcp://127.0.0.1:{self.input_port}"

    def _get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}{path}", timeout=2
            ) as r:
                return r.status, r.read().decode()
        except OSError:
            return 0, ""

    def metric_sum(self, name: str) -> float:
        total = 0.0
        for line in self._get("/metrics")[1].splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self, field: str = "VmRSS") -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def peak_rss_mb(self) -> float:
        return self.rss_mb("VmHWM")

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(timeout=10)
        os.unlink(self._config.name)
        return code


def run_daemon(
    model: Path, window_s: float, streams: int, hop_s: float, seconds: float
) -> RunResult:
    daemon = Daemon(model, hop_s)
    try:
        context = zmq.Context()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"tags.")
        sub.setsockopt(zmq.RCVHWM, 0)
        sub.connect(f"tcp://127.0.0.1:{daemon.publish_port}")
        time.sleep(0.3)
        producer = Producer(daemon.input, streams, window_s, hop_s).start()
        started = time.perf_counter()
        measure_from = started + WARMUP_S
        latencies, inference, queued, received = [], [], [], 0
        cpu0 = None
        published0 = dropped0 = 0.0
        while time.perf_counter() < measure_from + seconds:
            if cpu0 is None and time.perf_counter() >= measure_from:
                cpu0, published0 = (
                    daemon.cpu_seconds(),
                    daemon.metric_sum("tagd_windows_published_total"),
                )
                dropped0 = daemon.metric_sum("tagd_windows_dropped_total")
                batches0 = daemon.metric_sum("tagd_batch_size_count")
            if not sub.poll(100):
                continue
            _, body = sub.recv_multipart()
            if time.perf_counter() >= measure_from:
                received += 1
                timing = json.loads(body)["latency_ms"]
                latencies.append(timing["total"])
                inference.append(timing["inference"])
                queued.append(timing["queue"])
        cpu = (daemon.cpu_seconds() - cpu0) / seconds
        published = daemon.metric_sum("tagd_windows_published_total") - published0
        dropped = daemon.metric_sum("tagd_windows_dropped_total") - dropped0
        batches = daemon.metric_sum("tagd_batch_size_count") - batches0
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
        p50_ms=float(np.percentile(latencies, 50)) if latencies else None,
        p99_ms=float(np.percentile(latencies, 99)) if latencies else None,
        dropped=dropped,
        published=published,
        cpu_cores=cpu,
        rss_mb=rss,
        batch_mean=published / batches if batches else None,
        inference_p50_ms=float(np.median(inference)) if inference else None,
        queue_p50_ms=float(np.median(queued)) if queued else None,
        notes={"exit_code": code, "received": received},
    )


def idle_rss(model: Path, window_s: float, hop_s: float, streams: int = IDLE_STREAMS) -> dict:
    """RSS once ``streams`` streams have each filled a window and gone quiet."""
    daemon = Daemon(model, hop_s)
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
    return {"streams": streams, "known": known, "audio_s": expected_s, "rss_mb": rss, "peak_rss_mb": peak,
            "rss_before_mb": baseline}  # fmt: skip


# -- baselines ------------------------------------------------------------------------------


def cut_windows(geometry: StreamGeometry, count: int) -> np.ndarray:
    windows: list[ReadyWindow] = []
    stream = Stream("bench", geometry, windows.append, Metrics())
    chunk = round(SOURCE_RATE * 1.0)
    position = 0
    while len(windows) < count:
        stream.push_pcm(AUDIO[position % len(AUDIO) :][:chunk].tobytes(), "s16le", SOURCE_RATE, CHANNELS,
                        Arrival.now())  # fmt: skip
        position += chunk
    return np.stack([w.samples for w in windows[:count]])


def bare_engine(engine, windows: np.ndarray, seconds_per_size: float = 4.0) -> dict:
    per_size = {}
    for size in (1, 2, 4, 8):
        batch = windows[:size]
        engine.run(batch)
        times = []
        began = time.perf_counter()
        while time.perf_counter() - began < seconds_per_size or len(times) < 3:
            t0 = time.perf_counter()
            engine.run(batch)
            times.append(time.perf_counter() - t0)
        per_size[size] = {
            "median_s": float(np.median(times)),
            "windows_per_s": size / float(np.median(times)),
        }
    best = max(per_size, key=lambda s: per_size[s]["windows_per_s"])
    return {
        "window_inference_ms": per_size[1]["median_s"] * 1000,
        "best_batch": best,
        "windows_per_s": per_size[best]["windows_per_s"],
        "per_batch_size": per_size,
    }


def naive_loop(engine, window_s: float, streams: int, hop_s: float, seconds: float) -> dict:
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

    producer = Producer(f"tcp://127.0.0.1:{port}", streams, window_s, hop_s).start()
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


# -- one model --------------------------------------------------------------------------------


def export_full_size(arch: str, folder: Path) -> Path:
    import torch

    from trainer.export import export_onnx
    from trainer.models import create_model

    torch.manual_seed(0)
    path = folder / f"{arch}.onnx"
    export_onnx(create_model(arch, 50), path, check=False)
    return path


def bench_model(arch: str, folder: Path, seconds: float) -> dict:
    model = export_full_size(arch, folder)
    engine = load_engine(model)
    card = engine.card
    window_s, card_hop_s = card.window_seconds, card.hop_seconds
    geometry = StreamGeometry(card.sample_rate, card.window_samples, card.hop_samples)
    print(f"\n== {arch}: window {window_s:.2f} s, card hop {card_hop_s:.2f} s", flush=True)

    bare = bare_engine(engine, cut_windows(geometry, 8))
    print(f"bare engine: {bare['window_inference_ms']:.0f} ms per window, best {bare['windows_per_s']:.2f} windows/s "
          f"at batch {bare['best_batch']}", flush=True)  # fmt: skip

    # saturation: a few streams, a short hop, twice what the engine can take
    sat_streams = 4
    sat_hop = sat_streams / (2 * bare["windows_per_s"])
    saturation = run_daemon(model, window_s, sat_streams, sat_hop, seconds)
    print(f"daemon at saturation: {saturation.published_per_s:.2f} windows/s "
          f"({saturation.published_per_s / bare['windows_per_s']:.2f} x bare), "
          f"dropped {saturation.dropped:.0f}, p99 {saturation.p99_ms:.0f} ms", flush=True)  # fmt: skip

    half_hop = sat_streams / (0.5 * saturation.published_per_s)
    half = run_daemon(model, window_s, sat_streams, half_hop, seconds * 1.5)
    print(f"daemon at half load ({half.offered_per_s:.2f} windows/s): p50 {half.p50_ms:.0f} ms, "
          f"p99 {half.p99_ms:.0f} ms ({half.p99_ms / bare['window_inference_ms']:.2f} x one window; "
          f"in the daemon: inference p50 {half.inference_p50_ms:.0f} ms, queue p50 {half.queue_p50_ms:.0f} ms), "
          f"dropped {half.dropped:.0f}", flush=True)  # fmt: skip

    naive_sat = naive_loop(engine, window_s, sat_streams, sat_hop, seconds)
    naive_half = naive_loop(engine, window_s, sat_streams, half_hop, seconds)
    print(f"naive loop: {naive_sat['windows_per_s']:.2f} windows/s at saturation (p99 {naive_sat['p99_ms']:.0f} ms, "
          f"growing); half load p50 {naive_half['p50_ms']:.0f} ms p99 {naive_half['p99_ms']:.0f} ms", flush=True)  # fmt: skip
    engine.close()
    del engine

    # the largest N at the card's hop: no drops, p99 under one hop
    capacity = int(saturation.published_per_s * card_hop_s)
    sustained = None
    tried = []
    for streams in (
        max(1, int(capacity * 0.9)),
        max(1, int(capacity * 0.75)),
        max(1, int(capacity * 0.5)),
    ):
        result = run_daemon(model, window_s, streams, card_hop_s, seconds * 1.5)
        ok = (
            result.dropped == 0
            and result.published_per_s >= 0.95 * result.offered_per_s  # every stream served
            and result.p99_ms is not None
            and result.p99_ms < card_hop_s * 1000
        )
        tried.append(asdict(result) | {"sustained": ok})
        print(f"{streams} streams at hop {card_hop_s:.2f} s: {'sustained' if ok else 'NOT sustained'}: "
              f"{result.published_per_s:.2f} of {result.offered_per_s:.2f} windows/s published, "
              f"p50 {result.p50_ms:.0f} ms p99 {result.p99_ms:.0f} ms, dropped {result.dropped:.0f}, "
              f"CPU {result.cpu_cores:.2f} cores, RSS {result.rss_mb:.0f} MB, "
              f"inference p50 {result.inference_p50_ms:.0f} ms", flush=True)  # fmt: skip
        if ok:
            sustained = streams
            break
    return {
        "model": arch,
        "window_s": window_s,
        "card_hop_s": card_hop_s,
        "bare": bare,
        "saturation": asdict(saturation),
        "throughput_vs_bare": saturation.published_per_s / bare["windows_per_s"],
        "half_load": asdict(half),
        "p99_vs_window_inference": half.p99_ms / bare["window_inference_ms"],
        "naive_saturation": naive_sat,
        "naive_half_load": naive_half,
        "max_streams": sustained,
        "max_streams_runs": tried,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="fcn4,samplecnn")
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring time per daemon run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs; ONNX Runtime on CPU; load average {os.getloadavg()[0]:.2f} "
          f"(other processes share these CPUs: compare figures of one run only)", flush=True)  # fmt: skip
    began = time.perf_counter()
    results = {"cpus": os.cpu_count(), "models": []}
    with tempfile.TemporaryDirectory() as folder:
        for arch in args.models.split(","):
            results["models"].append(bench_model(arch, Path(folder), args.seconds))
        first = Path(folder) / f"{args.models.split(',')[0]}.onnx"
        card = load_engine(first, warmup=False).card
        results["idle"] = idle_rss(first, card.window_seconds, card.hop_seconds)
        idle = results["idle"]
        print(f"\n{idle['streams']} idle-but-connected streams ({args.models.split(',')[0]}): RSS {idle['rss_mb']:.0f} MB "
              f"(peak {idle['peak_rss_mb']:.0f} MB, before them {idle['rss_before_mb']:.0f} MB)", flush=True)  # fmt: skip
    results["bench_seconds"] = time.perf_counter() - began
    results["load_average_end"] = os.getloadavg()[0]
    print(
        f"\nbench took {results['bench_seconds']:.0f} s; load average now {results['load_average_end']:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
