"""Soak `tagd serve` under overload: does anything grow without limit?

    .venv/bin/python bench/soak.py                  # 10 minutes
    .venv/bin/python bench/soak.py --minutes 3 --json soak.json

One `tagd serve` subprocess (a small FCN-4: width 0.125, the full 29.12 s window, one
ONNX Runtime thread, under `nice`) is given more than it can tag, for the whole run:

- ``--streams`` live streams (16 kHz stereo s16le in 100 ms messages, paced in real time
  after a pre-roll that fills their first window) at a hop short enough that inference
  cannot keep up: the batcher drops the oldest windows;
- churn: new stream ids every second that send a little audio and fall silent, so
  streams are created, go idle and are evicted all the time;
- every minute a flood of new ids over ``limits.max_streams``, and a steady trickle of
  malformed messages;
- one healthy subscriber and one that never reads (the publisher drops for it).

It prints, every ``--report-s``, the daemon's RSS, end-to-end latency (p50/p99 over that
interval, from the published messages), windows published/dropped, and streams known;
at the end the RSS growth from after the warm-up to the end (target: under 50 MB).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # support: the daemon process and free ports

from support import TagdProcess, free_port, http_get  # noqa: E402

RATE = 16_000
CHANNELS = 2
MESSAGE_S = 0.1
WINDOW_S = 29.12  # FCN-4's window: the pre-roll sends this much at once
MAX_STREAMS = 64
CHURN_PER_S = 2  # new short-lived stream ids per second
FLOOD_IDS = 200  # new ids sent at once every minute
MALFORMED_PER_S = 20
GROWTH_TARGET_MB = 50


def export_small_fcn(folder: Path) -> Path:
    import torch

    from trainer.export import export_onnx
    from trainer.models import create_model

    torch.manual_seed(0)
    path = folder / "fcn4-small.onnx"
    export_onnx(create_model("fcn4", 50, width=0.125), path, check=False)
    return path


class Daemon(TagdProcess):
    def __init__(self, model: Path, folder: Path, hop_s: float, idle_s: float, evict_s: float):
        self.input_port, metrics_port = free_port(), free_port()
        self.publish = f"tcp://127.0.0.1:{free_port()}"
        config = folder / "soak.toml"
        config.write_text(
            f'engine = "{model}"\nhop_seconds = {hop_s}\n'
            f'inputs = ["zmq+pull://127.0.0.1:{self.input_port}"]\n'
            f'[publish]\naddress = "{self.publish}"\nsndhwm = 1000\n'
            f'[metrics]\naddress = "127.0.0.1:{metrics_port}"\n'
            f"[limits]\nmax_streams = {MAX_STREAMS}\nidle_after_s = {idle_s}\n"
            f"evict_after_s = {evict_s}\n"
            f'[log]\nlevel = "warning"\n'
        )
        super().__init__(
            ["--config", str(config)],
            metrics_port,
            folder / "tagd.log",
            env={"TAGD_ORT_THREADS": "1"},
            wrapper=("nice", "-n", "10"),
        )
        self.wait_ready(timeout=120)

    def metrics(self) -> dict[str, float]:
        """Sums of each sample name over its labels (reason kept for drops and refusals)."""
        from prometheus_client.parser import text_string_to_metric_families

        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(
            http_get(self.metrics_url + "/metrics")[1].decode()
        ):
            for sample in family.samples:
                name = sample.name
                if "reason" in sample.labels:
                    name += f"{{{sample.labels['reason']}}}"
                totals[name] = totals.get(name, 0.0) + sample.value
        return totals


class Load(threading.Thread):
    """Every producer of the soak on one PUSH socket, paced on the wall clock."""

    def __init__(self, port: int, streams: int, seed: int = 0):
        super().__init__(daemon=True)
        self.streams, self.stop_event = streams, threading.Event()
        self.context = zmq.Context()
        self.push = self.context.socket(zmq.PUSH)
        self.push.setsockopt(zmq.SNDHWM, 100_000)
        self.push.connect(f"tcp://127.0.0.1:{port}")
        rng = np.random.default_rng(seed)
        loop = (rng.standard_normal((int(40 * RATE), CHANNELS)) * 3000).astype("<i2")
        self.audio = loop.tobytes()  # 40 s of noise, looped by every stream at its own offset
        self.frame_bytes = 2 * CHANNELS
        self.rng = rng
        self.sent = {"messages": 0, "malformed": 0, "flood": 0, "churn": 0}

    def _pcm(self, offset_frames: int, frames: int) -> bytes:
        start = (offset_frames % (len(self.audio) // self.frame_bytes - frames)) * self.frame_bytes
        return self.audio[start : start + frames * self.frame_bytes]

    def _send(self, name: str, seq: int, pcm: bytes) -> None:
        header = json.dumps({"format": "s16le", "rate": RATE, "channels": CHANNELS, "seq": seq})
        self.push.send_multipart([name.encode(), header.encode(), pcm])
        self.sent["messages"] += 1

    def run(self) -> None:
        per_message = int(RATE * MESSAGE_S)
        for s in range(self.streams):  # pre-roll: the first window at once
            self._send(f"live{s}", 0, self._pcm(s * 7919, int(WINDOW_S * RATE) + per_message))
        started, tick = time.monotonic(), 0
        churn = flood = 0
        while not self.stop_event.is_set():
            tick += 1
            for s in range(self.streams):
                self._send(f"live{s}", tick, self._pcm(s * 7919 + tick * per_message, per_message))
            if tick % round(1 / MESSAGE_S / CHURN_PER_S) == 0:
                churn += 1
                for seq in range(10):  # one second of audio, then silence for ever
                    self._send(f"churn{churn}", seq, self._pcm(churn * 31 + seq, per_message))
                self.sent["churn"] += 1
            if tick % round(60 / MESSAGE_S) == 0:
                flood += 1
                for i in range(FLOOD_IDS):
                    self._send(f"flood{flood}-{i}", 0, self._pcm(i, per_message))
                self.sent["flood"] += FLOOD_IDS
            for _ in range(round(MALFORMED_PER_S * MESSAGE_S)):
                garbage = self.rng.integers(0, 256, int(self.rng.integers(1, 200))).astype(np.uint8)
                self.push.send_multipart([b"live0", garbage.tobytes(), b"xx"])
                self.sent["malformed"] += 1
            delay = started + tick * MESSAGE_S - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        self.push.close(linger=0)
        self.context.term()


class Subscribers(threading.Thread):
    """A healthy subscriber collecting latencies, and one stuck from the start."""

    def __init__(self, address: str):
        super().__init__(daemon=True)
        self.context = zmq.Context()
        self.stuck = self.context.socket(zmq.SUB)
        self.stuck.setsockopt(zmq.RCVHWM, 10)
        self.stuck.setsockopt(zmq.RCVBUF, 4096)
        self.stuck.setsockopt(zmq.SUBSCRIBE, b"")
        self.stuck.connect(address)
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"tags.")
        self.socket.connect(address)
        self.latencies: list[float] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            if self.socket.poll(200):
                _, body = self.socket.recv_multipart()
                with self.lock:
                    self.latencies.append(json.loads(body)["latency_ms"]["total"])
        self.socket.close(linger=0)
        self.stuck.close(linger=0)
        self.context.term()

    def take(self) -> list[float]:
        with self.lock:
            taken, self.latencies = self.latencies, []
        return taken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=24, help="live streams [24]")
    parser.add_argument("--hop", type=float, default=0.25, help="seconds; short = overload")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="RSS 'before' is taken here")
    parser.add_argument("--report-s", type=float, default=30.0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tagd-soak-") as tmp:
        folder = Path(tmp)
        model = export_small_fcn(folder)
        daemon = Daemon(model, folder, args.hop, idle_s=2.0, evict_s=10.0)
        subscribers = Subscribers(daemon.publish)
        subscribers.start()
        time.sleep(0.5)
        load = Load(daemon.input_port, args.streams)
        load.start()
        began = time.monotonic()
        end = began + args.minutes * 60
        rows, before = [], None
        print(
            f"soak: {args.streams} streams at a {args.hop} s hop, churn, floods, garbage; "
            f"{args.minutes:g} min",
            flush=True,
        )
        print(
            f"{'t_s':>6} {'rss_mb':>7} {'p50_ms':>7} {'p99_ms':>7} {'published':>10} "
            f"{'dropped':>9} {'streams':>7}",
            flush=True,
        )
        next_report = began + args.report_s
        while time.monotonic() < end and daemon.process.poll() is None:
            time.sleep(max(0.0, min(next_report, end) - time.monotonic()))
            next_report += args.report_s
            elapsed = time.monotonic() - began
            if before is None and elapsed >= args.warmup_s:
                before = daemon.rss_mb()
            m = daemon.metrics()
            latencies = subscribers.take()
            row = {
                "t_s": round(elapsed),
                "rss_mb": round(daemon.rss_mb(), 1),
                "p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
                "p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
                "published": int(m.get("tagd_windows_published_total", 0)),
                "dropped": int(
                    sum(v for k, v in m.items() if k.startswith("tagd_windows_dropped_total"))
                ),
                "streams": int(m.get("tagd_streams", 0)),
            }
            rows.append(row)
            print(
                " ".join(
                    f"{row[k]!s:>{w}}"
                    for k, w in (
                        ("t_s", 6),
                        ("rss_mb", 7),
                        ("p50_ms", 7),
                        ("p99_ms", 7),
                        ("published", 10),
                        ("dropped", 9),
                        ("streams", 7),
                    )
                ),
                flush=True,
            )
        alive = daemon.process.poll() is None
        after = daemon.rss_mb() if alive else float("nan")
        final = daemon.metrics() if alive else {}
        load.stop_event.set()
        subscribers.stop_event.set()
        load.join(5)
        subscribers.join(5)
        code = daemon.stop() if alive else daemon.process.returncode
    before = before if before is not None else rows[0]["rss_mb"]
    # One reading is noisy (ONNX Runtime's arena, streams coming and going): a leak shows
    # as a slope over the whole run after the warm-up.
    settled = [row for row in rows if row["t_s"] >= args.warmup_s] or rows
    minutes = np.array([row["t_s"] for row in settled]) / 60
    rss = np.array([row["rss_mb"] for row in settled])
    slope = float(np.polyfit(minutes, rss, 1)[0]) if len(settled) > 1 else 0.0
    summary = {
        "minutes": args.minutes,
        "streams": args.streams,
        "hop_s": args.hop,
        "alive": alive,
        "exit_code": code,
        "rss_before_mb": round(before, 1),
        "rss_after_mb": round(after, 1),
        "rss_growth_mb": round(after - before, 1),
        "rss_range_mb": [float(rss.min()), float(rss.max())],
        "rss_slope_mb_per_min": round(slope, 2),
        "sent": load.sent,
        "counters": {
            k: v
            for k, v in final.items()
            if k.startswith(
                (
                    "tagd_windows",
                    "tagd_malformed",
                    "tagd_publish_dropped",
                    "tagd_peer",
                    "tagd_engine_errors",
                )
            )
            and "_created" not in k
        },
        "rows": rows,
    }
    print(
        f"\nRSS {summary['rss_before_mb']} MB after {args.warmup_s:g} s → "
        f"{summary['rss_after_mb']} MB at the end: growth {summary['rss_growth_mb']} MB "
        f"(target < {GROWTH_TARGET_MB} MB); {rss.min():.0f}-{rss.max():.0f} MB after the warm-up, "
        f"trend {slope:+.2f} MB/min; exit code {code}"
    )
    print(json.dumps(summary["counters"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
