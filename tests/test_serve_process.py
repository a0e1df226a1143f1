"""`tagd serve` and `tagd listen` as processes: signals, exit codes, logs."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from audio_fixtures import make_music
from support import REPO, SHORT_FCN, TAGD_MODULE, TagdProcess, connect_and_wait, free_port

TAGD = list(TAGD_MODULE)


def stream_audio(port: int, stop: threading.Event) -> None:
    """A producer on the multi-stream protocol, paced at 4x real time, playing 10 s of
    music over and over until stopped: whenever a subscriber comes, tags are flowing."""
    rate = 16_000
    payload = (np.stack([make_music(10.0, rate)] * 2, axis=1) * 32767).astype("<i2").tobytes()
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    chunk = 6400  # 0.1 s
    for seq in itertools.count():
        if stop.is_set():
            break
        offset = seq * chunk % len(payload)
        header = {"format": "s16le", "rate": rate, "channels": 2, "seq": seq}
        push.send_multipart(
            [b"radio1", json.dumps(header).encode(), payload[offset : offset + chunk]]
        )
        time.sleep(0.025)
    push.close(linger=0)
    context.term()


def test_sigterm_stops_a_busy_daemon_with_exit_0_within_2_s(short_fcn4):
    model = short_fcn4
    port = free_port()
    daemon = TagdProcess(
        [
            "--engine",
            str(model),
            "--input",
            f"zmq+pull://127.0.0.1:{port}",
            "--publish",
            "tcp://127.0.0.1:*",
            "--metrics",
            "127.0.0.1:0",
            "--hop",
            "0.05",
        ]
    )
    daemon.wait_ready()
    listen = subprocess.Popen(
        [*TAGD, "listen", daemon.publish_address, "--count", "3", "--timeout", "20"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    # No wait for `tagd listen` to subscribe: the audio flows until the daemon is stopped,
    # so it prints the first three messages after it subscribed, whenever that is.
    stop = threading.Event()
    producer = threading.Thread(target=stream_audio, args=(port, stop))
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


def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TAGD, "serve", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def squatter() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that another process holds."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


@pytest.fixture
def not_a_model(tmp_path) -> Path:
    path = tmp_path / "notes.onnx"
    path.write_text("a text file someone named .onnx\n")
    return path


STARTUP_FAILURES = {
    # case: (what to change in a good command line, the first line on stderr)
    "missing engine": (
        {"--engine": "{missing}"},
        "tagd serve: cannot load the engine {missing}: model file not found: {missing}",
    ),
    "not a model": (
        {"--engine": "{not_a_model}"},
        "tagd serve: cannot load the engine {not_a_model}: {not_a_model}: ",
    ),
    "publish port in use": (
        {"--publish": "tcp://127.0.0.1:{squatter}"},
        "tagd serve: cannot publish on tcp://127.0.0.1:{squatter}: Address already in use",
    ),
    "metrics port in use": (
        {"--metrics": "127.0.0.1:{squatter}"},
        "tagd serve: cannot serve metrics on 127.0.0.1:{squatter}: Address already in use",
    ),
    # The input binds before the model loads: with a missing engine too, the port is
    # what start-up fails on.
    "input port in use": (
        {"--input": "zmq+pull://127.0.0.1:{squatter}", "--engine": "{missing}"},
        "tagd serve: input 127.0.0.1:{squatter}: cannot bind tcp://127.0.0.1:{squatter}: Address already in use",
    ),
}


@pytest.mark.parametrize("case", STARTUP_FAILURES)
def test_every_startup_failure_exits_2_with_its_reason_first_on_stderr(
    case, short_fcn4, squatter, not_a_model, tmp_path
):
    places = {
        "missing": tmp_path / "missing.onnx",
        "not_a_model": not_a_model,
        "squatter": squatter,
    }
    options = {
        "--engine": str(short_fcn4),
        "--input": f"zmq+pull://127.0.0.1:{free_port()}",
        "--metrics": "127.0.0.1:0",
        "--publish": "tcp://127.0.0.1:*",
    }
    changes, first_line = STARTUP_FAILURES[case]
    options.update({key: value.format(**places) for key, value in changes.items()})
    process = run_serve(*[part for option in options.items() for part in option])
    assert process.returncode == 2, process.stderr
    lines = process.stderr.splitlines()
    assert lines[0].startswith(first_line.format(**places)), process.stderr
    assert sum(line.startswith("tagd serve:") for line in lines) == 1, process.stderr


def test_check_config_reads_the_models_card_without_serving(short_fcn4, squatter):
    model = short_fcn4
    # The ports are in use (by a running tagd, say): checking must not need them.
    good = run_serve(
        "--engine",
        str(model),
        "--input",
        f"zmq+pull://127.0.0.1:{squatter}",
        "--publish",
        f"tcp://127.0.0.1:{squatter}",
        "--check-config",
    )
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith(f"config OK: engine {model} (fcn4, fcn4, 8 tags, 12000 Hz")
    assert " s, float32, hop " in good.stdout  # the card's precision


@pytest.mark.parametrize("engine", ["missing", "not_a_model", "unknown_suffix"])
def test_check_config_fails_on_a_model_that_would_not_load(engine, not_a_model, tmp_path):
    path = {
        "missing": tmp_path / "missing.onnx",
        "not_a_model": not_a_model,
        "unknown_suffix": not_a_model.with_suffix(".txt"),
    }[engine]
    if engine == "unknown_suffix":
        not_a_model.rename(path)
    process = run_serve(
        "--engine", str(path), "--input", "zmq+pull://127.0.0.1:5571", "--check-config"
    )
    assert process.returncode == 2
    assert process.stdout == ""
    assert process.stderr.splitlines()[0].startswith(f"tagd serve: cannot load the engine {path}: ")


def test_check_config_warns_about_inputs_the_model_hears_poorly(short_fcn4):
    model = short_fcn4  # 12 kHz
    raw = "zmq+raw://127.0.0.1:5555?format=s16le&rate=8000&channels=1&stream=phone"
    process = run_serve("--engine", str(model), "--input", raw, "--hop", "1", "--check-config")
    assert process.returncode == 0, process.stderr
    assert process.stderr.splitlines() == [
        "tagd serve: warning: inputs[0]: 8000 Hz is below the model's 12000 Hz: it hears "
        "band-limited audio"
    ]


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_logs_go_to_stderr_as_json_or_text(short_fcn4, log_format):
    model = short_fcn4
    daemon = TagdProcess(
        [
            "--engine",
            str(model),
            "--input",
            f"zmq+pull://127.0.0.1:{free_port()}",
            "--publish",
            "tcp://127.0.0.1:*",
            "--metrics",
            "off",
            "--log-format",
            log_format,
        ]
    )
    daemon.wait_ready()
    code, _ = daemon.terminate_and_time()
    assert code == 0
    assert daemon.stdout == []
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
    daemon = TagdProcess(
        [
            "--engine",
            str(model),
            "--input",
            f"zmq+pull://127.0.0.1:{port}",
            "--publish",
            "tcp://127.0.0.1:*",
            "--metrics",
            "127.0.0.1:0",
            "--hop",
            "0.05",
            "--max-batch",
            "2",
            "--max-wait-ms",
            "0",
        ]
    )
    daemon.wait_ready()
    context = zmq.Context()
    subscriber = context.socket(zmq.SUB)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"")
    connect_and_wait(subscriber, daemon.publish_address)
    stop = threading.Event()
    producer = threading.Thread(target=stream_audio, args=(port, stop))
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


def test_check_config_fails_like_serve_on_a_missing_file_input(short_fcn4, tmp_path):
    model = str(short_fcn4)
    url = f"file://{tmp_path / 'gone.wav'}?stream=radio1"
    check = run_serve("--engine", model, "--input", url, "--check-config")
    serve = run_serve(
        "--engine",
        model,
        "--input",
        url,
        "--metrics",
        "127.0.0.1:0",
        "--publish",
        "tcp://127.0.0.1:*",
    )
    assert check.returncode == serve.returncode == 2
    reason = f"tagd serve: input radio1: no such file: {tmp_path / 'gone.wav'}"
    assert check.stderr.splitlines()[0] == serve.stderr.splitlines()[0] == reason
