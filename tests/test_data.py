"""Dataset loaders (MagnaTagATune, MSD, manifest), the synthetic generator, window cutting."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import soundfile

from tagd.audio import decode_file
from trainer.data import synthetic
from trainer.data.dataset import DataError, hashed_split, random_starts
from trainer.data.manifest import load_manifest, write_manifest
from trainer.data.msd import load_msd
from trainer.data.mtt import load_mtt


def write_annotations(path, tags, rows):
    """rows: (clip_id, set of tags, mp3_path), written as MTT does: tabs, every field quoted."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerow(["clip_id", *tags, "mp3_path"])
        for clip_id, present, mp3 in rows:
            writer.writerow([clip_id, *("1" if t in present else "0" for t in tags), mp3])


@pytest.fixture
def mtt_csv(tmp_path):
    tags = ["guitar", "classical", "slow", "techno", "rare"]
    rows = [
        (2, {"classical", "slow"}, "f/a-0-29.mp3"),
        (6, {"classical"}, "0/b-0-29.mp3"),
        (10, {"guitar", "classical"}, "b/c-0-29.mp3"),
        (11, {"techno", "slow"}, "c/d-0-29.mp3"),
        (12, set(), "d/e-0-29.mp3"),
        (13, {"rare"}, "e/f-0-29.mp3"),
        (14, {"slow", "guitar"}, "3/g-0-29.mp3"),
    ]
    path = tmp_path / "annotations_final.csv"
    write_annotations(path, tags, rows)
    return path


def test_mtt_keeps_top_tags_by_frequency_and_drops_untagged_clips(mtt_csv):
    dataset = load_mtt(mtt_csv, n_tags=3)
    # classical 3, slow 3, guitar 2; ties keep the file's column order
    assert dataset.tags == ["classical", "slow", "guitar"]
    ids = [clip.clip_id for clip in dataset.clips]
    assert ids == ["2", "6", "10", "11", "14"]  # 12 has no tag, 13 only a dropped one
    assert dataset.notes["clips without any kept tag (dropped)"] == 2
    first = dataset.clips[0]
    assert [dataset.tags[i] for i in first.tags] == ["classical", "slow"]
    assert first.path == mtt_csv.parent / "f/a-0-29.mp3"


def test_mtt_splits_by_folder(mtt_csv):
    splits = {clip.clip_id: clip.split for clip in load_mtt(mtt_csv, n_tags=None).clips}
    assert splits == {
        "2": "test",
        "6": "train",
        "10": "train",
        "11": "valid",
        "13": "test",
        "14": "train",
    }


def test_mtt_split_file_replaces_folders_and_drops_unlisted(mtt_csv, tmp_path):
    split_file = tmp_path / "split.tsv"
    split_file.write_text("clip_id\tsplit\n2\ttrain\nb/c-0-29.mp3\tvalidation\n11\ttest\n")
    dataset = load_mtt(mtt_csv, audio_root=tmp_path / "audio", split_file=split_file)
    assert {c.clip_id: c.split for c in dataset.clips} == {
        "2": "train",
        "10": "valid",
        "11": "test",
    }
    assert dataset.clips[0].path == tmp_path / "audio" / "f/a-0-29.mp3"
    assert dataset.notes["clips not in the split file (dropped)"] == 3


def test_mtt_rejects_a_file_that_is_not_the_annotations(tmp_path):
    bad = tmp_path / "annotations_final.csv"
    bad.write_text("id,guitar,path\n1,0,a.mp3\n")
    with pytest.raises(DataError, match="tab-separated header"):
        load_mtt(bad)
    with pytest.raises(DataError, match="no such file"):
        load_mtt(tmp_path / "missing")


def test_manifest_reads_paths_tags_and_splits(tmp_path):
    manifest = tmp_path / "library.csv"
    manifest.write_text(
        "path,tags,split\n"
        "a.wav,rock; guitar,train\n"
        "sub/b.wav,rock,valid\n"
        "c.wav,jingle,test\n"
        "d.wav,,train\n"
    )
    dataset = load_manifest(manifest)
    assert dataset.tags == ["rock", "guitar", "jingle"]
    assert [(c.clip_id, c.split) for c in dataset.clips] == [
        ("a.wav", "train"),
        ("sub/b.wav", "valid"),
        ("c.wav", "test"),
    ]
    assert dataset.clips[0].tags == (0, 1)
    assert dataset.clips[1].path == tmp_path / "sub/b.wav"
    assert load_manifest(manifest, n_tags=1).tags == ["rock"]


def test_manifest_without_split_column_uses_a_stable_hash(tmp_path):
    manifest = tmp_path / "m.csv"
    write_manifest(manifest, [(f"{i}.wav", ["x"], None) for i in range(200)])
    splits = [clip.split for clip in load_manifest(manifest).clips]
    assert splits == [hashed_split(f"{i}.wav") for i in range(200)]
    assert (
        120 < splits.count("train") < 190 and splits.count("valid") > 5 and splits.count("test") > 5
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file,labels\na.wav,x\n", "missing path, tags"),
        ("path,tags,split\na.wav,x,holdout\n", "split must be one of"),
        ("path,tags\na.wav,x\na.wav,y\n", "more than once"),
        ("path,tags\n", "lists no clips"),
    ],
)
def test_manifest_errors_name_the_problem(tmp_path, text, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(DataError, match=message):
        load_manifest(manifest)


def test_msd_joins_audio_tags_and_split_lists(tmp_path):
    (tmp_path / "audio.tsv").write_text("TRA\ta.mp3\nTRB\t/abs/b.mp3\nTRC\tc.mp3\n")
    (tmp_path / "tags.tsv").write_text(
        "# track_id\ttag\nTRA\trock\t100\nTRA\tpop\nTRB\trock\nTRC\tjazz\nTRD\trock\n"
    )
    (tmp_path / "train.txt").write_text("TRA\nTRC\n")
    (tmp_path / "test.txt").write_text("TRB\n")
    dataset = load_msd(
        tmp_path / "audio.tsv",
        tmp_path / "tags.tsv",
        {"train": tmp_path / "train.txt", "test": tmp_path / "test.txt"},
        n_tags=2,
    )
    assert dataset.tags == ["rock", "pop"]
    assert [(c.clip_id, c.split, c.tags) for c in dataset.clips] == [
        ("TRA", "train", (0, 1)),
        ("TRB", "test", (0,)),
    ]
    assert dataset.clips[0].path == tmp_path / "a.mp3"
    assert str(dataset.clips[1].path) == "/abs/b.mp3"
    assert dataset.notes["tagged tracks without audio (dropped)"] == 1  # TRD
    assert dataset.notes["tracks without any kept tag (dropped)"] == 1  # TRC: jazz not kept


def test_msd_with_no_matching_ids_says_so(tmp_path):
    (tmp_path / "audio.tsv").write_text("TRA\ta.mp3\n")
    (tmp_path / "tags.tsv").write_text("TRZ\trock\n")
    with pytest.raises(DataError, match="do the track ids match"):
        load_msd(tmp_path / "audio.tsv", tmp_path / "tags.tsv")


def test_synthetic_clips_are_deterministic_by_seed():
    first = list(synthetic.generate(4, seed=3, seconds=1.0))
    again = list(synthetic.generate(4, seed=3, seconds=1.0))
    other = list(synthetic.generate(4, seed=4, seconds=1.0))
    for a, b in zip(first, again, strict=True):
        assert a.tags == b.tags and np.array_equal(a.audio, b.audio)
    assert any(not np.array_equal(a.audio, c.audio) for a, c in zip(first, other, strict=True))
    assert all(0 < np.abs(c.audio).max() <= 1 for c in first)


def test_synthetic_tags_are_audible_in_the_spectrum():
    rate = 16_000
    rng = np.random.default_rng(0)
    bass = synthetic.render(("bass",), 2.0, rate, rng)
    lead = synthetic.render(("lead",), 2.0, rate, rng)

    def energy_below(audio, hz):
        spectrum = np.abs(np.fft.rfft(audio)) ** 2
        freqs = np.fft.rfftfreq(len(audio), 1 / rate)
        return spectrum[freqs < hz].sum() / spectrum.sum()

    assert energy_below(bass, 400) > 0.9
    assert energy_below(lead, 400) < 0.1


def test_synthetic_mtt_layout_loads_with_real_mp3s_and_an_empty_one(tmp_path):
    annotations = synthetic.write_mtt(tmp_path, 12, seed=1, seconds=1.0, n_mp3=2)
    dataset = load_mtt(annotations, n_tags=len(synthetic.TAGS))
    paths = {clip.path.name: clip.path for clip in dataset.clips}
    mp3s = sorted(name for name in paths if name.endswith(".mp3"))
    assert len(mp3s) == 3 and mp3s[-1].endswith("-empty.mp3")
    assert paths[mp3s[-1]].stat().st_size == 0
    decoded = decode_file(paths[mp3s[0]], 16_000)
    assert abs(len(decoded) - 16_000) < 2_000  # mp3 adds encoder padding
    wav = next(p for name, p in paths.items() if name.endswith(".wav"))
    assert soundfile.info(wav).samplerate == 16_000
    assert {clip.split for clip in dataset.clips} <= {"train", "valid", "test"}


def test_random_starts_stay_inside_each_clip():
    rng = np.random.default_rng(0)
    lengths = np.array([1000, 300, 100, 5000] * 50)
    starts = random_starts(lengths, 300, rng)
    assert np.all(starts >= 0) and np.all(starts + 300 <= np.maximum(lengths, 300))
    assert starts[3::4].std() > 500  # long clips get spread-out crops


def test_looped_crops_wrap_around_the_clip_end():
    from trainer.data.dataset import looped_crop

    clip = (np.arange(10) * 1000).astype(np.int16)
    window = looped_crop(clip, 7, 6)
    np.testing.assert_array_equal(window * 32768, [7000, 8000, 9000, 0, 1000, 2000])
    np.testing.assert_array_equal(looped_crop(clip, 17, 3) * 32768, [7000, 8000, 9000])
    short = looped_crop(clip[:4], 2, 6)  # shorter than a window: padded, then looped
    np.testing.assert_array_equal(short * 32768, [2000, 3000, 0, 0, 0, 1000])
