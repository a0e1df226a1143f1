"""`tagd tag` end to end: a real subprocess, real mp3/wav files, a real exported model."""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from tagd.engines import load_engine
from tagd.tagfile import tag_file
from tagd.windowing import clip_windows


def run_tag(*args):
    return subprocess.run(
        [sys.executable, "-m", "tagd.cli", "tag", *map(str, args)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def songs(tmp_path_factory, music):
    folder = tmp_path_factory.mktemp("songs")
    wav = folder / "song.wav"
    soundfile.write(wav, np.stack([music(8.0, 44100, seed=1)] * 2, axis=1), 44100)
    mp3 = folder / "song.mp3"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav), "-b:a", "192k", str(mp3)], check=True)
    short = folder / "short.wav"
    soundfile.write(short, music(1.0, 22050), 22050)
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
    windows = clip_windows(samples, card.window_samples, card.hop_samples // 2)
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
    assert "shorter than one 2.68 s window" in records[1]["error"]
    assert "no such file" in records[2]["error"]
    assert "scores" in records[3]
    assert "3 of 4 files could not be tagged" in result.stderr


def test_a_bad_engine_is_one_clear_line(tmp_path, songs):
    result = run_tag(songs["wav"], "--engine", tmp_path / "nope.onnx")
    assert result.returncode != 0
    assert "model file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_exported_full_size_fcn4_tags_an_mp3_with_50_scores(songs, tmp_path):
    """The issue's first-run path: `tagd-train export --model fcn4`, then `tagd tag`."""
    pytest.importorskip("torch")
    model = tmp_path / "fcn4.onnx"
    export = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "export", "--model", "fcn4", "--out", str(model)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr
    long_song = tmp_path / "long.mp3"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-stream_loop", "4", "-i", str(songs["mp3"]), "-t", "35", str(long_song)],
        check=True,
    )  # fmt: skip
    result = run_tag(long_song, "--engine", model, "--json")
    assert result.returncode == 0, result.stderr
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["model"].startswith("fcn4")
    assert len(record["scores"]) == 50
    # 35 s at the card's 3 s hop: windows start at 0, 3 s (29.12 s each)
    assert record["windows"] == 2
    assert all(0.0 < s < 1.0 for s in record["scores"].values())
