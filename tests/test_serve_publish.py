"""Wire out and health: a slow subscriber drops (counted) without holding up the others;
/healthz says 503 until ready; message shapes follow docs/topics.md."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zmq
from prometheus_client import generate_latest
from support import wait_for, wait_subscribed

from tagd.card import ModelCard
from tagd.metrics import Metrics, MetricsServer
from tagd.publish import Publisher, event_messages, tags_message
from tagd.stream import Arrival, ReadyWindow
from tagd.tagger import Tagger


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def test_a_stuck_subscriber_misses_messages_counted_and_the_others_get_them_all(context):
    metrics = Metrics()
    publisher = Publisher(context, "tcp://127.0.0.1:*", metrics, sndhwm=200, linger_ms=0)
    stuck = context.socket(zmq.SUB)  # subscribes, then never reads
    stuck.setsockopt(zmq.RCVHWM, 1)
    stuck.setsockopt(zmq.RCVBUF, 4096)
    stuck.setsockopt(zmq.SUBSCRIBE, b"tags.")
    stuck.connect(publisher.address)
    reader = context.socket(zmq.SUB)
    reader.setsockopt(zmq.RCVHWM, 100_000)
    reader.setsockopt(zmq.SUBSCRIBE, b"tags.radio1")
    reader.connect(publisher.address)
    wait_subscribed(publisher, "tags.", "tags.radio1")  # one prefix each: both are reported

    received: list[int] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set() or reader.poll(200):
            if reader.poll(50):
                _, body = reader.recv_multipart()
                received.append(json.loads(body)["n"])

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    padding = "x" * 100_000  # big messages fill the stuck subscriber's TCP buffers quickly
    sent_all = True

    def publish() -> None:
        nonlocal sent_all
        for n in range(600):
            sent_all &= publisher.send("tags.radio1", {"n": n, "pad": padding})
            time.sleep(0.001)

    # A send that blocked on the stuck subscriber would never return: it never reads. How
    # long a send takes is the benchmark's business, not this test's.
    sender = threading.Thread(target=publish, daemon=True)
    sender.start()
    sender.join(timeout=60)
    assert not sender.is_alive(), "publishing blocked on a subscriber that does not read"
    done.set()
    thread.join()
    missed = metrics.sample("tagd_publish_dropped_total", {"topic": "tags"})
    assert not sent_all and missed > 0
    assert received == list(range(600))  # the healthy subscriber lost nothing
    publisher.close()


def test_healthz_is_503_until_ready_and_metrics_are_served():
    metrics = Metrics()
    metrics.windows_published.labels("radio1").inc(3)
    ready = threading.Event()
    server = MetricsServer(metrics, "127.0.0.1", 0, ready.is_set)
    server.start()
    base = f"http://127.0.0.1:{server.address[1]}"
    try:
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(base + "/healthz", timeout=5)
        assert caught.value.code == 503
        ready.set()
        with urllib.request.urlopen(base + "/healthz", timeout=5) as response:
            assert response.status == 200
        with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
            text = response.read().decode()
            assert response.headers["Content-Type"].startswith("text/plain")
        assert 'tagd_windows_published_total{stream="radio1"} 3.0' in text
    finally:
        server.stop()


def test_metric_names_follow_prometheus_conventions():
    metrics = Metrics()
    names = {metric.name for metric in metrics.registry.collect()}
    assert all(name.startswith("tagd_") for name in names)
    for metric in metrics.registry.collect():
        if metric.type == "counter":
            assert not metric.name.endswith("_total")  # the client appends _total to counters
        if metric.type == "histogram" and metric.name != "tagd_batch_size":
            assert metric.name.endswith("_seconds")
    assert {
        "tagd_end_to_end_latency_seconds",
        "tagd_ingest_delay_seconds",
        "tagd_queue_wait_seconds",
        "tagd_inference_seconds",
        "tagd_batch_size",
        "tagd_windows_published",
        "tagd_windows_dropped",
        "tagd_publish_dropped",
        "tagd_audio_received_seconds",
        "tagd_stream_gaps",
        "tagd_malformed_messages",
        "tagd_active_streams",
        "tagd_engine",
    } <= names


TOPICS_DOC = Path(__file__).resolve().parents[1] / "docs" / "topics.md"


def documented_examples() -> dict[str, dict]:
    """docs/topics.md's example message under each ``## `TOPIC.<stream>` `` heading."""
    examples = {}
    for section in TOPICS_DOC.read_text().split("\n## `")[1:]:
        kind = section.split(".", 1)[0]
        if "```json\n" in section:
            examples[kind] = json.loads(section.split("```json\n", 1)[1].split("```", 1)[0])
    return examples


def documented_keys() -> set[str]:
    """The keys in the table of docs/topics.md's ``tags.<stream>`` section, dotted."""
    section = TOPICS_DOC.read_text().split("\n## `tags.<stream>`", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {key.strip("` ") for row in rows for key in row.split("|")[1].split(",")}


def shape(value):
    """A JSON value's structure: dict keys recursively, numbers as one kind (tag names
    in ``scores`` are the card's, not the doc's)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items() if key != "scores"} | (
            {"scores": "tag → number"} if "scores" in value else {}
        )
    if isinstance(value, list):
        return "list"
    return (
        "number"
        if isinstance(value, int | float) and not isinstance(value, bool)
        else type(value).__name__
    )


def paths(value, prefix: str = "") -> set[str]:
    found = set()
    for key, item in value.items():
        found.add(prefix + key)
        if isinstance(item, dict) and key != "scores":
            found |= paths(item, prefix + key + ".")
    return found


def test_message_shapes_match_docs_topics():
    card = ModelCard(
        name="m",
        architecture="fcn4",
        sample_rate=100,
        window_samples=100,
        hop_samples=50,
        tags=["rock", "jazz"],
        thresholds=[0.5, 0.5],
    )
    tagger = Tagger(card, on_after=1)
    window = ReadyWindow("radio1", 4, 1, 200, np.zeros(100, np.float32), Arrival(1000.0, 0.0))
    prediction = tagger.update(window, [0.9, 0.1])
    message = tags_message(
        prediction,
        card,
        captured_at=1000.0,
        published_at=1000.05,
        ingest_ms=8,
        queue_ms=10,
        inference_ms=30,
        total_ms=50,
        batch_size=2,
    )
    assert message == {
        "schema": 1,
        "stream": "radio1",
        "seq": 4,
        "model": "m",
        "window": {"start_s": 2.0, "end_s": 3.0, "segments": 1},
        "captured_at": 1000.0,
        "published_at": 1000.05,
        "latency_ms": {"ingest": 8, "queue": 10, "inference": 30, "total": 50},
        "batch_size": 2,
        "scores": {"rock": pytest.approx(0.9), "jazz": pytest.approx(0.1)},
        "tags": ["rock"],
        "active": ["rock"],
    }
    (event,) = event_messages(prediction, card, published_at=1000.05)
    assert event == {
        "schema": 1,
        "stream": "radio1",
        "seq": 4,
        "model": "m",
        "tag": "rock",
        "state": "on",
        "score": pytest.approx(0.9),
        "threshold": 0.5,
        "window": {"start_s": 2.0, "end_s": 3.0},
        "published_at": 1000.05,
    }
    documented = documented_examples()
    assert shape(message) == shape(documented["tags"])
    assert shape(event) == shape(documented["events"])
    # a remote engine's (triton://) messages add the window's round trip, inside inference
    timings = dict(ingest_ms=8, queue_ms=10, inference_ms=30, total_ms=50, batch_size=2)
    remote = tags_message(
        prediction, card, captured_at=1000.0, published_at=1000.05, remote_ms=12.3456, **timings
    )
    latency = {"ingest": 8, "queue": 10, "inference": 30, "remote": 12.346, "total": 50}
    assert remote == {**message, "latency_ms": latency}
    # every key of a tags message is explained in the table, and nothing more; with
    # `aggregate = true` the server adds the song so far (tagd.aggregate)
    song = {"aggregator": "lstm", "windows": 3, "scores": {"rock": 0.8, "jazz": 0.2}}
    full = {**remote, "song": song}
    keys = {key for key in paths(full) if not key.startswith("song.")}  # its row shows them
    assert keys - {"schema", "window", "latency_ms"} == documented_keys()


def test_tag_gauges_show_each_streams_last_prediction_and_go_with_the_stream():
    metrics = Metrics()
    tags = ["rock", "jazz", "vocal"]
    last = metrics.last_predictions
    last.update("radio1", tags, np.array([0.9, 0.1, 0.5], np.float32), ["rock"])
    last.update("radio2", tags, np.array([0.2, 0.7, 0.4], np.float32), [])
    last.update("radio1", tags, np.array([0.8, 0.2, 0.6], np.float32), ["rock", "vocal"])

    def series(name: str, stream: str) -> list[float | None]:
        return [metrics.sample(name, {"stream": stream, "tag": tag}) for tag in tags]

    assert series("tagd_tag_score", "radio1") == pytest.approx([0.8, 0.2, 0.6])  # the latest
    assert series("tagd_tag_score", "radio2") == pytest.approx([0.2, 0.7, 0.4])
    assert series("tagd_tag_active", "radio1") == [1, 0, 1]
    assert series("tagd_tag_active", "radio2") == [0, 0, 0]
    metrics.forget_stream("radio1")
    assert series("tagd_tag_score", "radio1") == [None, None, None]
    text = generate_latest(metrics.registry).decode()
    assert "# TYPE tagd_tag_score gauge" in text and "# TYPE tagd_tag_active gauge" in text
    assert 'tagd_tag_active{stream="radio2",tag="jazz"} 0.0' in text
    assert "radio1" not in text


def test_the_publishers_monitor_thread_counts_a_subscriber_leaving_while_nothing_is_sent(context):
    metrics = Metrics()
    publisher = Publisher(context, "tcp://127.0.0.1:*", metrics, linger_ms=0)
    publisher.start_monitor()
    subscriber = context.socket(zmq.SUB)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"tags.")
    subscriber.connect(publisher.address)
    wait_subscribed(publisher, "tags.")
    subscriber.close(linger=0)
    wait_for(
        lambda: metrics.sample("tagd_peer_disconnects_total", {"socket": "publish"}),
        "the disconnect to be counted",
    )
    publisher.close()
    assert not any(t.name == "tagd-publish-monitor" for t in threading.enumerate())
