"""`tagd tag` end to end: a real subprocess, real mp3/wav files, a real exported model."""

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tagd.engines import load_engine
from tagd.tagfile import tag_file
from tagd.windowing import clip_windows


def run_tag(*args):
    return subprocess.run(
        [sys.executable, "-m", "tagd.cli", "tag", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def songs(tmp_path_factory, music):
    folder = tmp_path_factory.mktemp("songs")
    wav = folder / "song.wav"
    soundfile.write(wav, np.stack([music(8.0, 44100, seed=1)] * 2, axis=1), 44100)
    mp3 = folder / "song.mp3"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav), "-b:a", "192k", str(mp3)], check=True)
    short = folder / "short.wav"  # under a quarter of SampleCNN's 2.68 s window
    soundfile.write(short, music(0.5, 22050), 22050)
    garbage = folder / "garbage.mp3"
    garbage.write_bytes(b"\xff\xfb" + b"junk" * 500)
    return {"wav": wav, "mp3": mp3, "short": short, "garbage": garbage}


def test_prints_ranked_tags_for_each_file(export_model, songs):
    model = export_model("samplecnn", tags=[f"t{i}" for i in range(8)])
    result = run_tag(songs["mp3"], songs["wav"], "--engine", model, "--top", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{songs['mp3']}  (8.0 s, 2 windows")
    scores = [float(line.split()[-2]) for line in lines[1:4]]
    assert scores == sorted(scores, reverse=True)
    assert lines[4].startswith(str(songs["wav"]))


def test_json_lines_carry_every_tag_and_match_the_library(export_model, songs):
    model = export_model("samplecnn")
    result = run_tag(songs["wav"], "--engine", model, "--json")
    assert result.returncode == 0, result.stderr
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    engine = load_engine(model)
    assert set(record["scores"]) == set(engine.card.tags)
    expected = tag_file(engine, songs["wav"])
    for name, score in zip(engine.card.tags, expected.scores, strict=True):
        assert record["scores"][name] == pytest.approx(float(score), abs=1e-5)
    over = [t for t in engine.card.tags if record["scores"][t] >= 0.5]
    assert sorted(record["tags"]) == sorted(over)


def test_file_scores_are_the_mean_of_the_daemons_windows(export_model, songs, music):
    engine = load_engine(export_model("samplecnn"))
    card = engine.card
    from tagd.audio import decode_file

    samples = decode_file(songs["wav"], card.sample_rate)
    windows = list(clip_windows(samples, card.window_samples, card.hop_samples // 2))
    expected = engine.run(np.stack([w.samples for w in windows])).mean(axis=0)
    result = tag_file(engine, songs["wav"], hop_samples=card.hop_samples // 2, batch_size=3)
    assert result.windows == len(windows) == 1 + (8 * 22050 - 59049) // (59049 // 2)
    np.testing.assert_allclose(result.scores, expected, atol=1e-6)


def test_bad_files_are_reported_and_the_rest_still_tagged(export_model, songs, tmp_path):
    model = export_model("samplecnn")
    missing = tmp_path / "missing.flac"
    result = run_tag(
        songs["garbage"], songs["short"], missing, songs["wav"], "--engine", model, "--json"
    )
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["file"] for r in records] == [
        str(p) for p in (songs["garbage"], songs["short"], missing, songs["wav"])
    ]
    assert "garbage.mp3" in records[0]["error"]
    assert "shorter than the 0.67 s that" in records[1]["error"]
    assert "no such file" in records[2]["error"]
    assert "scores" in records[3]
    assert "3 of 4 files could not be tagged" in result.stderr


def test_a_bad_engine_is_one_clear_line(tmp_path, songs):
    result = run_tag(songs["wav"], "--engine", tmp_path / "nope.onnx")
    assert result.returncode != 0
    assert "model file not found" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_exported_full_size_fcn4_tags_a_song_an_mtt_clip_and_a_jingle(songs, tmp_path, music):
    """The issue's first-run path: `tagd-train export --model fcn4`, then `tagd tag`."""
    pytest.importorskip("torch")
    model = tmp_path / "fcn4.onnx"
    export = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "export", "--model", "fcn4", "--out", str(model)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert export.returncode == 0, export.stderr
    long_song = tmp_path / "long.mp3"
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-stream_loop",
            "4",
            "-i",
            str(songs["mp3"]),
            "-t",
            "35",
            str(long_song),
        ],
        check=True,
    )
    # a MagnaTagATune-length clip (29.1 s, 20 ms short of a window), a 10 s jingle, a 5 s sting
    clips = {}
    for name, seconds in (("mtt", 29.1), ("jingle", 10.0), ("sting", 5.0)):
        clips[name] = tmp_path / f"{name}.wav"
        soundfile.write(clips[name], music(seconds, 12_000, seed=3), 12_000)
    result = run_tag(
        long_song, clips["mtt"], clips["jingle"], clips["sting"], "--engine", model, "--json"
    )
    assert result.returncode == 1  # the sting
    records = {Path(r["file"]).stem: r for r in map(json.loads, result.stdout.splitlines())}
    assert records["long"]["model"].startswith("fcn4")
    assert len(records["long"]["scores"]) == 50
    # 35 s at the card's 3 s hop: windows start at 0, 3 s (29.12 s each)
    assert records["long"]["windows"] == 2
    assert all(0.0 < s < 1.0 for s in records["long"]["scores"].values())
    assert records["mtt"]["windows"] == records["jingle"]["windows"] == 1  # zero-padded
    assert records["mtt"]["scores"] != records["jingle"]["scores"]
    assert "5.00 s of audio is shorter than the 7.28 s that" in records["sting"]["error"]


def test_a_folder_is_tagged_file_by_file_in_sorted_order(export_model, songs, tmp_path):
    model = export_model("samplecnn")
    folder = tmp_path / "library"
    (folder / "b").mkdir(parents=True)
    (folder / "a.wav").write_bytes(songs["wav"].read_bytes())
    (folder / "b" / "c.mp3").write_bytes(songs["mp3"].read_bytes())
    (folder / "b" / "notes.txt").write_text("not audio")
    result = run_tag(folder, "--engine", model, "--json")
    assert result.returncode == 0, result.stderr
    files = [json.loads(line)["file"] for line in result.stdout.splitlines()]
    assert files == [str(folder / "a.wav"), str(folder / "b" / "c.mp3")]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_tag(empty, "--engine", model)
    assert result.returncode == 1
    assert "a folder with no audio files in it" in result.stderr


# -- tagd tag --timeline ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shows(tmp_path_factory, music):
    """Two 20 s programmes at 44.1 kHz stereo: turns of music and near silence."""
    folder = tmp_path_factory.mktemp("shows")
    (folder / "late").mkdir()
    rng = np.random.default_rng(5)
    paths = []
    for name in ("morning.wav", "late/night.flac"):
        parts = [
            music(4.0, 44100, seed=turn) if turn % 2 else 0.01 * rng.standard_normal(4 * 44100)
            for turn in range(5)
        ]
        audio = np.concatenate(parts).astype(np.float32)
        soundfile.write(folder / name, np.stack([audio, audio], axis=1), 44100)
        paths.append(folder / name)
    return folder, paths


def library_timeline(model, path, **segmenter_args):
    from tagd.tagfile import timeline_file
    from tagd.tagger import Tagger
    from tagd.timeline import Segmenter

    engine = load_engine(model)
    segmenter = Segmenter(engine.card.tags, engine.card.sample_rate, **segmenter_args)
    return timeline_file(engine, path, Tagger(engine.card), segmenter).segments


def test_timeline_csv_on_standard_output_is_the_librarys_segments(short_fcn4, shows):
    folder, paths = shows
    result = run_tag(folder, "--engine", short_fcn4, "--timeline")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))  # one header for both files
    expected = [s for path in sorted(paths) for s in library_timeline(short_fcn4, path)]
    assert len(expected) >= 2
    assert [(r["stream"], r["tag"], float(r["start"]), float(r["end"])) for r in rows] == [
        (s.stream, s.tag, round(s.start, 3), round(s.end, 3)) for s in expected
    ]
    assert all(float(r["start"]) < float(r["end"]) <= 20.0 for r in rows)
    assert all(0.0 <= float(r["mean"]) <= float(r["peak"]) <= 1.0 for r in rows)


def test_timeline_formats_to_a_folder_one_file_each_and_only_the_tags_asked_for(
    short_fcn4, shows, tmp_path
):
    folder, paths = shows
    expected = library_timeline(short_fcn4, paths[0])
    wanted = sorted({s.tag for s in expected})[:1]
    out = tmp_path / "timelines"
    result = run_tag(
        folder,
        "--engine",
        short_fcn4,
        "--timeline",
        "--format",
        "vtt",
        "--tags",
        wanted[0],
        "--out",
        out,
    )
    assert result.returncode == 0, result.stderr
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["late/night.vtt", "morning.vtt"]
    vtt = (out / "morning.vtt").read_text()
    cues = vtt.split("\n\n")[1:-1]
    assert vtt.startswith("WEBVTT\n\n") and cues
    assert {cue.splitlines()[2] for cue in cues} == set(wanted)
    assert len(cues) == sum(s.tag == wanted[0] for s in expected)

    labels = tmp_path / "morning.txt"
    result = run_tag(
        paths[0], "--engine", short_fcn4, "--timeline", "--format", "audacity", "--out", labels
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in labels.read_text().splitlines()]
    assert [(float(a), float(b), c) for a, b, c in rows] == [
        (pytest.approx(s.start, abs=1e-6), pytest.approx(s.end, abs=1e-6), s.tag) for s in expected
    ]

    # --edges threshold reaches the Segmenter (how the two placements differ:
    # tests/test_timeline.py; this model's tags are on for whole files)
    at_threshold = library_timeline(short_fcn4, paths[0], edges="threshold")
    result = run_tag(
        paths[0], "--engine", short_fcn4, "--timeline", "--format", "audacity", "--out", labels,
        "--edges", "threshold",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in labels.read_text().splitlines()]
    assert [(float(a), float(b), c) for a, b, c in rows] == [
        (pytest.approx(s.start, abs=1e-6), pytest.approx(s.end, abs=1e-6), s.tag)
        for s in at_threshold
    ]


def test_timeline_mistakes_are_clear_and_a_bad_file_leaves_the_others(
    short_fcn4, shows, songs, tmp_path
):
    folder, paths = shows
    result = run_tag(folder, "--engine", short_fcn4, "--timeline", "--format", "srt")
    assert result.returncode == 2 and "give --out FOLDER for 2 files" in result.stderr
    result = run_tag(paths[0], "--engine", short_fcn4, "--timeline", "--tags", "speech")
    assert result.returncode == 2 and "unknown tag(s) speech; the model's: " in result.stderr
    result = run_tag(paths[0], "--engine", short_fcn4, "--out", tmp_path / "x.csv")
    assert result.returncode == 2 and "go with --timeline" in result.stderr
    out = tmp_path / "out"
    result = run_tag(
        songs["garbage"],
        paths[0],
        "--engine",
        short_fcn4,
        "--timeline",
        "--format",
        "jsonl",
        "--out",
        out,
    )
    assert result.returncode == 1
    assert "garbage.mp3" in result.stderr and "1 of 2 files could not be tagged" in result.stderr
    # under their common folder's tree, nothing half-written for the bad file
    (written,) = [p for p in out.rglob("*") if p.is_file()]
    assert written.relative_to(out) == paths[0].relative_to(paths[0].parents[1]).with_suffix(
        ".jsonl"
    )
    records = [json.loads(line) for line in written.read_text().splitlines()]
    assert [r["start"] for r in records] == sorted(r["start"] for r in records)
