"""Tagging whole files: decode, window exactly as the daemon does, average the scores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tagd.audio import AudioError, decode_file
from tagd.engines import Engine
from tagd.windowing import clip_windows

DEFAULT_BATCH = 8


class TooShortError(AudioError):
    """The file holds less audio than one model window."""


@dataclass
class FileTags:
    path: Path
    duration_s: float
    windows: int
    scores: np.ndarray  # [n_tags], mean over windows

    def ranked(self, tags: list[str]) -> list[tuple[str, float]]:
        order = np.argsort(-self.scores, kind="stable")
        return [(tags[i], float(self.scores[i])) for i in order]


def tag_file(
    engine: Engine,
    path: str | Path,
    hop_samples: int | None = None,
    batch_size: int = DEFAULT_BATCH,
) -> FileTags:
    """Mean scores over all windows of ``path``; raises AudioError when it cannot."""
    card = engine.card
    path = Path(path)
    samples = decode_file(path, card.sample_rate)
    duration = len(samples) / card.sample_rate
    windows = clip_windows(samples, card.window_samples, hop_samples or card.hop_samples)
    if not windows:
        raise TooShortError(
            f"{path}: {duration:.2f} s of audio is shorter than one "
            f"{card.window_seconds:.2f} s window of {card.name}"
        )
    if engine.max_batch is not None:
        batch_size = min(batch_size, engine.max_batch)
    total = np.zeros(card.n_tags, dtype=np.float64)
    for first in range(0, len(windows), batch_size):
        batch = np.stack([w.samples for w in windows[first : first + batch_size]])
        total += engine.run(batch).sum(axis=0, dtype=np.float64)
    return FileTags(path, duration, len(windows), (total / len(windows)).astype(np.float32))
