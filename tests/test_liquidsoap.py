"""Liquidsoap, the real one (Debian's ``liquidsoap``, 2.1.3 in CI), both ways round.

- as a consumer: examples/liquidsoap_bridge.py against a ``liquidsoap`` process whose
  script registers ``server.insert_metadata`` and logs what ``source.on_metadata`` sees
  (parsing ``tagd_tags`` with ``json.parse``, as docs/deploy.md shows). tagd is played by
  a real XPUB publishing ``tagd.publish`` messages (tests/test_clients.py's FakeTagd);
- as a producer, the two routes docs/deploy.md gives: ``output.external`` piping WAV to
  ffmpeg, which publishes raw PCM on ZeroMQ for ``tagd serve``; and ``output.icecast``
  into a real Icecast (Debian's icecast2), read back by examples/feed-url.sh.

Every wait is on a condition with a generous timeout; Liquidsoap takes ~2 s to start.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
from support import (
    DAEMON_HOP_S,
    SHORT_FCN,
    AudioRate,
    Example,
    FakeTagd,
    Icecast,
    TagdProcess,
    fcn4_card,
    free_port,
    run_feed,
    terminate,
    tool,
)

from tagd.publish import TAGS_TOPIC, tags_message, topic
from tagd.tagger import Prediction

EXAMPLES_BRIDGE = Path(__file__).resolve().parents[1] / "examples" / "liquidsoap_bridge.py"
START_TIMEOUT_S = 30.0
ARRIVE_TIMEOUT_S = 20.0
# A tag name with the characters a list format or a Liquidsoap string could trip on.
AWKWARD_TAG = 'guitar, "electric" \\ live'
CARD = fcn4_card(["rock", AWKWARD_TAG, "speech", "jazz"])

# {log} receives one JSON object per metadata a source sees: {"tags": [...], "model": ...}.
CONSUMER_SCRIPT = """
settings.init.allow_root.set(true)
settings.log.file.set(false)
settings.log.stdout.set(true)
settings.server.telnet.set(true)
settings.server.telnet.bind_addr.set("127.0.0.1")
settings.server.telnet.port.set({port})
settings.server.socket.set(true)
settings.server.socket.path.set("{socket}")
live = blank()
live = {insert}(id="live", live)
def log_metadata(m) =
  let json.parse (tags : [string]) = m["tagd_tags"]
  line = json.stringify(compact=true, {{tags=tags, model=m["tagd_model"]}})
  file.write(append=true, data="#{{line}}\\n", "{log}")
end
live = source.on_metadata(live, log_metadata)
output.dummy(fallible=true, live)
"""
INSERT_WITH_SERVER_COMMAND = "server.insert_metadata"  # what the bridge needs
INSERT_WITHOUT_SERVER_COMMAND = "insert_metadata"  # registers no telnet command in 2.x


@pytest.fixture(scope="module")
def liquidsoap_binary() -> str:
    return tool("liquidsoap", "apt-get install liquidsoap")


class Liquidsoap:
    """A ``liquidsoap`` process running CONSUMER_SCRIPT; restartable on the same addresses."""

    def __init__(self, binary: str, folder: Path) -> None:
        self.binary, self.folder = binary, folder
        self.port = free_port()
        self.socket_path = folder / "liquidsoap.sock"
        self.metadata_log = folder / "metadata.jsonl"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def telnet(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, insert: str = INSERT_WITH_SERVER_COMMAND) -> None:
        script = self.folder / f"consumer-{self.starts}.liq"
        script.write_text(
            CONSUMER_SCRIPT.format(
                port=self.port, socket=self.socket_path, insert=insert, log=self.metadata_log
            )
        )
        self.output = self.folder / f"liquidsoap-{self.starts}.log"
        self.starts += 1
        with self.output.open("w") as output:
            self.process = subprocess.Popen(
                [self.binary, str(script)], stdout=output, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"liquidsoap did not start:\n{self.output.read_text()[-3000:]}")
            time.sleep(0.1)

    def _answers(self) -> bool:
        if "Streaming loop starts" not in self.output.read_text():
            return False
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as probe:
                probe.sendall(b"uptime\nquit\n")
                return b"END" in probe.recv(1024)
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)

    def seen(self) -> list[dict]:
        """What on_metadata saw, in order, since the log was last cleared."""
        if not self.metadata_log.exists():
            return []
        return [json.loads(line) for line in self.metadata_log.read_text().splitlines()]

    def wait_seen(self, tags: list[str], since: int = 0) -> list[dict]:
        deadline = time.monotonic() + ARRIVE_TIMEOUT_S
        while not (seen := self.seen()[since:]) or seen[-1]["tags"] != tags:
            if time.monotonic() > deadline:
                pytest.fail(f"on_metadata never saw {tags}; it saw {seen}")
            time.sleep(0.05)
        return seen


@pytest.fixture
def liquidsoap(liquidsoap_binary, tmp_path) -> Iterator[Liquidsoap]:
    server = Liquidsoap(liquidsoap_binary, tmp_path)
    yield server
    server.stop()


@pytest.fixture
def bridge() -> Iterator:
    started: list[Example] = []

    def run(tagd: FakeTagd, server: str) -> Example:
        started.append(Example("liquidsoap_bridge.py", tagd.endpoint, server, "radio1=live"))
        tagd.wait_subscribed("tags.radio1")
        return started[-1]

    yield run
    for example in started:
        example.kill()


def publish(tagd: FakeTagd, seq: int, active: list[str], stream: str = "radio1") -> None:
    scores = np.array([0.9 if tag in active else 0.1 for tag in CARD.tags], dtype=np.float32)
    start = seq * CARD.hop_samples
    prediction = Prediction(
        stream,
        seq,
        start,
        start + CARD.window_samples,
        1,
        scores,
        over=list(active),
        active=list(active),
        events=[],
    )
    now = time.time()
    message = tags_message(
        prediction,
        CARD,
        captured_at=now - 0.05,
        published_at=now,
        ingest_ms=5.0,
        queue_ms=1.0,
        inference_ms=20.0,
        total_ms=50.0,
        batch_size=1,
    )
    tagd.send(topic(TAGS_TOPIC, stream), message)


def logged(example: Example, level: str, containing: str = "") -> list[str]:
    return [line for line in example.stderr if f" {level} " in line and containing in line]


@pytest.mark.parametrize("server", ["telnet", "unix-socket"])
def test_bridge_inserts_tags_that_survive_a_liquidsoap_restart(liquidsoap, tagd, bridge, server):
    liquidsoap.start()
    address = liquidsoap.telnet if server == "telnet" else str(liquidsoap.socket_path)
    example = bridge(tagd, address)

    publish(tagd, 0, ["rock", AWKWARD_TAG])
    publish(tagd, 0, ["jazz"], stream="radio10")  # subscribed by prefix only: ignored
    (first,) = liquidsoap.wait_seen(["rock", AWKWARD_TAG])  # a comma, quotes, a backslash
    assert first["model"] == "fcn4-mtt"

    # Liquidsoap restarts; tagd's tags have not changed, so tagd sends nothing new.
    liquidsoap.stop()
    seen_before = len(liquidsoap.seen())
    liquidsoap.start()
    liquidsoap.wait_seen(["rock", AWKWARD_TAG], since=seen_before)

    publish(tagd, 1, ["speech"])
    liquidsoap.wait_seen(["speech"], since=seen_before)
    assert not logged(example, "ERROR"), example.stderr
    assert example.interrupt() == 0


def test_bridge_reports_a_rejected_command_as_an_error_and_retries_until_it_is_accepted(
    liquidsoap, tagd, bridge
):
    # The mistake docs/deploy.md once made: insert_metadata without server. registers no
    # command, and Liquidsoap answers ERROR to every insert.
    liquidsoap.start(insert=INSERT_WITHOUT_SERVER_COMMAND)
    example = bridge(tagd, liquidsoap.telnet)
    publish(tagd, 0, ["rock"])
    deadline = time.monotonic() + ARRIVE_TIMEOUT_S
    while not logged(example, "ERROR", "Liquidsoap refused"):
        assert time.monotonic() < deadline, f"no error about the refusal: {example.stderr}"
        time.sleep(0.05)
    (refusal,) = logged(example, "ERROR", "Liquidsoap refused")
    assert 'live.insert tagd_tags="[\\"rock\\"]"' in refusal  # the command, as sent
    assert "ERROR: unknown command" in refusal  # and Liquidsoap's reply

    # The operator fixes the script and restarts Liquidsoap: the pending insert lands.
    liquidsoap.stop()
    liquidsoap.start(insert=INSERT_WITH_SERVER_COMMAND)
    liquidsoap.wait_seen(["rock"])
    # said once, not per try (every 2 s; it says it again after 30 s, see below)
    assert len(logged(example, "ERROR")) == 1, example.stderr
    assert logged(example, "INFO", "accepts the inserts again"), example.stderr


class RefusingLiquidsoap:
    """A connection to a Liquidsoap that answers every command as one without
    ``server.insert_metadata`` does, until ``fixed``."""

    server = "127.0.0.1:1234"
    sock = object()  # connected
    fixed = False

    def command(self, line: str) -> list[str]:
        return ["Done"] if self.fixed else ["ERROR: unknown command, type 'help' for help"]


def test_bridge_repeats_the_refusal_error_every_30_s_while_it_lasts(caplog, monkeypatch):
    spec = importlib.util.spec_from_file_location("liquidsoap_bridge", EXAMPLES_BRIDGE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    bridge = module.Bridge("127.0.0.1:1234", {"radio1": "live"})
    bridge.liquidsoap = liquidsoap = RefusingLiquidsoap()
    bridge.on_tags([b"tags.radio1", json.dumps({"active": ["rock"], "model": "m"}).encode()])
    caplog.set_level(logging.INFO, logger="liquidsoap_bridge")

    def errors() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]

    start = 1000.0
    for now in np.arange(start, start + 65, 0.5):  # the loop wakes often; tries every 2 s
        bridge.send_pending(now)
    first, again, third = errors()  # at once, then after 30 s and 60 s
    assert first.startswith("radio1: Liquidsoap refused live.insert")
    assert "15 refused in the last 30 s, 16 since the first" in again
    assert "15 refused in the last 30 s, 31 since the first" in third
    assert "unknown command" in again and "live.insert" in again

    liquidsoap.fixed = True
    bridge.send_pending(start + 66)
    assert len(errors()) == 3
    assert caplog.records[-2].getMessage() == (
        "radio1: Liquidsoap accepts the inserts again, after 33 refused"  # at 0, 2, ... 64 s
    )


def test_bridge_coalesces_changes_faster_than_liquidsoap_applies_them(liquidsoap, tagd, bridge):
    liquidsoap.start()
    example = bridge(tagd, liquidsoap.telnet)
    publish(tagd, 0, ["rock"])
    liquidsoap.wait_seen(["rock"])

    burst = [["jazz"], ["speech"], ["rock", "jazz"], [AWKWARD_TAG], ["speech", "jazz"]]
    for seq, active in enumerate(burst, start=1):  # five changes inside a millisecond or so
        publish(tagd, seq, active)
    seen = liquidsoap.wait_seen(burst[-1], since=1)
    # Sent one by one, Liquidsoap would keep only the last of the five anyway; the bridge
    # sends the latest tags at most once per MIN_INSERT_INTERVAL_S instead.
    sent = [line for line in example.stderr if "radio1: live.insert" in line]
    assert len(sent) <= 1 + 2, sent  # the first tags, then at most two for the burst
    assert len(seen) <= 2, seen
    assert all(entry["tags"] in burst for entry in seen)


# -- Liquidsoap as the producer ------------------------------------------------------------

# What docs/deploy.md gives a station: Liquidsoap pipes WAV to ffmpeg, which publishes
# raw PCM on ZeroMQ for a zmq+raw input. {feed} is the endpoint ffmpeg binds.
PRODUCER_SCRIPT = """
settings.init.allow_root.set(true)
settings.log.file.set(false)
settings.log.stdout.set(true)
radio = mksafe(single("{music}"))
output.external(%wav(stereo=true, samplesize=16, header=true),
  "ffmpeg -nostdin -hide_banner -loglevel warning -f wav -i pipe:0 -f s16le -ar 44100 -ac 2 zmq:{feed}",
  radio)
"""


class Station:
    """tagd serve with a zmq+raw input on ``feed``, and Liquidsoap playing music to it by
    the script given to ``play()``."""

    def __init__(self, binary: str, model: Path, music, folder: Path) -> None:
        self.binary, self.folder = binary, folder
        self.feed, metrics = f"tcp://127.0.0.1:{free_port()}", free_port()
        self.music = folder / "station.wav"  # Liquidsoap plays it over and over
        mono = music(4.0, 44_100)
        soundfile.write(self.music, np.stack([mono, mono], axis=1), 44_100, subtype="PCM_16")
        raw = f"zmq+raw://{self.feed.removeprefix('tcp://')}?format=s16le&rate=44100&channels=2&stream=radio1"
        self.tagd = TagdProcess(
            [
                "--engine",
                str(model),
                "--hop",
                DAEMON_HOP_S,
                "--input",
                raw,
                "--publish",
                f"tcp://127.0.0.1:{free_port()}",
                "--metrics",
                f"127.0.0.1:{metrics}",
            ],
            metrics,
            folder / "tagd.log",
        )
        self.producer: subprocess.Popen | None = None

    def play(self, script: str) -> None:
        path = self.folder / "producer.liq"
        path.write_text(script)
        with (self.folder / "liquidsoap.log").open("w") as output:
            self.producer = subprocess.Popen(
                [self.binary, str(path)], stdout=output, stderr=subprocess.STDOUT
            )

    def stop(self) -> int:
        if self.producer is not None:
            terminate(self.producer)
        return self.tagd.stop()


@pytest.fixture
def station(liquidsoap_binary, export_model, music, tmp_path) -> Iterator[Station]:
    tool("ffmpeg", "apt-get install ffmpeg")
    started = Station(liquidsoap_binary, export_model("fcn4", **SHORT_FCN), music, tmp_path)
    yield started
    assert started.stop() == 0


def test_liquidsoap_feeds_tagd_serve_through_output_external(station):
    station.play(PRODUCER_SCRIPT.format(music=station.music, feed=station.feed))
    station.tagd.wait_ready()
    measured = AudioRate(station.tagd, "radio1", 4.0)
    deadline = time.monotonic() + 60
    while not measured():
        assert time.monotonic() < deadline, station.tagd.log()
        time.sleep(0.1)
    assert 0.7 < measured.rate < 1.4  # Liquidsoap's clock paces it: a live stream
    station.tagd.wait_for_metric("tagd_windows_published_total", 0, stream="radio1")
    assert station.tagd.metric("tagd_stream_misdeclared", stream="radio1") == 0


# The other route docs/deploy.md gives: the station's own Icecast output, read back by
# examples/feed-url.sh.
ICECAST_PRODUCER_SCRIPT = """
settings.init.allow_root.set(true)
settings.log.file.set(false)
settings.log.stdout.set(true)
radio = mksafe(single("{music}"))
output.icecast(%mp3(bitrate=128), host="127.0.0.1", port={port}, password="{password}",
  mount="live.mp3", radio)
"""


def test_liquidsoap_feeds_tagd_serve_through_icecast_and_feed_url(station):
    server = Icecast(tool("icecast2", "apt-get install icecast2"))
    try:
        station.play(
            ICECAST_PRODUCER_SCRIPT.format(
                music=station.music, port=server.port, password=Icecast.password
            )
        )
        station.tagd.wait_ready()
        server.wait_on_air()
        measured = AudioRate(station.tagd, "radio1", 4.0)
        run_feed("feed-url.sh", server.url, station.feed, stop_when=measured)
    finally:
        server.stop()
    assert 0.7 < measured.rate < 1.4
    station.tagd.wait_for_metric("tagd_windows_published_total", 0, stream="radio1")
    assert station.tagd.metric("tagd_stream_misdeclared", stream="radio1") == 0


GUIDE = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"
# What each snippet of the guide expects its script to have defined already.
SNIPPET_PRELUDE = "settings.init.allow_root.set(true)\nradio = blank()\nlive = blank()\n"
SNIPPET_OUTPUT = "output.dummy(fallible=true, live)\n"


def test_the_guides_liquidsoap_snippets_pass_liquidsoap_check(liquidsoap_binary, tmp_path):
    snippets = re.findall(r"```liquidsoap\n(.*?)```", GUIDE.read_text(), re.S)
    assert len(snippets) >= 2, "the guide lost its Liquidsoap snippets?"
    for index, snippet in enumerate(snippets):
        script = tmp_path / f"snippet-{index}.liq"
        script.write_text(SNIPPET_PRELUDE + snippet + SNIPPET_OUTPUT)
        result = subprocess.run(
            [liquidsoap_binary, "--check", str(script)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"{snippet}\n{result.stdout}{result.stderr}"
