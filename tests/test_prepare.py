"""prepare: decode once into int16 shards, skip and report bad files, resume, run in parallel."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tagd.audio import decode_file
from trainer.data import synthetic
from trainer.data.dataset import Clip, DataError, LabelledSet, PreparedData
from trainer.data.prepare import prepare

RATE = 12_000


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> LabelledSet:
    """Eight good clips (wav and mp3) and five bad files of the kinds real libraries have."""
    root = tmp_path_factory.mktemp("library")
    clips = []
    for clip in synthetic.generate(8, seed=5, seconds=1.5):
        path = root / f"good{clip.number}.{'mp3' if clip.number == 0 else 'wav'}"
        if clip.number == 0:
            synthetic.write_mp3(path, clip.audio, 16_000)
        else:
            soundfile.write(path, clip.audio, 16_000, subtype="PCM_16")
        clips.append(Clip(f"good{clip.number}", path, (clip.number % 2,), "train"))
    (root / "empty.mp3").write_bytes(b"")
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 50)
    soundfile.write(root / "short.wav", np.full(800, 0.1, dtype=np.float32), 16_000)  # 0.05 s
    soundfile.write(root / "silent.wav", np.zeros(32_000, dtype=np.float32), 16_000)
    for name in ("empty.mp3", "corrupt.wav", "short.wav", "silent.wav", "missing.wav"):
        clips.append(Clip(name.split(".")[0], root / name, (0,), "test"))
    return LabelledSet("test library", ["a", "b"], clips)


def test_prepare_stores_int16_at_the_model_rate_and_reports_bad_files(library, tmp_path):
    report = prepare(library, tmp_path, RATE, workers=1, clips_per_shard=4, progress=False)
    assert report.clips == 8
    reasons = {item["id"]: item["reason"] for item in report.skipped}
    assert set(reasons) == {"empty", "corrupt", "short", "silent", "missing"}
    assert reasons["short"].startswith("too short")
    assert reasons["silent"].startswith("silent")
    assert reasons["missing"].startswith("unreadable") and "no such file" in reasons["missing"]
    with (tmp_path / "skipped.csv").open() as handle:
        assert {row["clip_id"] for row in csv.DictReader(handle)} == set(reasons)

    data = PreparedData(tmp_path)
    assert data.sample_rate == RATE and data.tags == ["a", "b"]
    assert [clip.clip_id for clip in data.clips] == [f"good{i}" for i in range(8)]
    for i in range(len(data.clips)):
        stored = data.audio(i)
        assert stored.dtype == np.int16
        expected = decode_file(library.clips[i].path, RATE)
        assert len(stored) == len(expected)
        assert np.max(np.abs(stored / 32768.0 - expected)) < 1e-4
        assert data.labels(i).tolist() == ([1.0, 0.0] if i % 2 == 0 else [0.0, 1.0])
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["format"] == "tagd-prepared"


def test_prepare_resumes_and_redoes_only_missing_shards(library, tmp_path):
    first = prepare(library, tmp_path, RATE, workers=1, clips_per_shard=4, progress=False)
    assert (first.shards_written, first.shards_reused) == (4, 0)
    again = prepare(library, tmp_path, RATE, workers=1, clips_per_shard=4, progress=False)
    assert (again.shards_written, again.shards_reused) == (0, 4)

    # an interrupted run leaves a shard without its .json: only that one is decoded again
    (tmp_path / "shards" / "shard-00001.json").unlink()
    before = (tmp_path / "shards" / "shard-00000.npy").stat().st_mtime_ns
    resumed = prepare(library, tmp_path, RATE, workers=1, clips_per_shard=4, progress=False)
    assert (resumed.shards_written, resumed.shards_reused) == (1, 3)
    assert (tmp_path / "shards" / "shard-00000.npy").stat().st_mtime_ns == before
    assert resumed.clips == first.clips

    # another rate invalidates every shard
    other = prepare(library, tmp_path, 8_000, workers=1, clips_per_shard=4, progress=False)
    assert other.shards_written == 4 and PreparedData(tmp_path).sample_rate == 8_000


def test_parallel_prepare_matches_serial(library, tmp_path):
    prepare(library, tmp_path / "serial", RATE, workers=1, clips_per_shard=3, progress=False)
    prepare(library, tmp_path / "pool", RATE, workers=2, clips_per_shard=3, progress=False)
    serial, pool = PreparedData(tmp_path / "serial"), PreparedData(tmp_path / "pool")
    assert serial.clips == pool.clips
    assert all(np.array_equal(serial.audio(i), pool.audio(i)) for i in range(len(serial.clips)))


def test_prepared_data_refuses_a_folder_that_was_not_prepared(tmp_path: Path):
    with pytest.raises(DataError, match="tagd-train prepare"):
        PreparedData(tmp_path)
