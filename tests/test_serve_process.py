"""`tagd serve` and `tagd listen` as processes: signals, exit codes, logs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from audio_fixtures import make_music

REPO = Path(__file__).resolve().parents[1]
TAGD = [sys.executable, "-m", "tagd.cli"]
SHORT_FCN = {"n_frames": 94, "pools": ((2, 2), (2, 2), (3, 2), (4, 2))}
READY = re.compile(r"tagd serve ready: .* publishing on (tcp://\S+?);")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Daemon:
    """`tagd serve` in a subprocess, its stderr read line by line in a thread."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen(
            [*TAGD, "serve", *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.publish_address = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            match = READY.search(line)
            if match:
                self.publish_address = match.group(1)
                self.ready.set()

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.ready.wait(timeout), "\n".join(self.lines)

    def terminate_and_time(self) -> tuple[int, float]:
        started = time.perf_counter()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=10)
        return code, time.perf_counter() - started


def stream_audio(port: int, seconds: float, stop: threading.Event) -> None:
    """A producer on the multi-stream protocol, paced at 4x real time until stopped."""
    rate = 16_000
    payload = (np.stack([make_music(seconds, rate)] * 2, axis=1) * 32767).astype("<i2").tobytes()
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    chunk = 6400  # 0.1 s
    for seq, offset in enumerate(range(0, len(payload), chunk)):
        if stop.is_set():
            break
        header = {"format": "s16le", "rate": rate, "channels": 2, "seq": seq}
        push.send_multipart(
            [b"radio1", json.dumps(header).encode(), payload[offset : offset + chunk]]
        )
        time.sleep(0.025)
    push.close(linger=0)
    context.term()


def test_sigterm_stops_a_busy_daemon_with_exit_0_within_2_s(export_model):
    model = export_model("fcn4", **SHORT_FCN)
    port = free_port()
    daemon = Daemon("--engine", str(model), "--input", f"zmq+pull://127.0.0.1:{port}",
                    "--publish", "tcp://127.0.0.1:*", "--metrics", "127.0.0.1:0", "--hop", "0.05")  # fmt: skip
    daemon.wait_ready()
    listen = subprocess.Popen(
        [*TAGD, "listen", daemon.publish_address, "--count", "3", "--timeout", "20"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # `tagd listen` subscribes before the audio starts
    stop = threading.Event()
    producer = threading.Thread(target=stream_audio, args=(port, 30.0, stop))
    producer.start()
    try:
        printed, _ = listen.communicate(timeout=30)
        assert listen.returncode == 0
        lines = printed.strip().splitlines()
        assert len(lines) == 3 and all(" radio1 #" in line for line in lines), printed
        code, elapsed = daemon.terminate_and_time()  # while audio still flows
    finally:
        stop.set()
        producer.join()
    assert code == 0, "\n".join(daemon.lines)
    assert elapsed < 2.0
    assert any("SIGTERM: stopping" in line for line in daemon.lines)
    assert any("tagd serve stopped" in line for line in daemon.lines)


def test_a_bad_engine_path_exits_2_with_a_one_line_reason(tmp_path):
    process = subprocess.run(
        [*TAGD, "serve", "--engine", str(tmp_path / "missing.onnx"), "--input", "zmq+pull://127.0.0.1:0",
         "--metrics", "127.0.0.1:0", "--publish", "tcp://127.0.0.1:*"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert process.returncode == 2
    reasons = [line for line in process.stderr.splitlines() if line.startswith("tagd serve:")]
    assert reasons == [f"tagd serve: cannot load the engine {tmp_path / 'missing.onnx'}: "
                       f"model file not found: {tmp_path / 'missing.onnx'}"]  # fmt: skip


def test_a_port_in_use_exits_2_with_a_one_line_reason(export_model):
    model = export_model("fcn4", **SHORT_FCN)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        process = subprocess.run(
            [*TAGD, "serve", "--engine", str(model), "--input", "zmq+pull://127.0.0.1:0",
             "--metrics", f"127.0.0.1:{port}", "--publish", "tcp://127.0.0.1:*"],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert process.returncode == 2
    assert process.stderr.strip().splitlines()[-1] == (
        f"tagd serve: cannot serve metrics on 127.0.0.1:{port}: Address already in use"
    )


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_logs_go_to_stderr_as_json_or_text(export_model, log_format):
    model = export_model("fcn4", **SHORT_FCN)
    daemon = Daemon("--engine", str(model), "--input", f"zmq+pull://127.0.0.1:{free_port()}",
                    "--publish", "tcp://127.0.0.1:*", "--metrics", "off", "--log-format", log_format)  # fmt: skip
    daemon.wait_ready()
    code, _ = daemon.terminate_and_time()
    assert code == 0
    assert daemon.process.stdout.read() == ""
    if log_format == "json":
        records = [json.loads(line) for line in daemon.lines]
        assert {"time", "level", "logger", "message"} <= set(records[0])
        assert any(r["message"].startswith("tagd serve ready") for r in records)
    else:
        assert all(not line.startswith("{") for line in daemon.lines)


def test_sigterm_during_a_batch_exits_within_2_s_leaving_only_whole_messages(export_model):
    # A full-width model: a batch of two windows takes ~0.1 s, and a window comes every
    # 12.5 ms, so the engine is never idle and SIGTERM lands while a batch is on it.
    model = export_model("fcn4", **SHORT_FCN, width=1.0)
    port = free_port()
    daemon = Daemon("--engine", str(model), "--input", f"zmq+pull://127.0.0.1:{port}",
                    "--publish", "tcp://127.0.0.1:*", "--metrics", "127.0.0.1:0", "--hop", "0.05",
                    "--max-batch", "2", "--max-wait-ms", "0")  # fmt: skip
    daemon.wait_ready()
    context = zmq.Context()
    subscriber = context.socket(zmq.SUB)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"")
    subscriber.connect(daemon.publish_address)
    time.sleep(0.3)
    stop = threading.Event()
    producer = threading.Thread(target=stream_audio, args=(port, 30.0, stop))
    producer.start()
    messages: list[list[bytes]] = []
    try:
        while len(messages) < 3:  # the first batches are out: the engine is busy from now on
            assert subscriber.poll(30_000), "\n".join(daemon.lines)
            messages.append(subscriber.recv_multipart())
        time.sleep(0.1)  # into the next batch
        code, elapsed = daemon.terminate_and_time()
    finally:
        stop.set()
        producer.join()
    while subscriber.poll(500):  # whatever the daemon sent before it went
        messages.append(subscriber.recv_multipart())
    subscriber.close(linger=0)
    context.term()
    assert code == 0, "\n".join(daemon.lines)
    assert elapsed < 2.0
    for frames in messages:  # complete multipart messages only, each one parses
        assert len(frames) == 2
        topic, body = frames[0].decode(), json.loads(frames[1])
        assert topic.split(".", 1)[0] in ("tags", "events") and body["schema"] == 1
        assert topic == f"{topic.split('.', 1)[0]}.{body['stream']}"
