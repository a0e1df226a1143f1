"""The file input: as fast as possible or paced in real time, through libsndfile or ffmpeg."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
import soundfile
import zmq
from audio_fixtures import make_music

from tagd.config import LimitsConfig, parse_input
from tagd.metrics import Metrics
from tagd.sources import SourceError, make_source
from tagd.stream import Arrival, ReadyWindow, Stream, StreamGeometry, StreamHub

GEOMETRY = StreamGeometry(sample_rate=8_000, window_samples=4_000, hop_samples=2_000)
RATE = 22_050


def run_file_source(url: str, timeout: float = 10.0) -> tuple[list[ReadyWindow], float, Metrics]:
    windows: list[ReadyWindow] = []
    metrics = Metrics()
    hub = StreamHub(
        GEOMETRY, windows.append, metrics, max_streams=2, idle_after_s=1.0, evict_after_s=0
    )
    source = make_source(parse_input(url), hub, metrics, zmq.Context.instance(), LimitsConfig())
    source.open()
    started = time.perf_counter()
    source.start()
    assert source.join(timeout), "the file input did not reach the end"
    return windows, time.perf_counter() - started, metrics


@pytest.fixture
def song(tmp_path) -> tuple[str, np.ndarray]:
    audio = np.stack([make_music(1.2, RATE, seed=1), make_music(1.2, RATE, seed=2)], axis=1)
    path = tmp_path / "song.flac"
    soundfile.write(path, audio, RATE, subtype="PCM_16")
    decoded, _ = soundfile.read(path, dtype="float32", always_2d=True)
    return str(path), decoded


def expected(frames: np.ndarray, rate: int) -> list[ReadyWindow]:
    windows: list[ReadyWindow] = []
    Stream("ref", GEOMETRY, windows.append, Metrics()).push_frames(frames, rate, Arrival(0, 0))
    return windows


def test_fast_file_input_gives_the_files_windows(song):
    path, frames = song
    windows, elapsed, metrics = run_file_source(f"file://{path}?realtime=0&chunk_ms=7")
    want = expected(frames, RATE)
    assert [w.start for w in windows] == [w.start for w in want] and windows
    for got, ref in zip(windows, want, strict=True):
        np.testing.assert_array_equal(got.samples, ref.samples)
    assert {w.stream for w in windows} == {"song"}  # named after the file
    assert elapsed < 1.0
    assert metrics.sample("tagd_audio_received_seconds_total", {"stream": "song"}) == pytest.approx(
        1.2
    )


def test_realtime_file_input_is_paced_like_live_audio(song):
    path, _ = song
    windows, elapsed, _ = run_file_source(f"file://{path}?stream=paced&chunk_ms=50")
    arrivals = [w.captured.mono for w in windows]
    assert 1.1 <= elapsed < 2.5  # 1.2 s of audio
    assert len(windows) == 3  # windows end at 0.5, 0.75, 1.0 s
    gaps = np.diff(arrivals)
    assert np.all((gaps > 0.15) & (gaps < 0.4))  # one hop (0.25 s) apart, as captured live


def test_formats_libsndfile_cannot_read_go_through_ffmpeg(tmp_path):
    path = tmp_path / "song.m4a"
    tone = tmp_path / "tone.wav"
    soundfile.write(tone, make_music(1.0, RATE), RATE)
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(tone), "-c:a", "aac", str(path)], check=True)
    windows, _, _ = run_file_source(f"file://{path}?realtime=0")
    assert len(windows) >= 2 and np.abs(windows[0].samples).max() > 0.05


def test_a_missing_file_fails_to_open_with_one_line(tmp_path):
    hub = StreamHub(
        GEOMETRY, lambda w: None, Metrics(), max_streams=1, idle_after_s=1.0, evict_after_s=0
    )
    spec = parse_input(f"file://{tmp_path}/nothing.wav")
    with pytest.raises(SourceError, match="no such file: .*nothing.wav"):
        make_source(spec, hub, Metrics(), zmq.Context.instance(), LimitsConfig()).open()


def test_looping_file_input_keeps_going_until_stopped(song):
    path, _ = song
    windows: list[ReadyWindow] = []
    enough = threading.Event()

    def sink(window: ReadyWindow) -> None:
        windows.append(window)
        if len(windows) >= 8:  # 1.2 s gives 3 windows: 8 need the third pass
            enough.set()

    hub = StreamHub(GEOMETRY, sink, Metrics(), max_streams=1, idle_after_s=1.0, evict_after_s=0)
    spec = parse_input(f"file://{path}?realtime=0&loop=1")
    source = make_source(spec, hub, Metrics(), zmq.Context.instance(), LimitsConfig())
    source.open()
    source.start()
    assert enough.wait(5)
    source.stop()
    assert source.join(1.0)


def drum_hits(seconds: float, rate: int, seed: int) -> np.ndarray:
    """Noise bursts four times a second over a quiet tone: mp3 frames that lean on the
    bit reservoir, where libsndfile's block reads go wrong."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    hits = np.zeros(len(t))
    for start in range(0, len(t), rate // 4):
        hits[start : start + rate // 20] = rng.uniform(
            -0.8, 0.8, len(hits[start : start + rate // 20])
        )
    return (hits + 0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
@pytest.mark.parametrize("channels", [1, 2])
def test_an_mp3_is_served_as_tagd_tag_decodes_it(tmp_path, channels):
    """mp3 goes through ffmpeg as the channels' mean, as decode_file does: libsndfile's
    block reads garble granules at some block boundaries (by up to 1.2 on this file in
    20 ms blocks). The windows equal those of a whole-file read, channels averaged."""
    wav, mp3 = tmp_path / "in.wav", tmp_path / "jingle.mp3"
    music = np.stack(
        [drum_hits(6.0, 16_000, seed=c) / (1 + 2 * c) for c in range(channels)], axis=1
    )
    soundfile.write(wav, music, 16_000)
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-i", str(wav), "-q:a", "4", str(mp3)], check=True
    )
    whole, rate = soundfile.read(mp3, dtype="float32", always_2d=True)  # no block boundaries
    windows, _, _ = run_file_source(f"file://{mp3}?realtime=0&chunk_ms=20")
    want = expected(whole.mean(axis=1), rate)
    assert [w.start for w in windows] == [w.start for w in want] and len(windows) >= 10
    for got, ref in zip(windows, want, strict=True):
        np.testing.assert_allclose(got.samples, ref.samples, atol=1e-4)
