"""Tagging whole files: decode a block at a time, window as `tagd serve` windows a stream
(a file shorter than a window by the clip rule of tagd.windowing), average the scores.

A file's windows (``FileWindows``) go through a scorer (tagd.scoring) in order, as a
stream's through `tagd serve`: full windows a batch at a time, or incremental inference
(the default of `tagd tag`), each window from the last one's state, the same scores for
a fraction of the work, one window at a time. Memory holds a window and a few blocks of
audio, whatever the file's length.

``timeline_file`` follows a file's windows as `tagd serve` follows a stream's, through
the daemon's ``Tagger`` and a ``Segmenter`` (tagd.timeline): the segments `tagd tag
--timeline` writes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tagd.arrivals import Arrival
from tagd.audio import STREAM_BLOCK_FRAMES, AudioError, decode_blocks
from tagd.card import ModelCard
from tagd.engines import Engine
from tagd.scoring import FullWindows, Scorer, WindowAt
from tagd.stream import ReadyWindow
from tagd.tagger import Tagger
from tagd.timeline import Segment, Segmenter, TimelineFormat, in_start_order, write_timeline
from tagd.windowing import ClipTooShortError, Window, Windower

# Windows per engine call. ONNX Runtime's arena keeps the activations of the largest
# batch, and a full-size FCN-4 window's are tens of MB: docs/models.md has the peaks.
DEFAULT_BATCH = 1
FILE_STREAM = "file"  # the stream name a file's windows carry through a scorer
FILE_EPOCH = 0  # a file is one stream that never restarts
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


class FileWindows:
    """The windows of a file, cut as `tagd serve` cuts a stream (the daemon's
    ``Windower``), decoded a block at a time (``decode_blocks``): memory holds a window and
    a few blocks, whatever the file's length. A file shorter than one window is one
    zero-padded window (tagd.windowing's clip rule), and shorter than the shortest clip a
    TooShortError; a file that cannot be decoded an AudioError. ``samples`` counts the
    samples decoded so far (the file's length at the model's rate once iterated);
    ``on_progress`` gets them in seconds after each block."""

    def __init__(
        self,
        path: Path,
        card: ModelCard,
        hop_samples: int,
        block_frames: int = STREAM_BLOCK_FRAMES,
        on_progress: Callable[[float], None] | None = None,
    ):
        self.path, self.card, self.hop_samples = path, card, hop_samples
        self.block_frames, self.on_progress = block_frames, on_progress
        self.samples = 0

    def __iter__(self) -> Iterator[Window]:
        card = self.card
        windower = Windower(card.window_samples, self.hop_samples)
        head: list[np.ndarray] | None = []  # the audio before the first window; None after
        for block in decode_blocks(self.path, card.sample_rate, self.block_frames):
            if head is not None:
                head.append(block)
            for window in windower.push(block):
                head = None
                yield window
            self.samples = windower.total
            if self.on_progress is not None:
                self.on_progress(windower.total / card.sample_rate)
        if head is not None:  # shorter than a window: one padded window, or too short
            check_length(card, windower.total, self.path)
            samples = np.concatenate(head)[: card.window_samples]
            yield Window(0, np.pad(samples, (0, card.window_samples - len(samples))))


def tag_file(
    engine: Engine,
    path: str | Path,
    hop_samples: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    scorer: Scorer | None = None,
) -> FileTags:
    """Mean scores over the windows of ``path`` (``FileWindows``: decoded a block at a
    time, a running sum); raises AudioError when it cannot.

    ``scorer`` (full windows on ``engine`` by default) must be for ``hop_samples`` (or the
    card's hop). A call takes ``batch_size`` windows at most, fewer where the scorer's
    ``max_consecutive`` says more are not worth it.
    """
    card = engine.card
    path = Path(path)
    hop_samples = hop_samples or card.hop_samples
    scorer = scorer or FullWindows([engine], hop_samples)
    if scorer.hop_samples != hop_samples:
        raise ValueError(f"a scorer for hop {scorer.hop_samples} asked to tag at {hop_samples}")
    batch_size = min(batch_size, scorer.max_consecutive or batch_size)
    total = np.zeros(card.n_tags, dtype=np.float64)
    batch = np.empty((batch_size, card.window_samples), dtype=np.float32)
    keys: list[WindowAt] = []
    count = 0
    file_windows = FileWindows(path, card, hop_samples)
    scorer.forget(FILE_STREAM)  # the last file's chain
    for window in file_windows:
        batch[len(keys)] = window.samples
        keys.append(WindowAt(FILE_STREAM, 0, window.start))
        if len(keys) == batch_size:
            total += scorer.run(keys, batch).sum(axis=0, dtype=np.float64)
            count, keys = count + len(keys), []
    if keys:
        total += scorer.run(keys, batch[: len(keys)]).sum(axis=0, dtype=np.float64)
        count += len(keys)
    scorer.forget(FILE_STREAM)
    duration = file_windows.samples / card.sample_rate
    return FileTags(path, duration, count, (total / count).astype(np.float32))


@dataclass
class FileTimeline:
    path: Path
    duration_s: float
    windows: int
    segments: list[Segment]  # in start order


def timeline_file(
    engine: Engine,
    path: str | Path,
    tagger: Tagger,
    segmenter: Segmenter,
    hop_samples: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    scorer: Scorer | None = None,
    on_progress: Callable[[float], None] | None = None,
    block_frames: int = STREAM_BLOCK_FRAMES,
) -> FileTimeline:
    """The segments of ``path``: its windows (``FileWindows``) scored by ``scorer`` and
    followed by ``tagger`` and ``segmenter`` as the daemon follows a stream's.
    ``on_progress`` gets the seconds decoded so far. Raises AudioError when it cannot."""
    card = engine.card
    path = Path(path)
    stream = str(path)
    hop_samples = hop_samples or card.hop_samples
    scorer = scorer or FullWindows([engine], hop_samples)
    if scorer.hop_samples != hop_samples:
        raise ValueError(f"a scorer for hop {scorer.hop_samples} asked to tag at {hop_samples}")
    batch_size = min(batch_size, scorer.max_consecutive or batch_size)
    batch = np.empty((batch_size, card.window_samples), dtype=np.float32)
    pending: list[ReadyWindow] = []
    segments: list[Segment] = []
    file_windows = FileWindows(path, card, hop_samples, block_frames, on_progress)

    def score(ready: list[ReadyWindow]) -> None:
        for row, window in enumerate(ready):
            batch[row] = window.samples
        for window, scores in zip(ready, scorer.run(ready, batch[: len(ready)]), strict=True):
            segments.extend(segmenter.update(tagger.update(window, scores)))

    for forget in (scorer, tagger, segmenter):
        forget.forget(stream)  # a file tagged before under this name starts afresh
    windows = 0
    try:
        for window in file_windows:
            pending.append(_ready(stream, windows, window.start, window.samples))
            windows += 1
            if len(pending) == batch_size:
                score(pending)
                pending = []
        if pending:
            score(pending)
        duration = file_windows.samples / card.sample_rate
        segments.extend(segmenter.close(stream, end=duration))
    finally:
        for forget in (scorer, tagger, segmenter):
            forget.forget(stream)
    return FileTimeline(path, duration, windows, in_start_order(segments))


def _ready(stream: str, seq: int, start: int, samples: np.ndarray) -> ReadyWindow:
    """A file's window as the Tagger takes a stream's: one epoch, no arrival time."""
    return ReadyWindow(stream, seq, FILE_EPOCH, start, samples, Arrival(0.0, 0.0))


class TimelineOutputError(ValueError):
    """Where timelines should go does not fit the files asked for."""


class TimelineOutputs:
    """Where `tagd tag --timeline` writes each file's timeline (``open_outputs``)."""

    def __init__(self, fmt: TimelineFormat, targets: dict[Path, Path] | None):
        self.fmt = fmt
        self.targets = targets  # input → output file; None: standard output
        self._headed = False

    def write(self, path: Path, segments: list[Segment]) -> None:
        """``path``'s segments: appended to standard output (the header once), or to its
        own file, written whole to a temporary beside it and renamed into place, so an
        interrupted run leaves no half timeline."""
        if self.targets is None:
            if self._headed:
                for number, segment in enumerate(segments, start=1):
                    sys.stdout.write(self.fmt.render(segment, number))
            else:
                write_timeline(segments, sys.stdout, self.fmt)
                self._headed = True
            sys.stdout.flush()
            return
        target = self.targets[path]
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        with open(partial, "w", encoding="utf-8", newline="") as handle:
            write_timeline(segments, handle, self.fmt)
        os.replace(partial, target)


# formats that hold one file's segments only: no stream column to tell files apart
SINGLE_FILE_FORMATS = frozenset({"audacity", "vtt", "srt"})


def open_outputs(files: list[Path], out: Path | None, fmt: TimelineFormat) -> TimelineOutputs:
    """Standard output when ``out`` is None (several files only in CSV or JSON Lines, whose
    stream column says which file); the file ``out`` for one input that is not a folder;
    else a folder ``out`` with a file per input, named after it with the format's suffix
    (``show.mp3`` → ``show.vtt``; its full name, ``show.mp3.vtt``, where two inputs share a
    stem), under the same subfolders as below the inputs' common folder."""
    if out is None:
        if len(files) > 1 and fmt.name in SINGLE_FILE_FORMATS:
            raise TimelineOutputError(
                f"{fmt.description} hold one file's segments: give --out FOLDER for "
                f"{len(files)} files (or --format csv or jsonl, which name the file)"
            )
        return TimelineOutputs(fmt, None)
    if len(files) == 1 and not out.is_dir():
        return TimelineOutputs(fmt, {files[0]: out})
    if out.exists() and not out.is_dir():
        raise TimelineOutputError(f"--out {out}: a file, but {len(files)} inputs need a folder")
    root = Path(os.path.commonpath([p.resolve().parent for p in files]))
    relative = [p.resolve().relative_to(root) for p in files]
    stems = [r.parent / r.stem for r in relative]
    shared = {s for s in stems if stems.count(s) > 1}
    targets = {
        path: out / r.parent / ((r.name if s in shared else r.stem) + fmt.suffix)
        for path, r, s in zip(files, relative, stems, strict=True)
    }
    return TimelineOutputs(fmt, targets)
