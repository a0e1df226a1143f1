"""Per-stream pipelines: chunking invariance, idle handling, gaps, the stream hub."""

from __future__ import annotations

import numpy as np
import pytest
from audio_fixtures import make_music

import tagd.stream as stream_module
from tagd.audio import StreamResampler, resample
from tagd.metrics import (
    MALFORMED_OUT_OF_ORDER,
    MALFORMED_STREAM_TAKEN,
    MALFORMED_TOO_MANY_STREAMS,
    Metrics,
)
from tagd.phases import largest_gap_middle
from tagd.stream import (
    Arrival,
    ReadyWindow,
    Stream,
    StreamGeometry,
    StreamHub,
    StreamRefused,
)

GEOMETRY = StreamGeometry(sample_rate=12_000, window_samples=6_000, hop_samples=1_500)
SOURCE_RATE = 44_100


def stereo_s16le(seconds: float, seed: int = 0) -> bytes:
    left = make_music(seconds, SOURCE_RATE, seed=seed)
    right = make_music(seconds, SOURCE_RATE, seed=seed + 1)
    frames = np.stack([left, right], axis=1)
    return (frames * 32767).astype("<i2").tobytes()


def collect(stream_name: str = "s", **stream_kwargs) -> tuple[Stream, list[ReadyWindow], Metrics]:
    windows: list[ReadyWindow] = []
    metrics = Metrics()
    return Stream(stream_name, GEOMETRY, windows.append, metrics, **stream_kwargs), windows, metrics


def feed(stream: Stream, payload: bytes, sizes: list[int], t0: float = 0.0) -> None:
    position, index = 0, 0
    while position < len(payload):
        size = sizes[index % len(sizes)]
        stream.push_pcm(
            payload[position : position + size], "s16le", SOURCE_RATE, 2, Arrival(t0, t0)
        )
        position += size
        index += 1


# Message sizes seen from ffmpeg (4,608 and 1,684 bytes), odd sizes that split frames and
# samples, single bytes, and the whole stream at once.
CHUNKINGS = [[4608], [1684, 4608], [1], [3, 1001, 7], [10**9]]


@pytest.mark.parametrize("sizes", CHUNKINGS, ids=lambda sizes: "+".join(map(str, sizes[:3])))
def test_any_message_size_gives_identical_windows(sizes):
    payload = stereo_s16le(1.5) if sizes == [1] else stereo_s16le(3.0)
    reference, ref_windows, _ = collect()
    feed(reference, payload, [4608])
    stream, windows, _ = collect()
    feed(stream, payload, sizes)
    count = min(len(windows), len(ref_windows))
    assert (
        count >= 1 and abs(len(windows) - len(ref_windows)) <= 1
    )  # soxr may hold back a few samples
    for got, want in zip(windows[:count], ref_windows[:count], strict=True):
        assert (got.start, got.seq) == (want.start, want.seq)
        np.testing.assert_array_equal(got.samples, want.samples)


def test_input_held_for_the_resampler_changes_no_window_nor_the_message_completing_it(
    monkeypatch,
):
    # Input waits for the resampler while the next window is far off (RESAMPLE_BLOCK_S);
    # nothing of it may show: the same windows, completed by the same messages, with the
    # same positions and capture times, across a long seq gap and an idle release.
    geometry = StreamGeometry(sample_rate=12_000, window_samples=24_000, hop_samples=12_000)
    # each part ends mid-hop, with input held when the stream restarts
    parts = [stereo_s16le(7.4), stereo_s16le(4.3, seed=5), stereo_s16le(3.5, seed=9)]
    message = 4608  # ffmpeg's 26 ms

    def run(block_s: float) -> tuple[list[int], list[tuple], int]:
        monkeypatch.setattr(stream_module, "RESAMPLE_BLOCK_S", block_s)
        calls = []
        process = StreamResampler.process
        monkeypatch.setattr(
            StreamResampler, "process", lambda r, x, last=False: calls.append(1) or process(r, x)
        )
        windows: list[ReadyWindow] = []
        stream = Stream(
            "s", geometry, windows.append, Metrics(), idle_after_s=5.0, max_spliced_gap_s=1.0
        )
        completed, seq, t = [], 0, 0.0
        for part, (seq_jump, silence_s) in zip(
            parts, [(0, 0.0), (100, 0.0), (0, 20.0)], strict=True
        ):
            seq, t = seq + seq_jump, t + silence_s
            if silence_s:
                assert stream.release_idle_buffers(t)  # idle: its ring freed meanwhile
            for start in range(0, len(part), message):
                t += 0.026
                arrival = Arrival(1000 + t, t)
                completed.append(
                    stream.push_pcm(
                        part[start : start + message], "s16le", SOURCE_RATE, 2, arrival, seq
                    )
                )
                seq += 1
        epochs = list(dict.fromkeys(w.epoch for w in windows))
        found = [
            (w.seq, epochs.index(w.epoch), w.start, w.captured, w.samples.tobytes())
            for w in windows
        ]
        return completed, found, len(calls)

    held_completed, held_windows, held_calls = run(stream_module.RESAMPLE_BLOCK_S)
    completed, windows, calls = run(0.0)  # nothing held: a resampler call per message
    assert held_calls < calls / 2  # input was held (for 3/4 of each hop here)
    assert len({w[1] for w in windows}) == 3  # three epochs: the gap and the silence restart
    assert held_completed == completed
    assert held_windows == windows


def test_windows_hold_the_downmixed_resampled_audio_every_hop():
    payload = stereo_s16le(3.0)
    stream, windows, metrics = collect()
    feed(stream, payload, [4608])
    assert [w.start for w in windows] == [i * GEOMETRY.hop_samples for i in range(len(windows))]
    assert [w.seq for w in windows] == list(range(len(windows)))
    frames = np.frombuffer(payload, dtype="<i2").reshape(-1, 2).astype(np.float32) / 32768
    offline = resample(frames.mean(axis=1), SOURCE_RATE, GEOMETRY.sample_rate)
    for window in windows[:3]:
        # streaming and one-shot soxr differ only at the edges; the mid-stream audio agrees
        np.testing.assert_allclose(
            window.samples[1000:-1000], offline[window.start + 1000 : window.end - 1000], atol=1e-3
        )
    assert metrics.sample("tagd_audio_received_seconds_total", {"stream": "s"}) == pytest.approx(
        3.0, abs=1e-3
    )


def test_a_window_records_when_its_last_sample_arrived_not_when_soxr_released_it():
    stream, windows, _ = collect()
    frames = 1152  # ffmpeg's zmq output: 26 ms messages
    payload = stereo_s16le(3.0)
    completed_by: list[int] = []  # for each window, the message that completed it
    for index, start in enumerate(range(0, len(payload), frames * 4)):
        emitted = stream.push_pcm(
            payload[start : start + frames * 4],
            "s16le",
            SOURCE_RATE,
            2,
            Arrival(1000.0 + index, float(index)),
        )
        completed_by += [index] * emitted
    assert len(windows) >= 5
    for window, completing in zip(windows, completed_by, strict=True):
        last_sample = window.end - 1  # at 12 kHz; the source frame at the same time:
        carrying = (last_sample * SOURCE_RATE // GEOMETRY.sample_rate) // frames
        assert window.captured == Arrival(1000.0 + carrying, float(carrying))
        assert carrying <= completing
    # soxr HQ at 12 kHz releases ~76 ms blocks: windows complete messages after their end
    held_back = [int(w.captured.mono) < c for w, c in zip(windows, completed_by, strict=True)]
    assert any(held_back)


def test_capture_times_follow_the_stream_across_a_restart():
    stream, windows, _ = collect(idle_after_s=1.0)
    stream.push_pcm(stereo_s16le(1.0), "s16le", SOURCE_RATE, 2, Arrival(0.0, 0.0))
    first_epoch = len(windows)
    # after 5 s of nothing the window fills afresh: stream time goes on, soxr starts over
    seconds = 0.1
    payload = stereo_s16le(1.0, seed=3)
    step = int(SOURCE_RATE * seconds) * 4
    for index, start in enumerate(range(0, len(payload), step)):
        stream.push_pcm(
            payload[start : start + step],
            "s16le",
            SOURCE_RATE,
            2,
            Arrival(100.0 + index, 5.0 + index * seconds),
        )
    again = windows[first_epoch:]
    assert len(again) >= 2 and again[0].epoch != windows[0].epoch
    restart = again[0].end - GEOMETRY.window_samples  # the new epoch's first sample
    assert restart >= windows[first_epoch - 1].end
    for window in again:
        seconds_in = (window.end - 1 - restart) / GEOMETRY.sample_rate
        assert window.captured.unix == 100.0 + int(seconds_in / seconds)


@pytest.mark.parametrize("size", [1764, 4, 8029], ids=["10ms", "one-frame", "split-frames"])
def test_capture_times_hold_for_messages_of_any_size(size):
    stream, windows, _ = collect()
    payload = stereo_s16le(1.0)
    arrivals, frames_after = [], []  # per message: its arrival, whole frames received
    for index, start in enumerate(range(0, len(payload), size)):
        arrivals.append(Arrival(100.0 + index, index * 0.001))
        frames_after.append(min(start + size, len(payload)) // 4)  # s16le stereo: 4 bytes
        stream.push_pcm(payload[start : start + size], "s16le", SOURCE_RATE, 2, arrivals[-1])
    assert len(windows) >= 3
    for window in windows:
        last_frame = (window.end - 1) * SOURCE_RATE // GEOMETRY.sample_rate
        carrying = np.searchsorted(frames_after, last_frame, side="right")  # first with it
        assert window.captured == arrivals[carrying]


def test_a_silent_stream_is_not_fed_zeros_and_restarts_when_data_resumes():
    stream, windows, metrics = collect(idle_after_s=1.0)
    payload = stereo_s16le(1.0)
    stream.push_pcm(payload, "s16le", SOURCE_RATE, 2, Arrival(0.0, 0.0))
    first_epoch, emitted = stream.epoch, len(windows)
    assert emitted >= 1
    # data again after 5 s of nothing: no window spans the silence, stream time does not
    # jump (it counts audio received), and the gap is counted
    stream.push_pcm(payload, "s16le", SOURCE_RATE, 2, Arrival(5.0, 5.0))
    resumed = windows[emitted:]
    assert stream.epoch != first_epoch
    assert all(w.epoch == stream.epoch for w in resumed)
    assert resumed[0].start >= windows[emitted - 1].end  # a fresh window had to fill
    assert metrics.sample("tagd_stream_gaps_total", {"stream": "s"}) == 1


def test_sequence_gaps_are_counted_but_do_not_restart_the_window():
    stream, windows, metrics = collect()
    chunk = stereo_s16le(0.2)
    stream.push_pcm(chunk, "s16le", SOURCE_RATE, 2, Arrival(0.0, 0.0), seq=0)
    epoch = stream.epoch
    for seq in (1, 2, 5, 6):
        stream.push_pcm(chunk, "s16le", SOURCE_RATE, 2, Arrival(0.0, 0.0), seq=seq)
    assert metrics.sample("tagd_stream_gaps_total", {"stream": "s"}) == 1
    assert stream.epoch == epoch
    assert windows and windows[0].start == 0  # 1 s received in all: the window kept filling


def test_repeats_and_late_messages_are_refused_before_touching_the_stream():
    stream, windows, metrics = collect()
    chunks = [stereo_s16le(0.2, seed=i) for i in range(6)]
    for seq in (0, 1, 2, 3):
        stream.push_pcm(chunks[seq], "s16le", SOURCE_RATE, 2, Arrival(0.0, 0.0), seq=seq)
    for seq in (3, 1):  # a repeat, then a message overtaken by later ones
        with pytest.raises(StreamRefused) as refused:
            stream.push_pcm(chunks[seq], "s16le", SOURCE_RATE, 2, Arrival(0.0, 0.0), seq=seq)
        assert refused.value.reason == MALFORMED_OUT_OF_ORDER
    stream.push_pcm(chunks[4], "s16le", SOURCE_RATE, 2, Arrival(0.0, 0.0), seq=4)
    # the stream saw 0..4 in order: the same windows as the audio in one piece
    reference, ref_windows, _ = collect()
    reference.push_pcm(b"".join(chunks[:5]), "s16le", SOURCE_RATE, 2, Arrival(0.0, 0.0))
    assert [w.start for w in windows] == [w.start for w in ref_windows]
    for got, want in zip(windows, ref_windows, strict=True):
        np.testing.assert_array_equal(got.samples, want.samples)
    assert metrics.sample("tagd_audio_received_seconds_total", {"stream": "s"}) == pytest.approx(
        1.0
    )
    assert metrics.sample("tagd_stream_gaps_total", {"stream": "s"}) is None


def test_seq_from_0_again_is_a_producer_restart_spliced_like_a_short_silence():
    stream, windows, metrics = collect(idle_after_s=5.0)
    for seq in range(5):
        stream.push_pcm(
            stereo_s16le(0.2, seed=seq), "s16le", SOURCE_RATE, 2, Arrival(0.0, 0.0), seq=seq
        )
    epoch, emitted = stream.epoch, len(windows)
    stream.push_pcm(stereo_s16le(0.2, seed=9), "s16le", SOURCE_RATE, 2, Arrival(1.0, 1.0), seq=0)
    assert stream.epoch == epoch  # not refused as a repeat, and the window goes on
    assert len(windows) > emitted  # within a hop of the new data: 0.2 s > the 0.125 s hop
    assert metrics.sample("tagd_stream_gaps_total", {"stream": "s"}) == 1


@pytest.mark.parametrize(("missing", "restarts"), [(2, False), (12, True)])
def test_a_seq_jump_is_spliced_when_short_and_restarts_the_window_when_long(missing, restarts):
    stream, windows, metrics = collect(max_spliced_gap_s=2.0)
    chunk = stereo_s16le(0.2)
    stream.push_pcm(chunk, "s16le", SOURCE_RATE, 2, Arrival(0.0, 0.0), seq=0)
    stream.push_pcm(chunk, "s16le", SOURCE_RATE, 2, Arrival(0.0, 0.0), seq=1)
    epoch = stream.epoch
    # 2 messages of 0.2 s lost is 0.4 s; 12 of them, 2.4 s: over max_spliced_gap_s
    stream.push_pcm(chunk, "s16le", SOURCE_RATE, 2, Arrival(0.0, 0.0), seq=2 + missing)
    assert (stream.epoch != epoch) == restarts
    assert metrics.sample("tagd_stream_gaps_total", {"stream": "s"}) == 1


def test_nan_inf_and_out_of_range_float_samples_are_cleaned_and_counted():
    samples = make_music(1.0, SOURCE_RATE, seed=3)
    dirty = samples.copy()
    dirty[[10, 2000]] = np.nan
    dirty[[500]] = np.inf
    dirty[[501]] = -np.inf
    dirty[[7000, 7001, 9000]] = [3.0, -7.5, 1.0001]
    clean = samples.copy()
    clean[[10, 2000]] = 0.0
    clean[[500, 501]] = [1.0, -1.0]
    clean[[7000, 7001, 9000]] = [1.0, -1.0, 1.0]
    stream, windows, metrics = collect()
    stream.push_pcm(dirty.astype("<f4").tobytes(), "f32le", SOURCE_RATE, 1, Arrival(0.0, 0.0))
    reference, want, _ = collect()
    reference.push_pcm(clean.astype("<f4").tobytes(), "f32le", SOURCE_RATE, 1, Arrival(0.0, 0.0))
    assert windows and len(windows) == len(want)
    for got, expected in zip(windows, want, strict=True):
        assert np.all(np.isfinite(got.samples))
        np.testing.assert_array_equal(got.samples, expected.samples)
    cleaned = {
        k: metrics.sample("tagd_samples_cleaned_total", {"stream": "s", "kind": k})
        for k in ("nonfinite", "out_of_range")
    }
    assert cleaned == {"nonfinite": 4, "out_of_range": 3}


def test_a_change_of_format_restarts_the_stream():
    stream, windows, _ = collect()
    stream.push_pcm(stereo_s16le(0.4), "s16le", SOURCE_RATE, 2, Arrival(0, 0))
    epoch = stream.epoch
    mono_f32 = make_music(1.0, 48_000).astype("<f4").tobytes()
    stream.push_pcm(mono_f32, "f32le", 48_000, 1, Arrival(0, 0))
    assert stream.epoch != epoch
    assert windows and all(w.epoch == stream.epoch for w in windows)  # the 0.4 s was forgotten


def make_hub(**limits) -> tuple[StreamHub, Metrics]:
    metrics = Metrics()
    settings = {"max_streams": 2, "idle_after_s": 1.0, "evict_after_s": 10.0, **limits}
    return StreamHub(GEOMETRY, lambda window: None, metrics, **settings), metrics


def test_hub_enforces_ownership_and_the_stream_limit():
    hub, _ = make_hub()
    a = hub.open("a", "input-1")
    assert hub.open("a", "input-1") is a
    with pytest.raises(StreamRefused) as taken:
        hub.open("a", "input-2")
    assert taken.value.reason == MALFORMED_STREAM_TAKEN
    hub.open("b", "input-1")
    with pytest.raises(StreamRefused) as full:
        hub.open("c", "input-1")
    assert full.value.reason == MALFORMED_TOO_MANY_STREAMS


def test_a_full_hub_gives_the_longest_idle_dynamic_stream_s_place_to_a_new_one():
    evicted: list[str] = []
    hub, metrics = make_hub(max_streams=3, on_evict=evicted.append)
    pinned = hub.open("pinned", "cfg", pinned=True)
    old, older = hub.open("old", "multi"), hub.open("older", "multi")
    pinned.push_pcm(stereo_s16le(0.1), "s16le", SOURCE_RATE, 2, Arrival(0.0, 0.0))
    older.push_pcm(stereo_s16le(0.1), "s16le", SOURCE_RATE, 2, Arrival(0.0, 0.0))
    old.push_pcm(stereo_s16le(0.1), "s16le", SOURCE_RATE, 2, Arrival(0.5, 0.5))
    with pytest.raises(StreamRefused):  # every stream still live: a flood is refused
        hub.open("new1", "multi")
    hub.sweep(now_mono=3.0)  # all three idle now (idle_after_s = 1)
    assert metrics.sample("tagd_stream_idle", {"stream": "older"}) == 1
    assert metrics.sample("tagd_stream_last_audio_timestamp_seconds", {"stream": "old"}) == 0.5
    hub.open("new1", "multi")
    assert evicted == ["older"]  # silent the longest; the pinned one is never displaced
    assert sorted(hub.names()) == ["new1", "old", "pinned"]
    assert metrics.sample("tagd_stream_idle", {"stream": "older"}) is None
    hub.open("new2", "multi")
    assert evicted == ["older", "old"]
    with pytest.raises(StreamRefused):  # new1 and new2 have had no data: not idle
        hub.open("new3", "multi")


def test_sweep_marks_idle_streams_and_evicts_only_unpinned_ones():
    went_idle = []
    hub, metrics = make_hub(on_idle=went_idle.append)
    pinned, dynamic = hub.open("pinned", "cfg", pinned=True), hub.open("dyn", "multi")
    for stream in (pinned, dynamic):
        stream.push_pcm(stereo_s16le(0.1), "s16le", SOURCE_RATE, 2, Arrival(0.0, 0.0))
    assert hub.sweep(now_mono=0.5) == []
    assert metrics.sample("tagd_active_streams") == 2
    assert hub.sweep(now_mono=2.0) == []
    assert pinned.idle and dynamic.idle
    assert hub.sweep(now_mono=3.0) == []
    assert sorted(went_idle) == ["dyn", "pinned"]  # told once each: what drops their state
    assert metrics.sample("tagd_active_streams") == 0
    assert hub.sweep(now_mono=11.0) == ["dyn"]
    assert hub.names() == ["pinned"]
    assert metrics.sample("tagd_streams") == 1
    assert metrics.sample("tagd_audio_received_seconds_total", {"stream": "dyn"}) is None


SPREAD = StreamGeometry(sample_rate=12_000, window_samples=6_000, hop_samples=6_000)  # 0.5 s hop


def simulate(
    hub: StreamHub, streams: dict[str, float], seconds: float, message_s: float = 0.01
) -> None:
    """Feed streams on a simulated clock, each ``rate`` seconds of audio per second.

    The audio is at the model's rate, so the resampler passes it straight through and
    windows complete exactly when their last message arrives.
    """
    rate = SPREAD.sample_rate
    audio = {
        name: make_music(seconds * speed + 1, rate, seed=i)
        for i, (name, speed) in enumerate(streams.items())
    }
    sent = dict.fromkeys(streams, 0)
    for step in range(1, round(seconds / message_s) + 1):
        now = step * message_s
        for name, speed in streams.items():
            due = round(now * speed * rate)
            payload = (audio[name][sent[name] : due] * 32767).astype("<i2").tobytes()
            hub.open(name, "sim").push_pcm(payload, "s16le", rate, 1, Arrival(now, now))
            sent[name] = due
        if step % round(0.25 / message_s) == 0:
            hub.sweep(now_mono=now)


def spread_hub(windows: list[ReadyWindow]) -> StreamHub:
    return StreamHub(
        SPREAD,
        windows.append,
        Metrics(),
        max_streams=8,
        idle_after_s=5.0,
        evict_after_s=0,
        spread_phases=True,
    )


def test_live_streams_in_step_are_spread_over_the_hop():
    windows: list[ReadyWindow] = []
    simulate(
        spread_hub(windows), {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}, seconds=6.0
    )  # all in step
    hop_s = SPREAD.hop_samples / SPREAD.sample_rate
    phases = sorted({round(w.captured.mono % hop_s, 3) for w in windows if w.captured.mono > 4.5})
    assert len(phases) == 4  # one per stream: no two complete together any more
    gaps = np.diff(phases + [phases[0] + hop_s])
    np.testing.assert_allclose(gaps, hop_s / 4, atol=0.011)  # evenly spread, to a message
    for name in "abcd":  # each stream's windows still come one hop apart, after one move
        starts = [w.start for w in windows if w.stream == name]
        steps = {b - a for a, b in zip(starts, starts[1:], strict=False)}
        assert len(steps - {SPREAD.hop_samples}) <= 1


def test_streams_fed_faster_than_real_time_keep_their_grid():
    windows: list[ReadyWindow] = []
    simulate(spread_hub(windows), {"live": 1.0, "fast": 3.0}, seconds=4.0)
    fast = [w.start for w in windows if w.stream == "fast"]
    assert fast == [i * SPREAD.hop_samples for i in range(len(fast))]
    assert len(fast) >= 20


def test_largest_gap_middle():
    assert largest_gap_middle([0.5], 3.0) == 2.0
    assert largest_gap_middle([0.0, 1.5], 3.0) == 2.25
    assert largest_gap_middle([0.1, 2.9], 3.0) == 1.5
    assert largest_gap_middle([1.0, 1.0], 3.0) == 2.5
