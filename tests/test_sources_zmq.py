"""ZeroMQ inputs over real sockets: ffmpeg-style raw PCM and the multi-stream protocol."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time

import numpy as np
import pytest
import zmq
from audio_fixtures import make_music
from support import free_port

from tagd.config import LimitsConfig, parse_input
from tagd.metrics import Metrics
from tagd.sources import make_source
from tagd.sources.zmq import MalformedMessage, parse_message
from tagd.stream import Arrival, ReadyWindow, Stream, StreamGeometry, StreamHub

GEOMETRY = StreamGeometry(sample_rate=8_000, window_samples=4_000, hop_samples=2_000)
RATE = 16_000


class Collector:
    """The sink of a real StreamHub: windows by stream, with a way to wait for them."""

    def __init__(self):
        self.windows: dict[str, list[ReadyWindow]] = {}
        self.changed = threading.Condition()

    def __call__(self, window: ReadyWindow) -> None:
        with self.changed:
            self.windows.setdefault(window.stream, []).append(window)
            self.changed.notify_all()

    def wait_for(self, counts: dict[str, int], timeout: float = 5.0) -> None:
        def enough() -> bool:
            return all(len(self.windows.get(s, [])) >= n for s, n in counts.items())

        with self.changed:
            assert self.changed.wait_for(enough, timeout), {
                s: len(w) for s, w in self.windows.items()
            }


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def start_source(url: str, context: zmq.Context, **limits):
    collector, metrics = Collector(), Metrics()
    limits = LimitsConfig(**{"max_streams": 8, **limits})
    hub = StreamHub(
        GEOMETRY,
        collector,
        metrics,
        max_streams=limits.max_streams,
        idle_after_s=limits.idle_after_s,
        evict_after_s=0,
    )
    source = make_source(parse_input(url), hub, metrics, context, limits)
    source.open()
    source.start()
    return source, collector, metrics


@contextlib.contextmanager
def pull_input(context: zmq.Context, **limits):
    """A zmq+pull input on a free port and a PUSH connected to it: (source, collector,
    metrics, push, port); the input is stopped and the PUSH closed on the way out."""
    port = free_port()
    source, collector, metrics = start_source(f"zmq+pull://127.0.0.1:{port}", context, **limits)
    push = context.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    try:
        yield source, collector, metrics, push, port
    finally:
        source.stop()
        source.join(1.0)
        push.close(linger=0)


def pcm(seconds: float, seed: int, channels: int = 2) -> bytes:
    tracks = [make_music(seconds, RATE, seed=seed + c) for c in range(channels)]
    return (np.stack(tracks, axis=1) * 32767).astype("<i2").tobytes()


def expected_windows(payload: bytes, channels: int = 2) -> list[ReadyWindow]:
    """What a stream makes of ``payload`` received in one piece."""
    windows: list[ReadyWindow] = []
    Stream("ref", GEOMETRY, windows.append, Metrics()).push_pcm(
        payload, "s16le", RATE, channels, Arrival(0, 0)
    )
    return windows


def assert_same_windows(got: list[ReadyWindow], want: list[ReadyWindow], at_least: int) -> None:
    assert len(got) >= at_least
    for a, b in zip(got, want, strict=False):
        assert a.start == b.start
        np.testing.assert_array_equal(a.samples, b.samples)


def test_raw_input_reads_ffmpeg_style_messages_as_one_byte_stream(context):
    port = free_port()
    producer = context.socket(zmq.XPUB)  # a PUB that tells us when the subscriber is there
    producer.bind(f"tcp://127.0.0.1:{port}")
    source, collector, metrics = start_source(
        f"zmq+raw://127.0.0.1:{port}?format=s16le&rate={RATE}&channels=2&stream=radio1", context
    )
    try:
        assert producer.poll(5000), "tagd's SUB never subscribed"
        assert producer.recv() == b"\x01"  # subscribe to everything
        payload = pcm(2.0, seed=1)
        sizes = [4608, 1684, 3, 999]  # not aligned to 4-byte frames
        position = 0
        for index in range(10**6):
            if position >= len(payload):
                break
            size = sizes[index % len(sizes)]
            producer.send(payload[position : position + size])
            position += size
        want = expected_windows(payload)
        collector.wait_for({"radio1": len(want) - 1})
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and received(metrics, "radio1") < 2.0:
            time.sleep(0.01)
    finally:
        source.stop()
        assert source.join(1.0)
        producer.close()
    assert_same_windows(collector.windows["radio1"], want, at_least=len(want) - 1)
    assert received(metrics, "radio1") == pytest.approx(2.0)


def received(metrics: Metrics, stream: str) -> float:
    return metrics.sample("tagd_audio_received_seconds_total", {"stream": stream}) or 0.0


def message(stream: str, seq: int, payload: bytes, **header) -> list[bytes]:
    fields = {"format": "s16le", "rate": RATE, "channels": 2, "seq": seq, "t": time.time()} | header
    return [stream.encode(), json.dumps(fields).encode(), payload]


def send_interleaved(
    socket: zmq.Socket, streams: dict[str, bytes], chunk: int, first_seq: int = 0
) -> None:
    offsets = range(0, max(map(len, streams.values())), chunk)
    for seq, offset in enumerate(offsets, start=first_seq):
        for name, payload in streams.items():
            if offset < len(payload):
                socket.send_multipart(message(name, seq, payload[offset : offset + chunk]))


def test_two_streams_on_one_pull_socket_are_told_apart(context):
    audio = {"radio1": pcm(1.5, seed=10), "radio2": pcm(1.5, seed=20)}
    with pull_input(context) as (_, collector, metrics, push, _):
        send_interleaved(push, audio, chunk=1684)
        want = {name: expected_windows(payload) for name, payload in audio.items()}
        collector.wait_for({name: len(w) for name, w in want.items()})
    for name in audio:
        assert_same_windows(collector.windows[name], want[name], at_least=len(want[name]))
    assert not np.array_equal(
        collector.windows["radio1"][0].samples, collector.windows["radio2"][0].samples
    )
    assert metrics.sample("tagd_stream_gaps_total", {"stream": "radio1"}) is None


def wakeups(thread: threading.Thread) -> int:
    """How many times a running thread has gone to sleep and woken (voluntary context
    switches, from /proc)."""
    with open(f"/proc/self/task/{thread.native_id}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="per-thread counts from /proc")
def test_a_quiet_input_blocks_and_a_burst_after_it_is_taken_whole(context):
    # The reader sleeps 2 ms after a drained burst; with nothing coming it must block
    # (waking each POLL_INTERVAL_S to see a stop), not go on sleeping and polling.
    audio = {"radio1": pcm(1.0, seed=11), "radio2": pcm(1.0, seed=21)}
    with pull_input(context) as (source, collector, _, push, _):
        send_interleaved(push, {"radio1": audio["radio1"][:8000]}, chunk=4000)
        time.sleep(0.3)  # the first two messages are taken; then the socket is quiet
        before = wakeups(source._thread)
        time.sleep(1.0)
        quiet_wakeups = wakeups(source._thread) - before
        # a burst: the rest of radio1 and all of radio2 at once, as fast as ZeroMQ sends
        rest = {"radio1": audio["radio1"][8000:], "radio2": audio["radio2"]}
        send_interleaved(push, rest, chunk=1000, first_seq=2)
        want = {name: expected_windows(payload) for name, payload in audio.items()}
        collector.wait_for({name: len(w) for name, w in want.items()})
    assert quiet_wakeups < 100  # ~10 blocking; polling every 2 ms would be ~500
    for name in audio:
        assert_same_windows(collector.windows[name], want[name], at_least=len(want[name]))


def test_sub_input_connects_to_a_multi_stream_publisher(context):
    port = free_port()
    producer = context.socket(zmq.XPUB)
    producer.bind(f"tcp://127.0.0.1:{port}")
    source, collector, _ = start_source(f"zmq+sub://127.0.0.1:{port}?streams=keep", context)
    try:
        assert producer.poll(5000) and producer.recv() == b"\x01"
        send_interleaved(
            producer, {"keep": pcm(1.0, seed=3), "other": pcm(1.0, seed=4)}, chunk=4000
        )
        collector.wait_for({"keep": 1})
    finally:
        source.stop()
        source.join(1.0)
        producer.close()
    assert "other" not in collector.windows  # not in the allow-list


def header(**fields) -> bytes:
    return json.dumps({"format": "s16le", "rate": RATE, "channels": 2} | fields).encode()


BAD_MESSAGES = {
    "frames": [[b"radio1", b"{}"], [b"a", b"b", b"c", b"d"]],
    "stream_id": [[b"no.dots", b"{}", b"x"], [b"\xff\xfe", b"{}", b"x"], [b"x" * 65, b"{}", b"x"]],
    "header": [
        [b"s", b"not json", b"xx"],
        [b"s", b"[1, 2]", b"xx"],
        [b"s", b"[" * 3000 + b"]" * 3000, b"xx"],  # nested deeper than json's recursion limit
        [b"s", json.dumps({"format": "s16le", "rate": RATE}).encode(), b"xx"],
        [b"s", header(seq=-1), b"xx"],
        [b"s", header(t="noon"), b"xx"],
        [b"s", b" " * 5000, b"xx"],
    ],
    "format": [[b"s", header(format="mp3"), b"xx"], [b"s", header(format=["s16le"]), b"xx"]],
    "rate": [
        [b"s", header(rate=5), b"xx"],
        [b"s", header(rate=10**9), b"xx"],
        [b"s", header(rate="44100"), b"xx"],
    ],
    "channels": [
        [b"s", header(channels=True), b"xx"],
        [b"s", header(channels=0), b"xx"],
        [b"s", header(channels=65), b"xx"],
    ],
    "pcm": [[b"s", header(), b""], [b"s", header(), b"xxx"], [b"s", header(format="f32le"), b"xx"]],
}


@pytest.mark.parametrize("reason", sorted(BAD_MESSAGES))
def test_parse_message_names_the_reason(reason):
    for frames in BAD_MESSAGES[reason]:
        with pytest.raises(MalformedMessage) as caught:
            parse_message(frames)
        assert caught.value.reason == reason, frames


def refused(metrics: Metrics, label: str) -> float:
    return (
        metrics.sample(
            "tagd_malformed_messages_total", {"input": label, "reason": "too_many_streams"}
        )
        or 0
    )


def test_malformed_messages_are_counted_and_good_ones_still_flow(context):
    with pull_input(context, max_streams=2) as (_, collector, metrics, push, port):
        for frames in [f for bad in BAD_MESSAGES.values() for f in bad]:
            push.send_multipart(frames)
        good = pcm(1.0, seed=5)
        send_interleaved(push, {"one": good, "two": good, "three": good}, chunk=4000)
        collector.wait_for({"one": 1, "two": 1})
        label, refused_all = f"127.0.0.1:{port}", len(range(0, len(good), 4000))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and refused(metrics, label) < refused_all:
            time.sleep(0.01)
    counts = {
        r: metrics.sample("tagd_malformed_messages_total", {"input": label, "reason": r})
        for r in BAD_MESSAGES
    }
    assert counts == {reason: len(frames) for reason, frames in BAD_MESSAGES.items()}
    # a third stream is refused while two are open (limits.max_streams), each message counted
    assert refused(metrics, label) == refused_all
    assert "three" not in collector.windows


def test_a_port_in_use_fails_to_open_with_one_line(context):
    port = free_port()
    squatter = context.socket(zmq.PULL)
    squatter.bind(f"tcp://127.0.0.1:{port}")
    from tagd.sources import SourceError

    with pytest.raises(SourceError, match="cannot bind tcp://127.0.0.1:.*Address already in use"):
        start_source(f"zmq+pull://127.0.0.1:{port}", context)
    squatter.close()


def test_a_frame_over_the_size_limit_disconnects_its_peer_counted_and_others_flow(context):
    port = free_port()
    source, collector, metrics = start_source(
        f"zmq+pull://127.0.0.1:{port}", context, max_message_bytes=64 * 1024
    )
    label = f"127.0.0.1:{port}"
    big, good = context.socket(zmq.PUSH), context.socket(zmq.PUSH)
    for push in (big, good):
        push.connect(f"tcp://127.0.0.1:{port}")
    try:
        big.send_multipart(message("huge", 0, b"\0" * (1 << 20)))  # 1 MiB: never read
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not metrics.sample(
            "tagd_peer_disconnects_total", {"socket": label}
        ):
            time.sleep(0.01)
        send_interleaved(good, {"fine": pcm(1.0, seed=6)}, chunk=4000)
        collector.wait_for({"fine": 1})
    finally:
        source.stop()
        source.join(1.0)
        big.close(linger=0)
        good.close(linger=0)
    assert metrics.sample("tagd_peer_disconnects_total", {"socket": label}) >= 1
    assert "huge" not in collector.windows and received(metrics, "huge") == 0
