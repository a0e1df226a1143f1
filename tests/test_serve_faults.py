"""Faults around a running daemon: an engine that raises, producers that come and go,
subscribers that stall or vanish, a flood of stream ids. Real sockets, a real engine."""

from __future__ import annotations

import json
import logging
import re
import threading
import time

import numpy as np
import pytest
import zmq
from audio_fixtures import make_music
from support import (
    HOP_S,
    SHORT_FCN,
    Listener,
    connect_and_wait,
    make_config,
    metric_value,
    s16le,
    scrape,
    serving,
    socket_port,
    wait_for,
)

RATE = 16_000


class FailingEngine:
    """The real engine, made to raise on the calls the test chooses (fault injection)."""

    def __init__(self, engine):
        self._engine = engine
        self.failure: type[Exception] | None = None

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.failure is not None:
            raise self.failure("injected fault")
        return self._engine.run(batch)

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


class Producer:
    """One producer process's worth of state: its own context, PUSH socket and seq."""

    def __init__(self, port: int):
        self.context = zmq.Context()
        self.push = self.context.socket(zmq.PUSH)
        self.push.connect(f"tcp://127.0.0.1:{port}")
        self.seq = 0

    def send(self, stream: str, audio: np.ndarray) -> None:
        payload = s16le(np.stack([audio, audio], axis=1))
        header = {"format": "s16le", "rate": RATE, "channels": 2, "seq": self.seq}
        self.push.send_multipart([stream.encode(), json.dumps(header).encode(), payload])
        self.seq += 1

    def close(self) -> None:
        self.push.close(linger=1000)
        self.context.term()


class Paced(threading.Thread):
    """Streams sent at twice real time in 0.1 s messages until stopped."""

    def __init__(self, port: int, streams: list[str]):
        super().__init__(daemon=True)
        self.producer, self.streams, self.stop = Producer(port), streams, threading.Event()
        self.audio = {name: make_music(30.0, RATE, seed=i) for i, name in enumerate(streams)}

    def run(self) -> None:
        step = RATE // 10
        for offset in range(0, 30 * RATE, step):
            if self.stop.is_set():
                break
            for name in self.streams:
                self.producer.send(name, self.audio[name][offset : offset + step])
            time.sleep(0.05)
        self.producer.close()


def test_an_engine_that_raises_loses_its_batches_counted_and_flips_healthz_until_it_recovers(
    short_fcn4, caplog
):
    with socket_port() as port:
        config = make_config(
            short_fcn4,
            [f"zmq+pull://127.0.0.1:{port}"],
            limits={"unhealthy_after_failed_batches": 3},
        )
    caplog.set_level(logging.DEBUG, logger="tagd.batcher")
    with serving(config) as server:
        engine = server.scorer.engines[0] = FailingEngine(server.scorer.engines[0])
        listener = Listener(server, "tags.")
        paced = Paced(port, ["one", "two"])
        paced.start()
        sample = server.metrics.sample
        try:
            listener.collect(until_quiet=5.0, count=4)
            assert len(listener.messages) >= 4
            engine.failure = ValueError
            wait_for(lambda: (sample("tagd_engine_errors_total") or 0) >= 5, what="errors")
            engine.failure = OSError  # a second kind of error: logged in full once too
            errors = sample("tagd_engine_errors_total")
            wait_for(lambda: sample("tagd_engine_errors_total") >= errors + 3, what="more errors")
            wait_for(lambda: sample("tagd_ready") == 0, what="tagd_ready 0")
            assert scrape(server, "/healthz") == (503, "engine failing\n")
            assert server.is_ready()  # still serving: it is the engine that is failing
            engine.failure = None
            wait_for(lambda: scrape(server, "/healthz")[0] == 200, what="healthz 200 again")
            wait_for(lambda: sample("tagd_ready") == 1, what="tagd_ready 1")
            published = sample("tagd_windows_published_total", {"stream": "one"})
            wait_for(
                lambda: sample("tagd_windows_published_total", {"stream": "one"}) > published,
                what="tags after recovery",
            )
        finally:
            paced.stop.set()
            paced.join()
        listener.close()
        failed = sample("tagd_engine_errors_total")
        dropped = sum(
            sample("tagd_windows_dropped_total", {"stream": s, "reason": "engine_error"}) or 0
            for s in ("one", "two")
        )
        assert dropped == failed  # batch size 1 on CPU: one window per failed batch
    full = [
        r for r in caplog.records if r.levelno == logging.ERROR and "engine failed on" in r.message
    ]
    assert [r.exc_info[0] for r in full] == [ValueError, OSError]  # once per kind, with traceback
    assert any("/healthz says 503" in r.message for r in caplog.records)
    assert any("engine recovered" in r.message for r in caplog.records)


def test_a_producer_that_restarts_resumes_within_a_hop_and_an_idle_one_is_reported(short_fcn4):
    with socket_port() as port:
        config = make_config(
            short_fcn4,
            [f"zmq+pull://127.0.0.1:{port}"],
            limits={"idle_after_s": 1.0},
            batching={"spread_phases": False},
        )
    audio = make_music(8.0, RATE, seed=5)
    with serving(config) as server:
        listener = Listener(server, "tags.")
        sample = server.metrics.sample
        first = Producer(port)
        first_sent_at = time.time()
        first.send("radio", audio[: int(2.5 * RATE)])  # a window and then some
        listener.collect(until_quiet=0.5)
        assert listener.on("tags.radio")
        first.close()  # the producer goes away ...
        time.sleep(0.3)  # ... and comes back at once, as a new process: seq from 0
        second = Producer(port)
        sent_at = time.time()
        second.send("radio", audio[int(2.5 * RATE) : int(2.5 * RATE) + int(HOP_S * RATE)])
        before = len(listener.messages)
        listener.collect(until_quiet=1.0)
        resumed = [m for _, m in listener.messages[before:]]
        assert resumed, "no prediction within a hop of the producer's new data"
        # captured when its last sample arrived: with the first producer's audio when the
        # resampler held that back until the second one's came
        assert first_sent_at <= resumed[0]["captured_at"] <= resumed[0]["published_at"]
        assert resumed[0]["published_at"] - sent_at < 1.0
        assert sample("tagd_stream_gaps_total", {"stream": "radio"}) == 1  # seq went back to 0
        assert (
            sample(
                "tagd_malformed_messages_total",
                {"input": f"127.0.0.1:{port}", "reason": "out_of_order"},
            )
            is None
        )

        second.close()  # now silent for longer than idle_after_s
        wait_for(lambda: sample("tagd_stream_idle", {"stream": "radio"}) == 1, what="idle")
        _, text = scrape(server)
        assert metric_value(text, 'tagd_stream_idle{stream="radio"}') == 1
        assert metric_value(text, "tagd_active_streams") == 0
        last = metric_value(text, 'tagd_stream_last_audio_timestamp_seconds{stream="radio"}')
        assert sent_at - 1 < last < time.time() - 1.0

        third = Producer(port)
        third.send("radio", audio[int(3.0 * RATE) : int(5.5 * RATE)])
        wait_for(
            lambda: sample("tagd_stream_idle", {"stream": "radio"}) == 0,
            timeout=1.0,
            what="active again",
        )
        before = len(listener.messages)
        listener.collect(until_quiet=1.0)
        third.close()
        listener.close()
    after_idle = [m for _, m in listener.messages[before:]]
    assert after_idle  # the window refilled from the new audio (2.5 s > 1.98 s)
    assert after_idle[0]["window"]["start_s"] >= resumed[-1]["window"]["end_s"]


def test_stalled_and_vanished_subscribers_cost_the_others_nothing(export_model):
    # ~35 kB messages, ~40 MB in all: far more than loopback TCP buffers (a few MB) hold
    fcn = export_model("fcn4", n_tags=1000, **SHORT_FCN)
    with socket_port() as port:
        config = make_config(
            fcn,
            [f"zmq+pull://127.0.0.1:{port}"],
            publish={"sndhwm": 100},
            batching={"max_pending_per_stream": 10_000},
            tagger={"on_after": 1},
        )
    config.hop_seconds = 0.01
    context = zmq.Context()
    with serving(config) as server:
        stuck = context.socket(zmq.SUB)  # subscribes, then never reads
        stuck.setsockopt(zmq.RCVHWM, 1)
        stuck.setsockopt(zmq.RCVBUF, 4096)
        stuck.setsockopt(zmq.SUBSCRIBE, b"")
        connect_and_wait(stuck, server.publish_address)
        gone = context.socket(zmq.SUB)  # reads a little, then vanishes without a word
        gone.setsockopt(zmq.SUBSCRIBE, b"")
        connect_and_wait(gone, server.publish_address)
        healthy = Listener(server, "tags.")  # connected the same way
        producer = Producer(port)
        audio = make_music(12.0, RATE, seed=2)
        sample = server.metrics.sample
        for first in range(0, len(audio), RATE // 2):
            producer.send("flood", audio[first : first + RATE // 2])
        gone.poll(5000)
        gone.close(linger=0)
        healthy.collect(until_quiet=2.0, limit=60.0)
        emitted = server.hub.get("flood").windows_emitted
        published = sample("tagd_windows_published_total", {"stream": "flood"})
        events = sample("tagd_events_published_total", {"stream": "flood"}) or 0
        stuck.close(linger=0)
        healthy.close()
        producer.close()
    context.term()
    assert emitted >= 1000  # 12 s at a 0.01 s hop
    assert published == emitted  # inference lost nothing to the stalled subscriber
    # That the stuck subscriber's misses are counted is asserted in test_serve_publish.py,
    # where it is deterministic; here whether the kernel's buffers fill depends on timing.
    tags = healthy.on("tags.flood")
    seqs = [m["seq"] for m in tags]
    # the healthy subscriber has every message published since it joined, in order
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert seqs[-1] == emitted - 1
    assert events > 0  # on_after=1: the stalled subscriber was sent events as well


def test_a_flood_of_stream_ids_is_bounded_and_evicted_streams_leave_no_series(short_fcn4):
    with socket_port() as port:
        config = make_config(
            short_fcn4,
            [f"zmq+pull://127.0.0.1:{port}"],
            tagger={"on_after": 1},
            limits={"max_streams": 3, "idle_after_s": 1.0, "evict_after_s": 2.0},
        )
    label = f"127.0.0.1:{port}"
    with serving(config) as server:
        listener = Listener(server, "tags.")
        sample = server.metrics.sample
        producer = Producer(port)
        producer.send("keep", make_music(2.5, RATE, seed=1))
        listener.collect(until_quiet=0.5, count=3)
        last = listener.on("tags.keep")[-1]
        tags = server.engine.card.tags
        for tag in tags:  # the dashboards' per-tag gauges: the last published prediction
            score = sample("tagd_tag_score", {"stream": "keep", "tag": tag})
            assert score == pytest.approx(last["scores"][tag], abs=1e-6)
            assert sample("tagd_tag_active", {"stream": "keep", "tag": tag}) == (
                tag in last["active"]
            )
        short = make_music(0.1, RATE, seed=2)
        for i in range(10):  # two of ten find room; the rest are refused and counted
            producer.send(f"flood{i}", short)
        wait_for(
            lambda: (
                (
                    sample(
                        "tagd_malformed_messages_total",
                        {"input": label, "reason": "too_many_streams"},
                    )
                    or 0
                )
                == 8
            )
        )
        assert sorted(server.hub.names()) == ["flood0", "flood1", "keep"]
        wait_for(lambda: sample("tagd_active_streams") == 0, what="all idle")
        for i in range(3):  # idle streams make room, the longest silent first
            producer.send(f"late{i}", short)
        wait_for(lambda: sorted(server.hub.names()) == ["late0", "late1", "late2"], timeout=5)
        assert sample("tagd_tag_score", {"stream": "keep", "tag": tags[0]}) is None
        wait_for(lambda: server.hub.names() == [], timeout=5, what="eviction")
        _, text = scrape(server)
        producer.close()
        listener.close()
    series = [line for line in text.splitlines() if re.search(r'[{,]stream="', line)]
    assert series == []  # every per-stream series went with its stream
    assert metric_value(text, "tagd_streams") == 0
