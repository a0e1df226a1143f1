"""Tagging whole files: decode, window by the clip rule of tagd.windowing, average the scores.

A file's windows go through a scorer (tagd.scoring) in order, as a stream's through
`tagd serve`: full windows a batch at a time, or incremental inference (the default of
`tagd tag`), each window from the last one's state, the same scores for a fraction of
the work, one window at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tagd.audio import AudioError, decode_file
from tagd.card import ModelCard
from tagd.engines import Engine
from tagd.scoring import FullWindows, Scorer, WindowAt
from tagd.windowing import ClipTooShortError, clip_windows

# Windows per engine call. ONNX Runtime's arena keeps the activations of the largest
# batch, and a full-size FCN-4 window's are tens of MB: docs/models.md has the peaks.
DEFAULT_BATCH = 1
FILE_STREAM = "file"  # the stream name a file's windows carry through a scorer
AUDIO_SUFFIXES = frozenset(
    (
        ".wav",
        ".flac",
        ".mp3",
        ".ogg",
        ".oga",
        ".opus",
        ".m4a",
        ".aac",
        ".aiff",
        ".aif",
        ".wma",
        ".mp2",
        ".webm",
        ".mka",
    )
)


class TooShortError(AudioError):
    """The file holds less audio than the shortest clip the model scores."""


@dataclass
class FileTags:
    path: Path
    duration_s: float
    windows: int
    scores: np.ndarray  # [n_tags], mean over windows

    def ranked(self, tags: list[str]) -> list[tuple[str, float]]:
        order = np.argsort(-self.scores, kind="stable")
        return [(tags[i], float(self.scores[i])) for i in order]


def audio_files(paths: list[Path]) -> Iterator[Path]:
    """Each path, with a folder replaced by the audio files under it (recursively, sorted)."""
    for path in paths:
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
            )
            if not found:
                raise AudioError(
                    f"{path}: a folder with no audio files in it (looked for "
                    + ", ".join(sorted(AUDIO_SUFFIXES))
                    + ")"
                )
            yield from found
        else:
            yield path


def check_length(card: ModelCard, samples: int, path: Path) -> None:
    try:
        card.clip_window_starts(samples)
    except ClipTooShortError as exc:
        raise TooShortError(
            f"{path}: {samples / card.sample_rate:.2f} s of audio is shorter than the "
            f"{exc.minimum / card.sample_rate:.2f} s that {card.name} scores at least "
            f"(a quarter of its {card.window_seconds:.2f} s window, zero-padded)"
        ) from None


def tag_file(
    engine: Engine,
    path: str | Path,
    hop_samples: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    scorer: Scorer | None = None,
) -> FileTags:
    """Mean scores over the windows of ``path``; raises AudioError when it cannot.

    ``scorer`` (full windows on ``engine`` by default) must be for ``hop_samples`` (or the
    card's hop). A call takes ``batch_size`` windows at most, fewer where the scorer's
    ``max_consecutive`` says more are not worth it.
    """
    card = engine.card
    path = Path(path)
    samples = decode_file(path, card.sample_rate)
    check_length(card, len(samples), path)
    hop_samples = hop_samples or card.hop_samples
    scorer = scorer or FullWindows([engine], hop_samples)
    if scorer.hop_samples != hop_samples:
        raise ValueError(f"a scorer for hop {scorer.hop_samples} asked to tag at {hop_samples}")
    batch_size = min(batch_size, scorer.max_consecutive or batch_size)
    total = np.zeros(card.n_tags, dtype=np.float64)
    batch = np.empty((batch_size, card.window_samples), dtype=np.float32)
    keys: list[WindowAt] = []
    count = 0
    scorer.forget(FILE_STREAM)  # the last file's chain
    for window in clip_windows(samples, card.window_samples, hop_samples):
        batch[len(keys)] = window.samples
        keys.append(WindowAt(FILE_STREAM, 0, window.start))
        if len(keys) == batch_size:
            total += scorer.run(keys, batch).sum(axis=0, dtype=np.float64)
            count, keys = count + len(keys), []
    if keys:
        total += scorer.run(keys, batch[: len(keys)]).sum(axis=0, dtype=np.float64)
        count += len(keys)
    scorer.forget(FILE_STREAM)
    duration = len(samples) / card.sample_rate
    return FileTags(path, duration, count, (total / count).astype(np.float32))
