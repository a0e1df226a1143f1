"""Real recordings from Debian packages: the catalog, fetching with apt, decoding, clip sets.

The fetching tests download three small packages (about 22 MB: two held out, one train)
into a temporary cache, once for the module.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import time
from dataclasses import replace

import numpy as np
import pytest
import soundfile

from trainer.data import recordings
from trainer.data.dataset import DataError
from trainer.data.recordings import PACKAGES

FETCHED = [
    recordings.SMALL_HELDOUT_SPEECH,
    recordings.SMALL_HELDOUT_MUSIC,
    recordings.SMALL_TRAIN_SPEECH,
]
needs_apt = pytest.mark.skipif(
    shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
    reason="recordings come from Debian packages: needs apt-get and dpkg-deb",
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """TAGD_CACHE for the module, with FETCHED already fetched into it."""
    root = tmp_path_factory.mktemp("tagd-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TAGD_CACHE", str(root))
        recordings.fetch(FETCHED)
        yield root / "debian"


def rms_dbfs(samples: np.ndarray) -> float:
    return 10 * np.log10(np.mean(np.square(samples, dtype=np.float64)))


# -- the catalog -------------------------------------------------------------------------------
def test_no_debian_source_gives_both_train_and_heldout_packages():
    sources = {
        role: {p.debian_source for p in PACKAGES.values() if p.role == role}
        for role in ("train", "heldout")
    }
    assert sources["train"] and sources["heldout"]
    assert not sources["train"] & sources["heldout"]


def test_catalog_entries_are_complete_and_small_packages_fit_their_names():
    for name, entry in PACKAGES.items():
        assert entry.name == name
        assert entry.kind in ("speech", "music") and entry.role in ("train", "heldout")
        assert entry.include and entry.licence and entry.note
        if entry.kind == "speech":
            assert entry.instrumental is False, name
        if entry.stems:  # only write_recordings_set sums stems; rendered sets would not
            assert (entry.kind, entry.role) == ("music", "heldout"), name
    kinds = {
        recordings.SMALL_TRAIN_SPEECH: ("speech", "train"),
        recordings.SMALL_TRAIN_MUSIC: ("music", "train"),
        recordings.SMALL_HELDOUT_SPEECH: ("speech", "heldout"),
        recordings.SMALL_HELDOUT_MUSIC: ("music", "heldout"),
    }
    for name, (kind, role) in kinds.items():
        assert (PACKAGES[name].kind, PACKAGES[name].role) == (kind, role)
    for role in ("train", "heldout"):
        for kind in ("speech", "music"):
            chosen = [p for p in PACKAGES.values() if p.role == role and p.kind == kind]
            assert len(chosen) >= 3, (role, kind)


@pytest.mark.skipif(shutil.which("apt-cache") is None, reason="needs apt-cache")
def test_debian_sources_are_those_apt_names():
    shown = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", *PACKAGES], capture_output=True, text=True
    ).stdout
    sources = {}
    for paragraph in shown.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in paragraph.splitlines() if ": " in line)
        if "Package" in fields:  # Source is "name" or "name (version)"; absent: the same name
            sources[fields["Package"]] = fields.get("Source", fields["Package"]).split()[0]
    assert sources == {name: entry.debian_source for name, entry in PACKAGES.items()}


def test_an_unknown_package_is_refused_with_the_known_ones(tmp_path):
    with pytest.raises(DataError, match="tagd-no-such-package.*known:.*asc-music"):
        recordings.fetch(["asc-music", "tagd-no-such-package"], cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything was downloaded


# -- fetching ------------------------------------------------------------------------------------
@needs_apt
def test_fetch_lists_recordings_by_package_and_path_and_reads_the_cache_after(cache, monkeypatch):
    first = recordings.fetch(FETCHED)
    assert [r.package for r in first] == sorted(
        (r.package for r in first), key=FETCHED.index
    )  # package by package, in the order asked
    for name in FETCHED:
        own = [r for r in first if r.package == name]
        assert own, name
        assert [r.relative for r in own] == sorted(r.relative for r in own)
        assert {(r.kind, r.instrumental) for r in own} == {
            (PACKAGES[name].kind, PACKAGES[name].instrumental)
        }
        assert len({r.version for r in own}) == 1 and own[0].version[0].isdigit()
        assert all(r.path.is_absolute() and r.path.is_file() for r in own)
        assert all(r.path == cache / name / r.relative for r in own)
    assert sorted(p.name for p in cache.iterdir()) == sorted(FETCHED)  # no .deb, no scratch

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"ran {args[0]} although the package is in the cache")

    monkeypatch.setattr(recordings.subprocess, "run", no_subprocess)
    started = time.perf_counter()
    again = recordings.fetch(FETCHED)
    assert time.perf_counter() - started < 1.0
    assert again == first


@needs_apt
def test_recordings_decode_to_sound_of_their_length(cache):
    for name in FETCHED:
        own = [r for r in recordings.fetch([name]) if r.package == name]
        for recording in (own[0], own[len(own) // 2], own[-1]):
            samples = recordings.load(recording, 16_000)
            assert samples.dtype == np.float32 and samples.ndim == 1
            expected = recordings.duration(recording) * 16_000
            assert abs(len(samples) - expected) <= 0.01 * expected + 160, recording.relative
            assert rms_dbfs(samples) > -45, recording.relative


@needs_apt
def test_a_package_apt_cannot_find_is_a_clear_error(tmp_path, monkeypatch):
    ghost = replace(PACKAGES["asc-music"], name="tagd-no-such-package-for-apt")
    monkeypatch.setitem(PACKAGES, ghost.name, ghost)
    with pytest.raises(DataError, match="tagd-no-such-package-for-apt.*apt-get download.*locate"):
        recordings.fetch([ghost.name], cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # the scratch folder went with the failure


def test_missing_apt_tools_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(recordings.shutil, "which", lambda tool: None)
    with pytest.raises(DataError, match="asc-music needs apt-get and dpkg-deb"):
        recordings.fetch(["asc-music"], cache_dir=tmp_path)


# -- labelled sets ---------------------------------------------------------------------------------
def named_recordings(source: str, own: list[str]) -> list[str]:
    """The recordings a row's source column names, its "… n more" filled in from ``own``."""
    parts = source.split(";")
    if len(parts) < 3 or not parts[-2].startswith("… "):
        return parts
    head, hidden = parts[:-2], int(parts[-2].split()[1])
    first = own.index(head[0])
    span = own[first : first + len(head) + hidden + 1]
    assert span[: len(head)] == head and span[-1] == parts[-1], source
    return span


@needs_apt
def test_recordings_set_has_labelled_clips_of_the_asked_length(cache, tmp_path):
    names = [recordings.SMALL_HELDOUT_SPEECH, recordings.SMALL_HELDOUT_MUSIC]
    manifest = recordings.write_recordings_set(tmp_path / "a", names, max_clips_per_package=3)
    assert manifest == tmp_path / "a" / "manifest.csv"
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "tags", "split", "known", "package", "version", "source"]
    fetched = recordings.fetch(names)
    versions = {r.package: r.version for r in fetched}
    relatives = {name: [r.relative for r in fetched if r.package == name] for name in names}
    speech = [row for row in rows if row["package"] == recordings.SMALL_HELDOUT_SPEECH]
    music = [row for row in rows if row["package"] == recordings.SMALL_HELDOUT_MUSIC]
    assert len(speech) == 3 and len(music) == 3  # asc-music has three tracks
    for row in speech:
        assert (row["tags"], row["known"]) == ("speech", "speech;instrumental")
        own = relatives[row["package"]]
        joined = named_recordings(row["source"], own)
        first = own.index(joined[0])
        assert joined == own[first : first + len(joined)]  # consecutive prompts, in path order
        assert len(joined) > 3  # prompts of a few seconds: many to a clip
    for row in music:  # nobody has checked asc-music for a voice: only "no speech" is known
        assert (row["tags"], row["known"]) == ("", "speech")
        assert row["source"] in relatives[row["package"]]
    for row in rows:
        assert row["split"] == "" and row["version"] == versions[row["package"]]
        audio = manifest.parent / row["path"]
        info = soundfile.info(str(audio))
        assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "PCM_16")
        assert info.frames == round(29.1 * 16_000)
        samples, _ = soundfile.read(str(audio), dtype="float32")
        peak = float(np.max(np.abs(samples)))
        assert peak <= 0.99 + 1 / 32768
        if peak < 0.98:  # not held down by its peak
            assert rms_dbfs(samples) == pytest.approx(-20, abs=0.2)
        else:
            assert -40 < rms_dbfs(samples) < -20
    numbers = sorted(int(row["path"].rsplit("/", 1)[1].removesuffix(".wav")) for row in speech)
    assert min(np.diff(numbers)) > 1  # spread over the package, not its first clips

    again = recordings.write_recordings_set(tmp_path / "b", names, max_clips_per_package=3)
    assert again.read_text() == manifest.read_text()
    for row in rows:
        assert (again.parent / row["path"]).read_bytes() == (
            manifest.parent / row["path"]
        ).read_bytes()


def test_a_piece_shipped_as_stems_is_one_clip_of_their_sum(tmp_path, monkeypatch):
    """A rhythm game's song is its band less the lead guitar plus the lead guitar: the clip
    is the middle of their sum, named after both, one clip a folder."""
    rate, seconds = 16_000, 5.0
    time = np.arange(12 * rate) / rate
    band = (0.3 * np.sin(2 * np.pi * 110 * time)).astype(np.float32)
    guitar = (0.2 * np.sin(2 * np.pi * 440 * time[: 11 * rate])).astype(np.float32)
    entry = replace(
        PACKAGES["fretsonfire-songs-sectoid"],
        name="tagd-test-stems",
        include=("songs/*/*.wav",),
    )
    tree = tmp_path / "debian" / entry.name
    for song in ("one", "two"):
        (tree / "songs" / song).mkdir(parents=True)
        soundfile.write(str(tree / "songs" / song / "song.wav"), band, rate, subtype="FLOAT")
        soundfile.write(str(tree / "songs" / song / "guitar.wav"), guitar, rate, subtype="FLOAT")
    (tree / recordings.UNPACKED_MARKER).write_text("1.0-1\n")
    monkeypatch.setitem(PACKAGES, entry.name, entry)

    manifest = recordings.write_recordings_set(
        tmp_path / "set",
        [entry.name],
        seconds=seconds,
        sample_rate=rate,
        cache_dir=tmp_path / "debian",
    )
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["source"] for row in rows] == [
        f"songs/{song}/guitar.wav;songs/{song}/song.wav" for song in ("one", "two")
    ]
    mixed = band.copy()
    mixed[: len(guitar)] += guitar
    window = round(seconds * rate)
    middle = (len(mixed) - window) // 2
    expected = recordings._normalise(mixed[middle : middle + window])
    for row in rows:
        clip, _ = soundfile.read(str(manifest.parent / row["path"]), dtype="float32")
        np.testing.assert_allclose(clip, expected, atol=1.5 / 32768)
