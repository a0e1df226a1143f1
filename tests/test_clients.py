"""The consumers in examples/, each against a stand-in its user would recognise.

tagd's own Publisher on loopback plays tagd: it waits until the example has subscribed (so
nothing is lost to the slow-joiner rule), then publishes messages built by
``tagd.publish`` itself, so they are exactly what ``tagd serve`` puts on the wire. The
examples run as their users run them: ``python examples/NAME.py ...`` in a subprocess.
examples/liquidsoap_bridge.py is tested against a real Liquidsoap in tests/test_liquidsoap.py.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from support import Example, fcn4_card, wait_for

from tagd.publish import EVENTS_TOPIC, TAGS_TOPIC, event_messages, tags_message, topic
from tagd.tagger import OFF, ON, Prediction, TagEvent

CARD = fcn4_card(["rock", "guitar", "speech", "jazz"])


def predict(
    stream: str, seq: int, active: list[str], events: list[TagEvent] | None = None
) -> Prediction:
    scores = np.array([0.9 if tag in active else 0.1 for tag in CARD.tags], dtype=np.float32)
    start = seq * CARD.hop_samples
    return Prediction(
        stream,
        seq,
        start,
        start + CARD.window_samples,
        1,
        scores,
        over=list(active),
        active=list(active),
        events=events or [],
    )


def tags_of(prediction: Prediction) -> dict:
    now = time.time()
    return tags_message(
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


@pytest.fixture
def run_example() -> Iterator:
    started: list[Example] = []

    def run(name: str, *args: str, env: dict[str, str] | None = None) -> Example:
        started.append(Example(name, *args, env=env))
        return started[-1]

    yield run
    for example in started:
        example.kill()


# -- subscriber.py ------------------------------------------------------------------------


def test_subscriber_prints_the_tags_and_events_of_its_stream_only(tagd, run_example):
    example = run_example("subscriber.py", tagd.endpoint, "radio1")
    tagd.wait_subscribed("tags.radio1", "events.radio1")

    tagd.send(topic(TAGS_TOPIC, "radio10"), tags_of(predict("radio10", 0, ["jazz"])))
    turned_on = predict("radio1", 7, ["rock"], [TagEvent("rock", ON, 0.9, 0.5)])
    tagd.send(topic(TAGS_TOPIC, "radio1"), tags_of(turned_on))
    for event in event_messages(turned_on, CARD, published_at=time.time()):
        tagd.send(topic(EVENTS_TOPIC, "radio1"), event)

    tags_line, event_line = example.lines(2)
    assert tags_line.startswith("radio1 #7 on: rock  top: rock 0.90")
    assert event_line == "radio1 rock on (0.90)"
    assert example.interrupt() == 0
    assert "jazz" not in " ".join([tags_line, event_line])


# -- webhook_bridge.py ----------------------------------------------------------------------


class Webhook(ThreadingHTTPServer):
    """An HTTP endpoint that records the POSTs it gets; fails the first ``failures``."""

    def __init__(self, failures: int = 0) -> None:
        self.posts: list[tuple[str, Message, bytes]] = []  # headers match any case
        self.failures = failures
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                webhook.posts.append((self.path, self.headers, body))
                failing = len(webhook.posts) <= webhook.failures
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/hooks/tagd"
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}).start()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    server = Webhook(failures=1)
    yield server
    server.shutdown()
    server.server_close()


def test_webhook_bridge_posts_each_event_as_json_and_survives_a_failing_webhook(
    tagd, run_example, webhook
):
    env = {**os.environ, "WEBHOOK_HEADER": "X-API-Key: secret"}
    example = run_example("webhook_bridge.py", tagd.endpoint, webhook.url, "radio1", env=env)
    tagd.wait_subscribed("events.radio1")

    change = predict(
        "radio1", 3, ["rock"], [TagEvent("rock", ON, 0.9, 0.5), TagEvent("speech", OFF, 0.2, 0.5)]
    )
    first, second = event_messages(change, CARD, published_at=time.time())
    tagd.send(topic(TAGS_TOPIC, "radio1"), tags_of(change))  # not an event: not posted
    tagd.send(topic(EVENTS_TOPIC, "radio1"), first)  # the webhook answers 500
    other = predict("radio10", 0, ["jazz"], [TagEvent("jazz", ON, 0.9, 0.5)])
    tagd.send(topic(EVENTS_TOPIC, "radio10"), event_messages(other, CARD, published_at=0)[0])
    tagd.send(topic(EVENTS_TOPIC, "radio1"), second)

    wait_for(lambda: len(webhook.posts) >= 2, "two POSTs")
    assert [json.loads(body) for _, _, body in webhook.posts] == [first, second]
    for path, headers, _ in webhook.posts:
        assert path == "/hooks/tagd"
        assert headers["Content-Type"] == "application/json"
        assert headers["X-API-Key"] == "secret"
    # the webhook has the POST before the bridge has its answer and logs it
    wait_for(
        lambda: any("speech off: posted, HTTP 204" in line for line in example.stderr),
        "the bridge to log the second POST",
    )
    assert example.interrupt() == 0
    assert any("rock on: POST" in line and "failed" in line for line in example.stderr)
