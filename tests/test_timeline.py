"""Segments from the Tagger's hysteresis, and the formats a timeline is written in."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import subprocess

import numpy as np
import pytest
import soundfile

from tagd.arrivals import Arrival
from tagd.audio import AudioError, decode_blocks, decode_file
from tagd.card import ModelCard
from tagd.engines import load_engine
from tagd.incremental import choose_scorer
from tagd.scoring import INCREMENTAL, FullWindows
from tagd.stream import ReadyWindow
from tagd.tagfile import TooShortError, tag_file, timeline_file
from tagd.tagger import Tagger
from tagd.timeline import (
    FORMATS,
    Segment,
    Segmenter,
    clock,
    in_start_order,
    timeline_format,
    write_timeline,
)
from tagd.windowing import Windower, clip_windows

# 1 s windows, hop 0.5 s: window k covers [k/2, k/2 + 1) s and its centre is k/2 + 0.5 s
CARD = ModelCard(
    name="m",
    architecture="fcn4",
    sample_rate=100,
    window_samples=100,
    hop_samples=50,
    tags=["speech", "music"],
    thresholds=[0.5, 0.6],
)


def window(seq: int, stream: str = "s") -> ReadyWindow:
    return ReadyWindow(stream, seq, 1, seq * 50, np.zeros(100, np.float32), Arrival(0, 0))


def run(
    speech: list[float], music: list[float] | None = None, on_after=2, card=CARD, **segmenter_args
):
    """Feed windows with these scores through a Tagger and a Segmenter (edges at the
    threshold unless ``edges`` says otherwise); (closed, the segmenter)."""
    tagger = Tagger(card, on_after=on_after, off_margin=0.1)
    segmenter_args.setdefault("edges", "threshold")
    segmenter = Segmenter(card.tags, card.sample_rate, **segmenter_args)
    music = music or [0.0] * len(speech)
    closed = []
    for seq, scores in enumerate(zip(speech, music, strict=True)):
        samples = np.zeros(card.window_samples, np.float32)
        ready = ReadyWindow("s", seq, 1, seq * card.hop_samples, samples, Arrival(0, 0))
        closed += segmenter.update(tagger.update(ready, scores))
    return closed, segmenter


def test_a_segment_spans_the_threshold_crossings_of_the_run_that_turned_the_tag_on():
    speech = [0.1, 0.2, 0.7, 0.8, 0.9, 0.45, 0.3, 0.1]
    closed, segmenter = run(speech)
    # over from window 2 (centre 1.5 s; the last under, window 1, at 1.0 s): start 1.25 s.
    # ON at window 3; window 5 (0.45) is in the band, window 6 (0.3) under 0.5 - 0.1: OFF.
    # The last over is window 4 (2.5 s), the next centre 3.0 s: end 2.75 s.
    assert closed == [Segment("s", "speech", 1.25, 2.75, pytest.approx(0.8), pytest.approx(0.9), 3)]
    assert segmenter.close("s") == []


# 4 s windows, hop 0.5 s, a low threshold (as a clip model's max-F1 ones): window k's
# centre is k/2 + 2 s
WIDE = dataclasses.replace(CARD, window_samples=400, clip_seconds=4.0, thresholds=[0.3, 0.6])
RAMP = [0.0] * 6 + [0.2, 0.4, 0.6, 0.8] + [1.0] * 5 + [0.8, 0.6, 0.4, 0.0, 0.0]


def test_level_edges_lie_where_the_score_crossed_halfway_between_outside_and_peak():
    (at_threshold,), _ = run(RAMP, card=WIDE)
    # over 0.3 from window 7 (0.4 at 5.5 s; window 6 at 5.0 s): 5.25 s; the last over,
    # window 17 (0.4 at 10.5 s), the next at 11.0 s: 10.75 s
    assert (at_threshold.start, at_threshold.end) == (5.25, 10.75)
    (segment,), _ = run(RAMP, card=WIDE, edges="level")
    # halfway between 0 (before, and the window that turned it off) and the peak 1.0:
    # 0.5, crossed between windows 7 and 8 (0.4 and 0.6 at 5.5 and 6.0 s), and 16 and 17
    assert (segment.start, segment.end) == pytest.approx((5.75, 10.25))
    assert dataclasses.replace(segment, start=5.25, end=10.75) == at_threshold  # scores alike
    # a segment over a bed: outside 0.2 before it, peak 0.6, so halfway is 0.4 (window
    # 8's score, 6.0 s); the score that turned it off is 0.1, so 0.35 after it
    bed = [0.2] * 6 + [0.2, 0.3, 0.4, 0.5] + [0.6] * 5 + [0.5, 0.4, 0.3, 0.1, 0.1]
    (segment,), _ = run(bed, card=WIDE, edges="level")
    assert (segment.start, segment.end) == pytest.approx((6.0, 10.25))


def test_edges_made_by_an_exclusion_not_a_crossing_stay_at_the_threshold_rule():
    # music is excluded while speech is over its threshold (ModelCard.excludes): its
    # score dips but never under its threshold (0.6), so its edges there are where the
    # exclusion began and ended, not where it crossed some level on the way
    card = dataclasses.replace(WIDE, excludes={"music": ["speech"]})
    music = [0.95] * 6 + [0.92, 0.8, 0.75, 0.7] + [0.7] * 5 + [0.75, 0.8, 0.85, 0.9, 0.95]
    at_threshold, segmenter = run(RAMP, music, card=card)
    at_threshold += segmenter.close("s", end=12.0)
    at_level, segmenter = run(RAMP, music, card=card, edges="level")
    at_level += segmenter.close("s", end=12.0)
    assert [s.tag for s in at_level] == ["music", "speech", "music"]
    for level, threshold in zip(at_level, at_threshold, strict=True):
        if level.tag == "music":
            assert (level.start, level.end) == (threshold.start, threshold.end)
        else:
            assert (level.start, level.end) == pytest.approx((5.75, 10.25))


def test_level_edges_of_a_segment_still_open_at_the_end_place_its_start_only():
    closed, segmenter = run(RAMP[:14], card=WIDE, edges="level")
    assert closed == []
    (segment,) = segmenter.close("s", end=20.0)
    assert (segment.start, segment.end, segment.open) == (pytest.approx(5.75), 20.0, True)
    closed, segmenter = run([0.9] * 6, card=WIDE, edges="level")  # on from the first window
    assert [(s.start, s.end) for s in segmenter.close("s", end=20.0)] == [(0.0, 20.0)]
    with pytest.raises(ValueError, match="unknown edge placement 'centre'; known: level"):
        Segmenter(CARD.tags, CARD.sample_rate, edges="centre")


def test_a_spike_shorter_than_on_after_is_no_segment():
    closed, segmenter = run([0.1, 0.9, 0.1, 0.9, 0.1], on_after=2)
    assert closed == [] and segmenter.close("s") == []
    closed, segmenter = run([0.1, 0.9, 0.1], on_after=1)
    assert [(s.start, s.end) for s in closed] == [(0.75, 1.25)]


def test_a_tag_on_from_the_start_begins_at_zero_and_close_ends_it_where_the_audio_ends():
    closed, segmenter = run([0.9, 0.8, 0.7, 0.8])
    assert closed == [] and segmenter.segmented_tags == ["speech", "music"]
    (now,) = segmenter.open_segments("s")
    assert (now.start, now.end, now.open) == (0.0, 2.5, True)  # window 3 ends at 2.5 s
    (last,) = segmenter.close("s", end=2.7)  # the file's unscored tail
    assert (last.tag, last.start, last.end, last.open, last.predictions) == (
        "speech",
        0.0,
        2.7,
        True,
        4,
    )
    assert last.mean == pytest.approx(0.8) and last.peak == pytest.approx(0.9)
    assert segmenter.open_segments("s") == []  # closed streams are forgotten


def test_a_dip_into_the_hysteresis_band_neither_ends_nor_shortens_the_segment():
    speech = [0.9, 0.9, 0.45, 0.42, 0.8, 0.3]  # 0.45 and 0.42: under 0.5, not under 0.4
    closed, _ = run(speech)
    (segment,) = closed
    assert (segment.start, segment.end) == (0.0, 2.75)  # the last over: window 4 at 2.5 s
    assert segment.predictions == 5
    assert segment.mean == pytest.approx((0.9 + 0.9 + 0.45 + 0.42 + 0.8) / 5)


def test_a_tag_that_ends_in_the_band_is_cut_where_it_was_last_over_the_threshold():
    closed, segmenter = run([0.9, 0.9, 0.9, 0.45])
    (segment,) = segmenter.close("s", end=10.0)
    assert (segment.end, segment.open, segment.predictions) == (1.75, True, 3)


def test_tags_are_segmented_independently_and_only_those_asked_for():
    speech = [0.9, 0.9, 0.1, 0.1, 0.1, 0.1]
    music = [0.1, 0.1, 0.1, 0.9, 0.9, 0.9]
    closed, segmenter = run(speech, music)
    assert [(s.tag, s.start, s.end) for s in closed] == [("speech", 0.0, 1.25)]
    assert [(s.tag, s.start, s.end) for s in segmenter.close_all()] == [("music", 1.75, 3.5)]
    closed, segmenter = run(speech, music, only={"music"})
    assert closed == [] and [s.tag for s in segmenter.close_all()] == ["music"]
    with pytest.raises(ValueError, match="unknown tag.*jingle.*speech, music"):
        Segmenter(CARD.tags, CARD.sample_rate, only={"jingle"})


def test_streams_are_segmented_separately_and_forget_drops_one():
    tagger = Tagger(CARD, on_after=1)
    segmenter = Segmenter(CARD.tags, CARD.sample_rate)
    for seq in range(3):
        segmenter.update(tagger.update(window(seq, "a"), [0.9, 0.0]))
        segmenter.update(tagger.update(window(seq, "b"), [0.0, 0.9]))
    segmenter.forget("a")
    assert [(s.stream, s.tag) for s in segmenter.close_all()] == [("b", "music")]


def test_audio_in_any_chunking_gives_the_same_segments():
    """Windower → scores → Tagger → Segmenter, as `tagd serve` runs it, in three chunkings."""
    rng = np.random.default_rng(0)
    loud = np.repeat(rng.random(40) > 0.5, 50)  # 20 s in 0.5 s blocks, loud or quiet
    audio = np.where(loud, 0.8, 0.05).astype(np.float32) * rng.choice([-1, 1], len(loud))

    def segments(chunk: int) -> list[Segment]:
        windower = Windower(CARD.window_samples, CARD.hop_samples)
        tagger = Tagger(CARD)
        segmenter = Segmenter(CARD.tags, CARD.sample_rate)
        found, seq = [], 0
        for at in range(0, len(audio), chunk):
            for w in windower.push(audio[at : at + chunk]):
                level = float(np.abs(w.samples).mean())
                ready = ReadyWindow("s", seq, 1, w.start, w.samples, Arrival(0, 0))
                found += segmenter.update(tagger.update(ready, [level, 1 - level]))
                seq += 1
        return found + segmenter.close("s")

    reference = segments(len(audio))
    assert len(reference) >= 4  # both tags come and go
    for chunk in (1, 37, 480):
        assert segments(chunk) == reference


# -- formats ------------------------------------------------------------------------------------
EXAMPLE = [
    Segment("a,b.wav", "speech", 0.0, 12.5, 0.81234, 0.95, 4),
    Segment("a,b.wav", "music", 3725.25, 3790.0006, 0.7, 0.9, 20, open=True),
]


def written(name: str) -> str:
    out = io.StringIO()
    assert write_timeline(iter(EXAMPLE), out, name) == 2
    return out.getvalue()


def test_csv():
    text = written("csv")
    assert text == (
        "stream,start,end,tag,mean,peak\n"
        '"a,b.wav",0.000,12.500,speech,0.8123,0.9500\n'
        '"a,b.wav",3725.250,3790.001,music,0.7000,0.9000\n'
    )
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[0]["stream"] == "a,b.wav" and float(rows[1]["start"]) == 3725.25


def test_json_lines():
    records = [json.loads(line) for line in written("jsonl").splitlines()]
    assert records[0] == {
        "stream": "a,b.wav",
        "tag": "speech",
        "start": 0.0,
        "end": 12.5,
        "mean": 0.8123,
        "peak": 0.95,
        "predictions": 4,
        "open": False,
    }
    assert (records[1]["start"], records[1]["end"], records[1]["open"]) == (3725.25, 3790.001, True)


def test_audacity_labels():
    assert written("audacity") == ("0.000000\t12.500000\tspeech\n3725.250000\t3790.000600\tmusic\n")


def test_webvtt():
    text = written("vtt")
    assert text == (
        "WEBVTT\n\n"
        "1\n00:00:00.000 --> 00:00:12.500\nspeech\n\n"
        "2\n01:02:05.250 --> 01:03:10.001\nmusic\n\n"
    )
    # the WebVTT timestamp grammar: hours (2+ digits), minutes and seconds under 60, ms
    timing = re.compile(
        r"^(\d{2,}):([0-5]\d):([0-5]\d)\.\d{3} --> (\d{2,}):([0-5]\d):([0-5]\d)\.\d{3}$"
    )
    cues = text.split("\n\n")[1:-1]
    assert all(timing.match(cue.splitlines()[1]) for cue in cues)


def test_srt():
    text = written("srt")
    assert text == (
        "1\n00:00:00,000 --> 00:00:12,500\nspeech\n\n2\n01:02:05,250 --> 01:03:10,001\nmusic\n\n"
    )
    timing = re.compile(r"^\d{2}:[0-5]\d:[0-5]\d,\d{3} --> \d{2}:[0-5]\d:[0-5]\d,\d{3}$")
    blocks = [b.splitlines() for b in text.strip("\n").split("\n\n")]
    assert [b[0] for b in blocks] == ["1", "2"] and all(timing.match(b[1]) for b in blocks)


def test_clock_carries_rounding_into_the_next_second_and_hour():
    assert clock(59.9996) == "00:01:00.000"
    assert clock(3599.9999, ",") == "01:00:00,000"
    assert clock(100 * 3600 + 1.5) == "100:00:01.500"


def test_formats_are_found_by_name_and_an_unknown_one_names_the_known():
    assert set(FORMATS) == {"csv", "jsonl", "audacity", "vtt", "srt"}
    assert timeline_format("vtt").suffix == ".vtt"
    with pytest.raises(ValueError, match="unknown timeline format 'xml'; known: csv, jsonl"):
        timeline_format("xml")


def test_in_start_order_sorts_segments_closed_out_of_order():
    late = Segment("s", "music", 0.0, 60.0, 0.9, 0.9)
    early = Segment("s", "speech", 10.0, 20.0, 0.9, 0.9)
    assert in_start_order([early, late]) == [late, early]


# -- whole files: tagd.tagfile.timeline_file ----------------------------------------------------
@pytest.fixture(scope="module")
def programme(tmp_path_factory, music):
    """40 s at the model's rate in 4-6 s turns of music and near silence: scores that vary."""
    rng = np.random.default_rng(3)
    parts = []
    for turn in range(8):
        seconds = float(rng.uniform(4, 6))
        quiet = 0.01 * rng.standard_normal(round(seconds * 12000)).astype(np.float32)
        parts.append(music(seconds, 12000, seed=turn) if turn % 2 == 0 else quiet)
    path = tmp_path_factory.mktemp("programme") / "programme.wav"
    soundfile.write(path, np.concatenate(parts), 12000, subtype="FLOAT")
    return path


def tuned(card: ModelCard, scores: np.ndarray) -> ModelCard:
    """The card with each tag's threshold at the median of its scores: segments appear."""
    return dataclasses.replace(card, thresholds=[float(t) for t in np.median(scores, axis=0)])


def test_a_files_timeline_is_the_daemons_segments_of_its_windows(short_fcn4, programme):
    engine = load_engine(short_fcn4)
    card = engine.card
    samples = soundfile.read(programme, dtype="float32")[0]
    cut = list(clip_windows(samples, card.window_samples, card.hop_samples))
    starts, windows = [w.start for w in cut], [w.samples for w in cut]
    scores = engine.run(np.stack(windows))
    card = tuned(card, scores)
    # the daemon's rule, window by window
    tagger, segmenter = Tagger(card), Segmenter(card.tags, card.sample_rate)
    expected = []
    for seq, (start, row) in enumerate(zip(starts, scores, strict=True)):
        ready = ReadyWindow(str(programme), seq, 0, start, windows[seq], Arrival(0, 0))
        expected += segmenter.update(tagger.update(ready, row))
    expected = in_start_order(expected + segmenter.close(str(programme), len(samples) / 12000))
    assert len(expected) >= 8

    progress = []
    result = timeline_file(
        engine,
        programme,
        Tagger(card),
        Segmenter(card.tags, card.sample_rate),
        on_progress=progress.append,
        block_frames=5000,
    )
    assert (result.windows, result.duration_s) == (len(windows), len(samples) / 12000)
    assert progress == sorted(progress) and progress[-1] == result.duration_s
    assert len(result.segments) == len(expected)
    for got, want in zip(result.segments, expected, strict=True):
        assert (got.stream, got.tag, got.start, got.end, got.open) == (
            want.stream,
            want.tag,
            want.start,
            want.end,
            want.open,
        )
        assert got.mean == pytest.approx(want.mean, abs=1e-5)


@pytest.fixture(scope="module")
def incremental_fcn4(tmp_path_factory):
    """The tiny 2 s FCN-4 with incremental graphs for a 16-frame hop."""
    torch = pytest.importorskip("torch")
    from support import SHORT_FCN

    from trainer.export import export_onnx
    from trainer.models import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("incremental") / "fcn4.onnx"
    export_onnx(create_model("fcn4", 8, width=0.125, **SHORT_FCN), path, incremental_hops=(HOP,))
    return path


HOP = 16 * 256  # samples: 0.34 s at 12 kHz


def test_a_files_timeline_does_not_depend_on_the_decoders_blocks_or_the_scorer(
    incremental_fcn4, programme, tmp_path
):
    engine = load_engine(incremental_fcn4)
    mp3 = tmp_path / "programme.mp3"  # resampled and decoded by ffmpeg, a block at a time
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(programme), "-ar", "44100", str(mp3)], check=True
    )
    samples = soundfile.read(programme, dtype="float32")[0]
    windows = [w.samples for w in clip_windows(samples, engine.card.window_samples, HOP)]
    card = tuned(engine.card, engine.run(np.stack(windows)))

    def segments(block_frames: int, scorer) -> list[Segment]:
        tagger = Tagger(card)
        segmenter = Segmenter(card.tags, card.sample_rate, only=card.tags[:3])
        return timeline_file(
            engine, mp3, tagger, segmenter, HOP, scorer=scorer, block_frames=block_frames
        ).segments

    reference = segments(1 << 17, FullWindows([engine], HOP))
    assert len(reference) >= 3 and {s.tag for s in reference} <= set(card.tags[:3])
    incremental = choose_scorer([engine], HOP, incremental=True)
    assert incremental.mode == INCREMENTAL
    # other blocks: the same samples and scores, the same edges; incremental inference's
    # scores differ in the fifth decimal, and an edge placed between two windows by their
    # scores (edges = level) moves by microseconds, well within the millisecond printed
    for found, abs_s in (
        (segments(4096, FullWindows([engine], HOP)), 0),
        (segments(12345, incremental), 1e-4),
    ):
        assert [s.tag for s in found] == [s.tag for s in reference]
        edges = [t for s in found for t in (s.start, s.end)]
        assert edges == pytest.approx([t for s in reference for t in (s.start, s.end)], abs=abs_s)
        assert [s.mean for s in found] == pytest.approx([s.mean for s in reference], abs=1e-4)


def test_a_file_shorter_than_a_window_is_one_padded_window_and_too_short_an_error(
    short_fcn4, music, tmp_path
):
    engine = load_engine(short_fcn4)
    card = dataclasses.replace(engine.card, thresholds=[0.0] * engine.card.n_tags)
    short = tmp_path / "short.wav"
    soundfile.write(short, music(1.0, 12000), 12000)  # half the 2 s window
    result = timeline_file(engine, short, Tagger(card, on_after=1), Segmenter(card.tags, 12000))
    assert result.windows == 1
    assert {(s.start, s.end, s.open) for s in result.segments} == {(0.0, 1.0, True)}
    assert len(result.segments) == card.n_tags  # every tag over a threshold of 0
    soundfile.write(short, music(0.2, 12000), 12000)
    with pytest.raises(TooShortError, match="shorter than"):
        timeline_file(engine, short, Tagger(card), Segmenter(card.tags, 12000))


def test_tagging_a_long_file_holds_a_few_blocks_not_the_whole_file(short_fcn4, music, tmp_path):
    """Plain `tagd tag` and --timeline both decode a block at a time: while 10 minutes are
    tagged, the heap's peak stays a fraction of the file's samples at the model's rate."""
    import tracemalloc

    rate, minutes = 22_050, 10
    path = tmp_path / "long.wav"
    soundfile.write(path, np.tile(music(10.0, rate), 6 * minutes), rate, subtype="PCM_16")
    engine = load_engine(short_fcn4)
    card = engine.card
    whole_file_bytes = minutes * 60 * card.sample_rate * 4  # float32, as decode_file held it
    tracemalloc.start()
    try:
        tagged = tag_file(engine, path)
        tag_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        timeline_file(engine, path, Tagger(card), Segmenter(card.tags, card.sample_rate))
        timeline_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tagged.duration_s == pytest.approx(minutes * 60, abs=0.01)
    assert tagged.windows == len(card.clip_window_starts(round(minutes * 60 * card.sample_rate)))
    assert tag_peak < whole_file_bytes / 5, (tag_peak, whole_file_bytes)
    assert timeline_peak < whole_file_bytes / 5, (timeline_peak, whole_file_bytes)


@pytest.mark.parametrize("suffix", [".wav", ".mp3", ".m4a"])  # libsndfile, ffmpeg, fallback
def test_decoding_a_block_at_a_time_gives_the_whole_files_samples(music, tmp_path, suffix):
    source = tmp_path / "source.wav"
    soundfile.write(source, np.stack([music(6.0, 44100, seed=2)] * 2, axis=1), 44100)
    path = tmp_path / f"clip{suffix}"
    if suffix != ".wav":
        subprocess.run(["ffmpeg", "-v", "error", "-i", str(source), str(path)], check=True)
    else:
        path = source
    whole = decode_file(path, 12000)
    blocks = list(decode_blocks(path, 12000, block_frames=10_000))
    assert len(blocks) > 3
    joined = np.concatenate(blocks)
    assert abs(len(joined) - len(whole)) <= 2  # streaming and one-shot soxr: the same length
    n = min(len(joined), len(whole))
    assert np.max(np.abs(joined[:n] - whole[:n])) < 1e-3


def test_a_file_that_cannot_be_decoded_fails_before_its_first_block(tmp_path):
    garbage = tmp_path / "garbage.ogg"
    garbage.write_bytes(b"OggS" + b"junk" * 300)
    with pytest.raises(AudioError, match="garbage.ogg"):
        list(decode_blocks(garbage, 12000))
    with pytest.raises(AudioError, match="no such file"):
        decode_blocks(tmp_path / "missing.wav", 12000)
