"""What an operator sees of a faulty input: a mis-declared format, a short idle episode.

Streams are fed with arrival times chosen by the test (no sleeping), as a producer
would deliver them; what is asserted is the log line and the metric an alert reads.
tests/test_deploy.py's feeds and tests/test_liquidsoap.py run the same code for real.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from audio_fixtures import make_music

from tagd.metrics import Metrics
from tagd.stream import MISDECLARED_AFTER_S, Arrival, Stream, StreamGeometry, StreamHub

GEOMETRY = StreamGeometry(sample_rate=12_000, window_samples=6_000, hop_samples=1_500)
RATE, CHANNELS = 44_100, 2
MESSAGE_S = 0.1  # one message every 100 ms of wall time


def station(seconds: float, pcm_format: str) -> bytes:
    """Stereo music as ffmpeg sends it with ``-f FORMAT``."""
    mono = make_music(seconds, RATE)
    frames = np.stack([mono, mono], axis=1) * 0.8
    if pcm_format == "s16le":
        return (frames * 32767).astype("<i2").tobytes()
    return frames.astype("<f4").tobytes()


def send_live(
    stream: Stream, sent_as: str, declared: str, seconds: float, t0: float = 0.0
) -> float:
    """Send ``seconds`` of audio encoded ``sent_as`` in real time, declared ``declared``;
    returns the wall time at the end."""
    payload = station(seconds, sent_as)
    per_message = len(payload) // round(seconds / MESSAGE_S)
    now = t0
    for offset in range(0, len(payload), per_message):
        now += MESSAGE_S
        stream.push_pcm(
            payload[offset : offset + per_message],
            declared,
            RATE,
            CHANNELS,
            Arrival(1e9 + now, now),
        )
    return now


def misdeclared(metrics: Metrics, stream: str = "radio1") -> float | None:
    return metrics.sample("tagd_stream_misdeclared", {"stream": stream})


@pytest.mark.parametrize(
    ("sent_as", "declared", "diagnosis"),
    [
        (
            "f32le",
            "s16le",
            "audio arrives at 2.00x real time for 6 s: declared s16le, 44100 Hz, "
            "2 channel(s); the data looks like f32le or s32le?",
        ),
        ("s16le", "f32le", "declared f32le, 44100 Hz, 2 channel(s); the data looks like s16le?"),
    ],
    ids=["f32le-declared-s16le", "s16le-declared-f32le"],
)
def test_a_misdeclared_format_is_named_in_one_warning_and_a_metric(
    sent_as, declared, diagnosis, caplog
):
    caplog.set_level(logging.INFO, logger="tagd.stream")
    metrics = Metrics()
    stream = Stream("radio1", GEOMETRY, lambda window: None, metrics)
    now = send_live(stream, sent_as, declared, MISDECLARED_AFTER_S / 2)
    assert misdeclared(metrics) == 0  # not yet: a catch-up burst lasts about this long
    send_live(stream, sent_as, declared, 2 * MISDECLARED_AFTER_S, t0=now)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # once, not every measurement
    assert warnings[0].startswith("stream radio1: ") and diagnosis in warnings[0]
    assert misdeclared(metrics) == 1


def test_a_well_declared_stream_raises_nothing_and_a_fixed_one_clears(caplog):
    metrics = Metrics()
    good = Stream("radio1", GEOMETRY, lambda window: None, metrics)
    send_live(good, "s16le", "s16le", 2 * MISDECLARED_AFTER_S)
    assert misdeclared(metrics) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    fixed = Stream("radio2", GEOMETRY, lambda window: None, metrics)
    now = send_live(fixed, "f32le", "s16le", 2 * MISDECLARED_AFTER_S)
    assert misdeclared(metrics, "radio2") == 1
    # The producer is restarted with -f s16le: same declaration, audio at real time again.
    send_live(fixed, "s16le", "s16le", MISDECLARED_AFTER_S, t0=now)
    assert misdeclared(metrics, "radio2") == 0


def test_a_burst_faster_than_real_time_is_not_taken_for_a_wrong_format(caplog):
    metrics = Metrics()
    stream = Stream("radio1", GEOMETRY, lambda window: None, metrics)
    payload = station(4 * MISDECLARED_AFTER_S, "s16le")  # catching up at 4x for 6 s
    per_message = len(payload) // round(4 * MISDECLARED_AFTER_S / MESSAGE_S)
    for index, offset in enumerate(range(0, len(payload), per_message)):
        now = (index + 1) * MESSAGE_S / 4
        stream.push_pcm(
            payload[offset : offset + per_message], "s16le", RATE, CHANNELS, Arrival(1e9 + now, now)
        )
    assert misdeclared(metrics) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- idle episodes ---------------------------------------------------------------------------

IDLE_AFTER_S = 5.0
SWEEP_S = 0.25  # the daemon's sweep interval


def idle_episodes(metrics: Metrics) -> float:
    return metrics.sample("tagd_stream_idle_episodes_total", {"stream": "radio1"}) or 0.0


@pytest.mark.parametrize("swept_while_idle", [True, False], ids=["sweep-saw-it", "sweep-missed-it"])
@pytest.mark.parametrize("silence_s", [IDLE_AFTER_S - 0.1, IDLE_AFTER_S + 0.1])
def test_a_producer_restart_near_idle_after_s_is_counted_the_same_whether_a_sweep_saw_it(
    silence_s, swept_while_idle
):
    metrics = Metrics()
    hub = StreamHub(
        GEOMETRY,
        lambda window: None,
        metrics,
        max_streams=4,
        idle_after_s=IDLE_AFTER_S,
        evict_after_s=600,
    )
    stream = hub.open("radio1", "input", pinned=True)
    now = send_live(stream, "s16le", "s16le", 3.0)
    hub.sweep(now)
    gaps = metrics.sample("tagd_stream_gaps_total", {"stream": "radio1"}) or 0.0
    if swept_while_idle:  # a sweep lands inside the silence, after idle_after_s if it lasts
        hub.sweep(now + silence_s - SWEEP_S / 10)
    send_live(stream, "s16le", "s16le", 1.0, t0=now + silence_s - MESSAGE_S)
    hub.sweep(now + silence_s + 1.0)

    went_idle = silence_s >= IDLE_AFTER_S
    assert idle_episodes(metrics) == (1 if went_idle else 0)
    assert (metrics.sample("tagd_stream_gaps_total", {"stream": "radio1"}) or 0.0) - gaps == (
        1 if went_idle else 0
    )
