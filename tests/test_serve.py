"""`tagd serve` in process, end to end: real sockets, a real ffmpeg, exported models.

Models are tiny exports with short windows (a ~2 s FCN-4, a 0.1 s SampleCNN averaged over
0.5 s clips) and hops of a fraction of a second, so that each test streams a few seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile
import zmq
from audio_fixtures import make_music
from support import (
    HOP_S,
    REPO,
    SHORT_FCN,
    Listener,
    make_config,
    metric_value,
    reference_windows,
    s16le,
    scrape,
    send_chunked,
    serving,
    socket_port,
)

from tagd.engines import load_engine
from tagd.metrics import Metrics
from tagd.server import Server, StartupError

SHORT_SAMPLECNN = {"n": 6, "clip_seconds": 0.5}  # 3^7 = 2,187 samples, 5 segments per clip
REQUIRED_FIELDS = {
    "schema",
    "stream",
    "seq",
    "model",
    "window",
    "captured_at",
    "published_at",
    "latency_ms",
    "scores",
    "tags",
}


@pytest.fixture(scope="module")
def fcn(export_model) -> Path:
    return export_model("fcn4", **SHORT_FCN)


@pytest.mark.skipif(
    shutil.which("ffmpeg") is None or shutil.which("sox") is None, reason="needs ffmpeg and sox"
)
def test_ffmpeg_over_zmq_gives_tags_every_hop_with_every_field(fcn, tmp_path):
    wav, mp3 = tmp_path / "station.wav", tmp_path / "station.mp3"
    subprocess.run(
        [
            "sox",
            "-n",
            "-r",
            "44100",
            "-c",
            "2",
            str(wav),
            "synth",
            "3.5",
            "pluck",
            "C3",
            "pluck",
            "G3",
            "tremolo",
            "6",
            "60",
        ],
        check=True,
    )
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav), "-b:a", "128k", str(mp3)], check=True)
    with socket_port() as port:
        url = f"zmq+raw://127.0.0.1:{port}?format=s16le&rate=44100&channels=2&stream=radio1"
    config = make_config(fcn, [url], tagger={"on_after": 1})
    with serving(config) as server:
        assert scrape(server, "/healthz")[0] == 200
        listener = Listener(server)
        # tagd's SUB is already connecting: it joins ffmpeg's PUB within its first milliseconds
        ffmpeg = subprocess.Popen(
            [
                "ffmpeg",
                "-v",
                "error",
                "-re",
                "-i",
                str(mp3),
                "-f",
                "s16le",
                "-ar",
                "44100",
                "-ac",
                "2",
                f"zmq:tcp://127.0.0.1:{port}",
            ]
        )
        assert ffmpeg.wait(timeout=20) == 0
        listener.collect(until_quiet=1.0)
        status, metrics_text = scrape(server)
        listener.close()
        card = server.engine.card

    tags = listener.on("tags.radio1")
    assert len(tags) >= 5  # 3.5 s of audio, a 1.98 s window, a 0.25 s hop
    first = tags[0]
    assert set(first) >= REQUIRED_FIELDS
    assert (first["schema"], first["stream"], first["model"]) == (1, "radio1", card.name)
    assert set(first["latency_ms"]) == {"ingest", "queue", "inference", "total"}
    window_s = card.window_samples / card.sample_rate
    for message in tags:
        assert set(message["scores"]) == set(card.tags)
        assert all(0.0 <= s <= 1.0 for s in message["scores"].values())
        thresholds = dict(zip(card.tags, card.thresholds, strict=True))
        over = sorted(
            (t for t, s in message["scores"].items() if s >= thresholds[t]),
            key=lambda t: -message["scores"][t],
        )
        assert message["tags"] == over
        assert message["window"]["end_s"] - message["window"]["start_s"] == pytest.approx(
            window_s, abs=1e-5
        )
        assert message["captured_at"] <= message["published_at"]
        total = message["latency_ms"]["total"]
        assert total == pytest.approx(
            (message["published_at"] - message["captured_at"]) * 1000, abs=5
        )
        parts = [message["latency_ms"][k] for k in ("ingest", "queue", "inference")]
        assert min(parts) >= 0 and total >= sum(parts) - 0.01  # the rest: tagging, publishing
    # one message per hop: consecutive windows, start times a hop apart, sent a hop apart
    assert [m["seq"] for m in tags] == list(range(tags[0]["seq"], tags[0]["seq"] + len(tags)))
    starts = [m["window"]["start_s"] for m in tags]
    np.testing.assert_allclose(np.diff(starts), HOP_S, atol=1e-5)
    spacing = np.median(np.diff([m["captured_at"] for m in tags]))
    assert 0.15 < spacing < 0.4

    assert status == 200
    assert metric_value(metrics_text, "tagd_end_to_end_latency_seconds_count") == len(tags)
    assert metric_value(metrics_text, "tagd_ingest_delay_seconds_count") == len(tags)
    assert 'tagd_end_to_end_latency_seconds_bucket{le="0.001"}' in metrics_text
    assert 'tagd_end_to_end_latency_seconds_bucket{le="30.0"}' in metrics_text
    assert metric_value(metrics_text, 'tagd_windows_published_total{stream="radio1"}') == len(tags)
    assert metric_value(metrics_text, 'tagd_audio_received_seconds_total{stream="radio1"}') > 3.0
    assert 'backend="onnxruntime"' in metrics_text and f'model="{card.name}"' in metrics_text
    # on_after=1: every tag over its threshold in the first prediction turns on with it
    events = listener.on("events.radio1")
    for event in events:
        assert {
            "schema",
            "stream",
            "seq",
            "model",
            "tag",
            "state",
            "score",
            "threshold",
            "window",
            "published_at",
        } <= set(event)
    turned_on = {e["tag"] for e in events if e["seq"] == first["seq"] and e["state"] == "on"}
    assert turned_on == set(first["tags"])


@pytest.mark.parametrize("instances", [1, 2])
def test_two_streams_from_the_example_producer_are_told_apart(fcn, tmp_path, instances):
    # with two engine instances the streams' windows run side by side: same scores; ONNX
    # Runtime's instances run on one loaded model (its sessions take concurrent runs)
    rate = 22_050
    audio = {"radio1": make_music(2.6, rate, seed=1), "radio2": make_music(2.6, rate, seed=2) * 0.3}
    for name, samples in audio.items():
        soundfile.write(tmp_path / f"{name}.wav", samples, rate, subtype="PCM_16")
    with socket_port() as port:  # windows compared by seq: keep the grids where they start
        config = make_config(
            fcn,
            [f"zmq+pull://127.0.0.1:{port}"],
            batching={"spread_phases": False, "instances": instances},
        )
    with serving(config) as server:
        assert len(server.engines) == instances
        assert len(set(server.engines)) == 1
        listener = Listener(server, "tags.")
        producer = subprocess.run(
            [
                sys.executable,
                str(REPO / "examples" / "producer.py"),
                f"tcp://127.0.0.1:{port}",
                *(f"{name}={tmp_path / name}.wav" for name in audio),
            ],
            timeout=30,
            check=False,
            capture_output=True,
            text=True,
        )
        assert producer.returncode == 0, producer.stderr
        listener.collect(until_quiet=1.0)
        listener.close()
        engine, geometry = server.engine, server.hub.geometry

    for name in audio:
        published = {m["seq"]: m for m in listener.on(f"tags.{name}")}
        decoded, _ = soundfile.read(
            tmp_path / f"{name}.wav", dtype="<i2"
        )  # what the producer sends
        reference = reference_windows(decoded.tobytes(), rate, 1, geometry)
        assert len(published) >= 2 and set(published) <= {w.seq for w in reference}
        expected = engine.run(np.stack([reference[seq].samples for seq in sorted(published)]))
        for row, seq in enumerate(sorted(published)):
            got = [published[seq]["scores"][tag] for tag in engine.card.tags]
            np.testing.assert_allclose(got, expected[row], atol=1e-6)
    first = {name: listener.on(f"tags.{name}")[0]["scores"] for name in audio}
    assert first["radio1"] != first["radio2"]


def test_the_same_audio_in_any_message_size_gives_the_same_scores(fcn):
    rate = 44_100
    stereo = np.stack([make_music(4.0, rate, seed=7), make_music(4.0, rate, seed=8)], axis=1)
    payload = s16le(stereo)
    # whole frames (the protocol's rule) in sizes that fit neither the hop nor each other
    sizes = {"c4608": 4608, "c1684": 1684, "c332": 332, "c65536": 65536}
    with socket_port() as port:
        config = make_config(
            fcn, [f"zmq+pull://127.0.0.1:{port}"], batching={"max_pending_per_stream": 1000}
        )
    with serving(config) as server:
        listener = Listener(server, "tags.")
        send_chunked(
            f"tcp://127.0.0.1:{port}", {name: (payload, size) for name, size in sizes.items()}, rate
        )
        listener.collect(until_quiet=1.0)
        listener.close()
    by_stream = {name: {m["seq"]: m for m in listener.on(f"tags.{name}")} for name in sizes}
    counts = {name: len(messages) for name, messages in by_stream.items()}
    assert min(counts.values()) >= 7, counts  # (4.0 - 1.98) / 0.25 + 1 windows each
    common = set.intersection(*(set(messages) for messages in by_stream.values()))
    assert len(common) >= min(counts.values()) - 1
    for seq in common:
        scores = [by_stream[name][seq]["scores"] for name in sizes]
        windows = [by_stream[name][seq]["window"] for name in sizes]
        assert all(s == scores[0] for s in scores), seq  # identical windows → identical scores
        assert all(w == windows[0] for w in windows)


def test_sample_level_predictions_are_the_mean_over_the_clip(export_model):
    path = export_model("samplecnn", **SHORT_SAMPLECNN)
    engine = load_engine(path)
    card = engine.card
    assert card.windows_per_clip == 5
    rate = card.sample_rate
    audio = np.stack([make_music(1.0, rate, seed=3)] * 2, axis=1)
    with socket_port() as port:
        config = make_config(
            path, [f"zmq+pull://127.0.0.1:{port}"], batching={"max_pending_per_stream": 1000}
        )
    config.hop_seconds = None  # the card's: one segment, no overlap
    with serving(config) as server:
        listener = Listener(server, "tags.")
        send_chunked(f"tcp://127.0.0.1:{port}", {"seg": (s16le(audio), 3000)}, rate)
        listener.collect(until_quiet=1.0)
        listener.close()
        geometry = server.hub.geometry
    messages = listener.on("tags.seg")
    reference = reference_windows(s16le(audio), rate, 2, geometry)
    segment_scores = engine.run(np.stack([w.samples for w in reference]))
    assert [m["window"]["segments"] for m in messages[:7]] == [1, 2, 3, 4, 5, 5, 5]
    for message in messages:
        seq = message["seq"]
        first = max(0, seq - card.windows_per_clip + 1)
        expected = segment_scores[first : seq + 1].mean(axis=0)
        got = [message["scores"][tag] for tag in card.tags]
        np.testing.assert_allclose(got, expected, atol=2e-6)
        assert message["window"]["start_s"] == pytest.approx(
            reference[first].start / rate, abs=1e-6
        )
        assert message["window"]["end_s"] == pytest.approx(reference[seq].end / rate, abs=1e-6)


def test_a_silent_stream_goes_idle_instead_of_being_fed_zeros(fcn):
    rate = 16_000
    chunk = s16le(np.stack([make_music(2.5, rate, seed=4)] * 2, axis=1))
    with socket_port() as port:
        config = make_config(
            fcn,
            [f"zmq+pull://127.0.0.1:{port}"],
            limits={"idle_after_s": 0.4},
            batching={"max_pending_per_stream": 100},
        )
    with serving(config) as server:
        listener = Listener(server, "tags.")
        send_chunked(f"tcp://127.0.0.1:{port}", {"quiet": (chunk, 4000)}, rate)
        listener.collect(until_quiet=1.0)
        before = len(listener.messages)
        _, text = scrape(server)
        assert metric_value(text, "tagd_active_streams") == 0
        assert metric_value(text, "tagd_streams") == 1
        listener.collect(until_quiet=0.5)
        assert len(listener.messages) == before  # nothing published while silent
        send_chunked(f"tcp://127.0.0.1:{port}", {"quiet": (chunk, 4000)}, rate)
        listener.collect(until_quiet=1.0)
        _, text = scrape(server)
        listener.close()
    resumed = listener.messages[before:]
    assert resumed, "no tags after the stream came back"
    last_before = listener.messages[before - 1][1]
    assert resumed[0][1]["window"]["start_s"] >= last_before["window"]["end_s"]  # a fresh window
    assert metric_value(text, 'tagd_stream_gaps_total{stream="quiet"}') == 1


def test_falling_behind_drops_oldest_windows_counted_and_latency_stays_bounded(fcn, tmp_path):
    path = tmp_path / "long.wav"
    soundfile.write(path, make_music(20.0, 12_000, seed=9), 12_000, subtype="PCM_16")
    # 20 s fed as fast as the disk goes with a 10 ms hop: ~1,800 windows in well under a second
    config = make_config(
        fcn,
        [f"file://{path}?realtime=0&stream=flood"],
        batching={"max_batch": 2, "max_pending_per_stream": 2},
    )
    config.hop_seconds = 0.01
    with serving(config) as server:
        listener = Listener(server, "tags.")
        listener.collect(until_quiet=1.0)
        _, text = scrape(server)
        emitted = server.hub.get("flood").windows_emitted
        listener.close()
    published = metric_value(text, 'tagd_windows_published_total{stream="flood"}')
    dropped = metric_value(text, 'tagd_windows_dropped_total{reason="queue_full",stream="flood"}')
    assert dropped > 0
    assert published + dropped == emitted
    # messages missed on the way to this late subscriber aside, seq gaps show the drops
    seqs = [m["seq"] for _, m in listener.messages]
    assert seqs == sorted(seqs) and len(set(np.diff(seqs))) > 1
    assert max(m["latency_ms"]["queue"] for _, m in listener.messages) < 1000


def test_healthz_is_ready_only_while_serving(fcn):
    config = make_config(fcn, ["zmq+pull://127.0.0.1:0"])
    server = Server(config, Metrics())
    server.start()
    status, body = scrape(server, "/healthz")
    assert (status, body) == (200, "ok\n")
    assert scrape(server, "/nothing")[0] == 404
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_address[1]}/healthz", timeout=1)


def test_ports_in_use_and_bad_engines_fail_start_with_one_line(fcn, tmp_path):
    with socket_port() as port:
        squatter = zmq.Context.instance().socket(zmq.PUB)
        squatter.bind(f"tcp://127.0.0.1:{port}")
        try:
            config = make_config(fcn, ["zmq+pull://127.0.0.1:0"])
            config.publish.address = f"tcp://127.0.0.1:{port}"
            with pytest.raises(
                StartupError,
                match=f"cannot publish on tcp://127.0.0.1:{port}: Address already in use",
            ):
                Server(config, Metrics()).start()
            config = make_config(fcn, [f"zmq+pull://127.0.0.1:{port}"])
            with pytest.raises(StartupError, match="cannot bind .*Address already in use"):
                Server(config, Metrics()).start()
        finally:
            squatter.close(linger=0)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(StartupError, match="cannot load the engine") as caught:
        Server(make_config(broken, ["zmq+pull://127.0.0.1:0"]), Metrics()).start()
    assert "\n" not in str(caught.value)
