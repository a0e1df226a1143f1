"""CURVE on tagd's sockets: keys from `tagd keys generate`, clients allowed by public key.

Producers and subscribers with an allowed key get through; one with another key, or
without CURVE, completes no handshake: its audio makes no window, it receives nothing,
and the refusal is counted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import zmq
import zmq.auth
from audio_fixtures import make_music
from click.testing import CliRunner
from support import (
    REPO,
    SHORT_FCN,
    connect_and_wait,
    make_config,
    s16le,
    scrape,
    serving,
    socket_port,
    wait_for,
)

from tagd.cli import main
from tagd.config import ConfigError, ServeConfig, load_config
from tagd.sockets import secure_client

RATE = 16_000


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """server, producer, subscriber and intruder key pairs; only two clients allowed."""
    folder = tmp_path_factory.mktemp("keys")
    runner = CliRunner()
    for name in ("server", "producer", "subscriber", "intruder"):
        result = runner.invoke(main, ["keys", "generate", str(folder), "--name", name])
        assert result.exit_code == 0, result.output
    allowed = folder / "clients"
    allowed.mkdir()
    for name in ("producer", "subscriber"):
        shutil.copy(folder / f"{name}.key", allowed)
    return folder


def test_keys_generate_writes_a_private_secret_and_never_overwrites(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["keys", "generate", str(tmp_path / "new"), "--name", "radio1"])
    assert result.exit_code == 0, result.output
    public, secret = tmp_path / "new" / "radio1.key", tmp_path / "new" / "radio1.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert zmq.auth.load_certificate(public)[1] is None
    assert zmq.auth.load_certificate(secret)[1] is not None
    again = runner.invoke(main, ["keys", "generate", str(tmp_path / "new"), "--name", "radio1"])
    assert again.exit_code != 0 and "refusing to overwrite" in again.output
    assert runner.invoke(main, ["keys", "generate", str(tmp_path), "--name", "../x"]).exit_code == 2


def curve_client(socket: zmq.Socket, keys: Path, name: str) -> zmq.Socket:
    secure_client(socket, keys / "server.key", keys / f"{name}.key_secret")
    return socket


def send_audio(socket: zmq.Socket, stream: str, seconds: float = 2.5) -> None:
    audio = make_music(seconds, RATE, seed=len(stream))
    header = {"format": "s16le", "rate": RATE, "channels": 2, "seq": 0}
    pcm = s16le(np.stack([audio, audio], axis=1))
    socket.send_multipart([stream.encode(), json.dumps(header).encode(), pcm])


def secured(fcn: Path, keys: Path, inputs: list[str]) -> ServeConfig:
    config = make_config(fcn, inputs)
    config.security.curve_server_secret = str(keys / "server.key_secret")
    config.security.curve_allowed_clients = str(keys / "clients")
    return config


def test_only_allowed_producers_and_subscribers_get_through(export_model, keys):
    fcn = export_model("fcn4", **SHORT_FCN)
    with socket_port() as pull_port, socket_port() as pub_port:
        config = secured(
            fcn, keys, [f"zmq+pull://127.0.0.1:{pull_port}", f"zmq+sub://127.0.0.1:{pub_port}"]
        )
    context = zmq.Context()
    # a producer that binds a PUB for tagd's zmq+sub input: a CURVE client all the same
    publisher = curve_client(context.socket(zmq.XPUB), keys, "producer")
    publisher.bind(f"tcp://127.0.0.1:{pub_port}")
    with serving(config) as server:
        subscribers = {}
        for name in ("subscriber", "intruder", None):
            socket = context.socket(zmq.SUB)
            if name:
                curve_client(socket, keys, name)
            socket.setsockopt(zmq.SUBSCRIBE, b"")
            if name == "subscriber":  # allowed: wait until its subscription is on its way
                connect_and_wait(socket, server.publish_address)
            else:
                socket.connect(server.publish_address)
            subscribers[name or "plain"] = socket
        producers = {}
        for name in ("producer", "intruder", None):
            socket = context.socket(zmq.PUSH)
            if name:
                curve_client(socket, keys, name)
            socket.connect(f"tcp://127.0.0.1:{pull_port}")
            producers[name or "plain"] = socket
        soundfile.write(keys / "example.wav", make_music(2.5, RATE, seed=9), RATE)
        example = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "examples" / "producer.py"),
                f"tcp://127.0.0.1:{pull_port}",
                f"from_example={keys / 'example.wav'}",
            ],
            env={
                **os.environ,
                "TAGD_SERVER_KEY": str(keys / "server.key"),
                "TAGD_CLIENT_KEY": str(keys / "producer.key_secret"),
            },
        )
        listen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tagd.cli",
                "listen",
                server.publish_address,
                "--count",
                "1",
                "--timeout",
                "30",
                "--server-key",
                str(keys / "server.key"),
                "--key",
                str(keys / "subscriber.key_secret"),
            ],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            text=True,
        )
        assert publisher.poll(5000) and publisher.recv() == b"\x01"  # tagd's SUB got in
        sample = server.metrics.sample

        def refused(socket_label: str, reasons: tuple[str, ...]) -> float:
            return sum(
                sample("tagd_handshake_failures_total", {"socket": socket_label, "reason": r}) or 0
                for r in reasons
            )

        for socket_label in (
            f"127.0.0.1:{pull_port}",
            "publish",
        ):  # the intruder and the plain peer
            wait_for(
                lambda label=socket_label: (
                    refused(label, ("auth",)) >= 1 and refused(label, ("protocol", "other")) >= 1
                ),
                f"refusals on {socket_label}",
            )
        for name, socket in producers.items():
            try:  # a refused PUSH may have no connection to queue on: do not wait for one
                socket.setsockopt(zmq.SNDTIMEO, 1000)
                send_audio(socket, f"from_{name}")
            except zmq.Again:
                assert name != "producer"
        send_audio(publisher, "from_pub")
        received = {name: [] for name in subscribers}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for name, socket in subscribers.items():
                while socket.poll(0):
                    received[name].append(socket.recv_multipart()[0].decode())
            if {"tags.from_producer", "tags.from_pub", "tags.from_example"} <= set(
                received["subscriber"]
            ):
                time.sleep(0.5)  # let anything else that is coming arrive
                for name, socket in subscribers.items():
                    while socket.poll(0):
                        received[name].append(socket.recv_multipart()[0].decode())
                break
            time.sleep(0.02)
        # `tagd listen` may have subscribed after that audio: more until it prints a message
        deadline = time.monotonic() + 30
        while listen.poll() is None:
            assert time.monotonic() < deadline, "tagd listen received nothing"
            send_audio(producers["producer"], "from_producer", seconds=0.5)
            time.sleep(0.25)
        printed = listen.stdout.read()
        assert example.wait(timeout=30) == 0
        status, text = scrape(server)
        names = sorted(server.hub.names())
        failures = {
            (labels, reason): sample(
                "tagd_handshake_failures_total", {"socket": labels, "reason": reason}
            )
            for labels in (f"127.0.0.1:{pull_port}", "publish")
            for reason in ("auth", "protocol", "other")
        }
        for socket in [*subscribers.values(), *producers.values(), publisher]:
            socket.close(linger=0)
    context.term()

    assert names == ["from_example", "from_producer", "from_pub"]  # none from intruders
    topics = set(received["subscriber"])
    assert {"tags.from_producer", "tags.from_pub", "tags.from_example"} <= topics
    assert not any("intruder" in t or "plain" in t for t in topics)
    assert received["intruder"] == [] and received["plain"] == []
    # `tagd listen` with keys got the tags of an allowed stream
    assert listen.returncode == 0 and re.search(r" from_(producer|pub|example) #", printed), printed
    assert status == 200 and "tagd_handshake_failures_total" in text
    # each side refused the intruder's key (auth) and the plain peer (no CURVE)
    for socket_label in (f"127.0.0.1:{pull_port}", "publish"):
        assert (failures[(socket_label, "auth")] or 0) >= 1, failures
        refused_plain = sum(failures[(socket_label, r)] or 0 for r in ("protocol", "other"))
        assert refused_plain >= 1, failures


def test_security_config_checks_keys_and_refuses_curve_for_ffmpeg_inputs(keys, tmp_path):
    raw = "zmq+raw://127.0.0.1:5555?format=s16le&rate=44100&channels=2&stream=radio1"
    toml = tmp_path / "tagd.toml"

    def write(extra: str, url: str = raw) -> None:
        toml.write_text(
            f'engine = "m.onnx"\ninputs = ["{url}"]\n[security]\n'
            f'curve_server_secret = "{keys}/server.key_secret"\n'
            f'curve_allowed_clients = "{keys}/clients"\n{extra}'
        )

    write("")
    with pytest.raises(ConfigError, match=r"inputs\[0\].curve: .*ffmpeg's zmq output cannot"):
        load_config(toml)
    write("", raw + "&curve=false")  # ffmpeg on this host, plain, by the operator's choice
    config = load_config(toml)
    assert not config.inputs[0].uses_curve(config.security)
    write("", "zmq+pull://127.0.0.1:5571")
    config = load_config(toml)
    assert config.inputs[0].uses_curve(config.security)
    toml.write_text(
        'engine = "m.onnx"\ninputs = ["zmq+pull://127.0.0.1:1"]\n[security]\n'
        'curve_server_secret = "nowhere.key_secret"\n'
    )
    with pytest.raises(ConfigError, match="needs both"):
        load_config(toml)
    toml.write_text(
        'engine = "m.onnx"\ninputs = ["zmq+pull://127.0.0.1:1"]\n[security]\n'
        'curve_server_secret = "nowhere.key_secret"\ncurve_allowed_clients = "none/"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(toml)
    assert [p.split(":")[0] for p in caught.value.problems] == [
        "security.curve_server_secret",
        "security.curve_allowed_clients",
    ]


def test_a_public_key_given_as_the_server_secret_fails_start_with_one_line(export_model, keys):
    from tagd.metrics import Metrics
    from tagd.server import Server, StartupError

    config = secured(export_model("fcn4", **SHORT_FCN), keys, ["zmq+pull://127.0.0.1:0"])
    config.security.curve_server_secret = str(keys / "server.key")
    with pytest.raises(StartupError, match="holds no secret key") as caught:
        Server(config, Metrics()).start()
    assert "\n" not in str(caught.value)
