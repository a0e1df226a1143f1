"""Learnable labelled audio for tests and demos: each tag is a sound whose presence defines it.

A clip mixes a quiet noise floor with the sounds of its tags, each spread over the whole
clip so that any crop of it still carries every tag (random-crop training would
otherwise learn from wrong labels). Everything is drawn from ``numpy`` generators seeded
by ``(seed, clip number)``: the same seed gives the same clips, in any order.

``write_mtt`` lays clips out like MagnaTagATune (``annotations_final.csv`` plus folders
``0``-``f``), a few as real mp3s through ffmpeg and one empty mp3 as MTT has;
``write_manifest_dataset`` writes wavs and a CSV manifest.
"""

from __future__ import annotations

import csv
import logging
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

from trainer.data.dataset import DataError
from trainer.data.manifest import write_manifest
from trainer.data.mtt import ANNOTATIONS_NAME, FOLDER_SPLITS, ID_COLUMN, PATH_COLUMN

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_RATE = 16_000  # MagnaTagATune's mp3s are 16 kHz
DEFAULT_SECONDS = 4.0
NOISE_FLOOR = 0.01
PEAK = 0.9
SPLIT_FRACTIONS = {"train": 0.6, "valid": 0.2, "test": 0.2}

# tag → probability that a clip has it. Every sound stays below 5 kHz, so that it survives
# resampling to FCN's 12 kHz. "rare" is there to fall outside a top-N tag selection.
TAG_PROBABILITY = {
    "bass": 0.4,
    "lead": 0.4,
    "chord": 0.35,
    "drums": 0.4,
    "hihat": 0.35,
    "noise bursts": 0.3,
    "sweep": 0.3,
    "rare": 0.04,
}
TAGS = list(TAG_PROBABILITY)


@dataclass(frozen=True)
class SyntheticClip:
    number: int
    tags: tuple[str, ...]
    audio: np.ndarray  # float32 mono


def generate(
    n_clips: int,
    seed: int = 0,
    seconds: float = DEFAULT_SECONDS,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    untagged_fraction: float = 0.0,
) -> Iterator[SyntheticClip]:
    """``n_clips`` clips; a share ``untagged_fraction`` has no tag at all (MTT has those)."""
    for number in range(n_clips):
        rng = np.random.default_rng([seed, number])
        if rng.random() < untagged_fraction:
            present: tuple[str, ...] = ()
        else:
            present = tuple(tag for tag, p in TAG_PROBABILITY.items() if rng.random() < p)
            if not present:
                present = (TAGS[int(rng.integers(len(TAGS) - 1))],)  # any but "rare"
        yield SyntheticClip(number, present, render(present, seconds, sample_rate, rng))


def render(
    tags: tuple[str, ...], seconds: float, sample_rate: int, rng: np.random.Generator
) -> np.ndarray:
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    mix = NOISE_FLOOR * rng.standard_normal(n)
    for tag in tags:
        mix += rng.uniform(0.5, 1.0) * _SOUNDS[tag](t, sample_rate, rng)
    return (PEAK * mix / np.max(np.abs(mix))).astype(np.float32)


# -- one function per tag: (time axis, rate, rng) → a sound of about unit peak --------------
def _bass(t, rate, rng):
    f = rng.uniform(70, 150)
    return 0.7 * np.sin(2 * np.pi * f * t) + 0.3 * np.sin(4 * np.pi * f * t)


def _lead(t, rate, rng):
    f = rng.uniform(800, 1500)
    vibrato = 0.01 * f / 5.0 * np.sin(2 * np.pi * 5.0 * t)  # 5 Hz, ±1 %
    return np.sin(2 * np.pi * f * t + 2 * np.pi * np.cumsum(vibrato) / rate)


def _chord(t, rate, rng):
    root = rng.uniform(250, 420)
    notes = [root, root * 2 ** (4 / 12), root * 2 ** (7 / 12)]  # major triad
    return sum(np.sin(2 * np.pi * f * t) + 0.3 * np.sin(4 * np.pi * f * t) for f in notes) / 4


def _pulses(t, rate, period, make):
    """A pulse from ``make()`` every ``period`` seconds from the clip's start."""
    out = np.zeros_like(t)
    for start in np.arange(0, t[-1], period):
        i = int(start * rate)
        piece = make()[: len(out) - i]
        out[i : i + len(piece)] += piece
    return out


def _drums(t, rate, rng):
    beat = 60.0 / rng.uniform(90, 150)
    decay = np.exp(-np.arange(int(0.15 * rate)) / (0.03 * rate))
    kick = np.sin(2 * np.pi * 60 * np.arange(len(decay)) / rate) * decay
    return _pulses(t, rate, beat, lambda: kick)


def _band_noise(rng, n, rate, low, high):
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / rate)
    spectrum[(freqs < low) | (freqs > high)] = 0
    noise = np.fft.irfft(spectrum, n)
    return noise / (np.max(np.abs(noise)) + 1e-9)


def _hihat(t, rate, rng):
    period = 60.0 / rng.uniform(90, 150) / 4  # sixteenth notes
    n = int(0.05 * rate)
    envelope = np.exp(-np.arange(n) / (0.015 * rate))
    return _pulses(t, rate, period, lambda: _band_noise(rng, n, rate, 3000, 5000) * envelope)


def _noise_bursts(t, rate, rng):
    period = rng.uniform(0.4, 0.8)
    n = int(0.2 * rate)
    return _pulses(t, rate, period, lambda: _band_noise(rng, n, rate, 100, 5000))


def _sweep(t, rate, rng):
    period = rng.uniform(0.6, 1.0)
    local = np.mod(t, period) / period  # 0→1 inside each sweep
    f = 300 * 10**local  # 300 Hz → 3 kHz, exponentially
    phase = 2 * np.pi * np.cumsum(f) / rate
    return np.sin(phase) * np.sin(np.pi * local) ** 0.5


def _rare(t, rate, rng):
    gate = (np.mod(t, 0.25) < 0.1).astype(float)
    return gate * np.sin(2 * np.pi * 2500 * t)


_SOUNDS = {
    "bass": _bass,
    "lead": _lead,
    "chord": _chord,
    "drums": _drums,
    "hihat": _hihat,
    "noise bursts": _noise_bursts,
    "sweep": _sweep,
    "rare": _rare,
}
assert set(_SOUNDS) == set(TAGS)


# -- writers ---------------------------------------------------------------------------------
def assign_splits(
    n_clips: int, seed: int, fractions: dict[str, float] = SPLIT_FRACTIONS
) -> list[str]:
    """Exact split sizes from ``fractions`` (valid and test; train gets the rest), shuffled by the seed."""
    n_valid = int(round(n_clips * fractions["valid"]))
    n_test = int(round(n_clips * fractions["test"]))
    splits = ["valid"] * n_valid + ["test"] * n_test
    splits += ["train"] * (n_clips - len(splits))
    np.random.default_rng([seed, 1_000_003]).shuffle(splits)
    return splits


def write_mp3(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    if shutil.which("ffmpeg") is None:
        raise DataError("ffmpeg is needed to write mp3s; install it or ask for wavs only")
    command = [
        "ffmpeg",
        "-nostdin",
        "-v",
        "error",
        "-y",
        "-f",
        "f32le",
        "-ar",
        str(sample_rate),
        "-ac",
        "1",
        "-i",
        "-",
        "-codec:a",
        "libmp3lame",
        "-q:a",
        "4",
        str(path),
    ]
    result = subprocess.run(command, input=audio.astype("<f4").tobytes(), capture_output=True)
    if result.returncode != 0:
        raise DataError(f"ffmpeg could not write {path}: {result.stderr.decode(errors='replace')}")


def write_mtt(
    root: str | Path,
    n_clips: int,
    seed: int = 0,
    seconds: float = DEFAULT_SECONDS,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    n_mp3: int = 3,
    empty_mp3: bool = True,
    untagged_fraction: float = 0.03,
) -> Path:
    """A synthetic dataset in MagnaTagATune's layout; returns the annotations file.

    The first ``n_mp3`` clips are mp3 (through ffmpeg), the rest 16-bit wav: the loader
    does not care about the extension, and wavs keep the test fast. With ``empty_mp3``,
    one more, tagged, clip is a zero-byte mp3.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    folders = {
        split: [f for f, s in FOLDER_SPLITS.items() if s == split] for split in SPLIT_FRACTIONS
    }
    splits = assign_splits(n_clips + int(empty_mp3), seed)
    rows = []
    for clip in generate(n_clips, seed, seconds, sample_rate, untagged_fraction):
        split = splits[clip.number]
        folder = folders[split][clip.number % len(folders[split])]
        (root / folder).mkdir(exist_ok=True)
        as_mp3 = clip.number < n_mp3
        relative = f"{folder}/synthetic-{clip.number:05d}.{'mp3' if as_mp3 else 'wav'}"
        if as_mp3:
            write_mp3(root / relative, clip.audio, sample_rate)
        else:
            soundfile.write(root / relative, clip.audio, sample_rate, subtype="PCM_16")
        rows.append((clip.number, clip.tags, relative))
    if empty_mp3:
        number = n_clips
        (root / "f").mkdir(exist_ok=True)
        relative = f"f/synthetic-{number:05d}-empty.mp3"
        (root / relative).write_bytes(b"")
        rows.append((number, ("bass",), relative))

    annotations = write_annotations(root, TAGS, rows)
    log.info("wrote %d synthetic clips in MagnaTagATune layout to %s", len(rows), root)
    return annotations


def write_annotations(root: Path, tags: list[str], rows: list[tuple]) -> Path:
    """MagnaTagATune's ``annotations_final.csv``: (clip number, its tags, path) rows."""
    annotations = root / ANNOTATIONS_NAME
    with annotations.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerow([ID_COLUMN, *tags, PATH_COLUMN])
        for number, present, relative in rows:
            writer.writerow([number, *("1" if tag in present else "0" for tag in tags), relative])
    return annotations


def write_manifest_dataset(
    root: str | Path,
    n_clips: int,
    seed: int = 0,
    seconds: float = DEFAULT_SECONDS,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    tags: list[str] | None = None,
) -> Path:
    """Wavs under ``root/audio`` and ``root/manifest.csv``; returns the manifest.

    ``tags`` renames the synthetic tags in order (a "station" vocabulary for fine-tuning
    examples); it must not be longer than the synthetic tag list.
    """
    root = Path(root)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    if tags is not None and len(tags) > len(TAGS):
        raise DataError(f"at most {len(TAGS)} synthetic tags can be renamed, got {len(tags)}")
    names = dict(zip(TAGS, tags or TAGS, strict=False))  # shorter: the rest go untagged
    splits = assign_splits(n_clips, seed)
    rows = []
    for clip in generate(n_clips, seed, seconds, sample_rate):
        relative = f"audio/{clip.number:05d}.wav"
        soundfile.write(root / relative, clip.audio, sample_rate, subtype="PCM_16")
        kept = [names[tag] for tag in clip.tags if tag in names]
        rows.append((relative, kept, splits[clip.number]))
    manifest = root / "manifest.csv"
    write_manifest(manifest, rows)
    log.info("wrote %d synthetic clips and %s", len(rows), manifest)
    return manifest
