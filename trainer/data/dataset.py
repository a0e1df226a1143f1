"""What every data source becomes, and how training reads prepared audio back.

Two stages, two types:

- ``LabelledSet``: clips on disk with tags and a split, as a loader (MTT, MSD, a CSV
  manifest) reads them from the source's own files. Nothing is decoded yet.
- ``PreparedData``: the same clips after ``prepare`` decoded them once to mono int16 at
  the model's rate, in shards beside a JSON index. Training and evaluation read only this.

A clip's labels are partial where its source says so: a real recording knows whether
someone speaks but nobody named the instruments of a game score. Such a clip lists the
tags it does not know (``unknown``), and its label row holds NaN there, which the loss
and the metrics leave out; every other tag is present (1) or absent (0).

Random crops for training live here too. Evaluation windows a clip by the rule that
``tagd tag`` uses (``tagd.windowing.clip_windows``), so that the scores and thresholds
it reports are those of the windows the daemon sees.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
PREPARED_FORMAT = "tagd-prepared"
PREPARED_VERSION = 1
INDEX_NAME = "index.json"
INT16_SCALE = 32768.0


class DataError(ValueError):
    """A dataset's files are missing or malformed; the message says which and where."""


# -- labelled clips, before decoding ---------------------------------------------------------
@dataclass(frozen=True)
class Clip:
    clip_id: str
    path: Path
    tags: tuple[int, ...]  # indices into LabelledSet.tags
    split: str  # one of SPLITS
    unknown: tuple[int, ...] = ()  # tags nobody labelled for this clip: neither present nor absent


@dataclass
class LabelledSet:
    source: str  # what the clips came from, e.g. "magnatagatune /data/mtt"; goes in the card
    tags: list[str]
    clips: list[Clip]
    notes: dict[str, int] = field(default_factory=dict)  # e.g. clips dropped and why

    def split_counts(self) -> dict[str, int]:
        counts = Counter(clip.split for clip in self.clips)
        return {split: counts.get(split, 0) for split in SPLITS}

    def tag_counts(self) -> list[int]:
        counts = Counter(tag for clip in self.clips for tag in clip.tags)
        return [counts.get(i, 0) for i in range(len(self.tags))]

    def summary(self) -> str:
        splits = ", ".join(f"{n} {split}" for split, n in self.split_counts().items())
        text = f"{self.source}: {len(self.clips)} clips ({splits}), {len(self.tags)} tags"
        if self.notes:
            text += "; " + ", ".join(f"{key}: {value}" for key, value in self.notes.items())
        return text


def top_tags(counts: Counter, n_tags: int | None) -> list[str]:
    """The ``n_tags`` most frequent tags (all when None), most frequent first.

    Ties keep the order in which tags were first counted, so a file's column order decides.
    """
    ranked = sorted(counts, key=lambda tag: -counts[tag])  # sorted() is stable
    ranked = [tag for tag in ranked if counts[tag] > 0]
    return ranked if n_tags is None else ranked[:n_tags]


def hashed_split(key: str, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """A split from a hash of the clip's key: stable across runs and machines."""
    digest = hashlib.sha1(key.encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < test_fraction:
        return "test"
    if position < test_fraction + valid_fraction:
        return "valid"
    return "train"


def check_split(value: str, where: str) -> str:
    split = value.strip().lower()
    aliases = {"validation": "valid", "val": "valid", "dev": "valid", "eval": "test"}
    split = aliases.get(split, split)
    if split not in SPLITS:
        raise DataError(f"{where}: split must be one of {', '.join(SPLITS)}, got {value!r}")
    return split


# -- prepared audio ----------------------------------------------------------------------------
@dataclass(frozen=True)
class PreparedClip:
    clip_id: str
    split: str
    tags: tuple[int, ...]
    shard: str  # file name under shards/
    offset: int  # first sample in the shard
    length: int  # samples
    unknown: tuple[int, ...] = ()  # tags not labelled for this clip (NaN in its label row)


class PreparedData:
    """A prepared dataset: ``index.json`` plus int16 shards, memory-mapped on first use."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index_path = self.root / INDEX_NAME
        if not index_path.is_file():
            raise DataError(
                f"{self.root} is not a prepared dataset (no {INDEX_NAME}); "
                f"run `tagd-train prepare` first"
            )
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{index_path}: not valid JSON ({exc}); prepare again") from exc
        if index.get("format") != PREPARED_FORMAT or index.get("version") != PREPARED_VERSION:
            raise DataError(
                f"{index_path}: not a {PREPARED_FORMAT} v{PREPARED_VERSION} index; prepare again"
            )
        self.index = index
        self.sample_rate: int = index["sample_rate"]
        self.tags: list[str] = index["tags"]
        self.source: str = index.get("source", "")
        self.clips = [
            PreparedClip(
                c["id"],
                c["split"],
                tuple(c["tags"]),
                c["shard"],
                c["offset"],
                c["length"],
                tuple(c.get("unknown", ())),
            )
            for c in index["clips"]
        ]
        self.skipped: list[dict] = index.get("skipped", [])
        self._shards: dict[str, np.ndarray] = {}

    @property
    def n_tags(self) -> int:
        return len(self.tags)

    def indices(self, split: str) -> list[int]:
        return [i for i, clip in enumerate(self.clips) if clip.split == split]

    def audio(self, i: int) -> np.ndarray:
        """Clip ``i`` as int16 samples (a view into the memory-mapped shard)."""
        clip = self.clips[i]
        shard = self._shards.get(clip.shard)
        if shard is None:
            shard = np.load(self.root / "shards" / clip.shard, mmap_mode="r", allow_pickle=False)
            self._shards[clip.shard] = shard
        return shard[clip.offset : clip.offset + clip.length]

    def labels(self, i: int) -> np.ndarray:
        """1 present, 0 absent, NaN unknown, a column a tag."""
        target = np.zeros(self.n_tags, dtype=np.float32)
        target[list(self.clips[i].tags)] = 1.0
        target[list(self.clips[i].unknown)] = np.nan
        return target

    def label_matrix(self, indices: list[int], tags: list[str] | None = None) -> np.ndarray:
        """Clips' label rows; with ``tags``, columns in that order, and a tag this set
        does not have is unknown (NaN) for every clip."""
        matrix = (
            np.stack([self.labels(i) for i in indices]) if indices else np.zeros((0, self.n_tags))
        )
        if tags is None or tags == self.tags:
            return matrix
        column = {tag: i for i, tag in enumerate(self.tags)}
        out = np.full((len(indices), len(tags)), np.nan, dtype=np.float32)
        for j, tag in enumerate(tags):
            if tag in column:
                out[:, j] = matrix[:, column[tag]]
        return out

    @property
    def partial(self) -> bool:
        """Whether any clip leaves a tag unknown."""
        return any(clip.unknown for clip in self.clips)

    def tag_counts(self, split: str | None = None) -> list[int]:
        counts = Counter(
            tag for clip in self.clips if split in (None, clip.split) for tag in clip.tags
        )
        return [counts.get(i, 0) for i in range(self.n_tags)]

    def __getstate__(self) -> dict:
        # DataLoader workers get a copy; each maps the shards itself.
        state = self.__dict__.copy()
        state["_shards"] = {}
        return state


def to_float(samples: np.ndarray) -> np.ndarray:
    return np.asarray(samples, dtype=np.float32) / INT16_SCALE


def to_int16(samples: np.ndarray) -> np.ndarray:
    return np.round(np.clip(samples, -1.0, 32767 / INT16_SCALE) * INT16_SCALE).astype(np.int16)


# -- cutting windows -----------------------------------------------------------------------------
def crop(samples: np.ndarray, start: int, window_samples: int) -> np.ndarray:
    """``window_samples`` float32 from ``start``; zero-padded past the clip's end."""
    piece = to_float(samples[start : start + window_samples])
    if len(piece) < window_samples:
        piece = np.pad(piece, (0, window_samples - len(piece)))
    return piece


def looped_crop(samples: np.ndarray, start: int, window_samples: int) -> np.ndarray:
    """``window_samples`` float32 from ``start`` of the clip played as a loop.

    A clip about one window long (an MTT clip under FCN) gives a fresh view each epoch
    this way, where a plain crop can only start at 0; a clip shorter than a window is
    zero-padded to one first, so the loop has a short silence at its seam.
    """
    clip = to_float(samples)
    if len(clip) < window_samples:
        clip = np.pad(clip, (0, window_samples - len(clip)))
    start %= len(clip)
    piece = clip[start : start + window_samples]
    if len(piece) < window_samples:
        piece = np.concatenate([piece, clip[: window_samples - len(piece)]])
    return piece


def random_starts(
    lengths: np.ndarray, window_samples: int | np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A uniformly random crop start per clip; 0 for clips no longer than a window
    (``window_samples``: one length for all, or one a clip)."""
    room = np.maximum(np.asarray(lengths) - window_samples, 0)
    return np.floor(rng.random(len(room)) * (room + 1)).astype(np.int64)
